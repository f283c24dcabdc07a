"""`onnxgate demo drift`: the whole loop on this machine, with a concept that changes under a served model.

    a classifier trained on concept A  ->  onnxgate convert --recipe sklearn --training-data base.csv
    onnxgate serve (poll mode, prediction log on)  <-  a client streams requests and sends ground truth
    the learning loop (Learner, in this process: never in the gateway) watches the log, retrains and promotes
    halfway through, the world switches to concept B: live accuracy falls, the loop retrains, promotes,
    and accuracy comes back; an oracle trained directly on B is scored on the same requests

It prints a table per block of requests (served version, live accuracy, the oracle's) and writes
drift.png (live accuracy over time, promotions marked) and drift.json. `run_demo` is what the test
calls, on a smaller stream.
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import pandas as pd

from onnxgate.learning import decisions
from onnxgate.learning.learn import POLICY_FILE, Learner

FEATURES = ["x0", "x1", "x2", "x3"]


def concept(name: str, n: int, rng: np.random.Generator, noise: float = 0.03) -> pd.DataFrame:
    """Four standard-normal features; the label is a linear rule that the change of concept replaces."""
    x = rng.standard_normal((n, 4))
    score = x[:, 0] + x[:, 1] if name == "A" else x[:, 0] - x[:, 1] + 0.5 * x[:, 2]
    y = (score > 0).astype(np.int64)
    flip = rng.random(n) < noise
    frame = pd.DataFrame(x, columns=FEATURES)
    frame["y"] = np.where(flip, 1 - y, y)
    return frame


@dataclass
class Block:
    index: int
    concept: str
    version: str  # the version that answered most of the block
    accuracy: float
    oracle: float


@dataclass
class DemoResult:
    blocks: list[Block]
    promotions: list[tuple[int, str]]  # (block index, new version)
    decisions: list[dict[str, Any]]
    recovered: float  # live accuracy over the blocks after the last promotion (concept B)
    oracle: float  # the oracle's accuracy on the same requests
    summary: dict[str, Any] = field(default_factory=dict)


def run_demo(
    work: Path,
    *,
    per_concept: int = 2500,
    block: int = 250,
    base_rows: int = 2000,
    seed: int = 0,
    policy: str | None = None,
    settle_s: float = 60.0,
) -> DemoResult:
    from sklearn.linear_model import LogisticRegression

    from onnxgate.client import Client
    from onnxgate.server.cli import main as onnxgate

    rng = np.random.default_rng(seed)
    base = concept("A", base_rows, rng)
    base.to_csv(work / "base.csv", index=False)
    model = LogisticRegression().fit(base[FEATURES], base["y"])
    joblib.dump(model, work / "model.joblib")
    new_world = concept("B", base_rows, rng)
    oracle = LogisticRegression().fit(new_world[FEATURES], new_world["y"])
    repo = work / "repository"
    code = onnxgate(
        ["convert", str(work / "model.joblib"), "--model-repository", str(repo), "--model", "drifty",
         "--recipe", "sklearn", "--training-data", str(work / "base.csv"), "--target", "y"]
    )  # fmt: skip
    if code != 0:
        raise RuntimeError(f"onnxgate convert exited with {code}")
    (repo / "drifty" / POLICY_FILE).write_text(
        policy
        or "retrain_after_labels = 500\naccuracy_below = 0.85\ndrift_psi_above = 0.25\nmin_interval_s = 0\n"
        "backoff_after = 3\nmin_rows = 300\nquality_rows = 200\n"
    )
    server = subprocess.Popen(
        [sys.executable, "-m", "onnxgate", "serve", "--model-repository", str(repo), "--grpc-port", "0",
         "--metrics-port", "-1", "--http-port", "-1", "--model-control-mode", "poll", "--poll-interval-s", "0.5",
         "--predlog-dir", str(work / "log"), "--predlog-flush-ms", "50", "--predlog-replica-id", "demo"],
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    try:
        address = _ready(server)
        learner = Learner(repo, str(work / "log"))
        stop = threading.Event()
        loop = threading.Thread(target=learner.serve, args=(1.0, stop), daemon=True)
        loop.start()
        blocks: list[Block] = []
        stream = pd.concat([concept("A", per_concept, rng), concept("B", per_concept, rng)], ignore_index=True)
        with Client(address) as client:
            for start in range(0, len(stream), block):
                rows = stream.iloc[start : start + block]
                blocks.append(_block(client, len(blocks), rows, oracle, "A" if start < per_concept else "B"))
                print(_row(blocks[-1]), flush=True)
            # the loop may still be promoting: keep serving concept B until a version after the change holds
            deadline = time.monotonic() + settle_s
            while time.monotonic() < deadline and not _settled(blocks):
                blocks.append(_block(client, len(blocks), concept("B", block, rng), oracle, "B"))
                print(_row(blocks[-1]), flush=True)
        stop.set()
        loop.join(120)
    finally:
        server.terminate()
        server.wait(60)
    promotions = [(b.index, b.version) for prev, b in itertools.pairwise(blocks) if b.version != prev.version]
    after = [b for b in blocks if b.concept == "B" and promotions and b.index > promotions[-1][0]][-4:]
    recovered = float(np.mean([b.accuracy for b in after])) if after else float("nan")
    oracle_after = float(np.mean([b.oracle for b in after])) if after else float("nan")
    return DemoResult(blocks, promotions, decisions.read(repo / "drifty"), recovered, oracle_after)


def _ready(server: subprocess.Popen[str]) -> str:
    assert server.stderr is not None
    for line in server.stderr:
        match = re.search(r"serving gRPC on (\S+)", line)
        if match:
            threading.Thread(target=lambda: [None for _ in server.stderr or []], daemon=True).start()
            return match.group(1)
    raise RuntimeError(f"onnxgate serve exited with {server.wait()}")


def _block(client: Any, index: int, rows: pd.DataFrame, oracle: Any, name: str) -> Block:
    """One block of requests, one row each, with ground truth sent back for every prediction."""
    right, versions = 0, []
    x = rows[FEATURES].to_numpy(np.float32)
    truth = rows["y"].to_numpy()
    for i in range(len(rows)):
        result = client.infer("drifty", {"input": x[i : i + 1]})
        right += int(result["label"][0] == truth[i])
        versions.append(result.version)
        client.send_feedback(result.id, label=str(int(truth[i])))
    version = max(set(versions), key=versions.count)
    oracle_accuracy = float(np.mean(oracle.predict(rows[FEATURES]) == truth))
    return Block(index, name, version, right / len(rows), oracle_accuracy)


def _settled(blocks: list[Block], runs: int = 4) -> bool:
    """The last `runs` blocks of concept B answered by one version, newer than the one serving when B
    began, within 3 points of the oracle: recovered (else the stream goes on until the deadline)."""
    b = [x for x in blocks if x.concept == "B"]
    tail = b[-runs:]
    if len(b) <= runs or len({x.version for x in tail}) != 1 or tail[0].version == b[0].version:
        return False
    return float(np.mean([x.oracle - x.accuracy for x in tail])) <= 0.03


def _row(b: Block) -> str:
    return f"{b.index:>5} {b.concept:>7} {b.version:>7} {b.accuracy:>8.3f} {b.oracle:>8.3f}"


def plot(result: DemoResult, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    idx = [b.index for b in result.blocks]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    ax.plot(idx, [b.accuracy for b in result.blocks], marker="o", label="live accuracy (served version)")
    new = [b for b in result.blocks if b.concept == "B"]
    ax.plot(
        [b.index for b in new],
        [b.oracle for b in new],
        linestyle="--",
        color="gray",
        label="oracle trained on concept B",
    )
    change = next((b.index for b in result.blocks if b.concept == "B"), None)
    if change is not None:
        ax.axvspan(change - 0.5, idx[-1] + 0.5, color="orange", alpha=0.08, label="concept B")
    for block, version in result.promotions:
        ax.axvline(block - 0.5, color="green", linestyle=":")
        ax.annotate(f"v{version}", (block - 0.4, 0.42), color="green")
    ax.set_ylim(0.4, 1.0)
    ax.set_xlabel("block of requests")
    ax.set_ylabel("accuracy")
    ax.set_title("onnxgate learn: a concept change, retrained and promoted from live feedback")
    ax.legend(loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def configure_parser(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="demo", required=True)
    drift = sub.add_parser("drift", help="a served model, a concept change, the loop retraining and promoting")
    drift.add_argument("--out", type=Path, default=Path("drift-demo"), help="where drift.png and drift.json go")
    drift.add_argument("--per-concept", type=int, default=2500, help="requests before and after the change")
    drift.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"{'block':>5} {'concept':>7} {'version':>7} {'live':>8} {'oracle':>8}", flush=True)
    with tempfile.TemporaryDirectory(prefix="onnxgate-demo-") as tmp:
        result = run_demo(Path(tmp), per_concept=args.per_concept, seed=args.seed)
    print()
    print(decisions.table(result.decisions))
    gap = result.oracle - result.recovered
    print(
        f"\nafter the last promotion: live accuracy {result.recovered:.3f}, oracle {result.oracle:.3f} "
        f"({gap * 100:+.1f} points); promotions at blocks {[b for b, _ in result.promotions]}"
    )
    written = [args.out / "drift.json"]
    try:
        plot(result, args.out / "drift.png")
        written.insert(0, args.out / "drift.png")
    except ImportError:  # the plot is the demo extra's: the table and drift.json say the same in numbers
        print("no plot: matplotlib is not installed (pip install 'onnxgate[demo]')")
    (args.out / "drift.json").write_text(
        json.dumps(
            {
                "blocks": [b.__dict__ for b in result.blocks],
                "promotions": result.promotions,
                "recovered": result.recovered,
                "oracle": result.oracle,
                "decisions": result.decisions,
            },
            indent=1,
            default=str,
        )
    )
    print("wrote " + " and ".join(str(p) for p in written))
    return 0 if gap <= 0.03 else 1

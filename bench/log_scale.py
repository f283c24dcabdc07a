"""The prediction log at scale: a generated log in the real layout, and a full `dataset export` by each
engine (DuckDB, Spark local[2], the pure-pyarrow path), each in its own process: wall time and peak
memory (RSS of the process tree, sampled). Results go to docs/benchmarks.md.

    .venv/bin/python bench/log_scale.py --predictions 10000000 --feedback 1000000 [--engines duckdb,spark,arrow]
    .venv/bin/python bench/log_scale.py --predictions 200000 --feedback 20000      # a smoke run

`generate(root, predictions, feedback, replicas, seed)` writes the log (reusable: the joiner's bench).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from onnxgate.server.feedback import SCHEMA as FEEDBACK_SCHEMA  # noqa: E402  (after the path)
from onnxgate.server.feedback_order import content_hash  # noqa: E402

MODEL = "iris"
START_US = int(datetime(2026, 1, 1, tzinfo=UTC).timestamp() * 1_000_000)
CORRECTIONS = 0.05  # of feedback rows: a second label for an already labelled prediction, later
DUPLICATES = 0.02  # of feedback rows: the same message again, stored by another replica


def _lists(values: np.ndarray, width: int) -> pa.Array:
    """Tensor values as the gateway writes them (predlog.build_batch): large lists, 64-bit offsets."""
    offsets = np.arange(0, len(values) + 1, width, dtype=np.int64)
    return pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(values))


def _shapes(n: int, shape: list[int]) -> pa.Array:
    offsets = np.arange(0, n * len(shape) + 1, len(shape), dtype=np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(np.tile(np.asarray(shape, np.int64), n)))


def generate(
    root: Path, predictions: int, feedback: int, replicas: int = 4, seed: int = 0, rows_per_segment: int = 100_000
) -> None:
    """A log like the gateway writes, rolled: `predictions` rows of model iris (versions 1 and 2, ids
    p<n>, one every ms, round-robin over `replicas`; input x: 4 floats, outputs label and 3
    probabilities, with shapes) in Parquet segments of `rows_per_segment` rows, and `feedback` rows
    (labels; about 5% corrections and 2% duplicates from another replica) in the feedback segments."""
    rng = np.random.default_rng(seed)
    names = [f"replica-{k}" for k in range(replicas)]
    per_replica = np.array_split(np.arange(predictions, dtype=np.int64), replicas)
    for replica, ids in zip(names, per_replica, strict=True):
        directory = root / replica / MODEL
        directory.mkdir(parents=True, exist_ok=True)
        for seq, start in enumerate(range(0, len(ids), rows_per_segment), 1):
            chunk = ids[start : start + rows_per_segment]
            n = len(chunk)
            x = rng.normal(size=(n, 4)).astype(np.float32)
            probabilities = rng.dirichlet(np.ones(3), size=n).astype(np.float32)
            table = pa.table(
                {
                    "id": pa.array(np.char.add("p", chunk.astype(str))),
                    "model": pa.array(np.full(n, MODEL)),
                    "version": pa.array(np.where(chunk % 2 == 0, "1", "2")),
                    "ts": pa.array(START_US + chunk * 1000, pa.timestamp("us", tz="UTC")),
                    "replica": pa.array(np.full(n, replica)),
                    "input.x": _lists(x.ravel(), 4),
                    "input.x.shape": _shapes(n, [1, 4]),
                    "output.label": _lists(probabilities.argmax(axis=1).astype(np.int64), 1),
                    "output.label.shape": _shapes(n, [1]),
                    "output.probabilities": _lists(probabilities.ravel(), 3),
                    "output.probabilities.shape": _shapes(n, [1, 3]),
                }
            )
            pq.write_table(table, directory / f"predictions-{seq:08d}.parquet")
    # feedback: first labels of distinct predictions, then corrections and duplicates of some of them
    n_dup = int(feedback * DUPLICATES)
    n_fix = int(feedback * CORRECTIONS)
    n_first = feedback - n_dup - n_fix
    labelled = rng.choice(predictions, size=min(n_first, predictions), replace=False)
    fixed = rng.choice(labelled, size=n_fix)
    duplicated = rng.choice(labelled, size=n_dup)
    first_label = rng.integers(0, 3, size=len(labelled))
    label_of = dict(zip(labelled.tolist(), first_label.tolist(), strict=True))
    pids = np.concatenate([labelled, fixed, duplicated])
    labels = np.concatenate(
        [
            first_label,
            (np.array([label_of[p] for p in fixed.tolist()], np.int64) + 1) % 3,
            [label_of[p] for p in duplicated.tolist()],
        ]
    ).astype(np.int64)
    # a label 1-60 s after its prediction; a correction 1-10 min after; a duplicate 0-1 s after the first
    base = START_US + pids * 1000
    delay = np.concatenate(
        [
            rng.integers(1_000_000, 60_000_000, size=len(labelled)),
            rng.integers(60_000_000, 600_000_000, size=n_fix) + 60_000_000,
            rng.integers(1_000_000, 60_000_000, size=n_dup) + rng.integers(0, 1_000_000, size=n_dup),
        ]
    )
    ts = base + delay
    # duplicates: same content, stored by the next replica (it had not read the other's yet)
    home = pids % replicas
    home[len(labelled) + n_fix :] = (home[len(labelled) + n_fix :] + 1) % replicas
    content = {k: content_hash("", "", str(k), None, None, None) for k in range(3)}
    order = np.argsort(ts, kind="stable")
    for k, replica in enumerate(names):
        rows = order[home[order] == k]
        n = len(rows)
        table = pa.table(
            {
                "prediction_id": pa.array(np.char.add("p", pids[rows].astype(str))),
                "feedback_id": pa.array(np.char.add(f"f{k}-", np.arange(n).astype(str))),
                "model": pa.array(np.full(n, "")),
                "version": pa.array(np.full(n, "")),
                "ts": pa.array(ts[rows], pa.timestamp("us", tz="UTC")),
                "replica": pa.array(np.full(n, replica)),
                "label": pa.array(labels[rows].astype(str)),
                "value": pa.nulls(n, pa.float64()),
                "tensors": pa.nulls(n, FEEDBACK_SCHEMA.field("tensors").type),
                "reward": pa.nulls(n, pa.float64()),
                "sent_at": pa.nulls(n, pa.timestamp("us", tz="UTC")),
                "content": pa.array([content[int(v)] for v in labels[rows]]),
            },
            schema=FEEDBACK_SCHEMA,
        )
        for seq, start in enumerate(range(0, max(n, 1), rows_per_segment), 1):
            pq.write_table(table.slice(start, rows_per_segment), root / replica / f"feedback-{seq:08d}.parquet")


# -- measuring ---------------------------------------------------------------------------------------------
@dataclass
class Run:
    engine: str
    seconds: float
    peak_rss_mb: float
    rows: int | None
    outcome: str  # "ok", "timeout after N s", "killed: ...", "failed (rc N)"


def _tree_rss(pid: int) -> int:
    """Resident bytes of a process and all its descendants (the JVM of a Spark driver too)."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/statm") as f:
                total += int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except (FileNotFoundError, ProcessLookupError, ValueError):
            continue
    return total


def measure(engine: str, command: list[str], timeout_s: float, max_rss_bytes: int) -> Run:
    """Runs one engine in its own process group; kills it past `timeout_s` or `max_rss_bytes`."""
    start = time.monotonic()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    peak, outcome = 0, ""
    while proc.poll() is None:
        peak = max(peak, _tree_rss(proc.pid))
        elapsed = time.monotonic() - start
        if elapsed > timeout_s or peak > max_rss_bytes:
            outcome = (
                f"timeout after {timeout_s:.0f} s" if elapsed > timeout_s else f"killed at {peak / 2**30:.1f} GiB RSS"
            )
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            break
        time.sleep(0.2)
    seconds = time.monotonic() - start
    out, err = proc.communicate()
    rows = None
    for line in out.splitlines():
        if line.startswith("wrote "):
            rows = int(line.split()[1])
    if not outcome:
        outcome = "ok" if proc.returncode == 0 else f"failed (rc {proc.returncode}): {err.strip().splitlines()[-1:]}"
    return Run(engine, seconds, peak / 2**20, rows, outcome)


def _out(work: Path, engine: str) -> Path:
    return work / (f"out-{engine}" + ("" if engine == "spark" else ".parquet"))


def _same(work: Path, engine: str) -> str:
    """Whether an engine's export equals DuckDB's (columns, types, values, order)."""
    expected, got = pq.read_table(_out(work, "duckdb")), pq.read_table(_out(work, engine))
    if [(f.name, f.type) for f in got.schema] != [(f.name, f.type) for f in expected.schema]:
        return "no (columns)"
    return "yes" if got.select(expected.column_names).to_pylist() == expected.to_pylist() else "no (values)"


def export_command(engine: str, root: Path, out: Path, memory_limit: str) -> list[str]:
    return [
        sys.executable, "-m", "onnxgate", "dataset", "export", "--log-dir", str(root), "--model", MODEL,
        "--out", str(out), "--engine", engine, "--memory-limit", memory_limit,
    ]  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--predictions", type=int, default=10_000_000)
    parser.add_argument("--feedback", type=int, default=1_000_000)
    parser.add_argument("--replicas", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--engines", default="duckdb,spark,arrow")
    parser.add_argument("--timeout-s", type=float, default=600, help="per engine; the process is killed past it")
    parser.add_argument("--max-rss-gib", type=float, default=16, help="per engine; killed past it")
    parser.add_argument("--memory-limit", default="1GB", help="DuckDB's memory_limit")
    parser.add_argument("--dir", type=Path, help="where the log is generated (default: a temporary directory)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="onnxgate-log-scale-", dir=args.dir))
    try:
        t0 = time.monotonic()
        generate(work / "log", args.predictions, args.feedback, args.replicas, args.seed)
        size = sum(p.stat().st_size for p in (work / "log").rglob("*.parquet"))
        print(f"generated {args.predictions} predictions, {args.feedback} feedback rows, {size / 2**20:.0f} MiB of "
              f"Parquet in {time.monotonic() - t0:.1f} s")  # fmt: skip
        runs = []
        for engine in args.engines.split(","):
            out = _out(work, engine)
            run = measure(
                engine,
                export_command(engine, work / "log", out, args.memory_limit),
                args.timeout_s,
                int(args.max_rss_gib * 2**30),
            )
            runs.append(run)
            print(json.dumps(run.__dict__), flush=True)
        # -- the live joiner's interval at this scale: the lead adds it here (same generated log) --
        base = next((r for r in runs if r.engine == "duckdb" and r.outcome == "ok"), None)
        print(
            "\n| engine | export wall time | vs duckdb | peak RSS (tree) | rows | same rows as duckdb | outcome |\n"
            "|---|---|---|---|---|---|---|"
        )
        for r in runs:
            ratio = f"{r.seconds / base.seconds:.1f}x" if base and r.outcome == "ok" else "-"
            same = _same(work, r.engine) if base and r.outcome == "ok" else "-"
            print(
                f"| {r.engine} | {r.seconds:.1f} s | {ratio} | {r.peak_rss_mb:.0f} MiB | {r.rows} | {same} | {r.outcome} |"
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

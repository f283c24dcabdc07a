"""The learning loop measured: seeded streams with a known change, through a real gateway, feedback and the Learner.

    .venv/bin/python bench/learning.py [--quick] [--tasks classifier,regressor] [--scenarios abrupt,...]
        [--noise-runs 100] [--seed 0] [--out DIR] [--img-dir docs/img] [--policy TASK=FILE]
    .venv/bin/python bench/learning.py --replot DIR/learning.json --img-dir docs/img    (the PNGs again)

Per task (a logistic regression / a linear regression, converted with `--recipe sklearn --training-data`)
and scenario (learning/streams.py: abrupt, gradual, recurring, covariate, none, noise), one run:

    onnxgate serve (poll mode, prediction log on), a fresh repository and log
    for each block of `--block` labels:
        every row is one ModelInfer request; the served version's answers score the block  (prequential)
        the oracle (below) scores the same rows
        ground truth for every prediction goes back by its prediction id (SendFeedback)
        once the log holds every label: Learner.tick() (onnxgate learn --once); a promoted version is
        waited for until the gateway serves it; every decision is kept with its block

Quality is measured against the known distribution of the labels (streams.expected_quality: accuracy, or R²
against the variance of concept A's target, in points 0-100), not the labels drawn, so a block's score
carries no label noise; the score on the drawn labels is kept too (`measured`).

What is reported, per scenario (each change point of it):

- the oracle: the same estimator refitted after every block on every labelled row of the current concept
  (it knows the change point; before 20 rows of the new concept it keeps its old model), scored on the
  same blocks before it learns them. Its plateau: its mean quality over the segment's last 3 blocks
  (the segment: from the change to the next one, or the end);
- labels to within 3 points, live and oracle: labels sent after the change before the block from which
  the curve stays at least plateau - 3 points for 3 blocks in a row (None, shown >N: never in the
  segment). The live curve is not compared with the oracle's block by block here: in the first block
  after a change the oracle has learned nothing yet and scores as badly as the served model;
- target (abrupt changes: abrupt, recurring): live labels <= 1.5 x the oracle's;
- area: the sum over blocks from the first change of (oracle - live) x block labels, in point x 1k labels;
- promotions, and false promotions: a promotion whose version is not better than the version it
  replaced in expected quality on 4,000 fresh inputs of the next block's distribution (under pure-noise
  classifier labels every promotion is false: every classifier's expected accuracy is 50%);
- retrains (promoted, rejected, failed) per 1,000 labels in steady state: the last `--steady` labels;
  for the no-change scenario against the back-off's schedule (the label trigger's runs when every
  challenger is rejected: N, 2N, 3N, then N doubling after each `backoff_after` rejections).

`--noise-runs N`: N more seeded runs of the classifier with pure-noise labels from the first label (one
gateway for all, a fresh model per run), counting promotions (target: none in 100 runs).

Writes learning.json and a table to --out, and learning-<task>.png (live quality, the oracle, every decision
marked) to --img-dir. The policy each model gets is POLICIES below (or --policy TASK=FILE): the defaults of
learning.toml and `min_interval_s = 0` (blocks come seconds apart): the triggers are the defaults (labels, drift,
the change in the champion's loss).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from onnxgate.learning import decisions as decision_log  # noqa: E402
from onnxgate.learning.streams import (  # noqa: E402
    FEATURES,
    SCENARIOS,
    TASKS,
    Oracle,
    Stream,
    backoff_schedule,
    estimator,
    expected_quality,
    labels_until_within,
    measured_quality,
)

MODEL = "m"
RETRAINS = ("promoted", "rejected", "failed")
POLICIES = {
    "classifier": "min_interval_s = 0\n",
    "regressor": "min_interval_s = 0\n",
}
ABRUPT = ("abrupt", "recurring")  # the scenarios whose changes the 1.5x target applies to
TARGET_RATIO = 1.5
POINTS = 3.0


@dataclass(frozen=True)
class Config:
    block: int = 100
    base_rows: int = 1000
    pre: int = 1500  # labels before the change
    post: int = 3000  # after it (recurring: B for half of it, then A)
    span: int = 1000  # gradual: B's share rises over this many labels
    steady: int = 1500  # the last labels, for retrains per 1k in steady state
    seed: int = 0
    noise_labels: int = 500  # per --noise-runs run


QUICK = Config(pre=600, post=1400, span=400, steady=700, noise_labels=400)


@dataclass
class Block:
    index: int
    start: int  # label position of its first row
    version: str  # the version that answered most of it
    live: float  # expected quality of the served answers (points)
    measured: float  # ... on the labels drawn
    oracle: float


@dataclass
class Made:
    block: int
    labels: int  # labels sent when the tick ran
    outcome: str
    trigger: str = ""
    champion: str | None = None
    version: str | None = None
    window: str | None = None
    p_value: float | None = None
    gain: float | None = None  # promoted: expected quality of the new version minus the old one's, points
    false: bool | None = None


@dataclass
class Result:
    task: str
    scenario: str
    config: dict[str, Any]
    changes: list[int]
    blocks: list[Block] = field(default_factory=list)
    decisions: list[Made] = field(default_factory=list)
    seconds: float = 0.0
    summary: dict[str, Any] = field(default_factory=dict)


def stream_for(task: str, scenario: str, cfg: Config, seed: int) -> Stream:
    length = cfg.pre + cfg.post
    return Stream(task, scenario, length, cfg.pre, span=cfg.span, back=cfg.pre + cfg.post // 2, seed=seed)


# -- the gateway and the repository ---------------------------------------------------------------------
def make_model(
    repo: Path, work: Path, name: str, stream: Stream, rows: int, rng: np.random.Generator, policy: str
) -> None:
    import joblib

    from onnxgate.server.cli import main as onnxgate

    base = stream.base(rows, rng)
    base.to_csv(work / f"{name}-base.csv", index=False)
    joblib.dump(estimator(stream.task).fit(base[FEATURES], base["y"]), work / f"{name}.joblib")
    args = ["convert", str(work / f"{name}.joblib"), "--model-repository", str(repo), "--model", name]
    args += ["--recipe", "sklearn", "--training-data", str(work / f"{name}-base.csv"), "--target", "y"]
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        code = onnxgate(args)
    if code != 0:
        raise RuntimeError(f"onnxgate convert exited with {code}")
    from onnxgate.learning.learn import POLICY_FILE

    (repo / name / POLICY_FILE).write_text(policy)


@contextlib.contextmanager
def gateway(repo: Path, log: Path) -> Any:
    from onnxgate.learning.demo import _ready

    server = subprocess.Popen(
        [sys.executable, "-m", "onnxgate", "serve", "--model-repository", str(repo), "--grpc-port", "0",
         "--metrics-port", "-1", "--http-port", "-1", "--model-control-mode", "poll", "--poll-interval-s", "0.2",
         "--predlog-dir", str(log), "--predlog-flush-ms", "20", "--predlog-replica-id", "bench"],
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    try:
        yield _ready(server)
    finally:
        server.terminate()
        server.wait(60)


def wait_until(predicate: Any, what: str, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout_s}s for {what}")
        time.sleep(0.05)


def labelled_in_log(repo: Path, log: Path, name: str) -> int:
    from onnxgate.learning.data import feedback_rows
    from onnxgate.learning.training import TrainingRecord
    from onnxgate.server.logfiles import LogFiles

    return len(feedback_rows(LogFiles.at(log), name, TrainingRecord.load(repo / name / "1")))


def predict_version(repo: Path, name: str, version: str, x: np.ndarray) -> np.ndarray:
    from onnxgate.learning.evaluate import predict

    return predict(repo / name / version / "model.onnx", {"input": x.astype(np.float32)})


# -- one run ---------------------------------------------------------------------------------------------
def serve_block(client: Any, name: str, x: np.ndarray, y: np.ndarray, task: str) -> tuple[np.ndarray, list[str]]:
    """One request per row (answers and versions), then ground truth for every one of them."""
    x32 = x.astype(np.float32)
    answers, versions, ids = np.empty(len(x)), [], []
    for i in range(len(x)):
        result = client.infer(name, {"input": x32[i : i + 1]})
        out = next(
            result.outputs[k] for k in ("label", "prediction", "variable", *result.outputs) if k in result.outputs
        )
        answers[i] = float(np.asarray(out).reshape(-1)[0])
        versions.append(result.version)
        ids.append(result.id)
    for i, prediction_id in enumerate(ids):
        if task == "classifier":
            client.send_feedback(prediction_id, label=str(int(y[i])))
        else:
            client.send_feedback(prediction_id, value=float(y[i]))
    return answers, versions


def run_stream(
    client: Any, learner: Any, repo: Path, log: Path, name: str, stream: Stream, base_rows: int, block: int,
    rng: np.random.Generator, *, oracle: bool = True, echo: bool = False,
) -> tuple[list[Block], list[Made]]:  # fmt: skip
    blocks: list[Block] = []
    made: list[Made] = []
    reference = Oracle(stream, stream.base(base_rows, np.random.default_rng([stream.seed, 7]))) if oracle else None
    sent = 0
    for k, start in enumerate(range(0, stream.length, block)):
        at = np.arange(start, min(start + block, stream.length))
        x = stream.inputs(at, rng)
        y = stream.labels(x, at, rng)
        answers, versions = serve_block(client, name, x, y, stream.task)
        live = stream.quality(answers, x, at)
        best = stream.quality(reference.predict(x), x, at) if reference else math.nan
        blocks.append(
            Block(
                k, start, max(set(versions), key=versions.count), live, measured_quality(stream.task, answers, y), best
            )
        )
        if reference:
            import pandas as pd

            reference.learn(pd.DataFrame(x, columns=FEATURES).assign(y=y), at)
        sent += len(at)
        wait_until(lambda n=sent: labelled_in_log(repo, log, name) >= n, "the log to hold every label")
        before = len(decision_log.read(repo / name))
        learner.tick()
        for d in decision_log.read(repo / name)[before:]:
            test = d.get("test") or {}
            m = Made(k, sent, d["outcome"], d.get("trigger", ""), d.get("champion"), d.get("version"), d.get("window"),
                     test.get("p_value"))  # fmt: skip
            if m.outcome == "promoted" and m.version and m.champion:
                m.gain, m.false = judge(repo, name, stream, m.champion, m.version, sent)
                wait_until(lambda v=m.version: client.model_ready(name, v), f"version {m.version} to be served")
            made.append(m)
        if echo:
            b = blocks[-1]
            marks = " ".join(f"{m.outcome}{' ->v' + m.version if m.version else ''}" for m in made if m.block == k)
            print(f"  {k:>4} {start:>6} v{b.version:<3} live {b.live:6.1f} oracle {b.oracle:6.1f}  {marks}", flush=True)
    return blocks, made


def judge(repo: Path, name: str, stream: Stream, old: str, new: str, at: int) -> tuple[float, bool]:
    """A promotion's true gain: both versions on 4,000 fresh inputs of the next block's distribution."""
    rng = np.random.default_rng([stream.seed, 99, at])
    where = np.full(4000, min(at, stream.length - 1))
    x = stream.inputs(where, rng)
    truth = stream.truth(x, where)
    gain = expected_quality(stream.task, predict_version(repo, name, new, x), *truth) - expected_quality(
        stream.task, predict_version(repo, name, old, x), *truth
    )
    return gain, gain <= 0


def run_scenario(work: Path, task: str, scenario: str, cfg: Config, policy: str, *, echo: bool = False) -> Result:
    from onnxgate.client import Client
    from onnxgate.learning.learn import Learner

    started = time.monotonic()
    seed = cfg.seed * 1000 + TASKS.index(task) * 100 + SCENARIOS.index(scenario)
    stream = stream_for(task, scenario, cfg, seed)
    rng = np.random.default_rng([seed, 1])
    repo, log = work / "repo", work / "log"
    make_model(repo, work, MODEL, stream, cfg.base_rows, np.random.default_rng([seed, 7]), policy)
    result = Result(task, scenario, asdict(cfg), stream.concept_changes() or [stream.change])
    with gateway(repo, log) as address, Client(address) as client:
        learner = Learner(repo, str(log))
        result.blocks, result.decisions = run_stream(
            client, learner, repo, log, MODEL, stream, cfg.base_rows, cfg.block, rng, echo=echo
        )
    result.seconds = round(time.monotonic() - started, 1)
    result.summary = summarize(result, stream, cfg, policy_of(repo))
    return result


def policy_of(repo: Path) -> Any:
    from onnxgate.learning.learn import Policy

    return Policy.load(repo / MODEL)


# -- what a run says ---------------------------------------------------------------------------------------
def summarize(result: Result, stream: Stream, cfg: Config, policy: Any) -> dict[str, Any]:
    live = [b.live for b in result.blocks]
    oracle = [b.oracle for b in result.blocks]
    n = len(result.blocks)
    bounds = [c // cfg.block for c in result.changes]
    changes = []
    for i, cb in enumerate(bounds):
        end = bounds[i + 1] if i + 1 < len(bounds) else n
        plateau = float(np.mean(oracle[max(cb, end - 3) : end]))
        level = [plateau] * n  # what the oracle reaches on this segment: both are measured against it
        live_labels = labels_until_within(live, level, cb, end, cfg.block, POINTS)
        oracle_labels = labels_until_within(oracle, level, cb, end, cfg.block, POINTS)
        entry: dict[str, Any] = {
            "at": result.changes[i],
            "live_labels": live_labels,
            "oracle_labels": oracle_labels,
            "oracle_plateau": round(plateau, 2),
            "segment_labels": (end - cb) * cfg.block,
        }
        if result.scenario in ABRUPT:
            allowed = TARGET_RATIO * (oracle_labels or 0)
            entry["target_labels"] = allowed
            entry["met"] = live_labels is not None and oracle_labels is not None and live_labels <= allowed
            entry["distance_labels"] = None if live_labels is None else max(0.0, live_labels - allowed)
        changes.append(entry)
    first = bounds[0] if bounds else 0
    area = sum((oracle[k] - live[k]) * cfg.block for k in range(first, n)) / 1000
    window_start = stream.length - cfg.steady
    retrains = [m for m in result.decisions if m.outcome in RETRAINS and m.labels > window_start]
    promotions = [m for m in result.decisions if m.outcome == "promoted"]
    summary: dict[str, Any] = {
        "changes": changes,
        "area": round(area, 2),
        "promotions": len(promotions),
        "false_promotions": sum(bool(m.false) for m in promotions),
        "retrains": sum(m.outcome in RETRAINS for m in result.decisions),
        "backed_off": sum(m.outcome == "backed off" for m in result.decisions),
        "steady_retrains_per_1k": round(1000 * len(retrains) / cfg.steady, 2),
        "seconds": result.seconds,
    }
    if result.scenario == "none":
        schedule = backoff_schedule(
            stream.length, cfg.block, getattr(policy, "retrain_after_labels", 500), getattr(policy, "backoff_after", 3)
        )
        allowed = 1000 * sum(s > window_start for s in schedule) / cfg.steady
        summary["schedule_per_1k"] = round(allowed, 2)
        summary["steady_met"] = summary["steady_retrains_per_1k"] <= allowed + 1e-9
    return summary


def noise_runs(work: Path, runs: int, cfg: Config, policy: str, *, echo: bool = False) -> dict[str, Any]:
    """`runs` seeded classifier runs, pure-noise labels from the first one; one gateway, a model per run
    (the previous one removed from the repository, so the Learner sees only the current one)."""
    from onnxgate.client import Client
    from onnxgate.learning.learn import Learner

    started = time.monotonic()
    repo, log = work / "noise-repo", work / "noise-log"
    repo.mkdir(parents=True)
    per_run = []
    with gateway(repo, log) as address, Client(address) as client:
        for i in range(runs):
            name = f"noise{i:03d}"
            seed = cfg.seed * 100000 + 50000 + i
            stream = Stream("classifier", "noise", cfg.noise_labels, 0, seed=seed)
            make_model(repo, work, name, stream, cfg.base_rows, np.random.default_rng([seed, 7]), policy)
            wait_until(lambda n=name: client.model_ready(n), f"{name} to be served")
            learner = Learner(repo, str(log))
            _, made = run_stream(
                client, learner, repo, log, name, stream, cfg.base_rows, cfg.block, np.random.default_rng([seed, 1]),
                oracle=False,
            )  # fmt: skip
            promoted = sum(m.outcome == "promoted" for m in made)
            per_run.append({"run": i, "promotions": promoted, "retrains": sum(m.outcome in RETRAINS for m in made)})
            if echo:
                print(f"  noise run {i:>3}: {per_run[-1]['retrains']} retrains, {promoted} promoted", flush=True)
            shutil.rmtree(repo / name)
    return {
        "runs": runs,
        "labels_per_run": cfg.noise_labels,
        "block": cfg.block,
        "runs_with_a_promotion": sum(r["promotions"] > 0 for r in per_run),
        "promotions": sum(r["promotions"] for r in per_run),
        "retrains": sum(r["retrains"] for r in per_run),
        "met": all(r["promotions"] == 0 for r in per_run),
        "seconds": round(time.monotonic() - started, 1),
        "per_run": per_run,
    }


# -- the report ----------------------------------------------------------------------------------------------
def _labels(value: int | None, segment: int) -> str:
    return f">{segment}" if value is None else str(value)


def table(results: list[Result], noise: dict[str, Any] | None) -> str:
    lines = [
        "| task | scenario | change at | live labels to within 3 pts | oracle labels | target (1.5x oracle) | "
        "area (pt x 1k labels) | promotions (false) | retrains / 1k labels, steady | run s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        s = r.summary
        for i, c in enumerate(s["changes"]):
            target = "-"
            if "met" in c:
                target = (
                    f"met ({c['target_labels']:.0f})"
                    if c["met"]
                    else f"missed by {_labels(c['distance_labels'], c['segment_labels'])} (allowed {c['target_labels']:.0f})"
                )
            steady = f"{s['steady_retrains_per_1k']:.2f}"
            if "schedule_per_1k" in s:
                steady += f" (schedule {s['schedule_per_1k']:.2f}: {'met' if s['steady_met'] else 'missed'})"
            first = i == 0
            promotions = f"{s['promotions']} ({s['false_promotions']})"
            lines.append(
                f"| {r.task} | {r.scenario} | {c['at']} | {_labels(c['live_labels'], c['segment_labels'])} | "
                f"{_labels(c['oracle_labels'], c['segment_labels'])} | {target} | "
                f"{s['area'] if first else ''} | {promotions if first else ''} | "
                f"{steady if first else ''} | {r.seconds if first else ''} |"
            )
    if noise:
        lines.append("")
        lines.append(
            f"Pure-noise runs: {noise['runs']} seeded classifier runs of {noise['labels_per_run']} labels "
            f"(blocks of {noise['block']}, a tick after each): {noise['retrains']} retrains, "
            f"{noise['promotions']} promotions in {noise['runs_with_a_promotion']} runs "
            f"(target 0: {'met' if noise['met'] else 'missed'}), {noise['seconds']:.0f} s."
        )
    return "\n".join(lines)


def plot(results: list[Result], path: Path, task: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mine = [r for r in results if r.task == task]
    if not mine:
        return
    cols = 2
    rows = math.ceil(len(mine) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(13, 3.2 * rows), squeeze=False, sharey=True)
    style = {
        "promoted": ("^", "green"),
        "rejected": ("x", "red"),
        "backed off": ("v", "orange"),
        "not enough data": (".", "gray"),
        "failed": ("s", "black"),
    }
    lo = max(min(min(b.live for b in r.blocks) for r in mine) - 5, -100 if task == "regressor" else 0)
    for ax, r in zip(axes.flat, mine, strict=False):
        block = r.config["block"]
        labels = [(b.start + block) / 1000 for b in r.blocks]
        ax.plot(labels, [b.measured for b in r.blocks], ".", color="tab:blue", alpha=0.25, markersize=3)
        ax.plot(labels, [b.live for b in r.blocks], color="tab:blue", label="live (served version)")
        ax.plot(labels, [b.oracle for b in r.blocks], "--", color="gray", label="oracle")
        for c in r.changes:
            ax.axvline(c / 1000, color="orange", linewidth=1)
        seen: set[str] = set()
        for m in r.decisions:
            marker, color = style.get(m.outcome, ("o", "purple"))
            y = max(r.blocks[m.block].live, lo + 4)  # below the axis: drawn at its foot
            label = m.outcome if m.outcome not in seen else None
            seen.add(m.outcome)
            ax.plot(m.labels / 1000, y, marker, color=color, markersize=8, label=label)
            if m.false:
                ax.plot(m.labels / 1000, y, "o", markerfacecolor="none", color="red", markersize=13,
                        label="false promotion" if "false" not in seen else None)  # fmt: skip
                seen.add("false")
        ax.set_title(f"{task}: {r.scenario}", fontsize=10)
        ax.set_xlabel("labels sent (thousands)")
        ax.set_ylabel("accuracy %" if task == "classifier" else "R² %")
        ax.legend(fontsize=7, loc="lower left")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(mine) :]:
        ax.set_visible(False)
    axes[0][0].set_ylim(lo, 101)
    fig.suptitle(f"onnxgate learn on seeded streams ({task}): live quality, the oracle, every decision", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="shorter streams (a smoke run of a few minutes)")
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--scenarios", default=",".join(SCENARIOS))
    ap.add_argument("--noise-runs", type=int, default=0, help="extra pure-noise classifier runs (0: none)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("learning-bench"))
    ap.add_argument("--img-dir", type=Path, default=None, help="where the PNGs go (default: --out)")
    ap.add_argument("--policy", action="append", default=[], metavar="TASK=FILE", help="learning.toml for a task")
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--replot", type=Path, help="only draw the PNGs again from a learning.json")
    args = ap.parse_args(argv)
    if args.replot:
        saved = json.loads(args.replot.read_text())["results"]
        again = [
            Result(
                **{**r, "blocks": [Block(**b) for b in r["blocks"]], "decisions": [Made(**m) for m in r["decisions"]]}
            )
            for r in saved
        ]
        for task in TASKS:
            plot(again, (args.img_dir or args.out) / f"learning-{task}.png", task)
        return 0
    cfg = QUICK if args.quick else Config()
    cfg = Config(**{**asdict(cfg), "seed": args.seed})
    policies = dict(POLICIES)
    for item in args.policy:
        task, _, file = item.partition("=")
        policies[task] = Path(file).read_text()
    args.out.mkdir(parents=True, exist_ok=True)
    img = args.img_dir or args.out
    img.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    results = []
    for task in args.tasks.split(","):
        for scenario in args.scenarios.split(","):
            if not args.quiet:
                print(f"{task} / {scenario}", flush=True)
            with tempfile.TemporaryDirectory(prefix="onnxgate-learning-bench-") as tmp:
                results.append(run_scenario(Path(tmp), task, scenario, cfg, policies[task], echo=not args.quiet))
    noise = None
    if args.noise_runs:
        with tempfile.TemporaryDirectory(prefix="onnxgate-learning-bench-") as tmp:
            noise = noise_runs(Path(tmp), args.noise_runs, cfg, policies["classifier"], echo=not args.quiet)
    report = table(results, noise)
    print(report)
    elapsed = time.monotonic() - started
    print(f"\n{elapsed:.0f} s in all")
    (args.out / "learning.json").write_text(
        json.dumps(
            {
                "config": asdict(cfg),
                "policies": policies,
                "seconds": round(elapsed, 1),
                "noise_runs": noise,
                "results": [asdict(r) for r in results],
            },
            indent=1,
            default=str,
        )
    )
    (args.out / "learning.md").write_text(report + "\n")
    for task in TASKS:
        try:
            plot(results, img / f"learning-{task}.png", task)
        except ImportError:
            print("no plot: matplotlib is not installed")
            break
    return 0


if __name__ == "__main__":
    sys.exit(main())

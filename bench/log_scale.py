"""The prediction log at scale: a generated log in the real layout, and a full `dataset export` by each
engine (DuckDB, Spark local[2], the pure-pyarrow path), each in its own process: wall time and peak
memory (RSS of the process tree, sampled); then the live joiner's interval on it (`--join-only` for that
alone, `--join-sizes` for several log sizes): its first round (catching up), and rounds each after
`--new-predictions` new rows appended as new segments: wall time and peak RSS of each round, in its own
process. Results go to docs/explanation/benchmarks.md.

    .venv/bin/python bench/log_scale.py --predictions 10000000 --feedback 1000000 [--engines duckdb,spark,arrow]
    .venv/bin/python bench/log_scale.py --predictions 200000 --feedback 20000      # a smoke run
    .venv/bin/python bench/log_scale.py --join-only --predictions 10000000 --feedback 1000000 \
        --join-sizes 100000,1000000,10000000 --max-rss-gib 18

`generate(root, predictions, feedback, replicas, seed)` writes the log (reusable: the joiner's bench).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
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
    root: Path,
    predictions: int,
    feedback: int,
    replicas: int = 4,
    seed: int = 0,
    rows_per_segment: int = 100_000,
    first: int = 0,
    first_seq: int = 1,
) -> None:
    """A log like the gateway writes, rolled: `predictions` rows of model iris (versions 1 and 2, ids
    p<n> for n from `first`, one every ms from START_US + n ms, split over `replicas`; input x: 4
    floats, outputs label and 3 probabilities, with shapes) in Parquet segments of `rows_per_segment`
    rows, and `feedback` rows for them (labels; about 5% corrections and 2% duplicates from another
    replica) in the feedback segments. Segment numbers start at `first_seq`: with `first` past the
    log's last prediction and `first_seq` past its last segment, it appends new rolled segments to a
    generated log (see next_seq)."""
    rng = np.random.default_rng(seed)
    names = [f"replica-{k}" for k in range(replicas)]
    per_replica = np.array_split(np.arange(first, first + predictions, dtype=np.int64), replicas)
    for replica, ids in zip(names, per_replica, strict=True):
        directory = root / replica / MODEL
        directory.mkdir(parents=True, exist_ok=True)
        for seq, start in enumerate(range(0, len(ids), rows_per_segment), first_seq):
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
    labelled = first + rng.choice(predictions, size=min(n_first, predictions), replace=False)
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
    prefix = "" if first_seq == 1 else f"s{first_seq}-"  # feedback ids unique across appended batches
    for k, replica in enumerate(names):
        rows = order[home[order] == k]
        n = len(rows)
        table = pa.table(
            {
                "prediction_id": pa.array(np.char.add("p", pids[rows].astype(str))),
                "feedback_id": pa.array(np.char.add(prefix + f"f{k}-", np.arange(n).astype(str))),
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
        for seq, start in enumerate(range(0, max(n, 1), rows_per_segment), first_seq):
            pq.write_table(table.slice(start, rows_per_segment), root / replica / f"feedback-{seq:08d}.parquet")


def next_seq(root: Path) -> int:
    """A segment number past every segment of the log (for generate(..., first_seq=))."""
    return 1 + max((int(p.stem.rsplit("-", 1)[1]) for p in root.rglob("*.parquet")), default=0)


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
        sys.executable, "-m", "onnxgate", "dataset", "export", "--predlog-dir", str(root), "--model", MODEL,
        "--out", str(out), "--engine", engine, "--memory-limit", memory_limit,
    ]  # fmt: skip


# -- the live joiner's interval ----------------------------------------------------------------------------
def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def join_child(log_dir: Path, window_s: float, max_predictions: int) -> int:
    """In its own process: the live joiner's first round on the log (catching up), then one round per
    `round` line on stdin (the parent appends rows in between). Prints a JSON line per round: its wall
    time, the resident memory before it and the peak during it (VmHWM, reset before each round through
    /proc/self/clear_refs), the rows and segments it read, and what the joiner holds after it."""
    from onnxgate.server.join import Joiner

    def round_(name: str) -> None:
        gc.collect()
        with open("/proc/self/clear_refs", "w") as f:  # the peak (VmHWM) restarts from the current RSS
            f.write("5")
        before, rows, segments = _status_kb("VmRSS"), joiner.rows_read, joiner.segments_read
        t0 = time.perf_counter()
        snap = joiner.run_once()
        seconds = time.perf_counter() - t0
        result = {
            "round": name,
            "seconds": seconds,
            "rss_before_mb": before / 1024,
            "peak_rss_mb": _status_kb("VmHWM") / 1024,
            "rss_after_mb": _status_kb("VmRSS") / 1024,
            "rows_read": joiner.rows_read - rows,
            "segments_read": joiner.segments_read - segments,
            "window": snap.predictions,
            "joined": snap.joined,
            "pending": snap.pending_count + snap.unknown_count,
        }
        print(json.dumps(result), flush=True)

    joiner = Joiner(log_dir, interval_s=3600, unknown_after_s=600, window_s=window_s, max_predictions=max_predictions)
    round_("catch-up")
    for line in sys.stdin:
        if line.strip() != "round":
            break
        round_("new")
    return 0


@dataclass
class JoinRun:
    predictions: int
    feedback: int
    catch_up: dict
    rounds: list[dict]
    outcome: str


def measure_join(
    log_dir: Path, predictions: int, feedback: int, args: argparse.Namespace, replicas: int, seed: int
) -> JoinRun:
    """The joiner in its own process on a generated log of `predictions` rows: its first round, then
    `args.join_rounds` rounds each after `args.new_predictions` new predictions (and a tenth as much
    feedback) appended as new rolled segments in the same layout. Killed past the timeout or the RSS
    limit (the process's RSS, sampled every 0.2 s)."""
    # generate() stamps predictions from START_US (2026-01-01), one per ms: the log is older than the
    # wall clock, and the joiner measures its window from the wall clock until it has seen a prediction
    # and ages pending feedback by the wall clock; so the window covers from START_US to now (+1 day):
    # the catch-up reads every segment and only `max_predictions` bounds what the joiner keeps
    window_s = time.time() - START_US / 1e6 + 86400
    command = [
        sys.executable, __file__, "--join-child", str(log_dir), "--window-s", str(window_s),
        "--max-predictions", str(args.max_predictions),
    ]  # fmt: skip
    proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, start_new_session=True)
    assert proc.stdin is not None and proc.stdout is not None
    state = {"peak": 0, "outcome": ""}
    limit, deadline = int(args.max_rss_gib * 2**30), time.monotonic() + args.timeout_s

    def watch() -> None:
        while proc.poll() is None:
            state["peak"] = max(state["peak"], _tree_rss(proc.pid))
            if state["peak"] > limit or time.monotonic() > deadline:
                state["outcome"] = (
                    f"killed at {state['peak'] / 2**30:.1f} GiB RSS"
                    if state["peak"] > limit
                    else f"timeout after {args.timeout_s:.0f} s"
                )
                os.killpg(proc.pid, signal.SIGKILL)
            time.sleep(0.2)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    results: list[dict] = []
    total = predictions
    try:
        line = proc.stdout.readline()
        if line:
            results.append(json.loads(line))
            print(json.dumps({"predictions": predictions, **results[-1]}), flush=True)
        for k in range(args.join_rounds if line else 0):
            generate(
                log_dir, args.new_predictions, args.new_predictions // 10, replicas, seed + 1 + k,
                first=total, first_seq=next_seq(log_dir),
            )  # fmt: skip
            total += args.new_predictions
            proc.stdin.write("round\n")
            proc.stdin.flush()
            line = proc.stdout.readline()
            if not line:
                break
            results.append(json.loads(line))
            print(json.dumps({"predictions": predictions, **results[-1]}), flush=True)
        proc.stdin.close()
        proc.wait(60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        watcher.join()
    outcome = state["outcome"] or ("ok" if proc.returncode == 0 else f"failed (rc {proc.returncode})")
    return JoinRun(predictions, feedback, results[0] if results else {}, results[1:], outcome)


def join_table(runs: list[JoinRun], new: int) -> str:
    lines = [
        "| log | first round (catch-up) | its peak RSS | joiner holds after it | "
        f"round after {new:,} new predictions (median, range) | its peak RSS (RSS before) | read by it | outcome |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        c = r.catch_up
        first = f"{c['seconds']:.1f} s" if c else "-"
        first_peak = f"{c['peak_rss_mb']:.0f} MiB" if c else "-"
        held = f"{c['window']:,} predictions, {c['rss_after_mb']:.0f} MiB RSS" if c else "-"
        if r.rounds:
            ms = sorted(x["seconds"] * 1000 for x in r.rounds)
            mid = ms[len(ms) // 2]
            new_round = f"{mid:.0f} ms ({ms[0]:.0f}-{ms[-1]:.0f}, {len(ms)} rounds)"
            peak = max(x["peak_rss_mb"] for x in r.rounds)
            before = max(x["rss_before_mb"] for x in r.rounds)
            new_peak = f"{peak:.0f} MiB ({before:.0f})"
            read = f"{r.rounds[-1]['rows_read']:,} rows, {r.rounds[-1]['segments_read']} segments"
        else:
            new_round = new_peak = read = "-"
        lines.append(
            f"| {r.predictions:,} predictions, {r.feedback:,} feedback | {first} | {first_peak} | {held} | "
            f"{new_round} | {new_peak} | {read} | {r.outcome} |"
        )
    return "\n".join(lines)


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
    join = parser.add_argument_group("the live joiner's interval")
    join.add_argument("--join-only", action="store_true", help="measure the joiner only, no exports")
    join.add_argument("--no-join", action="store_true", help="measure the exports only")
    join.add_argument(
        "--join-sizes", help="log sizes (predictions, comma-separated) for the joiner; feedback in the same "
        "proportion as --feedback/--predictions (default: --predictions, on the export's log)"
    )  # fmt: skip
    join.add_argument("--new-predictions", type=int, default=10_000, help="appended before each measured round")
    join.add_argument("--join-rounds", type=int, default=3, help="measured rounds after the catch-up")
    join.add_argument("--max-predictions", type=int, default=500_000, help="the joiner's cap")
    parser.add_argument("--join-child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--window-s", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.join_child:
        return join_child(args.join_child, args.window_s, args.max_predictions)
    work = Path(tempfile.mkdtemp(prefix="onnxgate-log-scale-", dir=args.dir))
    try:
        if not args.join_only:
            exports(work, args)
        if not args.no_join:
            sizes = [int(n) for n in args.join_sizes.split(",")] if args.join_sizes else [args.predictions]
            join_runs = []
            for n in sizes:
                log_dir = work / f"log-{n}"
                n_feedback = round(n * args.feedback / args.predictions)
                if n == args.predictions and (work / "log").exists():
                    (work / "log").rename(log_dir)  # the exports' log (they are done with it)
                else:
                    _generate(log_dir, n, n_feedback, args)
                join_runs.append(measure_join(log_dir, n, n_feedback, args, args.replicas, args.seed))
                shutil.rmtree(log_dir, ignore_errors=True)
            print()
            print(join_table(join_runs, args.new_predictions))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def _generate(root: Path, predictions: int, feedback: int, args: argparse.Namespace) -> None:
    t0 = time.monotonic()
    generate(root, predictions, feedback, args.replicas, args.seed)
    size = sum(p.stat().st_size for p in root.rglob("*.parquet"))
    print(f"generated {predictions} predictions, {feedback} feedback rows, {size / 2**20:.0f} MiB of "
          f"Parquet in {time.monotonic() - t0:.1f} s", flush=True)  # fmt: skip


def exports(work: Path, args: argparse.Namespace) -> None:
    """One full `dataset export` per engine on a generated log (work/log), each in its own process."""
    _generate(work / "log", args.predictions, args.feedback, args)
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


if __name__ == "__main__":
    sys.exit(main())

"""The cost of shadowing for the champion's latency: p50/p99 with a shadow version on vs off, one run.

Two gateways serve the same repository layout (two versions of one random forest, the prediction log on),
one with the model's default routing (latest: version 2 answers), one with version 1 shadowing every
request (`--shadow-config`: the model-level config.pbtxt lines that turn shadowing on; the default is
server/routing.py's syntax). The same closed-loop client (../shared/bench/loadgen.py) drives both,
interleaved (off on off on ...), at each concurrency; medians of the rounds and the on/off ratios are
printed as one JSON object.

    python bench/shadow_cost.py [--reps 3] [--duration 5] [--concurrency 1 8] [--shadow-config TEXT]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
from serving_overhead import LOADGEN_CANDIDATES, load, start  # bench/ is the script's directory

FEATURES = 20
MODEL = "rf"  # serving_overhead.load drives the model "rf"
SERVED_BOTH = "version_policy: { all: {} }\n"
SHADOW_CONFIG = (
    'parameters { key: "routing" value { string_value: "shadow" } }\n'
    'parameters { key: "routing.shadow" value { string_value: "1" } }\n'
)


def build_repository(root: Path, extra_config: str) -> None:
    """rf/1 and rf/2: random forests of the same size (the shadow costs what the champion costs)."""
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType
    from sklearn.ensemble import RandomForestClassifier

    rng = np.random.default_rng(0)
    x = rng.standard_normal((500, FEATURES)).astype(np.float32)
    y = (x[:, 0] + x[:, 1] > 0).astype(int)
    for version, seed in ((1, 1), (2, 2)):
        clf = RandomForestClassifier(n_estimators=10, max_depth=6, random_state=seed).fit(x, y)
        model = convert_sklearn(
            clf, initial_types=[("input", FloatTensorType([None, FEATURES]))], options={id(clf): {"zipmap": False}}
        )
        (root / MODEL / str(version)).mkdir(parents=True)
        (root / MODEL / str(version) / "model.onnx").write_bytes(model.SerializeToString())
    (root / MODEL / "config.pbtxt").write_text(SERVED_BOTH + extra_config)


def shadow_count(log_dir: Path) -> tuple[int, int]:
    """(rows with a shadow version, rows) in the rolled prediction segments of a stopped gateway."""
    import pyarrow.parquet as pq

    shadowed = rows = 0
    for path in log_dir.rglob("predictions-*.parquet"):
        table = pq.read_table(path)
        rows += table.num_rows
        if "shadow_version" in table.column_names:
            shadowed += table.num_rows - table["shadow_version"].null_count
    return shadowed, rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--client", default="raw", choices=["raw", "triton"])
    ap.add_argument("--shadow-config", default=SHADOW_CONFIG, help="config.pbtxt lines that turn shadowing on")
    args = ap.parse_args()
    loadgen = next((p for p in LOADGEN_CANDIDATES if p.is_file()), None)
    if loadgen is None:
        sys.exit("loadgen.py not found beside the repository (../shared/bench/loadgen.py)")
    tmp = Path(tempfile.mkdtemp())
    servers = []
    try:
        urls = {}
        for side, extra in (("off", ""), ("on", args.shadow_config)):
            build_repository(tmp / side / "repo", extra)
            process, url = start(
                [sys.executable, "-m", "onnxgate", "serve", "--model-repository", str(tmp / side / "repo"),
                 "--grpc-port", "0", "--metrics-port", "-1", "--http-port", "-1", "--log-level", "warning",
                 "--predlog-dir", str(tmp / side / "log")],
                r"serving gRPC on (\S+)",
            )  # fmt: skip
            servers.append(process)
            urls[side] = url
        runs: dict[str, dict[int, list[dict[str, float]]]] = {s: {c: [] for c in args.concurrency} for s in urls}
        for _ in range(args.reps):
            for c in args.concurrency:
                for side in ("off", "on"):
                    runs[side][c].append(load(loadgen, urls[side], c, args.duration, args.client))
    finally:
        for process in servers:
            process.terminate()
            process.wait(30)
    shadowed, logged = shadow_count(tmp / "on" / "log")
    summary: dict[str, object] = {
        "reps": args.reps,
        "duration_s": args.duration,
        "client": args.client,
        "shadow_config": args.shadow_config,
        "shadow_on_logged_rows": logged,
        "shadow_on_rows_with_shadow_outputs": shadowed,  # 0 means shadowing did not run: check the config
    }
    for c in args.concurrency:
        med = {
            side: {k: statistics.median(r[k] for r in runs[side][c]) for k in ("p50_ms", "p99_ms", "rps")}
            for side in runs
        }
        summary[f"c{c}"] = {
            "off": {k: [r[k] for r in runs["off"][c]] for k in ("p50_ms", "p99_ms", "rps")},
            "on": {k: [r[k] for r in runs["on"][c]] for k in ("p50_ms", "p99_ms", "rps")},
            "median": med,
            "p50_ratio_on_off": round(med["on"]["p50_ms"] / med["off"]["p50_ms"], 3),
            "p99_ratio_on_off": round(med["on"]["p99_ms"] / med["off"]["p99_ms"], 3),
            "rps_ratio_on_off": round(med["on"]["rps"] / med["off"]["rps"], 3),
        }
    print(json.dumps(summary, indent=1))
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

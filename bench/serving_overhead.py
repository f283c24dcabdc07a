"""onnxgate against a do-nothing grpcio server, side by side, with the same client.

The product's bar: requests/s at 32 concurrent clients >= 0.8x the do-nothing server's, and a median
latency at one client within 0.2 ms of it. Runs are interleaved (A B A B ...) and repeated; medians,
spread and ratios are printed as one JSON object, absolute numbers being noisy on shared machines.

    python bench/serving_overhead.py [--reps 3] [--duration 5] [--client raw|triton] [--batching]
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
LOADGEN_CANDIDATES = [ROOT / "shared" / "bench" / "loadgen.py", ROOT.parent / "shared" / "bench" / "loadgen.py"]
FEATURES = 20


def build_repository(root: Path, batching: bool) -> None:
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType
    from sklearn.ensemble import RandomForestClassifier

    rng = np.random.default_rng(0)
    x = rng.standard_normal((500, FEATURES)).astype(np.float32)
    y = (x[:, 0] + x[:, 1] > 0).astype(int)
    clf = RandomForestClassifier(n_estimators=10, max_depth=6, random_state=0).fit(x, y)
    model = convert_sklearn(
        clf, initial_types=[("input", FloatTensorType([None, FEATURES]))], options={id(clf): {"zipmap": False}}
    )
    version = root / "rf" / "1"
    version.mkdir(parents=True)
    (version / "model.onnx").write_bytes(model.SerializeToString())
    if batching:
        (root / "rf" / "config.pbtxt").write_text(
            "max_batch_size: 64\ndynamic_batching { max_queue_delay_microseconds: 200 }\n"
        )


def start(cmd: list[str], pattern: str) -> tuple[subprocess.Popen[str], str]:
    process = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, cwd=ROOT)
    assert process.stderr is not None
    for line in process.stderr:
        match = re.search(pattern, line)
        if match:
            return process, match.group(1)
    raise RuntimeError(f"{cmd} did not start")


def load(loadgen: Path, url: str, concurrency: int, duration: float, client: str) -> dict[str, float]:
    cmd = [sys.executable, str(loadgen), "--url", url, "--model", "rf", "--concurrency", str(concurrency),
           "--duration", str(duration), "--features", str(FEATURES), "--client", client]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    result: dict[str, float] = json.loads(out.strip().splitlines()[-1])
    if result["errors"]:
        raise RuntimeError(f"errors against {url}: {result}")
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--client", default="raw", choices=["raw", "triton"])
    ap.add_argument("--batching", action="store_true", help="serve with dynamic batching (max delay 200 us)")
    args = ap.parse_args()
    loadgen = next((p for p in LOADGEN_CANDIDATES if p.is_file()), None)
    if loadgen is None:
        sys.exit("loadgen.py not found beside the repository (../shared/bench/loadgen.py)")
    tmp = Path(tempfile.mkdtemp())
    try:
        build_repository(tmp / "repo", args.batching)
        gateway, gw_url = start(
            [sys.executable, "-m", "onnxgate", "serve", "--model-repository", str(tmp / "repo"), "--grpc-port", "0",
             "--metrics-port", "-1", "--http-port", "-1", "--log-level", "warning"],
            r"serving gRPC on (\S+)",
        )  # fmt: skip
        baseline, base_url = start([sys.executable, "bench/baseline_server.py"], r"serving gRPC on (\S+)")
        results: dict[str, dict[int, list[dict[str, float]]]] = {
            "onnxgate": {1: [], 32: []},
            "baseline": {1: [], 32: []},
        }
        try:
            for _ in range(args.reps):
                for concurrency in (1, 32):
                    for name, url in (("baseline", base_url), ("onnxgate", gw_url)):
                        results[name][concurrency].append(load(loadgen, url, concurrency, args.duration, args.client))
        finally:
            gateway.terminate()
            baseline.terminate()
        summary: dict[str, object] = {
            "client": args.client,
            "batching": args.batching,
            "reps": args.reps,
            "duration_s": args.duration,
        }
        for name, by_c in results.items():
            summary[name] = {
                "rps_c32": [r["rps"] for r in by_c[32]],
                "p50_ms_c1": [r["p50_ms"] for r in by_c[1]],
                "client_cpu_c32": [r["client_cpu"] for r in by_c[32]],
            }
        med = {n: {k: statistics.median(v) for k, v in s.items()} for n, s in summary.items() if isinstance(s, dict)}
        summary["rps_ratio_c32"] = round(med["onnxgate"]["rps_c32"] / med["baseline"]["rps_c32"], 3)
        summary["p50_delta_ms_c1"] = round(med["onnxgate"]["p50_ms_c1"] - med["baseline"]["p50_ms_c1"], 3)
        print(json.dumps(summary, indent=1))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

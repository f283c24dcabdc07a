"""Dynamic batching with a latency objective (AIMD batch limit) against fixed batching and none.

One model (an MLP, 20 FP32 features, two hidden layers of 256, skl2onnx), one-row requests from many
closed-loop clients, three `onnxgate serve` processes loaded in turn, interleaved, `reps` rounds:

  none       no dynamic batching (each request its own run, inline or on a thread)
  fixed      max_batch_size 64, dynamic_batching { max_queue_delay_microseconds: DELAY }
  objective  the same plus parameters { latency_objective_p99_ms: OBJECTIVE }

Prints requests/s, p50 and p99 per server (medians over rounds) and the objective server's batch limit
(onnxgate_batch_limit_rows) after the last round.

    python bench/latency_objective.py [--reps 3] [--duration 4] [--clients 32] [--delay-us 2000] [--objective-ms 3]
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import sys
import tempfile
import urllib.request
from pathlib import Path

import numpy as np
from serving_overhead import LOADGEN_CANDIDATES, start  # bench/ is the script's directory

FEATURES = 20


def build(root: Path, delay_us: int, objective_ms: float) -> None:
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType
    from sklearn.neural_network import MLPClassifier

    rng = np.random.default_rng(0)
    x = rng.standard_normal((2000, FEATURES)).astype(np.float32)
    y = (x[:, 0] + x[:, 1] * x[:, 2] > 0).astype(int)
    clf = MLPClassifier(hidden_layer_sizes=(256, 256), max_iter=50, random_state=0).fit(x, y)
    onnx = convert_sklearn(
        clf, initial_types=[("input", FloatTensorType([None, FEATURES]))], options={id(clf): {"zipmap": False}}
    ).SerializeToString()
    batching = f"max_batch_size: 64\ndynamic_batching {{ max_queue_delay_microseconds: {delay_us} }}\n"
    objective = f'parameters {{ key: "latency_objective_p99_ms" value {{ string_value: "{objective_ms}" }} }}\n'
    for name, config in (("none", None), ("fixed", batching), ("objective", batching + objective)):
        version = root / name / "mlp" / "1"
        version.mkdir(parents=True)
        (version / "model.onnx").write_bytes(onnx)
        if config is not None:
            (root / name / "mlp" / "config.pbtxt").write_text(config)


def load(loadgen: Path, url: str, clients: int, duration: float) -> dict[str, float]:
    import subprocess

    cmd = [sys.executable, str(loadgen), "--url", url, "--model", "mlp", "--concurrency", str(clients),
           "--duration", str(duration), "--features", str(FEATURES), "--client", "raw"]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    result: dict[str, float] = json.loads(out.strip().splitlines()[-1])
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--duration", type=float, default=4.0)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--delay-us", type=int, default=2000)
    ap.add_argument("--objective-ms", type=float, default=3.0)
    args = ap.parse_args()
    loadgen = next((p for p in LOADGEN_CANDIDATES if p.is_file()), None)
    if loadgen is None:
        sys.exit("loadgen.py not found beside the repository (../shared/bench/loadgen.py)")
    tmp = Path(tempfile.mkdtemp())
    processes = []
    try:
        build(tmp, args.delay_us, args.objective_ms)
        servers = {}
        for name in ("none", "fixed", "objective"):
            cmd = [sys.executable, "-m", "onnxgate", "serve", "--model-repository", str(tmp / name),
                   "--grpc-port", "0", "--metrics-port", "0", "--http-port", "-1", "--log-level", "warning"]  # fmt: skip
            process, url = start(cmd, r"serving gRPC on (\S+ metrics on \d+)")
            processes.append(process)
            grpc_url, metrics_port = url.split(" metrics on ")
            servers[name] = (grpc_url, int(metrics_port))
        rounds: dict[str, list[dict[str, float]]] = {n: [] for n in servers}
        for _ in range(args.reps):
            for name, (url, _) in servers.items():
                rounds[name].append(load(loadgen, url, args.clients, args.duration))
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{servers['objective'][1]}/metrics", timeout=10)
        match = re.search(r'onnxgate_batch_limit_rows\{model="mlp",version="1"\} (\S+)', metrics.read().decode())
        summary = {
            name: {k: statistics.median(r[k] for r in rs) for k in ("rps", "p50_ms", "p99_ms")}
            for name, rs in rounds.items()
        }
        print(json.dumps({"args": vars(args), "median": summary, "rounds": rounds,
                          "objective_batch_limit_rows": float(match.group(1)) if match else None}, indent=1))  # fmt: skip
        print(f"\n| server ({args.clients} clients, 1 row) | requests/s | p50 ms | p99 ms |\n|---|---|---|---|")
        for name, m in summary.items():
            print(f"| {name} | {m['rps']:.0f} | {m['p50_ms']:.2f} | {m['p99_ms']:.2f} |")
    finally:
        for process in processes:
            process.terminate()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

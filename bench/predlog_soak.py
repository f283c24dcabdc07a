"""Soak: the serving process's memory under sustained logged traffic, with feedback and the live join on.

    python bench/predlog_soak.py --predictions 1000000 [--concurrency 16] [--feedback-every 10] [--out DIR]

Starts `onnxgate serve` on a small classifier with the prediction log on (join every 5 s, segments
rolled every 60 s), drives it closed-loop with a grpc.aio client (one request in flight per coroutine)
until N predictions were answered, sends ground truth for every k-th one, and samples the server's
resident memory (VmRSS of its process) every 10 s. Prints a row per minute and a summary (first minute
vs last minute), and writes soak.json and soak.png (RSS and requests over time) to --out.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from onnxgate.server.pb import feedback_pb2 as fpb
from onnxgate.server.pb import feedback_pb2_grpc as fpb_grpc
from onnxgate.server.pb import grpc_service_pb2 as pb
from onnxgate.server.pb import grpc_service_pb2_grpc as pb_grpc
from tests.predlog.e2e_helpers import argmax_repository


def rss_mb(pid: int) -> float:
    text = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"VmRSS:\s+(\d+) kB", text)
    return int(match.group(1)) / 1024 if match else float("nan")


def start_server(repo: Path, log_dir: Path, extra: list[str]) -> tuple[subprocess.Popen[str], str]:
    cmd = [
        sys.executable, "-m", "onnxgate", "serve", "--model-repository", str(repo), "--grpc-port", "0",
        "--metrics-port", "-1", "--http-port", "-1", "--predlog-dir", str(log_dir), "--predlog-replica-id", "soak",
        "--predlog-join-interval-s", "5", "--predlog-segment-max-age-s", "60", *extra,
    ]  # fmt: skip
    process = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    assert process.stderr is not None
    for line in process.stderr:
        match = re.search(r"serving gRPC on (\S+)", line)
        if match:
            threading.Thread(target=lambda: [None for _ in process.stderr or []], daemon=True).start()
            return process, match.group(1)
    raise RuntimeError(f"server exited with {process.wait()}")


async def drive(address: str, total: int, concurrency: int, feedback_every: int, done: list[int]) -> None:
    channel = grpc.aio.insecure_channel(address)
    infer = pb_grpc.GRPCInferenceServiceStub(channel)
    feedback = fpb_grpc.FeedbackStub(channel)
    x = np.array([[0.1, 3.0, 0.2, -1.0]], np.float32)
    request = pb.ModelInferRequest(
        model_name="argmax",
        inputs=[pb.ModelInferRequest.InferInputTensor(name="x", datatype="FP32", shape=[1, 4])],
        raw_input_contents=[x.tobytes()],
    )

    async def worker() -> None:
        while done[0] < total:
            response = await infer.ModelInfer(request, timeout=30)
            done[0] += 1
            if done[0] % feedback_every == 0:  # ground truth for every k-th prediction, half of it wrong
                label = "1" if done[0] % (2 * feedback_every) else "2"
                await feedback.SendFeedback(fpb.FeedbackRequest(prediction_id=response.id, label=label), timeout=30)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    await channel.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--predictions", type=int, default=1_000_000)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--feedback-every", type=int, default=10)
    ap.add_argument("--sample-s", type=float, default=10.0)
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    ap.add_argument(
        "--server-args", default="", help="more `onnxgate serve` flags, e.g. '--predlog-join-max-predictions 50000'"
    )
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        repo = argmax_repository(Path(tmp) / "repo")
        process, address = start_server(repo, Path(tmp) / "log", a.server_args.split())
        done = [0]
        samples: list[tuple[float, int, float]] = []
        started = time.monotonic()
        runner = threading.Thread(
            target=lambda: asyncio.run(drive(address, a.predictions, a.concurrency, a.feedback_every, done))
        )
        runner.start()
        while runner.is_alive():
            samples.append((time.monotonic() - started, done[0], rss_mb(process.pid)))
            runner.join(a.sample_s)
        samples.append((time.monotonic() - started, done[0], rss_mb(process.pid)))
        process.terminate()
        process.wait(60)
    print(f"{'minute':>6} {'predictions':>12} {'rss MB':>8}")
    shown = -1
    for t, n, rss in samples:
        if int(t // 60) != shown:
            shown = int(t // 60)
            print(f"{shown:>6} {n:>12} {rss:>8.1f}")
    first = [s[2] for s in samples if s[0] >= 60 and s[0] < 120] or [samples[0][2]]
    last = [s[2] for s in samples if s[0] >= samples[-1][0] - 60]
    summary = {
        "command": " ".join(sys.argv),
        "predictions": done[0],
        "seconds": round(samples[-1][0], 1),
        "rps": round(done[0] / samples[-1][0], 1),
        "rss_mb_minute_2": round(float(np.median(first)), 1),
        "rss_mb_last_minute": round(float(np.median(last)), 1),
        "rss_mb_max": round(max(s[2] for s in samples), 1),
        "samples": samples,
    }
    (a.out / "soak.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps({k: v for k, v in summary.items() if k != "samples"}))
    _plot(samples, a.out / "soak.png")


def _plot(samples: list[tuple[float, int, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [s[0] / 60 for s in samples]
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.plot(t, [s[2] for s in samples], color="tab:blue", label="server RSS (MB)")
    ax.set_xlabel("minutes")
    ax.set_ylabel("resident memory (MB)")
    ax.set_ylim(bottom=0)
    right = ax.twinx()
    right.plot(t, [s[1] / 1e6 for s in samples], color="tab:gray", linestyle="--", label="predictions (M)")
    right.set_ylabel("predictions answered (millions)")
    ax.set_title("onnxgate with the prediction log on: memory under sustained traffic")
    fig.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()

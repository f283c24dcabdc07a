"""Past capacity: a gateway offered more requests than it can run, with and without a per-model queue limit.

Two `onnxgate serve` processes of the working tree serve the same slow model (tests/models.py's
chained_matmul, one inference thread): **limited**, whose config.pbtxt sets `max_queued_requests`, and
**unlimited**, where it is 0 (no per-model limit; the global --max-inflight 1024 is far away). First a
short closed loop measures the capacity (requests/s); then an open loop offers `--overload` times that
rate for `--duration` seconds to each server in turn (limited, unlimited, per round): requests are sent
on a fixed schedule whatever the answers, as independent clients would, and each latency is counted
from its scheduled send time (no coordinated omission). A refused request is not retried.

Printed as one JSON object per server and round: offered rps, accepted rps (OK answers over the time
from the first send to the last answer), refused rps (RESOURCE_EXHAUSTED), p50/p99 of the accepted,
p99 of the refusals, other status codes.

    python bench/overload.py [--rounds 1] [--duration 6] [--overload 2] [--limit 8]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from onnxgate.server.pb import grpc_service_pb2 as pb  # noqa: E402
from onnxgate.server.pb import grpc_service_pb2_grpc as pb_grpc  # noqa: E402
from tests.models import chained_matmul, write_version  # noqa: E402

SIZE = 256


def build(repo: Path, steps: int, limit: int) -> None:
    config = f'parameters {{ key: "max_queued_requests" value {{ string_value: "{limit}" }} }}\n'
    write_version(repo, "slow", 1, chained_matmul(SIZE, steps), None)
    (repo / "slow" / "config.pbtxt").write_text(config)


def serve(repo: Path) -> tuple[subprocess.Popen[str], str]:
    cmd = [sys.executable, "-m", "onnxgate", "serve", "--model-repository", str(repo), "--grpc-port", "0",
           "--metrics-port", "-1", "--http-port", "-1", "--inference-threads", "1", "--log-level", "warning"]  # fmt: skip
    process = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, cwd=ROOT)
    assert process.stderr is not None
    for line in process.stderr:
        if line.startswith("onnxgate: serving gRPC on "):
            threading.Thread(target=lambda: [None for _ in process.stderr or []], daemon=True).start()
            return process, line.split()[4]
    raise RuntimeError(f"{cmd} did not start")


def request() -> pb.ModelInferRequest:
    r = pb.ModelInferRequest(model_name="slow")
    r.inputs.add(name="x", datatype="FP32", shape=[SIZE, SIZE])
    r.raw_input_contents.append(np.ones((SIZE, SIZE), np.float32).tobytes())
    return r


async def capacity(address: str, seconds: float, clients: int = 4) -> float:
    """Requests/s of a closed loop that keeps the model busy (a few clients, nothing refused)."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        req = request()
        await stub.ModelInfer(req)
        done = 0
        end = time.monotonic() + seconds

        async def client() -> None:
            nonlocal done
            while time.monotonic() < end:
                await stub.ModelInfer(req)
                done += 1

        t0 = time.monotonic()
        await asyncio.gather(*(client() for _ in range(clients)))
        return done / (time.monotonic() - t0)


def pct(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)) * 1000, 1) if values else None


async def open_loop(address: str, rate: float, seconds: float) -> dict[str, object]:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        req = request()
        await stub.ModelInfer(req)
        results: list[tuple[str, float]] = []
        last_answer = 0.0

        async def one(scheduled: float) -> None:
            nonlocal last_answer
            try:
                await stub.ModelInfer(req, timeout=120)
                code = "OK"
            except grpc.aio.AioRpcError as e:
                code = e.code().name
            last_answer = time.monotonic()
            results.append((code, last_answer - scheduled))

        tasks = []
        n = int(rate * seconds)
        t0 = time.monotonic()
        for i in range(n):
            scheduled = t0 + i / rate
            delay = scheduled - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(scheduled)))
        await asyncio.gather(*tasks)
    wall = last_answer - t0
    ok = [t for c, t in results if c == "OK"]
    refused = [t for c, t in results if c == "RESOURCE_EXHAUSTED"]
    other: dict[str, int] = {}
    for c, _ in results:
        if c not in ("OK", "RESOURCE_EXHAUSTED"):
            other[c] = other.get(c, 0) + 1
    return {
        "offered_rps": round(n / seconds, 1),
        "accepted_rps": round(len(ok) / wall, 1),
        "refused_rps": round(len(refused) / wall, 1),
        "accepted": len(ok),
        "refused": len(refused),
        "other": other,
        "accepted_p50_ms": pct(ok, 50),
        "accepted_p99_ms": pct(ok, 99),
        "refused_p99_ms": pct(refused, 99),
        "last_answer_s": round(wall, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--duration", type=float, default=6.0, help="seconds of offered load per server and round")
    parser.add_argument("--overload", type=float, default=2.0, help="offered rate / measured capacity")
    parser.add_argument("--limit", type=int, default=8, help="max_queued_requests of the limited server")
    parser.add_argument("--steps", type=int, default=40, help="chained_matmul steps (a run's cost)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        servers = {}
        for name, limit in (("limited", args.limit), ("unlimited", 0)):
            build(Path(tmp) / name, args.steps, limit)
            servers[name] = serve(Path(tmp) / name)
        try:
            cap = asyncio.run(capacity(servers["limited"][1], 3.0))
            rate = cap * args.overload
            report: dict[str, object] = {
                "cpus": os.cpu_count(),
                "capacity_rps": round(cap, 1),
                "offered_rps": round(rate, 1),
                "limit": args.limit,
                "rounds": [],
            }
            for r in range(args.rounds):
                for name in servers:
                    result = asyncio.run(open_loop(servers[name][1], rate, args.duration))
                    print(json.dumps({"round": r, "server": name, **result}), file=sys.stderr)
                    report["rounds"].append({"round": r, "server": name, **result})  # type: ignore[attr-defined]
                    time.sleep(1.0)
            print(json.dumps(report, indent=1))
        finally:
            for process, _ in servers.values():
                process.terminate()
                process.wait(30)


if __name__ == "__main__":
    main()

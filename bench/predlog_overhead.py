"""Throughput of ModelInfer with the prediction log on vs off, and the cost of durable feedback.

    .venv/bin/python bench/predlog_overhead.py [--seconds 6] [--rounds 5] [--clients 4] [--concurrency 16]

Each round starts `onnxgate serve` twice (log off, log on: flush every 1000 records / 200 ms, fsync),
drives it from `--clients` client processes with `--concurrency` concurrent grpc.aio ModelInfer calls
each, for `--seconds`, with a tiny model (argmax over 4 floats: the gateway's own overhead dominates,
so this is the worst case for the log's share). It reports requests/s and the server process's CPU
time per request (user + system, all threads, from /proc): CPU per request is the steadier measure
of what the log costs when clients and server share a machine. Off and on alternate so drift hits
both; the summary gives medians of the per-round on/off ratios. Then SendFeedback is measured on a
logging server at concurrency 1 and 32 (every ack waits for an fsync, shared by the concurrent ones:
group commit).
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np
import onnx
from onnx import TensorProto, helper

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from onnxgate.server.pb import feedback_pb2 as fpb  # noqa: E402
from onnxgate.server.pb import feedback_pb2_grpc as fpb_grpc  # noqa: E402
from onnxgate.server.pb import grpc_service_pb2 as pb  # noqa: E402
from onnxgate.server.pb import grpc_service_pb2_grpc as pb_grpc  # noqa: E402

READY = re.compile(r"serving gRPC on (\S+)")


def build_repository(root: Path) -> Path:
    nodes = [helper.make_node("ArgMax", ["x"], ["label"], axis=1, keepdims=0)]
    graph = helper.make_graph(
        nodes,
        "argmax",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("label", TensorProto.INT64, ["N"])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    (root / "argmax" / "1").mkdir(parents=True)
    onnx.save(model, root / "argmax" / "1" / "model.onnx")
    return root


def serve(
    repo: Path, log_dir: Path | None, cpus: str = "", extra: tuple[str, ...] = ()
) -> tuple[subprocess.Popen[str], str]:
    pin = ["taskset", "-c", cpus] if cpus else []
    cmd = [
        *pin,
        sys.executable,
        "-m",
        "onnxgate",
        "serve",
        "--model-repository",
        str(repo),
        "--grpc-port",
        "0",
        "--metrics-port",
        "-1",
        "--http-port",
        "-1",
        "--log-level",
        "warning",
    ]
    if log_dir is not None:
        cmd += ["--predlog-dir", str(log_dir), "--predlog-replica-id", "bench"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    assert proc.stderr is not None
    for line in proc.stderr:
        if m := READY.search(line):
            return proc, m.group(1)
    raise RuntimeError(f"server exited with {proc.wait()}")


def request(i: int) -> pb.ModelInferRequest:
    x = np.random.default_rng(i).standard_normal((1, 4)).astype("<f4")
    tensor = pb.ModelInferRequest.InferInputTensor(name="x", datatype="FP32", shape=[1, 4])
    return pb.ModelInferRequest(model_name="argmax", id=f"r{i}", inputs=[tensor], raw_input_contents=[x.tobytes()])


async def infer_load(address: str, seconds: float, concurrency: int) -> float:
    requests = [request(i) for i in range(256)]
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        for r in requests[:20]:  # warm up
            await stub.ModelInfer(r)
        done = 0
        deadline = time.perf_counter() + seconds

        async def worker(w: int) -> None:
            nonlocal done
            i = w
            while time.perf_counter() < deadline:
                await stub.ModelInfer(requests[i % len(requests)])
                done += 1
                i += concurrency

        started = time.perf_counter()
        await asyncio.gather(*(worker(w) for w in range(concurrency)))
        return done / (time.perf_counter() - started)


async def feedback_load(address: str, seconds: float, concurrency: int) -> tuple[float, float, float]:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = fpb_grpc.FeedbackStub(channel)
        latencies: list[float] = []
        deadline = time.perf_counter() + seconds

        async def worker(w: int) -> None:
            i = 0
            while time.perf_counter() < deadline:
                t0 = time.perf_counter()
                await stub.SendFeedback(fpb.FeedbackRequest(prediction_id=f"c{concurrency}-w{w}-{i}", label="1"))
                latencies.append(time.perf_counter() - t0)
                i += 1

        started = time.perf_counter()
        await asyncio.gather(*(worker(w) for w in range(concurrency)))
        rate = len(latencies) / (time.perf_counter() - started)
        q = statistics.quantiles(latencies, n=100)
        return rate, q[49] * 1000, q[98] * 1000


def _client(
    address: str, seconds: float, concurrency: int, cpus: frozenset[int], out: multiprocessing.Queue[float]
) -> None:
    if cpus:
        os.sched_setaffinity(0, cpus)
    out.put(asyncio.run(infer_load(address, seconds, concurrency)))


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime, all threads


def measure(
    address: str, pid: int, seconds: float, clients: int, concurrency: int, cpus: frozenset[int] = frozenset()
) -> tuple[float, float]:
    """(requests/s over all clients, server CPU microseconds per request)."""
    ctx = multiprocessing.get_context("spawn")
    out: multiprocessing.Queue[float] = ctx.Queue()
    procs = [ctx.Process(target=_client, args=(address, seconds, concurrency, cpus, out)) for _ in range(clients)]
    for p in procs:
        p.start()
    time.sleep(1.5)  # clients start and warm up; count CPU over the steady middle only
    cpu0, t0 = cpu_seconds(pid), time.perf_counter()
    time.sleep(seconds - 2.5)
    cpu1, t1 = cpu_seconds(pid), time.perf_counter()
    rate = sum(out.get() for _ in procs)
    for p in procs:
        p.join()
    return rate, (cpu1 - cpu0) / ((t1 - t0) * rate) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=6.0)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument(
        "--server-cpus",
        type=int,
        default=0,
        help="pin the server to CPUs 0..N-1 and the clients to the rest (0: no pinning)",
    )
    args = ap.parse_args()
    n_cpus = os.cpu_count() or 1
    server_cpus = f"0-{args.server_cpus - 1}" if args.server_cpus else ""
    client_cpus = frozenset(range(args.server_cpus, n_cpus)) if args.server_cpus else frozenset()
    with tempfile.TemporaryDirectory() as tmp:
        repo = build_repository(Path(tmp) / "repo")
        results: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
        for r in range(args.rounds):
            for logging_on in (False, True) if r % 2 == 0 else (True, False):
                proc, address = serve(repo, Path(tmp) / f"log{r}" if logging_on else None, server_cpus)
                try:
                    rate, cpu_us = measure(address, proc.pid, args.seconds, args.clients, args.concurrency, client_cpus)
                finally:
                    proc.terminate()
                    proc.wait(30)
                results[logging_on].append((rate, cpu_us))
                print(
                    f"round {r + 1} log {'on ' if logging_on else 'off'}: {rate:8.0f} req/s, "
                    f"server CPU {cpu_us:6.1f} us/request",
                    flush=True,
                )
        off, on = results[False], results[True]
        rate_ratios = [b[0] / a[0] for a, b in zip(off, on, strict=True)]
        cpu_ratios = [b[1] / a[1] for a, b in zip(off, on, strict=True)]
        print(
            f"median throughput: off {statistics.median(x[0] for x in off):.0f} req/s, "
            f"on {statistics.median(x[0] for x in on):.0f} req/s; on/off per round "
            f"{', '.join(f'{x:.3f}' for x in rate_ratios)}; median {statistics.median(rate_ratios):.3f}"
        )
        print(
            f"median server CPU per request: off {statistics.median(x[1] for x in off):.1f} us, "
            f"on {statistics.median(x[1] for x in on):.1f} us; on/off per round "
            f"{', '.join(f'{x:.3f}' for x in cpu_ratios)}; median {statistics.median(cpu_ratios):.3f}"
        )
        proc, address = serve(repo, Path(tmp) / "logfb", server_cpus)
        try:
            for c in (1, 32):
                rate, p50, p99 = asyncio.run(feedback_load(address, args.seconds / 2, c))
                print(
                    f"SendFeedback (durable ack) concurrency {c:3d}: {rate:7.0f} acks/s, "
                    f"p50 {p50:.2f} ms, p99 {p99:.2f} ms"
                )
        finally:
            proc.terminate()
            proc.wait(30)


if __name__ == "__main__":
    main()

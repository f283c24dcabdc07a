"""One onnxgate process, three ways in: gRPC, REST with JSON, and REST with binary tensor data.

`onnxgate serve` runs once on a repository with one model (serving_overhead.py's: a 10-tree random
forest, 20 FP32 features, one row per request) with both edges on. The same closed-loop client design
as ../shared/bench/loadgen.py drives each protocol in its own process: `concurrency` coroutines on one
asyncio loop, each keeping one request in flight, a pre-built request reused, every answer read and
decoded (protobuf by grpc.aio; json.loads of the body or of the binary answer's JSON header), 1 s of
warm-up, then `duration` seconds measured. The clients:

    grpc    grpc.aio stub, one pre-built ModelInferRequest (raw_input_contents), as loadgen --client raw
    json    aiohttp ClientSession, one pre-built JSON body ("data": [20 numbers]), JSON answer
    binary  aiohttp ClientSession, one pre-built body: JSON header + 80 bytes (Inference-Header-Content-
            Length), every output asked for as binary data ("binary_data_output": true)

Runs are interleaved (grpc json binary, grpc json binary, ...) per concurrency and repeated; medians,
spread (min-max) and the ratios REST/gRPC of the medians are printed as one JSON line.

    python bench/rest_vs_grpc.py [--reps 3] [--duration 5] [--concurrency 1 8 32]
    python bench/rest_vs_grpc.py --load grpc|json|binary --url HOST:PORT ...   # one client run (used by the above)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
from serving_overhead import FEATURES, build_repository  # bench/ is the script's directory

PROTOCOLS = ("grpc", "json", "binary")
MODEL = "rf"


def make_call(
    kind: str, url: str, concurrency: int
) -> tuple[Callable[[], Awaitable[None]], Callable[[], Awaitable[None]]]:
    """(one request, close) for a client of `kind`; the request is built once."""
    x = np.random.default_rng(0).standard_normal((1, FEATURES)).astype(np.float32)
    if kind == "grpc":
        import grpc
        from tritonclient.grpc import service_pb2 as pb
        from tritonclient.grpc import service_pb2_grpc as pbg

        channel = grpc.aio.insecure_channel(url)
        stub = pbg.GRPCInferenceServiceStub(channel)
        request = pb.ModelInferRequest(
            model_name=MODEL,
            inputs=[pb.ModelInferRequest.InferInputTensor(name="input", datatype="FP32", shape=list(x.shape))],
            raw_input_contents=[x.tobytes()],
        )

        async def grpc_call() -> None:
            await stub.ModelInfer(request)

        async def grpc_close() -> None:
            await channel.close(None)

        return grpc_call, grpc_close

    import aiohttp

    tensor: dict[str, Any] = {"name": "input", "shape": list(x.shape), "datatype": "FP32"}
    headers = {"Content-Type": "application/json"}
    if kind == "json":
        body = json.dumps({"inputs": [{**tensor, "data": x.ravel().tolist()}]}).encode()
    else:
        header = json.dumps(
            {
                "inputs": [{**tensor, "parameters": {"binary_data_size": x.nbytes}}],
                "parameters": {"binary_data_output": True},
            }
        ).encode()
        body = header + x.tobytes()
        headers = {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(len(header))}
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency))
    endpoint = f"http://{url}/v2/models/{MODEL}/infer"

    async def rest_call() -> None:
        async with session.post(endpoint, data=body, headers=headers) as response:
            answer = await response.read()
            if response.status != 200:
                raise RuntimeError(f"HTTP {response.status}: {answer[:200]!r}")
            length = response.headers.get("Inference-Header-Content-Length")
            json.loads(answer if length is None else answer[: int(length)])

    return rest_call, session.close


async def run_load(kind: str, url: str, concurrency: int, duration: float, warmup: float) -> dict[str, Any]:
    """loadgen.py's closed loop, for any of the three clients; the same JSON line it prints."""
    call, close = make_call(kind, url, concurrency)
    latencies: list[float] = []
    errors: list[str] = []

    async def worker(end: float, record: bool) -> None:
        while time.perf_counter() < end:
            t0 = time.perf_counter()
            try:
                await call()
            except Exception as e:  # count and keep going
                if record:
                    errors.append(str(e).splitlines()[0][:300] if str(e) else type(e).__name__)
                await asyncio.sleep(0.01)
                continue
            if record:
                latencies.append(time.perf_counter() - t0)

    end = time.perf_counter() + warmup
    await asyncio.gather(*(worker(end, False) for _ in range(concurrency)))
    c0, t0 = os.times(), time.perf_counter()
    await asyncio.gather(*(worker(t0 + duration, True) for _ in range(concurrency)))
    wall, c1 = time.perf_counter() - t0, os.times()
    await close()
    ms = np.array(latencies) * 1e3 if latencies else np.array([np.nan])
    return {
        "client": kind,
        "concurrency": concurrency,
        "n": len(latencies),
        "rps": round(len(latencies) / wall, 1),
        "p50_ms": round(float(np.percentile(ms, 50)), 3),
        "p90_ms": round(float(np.percentile(ms, 90)), 3),
        "p99_ms": round(float(np.percentile(ms, 99)), 3),
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
        "client_cpu": round((c1.user + c1.system - c0.user - c0.system) / wall, 2),
    }


def load(kind: str, url: str, concurrency: int, duration: float) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--load", kind, "--url", url, "--concurrency", str(concurrency),
           "--duration", str(duration)]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    if result["errors"]:
        raise RuntimeError(f"errors with {kind} against {url}: {result}")
    return result


def start_gateway(repository: Path) -> tuple[subprocess.Popen[str], str, str]:
    """`onnxgate serve` with gRPC and HTTP on free ports: (process, gRPC address, HTTP address)."""
    process = subprocess.Popen(
        [sys.executable, "-m", "onnxgate", "serve", "--model-repository", str(repository), "--grpc-port", "0",
         "--http-port", "0", "--metrics-port", "-1", "--log-level", "warning"],
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    assert process.stderr is not None
    for line in process.stderr:
        match = re.search(r"serving gRPC on (\S+):(\d+) metrics on \S+ http on (\d+)", line)
        if match:
            host = match.group(1)
            return process, f"{host}:{match.group(2)}", f"{host}:{match.group(3)}"
    raise RuntimeError("onnxgate serve did not start")


def summarize(results: dict[str, dict[int, list[dict[str, Any]]]], reps: int, duration: float) -> dict[str, Any]:
    summary: dict[str, Any] = {"reps": reps, "duration_s": duration, "features": FEATURES, "rows": 1}
    medians: dict[str, dict[int, dict[str, float]]] = {}
    for kind, by_c in results.items():
        medians[kind] = {}
        for c, runs in by_c.items():
            rps = [r["rps"] for r in runs]
            p50 = [r["p50_ms"] for r in runs]
            medians[kind][c] = {"rps": statistics.median(rps), "p50_ms": statistics.median(p50)}
            summary[f"{kind}_c{c}"] = {
                "rps": rps,
                "p50_ms": p50,
                "p99_ms": [r["p99_ms"] for r in runs],
                "client_cpu": [r["client_cpu"] for r in runs],
                "rps_median": round(statistics.median(rps), 1),
                "rps_spread": [min(rps), max(rps)],
                "p50_ms_median": round(statistics.median(p50), 3),
                "p50_ms_spread": [min(p50), max(p50)],
            }
    for kind in ("json", "binary"):
        for c in medians[kind]:
            base = medians["grpc"][c]
            summary[f"{kind}_over_grpc_c{c}"] = {
                "rps": round(medians[kind][c]["rps"] / base["rps"], 3),
                "p50_ms": round(medians[kind][c]["p50_ms"] / base["p50_ms"], 3),
            }
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--load", choices=PROTOCOLS, help="run one client (the benchmark runs these)")
    parser.add_argument("--url", help="with --load: HOST:PORT of the gRPC or HTTP edge")
    parser.add_argument("--warmup", type=float, default=1.0)
    a = parser.parse_args()
    if a.load:
        if not a.url or len(a.concurrency) != 1:
            parser.error("--load needs --url and one --concurrency")
        result = asyncio.run(run_load(a.load, a.url, a.concurrency[0], a.duration, a.warmup))
        print(json.dumps(result), flush=True)
        return
    tmp = Path(tempfile.mkdtemp())
    try:
        build_repository(tmp / "repo", batching=False)
        gateway, grpc_url, http_url = start_gateway(tmp / "repo")
        urls = {"grpc": grpc_url, "json": http_url, "binary": http_url}
        results: dict[str, dict[int, list[dict[str, Any]]]] = {k: {c: [] for c in a.concurrency} for k in PROTOCOLS}
        try:
            for _ in range(a.reps):
                for c in a.concurrency:
                    for kind in PROTOCOLS:
                        results[kind][c].append(load(kind, urls[kind], c, a.duration))
        finally:
            gateway.terminate()
            gateway.wait(30)
        print(json.dumps(summarize(results, a.reps, a.duration)))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

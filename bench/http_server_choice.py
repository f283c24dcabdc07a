"""Which HTTP server carries onnxgate's REST edge: aiohttp or uvicorn (httptools) with a bare ASGI app.

Each candidate runs as a do-nothing Open Inference Protocol REST server in its own process, on one
asyncio loop that also runs an idle grpc.aio server (as the gateway's loop does): it reads the whole
request body and answers a fixed JSON infer response. `wrk` (Debian) drives both with the same POST,
interleaved (A B A B ...), at 1, 8 and 32 connections; medians and ratios come out as one JSON object.

    python bench/http_server_choice.py [--reps 3] [--duration 5]       # needs `wrk` on PATH
    python bench/http_server_choice.py --serve aiohttp|uvicorn --port 0   # one server (used by the above)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

REQUEST = json.dumps(
    {"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": [5.1, 3.5, 1.4, 0.2]}]}
).encode()
RESPONSE = json.dumps(
    {
        "model_name": "iris",
        "model_version": "2",
        "id": "0123456789abcdef0123456789abcdef",
        "outputs": [
            {"name": "label", "datatype": "INT64", "shape": [1], "data": [0]},
            {"name": "probabilities", "datatype": "FP32", "shape": [1, 3], "data": [0.97, 0.02, 0.01]},
        ],
    }
).encode()
LUA = """wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = [[%s]]
"""


async def serve_aiohttp(port: int) -> None:
    from aiohttp import web

    async def infer(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=RESPONSE, content_type="application/json")

    app = web.Application(client_max_size=256 * 1024 * 1024)
    app.router.add_post("/v2/models/{name}/infer", infer)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    bound = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    print(f"serving http on 127.0.0.1:{bound}", file=sys.stderr, flush=True)
    await asyncio.Event().wait()


async def serve_uvicorn(port: int) -> None:
    import socket

    import uvicorn

    Receive = Callable[[], Awaitable[dict[str, Any]]]
    Send = Callable[[dict[str, Any]], Awaitable[None]]

    async def app(scope: dict[str, Any], receive: Receive, send: Send) -> None:
        more = True
        while more:
            message = await receive()
            more = message.get("more_body", False)
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": RESPONSE})

    # proto IPPROTO_TCP, not the default 0: asyncio sets TCP_NODELAY only on sockets that say TCP, and
    # without it uvicorn's two writes (head, body) meet Nagle and delayed ACKs: 40 ms per request
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    config = uvicorn.Config(app, http="httptools", lifespan="off", access_log=False, log_level="warning")
    server = uvicorn.Server(config)
    print(f"serving http on 127.0.0.1:{sock.getsockname()[1]}", file=sys.stderr, flush=True)
    await server.serve(sockets=[sock])


async def serve(kind: str, port: int) -> None:
    import grpc

    grpc_server = grpc.aio.server()  # idle, as in the gateway: both share the loop
    grpc_server.add_insecure_port("127.0.0.1:0")
    await grpc_server.start()
    await (serve_aiohttp(port) if kind == "aiohttp" else serve_uvicorn(port))


def start(kind: str) -> tuple[subprocess.Popen[str], str]:
    process = subprocess.Popen(
        [sys.executable, __file__, "--serve", kind, "--port", "0"],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    assert process.stderr is not None
    for line in process.stderr:
        match = re.search(r"serving http on (\S+)", line)
        if match:
            return process, match.group(1)
    raise RuntimeError(f"{kind} did not start")


def wrk(address: str, connections: int, duration: float, script: Path) -> tuple[float, float]:
    """(requests/s, p50 ms) of one wrk run, one client thread."""
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{duration:g}s", "--latency", "-s", str(script),
         f"http://{address}/v2/models/iris/infer"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p50, unit = re.search(r"50%\s+([\d.]+)(us|ms|s)", out).groups()  # type: ignore[union-attr]
    return rps, float(p50) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[unit]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--serve", choices=("aiohttp", "uvicorn"))
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--duration", type=float, default=5)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    a = parser.parse_args()
    if a.serve:
        asyncio.run(serve(a.serve, a.port))
        return
    if shutil.which("wrk") is None:
        sys.exit("wrk is not on PATH: apt-get install wrk")
    servers = {kind: start(kind) for kind in ("aiohttp", "uvicorn")}
    results: dict[str, dict[int, list[tuple[float, float]]]] = {k: {c: [] for c in a.concurrency} for k in servers}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            script = Path(tmp) / "post.lua"
            script.write_text(LUA % REQUEST.decode())
            for _ in range(a.reps):
                for c in a.concurrency:
                    for kind, (_, address) in servers.items():
                        results[kind][c].append(wrk(address, c, a.duration, script))
    finally:
        for process, _ in servers.values():
            process.terminate()
            process.wait()
    summary: dict[str, Any] = {"reps": a.reps, "duration_s": a.duration}
    for c in a.concurrency:
        for kind in servers:
            runs = results[kind][c]
            summary[f"{kind}_c{c}_rps"] = [round(r) for r, _ in runs]
            summary[f"{kind}_c{c}_p50_ms"] = [round(p, 3) for _, p in runs]
        ratio = statistics.median(r for r, _ in results["uvicorn"][c]) / statistics.median(
            r for r, _ in results["aiohttp"][c]
        )
        summary[f"uvicorn_over_aiohttp_c{c}"] = round(ratio, 3)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()

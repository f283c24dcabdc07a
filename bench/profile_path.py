"""Where a request's CPU time goes in `onnxgate serve`: py-spy samples and per-thread CPU under load.

Starts `onnxgate serve` (gRPC and HTTP on) on serving_overhead.py's repository, drives one edge with 32
closed-loop clients (grpc: ../shared/bench/loadgen.py --client raw; json/binary: rest_vs_grpc.py's
aiohttp client) and, during the load, runs

    py-spy record --native --format raw --rate RATE -d SECONDS -p PID -o FILE

and reads every thread's CPU time from /proc/PID/task/*/stat over the same window. py-spy samples only
threads that run Python (the event loop thread, executor threads); grpc's C-core threads are counted
from /proc. Each sample is put in the stage of the deepest frame that matches a stage's rule (STAGES,
first rule wins per frame); the event loop thread's CPU time per request (CPU seconds / requests) is
apportioned by those shares. Prints one JSON object: rps, CPU per request per thread, and µs per
request per stage.

    python bench/profile_path.py [--edge grpc|json|binary] [--seconds 10] [--rate 100] [--keep DIR]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from serving_overhead import LOADGEN_CANDIDATES, build_repository  # bench/ is the script's directory

CLK_TCK = os.sysconf("SC_CLK_TCK")
BENCH = Path(__file__).resolve().parent

# (stage, regex on one frame "function (file:line)"); a sample goes to the deepest frame that matches
STAGES: list[tuple[str, str]] = [
    (
        "syscalls: socket send/recv, epoll, eventfd",
        r"^(?:sendmsg|recvmsg|recv|send|write|read|epoll_wait|eventfd_\w+|__libc_\w+) \(libc",
    ),
    ("clock reads (vdso clock_gettime: time.monotonic_ns etc.)", r"\(\[vdso\]\)"),
    ("onnxruntime run (C++)", r"onnxruntime::|libonnxruntime|onnxruntime_pybind|OrtRun|InferenceSession.*run"),
    ("ModelVersion.infer / _run_here (Python)", r"\((?:\S*/)?server/model\.py"),
    ("statistics recording", r"\((?:\S*/)?server/stats\.py"),
    ("metrics", r"\((?:\S*/)?server/metrics\.py|prometheus_client"),
    ("prediction log record", r"\((?:\S*/)?server/predlog\.py"),
    ("encode_response", r"encode_response|\((?:\S*/)?server/tensors\.py:\d+\)$|_encode "),
    ("decode_request", r"decode_request"),
    ("routing / repository lookup", r"\((?:\S*/)?server/(?:routing|repository)\.py"),
    ("Inference.run (shared path)", r"\((?:\S*/)?server/inference\.py"),
    (
        "wire.py parse (protobuf FromString)",
        r"\((?:\S*/)?server/wire\.py|FromString|ParseFromString|_message\.abi3|upb_",
    ),
    ("REST: rest.py / rest_tensors.py", r"\((?:\S*/)?server/rest(?:_tensors)?\.py"),
    ("REST: uvicorn / httptools / starlette", r"uvicorn|httptools|starlette"),
    ("JSON (orjson/json)", r"orjson|json/"),
    # cygrpc.so holds both grpc.aio's Cython layer and the statically linked C-core; its frames are unsymbolised
    ("grpc (cygrpc.so: aio Cython layer + C-core)", r"grpc/_cython|cygrpc|grpc_core::|libgrpc"),
    ("asyncio loop", r"asyncio/|uvloop|_run_once|select\b|epoll"),
]


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds per thread name (threads of the same name summed)."""
    out: dict[str, float] = collections.defaultdict(float)
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            stat = (task / "stat").read_text()
        except OSError:
            continue
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat.rsplit(")", 1)[1].split()
        out[re.sub(r"\d+$", "#", name)] += (int(fields[11]) + int(fields[12])) / CLK_TCK
    return out


def classify(stack: str) -> str:
    frames = stack.split(";")
    for frame in reversed(frames):  # leaf first
        for stage, rule in STAGES:
            if re.search(rule, frame):
                return stage
    return "other: " + (frames[-1][:80] if frames else "?")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--edge", default="grpc", choices=["grpc", "json", "binary"])
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--rate", type=int, default=100, help="py-spy samples/s")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--keep", type=Path, help="keep the raw py-spy output here")
    args = ap.parse_args()
    pyspy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    loadgen = next((p for p in LOADGEN_CANDIDATES if p.is_file()), None)
    if loadgen is None:
        sys.exit("loadgen.py not found beside the repository (../shared/bench/loadgen.py)")
    tmp = Path(tempfile.mkdtemp())
    try:
        build_repository(tmp / "repo", batching=False)
        sys.path.insert(0, str(BENCH))
        from rest_vs_grpc import start_gateway

        gateway, grpc_url, http_url = start_gateway(tmp / "repo")
        try:

            def client(duration: float) -> subprocess.Popen[str]:
                if args.edge == "grpc":
                    cmd = [sys.executable, str(loadgen), "--url", grpc_url, "--model", "rf", "--concurrency",
                           str(args.concurrency), "--duration", str(duration), "--client", "raw"]  # fmt: skip
                else:
                    cmd = [sys.executable, str(BENCH / "rest_vs_grpc.py"), "--load", args.edge, "--url", http_url,
                           "--concurrency", str(args.concurrency), "--duration", str(duration)]  # fmt: skip
                return subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)

            # 1) unprofiled: requests/s and CPU per thread (py-spy --native pauses the process per sample)
            load = client(args.seconds)
            time.sleep(1.0)  # the client's warm-up
            c0, t0 = thread_cpu(gateway.pid), time.perf_counter()
            out, _ = load.communicate()
            c1, wall = thread_cpu(gateway.pid), time.perf_counter() - t0
            result = json.loads(out.strip().splitlines()[-1])
            # 2) profiled: where the event loop thread's time goes
            load = client(args.seconds + 3.0)
            time.sleep(2.0)
            raw = tmp / "profile.txt"
            spy = subprocess.run(
                [pyspy, "record", "--native", "--format", "raw", "--rate", str(args.rate), "-d", str(args.seconds),
                 "-p", str(gateway.pid), "-o", str(raw)],
                capture_output=True, text=True,
            )  # fmt: skip
            profiled, _ = load.communicate()
            result["rps_while_profiled"] = json.loads(profiled.strip().splitlines()[-1])["rps"]
        finally:
            gateway.terminate()
        if spy.returncode != 0:
            sys.exit(f"py-spy failed: {spy.stderr}")
        if args.keep:
            args.keep.mkdir(parents=True, exist_ok=True)
            shutil.copy(raw, args.keep / f"profile-{args.edge}.txt")
        rps = result["rps"]
        cpu = {name: round((c1[name] - c0.get(name, 0.0)) / wall, 3) for name in c1}
        cpu = {k: v for k, v in sorted(cpu.items(), key=lambda kv: -kv[1]) if v > 0}
        stages: collections.Counter[str] = collections.Counter()
        leaves: collections.Counter[str] = collections.Counter()
        for line in raw.read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            # py-spy raw: "frame;frame;... count", root first; the event loop runs on the main thread
            if "_run_module_as_main" not in stack:
                continue
            stages[classify(stack)] += int(count)
            leaves[stack.rsplit(";", 1)[-1]] += int(count)
        total = sum(stages.values())
        main_name = "python" if "python" in cpu else max(cpu, key=lambda k: cpu[k])
        loop_us = cpu.get(main_name, 0.0) / rps * 1e6
        summary = {
            "edge": args.edge,
            "concurrency": args.concurrency,
            "rps": rps,
            "rps_while_profiled": result["rps_while_profiled"],
            "client_cpu": result.get("client_cpu"),
            "server_cpu_cores_by_thread": cpu,
            "server_cpu_us_per_request": round(sum(cpu.values()) / rps * 1e6, 1),
            "loop_thread": main_name,
            "loop_thread_us_per_request": round(loop_us, 1),
            "samples": total,
            "top_leaf_frames": [[k, round(v / total, 3)] for k, v in leaves.most_common(15)],
            "stages_share_and_us_per_request": {
                k: [round(v / total, 3), round(loop_us * v / total, 1)] for k, v in stages.most_common()
            },
        }
        print(json.dumps(summary, indent=1))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

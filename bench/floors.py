"""onnxgate against both do-nothing grpcio floors: grpc.aio and the sync server with a thread pool.

Issue 8 item 1 measures onnxgate against the FASTEST do-nothing grpcio server with the same client.
This starts three processes (onnxgate on serving_overhead.py's repository, bench/baseline_server.py,
bench/baseline_server.py --sync with a ThreadPoolExecutor(8)) and loads each with
../shared/bench/loadgen.py at 1 and 32 clients, interleaved (aio sync onnxgate, aio sync onnxgate ...),
`reps` rounds. Prints one JSON object: per-round requests/s at 32 clients and p50 at 1 client, the
medians, the ratio onnxgate / each floor, and the servers' CPU use (fraction of a core, from /proc)
during each 32-client run.

    python bench/floors.py [--reps 3] [--duration 5] [--client raw|triton]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

from serving_overhead import LOADGEN_CANDIDATES, build_repository, load, start  # bench/ is the script's directory

CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--client", default="raw", choices=["raw", "triton"])
    args = ap.parse_args()
    loadgen = next((p for p in LOADGEN_CANDIDATES if p.is_file()), None)
    if loadgen is None:
        sys.exit("loadgen.py not found beside the repository (../shared/bench/loadgen.py)")
    tmp = Path(tempfile.mkdtemp())
    processes = []
    try:
        build_repository(tmp / "repo", batching=False)
        servers = {}
        for name, cmd in (
            ("aio", [sys.executable, "bench/baseline_server.py"]),
            ("sync", [sys.executable, "bench/baseline_server.py", "--sync"]),
            ("onnxgate", [sys.executable, "-m", "onnxgate", "serve", "--model-repository", str(tmp / "repo"),
                          "--grpc-port", "0", "--metrics-port", "-1", "--http-port", "-1", "--log-level", "warning"]),
        ):  # fmt: skip
            process, url = start(cmd, r"serving gRPC on (\S+)")
            processes.append(process)
            servers[name] = (process, url)
        rows: dict[str, dict[str, list[float]]] = {
            n: {"rps_c32": [], "p50_ms_c1": [], "server_cpu_c32": []} for n in servers
        }
        for _ in range(args.reps):
            for concurrency in (1, 32):
                for name, (process, url) in servers.items():
                    c0 = cpu_seconds(process.pid)
                    r = load(loadgen, url, concurrency, args.duration, args.client)
                    # the load includes a 1 s warm-up: CPU over warm-up + duration
                    cpu = (cpu_seconds(process.pid) - c0) / (args.duration + 1.0)
                    if concurrency == 32:
                        rows[name]["rps_c32"].append(r["rps"])
                        rows[name]["server_cpu_c32"].append(round(cpu, 2))
                    else:
                        rows[name]["p50_ms_c1"].append(r["p50_ms"])
        med = {n: {k: statistics.median(v) for k, v in r.items()} for n, r in rows.items()}
        fastest = max(("aio", "sync"), key=lambda n: med[n]["rps_c32"])
        summary: dict[str, object] = {"client": args.client, "reps": args.reps, "duration_s": args.duration}
        summary.update({n: {"rounds": rows[n], "median": med[n]} for n in rows})
        summary["fastest_floor_c32"] = fastest
        for floor in ("aio", "sync"):
            summary[f"rps_ratio_c32_vs_{floor}"] = round(med["onnxgate"]["rps_c32"] / med[floor]["rps_c32"], 3)
            summary[f"p50_delta_ms_c1_vs_{floor}"] = round(med["onnxgate"]["p50_ms_c1"] - med[floor]["p50_ms_c1"], 3)
        print(json.dumps(summary, indent=1))
    finally:
        for process in processes:
            process.terminate()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

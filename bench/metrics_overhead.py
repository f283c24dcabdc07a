"""What the Prometheus metrics cost a loaded gateway: requests/s with the metrics port on and scraped every
second, against the metrics port off, in one run.

Two `onnxgate serve` processes on the same repository (bench/serving_overhead.py's random forest): "on"
with a metrics port that a scraper thread here GETs every second while that server is under load, "off"
with --metrics-port -1. Both record the same counters and histograms (that happens on the request path
whatever the port); what "off" saves is the exposition: the collector, the HTTP thread, the scrape.
With `--before DIR`, a third server runs the code in DIR (e.g. the commit before the metrics, unpacked
with `git archive <commit> | tar -x -C DIR`), metrics port off: it records neither the answer counts
nor the histograms, so "on" against it is the whole cost. Runs are interleaved (off, on[, before]) per
round and concurrency; medians and ratios are printed as one JSON object.

The recording itself is also timed alone (`record_ns`): VersionStats' three record calls and the answer
count per request, against the same calls without the histograms.

    python bench/metrics_overhead.py [--reps 3] [--duration 5] [--before DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from serving_overhead import LOADGEN_CANDIDATES, ROOT, build_repository, load  # bench/ is the script's directory


def serve(repo: Path, metrics: bool, code_dir: Path | None = None) -> tuple[subprocess.Popen[str], str, int]:
    cmd = [sys.executable, "-m", "onnxgate", "serve", "--model-repository", str(repo), "--grpc-port", "0",
           "--metrics-port", "0" if metrics else "-1", "--http-port", "-1", "--log-level", "warning"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(code_dir)} if code_dir is not None else None
    process = subprocess.Popen(
        cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, cwd=code_dir or ROOT, env=env
    )
    assert process.stderr is not None
    for line in process.stderr:
        if line.startswith("onnxgate: serving gRPC on "):
            parts = line.split()
            address, metrics_port = parts[4], parts[7]
            threading.Thread(target=lambda: [None for _ in process.stderr or []], daemon=True).start()
            return process, address, int(metrics_port) if metrics_port.isdigit() else 0
    raise RuntimeError(f"{cmd} did not start")


class Scraper(threading.Thread):
    """GET /metrics every `interval_s` while `active` is set, as Prometheus would."""

    def __init__(self, port: int, interval_s: float = 1.0) -> None:
        super().__init__(daemon=True)
        self.url = f"http://127.0.0.1:{port}/metrics"
        self.interval_s = interval_s
        self.active = threading.Event()
        self.done = threading.Event()
        self.scrapes: list[float] = []  # seconds each scrape took
        self.size = 0

    def run(self) -> None:
        while not self.done.is_set():
            if not self.active.wait(0.1):
                continue
            t0 = time.perf_counter()
            body = urllib.request.urlopen(self.url, timeout=10).read()
            self.scrapes.append(time.perf_counter() - t0)
            self.size = len(body)
            self.done.wait(self.interval_s)


def record_ns(iterations: int = 200_000, repeats: int = 5) -> dict[str, float]:
    """ns per request of the recording calls, with and without the histograms (fastest of `repeats`)."""
    from onnxgate.server.stats import BatchStats, RequestCounts, VersionStats

    class Without(VersionStats):  # the record calls as they were before the histograms
        def record_request(
            self, rows: int, total_ns: int, queue_ns: int, input_ns: int, infer_ns: int, output_ns: int
        ) -> None:
            self.last_inference_ms = time.time_ns() // 1_000_000
            self.inference_count += rows
            success, queue, infer = self.success, self.queue, self.compute_infer
            success.count += 1
            success.ns += total_ns
            queue.count += 1
            queue.ns += queue_ns
            infer.count += 1
            infer.ns += infer_ns
            self.compute_input.count += 1
            self.compute_input.ns += input_ns
            self.compute_output.count += 1
            self.compute_output.ns += output_ns

        def record_execution(self, batch_size: int, input_ns: int, infer_ns: int, output_ns: int) -> None:
            self.execution_count += 1
            batch = self.batches.get(batch_size)
            if batch is None:
                batch = self.batches[batch_size] = BatchStats()
            batch.compute_input.count += 1
            batch.compute_input.ns += input_ns
            batch.compute_infer.count += 1
            batch.compute_infer.ns += infer_ns
            batch.compute_output.count += 1
            batch.compute_output.ns += output_ns

        def record_output(self, encode_ns: int, request_ns: int = 0) -> None:
            self.compute_output.ns += encode_ns
            self.success.ns += encode_ns

    def per_request(stats: VersionStats, count: bool) -> float:
        counts = RequestCounts().counts
        key = ("grpc", "ModelInfer", "OK")
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter_ns()
            for i in range(iterations):
                ns = 300_000 + (i & 1023) * 500
                stats.record_execution(1, 0, ns, 0)
                stats.record_request(1, ns + 40_000, 0, 20_000, ns, 0)
                stats.record_output(10_000, ns + 50_000)
                if count:
                    counts[key] += 1
            best = min(best, (time.perf_counter_ns() - t0) / iterations)
        return best

    with_hist = per_request(VersionStats(), count=True)
    without = per_request(Without(), count=False)
    return {"with_ns": round(with_hist, 1), "without_ns": round(without, 1), "added_ns": round(with_hist - without, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--client", default="raw", choices=["raw", "triton"])
    ap.add_argument("--before", type=Path, help="a source tree without the metrics recording, served as 'before'")
    args = ap.parse_args()
    loadgen = next((p for p in LOADGEN_CANDIDATES if p.is_file()), None)
    if loadgen is None:
        sys.exit("loadgen.py not found beside the repository (../shared/bench/loadgen.py)")
    tmp = Path(tempfile.mkdtemp())
    processes: list[subprocess.Popen[str]] = []
    try:
        build_repository(tmp / "repo", batching=False)
        servers: dict[str, str] = {}
        p, servers["off"], _ = serve(tmp / "repo", metrics=False)
        processes.append(p)
        p, servers["on"], metrics_port = serve(tmp / "repo", metrics=True)
        processes.append(p)
        if args.before is not None:
            p, servers["before"], _ = serve(tmp / "repo", metrics=False, code_dir=args.before.resolve())
            processes.append(p)
        scraper = Scraper(metrics_port)
        scraper.start()
        results: dict[str, dict[int, list[dict[str, float]]]] = {n: {c: [] for c in args.concurrency} for n in servers}
        for _ in range(args.reps):
            for concurrency in args.concurrency:
                for name, url in servers.items():
                    if name == "on":
                        scraper.active.set()
                    try:
                        results[name][concurrency].append(load(loadgen, url, concurrency, args.duration, args.client))
                    finally:
                        scraper.active.clear()
        scraper.done.set()
        summary: dict[str, object] = {"reps": args.reps, "duration_s": args.duration, "client": args.client}
        med: dict[str, dict[str, float]] = {}
        for name, by_c in results.items():
            summary[name] = {}
            med[name] = {}
            for c, runs in by_c.items():
                rps, p50 = [r["rps"] for r in runs], [r["p50_ms"] for r in runs]
                summary[name][f"rps_c{c}"] = rps  # type: ignore[index]
                summary[name][f"p50_ms_c{c}"] = p50  # type: ignore[index]
                med[name][f"rps_c{c}"] = statistics.median(rps)
                med[name][f"p50_ms_c{c}"] = statistics.median(p50)
        for c in args.concurrency:
            summary[f"rps_ratio_on_off_c{c}"] = round(med["on"][f"rps_c{c}"] / med["off"][f"rps_c{c}"], 3)
            summary[f"p50_delta_ms_on_off_c{c}"] = round(med["on"][f"p50_ms_c{c}"] - med["off"][f"p50_ms_c{c}"], 3)
            if "before" in med:
                summary[f"rps_ratio_on_before_c{c}"] = round(med["on"][f"rps_c{c}"] / med["before"][f"rps_c{c}"], 3)
        summary["scrapes"] = len(scraper.scrapes)
        summary["scrape_ms_median"] = round(1000 * statistics.median(scraper.scrapes), 2) if scraper.scrapes else None
        summary["scrape_bytes"] = scraper.size
        summary["record_ns"] = record_ns()
        print(json.dumps(summary, indent=1))
    finally:
        for p in processes:
            p.terminate()
            p.wait(30)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

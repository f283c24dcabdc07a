"""Side by side: onnxgate, MLServer, Triton, a do-nothing grpcio floor and in-process onnxruntime.

Issue 8 item 5. Trains three sklearn models with a fixed seed on 20 FP32 features (LogisticRegression,
RandomForest with 100 trees, MLPClassifier) and serves the same models from every server:

  floor     bench/baseline_server.py (grpc.aio, answers a pre-built response; aio and sync floors are within
            1-3% here, docs/profile.md): the ceiling any Python gRPC server is measured against
  onnxgate  the skl2onnx conversions (zipmap off: label + probabilities), onnxruntime
  mlserver  MLServer 1.7.1 + mlserver-sklearn 1.7.1, the sklearn joblib pickles (.venv-mlserver;
            default settings: one parallel inference worker; the runtime answers `predict`)
  triton    Triton 2.51 from nvidia-pytriton 0.7.0 (.venv-pytriton), bench/peers_triton.py: an infer
            function calling the sklearn model's predict_proba (same pickles), dynamic batching on
  limit     in-process onnxruntime on the onnx files (same session options as a default
            InferenceSession), a closed loop of sess.run for `duration` seconds: rows/s

For each (model, rows per request, clients) cell the servers are loaded one after another with
../shared/bench/loadgen.py (--client raw), in an order rotated every repetition; `reps` repetitions.
Resident memory (VmRSS summed over each server's process tree, workers and Triton's stub
processes included) is read after all models are loaded and before any load. Writes the raw rounds
and the summary as JSON (--out) and the plot docs/img/peers.png (requests/s per server per cell).

    bash bench/setup_peers.sh                       # once: .venv-mlserver, .venv-pytriton
    python bench/peers.py [--models lr,rf,mlp] [--rows 1,256] [--clients 1,8,32] [--reps 3] [--duration 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from onnxgate.server.pb import grpc_service_pb2 as pb
from onnxgate.server.pb import grpc_service_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parents[1]
LOADGEN_CANDIDATES = [ROOT / "shared" / "bench" / "loadgen.py", ROOT.parent / "shared" / "bench" / "loadgen.py"]
FEATURES = 20
MODELS = ("lr", "rf", "mlp")


def train(out: Path) -> None:
    """The three models, as onnx (onnxgate's repository) and as joblib (MLServer, Triton)."""
    import joblib
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier

    rng = np.random.default_rng(0)
    x = rng.standard_normal((2000, FEATURES)).astype(np.float32)
    y = (x[:, 0] + x[:, 1] * x[:, 2] > 0).astype(int)
    models = {
        "lr": LogisticRegression(max_iter=1000, random_state=0),
        "rf": RandomForestClassifier(n_estimators=100, random_state=0),
        "mlp": MLPClassifier(hidden_layer_sizes=(64, 64), max_iter=300, random_state=0),
    }
    for name, clf in models.items():
        clf.fit(x, y)
        # MLPClassifier keeps its fitted RandomState, whose numpy 2 pickle .venv-pytriton's numpy 1.26 cannot
        # read; predict never uses it
        if hasattr(clf, "_random_state"):
            del clf._random_state
        onnx = convert_sklearn(
            clf, initial_types=[("input", FloatTensorType([None, FEATURES]))], options={id(clf): {"zipmap": False}}
        )
        (out / "onnx" / name / "1").mkdir(parents=True)
        (out / "onnx" / name / "1" / "model.onnx").write_bytes(onnx.SerializeToString())
        (out / "joblib").mkdir(exist_ok=True)
        joblib.dump(clf, out / "joblib" / f"{name}.joblib")
        (out / "mlserver" / name).mkdir(parents=True)
        shutil.copy(out / "joblib" / f"{name}.joblib", out / "mlserver" / name / "model.joblib")
        settings = {"name": name, "implementation": "mlserver_sklearn.SKLearnModel",
                    "parameters": {"uri": "./model.joblib", "version": "1"}}  # fmt: skip
        (out / "mlserver" / name / "model-settings.json").write_text(json.dumps(settings))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_ready(url: str, models: list[str], process: subprocess.Popen[bytes], timeout: float = 180.0) -> None:
    channel = grpc.insecure_channel(url)
    stub = pb_grpc.GRPCInferenceServiceStub(channel)  # type: ignore[no-untyped-call]
    end = time.monotonic() + timeout
    pending = list(models)
    while pending:
        if process.poll() is not None:
            raise RuntimeError(f"server for {url} exited with {process.returncode}")
        if time.monotonic() > end:
            raise RuntimeError(f"{url}: models {pending} not ready after {timeout} s")
        try:
            if stub.ModelReady(pb.ModelReadyRequest(name=pending[0]), timeout=2).ready:
                pending.pop(0)
                continue
        except grpc.RpcError:
            pass
        time.sleep(0.5)
    channel.close()


def tree_rss_mb(pid: int) -> float:
    """VmRSS of pid and all its descendants, MB."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    total, stack = 0, [pid]
    while stack:
        p = stack.pop()
        stack.extend(children.get(p, []))
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return round(total / 1024, 1)


def start_servers(
    tmp: Path, wanted: list[str], models: list[str], processes: list[subprocess.Popen[bytes]]
) -> dict[str, tuple[subprocess.Popen[bytes], str]]:
    logs = tmp / "logs"
    logs.mkdir(exist_ok=True)
    cmds: dict[str, tuple[list[str], dict[str, str], int]] = {}
    port = free_port()
    cmds["floor"] = ([sys.executable, "bench/baseline_server.py", "--port", str(port)], {}, port)
    port = free_port()
    cmds["onnxgate"] = ([sys.executable, "-m", "onnxgate", "serve", "--model-repository", str(tmp / "onnx"),
                         "--grpc-port", str(port), "--metrics-port", "-1", "--http-port", "-1",
                         "--log-level", "warning"], {}, port)  # fmt: skip
    port = free_port()
    settings = {"grpc_port": port, "http_port": free_port(), "metrics_port": free_port(), "debug": False}
    (tmp / "mlserver" / "settings.json").write_text(json.dumps(settings))
    cmds["mlserver"] = ([str(ROOT / ".venv-mlserver" / "bin" / "mlserver"), "start", str(tmp / "mlserver")], {}, port)
    port = free_port()
    libdir = sysconfig.get_config_var("LIBDIR")  # the Python installation's lib: Triton's python backend links it
    cmds["triton"] = ([str(ROOT / ".venv-pytriton" / "bin" / "python"), "bench/peers_triton.py",
                       "--models", str(tmp / "joblib"), "--grpc-port", str(port), "--http-port", str(free_port()),
                       "--metrics-port", str(free_port()), "--features", str(FEATURES)],
                      {"LD_LIBRARY_PATH": f"{libdir}:{os.environ.get('LD_LIBRARY_PATH', '')}"}, port)  # fmt: skip
    servers: dict[str, tuple[subprocess.Popen[bytes], str]] = {}
    for name in wanted:
        cmd, env, port = cmds[name]
        log = (logs / f"{name}.log").open("wb")
        process = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT)
        servers[name] = (process, f"127.0.0.1:{port}")
        processes.append(process)
    for name, (process, url) in servers.items():
        try:
            wait_ready(url, [] if name == "floor" else models, process)
        except RuntimeError as e:
            tail = (logs / f"{name}.log").read_text(errors="replace")[-3000:]
            raise RuntimeError(f"{name}: {e}\n{tail}") from e
        if name == "floor":
            time.sleep(2)  # no ModelReady on the do-nothing server; give it its start-up
    return servers


def load(loadgen: Path, url: str, model: str, rows: int, clients: int, duration: float) -> dict[str, Any]:
    cmd = [sys.executable, str(loadgen), "--url", url, "--model", model, "--concurrency", str(clients),
           "--duration", str(duration), "--batch", str(rows), "--features", str(FEATURES), "--client", "raw"]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


def in_process_rows_per_s(onnx: Path, rows: int, duration: float) -> float:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(onnx), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((rows, FEATURES)).astype(np.float32)
    for _ in range(20):
        sess.run(None, {"input": x})
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < duration:
        sess.run(None, {"input": x})
        n += 1
    return n * rows / (time.perf_counter() - t0)


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.0f} ({min(values):.0f}-{max(values):.0f})"


def markdown(summary: dict[str, Any], servers: list[str]) -> str:
    """The tables for docs/benchmarks.md: requests/s median (min-max), ratios, rows/s vs in-process."""
    head = "| model / rows / clients | " + " | ".join(servers) + " | onnxgate/floor | onnxgate/mlserver"
    head += " | onnxgate/triton | onnxgate p50 ms | onnxgate rows/s / in-process ort |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for key, cell in summary["cells"].items():
        row = [key] + [spread(cell[n]["rps"]) + (" (errors)" if any(cell[n].get("errors", [])) else "")
                       if n in cell else "-" for n in servers]  # fmt: skip
        row += [
            f"{cell[r]:.2f}x" if r in cell else "-" for r in ("onnxgate/floor", "onnxgate/mlserver", "onnxgate/triton")
        ]
        row.append(f"{cell['onnxgate']['p50_median_ms']:.2f}" if "onnxgate" in cell else "-")
        ratio = cell.get("onnxgate_rows_per_s/in_process")
        row.append(f"{ratio:.2f}x" if ratio is not None else "-")
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "| in-process onnxruntime | rows/s, median (min-max) |", "|---|---|"]
    lines += [f"| {k} | {spread(v)} |" for k, v in summary["in_process_ort_rows_per_s"].items()]
    lines += ["", "| server | RSS after loading lr + rf + mlp, MB |", "|---|---|"]
    lines += [f"| {k} | {v:.0f} |" for k, v in summary["rss_mb_after_loading"].items()]
    return "\n".join(lines)


def plot(summary: dict[str, Any], servers: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = list(summary["cells"])
    fig, ax = plt.subplots(figsize=(max(8, 1.1 * len(cells)), 4.5))
    width = 0.8 / len(servers)
    for i, name in enumerate(servers):
        med = [summary["cells"][c].get(name, {}).get("rps_median", 0) for c in cells]
        lo = [m - summary["cells"][c].get(name, {}).get("rps_min", m) for c, m in zip(cells, med, strict=True)]
        hi = [summary["cells"][c].get(name, {}).get("rps_max", m) - m for c, m in zip(cells, med, strict=True)]
        xs = [j + (i - (len(servers) - 1) / 2) * width for j in range(len(cells))]
        ax.bar(xs, med, width, yerr=[lo, hi], label=name, capsize=2)
    ax.set_xticks(range(len(cells)))
    ax.set_xticklabels(cells, rotation=30, ha="right", fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("requests/s (median, min-max bars)")
    ax.set_title("gRPC requests/s per server, cell = model / rows per request / clients")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="lr,rf,mlp")
    ap.add_argument("--rows", default="1,256")
    ap.add_argument("--clients", default="1,8,32")
    ap.add_argument("--servers", default="floor,onnxgate,mlserver,triton")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--duration", type=float, default=3.0)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "peers.json")
    ap.add_argument("--plot", type=Path, default=ROOT / "docs" / "img" / "peers.png")
    ap.add_argument("--render", type=Path, help="only re-render the plot and tables from a saved --out JSON")
    args = ap.parse_args()
    if args.render:
        saved = json.loads(args.render.read_text())["summary"]
        names = [n for n in args.servers.split(",") if any(n in c for c in saved["cells"].values())]
        plot(saved, names, args.plot)
        print(markdown(saved, names))
        return
    models = args.models.split(",")
    rows_list = [int(r) for r in args.rows.split(",")]
    clients_list = [int(c) for c in args.clients.split(",")]
    wanted = args.servers.split(",")
    loadgen = next((p for p in LOADGEN_CANDIDATES if p.is_file()), None)
    if loadgen is None:
        sys.exit("loadgen.py not found beside the repository (../shared/bench/loadgen.py)")
    tmp = Path(tempfile.mkdtemp())
    processes: list[subprocess.Popen[bytes]] = []  # every started server, stopped in `finally` even if start fails
    try:
        train(tmp)
        servers = start_servers(tmp, wanted, models, processes)
        rss = {name: tree_rss_mb(process.pid) for name, (process, _) in servers.items()}
        print(json.dumps({"rss_mb_after_loading": rss}), file=sys.stderr, flush=True)
        rounds: dict[str, dict[str, list[dict[str, Any]]]] = {}
        limit: dict[str, list[float]] = {}
        cells = [(m, r, c) for m in models for r in rows_list for c in clients_list]
        for rep in range(args.reps):
            for model, rows, clients in cells:
                key = f"{model}/{rows}/{clients}"
                order = wanted[rep % len(wanted) :] + wanted[: rep % len(wanted)]
                for name in order:
                    r = load(loadgen, servers[name][1], model, rows, clients, args.duration)
                    rounds.setdefault(key, {}).setdefault(name, []).append(r)
                    print(f"rep {rep} {key} {name}: {r['rps']} req/s p50 {r['p50_ms']} ms errors {r['errors']}"
                          f" {r['first_error'] or ''}", file=sys.stderr, flush=True)  # fmt: skip
            for model in models:
                for rows in rows_list:
                    ort_rps = in_process_rows_per_s(tmp / "onnx" / model / "1" / "model.onnx", rows, args.duration)
                    limit.setdefault(f"{model}/{rows}", []).append(round(ort_rps, 1))
        summary: dict[str, Any] = {"reps": args.reps, "duration_s": args.duration, "rss_mb_after_loading": rss,
                                   "in_process_ort_rows_per_s": limit, "cells": {}}  # fmt: skip
        for key, by_server in rounds.items():
            cell: dict[str, Any] = {}
            for name, rs in by_server.items():
                rps = [r["rps"] for r in rs]
                p50 = [r["p50_ms"] for r in rs]
                cell[name] = {"rps": rps, "errors": [r["errors"] for r in rs], "p50_ms": p50,
                              "rps_median": statistics.median(rps),
                              "rps_min": min(rps), "rps_max": max(rps), "p50_median_ms": statistics.median(p50),
                              "client_cpu": [r["client_cpu"] for r in rs]}  # fmt: skip
            gw = cell.get("onnxgate", {}).get("rps_median")
            if gw:
                for name in by_server:
                    if name != "onnxgate":
                        cell[f"onnxgate/{name}"] = round(gw / cell[name]["rps_median"], 3)
                model, rows, _ = key.split("/")
                ort = limit.get(f"{model}/{rows}")
                if ort:
                    cell["onnxgate_rows_per_s/in_process"] = round(gw * int(rows) / statistics.median(ort), 3)
            summary["cells"][key] = cell
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"summary": summary, "rounds": rounds}, indent=1))
        plot(summary, wanted, args.plot)
        print(json.dumps(summary, indent=1))
        print(markdown(summary, wanted))
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

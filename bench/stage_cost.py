"""Where a request's microseconds go, by elimination: one stage of onnxgate's request path added at a time.

A sampling profiler pauses the process and cannot see grpc's C core or onnxruntime's effect on the
caches around it. This measures instead: each stage is a grpc.aio server that does the request path up
to that point and answers (a pre-built response until the outputs are encoded), all loaded in turn by
the same client at 32 closed-loop clients, interleaved, `reps` rounds. The difference in server CPU
per request (all threads, /proc) between one stage and the one before is what that step costs under
load, caches and grpc's own work included.

Stages (each adds to the one before; the repository is serving_overhead.py's 10-tree forest):
  floor       do-nothing: a pre-built response (bench/baseline_server.py's)
  decode      + decode_request (protobuf fields -> numpy)
  ort         + one onnxruntime run of the model (OnnxModel.predict)
  ort-ident   decode + one run of a one-node Identity graph instead: the cost of an onnxruntime call
  infer       decode + ModelVersion.infer (input checks, statistics, the inline run) instead of the bare run
  encode      + encode_response of the real outputs (answers them: the whole path without Inference.run)
  inference   Inference.run (admission, routing, the same decode/infer/encode): what the servicer calls
  onnxgate    `onnxgate serve` itself (wire parsing, error mapping, answer counters, health, reflection)

    python bench/stage_cost.py [--reps 3] [--duration 3] [--loop asyncio|uvloop] [--stages floor,decode,...]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from floors import cpu_seconds  # bench/ is the script's directory
from serving_overhead import LOADGEN_CANDIDATES, build_repository, load, start

STAGES = ("floor", "decode", "ort", "ort-ident", "infer", "encode", "inference", "onnxgate")


def identity_session() -> Any:
    """An onnxruntime session of one Identity node, with the gateway's session settings."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "identity",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 20])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 20])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


async def serve(stage: str, repo: Path) -> None:
    import grpc
    from baseline_server import prebuilt_response

    from onnxgate.server.app import Gateway
    from onnxgate.server.config import Settings
    from onnxgate.server.pb import grpc_service_pb2 as pb
    from onnxgate.server.pb import grpc_service_pb2_grpc as pb_grpc
    from onnxgate.server.service import _encode
    from onnxgate.server.tensors import decode_request

    settings = Settings(model_repository=repo, grpc_port=0, http_port=-1, metrics_port=-1)
    gateway = Gateway(settings, repo)  # its repository and Inference; its own servers are never started
    await gateway.repository.load_all()
    version = gateway.repository.route("rf")[0]
    names = [o.name for o in version.spec.outputs]
    identity = identity_session()
    inference = gateway.inference
    prebuilt = prebuilt_response(1)

    class Stage(pb_grpc.GRPCInferenceServiceServicer):
        async def ModelInfer(self, request: pb.ModelInferRequest, context: object) -> pb.ModelInferResponse:
            if stage == "floor":
                return prebuilt
            if stage == "inference":
                return await inference.run(request, decode_request, _encode, None)
            infer = decode_request(request)
            if stage == "ort":
                version.runtime.predict(infer.inputs, names)
            elif stage == "ort-ident":
                identity.run(None, {"x": infer.inputs["input"]})
            elif stage in ("infer", "encode"):
                outputs = await version.infer(infer)
                if stage == "encode":
                    return _encode(infer, version.version_str, outputs)
            return prebuilt

    server = grpc.aio.server()
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(Stage(), server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(f"stage {stage}: serving gRPC on 127.0.0.1:{port}", file=sys.stderr, flush=True)
    await server.wait_for_termination()


def run_loop(loop: str, main: Any) -> None:
    if loop == "uvloop":
        import uvloop

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(main)
    else:
        asyncio.run(main)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--duration", type=float, default=3.0)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--loop", default="asyncio", choices=["asyncio", "uvloop"])
    ap.add_argument("--stages", default=",".join(STAGES))
    ap.add_argument("--serve", choices=STAGES, help=argparse.SUPPRESS)  # a stage's server process
    ap.add_argument("--repo", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        run_loop(args.loop, serve(args.serve, args.repo))
        return
    loadgen = next((p for p in LOADGEN_CANDIDATES if p.is_file()), None)
    if loadgen is None:
        sys.exit("loadgen.py not found beside the repository (../shared/bench/loadgen.py)")
    stages = args.stages.split(",")
    tmp = Path(tempfile.mkdtemp())
    repo = tmp / "repo"
    build_repository(repo, batching=False)
    processes = []
    try:
        servers = {}
        for stage in stages:
            if stage == "onnxgate":
                cmd = [sys.executable, "-m", "onnxgate", "serve", "--model-repository", str(repo),
                       "--grpc-port", "0", "--metrics-port", "-1", "--http-port", "-1", "--log-level", "warning",
                       "--event-loop", args.loop]  # fmt: skip
            else:
                cmd = [sys.executable, __file__, "--serve", stage, "--repo", str(repo), "--loop", args.loop]
            process, url = start(cmd, r"serving gRPC on (\S+)")
            processes.append(process)
            servers[stage] = (process, url)
        rps: dict[str, list[float]] = {s: [] for s in stages}
        cpu_us: dict[str, list[float]] = {s: [] for s in stages}
        for _ in range(args.reps):
            for stage, (process, url) in servers.items():
                c0 = cpu_seconds(process.pid)
                r = load(loadgen, url, args.clients, args.duration, "raw")
                # loadgen's 1 s warm-up runs at the same rate: CPU over warm-up + duration
                cpu = cpu_seconds(process.pid) - c0
                rps[stage].append(r["rps"])
                cpu_us[stage].append(round(cpu / (r["rps"] * (args.duration + 1.0)) * 1e6, 1))
        summary: dict[str, Any] = {"loop": args.loop, "clients": args.clients, "reps": args.reps, "stages": {}}
        previous = None
        for stage in stages:
            med = statistics.median(cpu_us[stage])
            entry = {"rps": rps[stage], "rps_median": statistics.median(rps[stage]), "cpu_us_per_request": cpu_us[stage],
                     "cpu_us_median": med}  # fmt: skip
            if stage == "ort-ident":
                entry["delta_us_vs_decode"] = (
                    round(med - statistics.median(cpu_us["decode"]), 1) if "decode" in stages else None
                )
            else:
                entry["delta_us"] = round(med - previous, 1) if previous is not None else None
                previous = med
            summary["stages"][stage] = entry
        print(json.dumps(summary, indent=1))
        print(f"\n| stage | requests/s ({args.clients} clients), median | server CPU µs/request | added by the step |")
        print("|---|---|---|---|")
        for stage, e in summary["stages"].items():
            delta = e.get("delta_us", e.get("delta_us_vs_decode"))
            added = "" if delta is None else f"{delta:+.0f}" + (" (vs decode)" if stage == "ort-ident" else "")
            print(f"| {stage} | {e['rps_median']:.0f} | {e['cpu_us_median']:.0f} | {added} |")
    finally:
        for process in processes:
            process.terminate()


if __name__ == "__main__":
    main()

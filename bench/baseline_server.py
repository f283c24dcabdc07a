"""A do-nothing Open Inference Protocol server: the ceiling any Python gRPC gateway is measured against.

grpc.aio (default) or, with --sync, grpcio's synchronous server with a ThreadPoolExecutor(8); the
same generated stubs as onnxgate; ModelInfer answers a pre-built response without looking at the
request. Prints `baseline: serving gRPC on HOST:PORT` once bound.

    python bench/baseline_server.py --port 0 [--sync]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np

from onnxgate.server.pb import grpc_service_pb2 as pb
from onnxgate.server.pb import grpc_service_pb2_grpc as pb_grpc


def prebuilt_response() -> pb.ModelInferResponse:
    # the shape of what onnxgate answers for a classifier: a label and class probabilities
    return pb.ModelInferResponse(
        model_name="rf",
        model_version="1",
        outputs=[
            pb.ModelInferResponse.InferOutputTensor(name="label", datatype="INT64", shape=[1]),
            pb.ModelInferResponse.InferOutputTensor(name="probabilities", datatype="FP32", shape=[1, 2]),
        ],
        raw_output_contents=[np.zeros(1, np.int64).tobytes(), np.zeros(2, np.float32).tobytes()],
    )


class DoNothing(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self) -> None:
        self.response = prebuilt_response()

    async def ModelInfer(self, request: pb.ModelInferRequest, context: object) -> pb.ModelInferResponse:
        return self.response


class SyncDoNothing(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self) -> None:
        self.response = prebuilt_response()

    def ModelInfer(self, request: pb.ModelInferRequest, context: object) -> pb.ModelInferResponse:
        return self.response


def serve_sync(port: int) -> None:
    server = grpc.server(ThreadPoolExecutor(8))
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(SyncDoNothing(), server)  # type: ignore[no-untyped-call]
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    print(f"baseline: serving gRPC on 127.0.0.1:{bound} (sync)", file=sys.stderr, flush=True)
    server.wait_for_termination()


async def serve_aio(port: int) -> None:
    server = grpc.aio.server()
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(DoNothing(), server)  # type: ignore[no-untyped-call]
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print(f"baseline: serving gRPC on 127.0.0.1:{bound}", file=sys.stderr, flush=True)
    await server.wait_for_termination()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--sync", action="store_true", help="grpc.server with a ThreadPoolExecutor(8)")
    args = ap.parse_args()
    if args.sync:
        serve_sync(args.port)
    else:
        asyncio.run(serve_aio(args.port))


if __name__ == "__main__":
    main()

"""A do-nothing Open Inference Protocol server: the ceiling any Python gRPC gateway is measured against.

grpc.aio (default) or, with --sync, grpcio's synchronous server with a ThreadPoolExecutor(8); the
same generated stubs as onnxgate. ModelInfer reads only the first input's row count
(`request.inputs[0].shape[0]`, no tensor decoding) and answers a pre-built response of that many rows
(a label and two class probabilities per row, like onnxgate's classifiers), built on the first request
of each row count and cached: a 256-row request gets a 256-row answer, so the floor carries the same
response bytes as a real server. Prints `baseline: serving gRPC on HOST:PORT` once bound.

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


def prebuilt_response(rows: int) -> pb.ModelInferResponse:
    # the shape of what onnxgate answers for a classifier: a label and class probabilities per row
    return pb.ModelInferResponse(
        model_name="rf",
        model_version="1",
        outputs=[
            pb.ModelInferResponse.InferOutputTensor(name="label", datatype="INT64", shape=[rows]),
            pb.ModelInferResponse.InferOutputTensor(name="probabilities", datatype="FP32", shape=[rows, 2]),
        ],
        raw_output_contents=[np.zeros(rows, np.int64).tobytes(), np.zeros(rows * 2, np.float32).tobytes()],
    )


class Responses:
    """Pre-built responses by row count. Under the sync server two threads may build the same one at once;
    both are identical, so the race costs one extra build and nothing else."""

    def __init__(self) -> None:
        self.by_rows: dict[int, pb.ModelInferResponse] = {}

    def answer(self, request: pb.ModelInferRequest) -> pb.ModelInferResponse:
        rows = request.inputs[0].shape[0] if request.inputs and request.inputs[0].shape else 1
        response = self.by_rows.get(rows)
        if response is None:
            response = self.by_rows[rows] = prebuilt_response(rows)
        return response


class DoNothing(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self) -> None:
        self.responses = Responses()

    async def ModelInfer(self, request: pb.ModelInferRequest, context: object) -> pb.ModelInferResponse:
        return self.responses.answer(request)


class SyncDoNothing(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self) -> None:
        self.responses = Responses()

    def ModelInfer(self, request: pb.ModelInferRequest, context: object) -> pb.ModelInferResponse:
        return self.responses.answer(request)


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

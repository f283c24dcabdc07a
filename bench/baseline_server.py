"""A do-nothing Open Inference Protocol server: the ceiling any Python gRPC gateway is measured against.

grpc.aio, the same generated stubs as onnxgate; ModelInfer answers a pre-built response without
looking at the request. Prints `baseline: serving gRPC on HOST:PORT` once bound.

    python bench/baseline_server.py --port 0
"""

from __future__ import annotations

import argparse
import asyncio
import sys

import grpc
import numpy as np

from onnxgate.server.pb import grpc_service_pb2 as pb
from onnxgate.server.pb import grpc_service_pb2_grpc as pb_grpc


class DoNothing(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self) -> None:
        # the shape of what onnxgate answers for a classifier: a label and class probabilities
        self.response = pb.ModelInferResponse(
            model_name="rf",
            model_version="1",
            outputs=[
                pb.ModelInferResponse.InferOutputTensor(name="label", datatype="INT64", shape=[1]),
                pb.ModelInferResponse.InferOutputTensor(name="probabilities", datatype="FP32", shape=[1, 2]),
            ],
            raw_output_contents=[np.zeros(1, np.int64).tobytes(), np.zeros(2, np.float32).tobytes()],
        )

    async def ModelInfer(self, request: pb.ModelInferRequest, context: object) -> pb.ModelInferResponse:
        return self.response


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=0)
    args = ap.parse_args()
    server = grpc.aio.server()
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(DoNothing(), server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port(f"127.0.0.1:{args.port}")
    await server.start()
    print(f"baseline: serving gRPC on 127.0.0.1:{port}", file=sys.stderr, flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    asyncio.run(main())

"""Helpers of the end-to-end tests: a tiny classifier, and clients for inference and feedback."""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
import onnx
from onnx import TensorProto, helper

from onnxgate.server.pb import feedback_pb2 as fpb
from onnxgate.server.pb import feedback_pb2_grpc as fpb_grpc
from onnxgate.server.pb import grpc_service_pb2 as pb
from onnxgate.server.pb import grpc_service_pb2_grpc as pb_grpc
from tests.models import write_version


def argmax_model() -> onnx.ModelProto:
    """x FP32 [N, 4] -> label INT64 [N] = argmax(x), scores = x: a classifier with exact answers."""
    nodes = [
        helper.make_node("ArgMax", ["x"], ["label"], axis=1, keepdims=0),
        helper.make_node("Identity", ["x"], ["scores"]),
    ]
    graph = helper.make_graph(
        nodes,
        "argmax",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [
            helper.make_tensor_value_info("label", TensorProto.INT64, ["N"]),
            helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", 4]),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def argmax_repository(root: Path) -> Path:
    write_version(root, "argmax", 1, argmax_model())
    return root


def features(i: int) -> np.ndarray:
    """Row i: distinct values whose argmax is i % 4."""
    x = np.array([0.25 * i, 0.5, 1.5, -1.0], np.float32) / 1000.0
    x[i % 4] = 10.0 + i
    return x


class Clients:
    def __init__(self, address: str) -> None:
        self.channel = grpc.insecure_channel(address)
        self.infer_stub = pb_grpc.GRPCInferenceServiceStub(self.channel)
        self.feedback = fpb_grpc.FeedbackStub(self.channel)

    def infer(self, pid: str, x: np.ndarray, timeout: float = 10) -> pb.ModelInferResponse:
        tensor = pb.ModelInferRequest.InferInputTensor(name="x", datatype="FP32", shape=[1, 4])
        request = pb.ModelInferRequest(
            model_name="argmax", id=pid, inputs=[tensor], raw_input_contents=[x.reshape(1, 4).astype("<f4").tobytes()]
        )
        return self.infer_stub.ModelInfer(request, timeout=timeout)

    def send(self, pid: str, label: str, **kw: object) -> fpb.FeedbackResponse:
        return self.feedback.SendFeedback(fpb.FeedbackRequest(prediction_id=pid, label=label, **kw), timeout=10)

    def report(self, max_unknown_ids: int = 100, model: str = "") -> fpb.FeedbackReportResponse:
        return self.feedback.FeedbackReport(
            fpb.FeedbackReportRequest(model_name=model, max_unknown_ids=max_unknown_ids), timeout=30
        )

    def close(self) -> None:
        self.channel.close()


def label_of(response: pb.ModelInferResponse) -> int:
    index = [o.name for o in response.outputs].index("label")
    return int(np.frombuffer(response.raw_output_contents[index], "<i8")[0])

"""Tiny ONNX models built in code for the tests: each one exercises one part of the gateway."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from onnxgate.server.tensors import DATATYPES

ONNX_TYPES = {
    "BOOL": TensorProto.BOOL,
    "UINT8": TensorProto.UINT8,
    "UINT16": TensorProto.UINT16,
    "UINT32": TensorProto.UINT32,
    "UINT64": TensorProto.UINT64,
    "INT8": TensorProto.INT8,
    "INT16": TensorProto.INT16,
    "INT32": TensorProto.INT32,
    "INT64": TensorProto.INT64,
    "FP16": TensorProto.FLOAT16,
    "FP32": TensorProto.FLOAT,
    "FP64": TensorProto.DOUBLE,
    "BYTES": TensorProto.STRING,
}
NUMPY = {name: (d.numpy if d.numpy is not None else np.dtype(object)) for name, d in DATATYPES.items()}


def _model(graph: onnx.GraphProto, opset: int = 17) -> onnx.ModelProto:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def identity(datatype: str, width: int = 3) -> onnx.ModelProto:
    """x[N, width] of `datatype` -> y = x (and a second output n = x twice, for output subsets)."""
    t = ONNX_TYPES[datatype]
    nodes = [helper.make_node("Identity", ["x"], ["y"]), helper.make_node("Identity", ["x"], ["y2"])]
    graph = helper.make_graph(
        nodes,
        f"identity_{datatype.lower()}",
        [helper.make_tensor_value_info("x", t, ["N", width])],
        [helper.make_tensor_value_info("y", t, ["N", width]), helper.make_tensor_value_info("y2", t, ["N", width])],
    )
    return _model(graph)


def add_mul(scale: float = 2.0) -> onnx.ModelProto:
    """Two FP32 inputs a, b [N, 4] -> sum = a + b, scaled = a * scale: several inputs and outputs."""
    const = helper.make_tensor("scale", TensorProto.FLOAT, [1], [scale])
    nodes = [helper.make_node("Add", ["a", "b"], ["sum"]), helper.make_node("Mul", ["a", "scale"], ["scaled"])]
    graph = helper.make_graph(
        nodes,
        "add_mul",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", 4]) for n in ("a", "b")],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", 4]) for n in ("sum", "scaled")],
        initializer=[const],
    )
    return _model(graph)


def first_row_only() -> onnx.ModelProto:
    """Declares y[N, 2] but returns only the first row: a model that cannot be batched."""
    starts = helper.make_tensor("starts", TensorProto.INT64, [1], [0])
    ends = helper.make_tensor("ends", TensorProto.INT64, [1], [1])
    axes = helper.make_tensor("axes", TensorProto.INT64, [1], [0])
    graph = helper.make_graph(
        [helper.make_node("Slice", ["x", "starts", "ends", "axes"], ["y"])],
        "first_row",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])],
        initializer=[starts, ends, axes],
    )
    return _model(graph)


def matmul_square(size: int) -> onnx.ModelProto:
    """x[size, size] -> x @ x: slow enough to keep requests in flight."""
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "x"], ["y"])],
        "matmul",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [size, size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [size, size])],
    )
    return _model(graph)


def chained_matmul(size: int, steps: int) -> onnx.ModelProto:
    """x[size, size] -> y = h_steps, h_i = (h_{i-1} @ h_{i-1}) / size: all ones for ones, exactly, however
    many steps; slow by `steps` while the request and answer stay small."""
    scale = helper.make_tensor("scale", TensorProto.FLOAT, [], [1.0 / size])
    nodes = []
    for i in range(steps):
        h = "x" if i == 0 else f"h{i}"
        nodes.append(helper.make_node("MatMul", [h, h], [f"m{i + 1}"]))
        nodes.append(helper.make_node("Mul", [f"m{i + 1}", "scale"], ["y" if i + 1 == steps else f"h{i + 1}"]))
    graph = helper.make_graph(
        nodes,
        "chained_matmul",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [size, size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [size, size])],
        initializer=[scale],
    )
    return _model(graph)


def write_version(
    repo: Path, name: str, version: int, model: onnx.ModelProto | bytes, config: str | None = None
) -> Path:
    version_dir = repo / name / str(version)
    version_dir.mkdir(parents=True, exist_ok=True)
    data = model if isinstance(model, bytes) else model.SerializeToString()
    (version_dir / "model.onnx").write_bytes(data)
    if config is not None:
        (repo / name / "config.pbtxt").write_text(config)
    return version_dir


def typed_repository(repo: Path) -> Path:
    """An identity model per datatype (id_<datatype>), and add_mul in two versions (scale 2 and 3)."""
    for datatype in DATATYPES:
        write_version(repo, f"id_{datatype.lower()}", 1, identity(datatype))
    write_version(repo, "add_mul", 1, add_mul(2.0))
    write_version(repo, "add_mul", 2, add_mul(3.0))
    (repo / "add_mul" / "config.pbtxt").write_text("version_policy { all {} }\n")
    return repo

"""Small surgery on converted ONNX graphs, shared by every converter.

Each converting library names its outputs differently (`output_label`, `variable`, `predictions`),
some declare wrong output shapes (LightGBM's label as [1]) and some always wrap probabilities in a
ZipMap (a sequence of maps that no Open Inference Protocol datatype can carry). These helpers bring
every graph to the fixed names and shapes of `base.py` so the gateway serves them without guessing.
"""

from __future__ import annotations

import onnx
from onnx import TensorProto

from onnxgate.converters.base import ConversionError, TensorSpec

BATCH = "batch"

# ONNX element type -> Open Inference Protocol datatype (strings travel as BYTES)
_DATATYPES: dict[int, str] = {
    TensorProto.FLOAT: "FP32",
    TensorProto.DOUBLE: "FP64",
    TensorProto.FLOAT16: "FP16",
    TensorProto.BFLOAT16: "BF16",
    TensorProto.INT8: "INT8",
    TensorProto.INT16: "INT16",
    TensorProto.INT32: "INT32",
    TensorProto.INT64: "INT64",
    TensorProto.UINT8: "UINT8",
    TensorProto.UINT16: "UINT16",
    TensorProto.UINT32: "UINT32",
    TensorProto.UINT64: "UINT64",
    TensorProto.BOOL: "BOOL",
    TensorProto.STRING: "BYTES",
}


def datatype_of(elem_type: int) -> str:
    try:
        return _DATATYPES[elem_type]
    except KeyError:
        name = TensorProto.DataType.Name(elem_type)
        raise ConversionError(f"ONNX element type {name} has no Open Inference Protocol datatype") from None


def opsets(model: onnx.ModelProto) -> dict[str, int]:
    """Opset per domain, '' written as 'ai.onnx' so the report reads unambiguously."""
    return {(o.domain or "ai.onnx"): int(o.version) for o in model.opset_import}


def _value_info_spec(value: onnx.ValueInfoProto) -> TensorSpec:
    if not value.type.HasField("tensor_type"):
        kind = value.type.WhichOneof("value")
        raise ConversionError(
            f"graph value {value.name!r} is a {kind}, not a tensor; the gateway serves tensors only"
            " (a ZipMap output? convert with ZipMap disabled)"
        )
    tensor = value.type.tensor_type
    # a dimension without a fixed size (symbolic or unset) is served as -1 = any size
    shape = tuple(int(d.dim_value) if d.HasField("dim_value") else -1 for d in tensor.shape.dim)
    return TensorSpec(value.name, datatype_of(tensor.elem_type), shape)


def graph_inputs(model: onnx.ModelProto) -> list[TensorSpec]:
    # initializers may be listed as graph inputs in old IR versions; they are not fed by clients
    initializers = {i.name for i in model.graph.initializer}
    return [_value_info_spec(v) for v in model.graph.input if v.name not in initializers]


def graph_outputs(model: onnx.ModelProto) -> list[TensorSpec]:
    return [_value_info_spec(v) for v in model.graph.output]


def _rename_everywhere(graph: onnx.GraphProto, old: str, new: str) -> None:
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name == old:
                node.input[i] = new
        for i, name in enumerate(node.output):
            if name == old:
                node.output[i] = new
    for collection in (graph.input, graph.output, graph.value_info):
        for value in collection:
            if value.name == old:
                value.name = new
    for init in graph.initializer:
        if init.name == old:
            init.name = new


def rename(model: onnx.ModelProto, mapping: dict[str, str]) -> None:
    """Rename graph inputs/outputs (and every reference to them) in place."""
    existing = {v.name for v in model.graph.input} | {v.name for v in model.graph.output}
    for node in model.graph.node:
        existing.update(node.output)
    for old, new in mapping.items():
        if old == new:
            continue
        if new in existing:
            # renaming onto a name in use would silently join two tensors: move the other one aside
            _rename_everywhere(model.graph, new, f"{new}__renamed")
        _rename_everywhere(model.graph, old, new)
        existing.add(new)


def strip_zipmap(model: onnx.ModelProto) -> None:
    """Serve probabilities as an FP32 [batch, classes] tensor instead of ZipMap's sequence of maps.

    The ZipMap's input is the probability tensor; it takes over the ZipMap output's name, so the
    graph keeps the output names its producer gave it.
    """
    graph = model.graph
    for node in [n for n in graph.node if n.op_type == "ZipMap"]:
        source, target = node.input[0], node.output[0]
        n_classes = max(len(_attr_list(node, "classlabels_int64s")), len(_attr_list(node, "classlabels_strings")))
        graph.node.remove(node)
        if any(v.name == source for v in graph.output):
            # the probability tensor is already served under its own name: just drop the ZipMap output
            for value in [v for v in graph.output if v.name == target]:
                graph.output.remove(value)
            continue
        _rename_everywhere(graph, source, target)
        for index, value in enumerate(graph.output):
            if value.name == target:
                tensor = onnx.helper.make_tensor_value_info(target, TensorProto.FLOAT, [BATCH, n_classes or None])
                graph.output.remove(value)
                graph.output.insert(index, tensor)
                break


def _attr_list(node: onnx.NodeProto, name: str) -> list[object]:
    for attr in node.attribute:
        if attr.name == name:
            return list(onnx.helper.get_attribute_value(attr))
    return []


def append_softmax(model: onnx.ModelProto, output: str) -> None:
    """Make graph output `output` the softmax (over axis 1) of what it was."""
    raw = f"{output}__raw"
    _rename_everywhere(model.graph, output, raw)
    for value in model.graph.output:
        if value.name == raw:
            value.name = output
    model.graph.node.append(onnx.helper.make_node("Softmax", [raw], [output], axis=1, name=f"{output}_softmax"))
    if not any(o.domain in ("", "ai.onnx") for o in model.opset_import):
        # graphs of ai.onnx.ml operators alone import no default domain; Softmax (13+) needs one
        model.opset_import.append(onnx.helper.make_opsetid("", 15))


def set_batch_dims(model: onnx.ModelProto, trailing: dict[str, tuple[int, ...]] | None = None) -> None:
    """Make the first dimension of every graph input and output symbolic ('batch').

    Converters sometimes declare fixed or wrong batch sizes (LightGBM: label [1]); onnxruntime
    then warns on every call and the gateway would advertise a wrong shape. `trailing` overrides
    the dimensions after the batch for the named values.
    """
    trailing = trailing or {}
    for value in list(model.graph.input) + list(model.graph.output):
        if not value.type.HasField("tensor_type"):
            continue
        shape = value.type.tensor_type.shape
        rest = trailing.get(value.name)
        if rest is not None:
            del shape.dim[:]
            shape.dim.add().dim_param = BATCH
            for size in rest:
                dim = shape.dim.add()
                if size >= 0:
                    dim.dim_value = size
                else:
                    dim.dim_param = f"{value.name}_dim{len(shape.dim) - 1}"
        elif len(shape.dim) > 0:
            shape.dim[0].Clear()
            shape.dim[0].dim_param = BATCH


def check(model: onnx.ModelProto) -> None:
    try:
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as error:
        raise ConversionError(f"the ONNX graph is invalid: {error}") from error

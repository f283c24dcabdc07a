"""ONNX files made anywhere else (ML.NET, MATLAB, Julia, hand-built graphs, ...): checked, then published.

The file is the original model here, so the parity reference is an independent implementation of
the same graph: onnx's reference evaluator (pure Python, written from the operator specs). Where it
lacks an operator, onnxruntime with every graph optimisation disabled stands in, which still catches
graphs whose optimised and unoptimised results differ. A ZipMap output (a sequence of maps, which no
inference protocol datatype carries) is replaced by its probability tensor; input and output names
are kept, since clients of a model built elsewhere already know them.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from onnxgate.converters import graph
from onnxgate.converters.base import Conversion, ConversionError, ConvertOptions, Rows

_LABELLED_OPS = ("TreeEnsembleClassifier", "LinearClassifier", "SVMClassifier", "ZipMap")


def load(path: Path) -> onnx.ModelProto:
    try:
        model = onnx.load(str(path))  # also reads external data files lying beside it
    except Exception as error:  # protobuf's DecodeError and onnx's own errors for truncated files
        raise ConversionError(f"{path.name} is not a readable ONNX model: {type(error).__name__}: {error}") from error
    if not model.graph.node:
        raise ConversionError(f"{path.name} holds no ONNX graph (not an ONNX model, or an empty one)")
    return model


def _reference(model: onnx.ModelProto, notes: list[str]) -> tuple[list[str], Callable[[Rows], Any]]:
    """A callable feeds -> outputs that is not onnxruntime's optimised path."""
    names = [o.name for o in model.graph.output]
    try:
        from onnx.reference import ReferenceEvaluator

        evaluator = ReferenceEvaluator(model)
        notes.append("parity reference: onnx.reference.ReferenceEvaluator")
        return names, lambda feeds: evaluator.run(None, feeds)
    except Exception as error:  # an operator it does not implement, typically a contrib op
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        notes.append(f"parity reference: onnxruntime without graph optimisations (reference evaluator: {error})")
        return names, lambda feeds: session.run(names, feeds)


def convert(source: str, options: ConvertOptions) -> Conversion:
    import onnxruntime

    path = Path(source)
    model = load(path)
    notes: list[str] = [f"producer {model.producer_name or 'unknown'} {model.producer_version}".strip()]
    if any(n.op_type == "ZipMap" for n in model.graph.node):
        graph.strip_zipmap(model)
        notes.append("ZipMap removed: probabilities are served as a tensor")
    graph.check(model)
    inputs, outputs = graph.graph_inputs(model), graph.graph_outputs(model)
    labelled = [n for n in model.graph.node if n.op_type in _LABELLED_OPS]
    if labelled:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in labelled[0].attribute}
        classes = attrs.get("classlabels_strings") or attrs.get("classlabels_int64s") or []
        notes.append(f"class labels in the graph: {[c.decode() if isinstance(c, bytes) else c for c in classes]}")
    names, reference = _reference(model, notes)

    def predict_native(rows: Rows) -> Rows:
        results = reference(rows)
        return {name: np.asarray(value) for name, value in zip(names, results, strict=True)}

    return Conversion(
        model=model,
        inputs=inputs,
        outputs=outputs,
        task="other",
        framework="onnx",
        predict_native=predict_native,
        library_versions={"onnxruntime": onnxruntime.__version__},
        notes=notes,
    )

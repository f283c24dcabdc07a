"""LightGBM text model files (Booster.save_model, the `lightgbm` CLI, R's lgb.save) via onnxmltools.

onnxmltools declares the label output with a fixed size of 1; the shapes are rewritten to a free
batch dimension so the gateway advertises what onnxruntime actually returns.
"""

from __future__ import annotations

from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from onnxgate.converters import graph
from onnxgate.converters.base import (
    LABEL,
    PREDICTION,
    PROBABILITIES,
    Conversion,
    ConversionError,
    ConvertOptions,
    MissingDependency,
    Rows,
    TensorSpec,
    require,
)

TARGET_OPSET = 15  # the highest onnxmltools 1.16 writes beside onnx 1.17+

_CLASSIFIERS = ("binary", "multiclass", "multiclassova")
_REGRESSORS = ("regression", "regression_l1", "huber", "fair", "quantile", "mape", "poisson", "gamma", "tweedie")


def _lightgbm() -> Any:
    return require("lightgbm")


def load(path: Path) -> Any:
    lightgbm = _lightgbm()
    with open(path, "rb") as handle:
        head = handle.read(64)
    if not head.lstrip().startswith(b"tree"):
        raise ConversionError(f"{path.name} is not a LightGBM text model file (it should start with 'tree')")
    try:
        return lightgbm.Booster(model_file=str(path))
    except lightgbm.basic.LightGBMError as error:
        raise ConversionError(f"{path.name} is not a readable LightGBM model: {error}") from error


def _objective(booster: Any) -> str:
    # "binary sigmoid:1", "multiclass num_class:3", "regression": the first word names it
    return str(booster.dump_model(num_iteration=0).get("objective", "")).split(" ")[0]


def from_booster(booster: Any, options: ConvertOptions, classes: Any = None) -> Conversion:
    lightgbm = _lightgbm()
    try:
        from onnxmltools.convert import convert_lightgbm
        from onnxmltools.convert.common.data_types import FloatTensorType
    except ImportError as error:
        raise MissingDependency("onnxmltools", "converters") from error

    objective = _objective(booster)
    if objective not in _CLASSIFIERS + _REGRESSORS:
        raise ConversionError(f"LightGBM objective {objective!r} is not supported (ranking, cross-entropy, ...)")
    classifier = objective in _CLASSIFIERS
    n_features = int(booster.num_feature())
    n_classes = max(int(booster.num_model_per_iteration()), 2) if classifier else 0
    try:
        model = convert_lightgbm(
            booster,
            initial_types=[("input", FloatTensorType([None, n_features]))],
            target_opset=TARGET_OPSET,
            zipmap=False,
        )
    except Exception as error:  # onnxmltools raises several types for what it cannot map
        raise ConversionError(
            f"onnxmltools cannot convert this LightGBM model: {type(error).__name__}: {error}"
        ) from error

    label_values = list(classes) if classes is not None else list(range(n_classes))
    produced = [o.name for o in model.graph.output]
    if classifier:
        graph.rename(model, {produced[0]: LABEL, produced[1]: PROBABILITIES})
        graph.set_batch_dims(model, {"input": (n_features,), LABEL: (), PROBABILITIES: (n_classes,)})
    else:
        graph.rename(model, {produced[0]: PREDICTION})
        graph.set_batch_dims(model, {"input": (n_features,), PREDICTION: (1,)})
    graph.check(model)
    if classifier and [str(v) for v in label_values] != [str(i) for i in range(n_classes)]:
        raise ConversionError(
            "this LightGBM classifier's wrapper maps labels other than 0..C-1; the ONNX graph would answer with"
            " class indices: save the booster as a text file and map the labels in the client"
        )

    def predict_native(rows: Rows) -> Rows:
        raw = np.asarray(booster.predict(rows["input"]))
        if not classifier:
            return {PREDICTION: raw.reshape(len(raw), -1)}
        probabilities = np.stack([1.0 - raw, raw], axis=1) if raw.ndim == 1 else raw
        return {LABEL: np.argmax(probabilities, axis=1), PROBABILITIES: probabilities}

    return Conversion(
        model=model,
        inputs=[TensorSpec("input", "FP32", (-1, n_features))],
        outputs=graph.graph_outputs(model),
        task="classification" if classifier else "regression",
        framework="lightgbm",
        predict_native=predict_native,
        labels=[str(v) for v in label_values] if classifier else None,
        library_versions={"lightgbm": lightgbm.__version__, "onnxmltools": metadata.version("onnxmltools")},
        notes=[f"objective {objective}"],
    )


def convert(source: str, options: ConvertOptions) -> Conversion:
    return from_booster(load(Path(source)), options)

"""XGBoost model files (.json, .ubj) via onnxmltools.

The files are the same whichever binding wrote them (Python, R, JVM, the C++ command line), so one
Booster loader serves all. Two traps handled here: onnxmltools refuses boosters with feature names
that are not f0, f1, ... (they are dropped: the ONNX input is one FP32 matrix in feature order),
and xgboost 3.x cannot read the legacy binary format that older releases (and Debian's 1.7 CLI by
default) write - that gets an error saying how to re-save the model as JSON.
"""

from __future__ import annotations

import json
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

# onnxmltools 1.16 maps onnx 1.17+ to opset 15 at most; 15 is what it writes reliably
TARGET_OPSET = 15

_CLASSIFIERS = ("binary:logistic", "multi:softprob", "multi:softmax")
_REGRESSORS = (
    "reg:squarederror",
    "reg:squaredlogerror",
    "reg:pseudohubererror",
    "reg:absoluteerror",
    "reg:logistic",
    "reg:gamma",
    "reg:tweedie",
    "count:poisson",
    "reg:quantileerror",
)


def _xgboost() -> Any:
    return require("xgboost", "xgboost-cpu")


def load(path: Path) -> Any:
    xgboost = _xgboost()
    data = path.read_bytes()
    if data.startswith(b"binf") or not data.lstrip().startswith(b"{"):
        raise ConversionError(
            f"{path.name}: not an XGBoost JSON or UBJSON model. Files in XGBoost's legacy binary format (older"
            " releases; Debian's xgboost 1.7 command line unless model_out ends in .json) cannot be read by"
            " xgboost 3.x: re-save the model as JSON (command line: model_out=NAME.json; Python/R: save_model"
            " with a .json file name)"
        )
    booster = xgboost.Booster()
    try:
        # from memory, xgboost tells JSON from UBJSON by content, whatever the file is called
        booster.load_model(bytearray(data))
    except xgboost.core.XGBoostError as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else "unreadable"
        raise ConversionError(f"{path.name} is not a readable XGBoost model: {first}") from error
    return booster


def _objective(booster: Any) -> tuple[str, int, int]:
    """(objective, number of features, number of classes) from the booster's saved configuration."""
    config = json.loads(booster.save_config())
    learner = config["learner"]
    objective = str(learner["objective"]["name"])
    params = learner["learner_model_param"]
    return objective, int(params["num_feature"]), int(params.get("num_class", "0"))


def _native(booster: Any, objective: str, n_classes: int, label_values: list[Any]) -> Any:
    xgboost = _xgboost()

    def predict_native(rows: Rows) -> Rows:
        matrix = xgboost.DMatrix(rows["input"])
        if objective.startswith("reg:") or objective.startswith("count:"):
            return {PREDICTION: booster.predict(matrix).reshape(len(rows["input"]), -1)}
        if objective == "multi:softmax":
            margins = booster.predict(matrix, output_margin=True).reshape(-1, n_classes)
            exp = np.exp(margins - margins.max(axis=1, keepdims=True))
            probabilities = exp / exp.sum(axis=1, keepdims=True)
        elif objective == "binary:logistic":
            positive = booster.predict(matrix).reshape(-1)
            probabilities = np.stack([1.0 - positive, positive], axis=1)
        else:
            probabilities = booster.predict(matrix).reshape(-1, n_classes)
        labels = np.asarray(label_values)[np.argmax(probabilities, axis=1)]
        return {LABEL: labels, PROBABILITIES: probabilities}

    return predict_native


def from_booster(booster: Any, options: ConvertOptions, classes: Any = None) -> Conversion:
    """Convert a loaded Booster; `classes` are the labels of a scikit-learn wrapper (default 0..C-1)."""
    xgboost = _xgboost()
    try:
        from onnxmltools.convert import convert_xgboost
        from onnxmltools.convert.common.data_types import FloatTensorType
    except ImportError as error:
        raise MissingDependency("onnxmltools", "converters") from error

    objective, n_features, n_classes = _objective(booster)
    if objective not in _CLASSIFIERS + _REGRESSORS:
        raise ConversionError(f"XGBoost objective {objective!r} is not supported (ranking, survival, ...)")
    classifier = objective in _CLASSIFIERS
    n_classes = max(n_classes, 2) if classifier else 0
    notes = []
    columns = list(booster.feature_names or []) or None
    if booster.feature_names:
        notes.append(f"feature names dropped for ONNX, the input columns are in this order: {booster.feature_names}")
        booster = booster.copy()
        booster.feature_names = None
        booster.feature_types = None
    try:
        model = convert_xgboost(
            booster, initial_types=[("input", FloatTensorType([None, n_features]))], target_opset=TARGET_OPSET
        )
    except Exception as error:  # onnxmltools raises RuntimeError, AttributeError, ... on what it cannot map
        raise ConversionError(
            f"onnxmltools cannot convert this XGBoost model: {type(error).__name__}: {error}"
        ) from error

    produced = [o.name for o in model.graph.output]
    label_values = list(classes) if classes is not None else list(range(n_classes))
    if classifier:
        graph.strip_zipmap(model)
        produced = [o.name for o in model.graph.output]
        graph.rename(model, {produced[0]: LABEL, produced[1]: PROBABILITIES})
        if objective == "multi:softmax":
            # onnxmltools leaves multi:softmax margins untransformed (the parity check caught it):
            # the served probabilities are their softmax, as for multi:softprob
            graph.append_softmax(model, PROBABILITIES)
        graph.set_batch_dims(model, {"input": (n_features,), LABEL: (), PROBABILITIES: (n_classes,)})
        if classes is not None and [str(c) for c in classes] != [str(i) for i in range(n_classes)]:
            raise ConversionError(
                "this XGBoost classifier was trained on encoded labels other than 0..C-1; convert the booster saved"
                " as .json and map the labels in the client"
            )
    else:
        graph.rename(model, {produced[0]: PREDICTION})
        graph.set_batch_dims(model, {"input": (n_features,), PREDICTION: (1,)})
    graph.check(model)
    return Conversion(
        model=model,
        inputs=[TensorSpec("input", "FP32", (-1, n_features))],
        outputs=graph.graph_outputs(model),
        task="classification" if classifier else "regression",
        framework="xgboost",
        predict_native=_native(booster, objective, n_classes, label_values),
        labels=[str(v) for v in label_values] if classifier else None,
        library_versions={"xgboost": xgboost.__version__, "onnxmltools": metadata.version("onnxmltools")},
        notes=[f"objective {objective}", *notes],
        input_columns=columns,
    )


def convert(source: str, options: ConvertOptions) -> Conversion:
    return from_booster(load(Path(source)), options)

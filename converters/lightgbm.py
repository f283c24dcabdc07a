"""LightGBM text model files (Booster.save_model, the `lightgbm` CLI, R's lgb.save) via onnxmltools.

onnxmltools declares the label output with a fixed size of 1; the shapes are rewritten to a free
batch dimension so the gateway advertises what onnxruntime actually returns.

A model trained on a pandas DataFrame with category columns keeps the categories in the model file
(`pandas_categorical`); the trees split on their codes. The served model takes one input per column,
the categorical ones as BYTES: a LabelEncoder inside the graph maps each category string to its code
(an unknown category to NaN, as pandas' code -1 reaches LightGBM), so clients send the strings.
"""

from __future__ import annotations

import math
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper

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
    categorical = _categorical_columns(booster)
    if categorical:
        _strings_to_codes(model, booster.feature_name(), categorical)
    graph.check(model)
    if classifier and [str(v) for v in label_values] != [str(i) for i in range(n_classes)]:
        raise ConversionError(
            "this LightGBM classifier's wrapper maps labels other than 0..C-1; the ONNX graph would answer with"
            " class indices: save the booster as a text file and map the labels in the client"
        )

    def predict_native(rows: Rows) -> Rows:
        raw = np.asarray(booster.predict(_native_frame(rows, booster.feature_name(), categorical)))
        if not classifier:
            return {PREDICTION: raw.reshape(len(raw), -1)}
        probabilities = np.stack([1.0 - raw, raw], axis=1) if raw.ndim == 1 else raw
        return {LABEL: np.argmax(probabilities, axis=1), PROBABILITIES: probabilities}

    inputs = [TensorSpec("input", "FP32", (-1, n_features))]
    notes = [f"objective {objective}"]
    if categorical:
        inputs = [
            TensorSpec(name, "BYTES" if name in categorical else "FP32", (-1, 1)) for name in booster.feature_name()
        ]
        notes.append(
            f"categorical columns {', '.join(categorical)}: BYTES inputs of their pandas categories (from the"
            " model file's pandas_categorical), mapped to codes in the graph; an unknown category counts as missing"
        )
    names = [str(n) for n in booster.feature_name()]
    generic = [f"Column_{i}" for i in range(len(names))]  # what LightGBM calls the columns of an array
    return Conversion(
        model=model,
        inputs=inputs,
        outputs=graph.graph_outputs(model),
        task="classification" if classifier else "regression",
        framework="lightgbm",
        predict_native=predict_native,
        labels=[str(v) for v in label_values] if classifier else None,
        library_versions={"lightgbm": lightgbm.__version__, "onnxmltools": metadata.version("onnxmltools")},
        notes=notes,
        make_sample=_categorical_sample(booster, categorical) if categorical else None,
        input_columns=None if categorical or names == generic else names,
        column_inputs=bool(categorical),
        categories=categorical,
    )


def _categorical_columns(booster: Any) -> dict[str, list[str]]:
    """Column name -> its pandas categories, in code order, for the columns trained as pandas categories."""
    categories = getattr(booster, "pandas_categorical", None) or []
    if not categories:
        return {}
    infos = booster.dump_model(num_iteration=0).get("feature_infos", {})
    names = booster.feature_name()
    # categorical features list the values they saw; pandas_categorical follows their column order
    found = [name for name in names if infos.get(name, {}).get("values")]
    if len(found) != len(categories):
        raise ConversionError(
            f"this LightGBM model lists {len(categories)} pandas category columns but {len(found)} categorical"
            " features: the model file is inconsistent"
        )
    return {name: [str(c) for c in known] for name, known in zip(found, categories, strict=True)}


def _strings_to_codes(model: onnx.ModelProto, names: list[str], categorical: dict[str, list[str]]) -> None:
    """Replace the [N, F] float input by one input per column, category strings mapped to their codes."""
    nodes: list[onnx.NodeProto] = []
    columns: list[str] = []
    inputs: list[onnx.ValueInfoProto] = []
    for name in names:
        if name in categorical:
            inputs.append(helper.make_tensor_value_info(name, TensorProto.STRING, [graph.BATCH, 1]))
            code = f"{name}__code"
            known = categorical[name]
            nodes.append(
                helper.make_node(
                    "LabelEncoder",
                    [name],
                    [code],
                    domain="ai.onnx.ml",
                    name=f"{name}_codes",
                    keys_strings=known,
                    values_floats=[float(i) for i in range(len(known))],
                    default_float=math.nan,
                )
            )
            columns.append(code)
        else:
            inputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, [graph.BATCH, 1]))
            columns.append(name)
    nodes.append(helper.make_node("Concat", columns, ["input"], axis=1, name="columns_to_features"))
    del model.graph.input[:]
    model.graph.input.extend(inputs)
    existing = list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(nodes + existing)
    for opset in model.opset_import:
        if opset.domain == "ai.onnx.ml" and opset.version < 2:
            opset.version = 2  # LabelEncoder's values_floats; the tree ensembles are the same in 1 and 2


def _native_frame(rows: Rows, names: list[str], categorical: dict[str, list[str]]) -> Any:
    """The rows as LightGBM reads them: the matrix, or a DataFrame with pandas categories."""
    if not categorical:
        return rows["input"]
    import pandas as pd

    data: dict[str, Any] = {}
    for name in names:
        column = np.asarray(rows[name]).reshape(-1)
        if name in categorical:
            known = set(categorical[name])
            text = [v.decode() if isinstance(v, bytes) else str(v) for v in column]
            # an unknown category is missing (None), as pandas codes it -1 when a frame is recategorised
            data[name] = pd.Categorical([t if t in known else None for t in text], categories=categorical[name])
        else:
            data[name] = column.astype(np.float64)
    return pd.DataFrame(data, columns=names)


def _categorical_sample(booster: Any, categorical: dict[str, list[str]]) -> Any:
    infos = booster.dump_model(num_iteration=0).get("feature_infos", {})

    def make(n: int, rng: np.random.Generator) -> Rows:
        rows: Rows = {}
        for name in booster.feature_name():
            if name in categorical:
                rows[name] = np.array(rng.choice(categorical[name], size=(n, 1)), dtype=object)
            else:
                info = infos.get(name, {})
                low, high = float(info.get("min_value", -3.0)), float(info.get("max_value", 3.0))
                rows[name] = rng.uniform(low, high, size=(n, 1)).astype(np.float32)
        return rows

    return make


def convert(source: str, options: ConvertOptions) -> Conversion:
    return from_booster(load(Path(source)), options)

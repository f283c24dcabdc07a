"""scikit-learn estimators and pipelines (pickle or joblib files) via skl2onnx.

Inputs: one FP32 `input` [-1, F], or - when a ColumnTransformer reads columns by name and some of
them are categorical strings - one [-1, 1] tensor per column (strings as BYTES). A pickled XGBoost
or LightGBM scikit-learn wrapper is handed to that framework's converter.

Unpickling runs code from the file: convert only files you trust.
"""

from __future__ import annotations

from collections.abc import Iterator
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
)

# ai.onnx 17 + ai.onnx.ml 3: what skl2onnx writes reliably and every supported onnxruntime runs
# (IsolationForest needs ml opset 3, onnxruntime refuses some tree ensembles with float64 inputs)
TARGET_OPSET = {"": 17, "ai.onnx.ml": 3}


def load(path: Path) -> Any:
    try:
        import joblib
    except ImportError as error:
        raise MissingDependency("joblib", "converters") from error
    try:
        return joblib.load(path)
    except ModuleNotFoundError as error:
        raise ConversionError(
            f"{path.name}: unpickling needs the Python module {error.name!r}, which is not installed"
        ) from error
    except Exception as error:  # pickle raises many types for a corrupt file
        raise ConversionError(
            f"{path.name} is not a readable pickle/joblib file: {type(error).__name__}: {error}"
        ) from error


def _walk(estimator: Any) -> Iterator[Any]:
    """The estimator and every estimator nested in it (pipelines, column transformers, unions)."""
    yield estimator
    children: list[Any] = []
    if hasattr(estimator, "steps"):
        children = [step for _, step in estimator.steps]
    elif hasattr(estimator, "transformers_"):
        children = [t for _, t, _ in estimator.transformers_]
    elif hasattr(estimator, "transformer_list"):
        children = [t for _, t in estimator.transformer_list]
    for child in children:
        if not isinstance(child, str):  # 'drop' / 'passthrough'
            yield from _walk(child)


def _final(estimator: Any) -> Any:
    while hasattr(estimator, "steps"):
        estimator = estimator.steps[-1][1]
    return estimator


def _reads_strings(transformer: Any) -> bool:
    for part in _walk(transformer):
        categories = getattr(part, "categories_", None)
        if categories is not None and any(np.asarray(c).dtype.kind in "OUS" for c in categories):
            return True
        fill = getattr(part, "fill_value", None)
        if getattr(part, "strategy", None) == "constant" and isinstance(fill, str):
            return True
    return False


def _string_columns(model: Any) -> set[str]:
    names = [str(n) for n in getattr(model, "feature_names_in_", [])]
    found: set[str] = set()
    for part in _walk(model):
        for _, transformer, columns in getattr(part, "transformers_", []):
            if isinstance(transformer, str) or not _reads_strings(transformer):
                continue
            selected = np.asarray(columns).reshape(-1)
            if selected.dtype.kind == "b":
                selected = np.flatnonzero(selected)
            for column in selected.tolist():
                found.add(names[column] if isinstance(column, int) and column < len(names) else str(column))
    return found


def _input_specs(model: Any) -> tuple[list[TensorSpec], bool]:
    """The inputs, and whether they are per column (True) or one matrix (False)."""
    names = [str(n) for n in getattr(model, "feature_names_in_", [])]
    strings = _string_columns(model)
    if names and strings:
        return [TensorSpec(n, "BYTES" if n in strings else "FP32", (-1, 1)) for n in names], True
    n_features = getattr(model, "n_features_in_", None)
    if n_features is None:
        raise ConversionError(
            f"{type(model).__name__} does not record its number of input features (n_features_in_): is it fitted?"
        )
    return [TensorSpec("input", "FP32", (-1, int(n_features)))], False


def _initial_types(inputs: list[TensorSpec]) -> list[tuple[str, Any]]:
    from skl2onnx.common.data_types import FloatTensorType, StringTensorType

    return [
        (
            s.name,
            StringTensorType([None, *s.shape[1:]]) if s.datatype == "BYTES" else FloatTensorType([None, *s.shape[1:]]),
        )
        for s in inputs
    ]


def _native_frame(model: Any, rows: Rows, inputs: list[TensorSpec], per_column: bool) -> Any:
    """The rows as the estimator was trained on them: a DataFrame when it knows column names."""
    names = [str(n) for n in getattr(model, "feature_names_in_", [])]
    if not per_column and not names:
        return rows["input"].astype(np.float64)
    import pandas as pd

    if per_column:
        data = {s.name: rows[s.name][:, 0].astype(object if s.datatype == "BYTES" else np.float64) for s in inputs}
        return pd.DataFrame(data, columns=names)
    return pd.DataFrame(rows["input"].astype(np.float64), columns=names)


def _scales(model: Any, inputs: list[TensorSpec], per_column: bool) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per input, the training mean and scale a fitted StandardScaler recorded for its columns.

    Rows drawn around them look like the training data, so parity is checked where the model is used
    (standard-normal rows would sit far outside, e.g., an income column).
    """
    names = [str(n) for n in getattr(model, "feature_names_in_", [])]
    found: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    first = model.steps[0][1] if hasattr(model, "steps") else model
    if not per_column and getattr(first, "mean_", None) is not None and getattr(first, "scale_", None) is not None:
        found[inputs[0].name] = (np.asarray(first.mean_), np.asarray(first.scale_))
    for part in _walk(model):
        for _, transformer, columns in getattr(part, "transformers_", []):
            first = transformer.steps[0][1] if hasattr(transformer, "steps") else transformer
            mean, scale = getattr(first, "mean_", None), getattr(first, "scale_", None)
            if mean is None or scale is None:
                continue
            for i, column in enumerate(np.asarray(columns).reshape(-1).tolist()):
                name = names[column] if isinstance(column, int) and column < len(names) else str(column)
                found[name] = (np.asarray(mean[i : i + 1]), np.asarray(scale[i : i + 1]))
    return found


def _make_sample(model: Any, inputs: list[TensorSpec], per_column: bool) -> Any:
    """Rows like the training data: encoders' categories for strings, scalers' mean and scale for numbers."""
    categories: dict[str, list[str]] = {}
    names = [str(n) for n in getattr(model, "feature_names_in_", [])]
    for part in _walk(model):
        for _, transformer, columns in getattr(part, "transformers_", []):
            if isinstance(transformer, str):
                continue
            encoders = [p for p in _walk(transformer) if getattr(p, "categories_", None) is not None]
            selected = [names[c] if isinstance(c, int) else str(c) for c in np.asarray(columns).reshape(-1).tolist()]
            for encoder in encoders[:1]:
                for column, known in zip(selected, encoder.categories_, strict=False):
                    categories[column] = [str(v) for v in known if not (isinstance(v, float) and np.isnan(v))]
    scales = _scales(model, inputs, per_column)
    if not per_column and inputs[0].name not in scales:
        return None  # sample.from_signature does better (tree thresholds)

    def make(n: int, rng: np.random.Generator) -> Rows:
        rows: Rows = {}
        for spec in inputs:
            if spec.datatype == "BYTES":
                known = categories.get(spec.name) or ["a", "b"]
                rows[spec.name] = np.array(rng.choice(known, size=n), dtype=object).reshape(n, 1)
                continue
            mean, scale = scales.get(spec.name, (np.zeros(1), np.ones(1)))
            rows[spec.name] = (mean + scale * rng.normal(size=(n, spec.shape[1]))).astype(np.float32)
        return rows

    return make


def _delegate(model: Any, options: ConvertOptions) -> Conversion | None:
    """Pickled scikit-learn wrappers of XGBoost and LightGBM convert best as their boosters."""
    module = type(model).__module__
    if module.startswith("xgboost") and hasattr(model, "get_booster"):
        from onnxgate.converters import xgboost as xgb_converter

        return xgb_converter.from_booster(model.get_booster(), options, getattr(model, "classes_", None))
    if module.startswith("lightgbm") and hasattr(model, "booster_"):
        from onnxgate.converters import lightgbm as lgb_converter

        return lgb_converter.from_booster(model.booster_, options, getattr(model, "classes_", None))
    return None


def convert(source: str, options: ConvertOptions) -> Conversion:
    try:
        import sklearn
        from skl2onnx import convert_sklearn
    except ImportError as error:
        raise MissingDependency(error.name or "skl2onnx", "converters") from error
    from sklearn.base import is_classifier, is_regressor

    path = Path(source)
    model = load(path)
    delegated = _delegate(model, options)
    if delegated is not None:
        return delegated
    if not hasattr(model, "fit"):
        raise ConversionError(f"{path.name} holds a {type(model).__name__}, not a scikit-learn estimator")
    classifier, regressor = is_classifier(model), is_regressor(model)
    if not (classifier or regressor):
        raise ConversionError(
            f"{type(model).__name__}: only scikit-learn classifiers and regressors (and pipelines ending in one)"
            " are converted"
        )
    inputs, per_column = _input_specs(model)
    final = _final(model)
    conversion_options = {id(final): {"zipmap": False}} if classifier else None
    try:
        onnx_model = convert_sklearn(
            model,
            initial_types=_initial_types(inputs),
            target_opset=TARGET_OPSET,
            options=conversion_options,
        )
    except Exception as error:  # skl2onnx raises RuntimeError, MissingShapeCalculator, NotImplementedError, ...
        raise ConversionError(
            f"skl2onnx cannot convert {type(model).__name__} ({type(final).__name__}): {type(error).__name__}: {error}"
        ) from error

    produced = [o.name for o in onnx_model.graph.output]
    labels: list[str] | None = None
    if classifier:
        classes = np.asarray(final.classes_)
        labels = [str(c) for c in classes]
        graph.rename(onnx_model, {produced[0]: LABEL, produced[1]: PROBABILITIES})
        graph.set_batch_dims(onnx_model, {LABEL: (), PROBABILITIES: (len(classes),)})
    else:
        graph.rename(onnx_model, {produced[0]: PREDICTION})
        graph.set_batch_dims(onnx_model)
    graph.check(onnx_model)
    outputs = graph.graph_outputs(onnx_model)

    def predict_native(rows: Rows) -> Rows:
        frame = _native_frame(model, rows, inputs, per_column)
        if classifier:
            return {LABEL: np.asarray(model.predict(frame)), PROBABILITIES: np.asarray(model.predict_proba(frame))}
        return {PREDICTION: np.asarray(model.predict(frame))}

    return Conversion(
        model=onnx_model,
        inputs=inputs,
        outputs=outputs,
        task="classification" if classifier else "regression",
        framework="sklearn",
        predict_native=predict_native,
        labels=labels,
        make_sample=_make_sample(model, inputs, per_column),
        library_versions={
            "scikit-learn": sklearn.__version__,
            "skl2onnx": metadata.version("skl2onnx"),
        },
        # fitted on a DataFrame of numbers: one matrix input, whose columns the estimator still names
        input_columns=None if per_column else [str(n) for n in getattr(model, "feature_names_in_", [])] or None,
        # users call scikit-learn on float64 frames: parity runs it on the sample's numbers as given, as
        # serving compares with it (HistGradientBoosting keeps float64 thresholds; see parity.py)
        native_takes_given=True,
    )

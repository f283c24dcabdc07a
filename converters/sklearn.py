"""scikit-learn estimators and pipelines (pickle or joblib files) via skl2onnx.

Inputs: one FP32 `input` [-1, F], or - when a ColumnTransformer reads columns by name and some of
them are categorical strings - one [-1, 1] tensor per column (strings as BYTES). A pickled XGBoost
or LightGBM scikit-learn wrapper is handed to that framework's converter.

Clusterers (KMeans, MiniBatchKMeans: `label`, `distances`) and anomaly detectors (IsolationForest:
`label`, `score`) convert too. A SimpleImputer that fills string columns where they hold NaN (scikit-
learn's default `missing_values`) is converted as one whose missing value is the empty string, which
a BYTES tensor can carry: clients send "" for a missing string.

Unpickling runs code from the file: convert only files you trust.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from onnxgate.converters import graph
from onnxgate.converters.base import (
    DISTANCES,
    LABEL,
    PREDICTION,
    PROBABILITIES,
    SCORE,
    Conversion,
    ConversionError,
    ConvertOptions,
    MissingDependency,
    Rows,
    Task,
    TensorSpec,
)

# ai.onnx 17 + ai.onnx.ml 3: what skl2onnx writes reliably and every supported onnxruntime runs
# (IsolationForest needs ml opset 3, onnxruntime refuses some tree ensembles with float64 inputs)
TARGET_OPSET = {"": 17, "ai.onnx.ml": 3}
# how a served string input says "missing": scikit-learn's NaN has no BYTES form
MISSING_STRING = ""


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


def _missing_is_nan(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _is_string_imputer(part: Any) -> bool:
    """A fitted SimpleImputer of string columns whose missing value is NaN/None (skl2onnx wants a string)."""
    statistics = getattr(part, "statistics_", None)
    return (
        type(part).__name__ == "SimpleImputer"
        and statistics is not None
        and np.asarray(statistics).dtype.kind in "OUS"
        and _missing_is_nan(getattr(part, "missing_values", None))
    )


def _reads_strings(transformer: Any) -> bool:
    for part in _walk(transformer):
        if _is_string_imputer(part):
            return True
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


def _imputed_string_columns(model: Any) -> set[str]:
    """Input columns that reach a string SimpleImputer with NaN as its missing value."""
    names = [str(n) for n in getattr(model, "feature_names_in_", [])]
    found: set[str] = set()
    for part in _walk(model):
        for _, transformer, columns in getattr(part, "transformers_", []):
            if isinstance(transformer, str) or not any(_is_string_imputer(p) for p in _walk(transformer)):
                continue
            for column in np.asarray(columns).reshape(-1).tolist():
                found.add(names[column] if isinstance(column, int) and column < len(names) else str(column))
    return found


def _with_string_missing_values(model: Any) -> Any:
    """A copy of `model` whose string imputers take MISSING_STRING as missing instead of NaN.

    skl2onnx converts a string imputer only when its missing value is a string; a category equal to
    MISSING_STRING would then be imputed too, so such a model is refused.
    """
    imputers = [p for p in _walk(model) if _is_string_imputer(p)]
    if not imputers:
        return model
    for part in _walk(model):
        for known in getattr(part, "categories_", None) or []:
            if MISSING_STRING in [str(v) for v in known]:
                raise ConversionError(
                    f"{type(part).__name__} knows the empty string as a category, which the served model uses"
                    " for a missing string (SimpleImputer's NaN): replace empty strings in the training data"
                )
    rewritten = copy.deepcopy(model)
    for part in _walk(rewritten):
        if _is_string_imputer(part):
            part.missing_values = MISSING_STRING
    return rewritten


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
        for name in _imputed_string_columns(model) & set(data):
            # the served model's missing string is the original's NaN
            column = data[name]
            data[name] = np.array([np.nan if v == MISSING_STRING else v for v in column], dtype=object)
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
    imputed = _imputed_string_columns(model)
    centres = getattr(model, "cluster_centers_", None)
    if not per_column and inputs[0].name not in scales:
        if centres is not None:  # a bare KMeans: rows around its centres reach every cluster
            return _around(np.asarray(centres))
        return None  # sample.from_signature does better (tree thresholds)

    def make(n: int, rng: np.random.Generator) -> Rows:
        rows: Rows = {}
        for spec in inputs:
            if spec.datatype == "BYTES":
                known = categories.get(spec.name) or ["a", "b"]
                values = np.array(rng.choice(known, size=n), dtype=object)
                if spec.name in imputed:  # a fifth of the rows miss the value the imputer fills in
                    values[rng.random(n) < 0.2] = MISSING_STRING
                rows[spec.name] = values.reshape(n, 1)
                continue
            mean, scale = scales.get(spec.name, (np.zeros(1), np.ones(1)))
            rows[spec.name] = (mean + scale * rng.normal(size=(n, spec.shape[1]))).astype(np.float32)
        return rows

    return make


def _around(centres: np.ndarray) -> Any:
    spread = np.maximum(centres.std(axis=0), 1e-3)

    def make(n: int, rng: np.random.Generator) -> Rows:
        picked = centres[rng.integers(0, len(centres), size=n)]
        return {"input": (picked + 0.5 * spread * rng.normal(size=picked.shape)).astype(np.float32)}

    return make


def _task(model: Any, final: Any) -> Task:
    """What the estimator does, or a ConversionError that says what converts."""
    from sklearn.base import is_classifier, is_clusterer, is_outlier_detector, is_regressor

    if is_classifier(model):
        return "classification"
    if is_regressor(model):
        return "regression"
    if is_clusterer(final):
        if not (hasattr(final, "predict") and hasattr(final, "transform")):
            raise ConversionError(
                f"{type(final).__name__} assigns no cluster to new rows (no predict/transform): only clusterers"
                " with cluster centres (KMeans, MiniBatchKMeans) can be served"
            )
        return "clustering"
    if is_outlier_detector(final):
        if not hasattr(final, "decision_function"):
            raise ConversionError(
                f"{type(final).__name__} scores no new rows (no decision_function; LocalOutlierFactor needs"
                " novelty=True): IsolationForest converts"
            )
        return "anomaly"
    raise ConversionError(
        f"{type(model).__name__}: only scikit-learn classifiers, regressors, clusterers (KMeans) and anomaly"
        " detectors (IsolationForest), and pipelines ending in one, are converted"
    )


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


def _kmeans_by_differences(scope: Any, operator: Any, container: Any) -> None:
    """KMeans as sqrt(sum((x - c)^2)): skl2onnx expands it to |x|^2 - 2x.c + |c|^2, which loses every
    digit in float32 when the data sit far from zero (distances of 1 on values near 1000 came out 0.12
    apart); differences first keep them to float32's precision on the values."""
    from onnx import TensorProto

    centres = np.asarray(operator.raw_operator.cluster_centers_, dtype=np.float32)
    centres_name = scope.get_unique_variable_name("centres")
    container.add_initializer(centres_name, TensorProto.FLOAT, [1, *centres.shape], centres.ravel().tolist())
    axes = scope.get_unique_variable_name("axis1")
    container.add_initializer(axes, TensorProto.INT64, [1], [1])
    rows = scope.get_unique_variable_name("rows")
    container.add_node(
        "Unsqueeze", [operator.inputs[0].full_name, axes], rows, name=scope.get_unique_operator_name("U")
    )
    diff = scope.get_unique_variable_name("diff")
    container.add_node("Sub", [rows, centres_name], diff, name=scope.get_unique_operator_name("Sub"))
    squares = scope.get_unique_variable_name("squares")
    container.add_node(
        "ReduceSumSquare", [diff], squares, axes=[2], keepdims=0, name=scope.get_unique_operator_name("RSS")
    )
    distances = operator.outputs[1].full_name
    container.add_node("Sqrt", [squares], distances, name=scope.get_unique_operator_name("Sqrt"))
    container.add_node(
        "ArgMin",
        [distances],
        operator.outputs[0].full_name,
        axis=1,
        keepdims=0,
        name=scope.get_unique_operator_name("ArgMin"),
    )


def _flatten_outputs(model: Any, names: list[str]) -> None:
    """Reshape graph outputs `names` from [N, 1] to [N]."""
    from onnx import helper, numpy_helper

    shape = f"{names[0]}__flat_shape"
    model.graph.initializer.append(numpy_helper.from_array(np.array([-1], dtype=np.int64), shape))
    for name in names:
        raw = f"{name}__column"
        for node in model.graph.node:
            node.output[:] = [raw if o == name else o for o in node.output]
            node.input[:] = [raw if i == name else i for i in node.input]
        model.graph.node.append(helper.make_node("Reshape", [raw, shape], [name], name=f"{name}_flatten"))
        for value in model.graph.output:
            if value.name == name:
                del value.type.tensor_type.shape.dim[1:]


def convert(source: str, options: ConvertOptions) -> Conversion:
    try:
        import sklearn
        from skl2onnx import convert_sklearn
    except ImportError as error:
        raise MissingDependency(error.name or "skl2onnx", "converters") from error
    path = Path(source)
    model = load(path)
    delegated = _delegate(model, options)
    if delegated is not None:
        return delegated
    if not hasattr(model, "fit"):
        raise ConversionError(f"{path.name} holds a {type(model).__name__}, not a scikit-learn estimator")
    final = _final(model)
    task = _task(model, final)
    classifier = task == "classification"
    inputs, per_column = _input_specs(model)
    convertible = _with_string_missing_values(model)
    conversion_options = {id(_final(convertible)): {"zipmap": False}} if classifier else None
    from sklearn.cluster import KMeans, MiniBatchKMeans

    try:
        onnx_model = convert_sklearn(
            convertible,
            initial_types=_initial_types(inputs),
            target_opset=TARGET_OPSET,
            options=conversion_options,
            custom_conversion_functions={KMeans: _kmeans_by_differences, MiniBatchKMeans: _kmeans_by_differences},
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
    elif task == "clustering":
        graph.rename(onnx_model, {produced[0]: LABEL, produced[1]: DISTANCES})
        graph.set_batch_dims(onnx_model, {LABEL: (), DISTANCES: (int(final.n_clusters),)})
    elif task == "anomaly":
        # skl2onnx answers [N, 1] for both; served flat like a classifier's label
        graph.rename(onnx_model, {produced[0]: LABEL, produced[1]: SCORE})
        _flatten_outputs(onnx_model, [LABEL, SCORE])
        graph.set_batch_dims(onnx_model, {LABEL: (), SCORE: ()})
    else:
        graph.rename(onnx_model, {produced[0]: PREDICTION})
        graph.set_batch_dims(onnx_model)
    graph.check(onnx_model)
    outputs = graph.graph_outputs(onnx_model)

    def predict_native(rows: Rows) -> Rows:
        frame = _native_frame(model, rows, inputs, per_column)
        if classifier:
            return {LABEL: np.asarray(model.predict(frame)), PROBABILITIES: np.asarray(model.predict_proba(frame))}
        if task == "clustering":
            return {LABEL: np.asarray(model.predict(frame)), DISTANCES: np.asarray(model.transform(frame))}
        if task == "anomaly":
            return {LABEL: np.asarray(model.predict(frame)), SCORE: np.asarray(model.decision_function(frame))}
        return {PREDICTION: np.asarray(model.predict(frame))}

    return Conversion(
        model=onnx_model,
        inputs=inputs,
        outputs=outputs,
        task=task,
        framework="sklearn",
        predict_native=predict_native,
        labels=labels,
        make_sample=_make_sample(model, inputs, per_column),
        library_versions={
            "scikit-learn": sklearn.__version__,
            "skl2onnx": metadata.version("skl2onnx"),
        },
        notes=[
            f"string column {name!r}: a missing value is sent as the empty string (NaN for scikit-learn's imputer)"
            for name in sorted(_imputed_string_columns(model))
        ],
        # fitted on a DataFrame of numbers: one matrix input, whose columns the estimator still names
        input_columns=None if per_column else [str(n) for n in getattr(model, "feature_names_in_", [])] or None,
        column_inputs=per_column,
        # users call scikit-learn on float64 frames: parity runs it on the sample's numbers as given, as
        # serving compares with it (HistGradientBoosting keeps float64 thresholds; see parity.py)
        native_takes_given=True,
    )

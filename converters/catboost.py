"""CatBoost .cbm files, through CatBoost's own ONNX export.

The export always wraps probabilities in a ZipMap and names its input `features`: both are brought
to the shared signature here. CatBoost cannot export models with categorical features to ONNX; they
are refused before exporting, with that reason.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from onnxgate.converters import graph
from onnxgate.converters.base import (
    LABEL,
    PREDICTION,
    PROBABILITIES,
    Conversion,
    ConversionError,
    ConvertOptions,
    Rows,
    TensorSpec,
    require,
)

_CLASSIFIER_LOSSES = ("Logloss", "CrossEntropy", "MultiClass", "MultiClassOneVsAll")


def _catboost() -> Any:
    return require("catboost")


def load(path: Path) -> Any:
    catboost = _catboost()
    with open(path, "rb") as handle:
        if handle.read(4) != b"CBM1":
            raise ConversionError(f"{path.name} is not a CatBoost model file (.cbm files start with 'CBM1')")
    model = catboost.CatBoost()
    try:
        model.load_model(str(path))
    except catboost.CatBoostError as error:
        raise ConversionError(f"{path.name} is not a readable CatBoost model: {error}") from error
    return model


def _export(model: Any) -> onnx.ModelProto:
    catboost = _catboost()
    with tempfile.TemporaryDirectory(prefix="onnxgate-catboost-") as scratch:
        target = Path(scratch) / "model.onnx"
        try:
            model.save_model(str(target), format="onnx")
        except catboost.CatBoostError as error:
            raise ConversionError(f"CatBoost's ONNX export refused this model: {error}") from error
        return onnx.load(str(target))


def convert(source: str, options: ConvertOptions) -> Conversion:
    catboost = _catboost()
    path = Path(source)
    model = load(path)
    categorical = model.get_cat_feature_indices()
    if categorical:
        raise ConversionError(
            f"{path.name} has categorical features {categorical}: CatBoost cannot export those to ONNX;"
            " retrain with them encoded as numbers (or publish the model as PMML/ONNX from another tool)"
        )
    loss = str(model.get_all_params().get("loss_function", ""))
    classifier = loss in _CLASSIFIER_LOSSES
    n_features = len(model.feature_names_)
    onnx_model = _export(model)
    graph.strip_zipmap(onnx_model)
    produced = [o.name for o in onnx_model.graph.output]
    mapping = {onnx_model.graph.input[0].name: "input"}
    classes: list[Any] = []
    if classifier:
        classes = list(np.asarray(model.classes_).tolist())
        mapping.update({produced[0]: LABEL, produced[1]: PROBABILITIES})
        graph.rename(onnx_model, mapping)
        graph.set_batch_dims(onnx_model, {"input": (n_features,), LABEL: (), PROBABILITIES: (len(classes),)})
    else:
        mapping[produced[0]] = PREDICTION
        graph.rename(onnx_model, mapping)
        graph.set_batch_dims(onnx_model, {"input": (n_features,), PREDICTION: (1,)})
    graph.check(onnx_model)

    def predict_native(rows: Rows) -> Rows:
        x = rows["input"]
        if not classifier:
            return {PREDICTION: np.asarray(model.predict(x, prediction_type="RawFormulaVal")).reshape(len(x), -1)}
        probabilities = np.asarray(model.predict(x, prediction_type="Probability"))
        labels = np.asarray(model.predict(x, prediction_type="Class")).reshape(-1)
        return {LABEL: labels, PROBABILITIES: probabilities}

    return Conversion(
        model=onnx_model,
        inputs=[TensorSpec("input", "FP32", (-1, n_features))],
        outputs=graph.graph_outputs(onnx_model),
        task="classification" if classifier else "regression",
        framework="catboost",
        predict_native=predict_native,
        labels=[str(c) for c in classes] if classifier else None,
        library_versions={"catboost": catboost.__version__},
        notes=[f"loss function {loss}"],
        input_columns=_named_columns(model.feature_names_),
    )


def _named_columns(names: Any) -> list[str] | None:
    """CatBoost's feature names when it was trained on named columns (a DataFrame, a Pool with names);
    it calls unnamed features "0", "1", ..."""
    found = [str(n) for n in names or []]
    return found if found and found != [str(i) for i in range(len(found))] else None

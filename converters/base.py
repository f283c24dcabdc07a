"""What every converter returns, and the names every converted model serves under.

A converter reads one native model file and returns a `Conversion`: the ONNX graph, its serving
signature, and a way to run the *original* model on the same rows, so `parity.py` can compare the
two before `publish.py` writes a version. Converters stay small functions; the shared work
(sample rows, parity, atomic publishing, the report) lives once, beside this module.

Output names are fixed across frameworks so that clients, the prediction log and the quality
metrics never need to know where a model came from:
- classifiers: `label` (INT64 or BYTES, shape [-1]) and `probabilities` (FP32, shape [-1, n_classes]);
- regressors:  `prediction` (FP32, shape [-1] or [-1, n_targets]);
- clusterers (task "clustering"): `label` (INT64 cluster, shape [-1]) and `distances` (FP32, shape
  [-1, n_clusters]: the distance to each cluster centre, scikit-learn's transform());
- anomaly detectors (task "anomaly"): `label` (INT64, 1 inlier / -1 outlier, shape [-1]) and `score`
  (FP32, shape [-1]: scikit-learn's decision_function(), negative for outliers).
Tabular inputs are one FP32 tensor `input` of shape [-1, n_features], or one tensor per column
(shape [-1, 1]) when columns have different types (string columns are BYTES).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import onnx

Task = Literal["classification", "regression", "clustering", "anomaly", "other"]
Rows = dict[str, np.ndarray]

LABEL = "label"
PROBABILITIES = "probabilities"
PREDICTION = "prediction"
DISTANCES = "distances"
SCORE = "score"


@dataclass(frozen=True)
class TensorSpec:
    """One input or output as the gateway serves it."""

    name: str
    datatype: str  # Open Inference Protocol datatype: FP32, FP64, INT64, BYTES, BOOL, ...
    shape: tuple[int, ...]  # full shape, first dimension is the batch (-1 = any size)


@dataclass
class Conversion:
    model: onnx.ModelProto
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    task: Task
    framework: str
    # the original model (or its reference scorer) on the given rows, keyed by the ONNX output names
    predict_native: Callable[[Rows], Rows]
    labels: list[str] | None = None
    # rows drawn from what the source knows of its inputs (ranges, categories); None: from `inputs`
    make_sample: Callable[[int, np.random.Generator], Rows] | None = None
    library_versions: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    # the names of the columns of a single matrix input, in order, when the source knows them: a sample
    # file's header is matched against them (by name, ignoring columns the model does not read)
    input_columns: list[str] | None = None
    # True: with a sample file, the parity check runs the original model on the numbers as the file
    # gives them (float64) and onnxruntime on them cast to the inputs' types, as serving does: a
    # library that compares float64 values with float64 thresholds (HistGradientBoosting) then answers
    # as it would in the user's own code; rows that differ only because a value rounds to float32 onto
    # a split threshold are reported apart (parity.py). False: both sides read the cast rows.
    native_takes_given: bool = False
    # True: every input is one column of the source (shape [-1, 1], named like the column), e.g. when
    # the columns have different types; `feature_columns` then lists the inputs as the columns
    column_inputs: bool = False
    # column name -> its categories, in the order the model codes them (pandas categories, PMML <Value>s,
    # R factor levels): recorded with the columns so clients know what a column accepts
    categories: dict[str, list[str]] = field(default_factory=dict)


def feature_columns(conversion: Conversion) -> list[dict[str, Any]] | None:
    """The source's input columns in order, as the published version records them (config.pbtxt
    parameter `columns`, the report's "columns"); None when the source does not name them.

    Each column: its `name`, the `datatype` a client sends it as (FP32 for numbers, BYTES for text),
    the model `input` it goes to and its `index` on that input's last axis, and `categories` when the
    source lists them.
    """
    inputs = conversion.inputs
    columns: list[dict[str, Any]] = []
    if conversion.input_columns and len(inputs) == 1:
        spec = inputs[0]
        if len(spec.shape) != 2 or spec.shape[1] != len(conversion.input_columns):
            return None
        if len(set(conversion.input_columns)) != len(conversion.input_columns):
            return None
        for i, name in enumerate(conversion.input_columns):
            columns.append({"name": str(name), "datatype": spec.datatype, "input": spec.name, "index": i})
    elif conversion.column_inputs:
        for spec in inputs:
            if spec.shape not in ((-1, 1), (-1,)):
                return None
            columns.append({"name": spec.name, "datatype": spec.datatype, "input": spec.name, "index": 0})
    else:
        return None
    for column in columns:
        known = conversion.categories.get(column["name"])
        if known:
            column["categories"] = [str(c) for c in known]
    return columns


class ConversionError(Exception):
    """A model that cannot be converted, with a message that says what to do about it."""


class MissingDependency(ConversionError):
    def __init__(self, package: str, extra: str) -> None:
        super().__init__(f"converting this model needs the Python package {package!r}: pip install 'onnxgate[{extra}]'")


def require(module: str, package: str | None = None, extra: str = "converters") -> Any:
    """Import an optional dependency where it is needed, or say which extra brings it."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise MissingDependency(package or module, extra) from error


@dataclass(frozen=True)
class ConvertOptions:
    """What a user may tell a converter beyond the source itself (all optional).

    `sample_path`: the user's sample rows (CSV, Parquet, .npy, .npz); converters that cannot learn
    the input shape from the model (a TorchScript file) may read its shape from there.
    `input_shape`: the shape of one row, for sources that do not record it (PyTorch modules).
    """

    sample_path: str | None = None
    input_shape: tuple[int, ...] | None = None


# Every converter module exposes one function of this type; `converters.CONVERTERS` maps framework
# names to them. `source` is a path, or for PyTorch also a `module:attr` reference.
Converter = Callable[[str, ConvertOptions], Conversion]

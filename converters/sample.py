"""Sample rows for the parity check: the user's file, or rows made up from the model's signature.

Made-up rows matter as much as real ones: tree ensembles are compared on values between their split
thresholds (read from the converted graph), so every branch is taken and no row sits exactly on a
threshold, where float32 and float64 comparisons may legitimately disagree.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import onnx

from onnxgate.converters.base import Conversion, ConversionError, Rows, TensorSpec

DEFAULT_ROWS = 256

_NUMPY_TYPES: dict[str, type[np.generic]] = {
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "UINT8": np.uint8,
    "UINT16": np.uint16,
    "UINT32": np.uint32,
    "UINT64": np.uint64,
    "BOOL": np.bool_,
}

_TREE_OPS = {"TreeEnsembleClassifier", "TreeEnsembleRegressor", "TreeEnsemble"}


def _missing(value: object) -> bool:
    return value is None or (isinstance(value, float) and value != value)  # NaN is not equal to itself


def as_datatype(values: np.ndarray, spec: TensorSpec) -> np.ndarray:
    """`values` cast to what onnxruntime expects for `spec` (BYTES: an object array of str).

    A missing string (an empty CSV cell, None, NaN) becomes "", what a client sends for it: the
    scikit-learn converter serves string imputers with "" as their missing value.
    """
    if spec.datatype == "BYTES":
        flat = ["" if _missing(v) else v.decode() if isinstance(v, bytes) else str(v) for v in values.reshape(-1)]
        return np.array(flat, dtype=object).reshape(values.shape)
    try:
        return values.astype(_NUMPY_TYPES[spec.datatype])
    except KeyError:
        raise ConversionError(f"input {spec.name!r}: no sample rows for datatype {spec.datatype}") from None
    except ValueError as error:
        raise ConversionError(f"input {spec.name!r}: sample values are not {spec.datatype}: {error}") from error


def as_given(values: np.ndarray, spec: TensorSpec) -> np.ndarray:
    """`values` as the user's file holds them: numbers as float64 (not yet rounded to the input's type),
    strings as an object array of str. What the native library sees in the parity check of converters
    that take rows as given (Conversion.native_takes_given)."""
    if spec.datatype.startswith("FP") and values.dtype.kind in "fiu":
        return values.astype(np.float64)
    if spec.datatype == "BYTES":  # a missing string stays missing (NaN), as pandas gives it to the library
        flat = [np.nan if _missing(v) else v.decode() if isinstance(v, bytes) else str(v) for v in values.reshape(-1)]
        return np.array(flat, dtype=object).reshape(values.shape)
    return as_datatype(values, spec)


def cast_rows(rows: Rows, inputs: list[TensorSpec]) -> Rows:
    """Rows cast to the inputs' datatypes: what a client sends and onnxruntime reads."""
    return {spec.name: as_datatype(rows[spec.name], spec) for spec in inputs}


def _row_shape(spec: TensorSpec) -> tuple[int, ...]:
    rest = spec.shape[1:]
    if any(d < 0 for d in rest):
        raise ConversionError(
            f"input {spec.name!r} has shape {list(spec.shape)} with a free non-batch dimension:"
            " sample rows cannot be made up for it; pass --sample FILE"
        )
    return rest


def _random_values(spec: TensorSpec, n: int, rng: np.random.Generator) -> np.ndarray:
    # a graph made elsewhere may fix its batch size; it then gets exactly that many rows
    shape = (spec.shape[0] if spec.shape and spec.shape[0] > 0 else n, *_row_shape(spec))
    if spec.datatype.startswith(("FP", "BF")):
        return as_datatype(rng.normal(size=shape), spec)
    if spec.datatype.startswith(("INT", "UINT")):
        return as_datatype(rng.integers(0, 10, size=shape), spec)
    if spec.datatype == "BOOL":
        return rng.integers(0, 2, size=shape).astype(np.bool_)
    if spec.datatype == "BYTES":
        return np.array([f"s{v}" for v in rng.integers(0, 5, size=shape).reshape(-1)], dtype=object).reshape(shape)
    raise ConversionError(f"input {spec.name!r}: no sample rows for datatype {spec.datatype}")


def tree_thresholds(model: onnx.ModelProto, input_name: str) -> dict[int, np.ndarray]:
    """Split thresholds per feature of the tree ensembles that read `input_name` (directly or via Cast)."""
    feeds = {input_name}
    for node in model.graph.node:
        if node.op_type == "Cast" and node.input[0] in feeds:
            feeds.update(node.output)
    found: dict[int, list[float]] = {}
    for node in model.graph.node:
        if node.op_type not in _TREE_OPS or node.input[0] not in feeds:
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        features = attrs.get("nodes_featureids", [])
        modes = attrs.get("nodes_modes", [])
        values = attrs.get("nodes_values")
        if values is None and "nodes_values_as_tensor" in attrs:
            values = onnx.numpy_helper.to_array(attrs["nodes_values_as_tensor"]).tolist()
        for feature, mode, value in zip(features, modes, values or [], strict=False):
            if mode != b"LEAF":
                found.setdefault(int(feature), []).append(float(value))
    return {f: np.unique(np.asarray(v, dtype=np.float32)) for f, v in found.items()}


def _between_thresholds(thresholds: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    # midpoints between neighbouring thresholds, and one value beyond each end: every branch is
    # reachable and no value equals a threshold
    t = thresholds.astype(np.float64)
    spread = max(float(t[-1] - t[0]), 1.0)
    candidates = np.concatenate([[t[0] - 0.1 * spread], (t[:-1] + t[1:]) / 2, [t[-1] + 0.1 * spread]])
    return rng.choice(candidates, size=n)


def from_signature(conversion: Conversion, n: int, rng: np.random.Generator) -> Rows:
    """Rows made up from the converter's knowledge of its inputs, else from the signature alone."""
    if conversion.make_sample is not None:
        return conversion.make_sample(n, rng)
    rows: Rows = {}
    for spec in conversion.inputs:
        values = _random_values(spec, n, rng)
        if spec.datatype in ("FP32", "FP64") and len(spec.shape) == 2:
            for feature, thresholds in tree_thresholds(conversion.model, spec.name).items():
                if feature < values.shape[1] and thresholds.size:
                    values[:, feature] = _between_thresholds(thresholds, n, rng)
        rows[spec.name] = values
    return rows


def read_file(
    path: str | Path, inputs: list[TensorSpec], input_columns: list[str] | None = None, *, cast: bool = True
) -> Rows:
    """The user's sample rows: CSV or Parquet (columns), .npy (one array), .npz (one array per input).

    `input_columns` names the columns of a single matrix input, in order, when the model knows them
    (Conversion.input_columns); a table's columns are then picked from the file by those names.
    `cast`: rows cast to the inputs' datatypes (what onnxruntime reads); False: numbers as given
    (float64), for the native side of the parity check (`as_given`, `cast_rows`).
    """
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"sample file {str(path)!r} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        return _from_arrays(
            {inputs[0].name: np.load(path, allow_pickle=False)} if len(inputs) == 1 else {}, inputs, path, cast
        )
    if suffix == ".npz":
        with np.load(path, allow_pickle=False) as archive:
            return _from_arrays({k: archive[k] for k in archive.files}, inputs, path, cast)
    if suffix in (".csv", ".parquet", ".pq"):
        return _from_table(_read_table(path), inputs, input_columns, path, cast)
    raise ConversionError(f"sample file {path.name!r}: expected .csv, .parquet, .npy or .npz")


def header_columns(path: str | Path, inputs: list[TensorSpec]) -> list[str] | None:
    """The header of a CSV or Parquet sample whose columns all go, by position, to a single matrix input:
    the names of that input's columns, recorded with the version. None for anything else."""
    path = Path(path)
    if path.suffix.lower() not in (".csv", ".parquet", ".pq") or not path.is_file():
        return None
    if len(inputs) != 1 or len(inputs[0].shape) != 2 or inputs[0].shape[1] < 1:
        return None
    names, columns = _read_table(path)
    if names is None or len(columns) != inputs[0].shape[1] or len(set(names)) != len(names):
        return None
    return [str(n) for n in names]


# A table's column names (None: the file has none, or only generic ones) and its columns in file order.
Table = tuple[list[str] | None, list[np.ndarray]]


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _generic(names: list[str]) -> bool:
    # "0", "1", ...: what pandas writes for a DataFrame made from an array; they name no feature
    return names == [str(i) for i in range(len(names))]


def _csv_header(path: Path) -> str:
    """'names', 'generic' (a header of column numbers) or 'none' (the first line is already data)."""
    with open(path, newline="", encoding="utf-8", errors="replace") as handle:
        first = next(csv.reader(handle), [])
    if not first or not all(_is_number(cell) for cell in first):
        return "names"
    return "generic" if _generic(first) else "none"


def _read_table(path: Path) -> Table:
    """Columns of a CSV or Parquet file. A CSV whose first line is all numbers has no header (that line
    is the first row), except "0,1,...,n-1", which is a header of column numbers; either way the
    columns have no names and are matched to the model's inputs by position."""
    import pyarrow.csv
    import pyarrow.parquet

    try:
        if path.suffix.lower() == ".csv":
            header = _csv_header(path)
            options = pyarrow.csv.ReadOptions(autogenerate_column_names=header == "none")
            table = pyarrow.csv.read_csv(path, read_options=options)
        else:
            table = pyarrow.parquet.read_table(path)
            header = "generic" if _generic(table.column_names) else "names"
    except Exception as error:  # pyarrow raises several unrelated types for unreadable files
        raise ConversionError(f"sample file {path.name!r} cannot be read: {error}") from error
    columns = [column.to_numpy(zero_copy_only=False) for column in table.columns]
    return (list(table.column_names) if header == "names" else None), columns


def _width(spec: TensorSpec) -> int:
    """Columns one row of `spec` takes; -1 when its width is free."""
    return int(np.prod(spec.shape[1:])) if len(spec.shape) > 1 else 1


def _shaped(columns: list[np.ndarray], spec: TensorSpec, cast: bool = True) -> np.ndarray:
    matrix = np.stack([np.asarray(c) for c in columns], axis=1)
    if all(d >= 0 for d in spec.shape[1:]):  # a free width (-1) keeps the columns as they came
        matrix = matrix.reshape((-1, *spec.shape[1:]))
    return as_datatype(matrix, spec) if cast else as_given(matrix, spec)


def _from_table(
    table: Table, inputs: list[TensorSpec], input_columns: list[str] | None, path: Path, cast: bool = True
) -> Rows:
    names, columns = table
    if names is None:
        return _by_position(columns, inputs, path, "the file names no columns", cast)
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ConversionError(f"sample file {path.name!r} repeats the column names {repeated}")
    by_name = dict(zip(names, columns, strict=True))
    wanted = columns_by_input(names, inputs, input_columns, f"sample file {path.name!r}")
    if wanted is None:  # the model does not know its columns' names: the file's columns, in order
        return _by_position(columns, inputs, path, "the model does not name its columns", cast)
    return {s.name: _shaped([by_name[c] for c in wanted[s.name]], s, cast) for s in inputs}


def columns_by_input(
    names: list[str], inputs: list[TensorSpec], input_columns: list[str] | None, what: str
) -> dict[str, list[str]] | None:
    """The named columns of a table each input takes, in order; None when they can only go by position.

    An input named like a column takes that column; a single matrix input takes `input_columns` (the
    names the model knows). An input wider than one column takes the columns `name[0]`, `name[1]`, ...
    (one row flattened in row-major order), so a model with several such inputs can read one table.
    Columns the model does not read are left out (an id, the target). The learning loop's training
    record maps training data to inputs with the same rule.
    """
    if len(inputs) == 1 and inputs[0].name not in names and f"{inputs[0].name}[0]" not in names:
        if not input_columns:
            return None
        wanted = {inputs[0].name: list(input_columns)}
    else:
        wanted = {s.name: [s.name] if s.name in names else indexed_columns(s) for s in inputs}
    missing = [name for want in wanted.values() for name in want if name not in names]
    if missing:
        raise ConversionError(
            f"{what} lacks columns the model reads: {missing} (the file has {names});"
            " name them as the model does, or give a file without a header to match columns by position"
        )
    return wanted


def indexed_columns(spec: TensorSpec) -> list[str]:
    """The table columns of one input: its name when a row is one value, else `name[0]`, `name[1]`, ..."""
    width = _width(spec)
    if width == 1:
        return [spec.name]
    if width < 0:
        raise ConversionError(
            f"input {spec.name!r} has shape {list(spec.shape)}: its columns cannot be named when its width is free"
        )
    return [f"{spec.name}[{i}]" for i in range(width)]


def _by_position(columns: list[np.ndarray], inputs: list[TensorSpec], path: Path, why: str, cast: bool = True) -> Rows:
    """Columns not matched by name: the inputs take them in file order, each as many as its row width."""
    widths = [_width(s) for s in inputs]
    if len(inputs) == 1 and widths[0] < 0:  # a free width takes every column
        widths = [len(columns)]
    if any(w < 0 for w in widths) or sum(widths) != len(columns):
        expected = ", ".join(f"{s.name!r} {list(s.shape)}" for s in inputs)
        raise ConversionError(
            f"sample file {path.name!r} has {len(columns)} columns, matched by position ({why});"
            f" the model's inputs ({expected}) take {sum(widths)}: give exactly those columns, or name them"
        )
    rows: Rows = {}
    start = 0
    for spec, width in zip(inputs, widths, strict=True):
        rows[spec.name] = _shaped(columns[start : start + width], spec, cast)
        start += width
    return rows


def _from_arrays(arrays: dict[str, np.ndarray], inputs: list[TensorSpec], path: Path, cast: bool = True) -> Rows:
    missing = [s.name for s in inputs if s.name not in arrays]
    if missing:
        raise ConversionError(
            f"sample file {path.name!r} lacks arrays for inputs {missing} (a .npy file feeds a model with one"
            " input; use .npz with one array per input name otherwise)"
        )
    rows: Rows = {}
    for spec in inputs:
        values = arrays[spec.name]
        if values.ndim == len(spec.shape) - 1:
            values = values.reshape((1, *values.shape))  # a single row
        if values.ndim != len(spec.shape) or any(
            want >= 0 and got != want for got, want in zip(values.shape[1:], spec.shape[1:], strict=True)
        ):
            raise ConversionError(
                f"sample array {spec.name!r} has shape {list(values.shape)}, input expects {list(spec.shape)}"
            )
        rows[spec.name] = as_datatype(values, spec) if cast else as_given(values, spec)
    return rows


def row_count(rows: Rows) -> int:
    counts = {len(v) for v in rows.values()}
    if len(counts) != 1:
        raise ConversionError(f"sample inputs have different row counts: {sorted(counts)}")
    return counts.pop()

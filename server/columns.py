"""Named columns: a version that records its source's input columns takes them by name.

A converted version records its columns in config.pbtxt (`converters/publish.py`), as a JSON list in the
`columns` parameter, in the order the model reads them:

    parameters { key: "columns" value { string_value:
      '[{"name":"v","datatype":"FP32","input":"input","index":0}, ...,
        {"name":"merchant","datatype":"BYTES","input":"merchant","index":0,"categories":["food","travel"]}]' } }

`name`: the column; `datatype`: what a client sends (numbers for a numeric input, text for BYTES); `input`
and `index`: the model input it goes to and its position on that input's last axis; `categories` (optional):
the values a text column was trained with, in code order (a value outside them counts as missing, as the
model's own library treats it).

A request for such a version may name its columns instead of the model's inputs, in either form:
- one tensor per column (gRPC, REST `inputs`, onnxgate.client with a DataFrame), shape [n] or [n, 1];
- REST rows as JSON objects, `{"rows": [{"v": 1.5, "merchant": "travel"}, ...]}` (rest_tensors.py).
`assemble` builds the model's tensors from them, once, in the shared request path (inference.py), so the
model, the cache and the prediction log see the model's own tensors whatever form the request came in.
Every mistake a client can make is an InvalidArgument that names the columns the model takes.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from onnxgate.server.errors import InvalidArgument
from onnxgate.server.modelspec import ConfigError, ModelSpec, TensorSpec

PARAMETER = "columns"
_NUMERIC = {"FP16", "FP32", "FP64", "INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64"}


@dataclass(frozen=True)
class Column:
    name: str
    datatype: str  # the model input's datatype
    input: str
    index: int
    categories: tuple[str, ...] | None = None

    @property
    def text(self) -> bool:
        return self.datatype == "BYTES"

    def describe(self) -> str:
        kind = "text" if self.text else "number"
        if self.categories:
            shown = ", ".join(self.categories[:8]) + (", ..." if len(self.categories) > 8 else "")
            kind += f" ({shown})"
        return f"{self.name} ({kind})"

    def as_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"name": self.name, "datatype": self.datatype, "input": self.input, "index": self.index}
        if self.categories is not None:
            doc["categories"] = list(self.categories)
        return doc


class Columns:
    """A version's recorded columns and how they make its input tensors."""

    def __init__(self, model: str, columns: Sequence[Column], inputs: Sequence[TensorSpec]) -> None:
        self.model = model
        self.columns = tuple(columns)
        self.by_name = {c.name: c for c in self.columns}
        self.inputs = {t.name: t for t in inputs}
        self.input_names = frozenset(self.inputs)
        # per model input: its columns by position (every position has exactly one, checked at load)
        self._of_input: dict[str, list[Column]] = {name: [] for name in self.inputs}
        for c in sorted(self.columns, key=lambda c: c.index):
            self._of_input[c.input].append(c)
        # what the prediction log records beside the tensors: each input's elements by name
        self.names_by_input = {name: tuple(c.name for c in of) for name, of in self._of_input.items()}

    def as_json(self) -> list[dict[str, Any]]:
        return [c.as_json() for c in self.columns]

    def takes(self) -> str:
        return ", ".join(c.describe() for c in self.columns)

    # -- the request -----------------------------------------------------------------------------------
    def assemble(self, tensors: Mapping[str, np.ndarray], rows: list[Any] | None) -> dict[str, np.ndarray]:
        """The model's input tensors from named columns (tensors named by column, or JSON rows); tensors
        named by the model's inputs pass unchanged."""
        if rows is not None:
            return self._from_columns(self._rows_to_columns(rows))
        names = tensors.keys()
        if names == self.input_names and (names != self.by_name.keys() or all(map(self._exact, tensors.items()))):
            return dict(tensors)  # the model's own tensors (checked by the model as any request)
        return self._from_columns(dict(tensors))

    def _exact(self, item: tuple[str, np.ndarray]) -> bool:
        """A tensor that is already what the model input takes (its type and rank)."""
        name, array = item
        spec = self.inputs[name]
        want = np.dtype(object) if spec.datatype == "BYTES" else _numpy_type(spec.datatype)
        return array.dtype == want and array.ndim == len(spec.shape)

    def _rows_to_columns(self, rows: list[Any]) -> dict[str, np.ndarray]:
        values: dict[str, list[Any]] = {c.name: [] for c in self.columns}
        for i, row in enumerate(rows):
            if not isinstance(row, dict):
                raise InvalidArgument(
                    f"rows[{i}] must be a JSON object of column -> value; model {self.model!r} takes {self.takes()}"
                )
            self._check_names(row.keys(), f"rows[{i}]")
            for column in self.columns:
                value = row[column.name]
                values[column.name].append(self._json_value(column, value, f"rows[{i}]"))
        out: dict[str, np.ndarray] = {}
        for column in self.columns:
            if column.text:
                array = np.empty(len(rows), dtype=object)
                array[:] = values[column.name]
                out[column.name] = array
            else:
                out[column.name] = np.asarray(values[column.name], dtype=np.float64).reshape(len(rows))
        return out

    def _json_value(self, column: Column, value: Any, where: str) -> Any:
        if column.text:
            if value is None:
                return b""  # a missing text value: what the converted models read as missing
            if not isinstance(value, str):
                raise InvalidArgument(f"{where}: column {column.name!r} takes text, got {json.dumps(value)[:60]}")
            try:
                return value.encode("utf-8")
            except UnicodeEncodeError:
                raise InvalidArgument(f"{where}: column {column.name!r} holds a lone surrogate, not text") from None
        if value is None:
            return math.nan  # a missing number
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise InvalidArgument(f"{where}: column {column.name!r} takes a number, got {json.dumps(value)[:60]}")
        try:
            return float(value)
        except OverflowError:  # an integer past any float
            raise InvalidArgument(f"{where}: column {column.name!r}: {str(value)[:40]}... is too large") from None

    def _check_names(self, sent: Any, where: str) -> None:
        names = set(sent)
        missing = [c.name for c in self.columns if c.name not in names]
        unknown = sorted(n for n in names if n not in self.by_name)
        if not missing and not unknown:
            return
        parts = []
        if missing:
            parts.append(f"missing column(s) {', '.join(map(repr, missing))}")
        if unknown:
            parts.append(f"unknown column(s) {', '.join(map(repr, unknown))}")
        inputs = ""
        if where == "the request" and self.input_names != self.by_name.keys():
            inputs = (
                " (or its inputs "
                + ", ".join(f"{t.name} {t.datatype} {list(t.shape)}" for t in self.inputs.values())
                + ")"
            )
        raise InvalidArgument(
            f"{where}: {'; '.join(parts)}; model {self.model!r} takes the columns {self.takes()}{inputs}"
        )

    def _from_columns(self, sent: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self._check_names(sent.keys(), "the request")
        rows = -1
        flat: dict[str, np.ndarray] = {}
        for column in self.columns:
            array = sent[column.name]
            if array.ndim == 2 and array.shape[1] == 1:
                array = array.reshape(-1)
            if array.ndim != 1:
                raise InvalidArgument(
                    f"column {column.name!r}: shape {list(array.shape)} sent; a column is one value per row,"
                    " shape [n] or [n, 1]"
                )
            if rows != -1 and array.shape[0] != rows:
                raise InvalidArgument(
                    f"columns disagree on the row count: {rows} and {array.shape[0]} ({column.name!r})"
                )
            rows = array.shape[0]
            flat[column.name] = self._typed(column, array)
        out: dict[str, np.ndarray] = {}
        for name, spec in self.inputs.items():
            parts = [flat[c.name] for c in self._of_input[name]]
            if len(spec.shape) == 1:
                out[name] = parts[0]
            else:
                out[name] = np.stack(parts, axis=1) if len(parts) > 1 else parts[0].reshape(-1, 1)
        return out

    def _typed(self, column: Column, array: np.ndarray) -> np.ndarray:
        if column.text:
            if array.dtype.kind == "U":
                array = array.astype(object)
            if array.dtype != object or not all(isinstance(v, bytes | str) for v in array):
                raise InvalidArgument(
                    f"column {column.name!r} takes text (BYTES), got {_sent_type(array)}; send the values as strings"
                )
            return np.array([v.encode() if isinstance(v, str) else v for v in array], dtype=object)
        if array.dtype.kind not in "iuf":
            raise InvalidArgument(
                f"column {column.name!r} takes numbers ({column.datatype}), got {_sent_type(array)};"
                " send it as FP32, FP64 or an integer type"
            )
        target = self.inputs[column.input]
        return array.astype(_numpy_type(target.datatype))


def _sent_type(array: np.ndarray) -> str:
    if array.dtype == object:
        return "BYTES"
    if array.dtype.kind == "b":
        return "BOOL"
    from onnxgate.server.tensors import BY_NUMPY

    found = BY_NUMPY.get(array.dtype)
    return found.name if found is not None else str(array.dtype)


def _numpy_type(datatype: str) -> np.dtype:
    from onnxgate.server.tensors import DATATYPES

    numpy = DATATYPES[datatype].numpy
    assert numpy is not None
    return numpy


def parse(spec: ModelSpec) -> Columns | None:
    """The version's recorded columns, or None when it records none. A parameter that does not fit the
    version's inputs fails the load (ConfigError): every request by name would fail otherwise."""
    parameter = spec.config.parameters.get(PARAMETER)
    if parameter is None or not parameter.string_value:
        return None
    where = f"model {spec.name!r}: config parameter {PARAMETER!r}"
    try:
        doc = json.loads(parameter.string_value)
    except ValueError as e:
        raise ConfigError(f"{where} is not JSON: {e}") from e
    if not isinstance(doc, list) or not doc:
        raise ConfigError(f"{where} must be a non-empty JSON list of columns")
    inputs = {t.name: t for t in spec.inputs}
    columns: list[Column] = []
    taken: set[tuple[str, int]] = set()
    for i, entry in enumerate(doc):
        if not isinstance(entry, dict):
            raise ConfigError(f"{where}: entry {i} is not an object with name, input and index")
        name, input_name, index = entry.get("name"), entry.get("input"), entry.get("index", 0)
        if not isinstance(name, str) or not name or not isinstance(input_name, str):
            raise ConfigError(f"{where}: entry {i} needs a 'name' and an 'input' (strings)")
        spec_in = inputs.get(input_name)
        if spec_in is None:
            raise ConfigError(f"{where}: column {name!r} names input {input_name!r}, not one of {', '.join(inputs)}")
        width = spec_in.shape[1] if len(spec_in.shape) == 2 else 1 if len(spec_in.shape) == 1 else -1
        if width < 1 or type(index) is not int or not 0 <= index < width:
            raise ConfigError(
                f"{where}: column {name!r} at index {index!r} of input {input_name!r} {list(spec_in.shape)};"
                " columns go to inputs of shape [-1, F] (index 0..F-1) or [-1]"
            )
        if spec_in.datatype != "BYTES" and spec_in.datatype not in _NUMERIC:
            raise ConfigError(f"{where}: column {name!r}: input {input_name!r} is {spec_in.datatype}")
        if (input_name, index) in taken or any(c.name == name for c in columns):
            raise ConfigError(f"{where}: column {name!r} (input {input_name!r} index {index}) appears twice")
        taken.add((input_name, index))
        categories = entry.get("categories")
        if categories is not None and (
            not isinstance(categories, list) or not all(isinstance(c, str) for c in categories)
        ):
            raise ConfigError(f"{where}: column {name!r}: 'categories' must be a list of strings")
        columns.append(
            Column(name, spec_in.datatype, input_name, index, tuple(categories) if categories is not None else None)
        )
    for spec_in in spec.inputs:
        width = spec_in.shape[1] if len(spec_in.shape) == 2 else 1
        got = sum(1 for c in columns if c.input == spec_in.name)
        if got != width:
            raise ConfigError(
                f"{where}: input {spec_in.name!r} {list(spec_in.shape)} has {got} column(s) for {width} positions;"
                " every position of every input needs one column"
            )
    return Columns(spec.name, columns, spec.inputs)

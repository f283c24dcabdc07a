"""Tensors in the REST edge's bodies <-> numpy: the Open Inference Protocol's JSON, plus Triton's binary
tensor data extension (a JSON header of `Inference-Header-Content-Length` bytes, then each binary
tensor's bytes in order), as tensors.py does for gRPC.

Every count is checked against the bytes or elements that came before anything is allocated from it:
a shape is the client's claim.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from onnxgate.server.errors import InvalidArgument
from onnxgate.server.tensors import (
    DATATYPES,
    DataType,
    InferRequest,
    check_shape,
    decode_raw,
    encode_raw,
    new_request_id,
)

JSON_TYPE = "application/json"
BINARY_TYPE = "application/octet-stream"
HEADER_LENGTH = "inference-header-content-length"  # HTTP header names compare case-insensitively


@dataclass
class RestInferRequest(InferRequest):
    binary_outputs: frozenset[str] = field(default_factory=frozenset)  # outputs answered as binary data
    binary_all: bool = False  # the request's `binary_data_output` parameter: every output in binary


def parse_json(data: bytes | memoryview, what: str) -> Any:
    try:
        return json.loads(bytes(data))
    except RecursionError:
        raise InvalidArgument(f"{what} nests too deeply") from None
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
        raise InvalidArgument(f"{what} is not valid JSON: {e}") from None


def decode_infer(body: bytes, header_length: int | None, model: str, version: str) -> RestInferRequest:
    """An infer request body -> RestInferRequest. `header_length`: the Inference-Header-Content-Length
    header (None when absent: the whole body is JSON)."""
    view = memoryview(body)
    if header_length is None:
        doc, binary = parse_json(view, "the request body"), view[len(view) :]
    else:
        if not 0 <= header_length <= len(view):
            raise InvalidArgument(
                f"Inference-Header-Content-Length is {header_length}, but the body has {len(view)} bytes:"
                " it must count the JSON header at the start of the body"
            )
        doc, binary = parse_json(view[:header_length], "the JSON header"), view[header_length:]
    if not isinstance(doc, dict):
        raise InvalidArgument("the request body must be a JSON object with 'inputs'")
    request_id = _optional(doc, "id", str, "a string")
    parameters = _optional(doc, "parameters", dict, "an object") or {}
    binary_all = _optional(parameters, "binary_data_output", bool, "true or false", "parameter") or False
    # Triton's `timeout` parameter, in microseconds (0: none): past it the model is not run (server/overload.py)
    timeout_us = _optional(parameters, "timeout", int, "a whole number of microseconds (0: none)", "parameter") or 0
    if timeout_us < 0:
        raise InvalidArgument(f"parameter 'timeout' must be 0 or more microseconds, got {timeout_us}")
    raw_rows = doc.get("rows")
    raw_inputs = doc.get("inputs")
    if raw_rows is not None:
        # rows as JSON objects, for a model that records its columns (server/columns.py)
        if raw_inputs is not None:
            raise InvalidArgument("the request has both 'inputs' and 'rows': send one")
        if not isinstance(raw_rows, list) or not raw_rows:
            raise InvalidArgument("'rows' must be a non-empty list of JSON objects (column -> value)")
        if header_length is not None and len(binary):
            raise InvalidArgument("a request with 'rows' carries no binary tensor data")
        raw_inputs = []
    elif not isinstance(raw_inputs, list) or not raw_inputs:
        raise InvalidArgument(
            "'inputs' must be a non-empty list of tensors (name, shape, datatype, data), or 'rows' a list of"
            " JSON objects (column -> value) for a model that records its columns"
        )
    inputs: dict[str, np.ndarray] = {}
    offset = 0
    for i, tensor in enumerate(raw_inputs):
        if not isinstance(tensor, dict):
            raise InvalidArgument(f"inputs[{i}] must be an object with name, shape, datatype and data")
        name = _required(tensor, "name", str, "a string", f"inputs[{i}]")
        what = f"input {name!r}"
        if name in inputs:
            raise InvalidArgument(f"{what} appears twice")
        datatype = _required(tensor, "datatype", str, "a string", what)
        dtype = DATATYPES.get(datatype)
        if dtype is None:
            raise InvalidArgument(f"{what}: unknown datatype {datatype!r}; expected one of {', '.join(DATATYPES)}")
        shape = _shape(tensor.get("shape"), what)
        tensor_parameters = _optional(tensor, "parameters", dict, "an object", what) or {}
        if "shared_memory_region" in tensor_parameters:
            raise InvalidArgument(f"{what}: shared memory is not supported; send the data in the request")
        size = _optional(tensor_parameters, "binary_data_size", int, "a non-negative integer", f"{what} parameter")
        if size is not None:
            if "data" in tensor:
                raise InvalidArgument(f"{what} has both 'data' and binary_data_size: send one")
            if size < 0 or offset + size > len(binary):
                raise InvalidArgument(
                    f"{what}: binary_data_size {size} at offset {offset} runs past the {len(binary)} bytes of"
                    " binary data after the JSON header"
                )
            inputs[name] = decode_raw(binary[offset : offset + size], dtype, shape, name)  # type: ignore[arg-type]
            offset += size
        elif "data" in tensor:
            inputs[name] = _from_json(tensor["data"], dtype, shape, what)
        else:
            raise InvalidArgument(f"{what} has no 'data' (nor a binary_data_size parameter)")
    if offset != len(binary):
        raise InvalidArgument(
            f"{len(binary) - offset} bytes of binary data follow the inputs' binary_data_size total of {offset}:"
            " check Inference-Header-Content-Length and each input's binary_data_size"
        )
    outputs, classification, binary_outputs = _requested_outputs(doc.get("outputs"))
    return RestInferRequest(
        request_id or new_request_id(),
        model,
        version,
        inputs,
        outputs,
        classification,
        frozenset(binary_outputs),
        binary_all,
        deadline=time.monotonic() + timeout_us / 1e6 if timeout_us else None,
        rows=raw_rows,
    )


def encode_infer(infer: RestInferRequest, version: str, outputs: Mapping[str, np.ndarray]) -> tuple[bytes, int | None]:
    """(body, JSON header length or None): outputs as JSON data, or as binary data where asked for."""
    entries = []
    chunks: list[bytes] = []
    for name, array in outputs.items():
        datatype, raw = encode_raw(array)
        entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(array.shape)}
        if infer.binary_all or name in infer.binary_outputs:
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        elif datatype == "BYTES":
            entry["data"] = [_text(item, name) for item in array.reshape(-1)]
        else:
            entry["data"] = array.reshape(-1).tolist()
        entries.append(entry)
    header = json.dumps(
        {"model_name": infer.model, "model_version": version, "id": infer.id, "outputs": entries},
        separators=(",", ":"),
    ).encode()
    if not chunks:
        return header, None
    return b"".join([header, *chunks]), len(header)


def _text(item: object, output: str) -> str:
    if isinstance(item, str):
        return item
    try:
        return item.decode("utf-8") if isinstance(item, bytes) else str(item)
    except UnicodeDecodeError:
        raise InvalidArgument(
            f"output {output!r} holds bytes that are not UTF-8 text, which JSON cannot carry: request it with"
            ' the parameter "binary_data": true'
        ) from None


def _requested_outputs(raw: object) -> tuple[list[str], dict[str, int], list[str]]:
    if raw is None:
        return [], {}, []
    if not isinstance(raw, list):
        raise InvalidArgument("'outputs' must be a list of objects with a name")
    names: list[str] = []
    classification: dict[str, int] = {}
    binary: list[str] = []
    for i, out in enumerate(raw):
        if not isinstance(out, dict):
            raise InvalidArgument(f"outputs[{i}] must be an object with a name")
        name = _required(out, "name", str, "a string", f"outputs[{i}]")
        what = f"output {name!r}"
        if name in names:
            raise InvalidArgument(f"{what} requested twice")
        names.append(name)
        parameters = _optional(out, "parameters", dict, "an object", what) or {}
        if "shared_memory_region" in parameters:
            raise InvalidArgument(f"{what}: shared memory is not supported; omit shared_memory_region")
        if _optional(parameters, "binary_data", bool, "true or false", f"{what} parameter"):
            binary.append(name)
        k = _optional(parameters, "classification", int, "an integer", f"{what} parameter")
        if k is not None:
            if k < 1:
                raise InvalidArgument(f"{what}: classification count must be >= 1, got {k}")
            classification[name] = k
    return names, classification, binary


def _shape(raw: object, what: str) -> tuple[int, ...]:
    if not isinstance(raw, list) or not all(type(d) is int for d in raw):
        raise InvalidArgument(f"{what}: 'shape' must be a list of integers, got {json.dumps(raw)[:100]}")
    return check_shape(tuple(raw), what)


def _from_json(data: object, dtype: DataType, shape: tuple[int, ...], what: str) -> np.ndarray:
    """JSON `data`, flat or nested row-major, -> an array of `shape` (element counts checked first)."""
    count = math.prod(shape)
    if not isinstance(data, list):
        data = [data]  # a single element may come bare
    if dtype.numpy is None:  # BYTES: strings, UTF-8 encoded
        flat = flatten(data)
        if len(flat) != count:
            raise InvalidArgument(f"{what}: 'data' has {len(flat)} elements, shape {list(shape)} needs {count}")
        if not all(isinstance(x, str) for x in flat):
            raise InvalidArgument(f"{what}: BYTES data must be strings (binary data: use binary_data_size)")
        out = np.empty(count, dtype=object)
        try:
            out[:] = [x.encode("utf-8") for x in flat]
        except UnicodeEncodeError:  # JSON may escape a lone surrogate ("\ud800"); UTF-8 cannot hold one
            raise InvalidArgument(
                f"{what}: BYTES data holds a lone UTF-16 surrogate, which is not text: send such bytes as"
                " binary data (binary_data_size)"
            ) from None
        return out.reshape(shape)
    try:
        array = np.asarray(data)
    except (ValueError, OverflowError):  # ragged nesting; integers past 64 bits
        array = np.asarray(flatten(data), dtype=object)
    if array.size != count:
        raise InvalidArgument(f"{what}: 'data' has {array.size} elements, shape {list(shape)} needs {count}")
    if count == 0:
        return np.empty(shape, dtype=dtype.numpy)
    kind, target = array.dtype.kind, dtype.numpy
    if target.kind in "iu" and kind in "fO":
        # numpy reads integers past int64 beside smaller ones as float64 (or objects): keep them exact
        flat = flatten(data)
        if all(type(x) is int for x in flat):
            array, kind = np.array(flat, dtype=object), "i"
    if target.kind == "b":
        ok = kind == "b"
    elif target.kind in "iu":
        ok = kind in "iu"
        if ok:
            info = np.iinfo(target)
            if int(array.min()) < info.min or int(array.max()) > info.max:
                raise InvalidArgument(f"{what}: a value does not fit {dtype.name} ({info.min}..{info.max})")
    else:
        ok = kind in "iuf"
    if not ok:
        expected = {"b": "true or false", "i": "integers", "u": "non-negative integers"}.get(target.kind, "numbers")
        raise InvalidArgument(f"{what}: {dtype.name} data must be {expected}")
    return array.astype(target).reshape(shape)


def flatten(data: list[Any]) -> list[Any]:
    """Nested lists -> their elements in row-major order, without recursion (nesting is the client's)."""
    flat: list[Any] = []
    stack = [iter(data)]
    while stack:
        for x in stack[-1]:
            if isinstance(x, list):
                stack.append(iter(x))
                break
            flat.append(x)
        else:
            stack.pop()
    return flat


def _required(doc: dict[str, Any], key: str, kind: type, expected: str, what: str) -> Any:
    value = doc.get(key)
    if value is None:
        raise InvalidArgument(f"{what} has no {key!r}")
    return _typed(value, key, kind, expected, what)


def _optional(doc: dict[str, Any], key: str, kind: type, expected: str, what: str = "the request") -> Any:
    value = doc.get(key)
    return None if value is None else _typed(value, key, kind, expected, what)


def _typed(value: object, key: str, kind: type, expected: str, what: str) -> Any:
    # bool is an int in Python; JSON keeps them apart, and so do we
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise InvalidArgument(f"{what} {key!r} must be {expected}, got {json.dumps(value)[:100]}")
    return value

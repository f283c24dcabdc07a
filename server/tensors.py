"""Tensors on the wire <-> numpy: one datatype table, decode a request, encode a response.

The only module besides `service.py` that touches the protocol's tensor messages. Everything past
`decode_request` works on numpy arrays; everything before `encode_response` too.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from onnxgate.server.errors import InvalidArgument
from onnxgate.server.pb import grpc_service_pb2 as pb


@dataclass(frozen=True)
class DataType:
    name: str  # Open Inference Protocol name
    numpy: np.dtype | None  # None for BYTES (object arrays of bytes)
    contents_field: str | None  # InferTensorContents field for typed contents; None: raw only
    config_enum: int  # Triton's DataType enum in model_config.proto
    onnx: str  # onnxruntime's type string


def _dt(name: str, np_type: str | None, field: str | None, enum: int, onnx: str) -> DataType:
    return DataType(name, np.dtype(np_type) if np_type else None, field, enum, f"tensor({onnx})")


DATATYPES: dict[str, DataType] = {
    d.name: d
    for d in (
        _dt("BOOL", "?", "bool_contents", 1, "bool"),
        _dt("UINT8", "<u1", "uint_contents", 2, "uint8"),
        _dt("UINT16", "<u2", "uint_contents", 3, "uint16"),
        _dt("UINT32", "<u4", "uint_contents", 4, "uint32"),
        _dt("UINT64", "<u8", "uint64_contents", 5, "uint64"),
        _dt("INT8", "<i1", "int_contents", 6, "int8"),
        _dt("INT16", "<i2", "int_contents", 7, "int16"),
        _dt("INT32", "<i4", "int_contents", 8, "int32"),
        _dt("INT64", "<i8", "int64_contents", 9, "int64"),
        _dt("FP16", "<f2", None, 10, "float16"),
        _dt("FP32", "<f4", "fp32_contents", 11, "float"),
        _dt("FP64", "<f8", "fp64_contents", 12, "double"),
        _dt("BYTES", None, "bytes_contents", 13, "string"),
    )
}
BY_CONFIG_ENUM = {d.config_enum: d for d in DATATYPES.values()}
BY_NUMPY = {d.numpy: d for d in DATATYPES.values() if d.numpy is not None}
CONTENT_FIELDS = tuple(pb.InferTensorContents.DESCRIPTOR.fields_by_name)


@dataclass
class InferRequest:
    id: str
    model: str
    version: str
    inputs: dict[str, np.ndarray]
    outputs: list[str]  # requested outputs in request order; empty: all of the model's
    classification: dict[str, int]  # output name -> top-k classes asked for (Triton's extension)
    # time.monotonic() past which the request is not run (server/overload.py); None: no deadline
    deadline: float | None = dataclasses.field(default=None, kw_only=True)
    # REST rows as JSON objects (column -> value) instead of `inputs`; the model's recorded columns turn
    # them into its tensors (server/columns.py, in inference.py)
    rows: list[object] | None = dataclasses.field(default=None, kw_only=True)


def decode_request(request: pb.ModelInferRequest) -> InferRequest:
    if not request.model_name:
        raise InvalidArgument("model_name is empty: name the model to run")
    raw = request.raw_input_contents
    tensors = request.inputs
    if raw and len(raw) != len(tensors):
        raise InvalidArgument(
            f"raw_input_contents has {len(raw)} entries for {len(tensors)} inputs: send one per input, "
            "in input order, or use typed contents for all of them"
        )
    inputs: dict[str, np.ndarray] = {}
    for i, tensor in enumerate(tensors):
        name = tensor.name
        if name in inputs:
            raise InvalidArgument(f"input {name!r} appears twice")
        dtype = DATATYPES.get(tensor.datatype) or _unknown_datatype(tensor.datatype, f"input {name!r}")
        shape = check_shape(tuple(tensor.shape), f"input {name!r}")
        if raw:
            if tensor.HasField("contents"):
                raise InvalidArgument(f"input {name!r} has both raw and typed contents: send one")
            inputs[name] = decode_raw(raw[i], dtype, shape, name)
        else:
            inputs[name] = _decode_typed(tensor.contents, dtype, shape, name)
    outputs: list[str] = []
    classification: dict[str, int] = {}
    for out in request.outputs:
        if out.name in outputs:
            raise InvalidArgument(f"output {out.name!r} requested twice")
        outputs.append(out.name)
        if "classification" in out.parameters:
            k = _int_param(out.parameters["classification"], f"output {out.name!r} parameter 'classification'")
            if k < 1:
                raise InvalidArgument(f"output {out.name!r}: classification count must be >= 1, got {k}")
            classification[out.name] = k
    return InferRequest(
        request.id or new_request_id(), request.model_name, request.model_version, inputs, outputs, classification
    )


MAX_DIMS = 32  # numpy's limit (64 since numpy 2)
MAX_ELEMENTS = 2**60 - 1  # times 8 bytes an element: numpy's largest array


def check_shape(shape: tuple[int, ...], what: str) -> tuple[int, ...]:
    """A client's shape that numpy can hold at all, checked before any array is made from it (an empty
    [0, 2**70] too), on either edge."""
    # per request on every edge: builtins over the tuple, no generator, unless a dimension is 0 or negative
    if not shape:
        return shape
    if min(shape) < 0:
        raise InvalidArgument(f"{what}: shape {list(shape)} has a negative dimension")
    if len(shape) > MAX_DIMS:
        raise InvalidArgument(f"{what}: shape has {len(shape)} dimensions; at most {MAX_DIMS} are supported")
    count = math.prod(shape)
    if count > MAX_ELEMENTS or (count == 0 and math.prod(d for d in shape if d) > MAX_ELEMENTS):
        raise InvalidArgument(f"{what}: shape {list(shape)} has more elements than any tensor can hold")
    return shape


_ID_PREFIX = os.urandom(10).hex()  # 80 random bits per process: replicas never collide
_id_counter = itertools.count()


def new_request_id() -> str:
    """A unique id for a request that came without one (feedback refers to it): a random
    per-process prefix and a counter, a third of the cost of a uuid4 on every request."""
    return f"{_ID_PREFIX}{next(_id_counter):012x}"


def _unknown_datatype(name: str, what: str) -> DataType:
    hint = " (BF16 is not supported by onnxruntime's Python API)" if name == "BF16" else ""
    raise InvalidArgument(f"{what}: unknown datatype {name!r}{hint}; expected one of {', '.join(DATATYPES)}")


def _int_param(param: pb.InferParameter, what: str) -> int:
    kind = param.WhichOneof("parameter_choice")
    if kind in ("int64_param", "uint64_param"):
        return int(getattr(param, kind))
    raise InvalidArgument(f"{what} must be an integer, got {kind}")


def decode_raw(data: bytes, dtype: DataType, shape: tuple[int, ...], name: str) -> np.ndarray:
    count = math.prod(shape)
    if dtype.numpy is None:
        return _decode_bytes_elements(data, count, name).reshape(shape)
    expected = count * dtype.numpy.itemsize
    if len(data) != expected:
        raise InvalidArgument(
            f"input {name!r}: raw contents are {len(data)} bytes, but shape {list(shape)} of {dtype.name} "
            f"needs {expected} ({count} elements x {dtype.numpy.itemsize} bytes)"
        )
    array = np.frombuffer(data, dtype=dtype.numpy).reshape(shape)
    if dtype.name == "BOOL" and count and np.frombuffer(data, dtype=np.uint8).max() > 1:
        raise InvalidArgument(f"input {name!r}: BOOL elements must be bytes 0 or 1")
    return array


def _decode_bytes_elements(data: bytes, count: int, name: str) -> np.ndarray:
    if count * 4 > len(data):  # checked before allocating: the shape is the client's claim
        raise InvalidArgument(
            f"input {name!r}: {len(data)} bytes of raw BYTES contents cannot hold {count} elements "
            "(each element is a 4-byte little-endian length followed by its bytes)"
        )
    out = np.empty(count, dtype=object)
    view = memoryview(data)
    offset = 0
    for i in range(count):
        if offset + 4 > len(view):
            raise InvalidArgument(
                f"input {name!r}: raw BYTES contents end after {i} of {count} elements (each element is a "
                "4-byte little-endian length followed by that many bytes)"
            )
        (length,) = struct.unpack_from("<I", view, offset)
        offset += 4
        if offset + length > len(view):
            raise InvalidArgument(
                f"input {name!r}: BYTES element {i} declares {length} bytes but only {len(view) - offset} remain"
            )
        out[i] = bytes(view[offset : offset + length])
        offset += length
    if offset != len(view):
        raise InvalidArgument(
            f"input {name!r}: {len(view) - offset} bytes left over after {count} BYTES elements; check the shape"
        )
    return out


def _decode_typed(contents: pb.InferTensorContents, dtype: DataType, shape: tuple[int, ...], name: str) -> np.ndarray:
    if dtype.contents_field is None:
        raise InvalidArgument(
            f"input {name!r}: {dtype.name} has no typed contents field; send it in raw_input_contents"
        )
    for field in CONTENT_FIELDS:
        if field != dtype.contents_field and len(getattr(contents, field)):
            raise InvalidArgument(
                f"input {name!r}: datatype {dtype.name} expects its data in contents.{dtype.contents_field}, "
                f"got contents.{field}"
            )
    values = getattr(contents, dtype.contents_field)
    count = math.prod(shape)
    if len(values) != count:
        raise InvalidArgument(
            f"input {name!r}: contents.{dtype.contents_field} has {len(values)} elements, shape {list(shape)} needs {count}"
        )
    if dtype.numpy is None:
        array = np.empty(count, dtype=object)
        array[:] = list(values)
        return array.reshape(shape)
    try:
        return np.array(values, dtype=dtype.numpy).reshape(shape)
    except OverflowError as e:
        raise InvalidArgument(f"input {name!r}: a value does not fit {dtype.name}: {e}") from None


def encode_raw(array: np.ndarray) -> tuple[str, bytes]:
    """(datatype, raw bytes) of an output array: row-major, little-endian (native on the hosts we run)."""
    dtype = BY_NUMPY.get(array.dtype)
    if dtype is not None:
        return dtype.name, array.tobytes()
    if array.dtype == object or array.dtype.kind in "US":
        parts = []
        for item in array.reshape(-1):
            data = item if isinstance(item, bytes) else str(item).encode("utf-8")
            parts.append(struct.pack("<I", len(data)))
            parts.append(data)
        return "BYTES", b"".join(parts)
    if array.dtype.byteorder == ">" and array.dtype.newbyteorder("<") in BY_NUMPY:
        return encode_raw(array.astype(array.dtype.newbyteorder("<")))
    raise TypeError(f"no Open Inference Protocol datatype for numpy {array.dtype}")


def encode_response(
    model: str, version: str, request_id: str, outputs: Mapping[str, np.ndarray]
) -> pb.ModelInferResponse:
    response = pb.ModelInferResponse(model_name=model, model_version=version, id=request_id)
    # filled in place: a third cheaper than building each tensor message and copying it in
    tensors = response.outputs
    raws = response.raw_output_contents
    for name, array in outputs.items():
        datatype, raw = encode_raw(array)
        tensors.add(name=name, datatype=datatype, shape=array.shape)
        raws.append(raw)
    return response


def classify(scores: np.ndarray, k: int, labels: Sequence[str] | None) -> np.ndarray:
    """Triton's classification extension: the top-k classes of each batch row as b"score:index[:label]"."""
    if scores.dtype == object:
        raise InvalidArgument("classification ranks numbers, but this output holds BYTES: drop the parameter")
    rows = scores.reshape(1, -1) if scores.ndim <= 1 else scores.reshape(scores.shape[0], -1)
    k = min(k, rows.shape[1])
    # ranked as float64: '-' is refused on BOOL and wraps around on unsigned integers (0 would rank first)
    top = np.argsort(-rows.astype(np.float64), axis=1, kind="stable")[:, :k]
    out = np.empty(top.shape, dtype=object)
    for r, c in np.ndindex(top.shape):
        index = int(top[r, c])
        text = f"{float(rows[r, index]):f}:{index}"
        if labels is not None and index < len(labels):
            text += f":{labels[index]}"
        out[r, c] = text.encode()
    return out if scores.ndim > 1 else out.reshape(-1)

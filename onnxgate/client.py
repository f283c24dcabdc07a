"""A typed Python client for onnxgate (and any Open Inference Protocol v2 gRPC server), on the generated stubs.

    from onnxgate.client import Client

    with Client("localhost:8001") as client:
        result = client.infer("iris", {"input": np.array([[5.1, 3.5, 1.4, 0.2]], np.float32)})
        result["label"], result.id                     # numpy arrays by output name; the prediction id
        client.send_feedback(result.id, label="0")     # ground truth for that prediction

Over TLS, with a bearer token (docs/guides/security.md):

    Client("gateway:8001", tls=TLS(root_certificates="ca.pem"), token=open("token").read().strip())
    Client("gateway:8001", tls=TLS("ca.pem", certificate_chain="client.pem", private_key="client.key"))  # mTLS

`AsyncClient` has the same methods as coroutines. Every failure, the server's or the channel's, is one
exception type, `OnnxgateError`, carrying the gRPC status code and the server's message.

Requests and answers are built and read by the module-level functions below, shared by both clients, so
the two differ only in how they call the stubs.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import grpc
import grpc.aio
import numpy as np

from onnxgate.server.errors import InvalidArgument
from onnxgate.server.pb import feedback_pb2 as fb
from onnxgate.server.pb import feedback_pb2_grpc as fb_grpc
from onnxgate.server.pb import grpc_service_pb2 as pb
from onnxgate.server.pb import grpc_service_pb2_grpc as pb_grpc
from onnxgate.server.tensors import DATATYPES, decode_raw, encode_raw

__all__ = [
    "TLS",
    "AsyncClient",
    "Client",
    "Feedback",
    "FeedbackReport",
    "FeedbackResult",
    "InferResult",
    "ModelMetadata",
    "OnnxgateError",
    "RepositoryModel",
    "StreamFeedbackResult",
    "TensorSpec",
]

FeedbackStatus = Literal["accepted", "duplicate", "pending"]
T = TypeVar("T")


class OnnxgateError(Exception):
    """Any failed call: `code` is the gRPC status (grpc.StatusCode), `message` what the server said."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message


@dataclass(frozen=True)
class InferResult:
    """The outputs of one inference by name, and the ids that refer back to it."""

    outputs: dict[str, np.ndarray]
    id: str  # the prediction id: the key for send_feedback
    model: str
    version: str

    def __getitem__(self, name: str) -> np.ndarray:
        return self.outputs[name]


@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: str
    shape: tuple[int, ...]  # -1: any size


@dataclass(frozen=True)
class ModelMetadata:
    name: str
    versions: tuple[str, ...]
    platform: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]


@dataclass(frozen=True)
class RepositoryModel:
    name: str
    version: str
    state: str  # READY, UNAVAILABLE, ...
    reason: str


@dataclass(frozen=True)
class Feedback:
    """One feedback message for `stream_feedback`: exactly one of label/value/tensors, and/or a reward."""

    prediction_id: str
    label: str | None = None
    value: float | None = None
    tensors: Mapping[str, np.ndarray] | None = None
    reward: float | None = None
    model: str = ""
    version: str = ""
    feedback_id: str = ""


@dataclass(frozen=True)
class FeedbackResult:
    prediction_id: str
    feedback_id: str
    status: FeedbackStatus


@dataclass(frozen=True)
class StreamFeedbackResult:
    received: int
    accepted: int
    duplicate: int
    pending: int


@dataclass(frozen=True)
class FeedbackReport:
    predictions: int
    feedback: int
    joined: int
    pending: int
    unknown: int
    unknown_ids: tuple[str, ...] = field(default=())


@dataclass(frozen=True)
class TLS:
    """TLS for the channel. Each PEM is a file name (str or Path) or the PEM bytes themselves.

    root_certificates: the CA that signed the server's certificate (None: the system's roots);
    certificate_chain and private_key: this client's certificate and key, for mutual TLS;
    server_name: the name the server's certificate is checked against, when it differs from the address's
    host (e.g. connecting by IP to a certificate for a DNS name)."""

    root_certificates: str | Path | bytes | None = None
    certificate_chain: str | Path | bytes | None = None
    private_key: str | Path | bytes | None = None
    server_name: str | None = None

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=_pem(self.root_certificates),
            private_key=_pem(self.private_key),
            certificate_chain=_pem(self.certificate_chain),
        )


def _pem(value: str | Path | bytes | None) -> bytes | None:
    if value is None or isinstance(value, bytes):
        return value
    return Path(value).expanduser().read_bytes()


def _channel_settings(
    max_message_bytes: int, tls: TLS | bool | None, token: str | None
) -> tuple[list[tuple[str, Any]], grpc.ChannelCredentials | None, tuple[tuple[str, str], ...] | None]:
    """Channel options, credentials (None: plaintext) and the metadata every call carries."""
    options: list[tuple[str, Any]] = list(_options(max_message_bytes))
    if tls is True:
        tls = TLS()
    credentials = None
    if isinstance(tls, TLS):
        credentials = tls.credentials()
        if tls.server_name:
            options.append(("grpc.ssl_target_name_override", tls.server_name))
    metadata = (("authorization", f"Bearer {token}"),) if token else None
    return options, credentials, metadata


# ---- requests and answers, shared by Client and AsyncClient ----

# name -> array (a model's inputs, or its recorded columns), or a pandas DataFrame (one tensor per column)
Inputs = Mapping[str, Any] | Any


def _infer_request(
    model: str,
    inputs: Inputs,
    version: str,
    outputs: Sequence[str] | None,
    id: str | None,
) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model, model_version=version, id=id or "")
    for name, value in _named(inputs).items():
        array = np.asarray(value)
        if array.dtype.kind == "U":  # numpy strings: sent as UTF-8 BYTES
            array = array.astype(object)
        try:
            datatype, raw = encode_raw(np.ascontiguousarray(array))
        except TypeError as error:
            raise OnnxgateError(grpc.StatusCode.INVALID_ARGUMENT, f"input {name!r}: {error}") from None
        request.inputs.add(name=name, datatype=datatype, shape=array.shape)
        request.raw_input_contents.append(raw)
    for name in outputs or ():
        request.outputs.add(name=name)
    return request


def _named(inputs: Any) -> dict[str, Any]:
    """A mapping of tensors as it is, or a pandas DataFrame as one tensor per column: a model that records
    its columns (its ModelConfig's `columns` parameter) takes them by name and the gateway builds its tensors.
    Text columns (object, string or category dtype) go as BYTES, a missing text value as ""."""
    if hasattr(inputs, "columns") and hasattr(inputs, "dtypes") and not isinstance(inputs, Mapping):
        out: dict[str, Any] = {}
        for name in inputs.columns:
            column = inputs[name]
            if str(column.dtype) in ("object", "category", "string", "str") or column.dtype.kind in "OSU":
                values = [_text(v) for v in column.tolist()]
                out[str(name)] = np.array(values, dtype=object)
            else:
                out[str(name)] = column.to_numpy()
        return out
    if not isinstance(inputs, Mapping):
        raise TypeError(f"inputs must be a mapping of name -> array or a pandas DataFrame, not {type(inputs).__name__}")
    return dict(inputs)


def _text(value: Any) -> str:
    if value is None or (isinstance(value, float) and value != value):
        return ""
    return value.decode() if isinstance(value, bytes) else str(value)


def _infer_result(response: pb.ModelInferResponse) -> InferResult:
    arrays: dict[str, np.ndarray] = {}
    for i, tensor in enumerate(response.outputs):
        dtype = DATATYPES.get(tensor.datatype)
        if dtype is None or i >= len(response.raw_output_contents):
            raise OnnxgateError(
                grpc.StatusCode.INTERNAL, f"output {tensor.name!r}: unreadable answer ({tensor.datatype!r})"
            )
        try:
            arrays[tensor.name] = decode_raw(
                response.raw_output_contents[i], dtype, tuple(tensor.shape), tensor.name
            ).copy()  # a writable array the caller owns, not a view of the message's buffer
        except InvalidArgument as error:
            raise OnnxgateError(grpc.StatusCode.INTERNAL, f"malformed answer: {error.message}") from None
    return InferResult(arrays, response.id, response.model_name, response.model_version)


def _feedback_request(f: Feedback) -> fb.FeedbackRequest:
    given = [x for x in (f.label, f.value, f.tensors) if x is not None]
    if len(given) > 1:
        raise OnnxgateError(grpc.StatusCode.INVALID_ARGUMENT, "give at most one of label, value and tensors")
    if not given and f.reward is None:
        raise OnnxgateError(
            grpc.StatusCode.INVALID_ARGUMENT, "give the ground truth (label, value, tensors) or a reward"
        )
    request = fb.FeedbackRequest(
        prediction_id=f.prediction_id, model_name=f.model, model_version=f.version, feedback_id=f.feedback_id
    )
    if f.label is not None:
        request.label = f.label
    elif f.value is not None:
        request.value = float(f.value)
    elif f.tensors is not None:
        for name, value in f.tensors.items():
            request.tensors.tensors.append(_truth_tensor(name, np.asarray(value)))
    if f.reward is not None:
        request.reward = float(f.reward)
    return request


def _truth_tensor(name: str, array: np.ndarray) -> fb.TruthTensor:
    dtype = next((d for d in DATATYPES.values() if d.numpy == array.dtype and d.contents_field), None)
    if dtype is None or dtype.contents_field is None:
        raise OnnxgateError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"feedback tensor {name!r}: numpy {array.dtype} has no typed contents (send a label for strings)",
        )
    tensor = fb.TruthTensor(name=name, datatype=dtype.name, shape=array.shape)
    getattr(tensor.contents, dtype.contents_field).extend(array.reshape(-1).tolist())
    return tensor


_STATUSES: dict[int, FeedbackStatus] = {
    fb.FEEDBACK_STATUS_ACCEPTED: "accepted",
    fb.FEEDBACK_STATUS_DUPLICATE: "duplicate",
    fb.FEEDBACK_STATUS_PENDING: "pending",
}


def _feedback_result(response: fb.FeedbackResponse) -> FeedbackResult:
    return FeedbackResult(response.prediction_id, response.feedback_id, _STATUSES[response.status])


def _stream_result(response: fb.StreamFeedbackResponse) -> StreamFeedbackResult:
    return StreamFeedbackResult(response.received, response.accepted, response.duplicate, response.pending)


def _report(response: fb.FeedbackReportResponse) -> FeedbackReport:
    return FeedbackReport(
        response.predictions,
        response.feedback,
        response.joined,
        response.pending,
        response.unknown,
        tuple(response.unknown_ids),
    )


def _specs(tensors: Iterable[pb.ModelMetadataResponse.TensorMetadata]) -> tuple[TensorSpec, ...]:
    return tuple(TensorSpec(t.name, t.datatype, tuple(t.shape)) for t in tensors)


def _metadata(response: pb.ModelMetadataResponse) -> ModelMetadata:
    return ModelMetadata(
        response.name,
        tuple(response.versions),
        response.platform,
        _specs(response.inputs),
        _specs(response.outputs),
    )


def _index(response: pb.RepositoryIndexResponse) -> list[RepositoryModel]:
    return [RepositoryModel(m.name, m.version, m.state, m.reason) for m in response.models]


def _feedback_messages(items: Iterable[Feedback]) -> Iterable[fb.FeedbackRequest]:
    return (_feedback_request(f) for f in items)


def _error(error: grpc.RpcError) -> OnnxgateError:
    # grpc.RpcError raised by a call is also a grpc.Call (code(), details()); channel failures too
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    details = error.details() if hasattr(error, "details") else str(error)
    return OnnxgateError(code, details or code.name)


def _options(max_message_bytes: int) -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
    ]


class Client:
    """A blocking client. `timeout` (seconds) is the default deadline of every call; each call can override it.
    `tls`: TLS(...) or True (the system's roots) for a TLS channel; `token`: sent as `authorization: Bearer`."""

    def __init__(
        self,
        address: str = "localhost:8001",
        *,
        timeout: float | None = 60.0,
        max_message_bytes: int = 2**31 - 1,
        tls: TLS | bool | None = None,
        token: str | None = None,
    ) -> None:
        self.address = address
        self.timeout = timeout
        options, credentials, self._metadata = _channel_settings(max_message_bytes, tls, token)
        if credentials is None:
            self._channel = grpc.insecure_channel(address, options=options)
        else:
            self._channel = grpc.secure_channel(address, credentials, options=options)
        self._inference = pb_grpc.GRPCInferenceServiceStub(self._channel)  # type: ignore[no-untyped-call]
        self._feedback = fb_grpc.FeedbackStub(self._channel)  # type: ignore[no-untyped-call]

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def _call(self, method: Any, request: Any, timeout: float | None) -> Any:
        try:
            return method(request, timeout=self.timeout if timeout is None else timeout, metadata=self._metadata)
        except grpc.RpcError as error:
            raise _error(error) from None

    def infer(
        self,
        model: str,
        inputs: Inputs,
        *,
        version: str = "",
        outputs: Sequence[str] | None = None,
        id: str | None = None,
        timeout: float | None = None,
    ) -> InferResult:
        """Run `model` on `inputs` (name -> array), or on a pandas DataFrame (one tensor per column, for a
        model that records its columns); `version` "" is the one the server's policy serves."""
        request = _infer_request(model, inputs, version, outputs, id)
        return _infer_result(self._call(self._inference.ModelInfer, request, timeout))

    def send_feedback(
        self,
        prediction_id: str,
        *,
        label: str | None = None,
        value: float | None = None,
        tensors: Mapping[str, np.ndarray] | None = None,
        reward: float | None = None,
        model: str = "",
        version: str = "",
        feedback_id: str = "",
        timeout: float | None = None,
    ) -> FeedbackResult:
        """Ground truth (and/or a reward) for a prediction; returns once the server has it on disk."""
        request = _feedback_request(Feedback(prediction_id, label, value, tensors, reward, model, version, feedback_id))
        return _feedback_result(self._call(self._feedback.SendFeedback, request, timeout))

    def stream_feedback(self, items: Iterable[Feedback], *, timeout: float | None = None) -> StreamFeedbackResult:
        """Many feedback messages on one stream; returns once every one of them is on disk."""
        return _stream_result(self._call(self._feedback.StreamFeedback, _feedback_messages(items), timeout))

    def feedback_report(
        self, model: str = "", *, max_unknown_ids: int = 0, timeout: float | None = None
    ) -> FeedbackReport:
        request = fb.FeedbackReportRequest(model_name=model, max_unknown_ids=max_unknown_ids)
        return _report(self._call(self._feedback.FeedbackReport, request, timeout))

    def server_live(self, *, timeout: float | None = None) -> bool:
        return bool(self._call(self._inference.ServerLive, pb.ServerLiveRequest(), timeout).live)

    def server_ready(self, *, timeout: float | None = None) -> bool:
        return bool(self._call(self._inference.ServerReady, pb.ServerReadyRequest(), timeout).ready)

    def model_ready(self, model: str, version: str = "", *, timeout: float | None = None) -> bool:
        request = pb.ModelReadyRequest(name=model, version=version)
        return bool(self._call(self._inference.ModelReady, request, timeout).ready)

    def model_metadata(self, model: str, version: str = "", *, timeout: float | None = None) -> ModelMetadata:
        request = pb.ModelMetadataRequest(name=model, version=version)
        return _metadata(self._call(self._inference.ModelMetadata, request, timeout))

    def repository_index(self, *, ready_only: bool = False, timeout: float | None = None) -> list[RepositoryModel]:
        request = pb.RepositoryIndexRequest(ready=ready_only)
        return _index(self._call(self._inference.RepositoryIndex, request, timeout))

    def load_model(self, model: str, *, timeout: float | None = None) -> None:
        self._call(self._inference.RepositoryModelLoad, pb.RepositoryModelLoadRequest(model_name=model), timeout)

    def unload_model(self, model: str, *, timeout: float | None = None) -> None:
        self._call(self._inference.RepositoryModelUnload, pb.RepositoryModelUnloadRequest(model_name=model), timeout)


class AsyncClient:
    """The asyncio client: the same calls as `Client`, as coroutines, on a grpc.aio channel."""

    def __init__(
        self,
        address: str = "localhost:8001",
        *,
        timeout: float | None = 60.0,
        max_message_bytes: int = 2**31 - 1,
        tls: TLS | bool | None = None,
        token: str | None = None,
    ) -> None:
        self.address = address
        self.timeout = timeout
        options, credentials, self._metadata = _channel_settings(max_message_bytes, tls, token)
        if credentials is None:
            self._channel = grpc.aio.insecure_channel(address, options=options)
        else:
            self._channel = grpc.aio.secure_channel(address, credentials, options=options)
        self._inference = pb_grpc.GRPCInferenceServiceStub(self._channel)  # type: ignore[no-untyped-call]
        self._feedback = fb_grpc.FeedbackStub(self._channel)  # type: ignore[no-untyped-call]

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close(None)

    async def _call(self, method: Any, request: Any, timeout: float | None) -> Any:
        try:
            return await method(request, timeout=self.timeout if timeout is None else timeout, metadata=self._metadata)
        except grpc.RpcError as error:  # grpc.aio.AioRpcError is one
            raise _error(error) from None

    async def infer(
        self,
        model: str,
        inputs: Inputs,
        *,
        version: str = "",
        outputs: Sequence[str] | None = None,
        id: str | None = None,
        timeout: float | None = None,
    ) -> InferResult:
        request = _infer_request(model, inputs, version, outputs, id)
        return _infer_result(await self._call(self._inference.ModelInfer, request, timeout))

    async def send_feedback(
        self,
        prediction_id: str,
        *,
        label: str | None = None,
        value: float | None = None,
        tensors: Mapping[str, np.ndarray] | None = None,
        reward: float | None = None,
        model: str = "",
        version: str = "",
        feedback_id: str = "",
        timeout: float | None = None,
    ) -> FeedbackResult:
        request = _feedback_request(Feedback(prediction_id, label, value, tensors, reward, model, version, feedback_id))
        return _feedback_result(await self._call(self._feedback.SendFeedback, request, timeout))

    async def stream_feedback(
        self, items: Iterable[Feedback] | AsyncIterable[Feedback], *, timeout: float | None = None
    ) -> StreamFeedbackResult:
        messages: Any
        if isinstance(items, AsyncIterable):
            messages = (_feedback_request(f) async for f in items)
        else:
            messages = _feedback_messages(items)
        return _stream_result(await self._call(self._feedback.StreamFeedback, messages, timeout))

    async def feedback_report(
        self, model: str = "", *, max_unknown_ids: int = 0, timeout: float | None = None
    ) -> FeedbackReport:
        request = fb.FeedbackReportRequest(model_name=model, max_unknown_ids=max_unknown_ids)
        return _report(await self._call(self._feedback.FeedbackReport, request, timeout))

    async def server_live(self, *, timeout: float | None = None) -> bool:
        return bool((await self._call(self._inference.ServerLive, pb.ServerLiveRequest(), timeout)).live)

    async def server_ready(self, *, timeout: float | None = None) -> bool:
        return bool((await self._call(self._inference.ServerReady, pb.ServerReadyRequest(), timeout)).ready)

    async def model_ready(self, model: str, version: str = "", *, timeout: float | None = None) -> bool:
        request = pb.ModelReadyRequest(name=model, version=version)
        return bool((await self._call(self._inference.ModelReady, request, timeout)).ready)

    async def model_metadata(self, model: str, version: str = "", *, timeout: float | None = None) -> ModelMetadata:
        request = pb.ModelMetadataRequest(name=model, version=version)
        return _metadata(await self._call(self._inference.ModelMetadata, request, timeout))

    async def repository_index(
        self, *, ready_only: bool = False, timeout: float | None = None
    ) -> list[RepositoryModel]:
        request = pb.RepositoryIndexRequest(ready=ready_only)
        return _index(await self._call(self._inference.RepositoryIndex, request, timeout))

    async def load_model(self, model: str, *, timeout: float | None = None) -> None:
        await self._call(self._inference.RepositoryModelLoad, pb.RepositoryModelLoadRequest(model_name=model), timeout)

    async def unload_model(self, model: str, *, timeout: float | None = None) -> None:
        await self._call(
            self._inference.RepositoryModelUnload, pb.RepositoryModelUnloadRequest(model_name=model), timeout
        )

"""Hostile input over gRPC (issue 10, item 1): property-based tests that send a few thousand malformed
requests per run to every RPC of a real gateway, the Feedback service included, and to the model control
RPCs of a second gateway in explicit mode. Every answer is OK or a status that says the client is wrong
(INVALID_ARGUMENT, NOT_FOUND, RESOURCE_EXHAUSTED, FAILED_PRECONDITION; UNAVAILABLE only for a model in
the repository but not loaded) with a message; never INTERNAL or UNKNOWN, never a crash; after each test a
valid request still gets the right answer. A spawned gateway's resident memory stays flat under requests
that declare huge shapes and send a few bytes.

Cases are derandomized (the same ones every run; `@example`s pin what once failed). docs/explanation/reliability.md
lists what is generated and what was found. Run: .venv/bin/pytest -q tests/hardening
"""

from __future__ import annotations

import asyncio
import math
import shutil
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from onnxgate.server.app import Gateway
from onnxgate.server.config import load_settings
from onnxgate.server.pb import feedback_pb2 as fpb
from onnxgate.server.pb import grpc_service_pb2 as pb
from onnxgate.server.tensors import DATATYPES
from tests.conftest import GatewayHandle, SpawnedGateway
from tests.models import typed_repository

S = grpc.StatusCode
ALLOWED = {S.OK, S.INVALID_ARGUMENT, S.NOT_FOUND, S.RESOURCE_EXHAUSTED, S.FAILED_PRECONDITION}
INFER = "/inference.GRPCInferenceService/"
FEEDBACK = "/onnxgate.v1.Feedback/"
OPTIONS = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]
# what each model takes: {model: {input: (datatype, shape)}}; outputs by model
INPUTS: dict[str, dict[str, tuple[str, list[int]]]] = {
    **{f"id_{d.lower()}": {"x": (d, [-1, 3])} for d in DATATYPES},
    "add_mul": {"a": ("FP32", [-1, 4]), "b": ("FP32", [-1, 4])},
    "petal_width": {
        "species": ("BYTES", [-1, 1]),
        **{c: ("FP32", [-1, 1]) for c in ("sepal_length", "sepal_width", "petal_length")},
    },
    "iris": {"input": ("FP32", [-1, 4])},
}
OUTPUTS = {**{m: ["y", "y2"] for m in INPUTS if m.startswith("id_")}, "add_mul": ["sum", "scaled"]}
OUTPUTS |= {"petal_width": ["prediction"], "iris": ["label", "probabilities"]}
MODELS = sorted(INPUTS)

settings.register_profile(
    "hardening",
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
FUZZ = settings.get_profile("hardening")


def fuzz(n: int) -> Callable[[Any], Any]:
    return settings(FUZZ, max_examples=n)


# -- gateways and calls --------------------------------------------------------------------------------


def _start(repository: Path, **flags: Any) -> GatewayHandle:
    """As conftest's start_gateway, for a module-scoped fixture."""
    base = {"model_repository": repository, "grpc_port": 0, "metrics_port": 0, "http_port": -1}
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    gateway = Gateway(load_settings(env={}, flags={**base, **flags}), repository)
    asyncio.run_coroutine_threadsafe(gateway.start(), loop).result(120)
    return GatewayHandle(gateway, loop, thread)


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory, example_repository: Path) -> Path:
    repo = typed_repository(tmp_path_factory.mktemp("hostile") / "repository")
    for name in ("petal_width", "iris"):  # a string input into a pipeline; classification labels
        shutil.copytree(example_repository / name, repo / name)
    return repo


@pytest.fixture(scope="module")
def gateway(repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayHandle]:
    handle = _start(repo, predlog_dir=str(tmp_path_factory.mktemp("predlog")))
    yield handle
    handle.stop()


class Client:
    """Raw calls on a real channel: requests are bytes (a serialized message, or not), answers (code, details)."""

    def __init__(self, address: str) -> None:
        self.channel = grpc.insecure_channel(address, options=OPTIONS)

    def unary(self, method: str, request: bytes | Any) -> tuple[grpc.StatusCode, str, bytes]:
        data = request if isinstance(request, bytes) else request.SerializeToString()
        call = self.channel.unary_unary(method, request_serializer=None, response_deserializer=None)
        try:
            return S.OK, "", call(data, timeout=30)
        except grpc.RpcError as e:
            return e.code(), e.details() or "", b""

    def stream_in(self, method: str, requests: list[bytes]) -> tuple[grpc.StatusCode, str]:
        call = self.channel.stream_unary(method, request_serializer=None, response_deserializer=None)
        try:
            call(iter(requests), timeout=30)
            return S.OK, ""
        except grpc.RpcError as e:
            return e.code(), e.details() or ""

    def stream_both(self, method: str, requests: list[bytes]) -> tuple[grpc.StatusCode, str, list[bytes]]:
        call = self.channel.stream_stream(method, request_serializer=None, response_deserializer=None)
        answers: list[bytes] = []
        try:
            for answer in call(iter(requests), timeout=30):
                answers.append(answer)
            return S.OK, "", answers
        except grpc.RpcError as e:
            return e.code(), e.details() or "", answers


@pytest.fixture(scope="module")
def client(gateway: GatewayHandle) -> Iterator[Client]:
    c = Client(gateway.address)
    yield c
    c.channel.close()


def check(code: grpc.StatusCode, details: str, allowed: set[grpc.StatusCode] = ALLOWED) -> None:
    event(code.name)  # --hypothesis-show-statistics: how the answers spread
    assert code in allowed, f"{code.name}: {details}"
    if code != S.OK:
        assert details.strip(), f"{code.name} without a message"
        assert "internal error" not in details, details


def valid_infer(model: str = "id_fp32") -> pb.ModelInferRequest:
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    tensor = pb.ModelInferRequest.InferInputTensor(name="x", datatype="FP32", shape=[2, 3])
    return pb.ModelInferRequest(model_name=model, inputs=[tensor], raw_input_contents=[x.tobytes()])


def assert_answers(client: Client) -> None:
    """A valid request still gets the right answer."""
    code, details, data = client.unary(INFER + "ModelInfer", valid_infer())
    assert code == S.OK, details
    response = pb.ModelInferResponse.FromString(data)
    y = np.frombuffer(response.raw_output_contents[0], dtype=np.float32)
    assert y.tolist() == [0, 1, 2, 3, 4, 5]
    code, details, _ = client.unary(INFER + "ModelMetadata", pb.ModelMetadataRequest(name="add_mul"))
    assert code == S.OK, details


@pytest.fixture(autouse=True)
def still_answers(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if "client" in request.fixturenames:
        assert_answers(request.getfixturevalue("client"))


# -- strategies ----------------------------------------------------------------------------------------

ODD_NAMES = [
    "", ".", "..", "/", "../id_fp32", "id_fp32/..", "id_fp32/", "/etc/passwd", "id_fp32\x00", "\x00", "a" * 300,
    "x" * 100_000, "ID_FP32", " id_fp32", "id_fp32 ", "id fp32", "é" * 5000, "\U0001f600", "-", ".upload-x",
]  # fmt: skip
names = st.one_of(
    st.sampled_from(MODELS),
    st.sampled_from(ODD_NAMES),
    st.text(max_size=30),
    st.text(st.characters(codec="utf-8"), min_size=100, max_size=3000),
    st.builds(lambda a, b: f"{a}/{b}", st.sampled_from([*MODELS, "..", ""]), st.text(max_size=10)),
)
ODD_VERSIONS = [
    "1", "2", "0", "-1", " 1", "1 ", "+1", "1_0", "\uff11", "\u0661", "1.0", "1e3", "0x1", "latest", "9" * 19,
    "9" * 5000, "\x00", "1\x00",
]  # fmt: skip
versions = st.one_of(
    st.just(""), st.sampled_from(ODD_VERSIONS), st.text(max_size=10), st.integers(-(2**70), 2**70).map(str)
)
ODD_DATATYPES = ["", "BF16", "fp32", "FLOAT", "STRING", "FP32 ", "INT128", "\x00", "BYTES\x00"]
datatypes = st.one_of(st.sampled_from(sorted(DATATYPES)), st.sampled_from(ODD_DATATYPES), st.text(max_size=8))
HUGE = [2**31, 2**32 + 1, 2**40, 2**61, 2**62, 2**63 - 1, -(2**63), -1]
shapes = st.one_of(
    st.lists(st.integers(0, 4), min_size=1, max_size=3),
    st.lists(st.integers(-3, 5), max_size=4),
    st.lists(st.one_of(st.integers(0, 3), st.sampled_from(HUGE)), min_size=1, max_size=6),
    st.lists(st.integers(0, 2), min_size=30, max_size=80),  # more dimensions than numpy takes
)
CONTENT_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "bool_contents": st.booleans(),
    "int_contents": st.integers(-(2**31), 2**31 - 1),
    "int64_contents": st.integers(-(2**63), 2**63 - 1),
    "uint_contents": st.integers(0, 2**32 - 1),
    "uint64_contents": st.integers(0, 2**64 - 1),
    "fp32_contents": st.floats(width=32),
    "fp64_contents": st.floats(),
    "bytes_contents": st.binary(max_size=8),
}
parameter_values = st.one_of(
    st.builds(lambda v: pb.InferParameter(bool_param=v), st.booleans()),
    st.builds(lambda v: pb.InferParameter(int64_param=v), st.integers(-(2**63), 2**63 - 1)),
    st.builds(lambda v: pb.InferParameter(uint64_param=v), st.integers(0, 2**64 - 1)),
    st.builds(lambda v: pb.InferParameter(string_param=v), st.text(max_size=20)),
    st.builds(lambda v: pb.InferParameter(double_param=v), st.floats()),
    st.just(pb.InferParameter()),
)
PARAMETER_KEYS = ["classification", "binary_data", "binary_data_output", "timeout", "priority", "sequence_id",
                  "sequence_start", "sequence_end", "shared_memory_region", "max_batch_size", ""]  # fmt: skip
parameters = st.one_of(
    st.just({}),
    st.just({}),
    st.dictionaries(st.one_of(st.sampled_from(PARAMETER_KEYS), st.text(max_size=10)), parameter_values, max_size=3),
)


def _count(shape: list[int]) -> int | None:
    """Elements of a shape small enough to fill, else None."""
    if any(d < 0 for d in shape) or len(shape) > 32:
        return None
    n = math.prod(shape)
    return n if n <= 64 else None


def bytes_elements(elements: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


@st.composite
def raw_contents(draw: st.DrawFn, datatype: str, shape: list[int]) -> bytes:
    n = _count(shape)
    dtype = DATATYPES.get(datatype)
    kind = draw(st.sampled_from(["exact"] * 6 + ["off", "off", "random", "empty"]))
    if dtype is None or n is None or kind == "random":
        return draw(st.binary(max_size=64))
    if kind == "empty":
        return b""
    if dtype.numpy is None:  # BYTES: 4-byte little-endian length prefixes
        elements = draw(st.lists(st.binary(max_size=6), min_size=n, max_size=n))
        data = bytes_elements(elements)
        if kind == "off":  # a malformed prefix, a cut, or bytes left over
            how = draw(st.sampled_from(["cut", "huge", "extra", "prefix-only"]))
            if how == "cut" and data:
                data = data[: draw(st.integers(0, len(data) - 1))]
            elif how == "huge":
                data = struct.pack("<I", draw(st.sampled_from([2**32 - 1, 2**31, 10**6]))) + data
            elif how == "extra":
                data += draw(st.binary(min_size=1, max_size=5))
            else:
                data = b"\xff\xff"
        return data
    size = n * dtype.numpy.itemsize
    if kind == "off":
        size = max(0, size + draw(st.sampled_from([-9, -1, 1, 3, 8])))
    return draw(st.binary(min_size=size, max_size=size))


@st.composite
def typed_contents(draw: st.DrawFn, datatype: str, shape: list[int]) -> pb.InferTensorContents:
    dtype = DATATYPES.get(datatype)
    field = dtype.contents_field if dtype is not None and draw(st.integers(0, 4)) else None
    if field is None:
        field = draw(st.sampled_from(sorted(CONTENT_VALUES)))
    n = _count(shape)
    size = n + draw(st.sampled_from([0, 0, 0, -1, 1])) if n is not None else draw(st.integers(0, 5))
    values = draw(st.lists(CONTENT_VALUES[field], min_size=max(size, 0), max_size=max(size, 0)))
    contents = pb.InferTensorContents()
    getattr(contents, field).extend(values)
    if draw(st.integers(0, 9)) == 0:  # two fields at once
        other = draw(st.sampled_from(sorted(CONTENT_VALUES)))
        getattr(contents, other).extend(draw(st.lists(CONTENT_VALUES[other], min_size=1, max_size=3)))
    return contents


@st.composite
def infer_requests(draw: st.DrawFn) -> pb.ModelInferRequest:
    """Mostly a real model's inputs, each part possibly wrong: names, datatypes, shapes, contents."""
    model = draw(st.sampled_from(MODELS)) if draw(st.integers(0, 9)) else draw(names)
    version = "" if draw(st.integers(0, 5)) else draw(versions)
    spec = list(INPUTS.get(model, {"x": ("FP32", [-1, 3])}).items())
    plan = draw(st.sampled_from(["as-is"] * 6 + ["drop", "duplicate", "unknown", "extra"]))
    if plan == "drop" and spec:
        spec.pop(draw(st.integers(0, len(spec) - 1)))
    elif plan == "duplicate" and spec:
        spec.append(spec[0])
    elif plan in ("unknown", "extra"):
        unknown = (draw(st.one_of(st.sampled_from(["", "x", "y", "X", "a\x00"]), st.text(max_size=12))), spec[0][1])
        spec = [*spec, unknown] if plan == "extra" else [unknown, *spec[1:]]
    batch = draw(st.integers(0, 3))
    mode = draw(st.sampled_from(["raw"] * 5 + ["typed"] * 3 + ["mixed", "raw-count", "none"]))
    request = pb.ModelInferRequest(model_name=model, model_version=version, id=draw(st.text(max_size=12)))
    for name, (datatype, want) in spec:
        if draw(st.integers(0, 7)) == 0:
            datatype = draw(datatypes)
        shape = [batch if d == -1 else d for d in want] if draw(st.integers(0, 5)) else draw(shapes)
        tensor = request.inputs.add(name=name, datatype=datatype, shape=shape)
        if mode in ("raw", "raw-count", "mixed"):
            request.raw_input_contents.append(draw(raw_contents(datatype, shape)))
        if mode == "typed" or (mode == "mixed" and draw(st.booleans())):
            tensor.contents.CopyFrom(draw(typed_contents(datatype, shape)))
        for key, value in draw(parameters).items():
            tensor.parameters[key].CopyFrom(value)
    if mode == "raw-count":
        if request.raw_input_contents and draw(st.booleans()):
            del request.raw_input_contents[-1]
        else:
            request.raw_input_contents.append(b"\0" * 4)
    for _ in range(draw(st.sampled_from([0, 0, 0, 1, 2, 3]))):
        known = OUTPUTS.get(model, ["y"])
        out = request.outputs.add(name=draw(st.one_of(st.sampled_from([*known, "nope", ""]), st.text(max_size=8))))
        if draw(st.integers(0, 2)) == 0:
            k = st.builds(lambda v: pb.InferParameter(int64_param=v), st.integers(-2, 5))
            out.parameters["classification"].CopyFrom(draw(st.one_of(k, parameter_values)))
        for key, value in draw(parameters).items():
            out.parameters[key].CopyFrom(value)
    for key, value in draw(parameters).items():
        request.parameters[key].CopyFrom(value)
    return request


def _request(model: str, inputs: list[tuple[str, str, list[int], bytes]], **kw: Any) -> pb.ModelInferRequest:
    return pb.ModelInferRequest(
        model_name=model,
        inputs=[pb.ModelInferRequest.InferInputTensor(name=n, datatype=d, shape=s) for n, d, s, _ in inputs],
        raw_input_contents=[r for *_, r in inputs],
        **kw,
    )


# -- ModelInfer ----------------------------------------------------------------------------------------


@fuzz(1500)
@given(request=infer_requests())
@example(request=_request("id_fp32", [("x", "FP32", [2**40, 3], b"\0" * 12)]))
@example(request=_request("id_bytes", [("x", "BYTES", [2**31, 3], b"\1\0\0\0a")]))
@example(request=_request("id_bytes", [("x", "BYTES", [1, 3], b"\xff\xff\xff\xff" + b"\0" * 8)]))
@example(request=_request("id_fp32", [("x" * 100_000, "FP32", [1, 3], b"\0" * 12)]))  # echoed name: trailer cut
@example(request=_request("x" * 100_000, []))
@example(request=_request("id_fp32", [("x", "FP32", [0, 2**62, 2**62], b"")]))
@example(request=_request("id_fp32", [("x", "FP32", [1, 3], b"\0" * 12)], model_version="\uff11"))
@example(request=_request("petal_width", [("species", "BYTES", [1, 1], b"\2\0\0\0\xff\xfe")]))
def test_model_infer(client: Client, request: pb.ModelInferRequest) -> None:
    code, details, data = client.unary(INFER + "ModelInfer", request)
    check(code, details)
    if code == S.OK:
        response = pb.ModelInferResponse.FromString(data)
        assert response.model_name == request.model_name
        assert len(response.raw_output_contents) == len(response.outputs)


@fuzz(40)
@given(requests=st.lists(st.one_of(infer_requests(), st.binary(max_size=40)), min_size=1, max_size=6))
def test_model_stream_infer(client: Client, requests: list[pb.ModelInferRequest | bytes]) -> None:
    """Errors travel in error_message and the stream goes on; a frame that is not a message ends it
    INVALID_ARGUMENT."""
    frames = [r if isinstance(r, bytes) else r.SerializeToString() for r in requests]
    frames.append(valid_infer().SerializeToString())
    code, details, answers = client.stream_both(INFER + "ModelStreamInfer", frames)
    check(code, details)
    for data in answers:
        answer = pb.ModelStreamInferResponse.FromString(data)
        assert "internal error" not in answer.error_message, answer.error_message
    if code == S.OK:
        assert len(answers) == len(frames)
        assert not pb.ModelStreamInferResponse.FromString(answers[-1]).error_message


# -- the other inference RPCs, and bytes that are not a message ----------------------------------------

NAMED = {
    "ModelMetadata": pb.ModelMetadataRequest,
    "ModelReady": pb.ModelReadyRequest,
    "ModelConfig": pb.ModelConfigRequest,
}


@fuzz(600)
@given(method=st.sampled_from([*NAMED, "ModelStatistics"]), name=names, version=versions)
@example(method="ModelMetadata", name="x" * 100_000, version="")
@example(method="ModelConfig", name="id_fp32", version="9" * 5000)
@example(method="ModelReady", name="id_fp32", version="\uff11")
def test_model_rpcs(client: Client, method: str, name: str, version: str) -> None:
    request = pb.ModelStatisticsRequest(name=name, version=version) if method == "ModelStatistics" else None
    code, details, _ = client.unary(INFER + method, request or NAMED[method](name=name, version=version))
    check(code, details)


METHODS = [INFER + m for m in ("ModelInfer", *NAMED, "ModelStatistics", "RepositoryIndex", "ServerLive",
                               "ServerReady", "ServerMetadata", "RepositoryModelLoad", "RepositoryModelUnload")]  # fmt: skip
METHODS += [FEEDBACK + "SendFeedback", FEEDBACK + "FeedbackReport"]


@st.composite
def mangled(draw: st.DrawFn) -> bytes:
    """Random bytes, a valid message cut short, or one with bytes flipped (a string field not UTF-8)."""
    data = valid_infer().SerializeToString()
    how = draw(st.sampled_from(["random", "cut", "flip", "utf8"]))
    if how == "random":
        return draw(st.binary(max_size=200))
    if how == "cut":
        return data[: draw(st.integers(1, len(data) - 1))]
    if how == "utf8":  # field 1 (a string in every request here) holding bytes that are not UTF-8
        return b"\x0a\x02\xff\xfe"
    i = draw(st.integers(0, len(data) - 1))
    return data[:i] + bytes([data[i] ^ draw(st.integers(1, 255))]) + data[i + 1 :]


@fuzz(400)
@given(method=st.sampled_from(METHODS), data=mangled())
@example(method=INFER + "ModelInfer", data=b"\xff\xff\xff")
@example(method=FEEDBACK + "SendFeedback", data=b"\x0a\x02\xff\xfe")
def test_bytes_not_a_message(client: Client, method: str, data: bytes) -> None:
    code, details, _ = client.unary(method, data)
    check(code, details)


@fuzz(20)
@given(ready=st.booleans())
def test_repository_index(client: Client, ready: bool) -> None:
    code, details, _ = client.unary(INFER + "RepositoryIndex", pb.RepositoryIndexRequest(ready=ready))
    assert code == S.OK, details


# -- Feedback ------------------------------------------------------------------------------------------


@st.composite
def truth_tensors(draw: st.DrawFn) -> fpb.TruthTensor:
    datatype = draw(st.one_of(st.sampled_from(sorted(DATATYPES)), datatypes))
    shape = draw(st.one_of(st.lists(st.integers(0, 3), max_size=3), shapes))
    field = draw(st.sampled_from(sorted(CONTENT_VALUES)))
    n = _count(shape)
    size = n if n is not None and draw(st.integers(0, 3)) else draw(st.integers(0, 4))
    contents = pb.InferTensorContents()
    getattr(contents, field).extend(draw(st.lists(CONTENT_VALUES[field], min_size=size, max_size=size)))
    return fpb.TruthTensor(name=draw(st.text(max_size=8)), datatype=datatype, shape=shape, contents=contents)


@st.composite
def feedback_requests(draw: st.DrawFn) -> fpb.FeedbackRequest:
    request = fpb.FeedbackRequest(
        prediction_id=draw(st.one_of(st.text(max_size=20), st.sampled_from(["", "x" * 100_000, "\x00"]))),
        model_name=draw(st.one_of(st.just(""), names)),
        model_version=draw(st.one_of(st.just(""), versions)),
        feedback_id=draw(st.one_of(st.just(""), st.text(max_size=20), st.just("f" * 50_000))),
        sent_at_unix_ms=draw(st.one_of(st.just(0), st.integers(-(2**63), 2**63 - 1))),
    )
    truth = draw(st.sampled_from(["label", "value", "tensors", "none"]))
    if truth == "label":
        request.label = draw(st.one_of(st.text(max_size=20), st.just("l" * 100_000)))
    elif truth == "value":
        request.value = draw(st.floats())
    elif truth == "tensors":
        request.tensors.tensors.extend(draw(st.lists(truth_tensors(), max_size=3)))
    if draw(st.booleans()):
        request.reward = draw(st.floats())
    return request


@fuzz(300)
@given(request=feedback_requests())
@example(request=fpb.FeedbackRequest(prediction_id="p", value=1.0, sent_at_unix_ms=2**63 - 1))  # was UNAVAILABLE
def test_send_feedback(client: Client, request: fpb.FeedbackRequest) -> None:
    code, details, data = client.unary(FEEDBACK + "SendFeedback", request)
    check(code, details)
    if code == S.OK:
        assert fpb.FeedbackResponse.FromString(data).prediction_id == request.prediction_id


@fuzz(40)
@given(requests=st.lists(st.one_of(feedback_requests(), mangled()), max_size=5))
def test_stream_feedback(client: Client, requests: list[fpb.FeedbackRequest | bytes]) -> None:
    frames = [r if isinstance(r, bytes) else r.SerializeToString() for r in requests]
    code, details = client.stream_in(FEEDBACK + "StreamFeedback", frames)
    check(code, details)


@fuzz(40)
@given(model=st.one_of(st.just(""), names), max_ids=st.integers(0, 2**32 - 1))
@example(model="", max_ids=0)  # was INTERNAL once an FP16 prediction was in the open log segment
def test_feedback_report(client: Client, model: str, max_ids: int) -> None:
    request = fpb.FeedbackReportRequest(model_name=model, max_unknown_ids=max_ids)
    code, details, _ = client.unary(FEEDBACK + "FeedbackReport", request)
    check(code, details)


# -- model control, in explicit mode -------------------------------------------------------------------


@pytest.fixture(scope="module")
def explicit(repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Client]:
    copy = tmp_path_factory.mktemp("explicit") / "repository"
    for name in ("id_fp32", "add_mul"):
        shutil.copytree(repo / name, copy / name)
    handle = _start(copy, model_control_mode="explicit", load_model=("id_fp32",))
    c = Client(handle.address)
    yield c
    c.channel.close()
    handle.stop()


load_parameters = st.dictionaries(
    st.one_of(st.sampled_from(["config", "file:1/model.onnx", "file:../x", "file:", "file:1/../../x"]), st.text(max_size=10)),
    st.one_of(
        st.builds(lambda v: pb.ModelRepositoryParameter(string_param=v), st.sampled_from(["{}", "{", "[]", '{"max_batch_size": -1}'])),
        st.builds(lambda v: pb.ModelRepositoryParameter(bytes_param=v), st.binary(max_size=40)),
        st.builds(lambda v: pb.ModelRepositoryParameter(int64_param=v), st.integers(-(2**63), 2**63 - 1)),
        st.builds(lambda v: pb.ModelRepositoryParameter(bool_param=v), st.booleans()),
        st.just(pb.ModelRepositoryParameter()),
    ),
    max_size=3,
)  # fmt: skip


@fuzz(150)
@given(
    unload=st.booleans(),
    name=st.one_of(st.sampled_from(["id_fp32", "add_mul", "up_a", "nope"]), names),
    params=load_parameters,
)
def test_model_control(explicit: Client, unload: bool, name: str, params: dict[str, Any]) -> None:
    """Uploads go only to scratch names or invalid ones: the models the final check uses stay intact."""
    if unload:
        request: Any = pb.RepositoryModelUnloadRequest(model_name=name)
    else:
        if params and name in ("id_fp32", "add_mul"):
            name = "up_a"
        request = pb.RepositoryModelLoadRequest(model_name=name)
        for key, value in params.items():
            request.parameters[key].CopyFrom(value)
    method = "RepositoryModelUnload" if unload else "RepositoryModelLoad"
    code, details, _ = explicit.unary(INFER + method, request)
    check(code, details, ALLOWED | {S.UNAVAILABLE})
    if code == S.UNAVAILABLE:  # only a model in the repository that does not load
        assert "load" in details, details
    # answers afterwards: the model loads, and serves
    if (unload and name == "id_fp32") or name == "nope":
        code, details, _ = explicit.unary(
            INFER + "RepositoryModelLoad", pb.RepositoryModelLoadRequest(model_name="id_fp32")
        )
        assert code == S.OK, details
        code, details, _ = explicit.unary(INFER + "ModelInfer", valid_infer())
        assert code == S.OK, details


# -- memory: huge declared shapes, tiny contents -------------------------------------------------------


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_memory_bounded(repo: Path, spawn_gateway: Callable[..., SpawnedGateway]) -> None:
    """No allocation follows a declared shape before it is checked against the bytes that came."""
    gw = spawn_gateway("--model-repository", str(repo))
    c = Client(gw.address)
    try:
        for _ in range(20):
            assert c.unary(INFER + "ModelInfer", valid_infer())[0] == S.OK
        before = _rss(gw.process.pid)
        started = time.monotonic()
        for i in range(300):
            dt = sorted(DATATYPES)[i % len(DATATYPES)]
            shape = [2**31 + i, 3] if i % 3 else [2**20, 2**20, 2**10]
            raw = _request(f"id_{dt.lower()}", [("x", dt, shape, b"\1\0\0\0a" * 3)])
            typed = pb.ModelInferRequest(model_name=f"id_{dt.lower()}")
            typed.inputs.add(name="x", datatype=dt, shape=shape)
            for request in (raw, typed):
                code, details, _ = c.unary(INFER + "ModelInfer", request)
                assert code == S.INVALID_ARGUMENT, details
        assert time.monotonic() - started < 60
        grown = _rss(gw.process.pid) - before
        assert grown < 64 * 2**20, f"RSS grew {grown / 2**20:.1f} MiB"
        assert c.unary(INFER + "ModelInfer", valid_infer())[0] == S.OK
    finally:
        c.channel.close()

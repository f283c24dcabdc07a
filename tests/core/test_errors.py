"""Every error code the gateway answers, with a message that tells the caller what to fix."""

from __future__ import annotations

import struct
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest

from onnxgate.server.pb import grpc_service_pb2 as pb
from tests.models import first_row_only, identity, matmul_square, write_version


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("errors")
    write_version(repo, "fp32", 1, identity("FP32"))
    write_version(repo, "text", 1, identity("BYTES"))
    write_version(repo, "broken", 1, b"this is not an onnx file")
    write_version(
        repo,
        "unbatchable",
        1,
        first_row_only(),
        config="max_batch_size: 8\ndynamic_batching { max_queue_delay_microseconds: 1000 }\n",
    )
    write_version(repo, "slow", 1, matmul_square(700))
    return repo


def fp32_request(
    model: str = "fp32", shape: tuple[int, ...] = (2, 3), raw: bytes | None = None, **kw: object
) -> pb.ModelInferRequest:
    data = np.zeros(shape, np.float32).tobytes() if raw is None else raw
    tensor = pb.ModelInferRequest.InferInputTensor(
        name=kw.pop("name", "x"), datatype=kw.pop("datatype", "FP32"), shape=shape
    )  # type: ignore[arg-type]
    return pb.ModelInferRequest(model_name=model, inputs=[tensor], raw_input_contents=[data], **kw)  # type: ignore[arg-type]


def call_error(stub, request: pb.ModelInferRequest) -> grpc.RpcError:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(request)
    return err.value


CASES = [
    ("unknown model", fp32_request(model="nope"), grpc.StatusCode.NOT_FOUND, "unknown model 'nope'"),
    ("unknown version", fp32_request(model_version="9"), grpc.StatusCode.NOT_FOUND, "no version 9"),
    ("version not a number", fp32_request(model_version="latest"), grpc.StatusCode.INVALID_ARGUMENT, "not an integer"),
    (
        "wrong datatype",
        fp32_request(datatype="FP64", raw=np.zeros((2, 3)).tobytes()),
        grpc.StatusCode.INVALID_ARGUMENT,
        "expects FP32",
    ),
    ("unknown datatype", fp32_request(datatype="FLOAT"), grpc.StatusCode.INVALID_ARGUMENT, "unknown datatype 'FLOAT'"),
    ("wrong shape", fp32_request(shape=(2, 4)), grpc.StatusCode.INVALID_ARGUMENT, "shape [2, 4] sent"),
    ("wrong rank", fp32_request(shape=(6,)), grpc.StatusCode.INVALID_ARGUMENT, "the model expects [-1, 3]"),
    ("negative dim", fp32_request(shape=(-1, 3), raw=b""), grpc.StatusCode.INVALID_ARGUMENT, "negative dimension"),
    # an empty tensor numpy still cannot make (was INTERNAL "array is too big")
    ("empty huge", fp32_request(shape=(0, 2**62), raw=b""), grpc.StatusCode.INVALID_ARGUMENT, "more elements than"),
    ("too many dims", fp32_request(shape=(1,) * 40, raw=b""), grpc.StatusCode.INVALID_ARGUMENT, "40 dimensions"),
    (
        "short raw bytes",
        fp32_request(raw=b"\x00" * 23),
        grpc.StatusCode.INVALID_ARGUMENT,
        "23 bytes, but shape [2, 3] of FP32 needs 24",
    ),
    (
        "unknown input",
        fp32_request(name="z"),
        grpc.StatusCode.INVALID_ARGUMENT,
        "missing input(s) 'x'; unknown input(s) 'z'",
    ),
    ("no model name", fp32_request(model=""), grpc.StatusCode.INVALID_ARGUMENT, "model_name is empty"),
    ("over max batch", fp32_request(shape=(2000, 3)), grpc.StatusCode.INVALID_ARGUMENT, "exceeds max_batch_size 1024"),
    ("failed load", fp32_request(model="broken"), grpc.StatusCode.UNAVAILABLE, "failed"),
]


@pytest.mark.parametrize(("case", "request_", "code", "message"), CASES, ids=[c[0] for c in CASES])
def test_error_codes_and_messages(
    start_gateway, repo: Path, case: str, request_: pb.ModelInferRequest, code: grpc.StatusCode, message: str
) -> None:  # type: ignore[no-untyped-def]
    stub = start_gateway(repo).stub()
    err = call_error(stub, request_)
    assert err.code() == code, err.details()
    assert message in err.details()


def test_bytes_errors_truncated_and_leftover(start_gateway, repo: Path) -> None:  # type: ignore[no-untyped-def]
    stub = start_gateway(repo).stub()
    good = b"".join(struct.pack("<I", 2) + b"ab" for _ in range(3))

    def request(raw: bytes) -> pb.ModelInferRequest:
        tensor = pb.ModelInferRequest.InferInputTensor(name="x", datatype="BYTES", shape=[1, 3])
        return pb.ModelInferRequest(model_name="text", inputs=[tensor], raw_input_contents=[raw])

    assert stub.ModelInfer(request(good)).outputs[0].shape == [1, 3]
    for raw, message in (
        (good[:-1], "declares 2 bytes but only 1 remain"),
        (good[:9], "9 bytes of raw BYTES contents cannot hold 3 elements"),
        (good[:13], "end after 2 of 3 elements"),
        (good + b"x", "1 bytes left over"),
        (struct.pack("<I", 1) + b"\xff" + good[6:], "not UTF-8"),
    ):
        err = call_error(stub, request(raw))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert message in err.details()
    # a shape claiming a trillion elements is refused before anything is allocated for it
    huge = pb.ModelInferRequest(
        model_name="text",
        inputs=[pb.ModelInferRequest.InferInputTensor(name="x", datatype="BYTES", shape=[10**12, 3])],
        raw_input_contents=[good],
    )
    err = call_error(stub, huge)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "cannot hold 3000000000000 elements" in err.details()


def test_typed_contents_errors(start_gateway, repo: Path) -> None:  # type: ignore[no-untyped-def]
    stub = start_gateway(repo).stub()
    tensor = pb.ModelInferRequest.InferInputTensor(name="x", datatype="FP32", shape=[1, 3])
    tensor.contents.fp32_contents.extend([1.0, 2.0])
    err = call_error(stub, pb.ModelInferRequest(model_name="fp32", inputs=[tensor]))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "has 2 elements, shape [1, 3] needs 3" in err.details()
    tensor = pb.ModelInferRequest.InferInputTensor(name="x", datatype="FP32", shape=[1, 3])
    tensor.contents.int_contents.extend([1, 2, 3])
    err = call_error(stub, pb.ModelInferRequest(model_name="fp32", inputs=[tensor]))
    assert "expects its data in contents.fp32_contents, got contents.int_contents" in err.details()
    two = pb.ModelInferRequest(model_name="fp32", inputs=[tensor, tensor], raw_input_contents=[b"\0" * 12])
    err = call_error(stub, two)
    assert "raw_input_contents has 1 entries for 2 inputs" in err.details()


def test_unknown_requested_output(start_gateway, repo: Path) -> None:  # type: ignore[no-untyped-def]
    stub = start_gateway(repo).stub()
    request = fp32_request(outputs=[pb.ModelInferRequest.InferRequestedOutputTensor(name="nope")])
    err = call_error(stub, request)
    assert (
        err.code() == grpc.StatusCode.INVALID_ARGUMENT
        and "has no output 'nope'; its outputs are y, y2" in err.details()
    )


def test_runtime_failure_is_internal_and_logged_with_trace(
    start_gateway, repo: Path, caplog: pytest.LogCaptureFixture
) -> None:  # type: ignore[no-untyped-def]
    stub = start_gateway(repo).stub()
    request = pb.ModelInferRequest(
        model_name="unbatchable",
        inputs=[pb.ModelInferRequest.InferInputTensor(name="x", datatype="FP32", shape=[3, 2])],
        raw_input_contents=[np.ones((3, 2), np.float32).tobytes()],
    )
    err = call_error(stub, request)
    assert err.code() == grpc.StatusCode.INTERNAL
    assert "has shape [1, 2] for a batch of 3 rows" in err.details()
    record = next(r for r in caplog.records if r.levelname == "ERROR" and "internal error" in r.getMessage())
    assert record.exc_info is not None  # the trace is in the log
    # the server goes on serving
    assert stub.ModelInfer(fp32_request()).model_name == "fp32"


def test_overload_is_resource_exhausted(start_gateway, repo: Path) -> None:  # type: ignore[no-untyped-def]
    handle = start_gateway(repo, max_inflight=1, inference_threads=1)
    stub = handle.stub()
    x = np.random.default_rng(0).standard_normal((700, 700)).astype(np.float32)
    request = pb.ModelInferRequest(
        model_name="slow",
        inputs=[pb.ModelInferRequest.InferInputTensor(name="x", datatype="FP32", shape=[700, 700])],
        raw_input_contents=[x.tobytes()],
    )
    barrier = threading.Barrier(6)

    def send() -> grpc.StatusCode:
        barrier.wait()
        try:
            stub.ModelInfer(request)
            return grpc.StatusCode.OK
        except grpc.RpcError as e:
            assert "overloaded" in e.details()
            return e.code()

    with ThreadPoolExecutor(6) as pool:
        codes = list(pool.map(lambda _: send(), range(6)))
    assert grpc.StatusCode.OK in codes
    assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}


def test_draining_server_answers_unavailable(start_gateway, repo: Path) -> None:  # type: ignore[no-untyped-def]
    handle = start_gateway(repo)
    stub = handle.stub()
    handle.gateway.state.draining = True
    err = call_error(stub, fp32_request())
    assert err.code() == grpc.StatusCode.UNAVAILABLE and "shutting down" in err.details()
    assert stub.ServerReady(pb.ServerReadyRequest()).ready is False

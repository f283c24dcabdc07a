"""Access control against real gateways: TLS and mutual TLS on gRPC, HTTP/REST and metrics (a test CA made
with `cryptography`), bearer tokens per plane on both protocols, their rotation, their refusals in the
metrics, and never a token in the log."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import os
import re
import signal
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from onnxgate.client import TLS, AsyncClient, Client, OnnxgateError
from onnxgate.server.pb import feedback_pb2 as fb
from onnxgate.server.pb import feedback_pb2_grpc as fb_grpc
from onnxgate.server.pb import grpc_service_pb2 as pb
from onnxgate.server.pb import grpc_service_pb2_grpc as pb_grpc
from tests.conftest import READY_LINE, GatewayHandle
from tests.security.certs import Certs, make_certs

IRIS = np.array([[5.1, 3.5, 1.4, 0.2]], dtype=np.float32)
INFER_BODY = json.dumps(
    {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 4], "data": [5.1, 3.5, 1.4, 0.2]}]}
).encode()
TOKENS = {"inference": "inf-token-0123456789", "feedback": "fb-token-0123456789", "control": "ctl-token-0123456789"}
Start = Callable[..., GatewayHandle]


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"))


def _context(certs: Certs, client_cert: bool = False) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(certs.ca))
    if client_cert:
        context.load_cert_chain(certs.client_cert, certs.client_key)
    return context


def _https(port: int, path: str, context: ssl.SSLContext, method: str = "GET", body: bytes | None = None,
           headers: dict[str, str] | None = None) -> tuple[int, bytes, http.client.HTTPResponse]:  # fmt: skip
    connection = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=10)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, response.read(), response
    finally:
        connection.close()


def _http(port: int, path: str, method: str = "GET", body: bytes | None = None,
          headers: dict[str, str] | None = None) -> tuple[int, bytes, http.client.HTTPResponse]:  # fmt: skip
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, response.read(), response
    finally:
        connection.close()


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


# ---- TLS ------------------------------------------------------------------------------------------------


def test_tls_on_grpc_rest_and_metrics(start_gateway: Start, example_repository: Path, certs: Certs) -> None:
    gw = start_gateway(
        example_repository,
        tls_cert_file=certs.server_cert,
        tls_key_file=certs.server_key,
        metrics_host="127.0.0.1",
        metrics_tls_cert_file=certs.server_cert,
        metrics_tls_key_file=certs.server_key,
    )
    port = gw.gateway.port
    # onnxgate's client: the CA by file name, by bytes, and a server name override (by IP to "localhost")
    for tls in (TLS(root_certificates=certs.ca), TLS(root_certificates=certs.ca.read_bytes(), server_name="localhost")):
        with Client(f"127.0.0.1:{port}", tls=tls, timeout=10) as client:
            assert client.infer("iris", {"input": IRIS})["label"].tolist() == [0]

    # the asyncio client: TLS and a token (an open plane ignores it)
    async def infer_async() -> list[int]:
        async with AsyncClient(f"localhost:{port}", tls=TLS(certs.ca), token="unused", timeout=10) as client:
            return (await client.infer("iris", {"input": IRIS}))["label"].tolist()  # type: ignore[no-any-return]

    assert asyncio.run(infer_async()) == [0]
    # tritonclient over TLS
    triton = triton_grpc.InferenceServerClient(f"localhost:{port}", ssl=True, root_certificates=str(certs.ca))
    assert triton.is_server_ready() and triton.get_model_metadata("iris").name == "iris"
    triton.close()
    # plaintext to the TLS port: no answer
    with Client(f"127.0.0.1:{port}", timeout=3) as plain, pytest.raises(OnnxgateError) as refused:
        plain.server_live()
    assert refused.value.code == grpc.StatusCode.UNAVAILABLE
    # a client that does not trust the CA: refused
    with Client(f"localhost:{port}", tls=True, timeout=3) as untrusting, pytest.raises(OnnxgateError):
        untrusting.server_live()
    # HTTP/REST over https with the CA
    status, body, _ = _https(gw.gateway.http_port, "/v2/models/iris/infer", _context(certs), "POST", INFER_BODY)
    assert status == 200 and json.loads(body)["outputs"]
    assert _https(gw.gateway.http_port, "/v2/health/ready", _context(certs))[0] == 200
    with pytest.raises((http.client.HTTPException, ConnectionError)):
        _http(gw.gateway.http_port, "/v2/health/ready")
    # metrics over https, on its own bind address
    with urllib.request.urlopen(
        f"https://127.0.0.1:{gw.gateway.metrics_port}/metrics", context=_context(certs), timeout=10
    ) as scrape:
        assert b"onnxgate_build_info" in scrape.read()


def test_mutual_tls_requires_a_client_certificate(start_gateway: Start, example_repository: Path, certs: Certs) -> None:
    gw = start_gateway(
        example_repository,
        tls_cert_file=certs.server_cert,
        tls_key_file=certs.server_key,
        tls_client_ca_file=certs.ca,
        metrics_tls_cert_file=certs.server_cert,
        metrics_tls_key_file=certs.server_key,
        metrics_tls_client_ca_file=certs.ca,
    )
    address = f"localhost:{gw.gateway.port}"
    with Client(address, tls=TLS(certs.ca), timeout=5) as anonymous, pytest.raises(OnnxgateError) as refused:
        anonymous.server_live()
    assert refused.value.code == grpc.StatusCode.UNAVAILABLE
    mtls = TLS(certs.ca, certificate_chain=certs.client_cert, private_key=certs.client_key)
    with Client(address, tls=mtls, timeout=10) as client:
        assert client.infer("iris", {"input": IRIS})["label"].tolist() == [0]
    triton = triton_grpc.InferenceServerClient(
        address,
        ssl=True,
        root_certificates=str(certs.ca),
        certificate_chain=str(certs.client_cert),
        private_key=str(certs.client_key),
    )
    assert triton.is_server_live()
    triton.close()
    rest = gw.gateway.http_port
    with pytest.raises((ssl.SSLError, ConnectionError, http.client.HTTPException)):
        _https(rest, "/v2/health/live", _context(certs))
    assert _https(rest, "/v2/health/live", _context(certs, client_cert=True))[0] == 200
    metrics = f"https://127.0.0.1:{gw.gateway.metrics_port}/metrics"
    with pytest.raises((ssl.SSLError, ConnectionError, urllib.error.URLError)):
        urllib.request.urlopen(metrics, context=_context(certs), timeout=5).read()
    with urllib.request.urlopen(metrics, context=_context(certs, client_cert=True), timeout=10) as scrape:
        assert b"onnxgate_ready" in scrape.read()


# ---- tokens ---------------------------------------------------------------------------------------------


def _token_files(directory: Path) -> dict[str, Path]:
    files = {}
    directory.mkdir(exist_ok=True)
    for plane, token in TOKENS.items():
        files[f"{plane}_token_file"] = directory / f"{plane}.token"
        files[f"{plane}_token_file"].write_text(f"# the {plane} plane\n{token}\n")
    return files


def _grpc_code(call: Callable[..., Any], *args: Any, metadata: Any = None) -> grpc.StatusCode:
    try:
        call(*args, metadata=metadata, timeout=10)
    except grpc.RpcError as e:
        return e.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


@pytest.fixture
def guarded(start_gateway: Start, example_copy: Path, tmp_path: Path) -> GatewayHandle:
    return start_gateway(
        example_copy,
        model_control_mode="explicit",
        load_model=("iris",),
        predlog_dir=tmp_path / "log",
        **_token_files(tmp_path / "tokens"),
    )


def test_each_plane_needs_its_own_token(guarded: GatewayHandle) -> None:
    channel = grpc.insecure_channel(guarded.address)
    stub, feedback = pb_grpc.GRPCInferenceServiceStub(channel), fb_grpc.FeedbackStub(channel)
    infer = pb.ModelInferRequest(model_name="iris")
    infer.inputs.add(name="input", datatype="FP32", shape=[1, 4])
    infer.raw_input_contents.append(IRIS.tobytes())
    calls: dict[str, list[tuple[Callable[..., Any], Any]]] = {
        "inference": [
            (stub.ModelInfer, infer),
            (stub.ModelMetadata, pb.ModelMetadataRequest(name="iris")),
            (stub.RepositoryIndex, pb.RepositoryIndexRequest()),
            (lambda r, **kw: list(stub.ModelStreamInfer(iter([r]), **kw)), infer),
        ],
        "feedback": [
            (feedback.SendFeedback, fb.FeedbackRequest(prediction_id="p", label="0")),
            (
                lambda r, **kw: feedback.StreamFeedback(iter([r]), **kw),
                fb.FeedbackRequest(prediction_id="p", label="0"),
            ),
        ],
        "control": [(stub.RepositoryModelLoad, pb.RepositoryModelLoadRequest(model_name="iris"))],
    }
    for plane, plane_calls in calls.items():
        for call, request in plane_calls:
            assert _grpc_code(call, request) == grpc.StatusCode.UNAUTHENTICATED, plane
            assert (
                _grpc_code(call, request, metadata=[("authorization", "Basic abc")]) == grpc.StatusCode.UNAUTHENTICATED
            )
            for other, token in TOKENS.items():  # another plane's token is a wrong one
                expected = grpc.StatusCode.OK if other == plane else grpc.StatusCode.PERMISSION_DENIED
                assert _grpc_code(call, request, metadata=[("authorization", f"Bearer {token}")]) == expected, (
                    plane,
                    other,
                )
    # open without a token: health, reflection, ServerLive/Ready
    health = health_pb2_grpc.HealthStub(channel)
    assert health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == health_pb2.HealthCheckResponse.SERVING
    assert stub.ServerLive(pb.ServerLiveRequest(), timeout=10).live
    assert stub.ServerReady(pb.ServerReadyRequest(), timeout=10).ready
    reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
    answers = list(
        reflect.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10)
    )
    assert any("GRPCInferenceService" in s.name for s in answers[0].list_services_response.service)
    channel.close()
    # onnxgate's client sends its token
    with Client(guarded.address, token=TOKENS["inference"], timeout=10) as client:
        assert client.infer("iris", {"input": IRIS})["label"].tolist() == [0]
        with pytest.raises(OnnxgateError) as denied:
            client.load_model("iris")
        assert denied.value.code == grpc.StatusCode.PERMISSION_DENIED

    # HTTP/REST: 401 with WWW-Authenticate when missing, 403 when wrong, health open
    port = guarded.gateway.http_port
    rest: dict[str, list[tuple[str, str, bytes | None]]] = {
        "inference": [("POST", "/v2/models/iris/infer", INFER_BODY), ("GET", "/v2/models/iris", None),
                      ("GET", "/v2", None), ("POST", "/v2/repository/index", b"{}")],
        "feedback": [("POST", "/v2/models/iris/feedback", b'{"prediction_id": "p", "label": "0"}'),
                     ("GET", "/v2/models/iris/feedback/report", None)],
        "control": [("POST", "/v2/repository/models/iris/load", b"{}")],
    }  # fmt: skip
    for plane, requests in rest.items():
        for method, path, body in requests:
            status, _, response = _http(port, path, method, body)
            assert status == 401 and response.getheader("WWW-Authenticate", "").startswith("Bearer"), path
            assert _http(port, path, method, body, {"Authorization": "Token x"})[0] == 401
            for other, token in TOKENS.items():
                expected = 200 if other == plane else 403
                assert _http(port, path, method, body, _bearer(token))[0] == expected, (path, other)
    assert _http(port, "/v2/health/live")[0] == 200 and _http(port, "/v2/health/ready")[0] == 200

    # every refusal counted, by reason and by code
    metrics = urllib.request.urlopen(guarded.metrics_url, timeout=10).read().decode()
    for protocol in ("grpc", "http"):
        for plane in TOKENS:
            for reason in ("missing", "malformed", "wrong"):
                line = f'onnxgate_auth_failures_total{{plane="{plane}",protocol="{protocol}",reason="{reason}"}}'
                assert re.search(re.escape(line) + r" [1-9]", metrics), line
    assert 'onnxgate_requests_total{code="UNAUTHENTICATED",protocol="grpc",rpc="ModelInfer"}' in metrics
    assert 'onnxgate_requests_total{code="PERMISSION_DENIED",protocol="http",rpc="RepositoryModelLoad"}' in metrics
    for token in TOKENS.values():
        assert token not in metrics


def test_token_rotation_without_restart(start_gateway: Start, example_repository: Path, tmp_path: Path) -> None:
    token_file = tmp_path / "inference.token"
    token_file.write_text("old-token\n")
    gw = start_gateway(example_repository, inference_token_file=token_file)
    with Client(gw.address, token="old-token", timeout=10) as old, Client(gw.address, token="new-token") as new:
        assert old.infer("iris", {"input": IRIS}).model == "iris"
        with pytest.raises(OnnxgateError):
            new.infer("iris", {"input": IRIS})
        # overlap: both tokens for a moment, as a rotation would; written aside and renamed, as Kubernetes does
        aside = tmp_path / "inference.token.new"
        aside.write_text("old-token\nnew-token\n")
        os.replace(aside, token_file)
        _eventually(lambda: new.infer("iris", {"input": IRIS}).model == "iris")
        assert old.infer("iris", {"input": IRIS}).model == "iris"
        aside.write_text("new-token\n")
        os.replace(aside, token_file)

        def old_refused() -> bool:
            try:
                old.infer("iris", {"input": IRIS})
            except OnnxgateError as e:
                return e.code == grpc.StatusCode.PERMISSION_DENIED
            return False

        _eventually(old_refused)
        assert new.infer("iris", {"input": IRIS}).model == "iris"
        # a token file that disappears keeps its last tokens (a Secret mid-update), no error
        token_file.unlink()
        time.sleep(1.1)
        assert new.infer("iris", {"input": IRIS}).model == "iris"


def _eventually(check: Callable[[], bool], timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if check():
                return
        except OnnxgateError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError("not within the time allowed")
        time.sleep(0.1)


def test_reflection_can_be_turned_off(start_gateway: Start, example_repository: Path) -> None:
    gw = start_gateway(example_repository, reflection=False)
    with grpc.insecure_channel(gw.address) as channel:
        reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
        with pytest.raises(grpc.RpcError) as off:
            list(
                reflect.ServerReflectionInfo(
                    iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10
                )
            )
        assert off.value.code() == grpc.StatusCode.UNIMPLEMENTED


# ---- the log, and startup errors ------------------------------------------------------------------------


def test_tokens_never_logged(example_repository: Path, tmp_path: Path) -> None:
    files = _token_files(tmp_path)
    flags = [a for key, path in files.items() for a in (f"--{key.replace('_', '-')}", str(path))]
    log_file = tmp_path / "stderr.log"
    with log_file.open("w") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "onnxgate", "serve", "--model-repository", str(example_repository),
             "--grpc-port", "0", "--http-port", "0", "--metrics-port", "0", "--log-level", "debug", *flags],
            stderr=stderr, stdout=subprocess.DEVNULL, env={**os.environ, "ONNXGATE_DRAIN_DELAY_S": "0"},
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not (match := READY_LINE.search(log_file.read_text())):
            assert process.poll() is None and time.monotonic() < deadline, log_file.read_text()
            time.sleep(0.1)
        address, http_port = match.group(1), int(match.group(3))
        wrong = "wrong-token-ABCDEFGHIJ"
        for token in (*TOKENS.values(), wrong):
            with Client(address, token=token, timeout=10) as client, contextlib.suppress(OnnxgateError):
                client.infer("iris", {"input": IRIS})
            _http(http_port, "/v2/models/iris/infer", "POST", INFER_BODY, _bearer(token))
        files["inference_token_file"].write_text(f"{TOKENS['inference']}\nrotated-token-0123456789\n")
        time.sleep(1.2)
        _http(http_port, "/v2/models/iris/infer", "POST", INFER_BODY, _bearer("rotated-token-0123456789"))
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(20)
    log = log_file.read_text()
    assert "re-read" in log  # the rotation was noticed, and said so without the tokens
    for secret in (*TOKENS.values(), "wrong-token-ABCDEFGHIJ", "rotated-token-0123456789"):
        assert secret not in log


def _serve_fails(example_repository: Path, *args: str) -> str:
    process = subprocess.run(
        [sys.executable, "-m", "onnxgate", "serve", "--model-repository", str(example_repository),
         "--grpc-port", "0", "--http-port", "0", "--metrics-port", "0", *args],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert process.returncode == 2, process.stderr
    lines = process.stderr.strip().splitlines()
    assert len(lines) == 1, process.stderr
    return lines[0]


def test_startup_errors_name_the_setting(example_repository: Path, certs: Certs, tmp_path: Path) -> None:
    mismatched = _serve_fails(
        example_repository, "--tls-cert-file", str(certs.server_cert), "--tls-key-file", str(certs.other_key)
    )
    assert "tls_cert_file" in mismatched and "tls_key_file" in mismatched
    missing = _serve_fails(
        example_repository, "--tls-cert-file", str(tmp_path / "nope.pem"), "--tls-key-file", str(certs.server_key)
    )
    assert "nope.pem" in missing
    alone = _serve_fails(example_repository, "--tls-cert-file", str(certs.server_cert))
    assert "tls_key_file" in alone
    not_ca = _serve_fails(
        example_repository, "--tls-cert-file", str(certs.server_cert), "--tls-key-file", str(certs.server_key),
        "--tls-client-ca-file", str(certs.server_key),
    )  # fmt: skip
    assert "tls_client_ca_file" in not_ca
    empty = tmp_path / "empty.token"
    empty.write_text("\n# nothing\n")
    assert "no token" in _serve_fails(example_repository, "--control-token-file", str(empty))
    assert "cannot be read" in _serve_fails(example_repository, "--feedback-token-file", str(tmp_path / "absent"))

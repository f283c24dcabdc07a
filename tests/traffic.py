"""Known traffic over both edges of a gateway serving the example repository, and the answers it must
count: onnxgate_requests_total{protocol, rpc, code} (tests/core/test_metrics.py, test_prometheus.py).

    expected = send_known_traffic(handle)   # Counter of (protocol, rpc, code) -> answers sent
"""

from __future__ import annotations

import http.client
import json
from collections import Counter
from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np

from onnxgate.server.pb import grpc_service_pb2 as pb
from tests.conftest import GatewayHandle

Key = tuple[str, str, str]
IRIS_ROW = [5.1, 3.5, 1.4, 0.2]


def grpc_infer(model: str, rows: int = 1, width: int = 4, version: str = "") -> pb.ModelInferRequest:
    x = np.tile(np.array(IRIS_ROW[:width] + [0.0] * (width - 4), dtype=np.float32), (rows, 1))
    request = pb.ModelInferRequest(model_name=model, model_version=version)
    request.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
    request.raw_input_contents.append(x.tobytes())
    return request


def rest_infer_body(rows: int = 1, width: int = 4) -> bytes:
    data = [(IRIS_ROW + [0.0] * width)[:width]] * rows
    return json.dumps(
        {"inputs": [{"name": "input", "datatype": "FP32", "shape": [rows, width], "data": data}]}
    ).encode()


def http_request(port: int, method: str, path: str, body: bytes | None = None, **headers: str) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": "application/json", **headers})
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


def http_declared_too_large(port: int, path: str, size: int) -> int:
    """Headers only, declaring a body over the limit: the answer (413) comes before any body is sent."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.putrequest("POST", path)
        conn.putheader("Content-Type", "application/json")
        conn.putheader("Content-Length", str(size))
        conn.endheaders()
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


def send_known_traffic(handle: GatewayHandle, ok_infers: int = 5) -> Counter[Key]:
    """Successes and errors of known codes on both protocols; `handle` serves the example repository with
    max_message_bytes below 1 MiB. Returns the answers by (protocol, rpc, code), and checks each status."""
    expected: Counter[Key] = Counter()
    stub = handle.stub()

    def rpc(name: str, request: Any, code: grpc.StatusCode) -> None:
        try:
            getattr(stub, name)(request, timeout=30)
            got = grpc.StatusCode.OK
        except grpc.RpcError as e:
            got = e.code()
        assert got == code, (name, got, code)
        expected["grpc", name, code.name] += 1

    for _ in range(2):
        rpc("ServerLive", pb.ServerLiveRequest(), grpc.StatusCode.OK)
    for _ in range(ok_infers):
        rpc("ModelInfer", grpc_infer("iris", rows=3), grpc.StatusCode.OK)
    rpc("ModelInfer", grpc_infer("nope"), grpc.StatusCode.NOT_FOUND)
    rpc("ModelInfer", grpc_infer("iris", width=3), grpc.StatusCode.INVALID_ARGUMENT)
    rpc("ModelInfer", grpc_infer("iris", version="7"), grpc.StatusCode.NOT_FOUND)
    rpc("ModelMetadata", pb.ModelMetadataRequest(name="nope"), grpc.StatusCode.NOT_FOUND)
    rpc("ModelMetadata", pb.ModelMetadataRequest(name="iris"), grpc.StatusCode.OK)

    def stream() -> Iterator[pb.ModelInferRequest]:
        yield from (grpc_infer("iris"), grpc_infer("nope"), grpc_infer("iris", rows=2))

    answers = list(stub.ModelStreamInfer(stream(), timeout=30))
    assert [bool(a.error_message) for a in answers] == [False, True, False]
    expected["grpc", "ModelStreamInfer", "OK"] += 2
    expected["grpc", "ModelStreamInfer", "NOT_FOUND"] += 1

    port = handle.gateway.http_port

    def rest(method: str, path: str, body: bytes | None, status: int, rpc_name: str, code: str) -> None:
        assert http_request(port, method, path, body) == status, (method, path)
        expected["http", rpc_name, code] += 1

    rest("GET", "/v2/health/ready", None, 200, "ServerReady", "OK")
    for _ in range(ok_infers):
        rest("POST", "/v2/models/iris/infer", rest_infer_body(rows=2), 200, "ModelInfer", "OK")
    rest("POST", "/v2/models/iris/versions/1/infer", rest_infer_body(), 200, "ModelInfer", "OK")
    rest("POST", "/v2/models/nope/infer", rest_infer_body(), 404, "ModelInfer", "NOT_FOUND")
    rest("POST", "/v2/models/iris/infer", rest_infer_body(width=3), 400, "ModelInfer", "INVALID_ARGUMENT")
    rest("GET", "/v2/models/iris/infer", None, 405, "ModelInfer", "INVALID_ARGUMENT")
    rest("GET", "/v2/models/iris/config", None, 200, "ModelConfig", "OK")
    rest("GET", "/v2/nothing/here", None, 404, "unknown", "NOT_FOUND")
    rest("GET", "/metrics", None, 404, "unknown", "NOT_FOUND")
    rest("POST", "/v2/models/iris/feedback", b"{}", 501, "SendFeedback", "UNIMPLEMENTED")
    assert http_declared_too_large(port, "/v2/models/iris/infer", 1 << 20) == 413
    expected["http", "ModelInfer", "RESOURCE_EXHAUSTED"] += 1
    return expected


def ok_inferences(expected: Counter[Key]) -> int:
    """Successful inference requests in `expected` (each observed once in onnxgate_request_duration_seconds)."""
    return sum(
        n for (_, rpc, code), n in expected.items() if code == "OK" and rpc in ("ModelInfer", "ModelStreamInfer")
    )

"""The REST edge through Triton's own HTTP clients (tritonclient.http, sync and aio) against a real gateway.

Both edges share one request path (server/inference.py) and one source of other answers (protocol.py),
so every answer here is checked against the gRPC edge's answer to the same call, and inference answers
against onnxruntime run directly on the same model file: JSON and binary tensor data, every datatype,
classification, metadata, configs, statistics, model control, prediction ids, log records and feedback.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request
from itertools import product
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
import tritonclient.http.aio as aioclient
from google.protobuf.json_format import ParseDict
from tritonclient.utils import InferenceServerException

from onnxgate.server.join import read_predictions
from onnxgate.server.pb import feedback_pb2 as fpb
from onnxgate.server.pb import grpc_service_pb2 as pb
from onnxgate.server.pb import model_config_pb2 as mc
from tests.conftest import GatewayHandle
from tests.core.test_infer import SERVED_TYPES, sample
from tests.models import add_mul, identity, typed_repository, write_version
from tests.predlog.e2e_helpers import Clients, argmax_repository, features, label_of

# the Python type tritonclient.http reads from an output's JSON data, per datatype
JSON_TYPES = {
    d: bool if d == "BOOL" else str if d == "BYTES" else float if d.startswith("FP") else int for d in SERVED_TYPES
}
IRIS = np.array(
    [[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3], [5.9, 3.0, 4.2, 1.5], [4.9, 3.1, 1.5, 0.1]], dtype=np.float32
)


@pytest.fixture(scope="module")
def rest_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An identity model per datatype, and add_mul in two versions (scale 2 and 3)."""
    return typed_repository(tmp_path_factory.mktemp("rest"))


def http(handle: GatewayHandle) -> httpclient.InferenceServerClient:
    return httpclient.InferenceServerClient(f"127.0.0.1:{handle.gateway.http_port}")


def utf8(array: np.ndarray) -> np.ndarray:
    """BYTES as tritonclient.http reads them from JSON (str) -> the UTF-8 bytes they carry."""
    return np.array([s.encode() for s in array.reshape(-1)], dtype=object).reshape(array.shape)


def http_input(name: str, x: np.ndarray, datatype: str, binary: bool = True) -> httpclient.InferInput:
    tensor = httpclient.InferInput(name, list(x.shape), datatype)
    tensor.set_data_from_numpy(x, binary_data=binary)
    return tensor


def grpc_input(name: str, x: np.ndarray, datatype: str) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput(name, list(x.shape), datatype)
    tensor.set_data_from_numpy(x)
    return tensor


def status_of(call: Any, *args: Any, **kwargs: Any) -> tuple[str | None, str]:
    """(HTTP status, message) of the InferenceServerException a client call raises."""
    with pytest.raises(InferenceServerException) as err:
        call(*args, **kwargs)
    return err.value.status(), err.value.message()


def rest(port: int, method: str, path: str, doc: object = None) -> tuple[int, Any]:
    """One plain HTTP call with a JSON body (or none): (status, JSON answer)."""
    data = None if doc is None else json.dumps(doc).encode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", data=data, method=method, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


# -- inference ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("datatype", SERVED_TYPES)
def test_every_datatype_equals_onnxruntime_and_grpc(start_gateway, rest_repo: Path, datatype: str) -> None:  # type: ignore[no-untyped-def]
    handle = start_gateway(rest_repo)
    model = f"id_{datatype.lower()}"
    x = sample(datatype, rows=4)  # seeded; integers span their type's whole range, BYTES hold non-ASCII text
    session = ort.InferenceSession(str(rest_repo / model / "1" / "model.onnx"))
    feed = np.vectorize(bytes.decode)(x).astype(object) if datatype == "BYTES" else x
    expected = dict(zip(("y", "y2"), session.run(["y", "y2"], {"x": feed}), strict=True))
    if datatype == "BYTES":
        expected = {name: utf8(value) for name, value in expected.items()}
    grpc_result = grpcclient.InferenceServerClient(handle.address).infer(model, [grpc_input("x", x, datatype)])

    with http(handle) as client:
        # JSON or binary in, JSON or binary out: all four mixes
        for binary_in, binary_out in product((False, True), repeat=2):
            outputs = [httpclient.InferRequestedOutput(name, binary_data=binary_out) for name in ("y", "y2")]
            result = client.infer(model, [http_input("x", x, datatype, binary_in)], outputs=outputs)
            response = result.get_response()
            assert response["model_name"] == model and response["model_version"] == "1"
            assert [o["name"] for o in response["outputs"]] == ["y", "y2"]
            for out in response["outputs"]:
                assert out["datatype"] == datatype and out["shape"] == list(x.shape)
                assert ("binary_data_size" in out.get("parameters", {})) is binary_out
                assert ("data" in out) is not binary_out
                if not binary_out:  # flat, row-major, as JSON's own types: FP16 as numbers, BYTES as text
                    assert len(out["data"]) == x.size and all(type(v) is JSON_TYPES[datatype] for v in out["data"])
            for name in ("y", "y2"):
                got = result.as_numpy(name)
                if datatype == "BYTES" and not binary_out:
                    got = utf8(got)
                assert got.dtype == x.dtype, (binary_in, binary_out, name)
                np.testing.assert_array_equal(got, x)
                np.testing.assert_array_equal(got, expected[name])
                np.testing.assert_array_equal(got, grpc_result.as_numpy(name))
        # no outputs named: all of them, in binary (tritonclient asks with binary_data_output)
        result = client.infer(model, [http_input("x", x, datatype, binary=False)])
        assert all("data" not in out for out in result.get_response()["outputs"])
        np.testing.assert_array_equal(result.as_numpy("y2"), grpc_result.as_numpy("y2"))


def test_bytes_that_are_not_utf8_are_refused_alike_on_either_edge(start_gateway, rest_repo: Path) -> None:  # type: ignore[no-untyped-def]
    handle = start_gateway(rest_repo)
    x = np.array([[b"\xff\x00a", b"", b"\x80\x81"]], dtype=object)  # binary data may carry any bytes
    with http(handle) as client:
        status, message = status_of(client.infer, "id_bytes", [http_input("x", x, "BYTES")])
    assert status == "400" and "not UTF-8" in message  # ONNX string tensors are text
    grpc = grpcclient.InferenceServerClient(handle.address)
    assert status_of(grpc.infer, "id_bytes", [grpc_input("x", x, "BYTES")]) == ("StatusCode.INVALID_ARGUMENT", message)


def test_several_inputs_outputs_subsets_versions_and_ids(start_gateway, rest_repo: Path) -> None:  # type: ignore[no-untyped-def]
    handle = start_gateway(rest_repo)
    rng = np.random.default_rng(11)
    a, b = rng.standard_normal((2, 3, 4)).astype(np.float32)
    grpc = grpcclient.InferenceServerClient(handle.address)
    grpc_latest = grpc.infer("add_mul", [grpc_input("a", a, "FP32"), grpc_input("b", b, "FP32")])
    with http(handle) as client:
        for binary in (False, True):
            inputs = [http_input("a", a, "FP32", binary), http_input("b", b, "FP32", binary)]
            both = [httpclient.InferRequestedOutput(n, binary_data=binary) for n in ("sum", "scaled")]
            latest = client.infer("add_mul", inputs, outputs=both, request_id=f"req-{binary}")
            response = latest.get_response()
            assert response["id"] == f"req-{binary}"  # echoed
            assert (response["model_name"], response["model_version"]) == ("add_mul", "2")
            np.testing.assert_array_equal(latest.as_numpy("sum"), a + b)
            np.testing.assert_array_equal(latest.as_numpy("scaled"), a * np.float32(3.0))
            for name in ("sum", "scaled"):
                np.testing.assert_array_equal(latest.as_numpy(name), grpc_latest.as_numpy(name))

            # /versions/1, one output of two
            scaled = [httpclient.InferRequestedOutput("scaled", binary_data=binary)]
            v1 = client.infer("add_mul", inputs, model_version="1", outputs=scaled)
            assert v1.get_response()["model_version"] == "1"
            assert [o["name"] for o in v1.get_response()["outputs"]] == ["scaled"]
            assert v1.as_numpy("sum") is None
            np.testing.assert_array_equal(v1.as_numpy("scaled"), a * np.float32(2.0))

        # a compressed request body (tritonclient's gzip and deflate) is the same request
        for algorithm in ("gzip", "deflate"):
            inputs = [http_input("a", a, "FP32"), http_input("b", b, "FP32")]
            zipped = client.infer("add_mul", inputs, request_compression_algorithm=algorithm)
            np.testing.assert_array_equal(zipped.as_numpy("sum"), a + b)

        inputs = [http_input("a", a, "FP32"), http_input("b", b, "FP32")]
        ids = [client.infer("add_mul", inputs).get_response()["id"] for _ in range(10)]
        assert len(set(ids)) == 10 and all(isinstance(i, str) and len(i) >= 16 for i in ids)  # generated, unique

        status, message = status_of(client.infer, "add_mul", inputs, model_version="7")
        assert status == "404" and "7" in message
        status, message = status_of(client.infer, "add_mul", inputs, outputs=[httpclient.InferRequestedOutput("nope")])
        assert status == "400" and "nope" in message


def test_aio_client(start_gateway, rest_repo: Path) -> None:  # type: ignore[no-untyped-def]
    handle = start_gateway(rest_repo)
    rng = np.random.default_rng(5)
    rows = rng.standard_normal((8, 2, 2, 4)).astype(np.float32)

    async def calls() -> list[httpclient.InferResult]:
        async with aioclient.InferenceServerClient(f"127.0.0.1:{handle.gateway.http_port}") as client:
            assert await client.is_server_live() and await client.is_server_ready()
            assert await client.is_model_ready("add_mul", "1") and not await client.is_model_ready("nope")
            meta = await client.get_model_metadata("add_mul")
            assert meta["versions"] == ["1", "2"] and meta["inputs"][0]["shape"] == [-1, 4]
            results = await asyncio.gather(
                *(
                    client.infer(
                        "add_mul",
                        [http_input("a", r[0], "FP32", i % 2 == 0), http_input("b", r[1], "FP32", i % 2 == 0)],
                        request_id=f"aio-{i}",
                        outputs=[httpclient.InferRequestedOutput("sum", binary_data=i % 3 == 0)],
                    )
                    for i, r in enumerate(rows)
                )
            )
            with pytest.raises(InferenceServerException) as err:
                await client.infer("nope", [http_input("a", rows[0, 0], "FP32")])
            assert err.value.status() == "404" and "nope" in err.value.message()
            return list(results)

    results = asyncio.run(calls())
    for i, result in enumerate(results):
        assert result.get_response()["id"] == f"aio-{i}"
        np.testing.assert_array_equal(result.as_numpy("sum"), rows[i, 0] + rows[i, 1])


@pytest.mark.parametrize("k", [1, 3])
def test_classification_extension_equals_grpc(start_gateway, example_repository: Path, k: int) -> None:  # type: ignore[no-untyped-def]
    handle = start_gateway(example_repository)
    grpc = grpcclient.InferenceServerClient(handle.address)
    with http(handle) as client:
        for version in ("1", "2"):
            expected = grpc.infer(
                "iris",
                [grpc_input("input", IRIS, "FP32")],
                model_version=version,
                outputs=[grpcclient.InferRequestedOutput("probabilities", class_count=k)],
            ).as_numpy("probabilities")
            assert expected.shape == (len(IRIS), k)
            assert expected[0, 0].decode().endswith(":0:setosa")
            for binary in (False, True):
                result = client.infer(
                    "iris",
                    [http_input("input", IRIS, "FP32", binary)],
                    model_version=version,
                    outputs=[httpclient.InferRequestedOutput("probabilities", binary_data=binary, class_count=k)],
                )
                (out,) = result.get_response()["outputs"]
                assert (out["name"], out["datatype"], out["shape"]) == ("probabilities", "BYTES", [len(IRIS), k])
                got = result.as_numpy("probabilities")
                np.testing.assert_array_equal(got if binary else utf8(got), expected)
    # tritonclient sends no class_count of 0; the protocol's JSON can
    request = {
        "inputs": [{"name": "input", "datatype": "FP32", "shape": list(IRIS.shape), "data": IRIS.tolist()}],
        "outputs": [{"name": "probabilities", "parameters": {"classification": 0}}],
    }
    code, doc = rest(handle.gateway.http_port, "POST", "/v2/models/iris/versions/1/infer", request)
    assert code == 400 and "classification count must be >= 1" in doc["error"]


# -- metadata, statistics, errors, model control ------------------------------------------------------


def test_metadata_config_index_and_health_equal_grpc(start_gateway, rest_repo: Path) -> None:  # type: ignore[no-untyped-def]
    handle = start_gateway(rest_repo)
    stub = handle.stub()
    with http(handle) as client:
        assert client.is_server_live() and client.is_server_ready()
        server = client.get_server_metadata()
        assert ParseDict(server, pb.ServerMetadataResponse()) == stub.ServerMetadata(pb.ServerMetadataRequest())
        assert server["name"] == "onnxgate"
        assert {"binary_tensor_data", "classification", "model_repository", "statistics"} <= set(server["extensions"])

        for name, version in (("add_mul", ""), ("add_mul", "1"), ("id_fp16", ""), ("id_bytes", "1")):
            meta = client.get_model_metadata(name, version)
            grpc_meta = stub.ModelMetadata(pb.ModelMetadataRequest(name=name, version=version))
            assert ParseDict(meta, pb.ModelMetadataResponse()) == grpc_meta
            config = client.get_model_config(name, version)
            grpc_config = stub.ModelConfig(pb.ModelConfigRequest(name=name, version=version)).config
            assert ParseDict(config, mc.ModelConfig()) == grpc_config
            assert config["name"] == meta["name"] == name
        meta = client.get_model_metadata("add_mul")
        assert meta["inputs"] == [
            {"name": n, "datatype": "FP32", "shape": [-1, 4]} for n in ("a", "b")
        ]  # 64-bit shapes as numbers, as Triton writes them

        assert client.is_model_ready("add_mul") and client.is_model_ready("add_mul", "1")
        assert not client.is_model_ready("nope") and not client.is_model_ready("add_mul", "9")
        index = client.get_model_repository_index()
        assert [ParseDict(e, pb.RepositoryIndexResponse.ModelIndex()) for e in index] == list(
            stub.RepositoryIndex(pb.RepositoryIndexRequest()).models
        )
        assert {(e["name"], e["version"], e["state"]) for e in index} >= {
            ("add_mul", "1", "READY"),
            ("add_mul", "2", "READY"),
        }

        # unknown names are 404, like NOT_FOUND on gRPC
        for call, args in (
            (client.get_model_metadata, ("nope",)),
            (client.get_model_config, ("nope",)),
            (client.get_inference_statistics, ("nope",)),
            (client.get_model_metadata, ("add_mul", "9")),
        ):
            status, message = status_of(call, *args)
            assert status == "404" and ("nope" in message or "9" in message), (call, message)


def test_statistics_grow_with_http_requests_and_equal_grpc(start_gateway, rest_repo: Path) -> None:  # type: ignore[no-untyped-def]
    handle = start_gateway(rest_repo)
    stub = handle.stub()
    x = np.arange(8, dtype=np.float32).reshape(2, 4)

    def grpc_stats(name: str = "", version: str = "") -> pb.ModelStatisticsResponse:
        response: pb.ModelStatisticsResponse = stub.ModelStatistics(
            pb.ModelStatisticsRequest(name=name, version=version)
        )
        return response

    with http(handle) as client:
        before = client.get_inference_statistics("add_mul", "2")
        (entry,) = before["model_stats"]
        assert (entry["name"], entry["version"], entry["inference_count"]) == ("add_mul", "2", 0)
        assert ParseDict(before, pb.ModelStatisticsResponse()) == grpc_stats("add_mul", "2")
        for binary in (False, True, True):
            client.infer("add_mul", [http_input("a", x, "FP32", binary), http_input("b", x, "FP32", binary)])
        status, _ = status_of(client.infer, "add_mul", [http_input("a", x, "FP32")])  # b missing: 400, no run
        assert status == "400"

        after = client.get_inference_statistics("add_mul", "2")
        (entry,) = after["model_stats"]
        assert entry["inference_count"] == 6  # batch rows
        assert entry["inference_stats"]["success"]["count"] == 3
        assert 1 <= entry["execution_count"] <= 3
        assert entry["last_inference"] > 0
        assert isinstance(entry["inference_stats"]["success"]["ns"], int)  # uint64 as a number, not a string
        assert ParseDict(after, pb.ModelStatisticsResponse()) == grpc_stats("add_mul", "2")
        # every version of a model, and every model (/v2/models/stats)
        assert ParseDict(client.get_inference_statistics("add_mul"), pb.ModelStatisticsResponse()) == grpc_stats(
            "add_mul"
        )
        everything = client.get_inference_statistics()
        assert ParseDict(everything, pb.ModelStatisticsResponse()) == grpc_stats()
        assert len(everything["model_stats"]) == len(SERVED_TYPES) + 2


def test_bad_requests_are_400_and_unknown_models_404(start_gateway, rest_repo: Path) -> None:  # type: ignore[no-untyped-def]
    handle = start_gateway(rest_repo)
    grpc = grpcclient.InferenceServerClient(handle.address)
    a = np.ones((2, 4), np.float32)
    with http(handle) as client:
        cases: list[tuple[str, list[httpclient.InferInput], str, str]] = [
            ("nope", [http_input("a", a, "FP32")], "404", "StatusCode.NOT_FOUND"),
            ("add_mul", [http_input("a", a, "FP32")], "400", "StatusCode.INVALID_ARGUMENT"),  # b missing
            (
                "add_mul",
                [http_input("a", a.astype(np.float64), "FP64"), http_input("b", a, "FP32")],
                "400",
                "StatusCode.INVALID_ARGUMENT",
            ),
            (
                "add_mul",
                [http_input("a", np.ones((2, 5), np.float32), "FP32"), http_input("b", a, "FP32")],
                "400",
                "StatusCode.INVALID_ARGUMENT",
            ),
        ]
        for model, inputs, http_status, grpc_status in cases:
            status, message = status_of(client.infer, model, inputs)
            assert status == http_status, message
            grpc_inputs = [
                grpc_input(
                    t.name(), np.ones(t.shape(), np.float64 if t.datatype() == "FP64" else np.float32), t.datatype()
                )
                for t in inputs
            ]
            grpc_status_got, grpc_message = status_of(grpc.infer, model, grpc_inputs)
            assert (grpc_status_got, grpc_message) == (grpc_status, message)  # the same words on either edge


def test_model_control_upload_infer_unload(start_gateway, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    repo = tmp_path / "repo"
    write_version(repo, "add_mul", 1, add_mul())
    handle = start_gateway(repo, model_control_mode="explicit")
    grpc = grpcclient.InferenceServerClient(handle.address)
    x = np.random.default_rng(3).integers(-1000, 1000, (2, 3), dtype=np.int32)
    with http(handle) as client:
        assert [(e["name"], e["state"]) for e in client.get_model_repository_index()] == [("add_mul", "UNAVAILABLE")]
        assert not client.is_model_ready("add_mul")
        status, message = status_of(client.get_model_metadata, "add_mul")
        assert status == "503" and "not loaded" in message
        client.load_model("add_mul")
        assert client.is_model_ready("add_mul", "1")

        # Triton's upload: the config as a JSON string, the files' bytes (base64 in the JSON body)
        onnx_bytes = identity("INT32").SerializeToString()
        config = json.dumps({"name": "uploaded", "max_batch_size": 8})
        client.load_model("uploaded", config=config, files={"file:1/model.onnx": onnx_bytes})
        assert (repo / "uploaded" / "1" / "model.onnx").read_bytes() == onnx_bytes
        assert client.is_model_ready("uploaded") and client.get_model_config("uploaded")["max_batch_size"] == 8
        result = client.infer("uploaded", [http_input("x", x, "INT32")])
        np.testing.assert_array_equal(result.as_numpy("y"), x)
        np.testing.assert_array_equal(
            grpc.infer("uploaded", [grpc_input("x", x, "INT32")]).as_numpy("y"), result.as_numpy("y")
        )
        ready = {(e["name"], e["version"]) for e in client.get_model_repository_index() if e["state"] == "READY"}
        assert ready == {("add_mul", "1"), ("uploaded", "1")}

        client.unload_model("uploaded")
        assert not client.is_model_ready("uploaded")
        status, message = status_of(client.infer, "uploaded", [http_input("x", x, "INT32")])
        assert status == "503" and "'uploaded'" in message and "not loaded" in message
        grpc_status, grpc_message = status_of(grpc.infer, "uploaded", [grpc_input("x", x, "INT32")])
        assert (grpc_status, grpc_message) == ("StatusCode.UNAVAILABLE", message)
        status, message = status_of(client.unload_model, "uploaded")
        assert status == "404" and "not loaded" in message

        # files without a config, and a file that is not base64: 400, nothing loaded
        status, message = status_of(client.load_model, "other", files={"file:1/model.onnx": onnx_bytes})
        assert status == "400" and "'config'" in message
        port = handle.gateway.http_port
        code, doc = rest(
            port,
            "POST",
            "/v2/repository/models/other/load",
            {"parameters": {"config": "{}", "file:1/model.onnx": "@@"}},
        )
        assert code == 400 and "base64" in doc["error"]
        assert not client.is_model_ready("other")


# -- prediction ids, log records and feedback on either protocol ------------------------------------------


def test_prediction_ids_log_records_and_feedback_on_either_protocol(start_gateway, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    log_dir = tmp_path / "log"
    gw = start_gateway(
        argmax_repository(tmp_path / "repo"), predlog_dir=log_dir, predlog_flush_ms=50, predlog_unknown_after_s=3600
    )
    port = gw.gateway.http_port
    c = Clients(gw.address)
    n = 6
    with http(gw) as client:
        for i in range(n):
            x = features(i).reshape(1, 4)
            result = client.infer("argmax", [http_input("x", x, "FP32", binary=i % 2 == 0)], request_id=f"h{i}")
            assert result.get_response()["id"] == f"h{i}"
            assert int(result.as_numpy("label")[0]) == i % 4
            answer = c.infer(f"g{i}", features(i))  # the same row over gRPC
            assert answer.id == f"g{i}" and label_of(answer) == i % 4
        generated = client.infer("argmax", [http_input("x", features(0).reshape(1, 4), "FP32")]).get_response()["id"]

    feedback = "/v2/models/argmax/feedback"
    code, doc = rest(port, "POST", feedback, {"prediction_id": "h0", "label": "0"})
    assert code == 200 and doc["prediction_id"] == "h0" and doc["status"] in ("accepted", "pending")
    assert isinstance(doc["feedback_id"], str)

    # the log is written within its flush window: the report over HTTP counts every prediction
    report: dict[str, Any] = {}
    for _ in range(200):  # bounded: ~10 s
        code, report = rest(port, "GET", "/v2/models/argmax/feedback/report")
        assert code == 200
        if report["predictions"] == 2 * n + 1:
            break
        time.sleep(0.05)
    assert report["predictions"] == 2 * n + 1, report

    code, doc = rest(port, "POST", feedback, {"prediction_id": "h0", "label": "0"})
    assert (code, doc["status"]) == (200, "duplicate")  # the first one was kept, pending or not
    code, doc = rest(port, "POST", feedback, {"prediction_id": "h1", "label": "1"})
    assert (code, doc["status"]) == (200, "accepted")  # its prediction is in the log
    code, doc = rest(port, "POST", feedback, {"prediction_id": generated, "label": "0", "reward": 1})
    assert (code, doc["status"]) == (200, "accepted")  # the generated id is the logged one
    code, doc = rest(port, "POST", feedback, {"prediction_id": "g0", "label": "0"})
    assert (code, doc["status"]) == (200, "accepted")  # a gRPC prediction, HTTP feedback
    status = fpb.FeedbackStatus
    # gRPC sees HTTP's feedback (the REST path names the model: the same message names it on gRPC too)
    assert c.send("h1", "1", model_name="argmax").status == status.Value("FEEDBACK_STATUS_DUPLICATE")
    assert c.send("h2", "2").status == status.Value("FEEDBACK_STATUS_ACCEPTED")  # and HTTP's prediction

    # a batch: counts, as gRPC StreamFeedback answers them
    batch = [
        {"prediction_id": "h3", "label": "3"},
        {"prediction_id": "h1", "label": "1"},  # the same truth again: a duplicate
        {"prediction_id": "ghost", "label": "0"},  # no such prediction (yet): pending
    ]
    code, doc = rest(port, "POST", feedback, batch)
    assert (code, doc) == (200, {"received": 3, "accepted": 1, "duplicate": 1, "pending": 1})
    # a bad message anywhere in a batch: 400, and nothing of it stored
    code, doc = rest(
        port, "POST", feedback, [{"prediction_id": "h4", "label": "0"}, {"prediction_id": "h5", "colour": "red"}]
    )
    assert code == 400 and "'colour'" in doc["error"]
    code, doc = rest(port, "POST", feedback, {"prediction_id": "h4", "label": "0", "model_name": "other"})
    assert code == 400 and "other" in doc["error"]

    code, report = rest(port, "GET", "/v2/models/argmax/feedback/report?max_unknown_ids=10")
    assert code == 200
    grpc_report = c.report(max_unknown_ids=10, model="argmax")
    assert ParseDict(report, fpb.FeedbackReportResponse()) == grpc_report
    expected = {"predictions": 2 * n + 1, "feedback": 7, "joined": 6, "pending": 1, "unknown": 0}
    assert {k: report[k] for k in expected} == expected
    c.close()

    # the log records: an HTTP request and a gRPC request of the same row make the same record
    table = read_predictions(log_dir, ["argmax"])
    assert table is not None
    rows = {r["id"]: r for r in table.to_pylist()}
    assert set(rows) == {f"h{i}" for i in range(n)} | {f"g{i}" for i in range(n)} | {generated}
    for i in range(n):
        h, g = dict(rows[f"h{i}"]), dict(rows[f"g{i}"])
        for row in (h, g):
            del row["id"], row["ts"]
        assert h == g


def test_feedback_without_a_prediction_log_is_501(start_gateway, rest_repo: Path) -> None:  # type: ignore[no-untyped-def]
    port = start_gateway(rest_repo).gateway.http_port
    code, doc = rest(port, "POST", "/v2/models/add_mul/feedback", {"prediction_id": "p", "label": "0"})
    assert code == 501 and "--predlog-dir" in doc["error"]
    code, doc = rest(port, "GET", "/v2/models/add_mul/feedback/report")
    assert code == 501 and "--predlog-dir" in doc["error"]

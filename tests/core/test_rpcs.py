"""Each RPC of the service, health and reflection, through real clients."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from tritonclient.utils import InferenceServerException

from onnxgate.server.pb import grpc_service_pb2 as pb
from tests.models import add_mul, identity, write_version


def iris_input(rows: int = 2) -> tc.InferInput:
    x = np.tile(np.array([[5.1, 3.5, 1.4, 0.2]], dtype=np.float32), (rows, 1))
    inp = tc.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return inp


def test_liveness_readiness_and_metadata(start_gateway, example_repository: Path) -> None:  # type: ignore[no-untyped-def]
    handle = start_gateway(example_repository)
    client = tc.InferenceServerClient(handle.address)
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("iris") and client.is_model_ready("iris", "1")
    assert not client.is_model_ready("iris", "7") and not client.is_model_ready("nope")
    server = client.get_server_metadata()
    assert server.name == "onnxgate"
    assert set(server.extensions) == {
        "classification",
        "model_repository",
        "model_configuration",
        "statistics",
        "binary_tensor_data",
    }

    meta = client.get_model_metadata("iris")
    assert meta.platform == "onnxruntime_onnx" and list(meta.versions) == ["1", "2"]
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [("input", "FP32", [-1, 4])]
    assert {(t.name, t.datatype, tuple(t.shape)) for t in meta.outputs} == {
        ("label", "INT64", (-1,)),
        ("probabilities", "FP32", (-1, 3)),
    }


def test_model_config_reports_triton_form(start_gateway, example_repository: Path) -> None:  # type: ignore[no-untyped-def]
    client = tc.InferenceServerClient(start_gateway(example_repository).address)
    config = client.get_model_config("iris", "1").config
    assert config.max_batch_size == 256 and config.platform == "onnxruntime_onnx" and config.backend == "onnxruntime"
    assert config.HasField("dynamic_batching")
    assert [(i.name, i.data_type, list(i.dims)) for i in config.input] == [("input", 11, [4])]  # batch dim left out
    probabilities = next(o for o in config.output if o.name == "probabilities")
    assert list(probabilities.dims) == [3] and probabilities.label_filename == "labels.txt"
    assert config.parameters["task"].string_value == "classification"
    assert config.version_policy.HasField("all")


def test_statistics_count_requests_rows_and_failures(start_gateway, example_repository: Path) -> None:  # type: ignore[no-untyped-def]
    client = tc.InferenceServerClient(start_gateway(example_repository).address)
    for _ in range(3):
        client.infer("iris", [iris_input(2)], model_version="1")
    with pytest.raises(InferenceServerException):
        client.infer("iris", [tc.InferInput("input", [1, 4], "FP64")], model_version="1")
    stats = client.get_inference_statistics("iris", "1").model_stats
    assert len(stats) == 1
    s = stats[0]
    assert (s.name, s.version) == ("iris", "1")
    assert s.inference_count == 6 and 1 <= s.execution_count <= 3
    assert s.inference_stats.success.count == 3 and s.inference_stats.success.ns > 0
    assert s.inference_stats.queue.count == 3 and s.inference_stats.compute_infer.ns > 0
    assert s.inference_stats.compute_input.ns > 0 and s.inference_stats.compute_output.ns > 0
    assert sum(b.compute_infer.count for b in s.batch_stats) == s.execution_count
    assert s.last_inference > 0
    everything = client.get_inference_statistics().model_stats
    assert {(m.name, m.version) for m in everything} == {
        ("iris", "1"),
        ("iris", "2"),
        ("diabetes", "1"),
        ("petal_width", "1"),
    }


def test_stream_infer_answers_each_request_and_survives_errors(start_gateway, example_repository: Path) -> None:  # type: ignore[no-untyped-def]
    stub = start_gateway(example_repository).stub()
    x = np.zeros((1, 4), np.float32).tobytes()
    good = pb.ModelInferRequest(
        model_name="iris",
        id="a",
        inputs=[pb.ModelInferRequest.InferInputTensor(name="input", datatype="FP32", shape=[1, 4])],
        raw_input_contents=[x],
    )
    bad = pb.ModelInferRequest(model_name="nope", id="b")
    answers = list(stub.ModelStreamInfer(iter([good, bad, good])))
    assert [a.error_message == "" for a in answers] == [True, False, True]
    assert "unknown model 'nope'" in answers[1].error_message and answers[1].infer_response.id == "b"
    assert answers[2].infer_response.id == "a" and len(answers[2].infer_response.raw_output_contents) == 2


def test_repository_index_load_unload_and_upload(start_gateway, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    repo = tmp_path / "repo"
    write_version(repo, "add_mul", 1, add_mul())
    write_version(repo, "other", 1, identity("INT32"))
    handle = start_gateway(repo, model_control_mode="explicit", load_model=("add_mul",))
    client = tc.InferenceServerClient(handle.address)
    index = {(m.name, m.version, m.state) for m in client.get_model_repository_index().models}
    assert index == {("add_mul", "1", "READY"), ("other", "", "UNAVAILABLE")}
    assert not client.is_model_ready("other")
    with pytest.raises(InferenceServerException, match="not loaded; load it with RepositoryModelLoad"):
        client.get_model_metadata("other")

    client.load_model("other")
    assert client.is_model_ready("other")
    client.unload_model("add_mul")
    assert not client.is_model_ready("add_mul")
    with pytest.raises(InferenceServerException, match="not loaded"):
        client.unload_model("add_mul")

    # Triton's upload: the config as JSON and the file's bytes in the load parameters
    config = json.dumps({"name": "uploaded", "max_batch_size": 8, "version_policy": {"all": {}}})
    client.load_model("uploaded", config=config, files={"file:3/model.onnx": identity("FP64").SerializeToString()})
    assert (repo / "uploaded" / "3" / "model.onnx").is_file()
    x = np.arange(6, dtype=np.float64).reshape(2, 3)
    inp = tc.InferInput("x", [2, 3], "FP64")
    inp.set_data_from_numpy(x)
    result = client.infer("uploaded", [inp], model_version="3")
    np.testing.assert_array_equal(result.as_numpy("y"), x)
    assert client.get_model_config("uploaded").config.max_batch_size == 8

    with pytest.raises(InferenceServerException, match="expected 'file:<version>/<filename>'"):
        client.load_model("evil", config="{}", files={"file:../../etc/x": b"1"})
    with pytest.raises(InferenceServerException, match="not a valid directory name"):
        client.load_model("../evil")
    ready = handle.stub().RepositoryIndex(pb.RepositoryIndexRequest(ready=True)).models
    assert {(m.name, m.version) for m in ready} == {("other", "1"), ("uploaded", "3")}


def test_health_service_and_reflection(start_gateway, example_repository: Path) -> None:  # type: ignore[no-untyped-def]
    handle = start_gateway(example_repository)
    channel = grpc.insecure_channel(handle.address)
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "inference.GRPCInferenceService"):
        assert (
            health.Check(health_pb2.HealthCheckRequest(service=service)).status
            == health_pb2.HealthCheckResponse.SERVING
        )
    with pytest.raises(grpc.RpcError) as err:
        health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    watch = health.Watch(health_pb2.HealthCheckRequest(service=""))
    assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
    handle.call(handle.gateway.health.enter_graceful_shutdown())
    assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
    watch.cancel()

    reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
    answers = list(reflect.ServerReflectionInfo(iter([
        reflection_pb2.ServerReflectionRequest(list_services=""),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol="inference.GRPCInferenceService"),
    ])))  # fmt: skip
    services = {s.name for s in answers[0].list_services_response.service}
    assert {
        "inference.GRPCInferenceService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    } <= services
    files = [
        descriptor_pb2.FileDescriptorProto.FromString(b)
        for b in answers[1].file_descriptor_response.file_descriptor_proto
    ]
    service = next(f for f in files if f.name == "grpc_service.proto").service[0]
    assert service.name == "GRPCInferenceService" and "ModelInfer" in [m.name for m in service.method]
    channel.close()

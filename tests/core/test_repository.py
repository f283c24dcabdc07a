"""The model repository: Triton configs as they are, version policies, failures, hot swap under load."""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc

from onnxgate.server.pb import grpc_service_pb2 as pb
from tests.models import add_mul, identity, write_version

TRITON_CONFIG = """
name: "add_mul"
platform: "onnxruntime_onnx"
max_batch_size: 16
version_policy: { latest: { num_versions: 2 } }
input [
  { name: "a" data_type: TYPE_FP32 dims: [ 4 ] },
  { name: "b" data_type: TYPE_FP32 dims: [ 4 ] }
]
output [ { name: "sum" data_type: TYPE_FP32 dims: [ 4 ] } ]
instance_group [ { count: 2 kind: KIND_CPU } ]
dynamic_batching { max_queue_delay_microseconds: 200 preferred_batch_size: [ 4, 8 ] }
optimization { execution_accelerators { cpu_execution_accelerator: [ { name: "openvino" } ] } }
model_warmup [ { name: "w" batch_size: 1 } ]
"""


def infer_add(client: tc.InferenceServerClient, version: str = "", rows: int = 2) -> tuple[str, np.ndarray]:
    a = np.full((rows, 4), 1.5, np.float32)
    inputs = [tc.InferInput("a", [rows, 4], "FP32"), tc.InferInput("b", [rows, 4], "FP32")]
    for inp in inputs:
        inp.set_data_from_numpy(a)
    result = client.infer("add_mul", inputs, model_version=version)
    return result.get_response().model_version, result.as_numpy("sum")


def test_triton_config_pbtxt_serves_unchanged(start_gateway, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    for version in (1, 2, 3):
        write_version(tmp_path, "add_mul", version, add_mul(), config=TRITON_CONFIG)
    client = tc.InferenceServerClient(start_gateway(tmp_path).address)
    assert list(client.get_model_metadata("add_mul").versions) == ["2", "3"]  # latest 2
    config = client.get_model_config("add_mul").config
    assert config.max_batch_size == 16 and [o.name for o in config.output] == ["sum"]
    assert list(config.dynamic_batching.preferred_batch_size) == [4, 8]
    version, total = infer_add(client)
    assert version == "3"
    np.testing.assert_allclose(total, np.full((2, 4), 3.0))
    with pytest.raises(Exception, match="exceeds max_batch_size 16"):
        infer_add(client, rows=17)
    # concurrent requests share batches through the dynamic batcher, each gets its own rows back
    results: list[np.ndarray] = []
    threads = [threading.Thread(target=lambda r=r: results.append(infer_add(client, rows=r)[1])) for r in range(1, 9)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(len(r) for r in results) == list(range(1, 9))
    assert all(np.all(r == 3.0) for r in results)


@pytest.mark.parametrize(
    ("policy", "served"),
    [
        ("", ["3"]),
        ("version_policy { all {} }", ["1", "2", "3"]),
        ("version_policy { specific { versions: [1, 3] } }", ["1", "3"]),
    ],
)
def test_version_policies(start_gateway, tmp_path: Path, policy: str, served: list[str]) -> None:  # type: ignore[no-untyped-def]
    for version in (1, 2, 3):
        write_version(tmp_path, "add_mul", version, add_mul(), config=policy)
    client = tc.InferenceServerClient(start_gateway(tmp_path).address)
    assert list(client.get_model_metadata("add_mul").versions) == served


def test_config_contradicting_the_graph_fails_that_model_only(start_gateway, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    write_version(tmp_path, "add_mul", 1, add_mul(), config='input [ { name: "a" data_type: TYPE_INT32 dims: [4] } ]')
    write_version(tmp_path, "typo", 1, add_mul(), config="max_batch_size: eight")
    write_version(tmp_path, "ok", 1, identity("FP32"))
    handle = start_gateway(tmp_path)
    index = {
        (m.name, m.version): (m.state, m.reason)
        for m in handle.stub().RepositoryIndex(pb.RepositoryIndexRequest()).models
    }
    assert index[("ok", "1")] == ("READY", "")
    assert index[("add_mul", "1")][0] == "UNAVAILABLE"
    assert "has data_type TYPE_INT32, the ONNX graph has FP32" in index[("add_mul", "1")][1]
    assert index[("typo", "")][0] == "UNAVAILABLE" and "config.pbtxt" in index[("typo", "")][1]
    assert tc.InferenceServerClient(handle.address).is_model_ready("ok")


def test_corrupt_new_version_keeps_previous_serving(start_gateway, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    write_version(tmp_path, "add_mul", 1, add_mul())
    handle = start_gateway(tmp_path, model_control_mode="poll", poll_interval_s=3600)
    client = tc.InferenceServerClient(handle.address)
    data = add_mul().SerializeToString()
    write_version(tmp_path, "add_mul", 2, data[: len(data) // 2])  # truncated file
    handle.call(handle.gateway.repository.poll_once())
    index = {
        (m.name, m.version): (m.state, m.reason)
        for m in handle.stub().RepositoryIndex(pb.RepositoryIndexRequest()).models
    }
    assert index[("add_mul", "2")][0] == "UNAVAILABLE" and "InvalidProtobuf" in index[("add_mul", "2")][1]
    assert index[("add_mul", "1")] == ("READY", "")
    assert infer_add(client)[0] == "1"
    # fixing the file on disk brings the version in at the next poll
    write_version(tmp_path, "add_mul", 2, add_mul(5.0))
    handle.call(handle.gateway.repository.poll_once())
    assert infer_add(client)[0] == "2"
    assert list(client.get_model_metadata("add_mul").versions) == ["2"]


def test_versions_swap_under_load_with_zero_failures(start_gateway, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    write_version(tmp_path, "add_mul", 1, add_mul())
    handle = start_gateway(tmp_path, model_control_mode="poll", poll_interval_s=0.2)
    stop = threading.Event()
    seen: list[str] = []
    failures: list[str] = []

    def client_loop() -> None:
        client = tc.InferenceServerClient(handle.address)
        while not stop.is_set():
            try:
                version, total = infer_add(client)
                assert np.all(total == 3.0)
                seen.append(version)
            except Exception as e:
                failures.append(str(e))

    threads = [threading.Thread(target=client_loop) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        for version in (2, 3, 4):
            time.sleep(0.6)
            write_version(tmp_path, "add_mul", version, add_mul())
            _wait_for(lambda v=version: seen and seen[-1] == str(v))
        time.sleep(0.3)
        shutil.rmtree(tmp_path / "add_mul" / "4")  # removing the newest falls back to the one below
        _wait_for(lambda: seen[-1] == "3")
        time.sleep(0.3)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert failures == []
    assert {"1", "2", "3", "4"} <= set(seen) and len(seen) > 100


def _wait_for(condition, timeout: float = 20) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def test_unknown_model_is_not_found_even_with_failures(start_gateway, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    write_version(tmp_path, "ok", 1, identity("FP32"))
    stub = start_gateway(tmp_path).stub()
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelMetadata(pb.ModelMetadataRequest(name="missing"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND and "models served: ok" in err.value.details()

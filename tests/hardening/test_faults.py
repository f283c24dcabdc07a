"""Faults injected into a real gateway's model repository (#10 item 3): a served version's model file
corrupted or truncated on disk, a model directory deleted while serving, and a SIGKILL in the middle
of an upload. (The prediction log's faults, a full disk and SIGKILL during feedback, are in
tests/predlog/test_e2e_faults.py and tests/predlog/test_e2e.py; docs/explanation/reliability.md lists them.)"""

from __future__ import annotations

import json
import shutil
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
from prometheus_client.parser import text_string_to_metric_families

from onnxgate.server.pb import grpc_service_pb2 as pb
from onnxgate.server.pb import grpc_service_pb2_grpc as pb_grpc
from tests.conftest import GatewayHandle, SpawnedGateway
from tests.models import add_mul, chained_matmul, identity, write_version


def _infer(client: tc.InferenceServerClient, model: str = "add_mul") -> tuple[str, np.ndarray]:
    a = np.full((2, 4), 1.5, np.float32)
    inputs = [tc.InferInput("a", [2, 4], "FP32"), tc.InferInput("b", [2, 4], "FP32")]
    for inp in inputs:
        inp.set_data_from_numpy(a)
    result = client.infer(model, inputs)
    return result.get_response().model_version, result.as_numpy("sum")


def _index(handle: GatewayHandle) -> dict[tuple[str, str], tuple[str, str]]:
    models = handle.stub().RepositoryIndex(pb.RepositoryIndexRequest()).models
    return {(m.name, m.version): (m.state, m.reason) for m in models}


def _load_failures(handle: GatewayHandle) -> dict[tuple[str, str], float]:
    with urllib.request.urlopen(handle.metrics_url, timeout=10) as response:
        text = response.read().decode()
    return {
        (s.labels["model"], s.labels["reason"]): s.value
        for family in text_string_to_metric_families(text)
        if family.name == "onnxgate_model_load_failures"
        for s in family.samples
        if s.name.endswith("_total")
    }


def _wait(condition: Callable[[], bool], timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


class Load:
    """Clients looping on a model, counting answers by version and every failure."""

    def __init__(self, address: str, model: str = "add_mul", clients: int = 3) -> None:
        self.stop = threading.Event()
        self.versions: list[str] = []
        self.failures: list[str] = []
        self.threads = [threading.Thread(target=self._loop, args=(address, model)) for _ in range(clients)]
        for t in self.threads:
            t.start()

    def _loop(self, address: str, model: str) -> None:
        client = tc.InferenceServerClient(address)
        while not self.stop.is_set():
            try:
                version, total = _infer(client, model)
                assert np.all(total == 3.0), total
                self.versions.append(version)
            except Exception as e:
                self.failures.append(str(e))

    def finish(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(10)


@pytest.mark.parametrize("damage", ["truncated", "corrupted", "emptied"])
def test_a_served_versions_file_damaged_on_disk_keeps_serving_and_the_reload_says_why(  # type: ignore[no-untyped-def]
    start_gateway, tmp_path: Path, damage: str
) -> None:
    model_file = write_version(tmp_path, "add_mul", 1, add_mul()) / "model.onnx"
    handle = start_gateway(tmp_path, model_control_mode="poll", poll_interval_s=0.1)
    load = Load(handle.address)
    try:
        assert _wait(lambda: len(load.versions) > 20)
        data = model_file.read_bytes()
        if damage == "truncated":
            model_file.write_bytes(data[: len(data) // 2])
        elif damage == "corrupted":
            model_file.write_bytes(bytes(b ^ 0x5A for b in data))
        else:
            model_file.write_bytes(b"")
        assert _wait(lambda: _index(handle)[("add_mul", "1")][1] != "")
        answered = len(load.versions)
        assert _wait(lambda: len(load.versions) > answered + 20)  # still answering, after several polls
    finally:
        load.finish()
    assert load.failures == [] and set(load.versions) == {"1"}
    state, reason = _index(handle)[("add_mul", "1")]
    assert state == "READY" and reason.startswith("reload failed, the version loaded before keeps serving:")
    assert _load_failures(handle).get(("add_mul", "invalid_model"), 0) >= 1
    assert tc.InferenceServerClient(handle.address).is_model_ready("add_mul")
    # the file repaired: the version reloads from disk and the reason goes away
    model_file.write_bytes(add_mul(5.0).SerializeToString())
    assert _wait(lambda: _index(handle)[("add_mul", "1")] == ("READY", ""))


def test_a_model_directory_deleted_while_serving_is_unloaded_at_the_next_poll(  # type: ignore[no-untyped-def]
    start_gateway, tmp_path: Path
) -> None:
    """Poll mode: the repository on disk is the truth. Requests in flight finish on the version they
    hold; later ones get NOT_FOUND; the other models serve on; the model comes back with its directory."""
    write_version(tmp_path, "add_mul", 1, add_mul())
    write_version(tmp_path, "slow", 1, chained_matmul(256, 400))
    write_version(tmp_path, "other", 1, identity("FP32"))
    handle = start_gateway(tmp_path, model_control_mode="poll", poll_interval_s=0.1)
    client = tc.InferenceServerClient(handle.address)
    x = np.ones((256, 256), np.float32)
    slow_input = tc.InferInput("x", [256, 256], "FP32")
    slow_input.set_data_from_numpy(x)
    started = time.monotonic()
    client.infer("slow", [slow_input])
    slow_s = time.monotonic() - started
    in_flight: list[object] = []
    worker = threading.Thread(target=lambda: in_flight.append(client.infer("slow", [slow_input]).as_numpy("y")))
    worker.start()
    time.sleep(min(0.05, slow_s / 4))
    shutil.rmtree(tmp_path / "slow")
    shutil.rmtree(tmp_path / "add_mul")
    assert _wait(lambda: ("add_mul", "1") not in _index(handle) and ("slow", "1") not in _index(handle))
    worker.join(60)
    assert len(in_flight) == 1 and np.allclose(in_flight[0], 1.0)  # the request in flight finished
    with pytest.raises(tc.InferenceServerException, match="unknown model 'add_mul'") as e:
        _infer(client)
    assert e.value.status() == "StatusCode.NOT_FOUND"
    assert client.is_model_ready("other")
    write_version(tmp_path, "add_mul", 1, add_mul())
    assert _wait(lambda: client.is_model_ready("add_mul"))
    assert _infer(client)[0] == "1"


def test_a_model_directory_deleted_in_explicit_mode_serves_on_until_unloaded(  # type: ignore[no-untyped-def]
    start_gateway, tmp_path: Path
) -> None:
    """Explicit mode: the control RPCs are the truth. The loaded model is in memory and serves on; a
    load of it answers NOT_FOUND and keeps what is served; an unload unloads it."""
    write_version(tmp_path, "add_mul", 1, add_mul())
    handle = start_gateway(tmp_path, model_control_mode="explicit", load_model=("add_mul",))
    client = tc.InferenceServerClient(handle.address)
    shutil.rmtree(tmp_path / "add_mul")
    assert _infer(client)[0] == "1"
    with pytest.raises(tc.InferenceServerException, match="no model directory 'add_mul'"):
        client.load_model("add_mul")
    assert _infer(client)[0] == "1"
    client.unload_model("add_mul")
    assert not client.is_model_ready("add_mul")


def _spawn_explicit(spawn_gateway: Callable[..., SpawnedGateway], repo: Path, *models: str) -> SpawnedGateway:
    args = ["--model-repository", str(repo), "--model-control-mode", "explicit"]
    for model in models:
        args += ["--load-model", model]
    return spawn_gateway(*args)


def _stub(address: str) -> tuple[grpc.Channel, pb_grpc.GRPCInferenceServiceStub]:
    channel = grpc.insecure_channel(
        address, options=[("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]
    )
    return channel, pb_grpc.GRPCInferenceServiceStub(channel)


@pytest.mark.parametrize("existing", [False, True], ids=["new-model", "replacing-a-model"])
def test_a_sigkill_in_the_middle_of_an_upload_leaves_no_half_written_version(  # type: ignore[no-untyped-def]
    spawn_gateway, tmp_path: Path, existing: bool
) -> None:
    repo = tmp_path / "repo"
    write_version(repo, "keep", 1, identity("FP32"))
    if existing:
        write_version(repo, "add_mul", 1, add_mul())
    gw = _spawn_explicit(spawn_gateway, repo, "keep", *(["add_mul"] if existing else []))
    channel, stub = _stub(gw.address)
    request = pb.RepositoryModelLoadRequest(model_name="add_mul")
    request.parameters["config"].string_param = json.dumps({"version_policy": {"all": {}}})
    request.parameters["file:1/model.onnx"].bytes_param = add_mul().SerializeToString()
    request.parameters["file:2/model.onnx"].bytes_param = add_mul(5.0).SerializeToString()
    for i in range(6):  # 6 x 32 MiB of extra files: the write takes long enough to be caught in it
        request.parameters[f"file:2/weights{i}.bin"].bytes_param = bytes(32 * 1024 * 1024)
    outcome: list[object] = []

    def upload() -> None:
        try:
            stub.RepositoryModelLoad(request, timeout=60)
            outcome.append("ok")
        except grpc.RpcError as e:
            outcome.append(e.code())

    thread = threading.Thread(target=upload)
    thread.start()
    deadline = time.monotonic() + 60
    staged: list[Path] = []
    while time.monotonic() < deadline and not staged and thread.is_alive():
        staged = [p for p in repo.iterdir() if p.name.startswith(".upload-")]
        time.sleep(0.001)
    assert staged, "the upload finished before it could be killed"
    gw.process.kill()  # SIGKILL, mid-write
    gw.process.wait(10)
    thread.join(30)
    channel.close()
    assert outcome and outcome[0] != "ok"  # never acknowledged
    assert any(p.name.startswith(".upload-") for p in repo.iterdir())  # it was left behind...

    restarted = _spawn_explicit(spawn_gateway, repo, "keep", *(["add_mul"] if existing else []))
    assert not [p.name for p in repo.iterdir() if p.name.startswith(".")]  # ... and removed at the start
    client = tc.InferenceServerClient(restarted.address)
    index = {(m.name, m.version, m.state) for m in client.get_model_repository_index().models}
    assert not [entry for entry in index if entry[0].startswith(".")]  # staging dirs are never models
    if existing:  # the old directory, whole: version 1 only, serving
        assert sorted(p.name for p in (repo / "add_mul").iterdir()) == ["1"]
        assert index == {("keep", "1", "READY"), ("add_mul", "1", "READY")}
        assert _infer(client)[0] == "1"
    else:  # no directory at all
        assert not (repo / "add_mul").exists() and index == {("keep", "1", "READY")}
    # the same upload after the restart goes through whole
    channel, stub = _stub(restarted.address)
    stub.RepositoryModelLoad(request, timeout=120)
    channel.close()
    assert client.get_model_metadata("add_mul").versions == ["1", "2"]
    assert (repo / "add_mul" / "2" / "weights5.bin").stat().st_size == 32 * 1024 * 1024

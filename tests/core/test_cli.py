"""The `onnxgate serve` command and its settings: file < env < flags, clear errors, clean shutdown."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as tc

from onnxgate.server.config import Settings, SettingsError, load_settings
from tests.models import matmul_square, write_version


def test_settings_precedence_file_env_flags(tmp_path: Path) -> None:
    config = tmp_path / "onnxgate.toml"
    config.write_text(
        'model_repository = "/models"\ngrpc_port = 9001\nmetrics_port = 9002\nmodel-control-mode = "poll"\n'
    )
    env = {"ONNXGATE_GRPC_PORT": "9100", "ONNXGATE_LOAD_MODEL": "a,b"}
    settings = load_settings(config, env=env, flags={"metrics_port": "9200"})
    assert settings == Settings(
        model_repository=Path("/models"),
        grpc_port=9100,
        metrics_port=9200,
        model_control_mode="poll",
        load_model=("a", "b"),
    )
    assert load_settings(env={"ONNXGATE_CONFIG": str(config)}).grpc_port == 9001


@pytest.mark.parametrize(
    ("flags", "env", "message"),
    [
        ({"grpc_port": "eighty"}, {}, "flag --grpc-port: setting grpc_port = 'eighty' is not a valid int"),
        ({"grpc_port": 70000}, {}, "grpc_port = 70000 is invalid: expected a port number 0-65535"),
        (
            {},
            {"ONNXGATE_MODEL_CONTROL_MODE": "sometimes"},
            "model_control_mode = 'sometimes' is invalid: expected one of none, poll, explicit",
        ),
        (
            {},
            {"ONNXGATE_EXAMPLE": "maybe"},
            "environment variable ONNXGATE_EXAMPLE: setting example = 'maybe' is not a valid bool",
        ),
        ({"poll_interval_s": "0"}, {}, "poll_interval_s = 0.0 is invalid"),
    ],
)
def test_bad_settings_get_clear_errors(flags: dict[str, object], env: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError) as err:
        load_settings(env=env, flags={"model_repository": "/m", **flags})
    assert message in str(err.value)


def test_unknown_key_in_config_file(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text("grpc_prot = 1\n")
    with pytest.raises(SettingsError, match="unknown setting 'grpc_prot'"):
        load_settings(config, env={})


def test_no_repository_is_an_error() -> None:
    with pytest.raises(SettingsError, match="no model repository: pass --model-repository DIR"):
        load_settings(env={})


def test_serve_rejects_bad_flag_with_exit_2(tmp_path: Path) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "onnxgate", "serve", "--model-repository", str(tmp_path), "--grpc-port", "x"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert run.returncode == 2
    assert "setting grpc_port = 'x' is not a valid int" in run.stderr


def test_serve_example_then_sigterm_drains_in_flight(spawn_gateway, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    write_version(tmp_path, "slow", 1, matmul_square(800))
    gw = spawn_gateway("--model-repository", str(tmp_path), "--inference-threads", "1")
    client = tc.InferenceServerClient(gw.address)
    assert client.is_server_ready()
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{gw.metrics_port}/metrics", timeout=10).read().decode()
    assert 'onnxgate_model_version_ready{model="slow",version="1"} 1.0' in metrics

    x = np.ones((800, 800), np.float32)
    results: list[object] = []

    def slow_request() -> None:
        inp = tc.InferInput("x", [800, 800], "FP32")
        inp.set_data_from_numpy(x)
        try:
            results.append(client.infer("slow", [inp]).as_numpy("y")[0, 0])
        except Exception as e:
            results.append(e)

    threads = [threading.Thread(target=slow_request) for _ in range(3)]
    for t in threads:
        t.start()
    time.sleep(0.3)  # requests in flight (queued on one inference thread)
    assert gw.terminate() == 0
    for t in threads:
        t.join()
    assert results == [800.0, 800.0, 800.0]  # every accepted request finished before exit


def test_serve_example_builds_and_serves(spawn_gateway, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    gw = spawn_gateway("--example", "--model-repository", str(tmp_path / "example"))
    client = tc.InferenceServerClient(gw.address)
    assert {m.name for m in client.get_model_repository_index().models} == {"iris", "diabetes", "petal_width"}
    gw.terminate()


def test_generated_protocol_code_is_up_to_date(tmp_path: Path) -> None:
    repo = Path(__file__).resolve().parents[2]
    subprocess.run(
        [sys.executable, str(repo / "proto" / "generate.py"), "--out", str(tmp_path)], check=True, timeout=120
    )
    committed = repo / "server" / "pb"
    fresh = {p.name: p.read_text() for p in tmp_path.iterdir() if p.is_file()}
    current = {p.name: p.read_text() for p in committed.iterdir() if p.is_file()}
    stale = sorted(name for name in fresh.keys() | current.keys() if fresh.get(name) != current.get(name))
    assert not stale, f"server/pb is stale for {stale}: run `python proto/generate.py`"

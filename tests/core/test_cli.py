"""The `onnxgate serve` command and its settings: file < env < flags, clear errors, clean shutdown."""

from __future__ import annotations

import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as tc

from onnxgate.server.cli import how_to_call
from onnxgate.server.config import Settings, SettingsError, load_settings
from tests.models import chained_matmul, write_version


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
        ({"event_loop": "trio"}, {}, "event_loop = 'trio' is invalid: expected one of auto, uvloop, asyncio"),
    ],
)
def test_bad_settings_get_clear_errors(flags: dict[str, object], env: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError) as err:
        load_settings(env=env, flags={"model_repository": "/m", **flags})
    assert message in str(err.value)


def test_the_event_loop_setting_picks_the_loop() -> None:
    import uvloop

    from onnxgate.server.cli import _loop_factory

    assert _loop_factory("asyncio") is None  # asyncio.Runner's default loop
    assert _loop_factory("uvloop") is uvloop.new_event_loop
    assert _loop_factory("auto") is uvloop.new_event_loop  # installed with the package


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
    """SIGTERM with three gRPC requests in flight (one inference thread: one runs, two queue): all three are
    answered, then the process exits 0. The model is slow by construction (chained_matmul: ~0.15 s a request
    on a fast core), so the three are surely in flight together; tests/core/test_drain.py has the load."""
    size = 512
    write_version(tmp_path, "slow", 1, chained_matmul(size, 120))
    gw = spawn_gateway(
        "--model-repository", str(tmp_path), "--inference-threads", "1", "--shutdown-grace-s", "120",
        "--drain-delay-s", "5",  # the default; spawn_gateway's is 0
    )  # fmt: skip
    client = tc.InferenceServerClient(gw.address)
    assert client.is_server_ready()

    def metrics() -> str:
        return urllib.request.urlopen(f"http://127.0.0.1:{gw.metrics_port}/metrics", timeout=10).read().decode()

    assert 'onnxgate_model_version_ready{model="slow",version="1"} 1.0' in metrics()
    x = np.ones((size, size), np.float32)
    results: list[object] = []

    def slow_request() -> None:
        inp = tc.InferInput("x", [size, size], "FP32")
        inp.set_data_from_numpy(x)
        try:
            y = client.infer("slow", [inp]).as_numpy("y")
            results.append(float(y[0, 0]) if y is not None and bool((y == y[0, 0]).all()) else y)
        except Exception as e:
            results.append(e)

    threads = [threading.Thread(target=slow_request) for _ in range(3)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    while "onnxgate_inflight_requests 3.0" not in (text := metrics()) and time.monotonic() < deadline:
        time.sleep(0.005)
    assert "onnxgate_inflight_requests 3.0" in text and not results, results  # all three in flight
    assert gw.terminate(timeout=60) == 0
    for t in threads:
        t.join(30)
    assert results == [1.0, 1.0, 1.0]  # every accepted request finished before exit


def test_serve_example_builds_and_serves(spawn_gateway, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    gw = spawn_gateway("--example", "--model-repository", str(tmp_path / "example"))
    client = tc.InferenceServerClient(gw.address)
    assert {m.name for m in client.get_model_repository_index().models} == {"iris", "diabetes", "petal_width"}
    # the Python lines the example prints when ready work as printed
    host, port = gw.address.rsplit(":", 1)
    snippet = textwrap.dedent(
        "\n".join(line for line in how_to_call(host, int(port)).splitlines() if line[:4] == "    ")
    )
    run = subprocess.run([sys.executable, "-c", snippet], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("[0]"), run.stdout  # the label of the first iris flower: setosa
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


def _serve(*args: str) -> subprocess.CompletedProcess[str]:
    """`python -m onnxgate serve ARGS` to its end; start-up failures must end it promptly. Any free ports
    unless ARGS name them: start-up reports every problem, a server elsewhere on 8000-8002 included."""
    ports = ("--grpc-port", "0", "--http-port", "0", "--metrics-port", "0")
    return subprocess.run(
        [sys.executable, "-m", "onnxgate", "serve", "--log-level", "warning", *ports, *args],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


@pytest.mark.parametrize("taken", ["grpc_port", "metrics_port", "http_port"])
def test_taken_port_stops_serve_with_one_line(example_copy: Path, taken: str) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        ports = {"grpc_port": 0, "metrics_port": 0, "http_port": 0, taken: port}
        # the example brings the prediction log's writer threads: they must not keep the process alive
        run = _serve(
            "--example", "--model-repository", str(example_copy),
            "--grpc-port", str(ports["grpc_port"]), "--metrics-port", str(ports["metrics_port"]),
            "--http-port", str(ports["http_port"]),
        )  # fmt: skip
    flag = "--" + taken.replace("_", "-")
    assert run.returncode == 2, run.stderr
    assert run.stderr.splitlines() == [
        f"onnxgate: {taken} {port} on 127.0.0.1 is in use (another server? Triton uses 8000-8002 too):"
        f" choose another with {flag} or ONNXGATE_{taken.upper()}"
        + {"metrics_port": " (-1 turns metrics off)", "http_port": " (-1 turns HTTP/REST off)"}.get(taken, "")
    ]


def test_repository_that_is_a_file_or_missing(tmp_path: Path) -> None:
    file = tmp_path / "models.txt"
    file.write_text("not a directory\n")
    where = "set --model-repository or ONNXGATE_MODEL_REPOSITORY"
    for args, line in [
        (["--model-repository", str(file)], f"model repository {file} is not a directory: {where}"),
        # --example builds into the path it is given: a file there is refused, not replaced
        (["--example", "--model-repository", str(file)], f"model repository {file} is not a directory: {where}"),
        (["--model-repository", str(tmp_path / "absent")], f"model repository {tmp_path / 'absent'} does not exist"),
    ]:
        run = _serve(*args)
        assert run.returncode == 2, run.stderr
        assert len(run.stderr.splitlines()) == 1 and run.stderr.startswith(f"onnxgate: {line}"), run.stderr
    assert file.read_text() == "not a directory\n"


def test_unreadable_or_malformed_config_file(tmp_path: Path) -> None:
    malformed = tmp_path / "bad.toml"
    malformed.write_text("grpc_port = \n")
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"\x80\x81\xfe\xff grpc_port = 1\n")
    where = "fix it, or point --config (ONNXGATE_CONFIG) elsewhere"
    cases = [
        ([f"--config={tmp_path}"], f"config file {tmp_path} cannot be read (Is a directory): {where}"),
        ([f"--config={tmp_path / 'absent.toml'}"], "cannot be read (No such file or directory)"),
        ([f"--config={malformed}"], f"config file {malformed} is not valid TOML (Invalid value (at line 1"),
        ([f"--config={binary}"], f"config file {binary} is not UTF-8 text (TOML expected): {where}"),
    ]
    for args, message in cases:
        run = _serve("--example", *args)
        assert run.returncode == 2, run.stderr
        assert len(run.stderr.splitlines()) == 1 and message in run.stderr, run.stderr

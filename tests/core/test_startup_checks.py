"""`onnxgate serve` checks its ports, files and settings before it starts anything, and reports every problem
at once: one line each, exit status 2, and no line before them that suggests it started."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from onnxgate.server.config import SettingsError, load_settings


def _serve(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "onnxgate", "serve", *args], capture_output=True, text=True, timeout=60
    )


@pytest.fixture
def three_taken_ports() -> Iterator[list[int]]:
    with ExitStack() as stack:
        ports = []
        for _ in range(3):
            holder = stack.enter_context(socket.socket())
            holder.bind(("127.0.0.1", 0))
            holder.listen()
            ports.append(holder.getsockname()[1])
        yield ports


def test_every_taken_port_is_reported_in_one_attempt(tmp_path: Path, three_taken_ports: list[int]) -> None:
    grpc_port, http_port, metrics_port = three_taken_ports
    run = _serve(
        "--model-repository", str(tmp_path), "--grpc-port", str(grpc_port), "--http-port", str(http_port),
        "--metrics-port", str(metrics_port),
    )  # fmt: skip
    assert run.returncode == 2
    in_use = "is in use (another server? Triton uses 8000-8002 too): choose another with"
    assert run.stderr.splitlines() == [
        f"onnxgate: grpc_port {grpc_port} on 127.0.0.1 {in_use} --grpc-port or ONNXGATE_GRPC_PORT",
        f"onnxgate: http_port {http_port} on 127.0.0.1 {in_use} --http-port or ONNXGATE_HTTP_PORT"
        " (-1 turns HTTP/REST off)",
        f"onnxgate: metrics_port {metrics_port} on 127.0.0.1 {in_use} --metrics-port or ONNXGATE_METRICS_PORT"
        " (-1 turns metrics off)",
    ]


def test_ports_files_and_repository_are_all_checked_before_anything_starts(
    tmp_path: Path, three_taken_ports: list[int]
) -> None:
    empty_tokens = tmp_path / "tokens.txt"
    empty_tokens.write_text("# no token yet\n")
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    run = _serve(
        "--model-repository", str(tmp_path / "absent"),
        "--grpc-port", str(three_taken_ports[0]), "--http-port", str(three_taken_ports[0]), "--metrics-port", "-1",
        "--inference-token-file", str(empty_tokens),
        "--control-token-file", str(tmp_path / "no-such-tokens.txt"),
        "--tls-cert-file", str(tmp_path / "cert.pem"), "--tls-key-file", str(tmp_path / "key.pem"),
        "--predlog-dir", str(blocked / "log"),
    )  # fmt: skip
    assert run.returncode == 2
    lines = run.stderr.splitlines()
    expected = [
        f"model repository {tmp_path / 'absent'} does not exist",
        f"grpc_port {three_taken_ports[0]} on 127.0.0.1 is in use",
        f"http_port {three_taken_ports[0]} is also grpc_port: each port needs its own number",
        "cert.pem",
        f"inference_token_file {empty_tokens} holds no token",
        f"control_token_file {tmp_path / 'no-such-tokens.txt'} cannot be read (No such file or directory)",
        f"predlog_dir {blocked / 'log'}: {blocked} is not a directory",
    ]
    assert len(lines) == len(expected), run.stderr
    for line, part in zip(lines, expected, strict=True):
        assert line.startswith("onnxgate: ") and part in line, (line, part)
    # nothing started, so nothing was logged as starting or draining
    assert "drain" not in run.stderr and "INFO" not in run.stderr


def test_every_bad_setting_is_reported_at_once() -> None:
    with pytest.raises(SettingsError) as err:
        load_settings(
            env={"ONNXGATE_MODEL_CONTROL_MODE": "sometimes", "ONNXGATE_EXAMPLE": "maybe"},
            flags={"grpc_port": "eighty", "poll_interval_s": "0", "metrics_port": "-5", "tls_key_file": "k.pem"},
        )
    problems = err.value.problems
    assert len(problems) == 7, problems
    for part in (
        "ONNXGATE_EXAMPLE: setting example = 'maybe' is not a valid bool",
        "flag --grpc-port: setting grpc_port = 'eighty' is not a valid int",
        "model_control_mode = 'sometimes' is invalid",
        "metrics_port = -5 is invalid",
        "tls_cert_file and tls_key_file go together",
        "poll_interval_s = 0.0 is invalid",
        "no model repository",
    ):
        assert sum(part in p for p in problems) == 1, (part, problems)


def test_bad_settings_from_the_command_line_are_one_line_each(tmp_path: Path) -> None:
    run = _serve("--model-repository", str(tmp_path), "--grpc-port", "x", "--drain-delay-s", "-1")
    assert run.returncode == 2
    assert run.stderr.splitlines() == [
        "onnxgate: flag --grpc-port: setting grpc_port = 'x' is not a valid int: invalid literal for int() with base"
        " 10: 'x'",
        "onnxgate: setting drain_delay_s = -1.0 is invalid: expected 0 or more seconds",
    ]

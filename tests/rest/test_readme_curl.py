"""The curl commands a new user copies from the README and from `serve --example`, run as written."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as tc

from onnxgate.server.cli import how_to_call

README = Path(__file__).resolve().parents[2] / "README.md"


def _curl_commands(text: str) -> list[str]:
    """Indented `curl ...` commands, with their backslash-continued lines joined."""
    lines = text.splitlines()
    commands = []
    for i, line in enumerate(lines):
        if line.strip().startswith("curl "):
            command = line.strip()
            j = i
            while command.endswith("\\"):
                j += 1
                command = command[:-1] + " " + lines[j].strip()
            commands.append(command)
    return commands


def _run(command: str, http_port: int) -> str:
    if shutil.which("curl") is None:
        pytest.fail("curl is missing: apt-get install curl")
    command = re.sub(r"(localhost|127\.0\.0\.1):8000", f"127.0.0.1:{http_port}", command)
    run = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    return run.stdout


def test_readme_curl_commands_answer_as_grpc_does(start_gateway, example_repository: Path) -> None:  # type: ignore[no-untyped-def]
    handle = start_gateway(example_repository)
    commands = _curl_commands(README.read_text())
    infer = [c for c in commands if "/infer" in c]
    assert infer, "the README shows no curl infer command"
    answer = json.loads(_run(infer[0], handle.gateway.http_port))
    outputs = {o["name"]: o for o in answer["outputs"]}
    assert answer["model_name"] == "iris" and answer["model_version"] == "2" and answer["id"]

    client = tc.InferenceServerClient(handle.address)
    inp = tc.InferInput("input", [1, 4], "FP32")
    inp.set_data_from_numpy(np.array([[5.1, 3.5, 1.4, 0.2]], np.float32))
    expected = client.infer("iris", [inp])
    for name in ("label", "probabilities"):
        want = expected.as_numpy(name)
        got = np.array(outputs[name]["data"], dtype=want.dtype).reshape(outputs[name]["shape"])
        np.testing.assert_array_equal(got, want)
    client.close()

    metadata = [c for c in commands if c.rstrip("'\"").endswith("/v2/models/iris")]
    assert metadata, "the README shows no curl model metadata command"
    assert json.loads(_run(metadata[0], handle.gateway.http_port))["inputs"][0]["name"] == "input"


def test_the_curl_line_serve_example_prints_works(start_gateway, example_repository: Path) -> None:  # type: ignore[no-untyped-def]
    handle = start_gateway(example_repository)
    printed = how_to_call("127.0.0.1", handle.gateway.port, handle.gateway.http_port)
    (command,) = _curl_commands(printed)
    answer = json.loads(_run(command, handle.gateway.http_port))
    assert [o["name"] for o in answer["outputs"]] == ["probabilities", "label"]
    assert answer["outputs"][1]["data"] == [0]  # the first iris flower: setosa

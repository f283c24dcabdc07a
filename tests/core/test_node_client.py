"""A client in another language: Node.js with @grpc/grpc-js, raw and typed inputs, an error code."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest

NODE_DIR = Path(__file__).resolve().parents[1] / "node"


@pytest.fixture(scope="module")
def node() -> str:
    node = shutil.which("node")
    if node is None or not (NODE_DIR / "node_modules" / "@grpc" / "grpc-js").is_dir():
        pytest.fail("Node.js client packages are missing: run .ci/deps/node.sh (the test command does)")
    return node


def test_node_grpc_js_client(node: str, start_gateway, example_repository: Path) -> None:  # type: ignore[no-untyped-def]
    handle = start_gateway(example_repository)
    run = subprocess.run(
        [node, str(NODE_DIR / "client.js"), handle.address], capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    assert result["live"] is True and result["server"]["name"] == "onnxgate"
    assert result["metadata"]["versions"] == ["1", "2"]
    assert [(t["name"], t["shape"]) for t in result["metadata"]["inputs"]] == [("input", [-1, 4])]

    x = np.array([[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]], dtype=np.float32)
    label, proba = ort.InferenceSession(str(example_repository / "iris" / "1" / "model.onnx")).run(None, {"input": x})
    iris = result["iris"]
    assert iris["id"] == "node-1" and iris["version"] == "1"
    assert iris["outputs"]["label"]["values"] == label.tolist()
    np.testing.assert_allclose(np.array(iris["outputs"]["probabilities"]["values"]).reshape(2, 3), proba, rtol=1e-6)

    session = ort.InferenceSession(str(example_repository / "petal_width" / "1" / "model.onnx"))
    feed = {
        "species": np.array([["setosa"], ["virginica"]], dtype=object),
        "sepal_length": np.array([[5.1], [6.7]], np.float32),
        "sepal_width": np.array([[3.5], [3.0]], np.float32),
        "petal_length": np.array([[1.4], [5.2]], np.float32),
    }
    (expected,) = session.run(["prediction"], feed)
    petal = result["petal_width"]
    assert len(petal["generated_id"]) >= 16
    np.testing.assert_allclose(np.array(petal["outputs"]["prediction"]["values"]).reshape(2, 1), expected, rtol=1e-6)
    assert result["not_found"]["code"] == grpc.StatusCode.NOT_FOUND.value[0]

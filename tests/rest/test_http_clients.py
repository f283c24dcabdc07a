"""Clients of the HTTP/REST edge that we did not write: Triton's perf_analyzer over HTTP (with binary
tensor data and server-side statistics), and Node.js's global fetch with plain JSON."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient

ROOT = Path(__file__).resolve().parents[2]
PERF_ANALYZER = ROOT / ".venv-pa" / "bin" / "perf_analyzer"
REST_CLIENT = ROOT / "tests" / "node" / "rest_client.js"
ROWS = np.array([[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]], dtype=np.float32)


def test_perf_analyzer_over_http_measures_with_server_statistics(start_gateway, example_repository: Path) -> None:  # type: ignore[no-untyped-def]
    if not PERF_ANALYZER.exists():
        pytest.fail("perf_analyzer is missing: run .ci/deps/perf-analyzer.sh (the test command does)")
    handle = start_gateway(example_repository)
    run = subprocess.run(
        [str(PERF_ANALYZER), "-m", "iris", "-i", "http", "-u", f"127.0.0.1:{handle.gateway.http_port}", "-b", "2",
         "--concurrency-range", "2", "--measurement-interval", "1000", "--stability-percentage", "100"],
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    # perf_analyzer read /v2/models/iris and its /config, sent binary tensor data, and measured the
    # statistics it fetched from /v2/models/iris/stats before and after
    assert "Avg HTTP time" in run.stdout
    server = run.stdout[run.stdout.index("Server:") :]
    inferences = int(re.search(r"Inference count: (\d+)", server).group(1))  # type: ignore[union-attr]
    successes = int(re.search(r"Successful request count: (\d+)", server).group(1))  # type: ignore[union-attr]
    assert successes > 0 and inferences == 2 * successes  # batch 2: two rows per request
    assert re.search(r"Avg request latency: \d+ usec", server)


def test_node_fetch_json_matches_grpc_and_onnxruntime(start_gateway, example_repository: Path) -> None:  # type: ignore[no-untyped-def]
    node = shutil.which("node")
    if node is None:
        pytest.fail("Node.js is missing: run .ci/deps/node.sh (the test command does)")
    handle = start_gateway(example_repository)
    run = subprocess.run(
        [node, str(REST_CLIENT), f"127.0.0.1:{handle.gateway.http_port}"], capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    assert result["ready"] == 200 and result["not_found"] == 404
    metadata = result["metadata"]
    assert metadata["name"] == "iris" and metadata["versions"] == ["1", "2"]
    assert [(t["name"], t["datatype"], t["shape"]) for t in metadata["inputs"]] == [("input", "FP32", [-1, 4])]

    infer = result["infer"]
    assert infer["status"] == 200 and infer["content_type"] == "application/json", infer
    answer = infer["body"]
    assert answer["id"] == "node-rest-1" and answer["model_name"] == "iris"
    version = answer["model_version"]
    assert version == metadata["versions"][-1]  # no version in the path: the latest served
    rest = {t["name"]: t for t in answer["outputs"]}

    # the same rows over gRPC, with Triton's own client
    with grpcclient.InferenceServerClient(handle.address) as client:
        tensor = grpcclient.InferInput("input", list(ROWS.shape), "FP32")
        tensor.set_data_from_numpy(ROWS)
        grpc_answer = client.infer("iris", [tensor])
    assert grpc_answer.get_response().model_version == version

    # and onnxruntime on the served version's file, with no gateway between
    session = ort.InferenceSession(str(example_repository / "iris" / version / "model.onnx"))
    expected = dict(zip([o.name for o in session.get_outputs()], session.run(None, {"input": ROWS}), strict=True))

    assert set(rest) == set(expected) == {"label", "probabilities"}
    for name, want in expected.items():
        got = rest[name]
        from_grpc = grpc_answer.as_numpy(name)
        assert got["shape"] == list(want.shape) == list(from_grpc.shape), name
        values = np.array(got["data"], dtype=want.dtype).reshape(want.shape)
        if want.dtype.kind == "f":
            # JSON carries FP32 as decimal text: equal to the float32 after rounding back
            np.testing.assert_array_equal(values, from_grpc)
            np.testing.assert_allclose(values, want, rtol=1e-6)
        else:
            assert got["datatype"] == "INT64"
            assert values.tolist() == from_grpc.tolist() == want.tolist()

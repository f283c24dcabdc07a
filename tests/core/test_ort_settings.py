"""Per-model onnxruntime settings from config.pbtxt parameters (docs/explanation/benchmarks.md "onnxruntime settings")."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tritonclient.grpc as tc

from onnxgate.server.pb import grpc_service_pb2 as pb
from tests.models import add_mul, write_version


def _params(**values: str) -> str:
    return "\n".join(f'parameters {{ key: "{k}" value {{ string_value: "{v}" }} }}' for k, v in values.items())


def test_session_parameters_apply_and_bad_values_fail_the_load(start_gateway, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    write_version(
        tmp_path, "tuned", 1, add_mul(), config=_params(ort_intra_op_threads="2", ort_graph_optimization_level="basic")
    )
    write_version(tmp_path, "threads", 1, add_mul(), config=_params(ort_intra_op_threads="0"))
    write_version(tmp_path, "level", 1, add_mul(), config=_params(ort_graph_optimization_level="max"))
    handle = start_gateway(tmp_path)
    index = {m.name: (m.state, m.reason) for m in handle.stub().RepositoryIndex(pb.RepositoryIndexRequest()).models}
    assert index["tuned"] == ("READY", "")
    assert index["threads"][0] != "READY"
    assert "ort_intra_op_threads" in index["threads"][1] and "'0'" in index["threads"][1]
    assert index["level"][0] != "READY"
    assert "ort_graph_optimization_level" in index["level"][1] and "EXTENDED" in index["level"][1]

    client = tc.InferenceServerClient(handle.address)
    a = np.full((3, 4), 1.5, np.float32)
    inputs = [tc.InferInput("a", [3, 4], "FP32"), tc.InferInput("b", [3, 4], "FP32")]
    for inp in inputs:
        inp.set_data_from_numpy(a)
    result = client.infer("tuned", inputs)
    np.testing.assert_array_equal(result.as_numpy("sum"), a + a)
    options = handle.gateway.repository.get("tuned", "").runtime.session.get_session_options()
    assert options.intra_op_num_threads == 2

"""ModelInfer end to end: every datatype raw and typed, several inputs/outputs, ids, versions, sizes."""

from __future__ import annotations

import struct
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as tc

from onnxgate.server.pb import grpc_service_pb2 as pb
from onnxgate.server.tensors import DATATYPES
from tests.models import NUMPY, identity, typed_repository, write_version

SERVED_TYPES = [name for name in DATATYPES]


def sample(datatype: str, rows: int = 2, width: int = 3) -> np.ndarray:
    rng = np.random.default_rng(7)
    if datatype == "BYTES":
        return np.array([[f"s{r}-{c}-é".encode() for c in range(width)] for r in range(rows)], dtype=object)
    if datatype == "BOOL":
        return rng.integers(0, 2, (rows, width)).astype(bool)
    dtype = NUMPY[datatype]
    if dtype.kind == "f":
        return rng.standard_normal((rows, width)).astype(dtype)
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max, (rows, width), dtype=dtype, endpoint=True)


def raw_bytes(array: np.ndarray) -> bytes:
    if array.dtype == object:
        return b"".join(struct.pack("<I", len(x)) + x for x in array.reshape(-1))
    return array.astype(array.dtype.newbyteorder("<")).tobytes()


def decode_output(response: pb.ModelInferResponse, index: int) -> np.ndarray:
    tensor = response.outputs[index]
    raw = response.raw_output_contents[index]
    if tensor.datatype == "BYTES":
        out, offset = [], 0
        while offset < len(raw):
            (n,) = struct.unpack_from("<I", raw, offset)
            out.append(raw[offset + 4 : offset + 4 + n])
            offset += 4 + n
        return np.array(out, dtype=object).reshape(tensor.shape)
    return np.frombuffer(raw, dtype=NUMPY[tensor.datatype]).reshape(tensor.shape)


@pytest.fixture(scope="module")
def typed_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = typed_repository(tmp_path_factory.mktemp("typed"))
    write_version(repo, "big", 1, identity("FP32", width=1024 * 1024))
    return repo


@pytest.mark.parametrize("datatype", SERVED_TYPES)
@pytest.mark.parametrize("form", ["raw", "typed"])
def test_every_datatype_round_trips(start_gateway, typed_repo: Path, datatype: str, form: str) -> None:  # type: ignore[no-untyped-def]
    handle = start_gateway(typed_repo)
    stub = handle.stub()
    x = sample(datatype)
    tensor = pb.ModelInferRequest.InferInputTensor(name="x", datatype=datatype, shape=x.shape)
    request = pb.ModelInferRequest(model_name=f"id_{datatype.lower()}", inputs=[tensor])
    if form == "raw":
        request.raw_input_contents.append(raw_bytes(x))
    else:
        field = DATATYPES[datatype].contents_field
        if field is None:  # FP16 has no typed field in the protocol: the answer says to send raw
            with pytest.raises(grpc.RpcError) as err:
                stub.ModelInfer(request)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "raw_input_contents" in err.value.details()
            return
        values = list(x.reshape(-1)) if datatype == "BYTES" else x.reshape(-1).tolist()
        getattr(request.inputs[0].contents, field).extend(values)
    response = stub.ModelInfer(request)
    assert [o.name for o in response.outputs] == ["y", "y2"]
    assert len(response.raw_output_contents) == 2 and not response.outputs[0].HasField("contents")
    assert response.outputs[0].datatype == datatype
    got = decode_output(response, 0)
    np.testing.assert_array_equal(got, x)
    assert got.dtype == x.dtype


@pytest.mark.parametrize("datatype", ["FP32", "INT64", "BYTES", "BOOL", "FP16", "UINT8"])
def test_tritonclient_matches_onnxruntime(start_gateway, typed_repo: Path, datatype: str) -> None:  # type: ignore[no-untyped-def]
    handle = start_gateway(typed_repo)
    client = tc.InferenceServerClient(handle.address)
    x = sample(datatype, rows=5)
    inp = tc.InferInput("x", list(x.shape), datatype)
    inp.set_data_from_numpy(x)
    result = client.infer(f"id_{datatype.lower()}", [inp], outputs=[tc.InferRequestedOutput("y2")])
    session = ort.InferenceSession(str(typed_repo / f"id_{datatype.lower()}" / "1" / "model.onnx"))
    feed = np.vectorize(bytes.decode)(x).astype(object) if datatype == "BYTES" else x
    (expected,) = session.run(["y2"], {"x": feed})
    got = result.as_numpy("y2")
    assert result.as_numpy("y") is None  # only the requested output comes back
    if datatype == "BYTES":
        got = np.vectorize(bytes.decode)(got)
    np.testing.assert_array_equal(got, expected)


def test_several_inputs_outputs_subsets_ids_and_versions(start_gateway, typed_repo: Path) -> None:  # type: ignore[no-untyped-def]
    handle = start_gateway(typed_repo)
    client = tc.InferenceServerClient(handle.address)
    a = np.arange(8, dtype=np.float32).reshape(2, 4)
    b = np.ones((2, 4), dtype=np.float32)
    inputs = [tc.InferInput("a", [2, 4], "FP32"), tc.InferInput("b", [2, 4], "FP32")]
    inputs[0].set_data_from_numpy(a)
    inputs[1].set_data_from_numpy(b)

    latest = client.infer("add_mul", inputs, request_id="req-42")
    assert latest.get_response().id == "req-42"
    assert latest.get_response().model_version == "2"
    np.testing.assert_allclose(latest.as_numpy("sum"), a + b)
    np.testing.assert_allclose(latest.as_numpy("scaled"), a * 3.0)

    v1 = client.infer("add_mul", inputs, model_version="1", outputs=[tc.InferRequestedOutput("scaled")])
    assert v1.get_response().model_version == "1"
    np.testing.assert_allclose(v1.as_numpy("scaled"), a * 2.0)
    assert v1.as_numpy("sum") is None

    ids = {client.infer("add_mul", inputs).get_response().id for _ in range(20)}
    assert len(ids) == 20 and all(len(i) >= 16 for i in ids)  # generated, unique


def test_messages_larger_than_grpc_default_4mib(start_gateway, typed_repo: Path) -> None:  # type: ignore[no-untyped-def]
    handle = start_gateway(typed_repo)
    client = tc.InferenceServerClient(handle.address)
    x = np.random.default_rng(1).standard_normal((3, 1024 * 1024)).astype(np.float32)  # 12 MiB each way
    inp = tc.InferInput("x", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    result = client.infer("big", [inp], outputs=[tc.InferRequestedOutput("y")])
    np.testing.assert_array_equal(result.as_numpy("y"), x)


def test_example_repository_matches_onnxruntime(start_gateway, example_repository: Path) -> None:  # type: ignore[no-untyped-def]
    handle = start_gateway(example_repository)
    client = tc.InferenceServerClient(handle.address)
    x = np.array([[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3], [5.9, 3.0, 4.2, 1.5]], dtype=np.float32)
    for version in ("1", "2"):
        inp = tc.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        result = client.infer("iris", [inp], model_version=version)
        session = ort.InferenceSession(str(example_repository / "iris" / version / "model.onnx"))
        label, proba = session.run(["label", "probabilities"], {"input": x})
        np.testing.assert_array_equal(result.as_numpy("label"), label)
        np.testing.assert_allclose(result.as_numpy("probabilities"), proba, rtol=1e-6)
    species = np.array([["setosa"], ["virginica"]], dtype=object)
    feats = {
        n: np.array([[v], [w]], dtype=np.float32)
        for n, v, w in (("sepal_length", 5.1, 6.7), ("sepal_width", 3.5, 3.0), ("petal_length", 1.4, 5.2))
    }
    inputs = [tc.InferInput("species", [2, 1], "BYTES")]
    inputs[0].set_data_from_numpy(species)
    for name, value in feats.items():
        inputs.append(tc.InferInput(name, [2, 1], "FP32"))
        inputs[-1].set_data_from_numpy(value)
    result = client.infer("petal_width", inputs)
    session = ort.InferenceSession(str(example_repository / "petal_width" / "1" / "model.onnx"))
    (expected,) = session.run(["prediction"], {"species": species.astype(str), **feats})
    np.testing.assert_allclose(result.as_numpy("prediction"), expected, rtol=1e-6)
    assert 0.0 < result.as_numpy("prediction")[0, 0] < 1.0 < result.as_numpy("prediction")[1, 0]


def test_classification_extension_top_k_with_labels(start_gateway, example_repository: Path) -> None:  # type: ignore[no-untyped-def]
    handle = start_gateway(example_repository)
    client = tc.InferenceServerClient(handle.address)
    x = np.array([[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]], dtype=np.float32)
    inp = tc.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    result = client.infer(
        "iris", [inp], model_version="1", outputs=[tc.InferRequestedOutput("probabilities", class_count=2)]
    )
    top = result.as_numpy("probabilities")
    assert top.shape == (2, 2)
    first = top[0, 0].decode().split(":")
    assert first[1:] == ["0", "setosa"] and 0.5 < float(first[0]) <= 1.0
    assert top[1, 0].decode().endswith(":2:virginica")

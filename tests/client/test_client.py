"""onnxgate.client against a real gateway on a loopback port: inference, feedback, metadata, errors."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import pytest

from onnxgate.client import AsyncClient, Client, Feedback, OnnxgateError
from tests.conftest import GatewayHandle
from tests.predlog.helpers import wait_for

IRIS = np.array([[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]], dtype=np.float32)


@pytest.fixture
def gateway(start_gateway: Callable[..., GatewayHandle], example_copy: Path, tmp_path: Path) -> GatewayHandle:
    return start_gateway(example_copy, predlog_dir=tmp_path / "log", predlog_flush_ms=50, predlog_join_interval_s=0.2)


def test_infer_returns_arrays_and_the_prediction_id(gateway: GatewayHandle) -> None:
    with Client(gateway.address) as client:
        result = client.infer("iris", {"input": IRIS})
        assert result.model == "iris" and result.version == "2" and result.id
        assert result["label"].dtype == np.int64 and result["label"].tolist() == [0, 2]
        assert result["probabilities"].shape == (2, 3)
        np.testing.assert_allclose(result["probabilities"].sum(axis=1), 1.0, rtol=1e-5)
        one = client.infer("iris", {"input": IRIS}, version="1", outputs=["label"], id="my-id")
        assert one.version == "1" and one.id == "my-id" and set(one.outputs) == {"label"}
        # a string input (BYTES) from numpy strings, the others FP32
        pw = client.infer(
            "petal_width",
            {
                "species": np.array([["setosa"], ["virginica"]]),
                "sepal_length": np.array([[5.1], [6.7]], np.float32),
                "sepal_width": np.array([[3.5], [3.0]], np.float32),
                "petal_length": np.array([[1.4], [5.2]], np.float32),
            },
        )
        width = pw["prediction"].reshape(-1)
        assert width.shape == (2,) and width[0] < 1.0 < width[1]


def test_feedback_single_stream_and_report(gateway: GatewayHandle) -> None:
    with Client(gateway.address) as client:
        ids = [client.infer("iris", {"input": IRIS}).id for _ in range(6)]
        assert gateway.gateway.predlog is not None and gateway.gateway.predlog.flush()
        first = client.send_feedback(ids[0], label="0")
        assert (first.prediction_id, first.status) == (ids[0], "accepted")
        assert client.send_feedback(ids[0], label="0").status == "duplicate"
        assert client.send_feedback(ids[1], reward=1.0).status == "accepted"
        summary = client.stream_feedback(Feedback(pid, label="2", reward=0.5) for pid in ids[2:])
        assert (summary.received, summary.accepted, summary.duplicate) == (4, 4, 0)
        assert client.send_feedback("never-predicted", label="1").status == "pending"
        wait_for(lambda: client.feedback_report("iris").joined == 6, timeout=10)
        report = client.feedback_report("iris")
        # the feedback for an id never predicted names no model: it is counted, pending, in every report
        assert (report.predictions, report.feedback, report.pending) == (6, 7, 1)


def test_metadata_repository_and_health(gateway: GatewayHandle) -> None:
    with Client(gateway.address) as client:
        assert client.server_live() and client.server_ready() and client.model_ready("iris", "1")
        meta = client.model_metadata("iris")
        assert meta.name == "iris" and meta.versions == ("1", "2") and meta.platform == "onnxruntime_onnx"
        assert [(t.name, t.datatype, t.shape) for t in meta.inputs] == [("input", "FP32", (-1, 4))]
        index = {(m.name, m.version): m.state for m in client.repository_index()}
        assert index[("iris", "2")] == "READY" and index[("diabetes", "1")] == "READY"


def test_errors_are_one_type_with_the_grpc_status(gateway: GatewayHandle) -> None:
    with Client(gateway.address) as client:
        with pytest.raises(OnnxgateError) as missing:
            client.infer("no_such_model", {"input": IRIS})
        assert missing.value.code == grpc.StatusCode.NOT_FOUND and "no_such_model" in missing.value.message
        with pytest.raises(OnnxgateError) as shape:
            client.infer("iris", {"input": IRIS[:, :3]})
        assert shape.value.code == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(OnnxgateError) as dtype:
            client.infer("iris", {"input": IRIS.astype(np.complex64)})
        assert dtype.value.code == grpc.StatusCode.INVALID_ARGUMENT and "complex64" in dtype.value.message
        with pytest.raises(OnnxgateError) as both:
            client.send_feedback("x", label="1", value=2.0)
        assert both.value.code == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(OnnxgateError) as empty:
            client.send_feedback("", label="1")
        assert empty.value.code == grpc.StatusCode.INVALID_ARGUMENT
        client.load_model("iris")
        with pytest.raises(OnnxgateError) as load:
            client.load_model("no_such_model")
        assert load.value.code == grpc.StatusCode.NOT_FOUND, load.value
    with Client("127.0.0.1:1", timeout=2) as nobody, pytest.raises(OnnxgateError) as down:
        nobody.server_live()
    assert down.value.code == grpc.StatusCode.UNAVAILABLE


def test_async_client(gateway: GatewayHandle) -> None:
    async def scenario() -> None:
        async with AsyncClient(gateway.address) as client:
            results = await asyncio.gather(*(client.infer("iris", {"input": IRIS[i : i + 1]}) for i in range(2)))
            assert [r["label"].tolist() for r in results] == [[0], [2]]
            assert (await client.model_metadata("diabetes")).outputs[0].name == "prediction"

            async def items():  # type: ignore[no-untyped-def]
                for r in results:
                    yield Feedback(r.id, label=str(r["label"][0]))

            summary = await client.stream_feedback(items())
            assert summary.received == 2
            with pytest.raises(OnnxgateError) as missing:
                await client.infer("iris", {"input": IRIS}, version="7")
            assert missing.value.code == grpc.StatusCode.NOT_FOUND

    asyncio.run(scenario())

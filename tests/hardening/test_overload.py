"""Overload (issue 10): per-model limits refuse at once past them, and work whose deadline passed is not run.

A slow model (chained_matmul, ~0.3 s a run on a fast core) on one inference thread, so requests queue;
real gateways, real gRPC and HTTP clients. Timing bounds are generous: only "promptly" against "after
the slow runs", never a tight number.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from onnxgate.server.batcher import Batcher
from onnxgate.server.errors import DeadlineExceeded
from onnxgate.server.model import ModelVersion
from onnxgate.server.pb import grpc_service_pb2 as pb
from tests.conftest import GatewayHandle
from tests.models import add_mul, chained_matmul, write_version

SIZE, STEPS = 512, 200
X = np.ones((SIZE, SIZE), np.float32)


def _params(**values: object) -> str:
    return "".join(f'parameters {{ key: "{k}" value {{ string_value: "{v}" }} }}\n' for k, v in values.items())


def _repo(tmp_path: Path, slow_config: str | None = None, add_config: str | None = None) -> Path:
    repo = tmp_path / "repo"
    write_version(repo, "slow", 1, chained_matmul(SIZE, STEPS))
    if slow_config is not None:
        (repo / "slow" / "config.pbtxt").write_text(slow_config)
    write_version(repo, "add", 1, add_mul())
    if add_config is not None:
        (repo / "add" / "config.pbtxt").write_text(add_config)
    return repo


def _slow_request(rid: str = "") -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="slow", id=rid)
    request.inputs.add(name="x", datatype="FP32", shape=[SIZE, SIZE])
    request.raw_input_contents.append(X.tobytes())
    return request


def _add_request(rows: int) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="add")
    for name in ("a", "b"):
        request.inputs.add(name=name, datatype="FP32", shape=[rows, 4])
        request.raw_input_contents.append(np.ones((rows, 4), np.float32).tobytes())
    return request


def _version(gw: GatewayHandle, model: str) -> ModelVersion:
    return gw.gateway.repository.get(model, "")


def _timed(call: Callable[[], Any]) -> tuple[str, float, str]:
    """(status code name, seconds, details) of one call."""
    t0 = time.monotonic()
    try:
        call()
        return "OK", time.monotonic() - t0, ""
    except grpc.RpcError as e:
        return e.code().name, time.monotonic() - t0, e.details() or ""


def _wait_for(condition: Callable[[], bool], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.002)


def test_past_the_queue_limit_requests_are_refused_at_once(
    tmp_path: Path, start_gateway: Callable[..., GatewayHandle]
) -> None:
    gw = start_gateway(_repo(tmp_path, _params(max_queued_requests=2)), inference_threads=1)
    stub = gw.stub()
    slow = _version(gw, "slow")
    assert slow.max_queued == 2
    with ThreadPoolExecutor(12) as pool:
        first = [pool.submit(_timed, lambda: stub.ModelInfer(_slow_request(), timeout=120)) for _ in range(2)]
        _wait_for(lambda: slow.queued == 2)
        rest = list(pool.map(lambda _: _timed(lambda: stub.ModelInfer(_slow_request(), timeout=120)), range(10)))
        accepted = [f.result() for f in first]
    assert [code for code, _, _ in accepted] == ["OK", "OK"]
    # while the two run (one after the other on the one thread), the rest are refused; on a slow machine
    # a slot may free before the last of them arrive, so a few may get in
    codes = [code for code, _, _ in rest]
    refused = [r for r in rest if r[0] == "RESOURCE_EXHAUSTED"]
    assert set(codes) <= {"OK", "RESOURCE_EXHAUSTED"} and len(refused) >= 5, rest
    details = refused[0][2]
    assert "'slow'" in details and "max_queued_requests is 2" in details and "config.pbtxt" in details
    # refused at once, and never run
    assert max(t for _, t, _ in refused) < 5.0
    assert slow.stats.execution_count == 2 + codes.count("OK")  # the warm-up run is not counted
    assert slow.refused == len(refused) and slow.queued == 0 and slow.inflight_rows == 0
    # the other model is not limited by the slow one's queue
    assert stub.ModelInfer(_add_request(1), timeout=30).model_name == "add"


def test_rows_in_flight_limit(tmp_path: Path, start_gateway: Callable[..., GatewayHandle]) -> None:
    config = "max_batch_size: 16\n" + _params(max_inflight_rows=4)
    gw = start_gateway(_repo(tmp_path, add_config=config))
    stub = gw.stub()
    add = _version(gw, "add")
    assert add.max_rows == 4
    add.inflight_rows = 3  # three rows of other requests in flight (as if): one more fits, two do not
    try:
        with pytest.raises(grpc.RpcError) as refused:
            stub.ModelInfer(_add_request(2), timeout=30)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_inflight_rows is 4" in (refused.value.details() or "")
        assert stub.ModelInfer(_add_request(1), timeout=30).model_name == "add"
    finally:
        add.inflight_rows = 0
    # alone, a request larger than the limit still runs: nothing else holds rows
    assert stub.ModelInfer(_add_request(10), timeout=30).outputs[0].shape == [10, 4]


def test_settings_give_the_defaults_and_a_bad_parameter_fails_the_load(
    tmp_path: Path, start_gateway: Callable[..., GatewayHandle]
) -> None:
    gw = start_gateway(
        _repo(tmp_path, _params(max_queued_requests="lots")),
        default_max_queued_requests=7,
        default_max_inflight_rows=0,
    )
    add = _version(gw, "add")
    assert add.max_queued == 7 and add.max_rows > 2**60  # 0: no limit
    index = gw.stub().RepositoryIndex(pb.RepositoryIndexRequest(), timeout=30)
    slow = next(m for m in index.models if m.name == "slow")
    assert slow.state != "READY" and "max_queued_requests" in slow.reason and "'lots'" in slow.reason


def test_a_request_whose_grpc_deadline_passes_while_queued_is_not_run(
    tmp_path: Path, start_gateway: Callable[..., GatewayHandle]
) -> None:
    gw = start_gateway(_repo(tmp_path), inference_threads=1)
    stub = gw.stub()
    slow = _version(gw, "slow")
    runs_before = slow.stats.execution_count
    with ThreadPoolExecutor(4) as pool:
        busy = [pool.submit(_timed, lambda: stub.ModelInfer(_slow_request(), timeout=120)) for _ in range(3)]
        _wait_for(lambda: slow.queued >= 2)  # one running, one or two waiting: a full run ahead at least
        code, seconds, _ = _timed(lambda: stub.ModelInfer(_slow_request(), timeout=0.05))
        assert [f.result()[0] for f in busy] == ["OK"] * 3
    assert code == "DEADLINE_EXCEEDED" and seconds < 5.0
    _wait_for(lambda: slow.queued == 0)
    time.sleep(0.3)  # a run started anyway would have been counted by now
    assert slow.stats.execution_count == runs_before + 3


def _http_slow(gw: GatewayHandle, timeout_us: int | None = None) -> tuple[int, dict[str, Any]]:
    """POST an infer request for the slow model, its tensor in binary: (status, JSON answer header)."""
    header: dict[str, Any] = {
        "inputs": [
            {"name": "x", "datatype": "FP32", "shape": [SIZE, SIZE], "parameters": {"binary_data_size": X.nbytes}}
        ],
        "parameters": {"binary_data_output": True},
    }
    if timeout_us is not None:
        header["parameters"]["timeout"] = timeout_us
    head = json.dumps(header).encode()
    conn = http.client.HTTPConnection("127.0.0.1", gw.gateway.http_port, timeout=120)
    try:
        headers = {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(len(head))}
        conn.request("POST", "/v2/models/slow/infer", head + X.tobytes(), headers=headers)
        response = conn.getresponse()
        length = response.getheader("Inference-Header-Content-Length")
        data = response.read()
        return response.status, json.loads(data[: int(length)] if length else data)
    finally:
        conn.close()


def test_http_answers_429_past_the_limit_and_504_past_the_timeout_parameter(
    tmp_path: Path, start_gateway: Callable[..., GatewayHandle]
) -> None:
    gw = start_gateway(_repo(tmp_path, _params(max_queued_requests=2)), inference_threads=1)
    stub = gw.stub()
    slow = _version(gw, "slow")
    with ThreadPoolExecutor(4) as pool:
        busy = [pool.submit(_timed, lambda: stub.ModelInfer(_slow_request(), timeout=120)) for _ in range(2)]
        _wait_for(lambda: slow.queued == 2)
        status, answer = _http_slow(gw)
        assert status == 429 and "max_queued_requests" in answer["error"]
        assert [f.result()[0] for f in busy] == ["OK", "OK"]
    runs = slow.stats.execution_count
    # one queued slot left: a request with a 1 ms timeout waits behind a slow run and is not run
    with ThreadPoolExecutor(2) as pool:
        ahead = pool.submit(_timed, lambda: stub.ModelInfer(_slow_request(), timeout=120))
        _wait_for(lambda: slow.queued == 1)
        status, answer = _http_slow(gw, timeout_us=1000)
        assert ahead.result()[0] == "OK"
    assert status == 504 and "deadline" in answer["error"]
    assert slow.stats.execution_count == runs + 1
    assert _http_slow(gw, timeout_us=60_000_000)[0] == 200  # time enough: answered
    status, answer = _http_slow(gw, timeout_us=-1)
    assert status == 400 and "timeout" in answer["error"]


def test_the_batcher_drops_queued_requests_whose_deadline_passed() -> None:
    calls: list[int] = []

    async def run(inputs: dict[str, np.ndarray], outputs: Sequence[str], rows: int) -> tuple[Any, int]:
        calls.append(rows)
        await asyncio.sleep(0.2)
        return {"y": inputs["x"]}, 1

    async def main() -> None:
        batcher = Batcher(run, max_batch_size=64, max_delay_s=5.0)  # the queue waits for the running batch
        x = np.ones((2, 3), np.float32)
        running = asyncio.ensure_future(batcher.submit({"x": x}, ["y"], 2))
        await asyncio.sleep(0.05)  # the first batch runs; what comes now queues behind it
        late = asyncio.ensure_future(batcher.submit({"x": x}, ["y"], 2, time.monotonic() + 0.01))
        kept = asyncio.ensure_future(batcher.submit({"x": x[:1]}, ["y"], 1, time.monotonic() + 60))
        assert (await running).outputs["y"].shape == (2, 3)
        with pytest.raises(DeadlineExceeded):
            await late
        assert (await kept).outputs["y"].shape == (1, 3)

    asyncio.run(main())
    assert calls == [2, 1]  # the expired request never reached a run


def test_a_cancelled_request_leaves_the_batcher_queue_without_running() -> None:
    """A client that cancels (or whose call ends) while its request waits for a batch: its rows are not
    run and the requests around it still get their own rows back."""
    calls: list[np.ndarray] = []

    async def run(inputs: dict[str, np.ndarray], outputs: Sequence[str], rows: int) -> tuple[Any, int]:
        calls.append(inputs["x"][:, 0].copy())
        await asyncio.sleep(0.2)
        return {"y": inputs["x"] * 2}, 1

    async def main() -> None:
        batcher = Batcher(run, max_batch_size=64, max_delay_s=5.0)  # the queue waits for the running batch
        row = [np.full((1, 3), i, np.float32) for i in range(4)]
        running = asyncio.ensure_future(batcher.submit({"x": row[0]}, ["y"], 1))
        await asyncio.sleep(0.05)  # the first batch runs; what comes now queues behind it
        before = asyncio.ensure_future(batcher.submit({"x": row[1]}, ["y"], 1))
        cancelled = asyncio.ensure_future(batcher.submit({"x": row[2]}, ["y"], 1))
        after = asyncio.ensure_future(batcher.submit({"x": row[3]}, ["y"], 1))
        await asyncio.sleep(0.01)
        cancelled.cancel()
        assert (await running).outputs["y"][0, 0] == 0
        assert (await before).outputs["y"][0, 0] == 2  # its own row, doubled
        assert (await after).outputs["y"][0, 0] == 6
        with pytest.raises(asyncio.CancelledError):
            await cancelled

    asyncio.run(main())
    assert [c.tolist() for c in calls] == [[0.0], [1.0, 3.0]]  # row 2 never reached a run

"""The dynamic batcher with real onnxruntime sessions: grouping, splitting, limits, failures."""

from __future__ import annotations

import asyncio
import itertools
import urllib.request
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as tc

from onnxgate.server.batcher import Batcher
from onnxgate.server.errors import Internal
from onnxgate.server.runtime import OnnxModel
from tests.conftest import GatewayHandle
from tests.models import add_mul, first_row_only, write_version


def runner(model: OnnxModel, calls: list[int]):  # type: ignore[no-untyped-def]
    async def run(
        inputs: dict[str, np.ndarray], outputs: Sequence[str], rows: int
    ) -> tuple[dict[str, np.ndarray], int]:
        calls.append(rows)
        return model.predict(inputs, outputs), 1

    return run


def test_concurrent_requests_share_one_run_and_get_their_own_rows(tmp_path: Path) -> None:
    model = OnnxModel(write_version(tmp_path, "m", 1, add_mul(2.0)) / "model.onnx", 1)
    calls: list[int] = []

    async def main() -> list[np.ndarray]:
        batcher = Batcher(runner(model, calls), max_batch_size=64, max_delay_s=0.01)
        requests = [np.full((rows, 4), rows, np.float32) for rows in range(1, 11)]
        results = await asyncio.gather(*(batcher.submit({"a": a, "b": a}, ["sum"], len(a)) for a in requests))
        return [r.outputs["sum"] for r in results]

    sums = asyncio.run(main())
    assert calls == [55]  # ten requests, one onnxruntime run of 1+2+...+10 rows
    for rows, total in enumerate(sums, start=1):
        np.testing.assert_array_equal(total, np.full((rows, 4), 2 * rows, np.float32))


def test_batches_respect_max_batch_size_and_shapes(tmp_path: Path) -> None:
    model = OnnxModel(write_version(tmp_path, "m", 1, add_mul(2.0)) / "model.onnx", 1)
    calls: list[int] = []

    async def main() -> None:
        batcher = Batcher(runner(model, calls), max_batch_size=8, max_delay_s=0.01)
        a = np.ones((3, 4), np.float32)
        results = await asyncio.gather(*(batcher.submit({"a": a, "b": a}, ["sum"], 3) for _ in range(5)))
        assert all(r.outputs["sum"].shape == (3, 4) for r in results)
        # different requested outputs never share a run
        mixed = await asyncio.gather(
            batcher.submit({"a": a, "b": a}, ["sum"], 3), batcher.submit({"a": a, "b": a}, ["scaled"], 3)
        )
        assert list(mixed[0].outputs) == ["sum"] and list(mixed[1].outputs) == ["scaled"]

    asyncio.run(main())
    assert all(rows <= 8 for rows in calls) and sum(calls[:-2]) == 15 and calls[-2:] == [3, 3]


def test_a_model_that_drops_rows_fails_every_request_of_the_batch(tmp_path: Path) -> None:
    model = OnnxModel(write_version(tmp_path, "m", 1, first_row_only()) / "model.onnx", 1)

    async def main() -> list[BaseException | object]:
        batcher = Batcher(runner(model, []), max_batch_size=8, max_delay_s=0.01)
        x = np.ones((1, 2), np.float32)
        return await asyncio.gather(*(batcher.submit({"x": x}, ["y"], 1) for _ in range(3)), return_exceptions=True)

    results = asyncio.run(main())
    assert all(isinstance(r, Internal) and "for a batch of 3 rows" in str(r) for r in results)


def test_a_lone_request_does_not_wait_for_the_delay(tmp_path: Path) -> None:
    model = OnnxModel(write_version(tmp_path, "m", 1, add_mul(2.0)) / "model.onnx", 1)

    async def main() -> float:
        batcher = Batcher(runner(model, []), max_batch_size=8, max_delay_s=5.0)
        a = np.ones((1, 4), np.float32)
        loop = asyncio.get_running_loop()
        start = loop.time()
        await batcher.submit({"a": a, "b": a}, ["sum"], 1)
        return loop.time() - start

    assert asyncio.run(main()) < 1.0


@pytest.mark.parametrize("delay", [0.0, 0.002])
def test_requests_arriving_during_a_run_form_the_next_batch(tmp_path: Path, delay: float) -> None:
    model = OnnxModel(write_version(tmp_path, "m", 1, add_mul(2.0)) / "model.onnx", 1)
    calls: list[int] = []
    release = asyncio.Event()

    async def slow_run(
        inputs: dict[str, np.ndarray], outputs: Sequence[str], rows: int
    ) -> tuple[dict[str, np.ndarray], int]:
        calls.append(rows)
        if len(calls) == 1:
            await release.wait()
        return model.predict(inputs, outputs), 1

    async def main() -> None:
        batcher = Batcher(slow_run, max_batch_size=64, max_delay_s=delay)
        a = np.ones((1, 4), np.float32)
        first = asyncio.ensure_future(batcher.submit({"a": a, "b": a}, ["sum"], 1))
        await asyncio.sleep(0.01)
        later = [asyncio.ensure_future(batcher.submit({"a": a, "b": a}, ["sum"], 1)) for _ in range(4)]
        await asyncio.sleep(0.05)
        release.set()
        await asyncio.gather(first, *later)

    asyncio.run(main())
    assert calls[0] == 1 and sum(calls) == 5 and len(calls) <= 3


def test_a_request_at_the_batch_size_runs_alone_without_the_queue_or_a_copy(tmp_path: Path) -> None:
    model = OnnxModel(write_version(tmp_path, "m", 1, add_mul(2.0)) / "model.onnx", 1)
    seen: list[dict[str, np.ndarray]] = []

    async def run(
        inputs: dict[str, np.ndarray], outputs: Sequence[str], rows: int
    ) -> tuple[dict[str, np.ndarray], int]:
        seen.append(inputs)
        return model.predict(inputs, outputs), 1

    async def main() -> None:
        batcher = Batcher(run, max_batch_size=8, max_delay_s=5.0)
        assert batcher.bypass_rows == 8
        big = np.arange(32, dtype=np.float32).reshape(8, 4)
        small = np.ones((1, 4), np.float32)
        # the small ones queue together; the big one, submitted among them, runs at once by itself
        results = await asyncio.gather(
            batcher.submit({"a": small, "b": small}, ["sum"], 1),
            batcher.submit({"a": big, "b": big}, ["sum"], 8),
            batcher.submit({"a": small, "b": small}, ["sum"], 1),
        )
        assert results[1].queue_ns == 0 and results[1].batch_size == 8
        np.testing.assert_array_equal(results[1].outputs["sum"], model.predict({"a": big, "b": big}, ["sum"])["sum"])
        assert seen[0]["a"] is big  # first, and the caller's own array: no queue, no concatenation
        assert [len(s["a"]) for s in seen] == [8, 2]
        for r in (results[0], results[2]):
            np.testing.assert_array_equal(r.outputs["sum"], np.full((1, 4), 2, np.float32))

    asyncio.run(main())


def test_preferred_batch_sizes_cut_the_batches_and_the_rows_go_back_to_their_requests(tmp_path: Path) -> None:
    model = OnnxModel(write_version(tmp_path, "m", 1, add_mul(2.0)) / "model.onnx", 1)
    calls: list[int] = []

    async def main() -> None:
        batcher = Batcher(runner(model, calls), max_batch_size=64, max_delay_s=0.01, preferred=[4, 8])
        assert batcher.bypass_rows == 8
        requests = [np.full((1, 4), i, np.float32) for i in range(13)]
        results = await asyncio.gather(*(batcher.submit({"a": a, "b": a}, ["sum"], 1) for a in requests))
        for i, r in enumerate(results):
            np.testing.assert_array_equal(r.outputs["sum"], np.full((1, 4), 2 * i, np.float32))
        # 8 waiting rows flush at once (the largest preferred size), the next 5 as 4 and 1
        assert calls == [8, 4, 1]
        calls.clear()
        # requests of several rows: never split, each batch at most the largest preferred size reached
        sized = [np.full((rows, 4), rows, np.float32) for rows in (3, 3, 3, 2)]
        results = await asyncio.gather(*(batcher.submit({"a": a, "b": a}, ["sum"], len(a)) for a in sized))
        for a, r in zip(sized, results, strict=True):
            np.testing.assert_array_equal(r.outputs["sum"], a * 2)
        assert calls == [6, 3, 2]
        # a request of the largest preferred size or more runs by itself
        calls.clear()
        big = np.ones((9, 4), np.float32)
        result = await batcher.submit({"a": big, "b": big}, ["sum"], 9)
        assert calls == [9] and result.queue_ns == 0

    asyncio.run(main())


def test_preferred_sizes_beyond_the_max_batch_size_are_refused() -> None:
    async def run(
        inputs: dict[str, np.ndarray], outputs: Sequence[str], rows: int
    ) -> tuple[dict[str, np.ndarray], int]:
        raise AssertionError

    with pytest.raises(ValueError, match=r"within 1\.\.8"):
        Batcher(run, max_batch_size=8, max_delay_s=0.0, preferred=[4, 16])


def test_through_the_gateway_a_full_batch_is_its_own_execution_without_queue_time(
    start_gateway, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    version_dir = write_version(
        tmp_path,
        "batched",
        1,
        add_mul(2.0),
        "max_batch_size: 16\ndynamic_batching { max_queue_delay_microseconds: 100000 preferred_batch_size: [ 4, 8 ] }\n",
    )
    handle: GatewayHandle = start_gateway(tmp_path)
    client = tc.InferenceServerClient(handle.address)
    session = ort.InferenceSession(str(version_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(3)
    for rows in (8, 12, 16):  # at or above the largest preferred size: each runs at once, by itself
        a, b = (rng.standard_normal((rows, 4)).astype(np.float32) for _ in range(2))
        inputs = [tc.InferInput("a", [rows, 4], "FP32"), tc.InferInput("b", [rows, 4], "FP32")]
        inputs[0].set_data_from_numpy(a)
        inputs[1].set_data_from_numpy(b)
        result = client.infer("batched", inputs)
        for name in ("sum", "scaled"):
            np.testing.assert_array_equal(result.as_numpy(name), session.run([name], {"a": a, "b": b})[0])
    (s,) = client.get_inference_statistics("batched", "1").model_stats
    assert s.execution_count == 3 and s.inference_count == 36
    assert s.inference_stats.queue.count == 3 and s.inference_stats.queue.ns == 0
    assert sorted((b.batch_size, b.compute_infer.count) for b in s.batch_stats) == [(8, 1), (12, 1), (16, 1)]


def test_a_preferred_size_beyond_max_batch_size_fails_the_load(start_gateway, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    write_version(
        tmp_path,
        "bad",
        1,
        add_mul(2.0),
        "max_batch_size: 8\ndynamic_batching { preferred_batch_size: [ 4, 32 ] }\n",
    )
    handle: GatewayHandle = start_gateway(tmp_path)
    client = tc.InferenceServerClient(handle.address)
    (entry,) = [m for m in client.get_model_repository_index().models if m.name == "bad"]
    assert (
        entry.state == "UNAVAILABLE" and "preferred_batch_size" in entry.reason and "1..max_batch_size" in entry.reason
    )


def test_a_latency_objective_grows_the_batch_limit_and_shrinks_it_past_the_objective() -> None:
    """AIMD: from one row, the limit grows while full batches meet the objective and falls once they miss
    it; with a run of 1 ms a row and a 30 ms objective it settles well below max_batch_size."""
    limits: list[int] = []
    batcher: Batcher

    async def run(
        inputs: dict[str, np.ndarray], outputs: Sequence[str], rows: int
    ) -> tuple[dict[str, np.ndarray], int]:
        limits.append(batcher.limit)
        await asyncio.sleep(rows * 0.001)
        return {"y": inputs["x"]}, 1

    async def main() -> None:
        nonlocal batcher
        batcher = Batcher(run, max_batch_size=64, max_delay_s=0.002, p99_objective_s=0.030)
        assert batcher.limit == 1

        async def client(i: int, end: float) -> None:
            x = np.full((1, 2), i, np.float32)
            while asyncio.get_running_loop().time() < end:
                result = await batcher.submit({"x": x}, ["y"], 1)
                assert result.outputs["y"][0, 0] == i  # its own row back, whatever the batch

        end = asyncio.get_running_loop().time() + 1.5
        await asyncio.gather(*(client(i, end) for i in range(64)))

    asyncio.run(main())
    peak = max(limits)
    assert peak > 4  # it grew from one row
    assert any(later < earlier for earlier, later in itertools.pairwise(limits))  # and came down
    # 64 rows take 64 ms to run alone: past the objective, the limit never stays near max_batch_size
    assert limits[-1] < 48


def test_the_batch_limit_steps() -> None:
    async def run(
        inputs: dict[str, np.ndarray], outputs: Sequence[str], rows: int
    ) -> tuple[dict[str, np.ndarray], int]:
        return inputs, 1

    batcher = Batcher(run, max_batch_size=64, max_delay_s=0.0, p99_objective_s=0.010)
    batcher.limit = 10
    batcher._adapt(20_000_000, 10)  # 20 ms > 10 ms: down 10%, at least one row
    assert batcher.limit == 9
    batcher._adapt(5_000_000, 9)  # a full batch under the objective: up max_batch_size / 32
    assert batcher.limit == 11
    batcher._adapt(5_000_000, 3)  # a batch the limit did not bind says nothing about more rows
    assert batcher.limit == 11
    batcher.limit = 1
    batcher._adapt(50_000_000, 1)
    assert batcher.limit == 1  # never below one row
    batcher.limit = 63
    batcher._adapt(1_000_000, 63)
    assert batcher.limit == 64  # never past max_batch_size
    assert Batcher(run, max_batch_size=64, max_delay_s=0.0).limit == 64  # no objective: the fixed maximum


@pytest.mark.parametrize(
    ("config", "reason"),
    [
        ("max_batch_size: 8\ndynamic_batching { }\nparameters { key: \"latency_objective_p99_ms\" value { string_value: \"-3\" } }\n", "not a positive number"),
        ("max_batch_size: 8\nparameters { key: \"latency_objective_p99_ms\" value { string_value: \"20\" } }\n", "add dynamic_batching"),
    ],
)  # fmt: skip
def test_a_bad_latency_objective_fails_the_load(start_gateway, tmp_path: Path, config: str, reason: str) -> None:  # type: ignore[no-untyped-def]
    write_version(tmp_path, "bad", 1, add_mul(2.0), config)
    good = 'max_batch_size: 8\ndynamic_batching { }\nparameters { key: "latency_objective_p99_ms" value { string_value: "25" } }\n'
    write_version(tmp_path, "good", 1, add_mul(2.0), good)
    handle: GatewayHandle = start_gateway(tmp_path)
    client = tc.InferenceServerClient(handle.address)
    states = {m.name: m for m in client.get_model_repository_index().models}
    assert states["bad"].state == "UNAVAILABLE" and reason in states["bad"].reason
    assert "latency_objective_p99_ms" in states["bad"].reason
    assert states["good"].state == "READY"
    metrics = urllib.request.urlopen(handle.metrics_url, timeout=10).read().decode()
    assert 'onnxgate_batch_limit_rows{model="good",version="1"} 1.0' in metrics

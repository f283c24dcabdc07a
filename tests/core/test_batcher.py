"""The dynamic batcher with real onnxruntime sessions: grouping, splitting, limits, failures."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from onnxgate.server.batcher import Batcher
from onnxgate.server.errors import Internal
from onnxgate.server.runtime import OnnxModel
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

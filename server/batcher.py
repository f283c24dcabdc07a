"""Dynamic batching: concurrent requests for one model version run as one onnxruntime call.

Work-conserving: when no batch of this version is running, what is queued runs at once (after the
requests already ready in the same loop iteration have joined), so a lone client pays no delay.
While a batch runs, new requests queue; they run as the next batch when it finishes, when
`max_batch_size` rows are waiting, or after `max_delay_s` from the first of them, whichever comes
first. Requests are only concatenated with others of the same non-batch shapes, dtypes and
requested outputs; the outputs are split back by row counts, after checking that the model
returned one row per input row. A request whose deadline (time.monotonic()) passed while it waited
leaves the queue without running: DEADLINE_EXCEEDED.

Batching that never hurts: a request of `bypass_rows` rows or more (the largest preferred batch size
when the config sets `dynamic_batching { preferred_batch_size: [...] }`, else `max_batch_size`) is
already a full batch: it runs at once, without the queue and without a concatenation copy, as its own
run. With preferred batch sizes, what waits is cut into batches of the largest preferred size that the
rows still waiting reach (greedily, never splitting a request); without them, of up to `max_batch_size`.

A latency objective (`p99_objective_s`, the config's `latency_objective_p99_ms` parameter) makes the
batch limit adaptive, additive increase and multiplicative decrease as Clipper does: after each batch,
if its oldest request waited and ran longer than the objective, the limit shrinks to 90% (at least one
row less); if the batch filled the limit and stayed under the objective, the limit grows by
`max_batch_size / 32` rows (at least one). So the batches stay as large as the objective allows:
throughput from batching where the model has room, latency kept where it has not. The limit starts at
one row and never passes `max_batch_size`; requests at or above `bypass_rows` still run alone.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from onnxgate.server.errors import DeadlineExceeded, GatewayError, Internal

Tensors = dict[str, np.ndarray]
# (inputs, output names, rows) -> (outputs, onnxruntime ns); runs inline or on the executor
RunBatch = Callable[[Tensors, Sequence[str], int], Awaitable[tuple[Tensors, int]]]


@dataclass
class Result:
    outputs: Tensors
    queue_ns: int
    infer_ns: int
    batch_size: int


@dataclass
class _Item:
    inputs: Tensors
    outputs: tuple[str, ...]
    rows: int
    enqueued_ns: int
    future: asyncio.Future[Result] = field(repr=False)
    deadline: float | None = None

    @property
    def key(self) -> tuple[object, ...]:
        shapes = tuple((name, a.shape[1:], a.dtype.str) for name, a in sorted(self.inputs.items()))
        return (shapes, self.outputs)


class Batcher:
    def __init__(
        self,
        run_batch: RunBatch,
        max_batch_size: int,
        max_delay_s: float,
        preferred: Sequence[int] = (),
        p99_objective_s: float | None = None,
    ) -> None:
        self._run_batch = run_batch
        self.max_batch_size = max_batch_size
        # rows a batch may hold now: max_batch_size, or adapted to the latency objective (AIMD)
        self.objective_s = p99_objective_s
        self.limit = max_batch_size if p99_objective_s is None else 1
        self._step = max(1, max_batch_size // 32)
        self.max_delay_s = max_delay_s
        self.preferred = tuple(sorted(set(preferred), reverse=True))  # largest first
        if any(p < 1 or p > max_batch_size for p in self.preferred):
            raise ValueError(f"preferred batch sizes {list(preferred)} must be within 1..{max_batch_size}")
        # a request this large is a batch by itself: run at once, no queue, no copy
        self.bypass_rows = self.preferred[0] if self.preferred else max_batch_size
        self._pending: list[_Item] = []
        self._pending_rows = 0
        self._running = 0  # batches of this version under way
        self._timer: asyncio.TimerHandle | None = None
        self._flush_soon = False
        self._tasks: set[asyncio.Task[None]] = set()  # the loop keeps only weak references to tasks

    async def submit(self, inputs: Tensors, outputs: Sequence[str], rows: int, deadline: float | None = None) -> Result:
        if rows >= self.bypass_rows:
            return await self._run_alone(inputs, outputs, rows, deadline)
        loop = asyncio.get_running_loop()
        item = _Item(inputs, tuple(outputs), rows, time.monotonic_ns(), loop.create_future(), deadline)
        self._pending.append(item)
        self._pending_rows += rows
        if self._pending_rows >= min(self.bypass_rows, self.limit):
            self._flush()
        elif self._running == 0:
            if not self._flush_soon:
                self._flush_soon = True
                loop.call_soon(self._flush)
        elif self._timer is None:
            self._timer = loop.call_later(self.max_delay_s, self._flush)
        return await item.future

    async def _run_alone(self, inputs: Tensors, outputs: Sequence[str], rows: int, deadline: float | None) -> Result:
        if deadline is not None and time.monotonic() >= deadline:
            raise DeadlineExceeded("the request's deadline passed before it could run; it was not run")
        result, infer_ns = await self._run_batch(inputs, outputs, rows)
        return Result(result, 0, infer_ns, rows)

    def _flush(self) -> None:
        self._flush_soon = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        pending, self._pending, self._pending_rows = self._pending, [], 0
        groups: dict[tuple[object, ...], list[_Item]] = {}
        now: float | None = None
        for item in pending:
            if item.future.cancelled():
                continue
            if item.deadline is not None:
                now = time.monotonic() if now is None else now
                if now >= item.deadline:
                    item.future.set_exception(
                        DeadlineExceeded("the request's deadline passed while it waited for a batch; it was not run")
                    )
                    continue
            groups.setdefault(item.key, []).append(item)
        for items in groups.values():
            for chunk in self._chunks(items):
                self._start(chunk)

    def _chunks(self, items: list[_Item]) -> list[list[_Item]]:
        """Cut one group (in arrival order) into batches: each of at most the largest preferred size the
        rows still waiting reach (the limit when none is set, or when fewer rows wait than the smallest)."""
        chunks: list[list[_Item]] = []
        remaining = sum(i.rows for i in items)
        i, n = 0, len(items)
        limit = self.limit
        while i < n:
            cap = next((p for p in self.preferred if p <= remaining and p <= limit), limit)
            chunk = [items[i]]
            rows = items[i].rows
            i += 1
            while i < n and rows + items[i].rows <= cap:
                rows += items[i].rows
                chunk.append(items[i])
                i += 1
            chunks.append(chunk)
            remaining -= rows
        return chunks

    def _start(self, items: list[_Item]) -> None:
        self._running += 1
        task = asyncio.ensure_future(self._execute(items))
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._running -= 1
        if self._running == 0 and self._pending:
            self._flush()

    async def _execute(self, items: list[_Item]) -> None:
        start = time.monotonic_ns()
        rows = sum(i.rows for i in items)
        first = items[0]
        if len(items) == 1:
            inputs = first.inputs
        else:
            inputs = {name: np.concatenate([i.inputs[name] for i in items]) for name in first.inputs}
        try:
            outputs, infer_ns = await self._run_batch(inputs, first.outputs, rows)
            for name, array in outputs.items():
                if array.ndim == 0 or array.shape[0] != rows:
                    raise Internal(
                        f"output {name!r} has shape {list(array.shape)} for a batch of {rows} rows: the model does "
                        "not return one row per input row, so it cannot be batched; remove dynamic_batching from its config"
                    )
        except BaseException as e:  # every waiting request must hear about it
            error = e if isinstance(e, GatewayError) else Internal(f"batched run failed: {type(e).__name__}: {e}")
            if error is not e:
                error.__cause__ = e
            for item in items:
                if not item.future.done():
                    item.future.set_exception(error)
            return
        if self.objective_s is not None:
            self._adapt(time.monotonic_ns() - min(i.enqueued_ns for i in items), rows)
        offset = 0
        for item in items:
            part = {name: array[offset : offset + item.rows] for name, array in outputs.items()}
            offset += item.rows
            if not item.future.done():
                item.future.set_result(Result(part, start - item.enqueued_ns, infer_ns, rows))

    def _adapt(self, oldest_ns: int, rows: int) -> None:
        """AIMD on the batch limit from one batch: its oldest request's time from arrival to outputs."""
        assert self.objective_s is not None
        if oldest_ns > self.objective_s * 1e9:
            self.limit = max(1, min(self.limit - 1, int(self.limit * 0.9)))
        elif rows >= self.limit:  # the limit bound this batch, and it met the objective: try more
            self.limit = min(self.max_batch_size, self.limit + self._step)

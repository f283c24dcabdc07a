"""A loaded model version: its spec, its onnxruntime session, its statistics, and one inference.

`infer` is the core of the data path: check the request against the signature, run (through the
batcher when the config asks for dynamic batching), and post-process Triton's classification outputs.

Where a run happens: onnxruntime releases the GIL, so runs go to the executor's threads and the
event loop keeps serving. But handing a run to a thread and back costs tens of microseconds of
wake-ups and GIL hand-offs, more than a small tabular model takes to run; so a run predicted to
take less than `inline_run_ns` (from this version's measured time per row) runs on the loop itself.

A model whose config enables the response cache (server/cache.py) answers repeated requests from it;
for every other model the cost is one attribute check.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from onnxgate.server.batcher import Batcher
from onnxgate.server.cache import ResponseCache, cache_key
from onnxgate.server.columns import Columns
from onnxgate.server.columns import parse as parse_columns
from onnxgate.server.errors import InvalidArgument, ResourceExhausted
from onnxgate.server.modelspec import ConfigError, ModelSpec, TensorSpec
from onnxgate.server.overload import QUEUED, ROWS, Limits, expired, latency_objective_s, version_limits
from onnxgate.server.runtime import OnnxModel
from onnxgate.server.stats import VersionStats
from onnxgate.server.tensors import BY_NUMPY, DATATYPES, InferRequest, classify

Tensors = dict[str, np.ndarray]
SAMPLE_EVERY = 8  # runs per CPU-time measurement for the inline estimate (ns_per_row)


@dataclass
class ModelVersion:
    name: str
    version: int
    path: Path
    spec: ModelSpec
    runtime: OnnxModel
    executor: Executor
    inline_run_ns: int = 0  # 0: every run on the executor
    stats: VersionStats = field(default_factory=VersionStats)
    batcher: Batcher | None = None
    # moving estimate of onnxruntime CPU time per batch row; None until measured (warm-up measures it)
    ns_per_row: float | None = None
    # the settings' per-version limits; the config's parameters override them (server/overload.py)
    limits: Limits = field(default_factory=Limits)

    def __post_init__(self) -> None:
        self.max_queued, self.max_rows = version_limits(self.spec, self.limits)
        self.queued = 0  # requests of this version in flight (waiting or running), on the event loop
        self.inflight_rows = 0  # their rows
        self.refused = 0  # requests refused past a limit
        self._runs = 0  # runs so far: every SAMPLE_EVERY-th updates ns_per_row
        # what every request is checked against, worked out once
        self._inputs = {t.name: (t, _numpy_dtype(t.datatype)) for t in self.spec.inputs}
        self._output_names = [o.name for o in self.spec.outputs]
        # the source's columns when the version records them (server/columns.py); a bad record fails the load
        self.columns: Columns | None = parse_columns(self.spec)
        self.version_str = str(self.version)
        delay = self.spec.dynamic_batching_delay_s
        objective = latency_objective_s(self.spec)  # checked for every model: ConfigError fails the load
        if delay is not None:
            max_batch = self.spec.max_batch_size
            preferred = list(self.spec.config.dynamic_batching.preferred_batch_size)
            if any(not 1 <= p <= max_batch for p in preferred):
                raise ConfigError(
                    f"model {self.name!r}: dynamic_batching preferred_batch_size {preferred} must be within"
                    f" 1..max_batch_size ({max_batch})"
                )
            self.batcher = Batcher(self._run, max_batch, delay, preferred, objective)
        # None unless the config enables it and the settings give it room: the hot path checks only this
        self.cache: ResponseCache | None = None
        if self.spec.config.response_cache.enable and self.limits.response_cache_bytes > 0:
            self.cache = ResponseCache(self.limits.response_cache_bytes)

    def _run_here(
        self, inputs: Tensors, output_names: Sequence[str], rows: int, deadline: float | None = None
    ) -> tuple[Tensors, int]:
        if deadline is not None:  # a request that waited for a thread past its deadline is not run
            expired(deadline, f"model {self.name!r}")
        # the estimate uses this thread's CPU time, not wall time: a run that waited for the GIL or
        # the scheduler would otherwise look slow, send later runs to threads, where they wait more.
        # Reading it is a system call (CLOCK_THREAD_CPUTIME_ID has no vDSO path): under load two reads
        # cost more than a small forest's run (docs/explanation/profile.md), so one run in SAMPLE_EVERY is measured.
        self._runs += 1
        sampled = self._runs % SAMPLE_EVERY == 0
        c0 = time.thread_time_ns() if sampled else 0
        t0 = time.monotonic_ns()
        outputs = self.runtime.predict(inputs, output_names)
        infer_ns = time.monotonic_ns() - t0
        if sampled:
            per_row = (time.thread_time_ns() - c0) / max(rows, 1)
            self.ns_per_row = per_row if self.ns_per_row is None else 0.9 * self.ns_per_row + 0.1 * per_row
        self.stats.record_execution(rows, 0, infer_ns, 0)
        return outputs, infer_ns

    def _inline(self, rows: int) -> bool:
        return self.ns_per_row is not None and self.ns_per_row * rows < self.inline_run_ns

    async def _run(
        self, inputs: Tensors, output_names: Sequence[str], rows: int, deadline: float | None = None
    ) -> tuple[Tensors, int]:
        if self._inline(rows):
            return self._run_here(inputs, output_names, rows, deadline)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, self._run_here, inputs, output_names, rows, deadline)

    async def infer(self, request: InferRequest, decode_ns: int = 0) -> Tensors:
        """Run one request; `decode_ns` is what decoding it from the wire took (Triton's compute_input)."""
        start = time.monotonic_ns()
        try:
            output_names = self._outputs_of(request)
            rows = self._check_inputs(request.inputs)
        except BaseException:
            self.stats.record_failure(time.monotonic_ns() - start)
            raise
        key, lookup_ns = b"", 0
        if self.cache is not None:
            t0 = time.monotonic_ns()
            key = cache_key(self.version, request.inputs, output_names, request.classification)
            hit = self.cache.get(key)
            t1 = time.monotonic_ns()
            if hit is not None:  # no admission, no run: the answer is here
                self.stats.record_cache_hit(t1 - start + decode_ns, t1 - t0)
                return hit
            lookup_ns = t1 - t0
        # admission to this version: past a limit, refused at once, before any queue (server/overload.py)
        if self.queued >= self.max_queued or (self.inflight_rows and self.inflight_rows + rows > self.max_rows):
            raise self._overloaded(rows)
        self.queued += 1
        self.inflight_rows += rows
        try:
            deadline = request.deadline
            if self.batcher is not None:
                result = await self.batcher.submit(request.inputs, output_names, rows, deadline)
                outputs, queue_ns, infer_ns = result.outputs, result.queue_ns, result.infer_ns
            elif self._inline(rows):  # the common case for small models: no coroutine, no thread hop
                outputs, infer_ns = self._run_here(request.inputs, output_names, rows, deadline)
                queue_ns = 0
            else:
                queued = time.monotonic_ns()
                outputs, infer_ns = await self._run(request.inputs, output_names, rows, deadline)
                queue_ns = max(0, time.monotonic_ns() - queued - infer_ns)
            for name, k in request.classification.items():
                outputs[name] = classify(outputs[name], k, self.spec.labels.get(name))
        except BaseException:
            self.stats.record_failure(time.monotonic_ns() - start)
            raise
        finally:
            self.queued -= 1
            self.inflight_rows -= rows
        if self.cache is not None:
            t = time.monotonic_ns()
            self.cache.put(key, outputs)
            self.stats.cache_miss.add(lookup_ns + time.monotonic_ns() - t)
        self.stats.record_request(rows, time.monotonic_ns() - start + decode_ns, queue_ns, decode_ns, infer_ns, 0)
        return outputs

    def _overloaded(self, rows: int) -> ResourceExhausted:
        self.refused += 1
        where = f"model {self.name!r} version {self.version}"
        if self.queued >= self.max_queued:
            return ResourceExhausted(
                f"{where} overloaded: {self.queued} requests in flight, its limit {QUEUED} is {self.max_queued};"
                f" retry with backoff, or raise the limit (config.pbtxt parameters {{ key: {QUEUED!r} ... }}"
                f" or --default-{QUEUED.replace('_', '-')}; 0: none)"
            )
        return ResourceExhausted(
            f"{where} overloaded: {self.inflight_rows} rows in flight and {rows} more asked, its limit {ROWS}"
            f" is {self.max_rows}; retry with backoff or smaller batches, or raise the limit (config.pbtxt"
            f" parameters {{ key: {ROWS!r} ... }} or --default-{ROWS.replace('_', '-')}; 0: none)"
        )

    async def infer_on_executor(self, request: InferRequest) -> Tensors:
        """A shadow run: always on the executor (never inline on the event loop, never in the champion's
        batches), every output, no classification; counted in this version's statistics."""
        rows = self._check_inputs(request.inputs)
        start = time.monotonic_ns()
        loop = asyncio.get_running_loop()
        try:
            outputs, infer_ns = await loop.run_in_executor(
                self.executor, self._run_here, request.inputs, self._output_names, rows
            )
        except BaseException:
            self.stats.record_failure(time.monotonic_ns() - start)
            raise
        self.stats.record_request(rows, time.monotonic_ns() - start, 0, 0, infer_ns, 0)
        return outputs

    def _outputs_of(self, request: InferRequest) -> list[str]:
        if not request.outputs:
            return self._output_names
        for name in request.outputs:
            if self.spec.output(name) is None:
                raise InvalidArgument(
                    f"model {self.name!r} version {self.version} has no output {name!r}; "
                    f"its outputs are {', '.join(self._output_names)}"
                )
        return request.outputs

    def _check_inputs(self, inputs: Tensors) -> int:
        """Validate names, datatypes and shapes; returns the batch size (1 for unbatched models)."""
        expected = self._inputs
        if len(inputs) != len(expected) or any(n not in expected for n in inputs):
            self._names_error(inputs)
        max_batch = self.spec.max_batch_size
        rows = -1
        for name, array in inputs.items():
            spec, dtype = expected[name]
            if array.dtype != dtype:
                sent = "BYTES" if array.dtype == object else BY_NUMPY[array.dtype].name
                raise InvalidArgument(
                    f"input {name!r}: datatype {sent} sent, model {self.name!r} expects {spec.datatype}"
                )
            shape = array.shape
            if len(shape) != len(spec.shape):
                _shape_error(name, shape, spec)
            for want, got in zip(spec.shape, shape, strict=True):
                if want != got and want != -1:
                    _shape_error(name, shape, spec)
            if max_batch > 0:
                batch = shape[0]
                if batch > max_batch:
                    raise InvalidArgument(
                        f"input {name!r}: batch of {batch} exceeds max_batch_size {max_batch} of "
                        f"model {self.name!r}; split the request"
                    )
                if rows != -1 and batch != rows:
                    raise InvalidArgument(f"inputs disagree on the batch size: {rows} and {batch} ({name!r})")
                rows = batch
        return rows if rows != -1 else 1

    def _names_error(self, inputs: Tensors) -> None:
        expected = self._inputs
        unknown = [n for n in inputs if n not in expected]
        missing = [n for n in expected if n not in inputs]
        parts = []
        if missing:
            parts.append(f"missing input(s) {', '.join(map(repr, missing))}")
        if unknown:
            parts.append(f"unknown input(s) {', '.join(map(repr, unknown))}")
        raise InvalidArgument(
            f"model {self.name!r} version {self.version}: {'; '.join(parts)}; it takes "
            + ", ".join(f"{t.name} {t.datatype} {list(t.shape)}" for t in self.spec.inputs)
        )


def _shape_error(name: str, shape: tuple[int, ...], spec: TensorSpec) -> None:
    raise InvalidArgument(
        f"input {name!r}: shape {list(shape)} sent, the model expects {list(spec.shape)} (-1: any size)"
    )


def _numpy_dtype(datatype: str) -> np.dtype:
    numpy = DATATYPES[datatype].numpy
    return numpy if numpy is not None else np.dtype(object)

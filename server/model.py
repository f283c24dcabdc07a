"""A loaded model version: its spec, its onnxruntime session, its statistics, and one inference.

`infer` is the core of the data path: check the request against the signature, run (through the
batcher when the config asks for dynamic batching), and post-process Triton's classification outputs.

Where a run happens: onnxruntime releases the GIL, so runs go to the executor's threads and the
event loop keeps serving. But handing a run to a thread and back costs tens of microseconds of
wake-ups and GIL hand-offs, more than a small tabular model takes to run; so a run predicted to
take less than `inline_run_ns` (from this version's measured time per row) runs on the loop itself.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from server.batcher import Batcher
from server.errors import InvalidArgument
from server.modelspec import ModelSpec, TensorSpec
from server.runtime import OnnxModel
from server.stats import VersionStats
from server.tensors import BY_NUMPY, InferRequest, classify

Tensors = dict[str, np.ndarray]


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
    # moving estimate of onnxruntime time per batch row; None until measured (warm-up measures it)
    ns_per_row: float | None = None

    def __post_init__(self) -> None:
        delay = self.spec.dynamic_batching_delay_s
        if delay is not None:
            self.batcher = Batcher(self._run, self.spec.max_batch_size, delay)

    def measure(self, rows: int, infer_ns: int) -> None:
        per_row = infer_ns / max(rows, 1)
        self.ns_per_row = per_row if self.ns_per_row is None else 0.9 * self.ns_per_row + 0.1 * per_row

    async def _run(self, inputs: Tensors, output_names: Sequence[str], rows: int) -> tuple[Tensors, int]:
        def run() -> tuple[Tensors, int]:
            t0 = time.monotonic_ns()
            outputs = self.runtime.predict(inputs, output_names)
            return outputs, time.monotonic_ns() - t0

        if self.ns_per_row is not None and self.ns_per_row * rows < self.inline_run_ns:
            outputs, infer_ns = run()
        else:
            outputs, infer_ns = await asyncio.get_running_loop().run_in_executor(self.executor, run)
        self.measure(rows, infer_ns)
        self.stats.record_execution(rows, 0, infer_ns, 0)
        return outputs, infer_ns

    async def infer(self, request: InferRequest) -> Tensors:
        start = time.monotonic_ns()
        try:
            output_names = self._output_names(request)
            rows = self._check_inputs(request.inputs)
            if self.batcher is not None:
                result = await self.batcher.submit(request.inputs, output_names, rows)
                outputs, queue_ns, infer_ns = result.outputs, result.queue_ns, result.infer_ns
            else:
                queued = time.monotonic_ns()
                outputs, infer_ns = await self._run(request.inputs, output_names, rows)
                queue_ns = max(0, time.monotonic_ns() - queued - infer_ns)
            for name, k in request.classification.items():
                outputs[name] = classify(outputs[name], k, self.spec.labels.get(name))
        except BaseException:
            self.stats.record_failure(time.monotonic_ns() - start)
            raise
        self.stats.record_request(rows, time.monotonic_ns() - start, queue_ns, 0, infer_ns, 0)
        return outputs

    def _output_names(self, request: InferRequest) -> list[str]:
        if not request.outputs:
            return [o.name for o in self.spec.outputs]
        for name in request.outputs:
            if self.spec.output(name) is None:
                raise InvalidArgument(
                    f"model {self.name!r} version {self.version} has no output {name!r}; "
                    f"its outputs are {', '.join(o.name for o in self.spec.outputs)}"
                )
        return request.outputs

    def _check_inputs(self, inputs: Tensors) -> int:
        """Validate names, datatypes and shapes; returns the batch size (1 for unbatched models)."""
        expected = {t.name: t for t in self.spec.inputs}
        if len(inputs) != len(expected) or any(n not in expected for n in inputs):
            self._names_error(inputs, expected)
        rows: int | None = None
        for name, array in inputs.items():
            spec = expected[name]
            datatype = "BYTES" if array.dtype == object else BY_NUMPY[array.dtype].name
            if datatype != spec.datatype:
                raise InvalidArgument(
                    f"input {name!r}: datatype {datatype} sent, model {self.name!r} expects {spec.datatype}"
                )
            _check_shape(name, array.shape, spec)
            if self.spec.max_batch_size > 0:
                batch = array.shape[0]
                if batch > self.spec.max_batch_size:
                    raise InvalidArgument(
                        f"input {name!r}: batch of {batch} exceeds max_batch_size {self.spec.max_batch_size} of "
                        f"model {self.name!r}; split the request"
                    )
                if rows is not None and batch != rows:
                    raise InvalidArgument(f"inputs disagree on the batch size: {rows} and {batch} ({name!r})")
                rows = batch
        return rows if rows is not None else 1

    def _names_error(self, inputs: Tensors, expected: dict[str, TensorSpec]) -> None:
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


def _check_shape(name: str, shape: tuple[int, ...], spec: TensorSpec) -> None:
    if len(shape) != len(spec.shape) or any(want not in (-1, got) for want, got in zip(spec.shape, shape, strict=True)):
        raise InvalidArgument(
            f"input {name!r}: shape {list(shape)} sent, the model expects {list(spec.shape)} (-1: any size)"
        )

"""A loaded model version: its spec, its onnxruntime session, its statistics, and one inference.

`infer` is the core of the data path: check the request against the signature, run (through the
batcher when the config asks for dynamic batching, else straight on the executor), and post-process
Triton's classification outputs.
"""

from __future__ import annotations

import asyncio
import time
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


@dataclass
class ModelVersion:
    name: str
    version: int
    path: Path
    spec: ModelSpec
    runtime: OnnxModel
    executor: Executor
    stats: VersionStats = field(default_factory=VersionStats)
    batcher: Batcher | None = None

    def __post_init__(self) -> None:
        delay = self.spec.dynamic_batching_delay_s
        if delay is not None:
            self.batcher = Batcher(
                self.runtime.predict, self.spec.max_batch_size, delay, self.executor, self._record_execution
            )

    def _record_execution(self, rows: int, infer_ns: int) -> None:
        self.stats.record_execution(rows, 0, infer_ns, 0)

    async def infer(self, request: InferRequest) -> dict[str, np.ndarray]:
        start = time.monotonic_ns()
        try:
            output_names = self._output_names(request)
            rows = self._check_inputs(request.inputs)
            if self.batcher is not None:
                result = await self.batcher.submit(request.inputs, output_names, rows)
                outputs, queue_ns, infer_ns = result.outputs, result.queue_ns, result.infer_ns
            else:
                outputs, queue_ns, infer_ns = await self._run_direct(request, output_names, start)
                self.stats.record_execution(rows, 0, infer_ns, 0)
            for name, k in request.classification.items():
                outputs[name] = classify(outputs[name], k, self.spec.labels.get(name))
        except BaseException:
            self.stats.record_failure(time.monotonic_ns() - start)
            raise
        self.stats.record_request(rows, time.monotonic_ns() - start, queue_ns, 0, infer_ns, 0)
        return outputs

    async def _run_direct(
        self, request: InferRequest, output_names: list[str], start: int
    ) -> tuple[dict[str, np.ndarray], int, int]:
        def run() -> tuple[dict[str, np.ndarray], int, int]:
            t0 = time.monotonic_ns()
            outputs = self.runtime.predict(request.inputs, output_names)
            return outputs, t0 - start, time.monotonic_ns() - t0

        return await asyncio.get_running_loop().run_in_executor(self.executor, run)

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

    def _check_inputs(self, inputs: dict[str, np.ndarray]) -> int:
        """Validate names, datatypes and shapes; returns the batch size (1 for unbatched models)."""
        expected = {t.name: t for t in self.spec.inputs}
        unknown = [n for n in inputs if n not in expected]
        missing = [n for n in expected if n not in inputs]
        if unknown or missing:
            parts = []
            if missing:
                parts.append(f"missing input(s) {', '.join(map(repr, missing))}")
            if unknown:
                parts.append(f"unknown input(s) {', '.join(map(repr, unknown))}")
            raise InvalidArgument(
                f"model {self.name!r} version {self.version}: {'; '.join(parts)}; it takes "
                + ", ".join(f"{t.name} {t.datatype} {list(t.shape)}" for t in self.spec.inputs)
            )
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


def _check_shape(name: str, shape: tuple[int, ...], spec: TensorSpec) -> None:
    if len(shape) != len(spec.shape) or any(want not in (-1, got) for want, got in zip(spec.shape, shape, strict=True)):
        raise InvalidArgument(
            f"input {name!r}: shape {list(shape)} sent, the model expects {list(spec.shape)} (-1: any size)"
        )

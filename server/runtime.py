"""onnxruntime sessions: load a model file, read its signature, run it.

`InferenceSession.run` releases the GIL and is thread-safe, so one session per version serves all
concurrent requests from the executor's threads; no worker processes, no per-thread copies.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from onnxgate.server.errors import Internal, InvalidArgument
from onnxgate.server.modelspec import ConfigError, TensorSpec, onnx_signature

log = logging.getLogger(__name__)

# config.pbtxt parameters overriding the session settings per model (docs/explanation/benchmarks.md "onnxruntime settings")
INTRA_OP, OPT_LEVEL = "ort_intra_op_threads", "ort_graph_optimization_level"
LEVELS = {
    "DISABLE": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "BASIC": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "EXTENDED": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "ALL": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


def session_settings(name: str, parameters: Mapping[str, str], intra_op_threads: int) -> tuple[int, str]:
    """(intra-op threads, optimisation level) of a model: the settings' default unless its config's
    parameters say otherwise; ConfigError naming the parameter for a bad value."""
    level = "ALL"
    if INTRA_OP in parameters:
        text = parameters[INTRA_OP].strip()
        if not text.isdigit() or not 1 <= int(text) <= 256:
            raise ConfigError(f"model {name!r}: parameter {INTRA_OP} = {text!r} is not a whole number from 1 to 256")
        intra_op_threads = int(text)
    if OPT_LEVEL in parameters:
        level = parameters[OPT_LEVEL].strip().upper()
        if level not in LEVELS:
            raise ConfigError(
                f"model {name!r}: parameter {OPT_LEVEL} = {parameters[OPT_LEVEL]!r} is not one of {', '.join(LEVELS)}"
            )
    return intra_op_threads, level


class OnnxModel:
    def __init__(self, path: Path, intra_op_threads: int, optimization_level: str = "ALL") -> None:
        options = ort.SessionOptions()
        # concurrency comes from the executor's threads; one op thread each avoids oversubscribing cores
        # (measured: bench/ort_settings.py, docs/explanation/benchmarks.md "onnxruntime settings")
        options.intra_op_num_threads = intra_op_threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = LEVELS[optimization_level]
        options.log_severity_level = 3
        self.path = path
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.inputs: list[TensorSpec] = onnx_signature(list(self.session.get_inputs()))
        self.outputs: list[TensorSpec] = onnx_signature(list(self.session.get_outputs()))
        self._string_inputs = {t.name for t in self.inputs if t.datatype == "BYTES"}
        self._run = self.session._sess.run
        # passed to every run: without one, each call builds a default RunOptions (measured 0.4 us of a
        # 2.5 us run of a one-node graph); runs only read it, so concurrent runs share it
        self._run_options = ort.RunOptions()

    def predict(self, inputs: Mapping[str, np.ndarray], output_names: Sequence[str]) -> dict[str, np.ndarray]:
        feed = inputs
        if self._string_inputs:
            feed = {name: _to_ort_strings(name, a) if name in self._string_inputs else a for name, a in inputs.items()}
        try:
            # the session's own run() first re-validates the input names, which ModelVersion has
            # checked already; on small models that check is a tenth of the whole request
            values = self._run(output_names, feed, self._run_options)
        except ort.capi.onnxruntime_pybind11_state.InvalidArgument as e:
            # inputs passed our checks yet the graph refused them (a dimension it fixes internally)
            raise InvalidArgument(f"the model refused the inputs: {e}") from e
        except Exception as e:
            raise Internal(f"onnxruntime failed running {self.path}: {e}") from e
        return dict(zip(output_names, values, strict=True))

    def warm_up(self, runs: int = 3) -> int:
        """Runs on zeros, so the first real request does not pay for lazy initialisation; returns the
        fastest run's CPU nanoseconds (one row), the first estimate of what a run costs."""
        feed = {}
        for t in self.inputs:
            shape = tuple(1 if d < 0 else d for d in t.shape)
            feed[t.name] = (
                np.full(shape, "", dtype=object) if t.datatype == "BYTES" else np.zeros(shape, _NUMPY[t.datatype])
            )
        best = None
        for _ in range(runs):
            t0 = time.thread_time_ns()
            self.session.run(None, feed)
            elapsed = time.thread_time_ns() - t0
            best = elapsed if best is None else min(best, elapsed)
        assert best is not None
        return best


_NUMPY = {
    "BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
    "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64,
    "FP16": np.float16, "FP32": np.float32, "FP64": np.float64,
}  # fmt: skip


def _to_ort_strings(name: str, array: np.ndarray) -> np.ndarray:
    # the wire carries bytes; onnxruntime's string tensors take str
    out = np.empty(array.shape, dtype=object)
    try:
        for index, item in np.ndenumerate(array):
            out[index] = item.decode("utf-8") if isinstance(item, bytes) else str(item)
    except UnicodeDecodeError as e:
        raise InvalidArgument(
            f"input {name!r}: a BYTES element is not UTF-8 text, which string models need: {e}"
        ) from e
    return out

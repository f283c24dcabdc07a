"""Shared helpers of the prediction-log tests."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from onnxgate.server.predlog import ModelLogPolicy, PredictionLog, PredLogSettings
from onnxgate.server.segments import read_segments


def settings(log_dir: Path, replica: str = "r1", **overrides: object) -> PredLogSettings:
    base: dict[str, object] = {"flush_ms": 50.0, "join_interval_s": 3600.0, "unknown_after_s": 3600.0}
    base.update(overrides)
    return PredLogSettings(log_dir, replica_id=replica, **base)  # type: ignore[arg-type]


def record_iris(
    log: PredictionLog,
    pid: str,
    features: list[float],
    label: int,
    version: str = "1",
    model: str = "iris",
    shadow: str | None = None,
) -> None:
    """One iris prediction; `shadow`: a shadow version's run logged in the same row (a split route)."""
    x = np.asarray([features], dtype=np.float32)
    outputs = {"label": np.array([label], np.int64), "probabilities": np.full((1, 3), 1 / 3, np.float32)}
    if shadow is None:
        log.record(pid, model, version, {"x": x}, outputs)
        return
    shadow_outputs = {"label": np.array([(label + 1) % 3], np.int64), "probabilities": outputs["probabilities"]}
    log.record(pid, model, version, {"x": x}, outputs, "split", 0.5, shadow, shadow_outputs)


def rows(directory: Path, kind: str = "predictions") -> int:
    return sum(t.num_rows for _, t in read_segments(directory, kind))


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


__all__ = ["ModelLogPolicy", "record_iris", "rows", "settings", "wait_for"]

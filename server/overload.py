"""Overload protection per model version: its limits, and the deadline a request must start before.

Besides the server-wide `max_inflight`, each model version bounds

    max_queued_requests   requests of this version in flight: waiting for a thread or a batch, or running
    max_inflight_rows     their batch rows together (the memory they hold); a request is admitted
                          whatever its size when no other is in flight, so an oversized one still runs alone

Past a limit a request is refused at once with RESOURCE_EXHAUSTED (HTTP 429) instead of joining a queue
that only grows latency. The defaults come from the settings (`--default-max-queued-requests`,
`--default-max-inflight-rows`); a model's config.pbtxt overrides them (0: no limit):

    parameters { key: "max_queued_requests" value { string_value: "64" } }
    parameters { key: "max_inflight_rows"   value { string_value: "4096" } }

The counts are plain ints kept on the event loop: admission is two compares and two increments.

A deadline is a `time.monotonic()` instant (gRPC: the client's deadline; HTTP: the request's `timeout`
parameter, microseconds as Triton's). Work whose deadline passed when it would start running (before
the model run, on the executor's thread, or when it leaves the batcher's queue) is not run: DEADLINE_EXCEEDED
(HTTP 504).

A model with dynamic batching may declare a latency objective; its batch limit then adapts to it
(server/batcher.py, additive increase, multiplicative decrease):

    parameters { key: "latency_objective_p99_ms" value { string_value: "20" } }
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass

from onnxgate.server.errors import DeadlineExceeded
from onnxgate.server.modelspec import ConfigError, ModelSpec

QUEUED, ROWS = "max_queued_requests", "max_inflight_rows"
UNLIMITED = sys.maxsize  # what 0 means: one compare on the hot path either way


@dataclass(frozen=True)
class Limits:
    max_queued_requests: int = 0  # 0: no limit
    max_inflight_rows: int = 0
    # the response cache's bound per version, for models whose config enables it (server/cache.py; 0: off)
    response_cache_bytes: int = 64 * 1024 * 1024


def version_limits(spec: ModelSpec, defaults: Limits) -> tuple[int, int]:
    """(max queued requests, max rows in flight) of a version, UNLIMITED for 0; ConfigError for a bad value."""
    params = spec.config.parameters
    values = []
    for key, default in ((QUEUED, defaults.max_queued_requests), (ROWS, defaults.max_inflight_rows)):
        value = default
        if key in params:
            text = params[key].string_value.strip()
            if not text.isdigit():
                raise ConfigError(
                    f"model {spec.name!r}: parameter {key} = {text!r} is not a whole number (0 or more; 0: no limit)"
                )
            value = int(text)
        values.append(value or UNLIMITED)
    return values[0], values[1]


OBJECTIVE = "latency_objective_p99_ms"


def latency_objective_s(spec: ModelSpec) -> float | None:
    """The config's latency objective for dynamic batching, in seconds (server/batcher.py adapts the batch
    limit to it); None when not set; ConfigError for a bad value or a model without dynamic batching."""
    params = spec.config.parameters
    if OBJECTIVE not in params:
        return None
    text = params[OBJECTIVE].string_value.strip()
    try:
        ms = float(text)
    except ValueError:
        ms = math.nan
    if not (math.isfinite(ms) and ms > 0):
        raise ConfigError(f"model {spec.name!r}: parameter {OBJECTIVE} = {text!r} is not a positive number of ms")
    if spec.dynamic_batching_delay_s is None:
        raise ConfigError(
            f"model {spec.name!r}: parameter {OBJECTIVE} adapts dynamic batching; add dynamic_batching {{ }} to"
            " its config.pbtxt or remove the parameter"
        )
    return ms / 1000.0


def expired(deadline: float | None, what: str) -> None:
    """Raise DeadlineExceeded when `deadline` (time.monotonic()) has passed: the work is not started."""
    if deadline is not None and time.monotonic() >= deadline:
        raise DeadlineExceeded(f"{what}: the request's deadline passed before it could run; it was not run")


def deadline_in(seconds: float | None) -> float | None:
    """The deadline `seconds` from now (None: none)."""
    return None if seconds is None else time.monotonic() + seconds

"""The request path both edges share: admission, routing, the model run, the shadow run and the log record.

gRPC (`service.py`) and HTTP/REST (`rest.py`) each decode their wire format into an InferRequest and
encode the outputs back; everything between is here, once, so a request gets the same answer, the same
prediction id and the same log record on either protocol:

    answer = await inference.run(wire_request, decode, encode)
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from onnxgate.server.errors import InvalidArgument, ResourceExhausted, Unavailable
from onnxgate.server.model import ModelVersion, Tensors
from onnxgate.server.predlog import Recorder
from onnxgate.server.repository import Repository
from onnxgate.server.routing import EXPLICIT, Router
from onnxgate.server.tensors import InferRequest

if TYPE_CHECKING:
    from onnxgate.server.drain import OpenStream

log = logging.getLogger(__name__)

Q = TypeVar("Q")  # the wire request
I = TypeVar("I", bound=InferRequest)  # noqa: E741 - what the edge decodes it into (may carry wire options)
A = TypeVar("A")  # the wire answer


class State:
    """Server-wide flags the edges and the lifecycle share."""

    def __init__(self, max_inflight: int) -> None:
        self.max_inflight = max_inflight
        self.inflight = 0
        self.shadows = 0  # shadow runs in flight (server/routing.py): spare capacity only
        # a shadow run is dropped while more requests than this are in flight, or as many shadow runs
        self.shadow_max_inflight = max(1, max_inflight // 4)
        self.ready = False
        self.draining = False  # from SIGTERM on: new requests refused UNAVAILABLE (server/drain.py)
        self.refused_at = 0.0  # time.monotonic() of the latest request refused while draining
        self.closing = False  # the drain phase is over: open streams end
        self.streams: set[OpenStream] = set()  # ModelStreamInfer calls open now


class Inference:
    def __init__(self, repository: Repository, state: State, record: Recorder | None = None) -> None:
        self.repository = repository
        self.state = state
        self.record = record  # PredictionLog.record when the prediction log is on: a non-blocking put
        self._shadow_tasks: set[asyncio.Task[None]] = set()  # held: the loop keeps only weak references

    async def run(
        self,
        request: Q,
        decode: Callable[[Q], I],
        encode: Callable[[I, str, Tensors], A],
        deadline: float | None = None,
    ) -> A:
        """Admit, decode, route, run, encode; then the shadow run or the log record, off the answer's path.
        `deadline` (time.monotonic(); the gRPC client's): past it the model is not run (server/overload.py)."""
        state = self.state
        if state.draining:
            state.refused_at = time.monotonic()
            raise Unavailable("server is shutting down; retry on another replica")
        if state.inflight >= state.max_inflight:
            raise ResourceExhausted(f"server overloaded: {state.inflight} requests in flight; retry with backoff")
        state.inflight += 1
        try:
            t0 = time.monotonic_ns()
            infer = decode(request)
            decode_ns = time.monotonic_ns() - t0
            if deadline is not None and (infer.deadline is None or deadline < infer.deadline):
                infer.deadline = deadline
            router: Router | None = None
            if infer.version:  # a request naming its version always gets it
                version, route, propensity = self.repository.get(infer.model, infer.version), EXPLICIT, 1.0
            else:
                version, route, propensity, router = self.repository.route(infer.model)
            if version.columns is not None or infer.rows is not None:
                _assemble(infer, version)
            outputs = await version.infer(infer, decode_ns)
            t1 = time.monotonic_ns()
            answer = encode(infer, version.version_str, outputs)
            t2 = time.monotonic_ns()
            version.stats.record_output(t2 - t1, t2 - t0)
            shadow = router.shadow_for(version) if router is not None else None
            if shadow is not None and router is not None:
                if state.inflight > state.shadow_max_inflight or state.shadows >= state.shadow_max_inflight:
                    router.stats.shadow_dropped += 1  # busy: the shadow goes first, the champion is never slowed
                else:
                    # the record waits for the shadow's outputs: one row per request, both versions' answers
                    state.shadows += 1
                    task = asyncio.get_running_loop().create_task(
                        self._shadow(router, shadow, infer, version, outputs, route, propensity)
                    )
                    self._shadow_tasks.add(task)
                    task.add_done_callback(self._shadow_tasks.discard)
                    return answer
            if self.record is not None:
                # keyed by the request's id (generated when the client sent none): feedback refers to it
                self.record(
                    infer.id,
                    infer.model,
                    version.version_str,
                    infer.inputs,
                    outputs,
                    route,
                    propensity,
                    None,
                    None,
                    version.columns.names_by_input if version.columns is not None else None,
                )
            return answer
        finally:
            state.inflight -= 1

    async def _shadow(
        self,
        router: Router,
        shadow: ModelVersion,
        infer: InferRequest,
        champion: ModelVersion,
        outputs: Tensors,
        route: str,
        propensity: float,
    ) -> None:
        """Score the request with the shadow version after the response went out; log both in one row."""
        shadow_outputs: Tensors | None = None
        try:
            await asyncio.sleep(0)  # let the handler return and the response be sent first
            shadow_outputs = await shadow.infer_on_executor(infer)
        except Exception as e:  # the client has its answer; a failing shadow only loses its own outputs
            log.warning("model %s: shadow version %s failed: %s", infer.model, shadow.version, e)
            router.stats.shadow_dropped += 1
        finally:
            self.state.shadows -= 1
        if shadow_outputs is not None:
            router.stats.shadow_runs[shadow.version_str] += 1
            if _primary_differs(outputs, shadow_outputs):
                router.stats.shadow_disagreements[shadow.version_str] += 1
        if self.record is not None:
            self.record(
                infer.id,
                infer.model,
                champion.version_str,
                infer.inputs,
                outputs,
                route,
                propensity,
                shadow.version_str if shadow_outputs is not None else None,
                shadow_outputs,
                champion.columns.names_by_input if champion.columns is not None else None,
            )


def _assemble(infer: InferRequest, version: ModelVersion) -> None:
    """Named columns (tensors per column, or REST rows) -> the version's own input tensors, in place: the
    model run, the cache, the shadow run and the log record all see the model's tensors."""
    columns = version.columns
    if columns is None:
        raise InvalidArgument(
            f"model {infer.model!r} version {version.version} records no column names, so it cannot take 'rows';"
            " send its inputs as tensors: "
            + ", ".join(f"{t.name} {t.datatype} {list(t.shape)}" for t in version.spec.inputs)
        )
    try:
        infer.inputs = columns.assemble(infer.inputs, infer.rows)
    except BaseException:
        version.stats.record_failure(0)
        raise
    infer.rows = None


def _primary_differs(champion: Tensors, shadow: Tensors) -> bool:
    """Whether the primary outputs differ: the output with the fewest elements, as the live join compares
    with the truth (server/join.py primary_output)."""
    if not champion:
        return False
    name = min(champion, key=lambda n: (champion[n].size, n))
    other = shadow.get(name)
    return other is None or other.shape != champion[name].shape or not bool((other == champion[name]).all())

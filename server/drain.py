"""The drain: what the gateway does between SIGTERM and exit, so that no request that reached it ends
with anything but its answer or UNAVAILABLE (HTTP 503), the status clients' retry policies retry.

    at SIGTERM    draining: health NOT_SERVING, new inference requests UNAVAILABLE / 503 (app.py)
    drain phase   both ports stay open, refusing new work, for --drain-delay-s: load balancers and the
                  Kubernetes endpoints move clients away meanwhile. It ends early once nothing is in
                  flight and no request was refused for QUIET_S: the clients have gone.
    closing       open ModelStreamInfer streams end with UNAVAILABLE (an idle one at once, a busy one
                  after the answer it is computing); requests, shadow runs and streams in flight finish,
                  up to --shutdown-grace-s after SIGTERM
    then          the HTTP server stops, the log writers flush and close, the process exits 0

What grpcio (1.81) does on its own, measured with clients calling in a loop: `server.stop(grace)`
cancels every call that reached the server but was not yet handed to a handler: the client sees
CANCELLED, a few per stop under load, whatever the grace; a call still running when the grace ends gets
UNAVAILABLE. So the gateway answers new calls itself (UNAVAILABLE) for the whole drain, and `onnxgate
serve` leaves the gRPC server running to the end: the process exits, the clients' connections close, and a
call caught in that moment ends UNAVAILABLE ("Stream removed"), never CANCELLED; afterwards connections
are refused (UNAVAILABLE too).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc

from onnxgate.server.inference import State

log = logging.getLogger(__name__)

# the drain phase ends early once nothing is in flight and no request was refused for this long: longer
# than the gaps between the attempts of a client still retrying here. Measured: a gRPC retry policy
# retrying UNAVAILABLE (initialBackoff 0.1s, multiplier 2, maxBackoff 1s) against a draining gateway
# sends its attempts 0.2 s apart at the median and up to 0.94 s apart (grpc adds +-20 % jitter, so up
# to 1.2 s). Ending between two attempts would cost little (the next one finds the port closed:
# UNAVAILABLE too), waiting costs shutdown time: 2 s, well inside the default 5 s drain delay.
QUIET_S = 2.0
POLL_S = 0.02  # how often the drain looks at what is in flight
# `onnxgate serve` waits this long after the writers closed before it exits: feedback acknowledged while
# they closed, and answers handed to gRPC just before, go out to the clients first
SETTLE_S = 0.2
REFUSED = "server is shutting down; retry on another replica"

Context = grpc.aio.ServicerContext[Any, Any]
M = TypeVar("M")  # a stream's request message
R = TypeVar("R")  # a stream's response message


@dataclass(eq=False)
class OpenStream:
    """A streaming RPC the drain may have to end: `busy` from a request's arrival until its answer went
    out, `ended` once UNAVAILABLE was sent."""

    context: Context
    busy: bool = False
    ended: bool = False


def ends_on_drain(
    method: Callable[[Any, AsyncIterator[M], Context], AsyncIterator[R]],
) -> Callable[[Any, AsyncIterator[M], Context], AsyncIterator[R]]:
    """For a bidirectional streaming RPC of a servicer with `state` and `answers` (stats.RequestCounts):
    while draining, the stream's next request ends it with UNAVAILABLE (counted as that request's answer)
    instead of reaching `method`; the drain ends the stream when it closes."""
    refused = ("grpc", method.__name__, "UNAVAILABLE")

    @functools.wraps(method)
    async def wrapper(self: Any, requests: AsyncIterator[M], context: Context) -> AsyncIterator[R]:
        state: State = self.state
        stream = OpenStream(context)
        state.streams.add(stream)
        counts: Counter[tuple[str, str, str]] = self.answers.counts
        try:
            async for response in method(self, _requests(state, stream, requests, counts, refused), context):
                yield response
        finally:
            state.streams.discard(stream)

    return wrapper


async def _requests(
    state: State,
    stream: OpenStream,
    requests: AsyncIterator[M],
    counts: Counter[tuple[str, str, str]],
    refused: tuple[str, str, str],
) -> AsyncIterator[M]:
    async for request in requests:  # idle while waiting here: the drain may end the stream meanwhile
        if stream.ended:
            return
        if state.draining:
            state.refused_at = time.monotonic()
            counts[refused] += 1
            await _end(stream)
            return
        stream.busy = True
        yield request  # resumed once `method` asks for the next request: this one's answer went out
        stream.busy = False
        if state.closing:
            await _end(stream)
            return


async def _end(stream: OpenStream) -> None:
    """Send UNAVAILABLE on the stream: from its own handler, or from the drain while the handler waits
    for a request (no other operation is under way on the call then). Raises grpc.aio.AbortError."""
    stream.ended = True
    await stream.context.abort(grpc.StatusCode.UNAVAILABLE, REFUSED)


def busy(state: State) -> bool:
    return state.inflight > 0 or state.shadows > 0 or bool(state.streams)


async def drain(state: State, *, drain_s: float, deadline: float) -> bool:
    """Run the drain phase and the closing (see the module); `draining` is already set. `deadline`
    (time.monotonic()) ends the wait for requests in flight. True when all of them finished."""
    start = time.monotonic()
    drain_end = min(start + drain_s, deadline)
    while (now := time.monotonic()) < drain_end:
        # an idle stream does not hold the phase open: closing ends it
        if state.inflight == 0 and state.shadows == 0 and now - max(start, state.refused_at) >= QUIET_S:
            break
        await asyncio.sleep(POLL_S)
    log.info(
        "drain phase over after %.1fs: %d requests in flight, %d streams open",
        time.monotonic() - start,
        state.inflight,
        len(state.streams),
    )
    state.closing = True
    while True:
        for stream in list(state.streams):  # again each time: a stream may open while this waits
            if not stream.busy and not stream.ended:  # waiting for a request: nothing else is sending
                with contextlib.suppress(grpc.aio.AbortError):  # the handler's read then ends the stream
                    await _end(stream)
        if not busy(state) or time.monotonic() >= deadline:
            break
        await asyncio.sleep(POLL_S)
    if busy(state):
        log.warning(
            "shutdown grace over with %d requests, %d shadow runs and %d streams still in flight: they are cut",
            state.inflight,
            state.shadows,
            len(state.streams),
        )
        return False
    return True

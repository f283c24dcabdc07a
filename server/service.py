"""The gRPC edge: the Open Inference Protocol servicer, the one place that maps errors to statuses.

Each RPC reads its protobuf request, calls into the repository or a model version with plain
Python values, and builds the protobuf answer. `@grpc_errors` turns a GatewayError into its status
code and message; anything else is a bug on our side: logged with its trace, answered INTERNAL.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc

from onnxgate import __version__
from onnxgate.server.errors import GatewayError, Internal, InvalidArgument, ResourceExhausted, Unavailable
from onnxgate.server.model import ModelVersion, Tensors
from onnxgate.server.modelspec import PLATFORM
from onnxgate.server.pb import grpc_service_pb2 as pb
from onnxgate.server.pb import grpc_service_pb2_grpc as pb_grpc
from onnxgate.server.predlog import Recorder
from onnxgate.server.repository import Repository
from onnxgate.server.routing import EXPLICIT, Router
from onnxgate.server.stats import Duration, VersionStats
from onnxgate.server.tensors import InferRequest, decode_request, encode_response

log = logging.getLogger(__name__)

# only what is implemented end to end: perf_analyzer reads 'statistics' to decide to call it
EXTENSIONS = ("classification", "model_repository", "model_configuration", "statistics")

R = TypeVar("R")
Context = grpc.aio.ServicerContext[Any, Any]
Handler = Callable[..., Awaitable[R]]


def grpc_errors(method: Handler[R]) -> Handler[R]:
    @functools.wraps(method)
    async def wrapper(self: Any, request: Any, context: Context) -> R:
        try:
            return await method(self, request, context)
        except GatewayError as e:
            if isinstance(e, Internal):
                log.error("internal error in %s: %s", method.__name__, e.message, exc_info=e)
            await context.abort(e.code, e.message)
        except Exception as e:
            log.exception("internal error in %s", method.__name__)
            await context.abort(
                grpc.StatusCode.INTERNAL, f"internal error: {type(e).__name__}: {e} (details in the server log)"
            )
        raise AssertionError("unreachable: context.abort raises")

    return wrapper


class State:
    """Server-wide flags the servicer and the lifecycle share."""

    def __init__(self, max_inflight: int) -> None:
        self.max_inflight = max_inflight
        self.inflight = 0
        self.shadows = 0  # shadow runs in flight (server/routing.py): spare capacity only
        # a shadow run is dropped while more requests than this are in flight, or as many shadow runs
        self.shadow_max_inflight = max(1, max_inflight // 4)
        self.ready = False
        self.draining = False


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, repository: Repository, state: State, record: Recorder | None = None) -> None:
        self.repository = repository
        self.state = state
        self.record = record  # PredictionLog.record when the prediction log is on: a non-blocking put
        self._shadow_tasks: set[asyncio.Task[None]] = set()  # held: the loop keeps only weak references

    @grpc_errors
    async def ServerLive(self, request: pb.ServerLiveRequest, context: Context) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    @grpc_errors
    async def ServerReady(self, request: pb.ServerReadyRequest, context: Context) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.state.ready and not self.state.draining)

    @grpc_errors
    async def ModelReady(self, request: pb.ModelReadyRequest, context: Context) -> pb.ModelReadyResponse:
        try:
            self.repository.get(request.name, request.version)
        except GatewayError:
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=not self.state.draining)

    @grpc_errors
    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context: Context) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name="onnxgate", version=__version__, extensions=EXTENSIONS)

    @grpc_errors
    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: Context) -> pb.ModelMetadataResponse:
        version = self.repository.get(request.name, request.version)
        served = self.repository.served(request.name)
        meta = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=request.name,
            versions=[str(v) for v in sorted(served.versions)],
            platform=PLATFORM,
            inputs=[meta(name=t.name, datatype=t.datatype, shape=t.shape) for t in version.spec.inputs],
            outputs=[meta(name=t.name, datatype=t.datatype, shape=t.shape) for t in version.spec.outputs],
        )

    @grpc_errors
    async def ModelConfig(self, request: pb.ModelConfigRequest, context: Context) -> pb.ModelConfigResponse:
        return pb.ModelConfigResponse(config=self.repository.get(request.name, request.version).spec.config)

    async def _infer(self, request: pb.ModelInferRequest, context: Context | None = None) -> pb.ModelInferResponse:
        state = self.state
        if state.draining:
            raise Unavailable("server is shutting down; retry on another replica")
        if state.inflight >= state.max_inflight:
            raise ResourceExhausted(f"server overloaded: {state.inflight} requests in flight; retry with backoff")
        state.inflight += 1
        try:
            t0 = time.monotonic_ns()
            infer = decode_request(request)
            decode_ns = time.monotonic_ns() - t0
            router: Router | None = None
            if infer.version:  # a request naming its version always gets it
                version, route, propensity = self.repository.get(infer.model, infer.version), EXPLICIT, 1.0
            else:
                version, route, propensity, router = self.repository.route(infer.model)
            outputs = await version.infer(infer, decode_ns)
            t1 = time.monotonic_ns()
            response = encode_response(infer.model, version.version_str, infer.id, outputs)
            version.stats.record_output(time.monotonic_ns() - t1)
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
                    return response
            if self.record is not None:
                # keyed by the request's id (generated when the client sent none): feedback refers to it
                self.record(
                    infer.id, infer.model, version.version_str, infer.inputs, outputs, route, propensity, None, None
                )
            return response
        finally:
            state.inflight -= 1

    # the hot path: one coroutine frame less than a method that awaits _infer
    ModelInfer = grpc_errors(_infer)

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
            )

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[pb.ModelInferRequest], context: Context
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        # errors travel in error_message so one bad request does not end the stream
        async for request in request_iterator:
            try:
                yield pb.ModelStreamInferResponse(infer_response=await self._infer(request))
            except GatewayError as e:
                yield pb.ModelStreamInferResponse(
                    error_message=e.message, infer_response=pb.ModelInferResponse(id=request.id)
                )
            except Exception as e:
                log.exception("internal error in ModelStreamInfer")
                yield pb.ModelStreamInferResponse(
                    error_message=f"internal error: {type(e).__name__}: {e}",
                    infer_response=pb.ModelInferResponse(id=request.id),
                )

    @grpc_errors
    async def ModelStatistics(self, request: pb.ModelStatisticsRequest, context: Context) -> pb.ModelStatisticsResponse:
        if request.name:
            served = [self.repository.served(request.name)]
            if request.version:
                self.repository.get(request.name, request.version)
        else:
            if request.version:
                raise InvalidArgument("a version needs a model name")
            served = self.repository.all_served()
        stats = []
        for model in served:
            for number, version in sorted(model.versions.items()):
                if not request.version or request.version == str(number):
                    stats.append(_statistics(model.name, str(number), version.stats))
        return pb.ModelStatisticsResponse(model_stats=stats)

    @grpc_errors
    async def RepositoryIndex(self, request: pb.RepositoryIndexRequest, context: Context) -> pb.RepositoryIndexResponse:
        entry = pb.RepositoryIndexResponse.ModelIndex
        return pb.RepositoryIndexResponse(
            models=[
                entry(name=e.name, version=e.version, state=e.state, reason=e.reason)
                for e in self.repository.index(ready_only=request.ready)
            ]
        )

    @grpc_errors
    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: Context
    ) -> pb.RepositoryModelLoadResponse:
        config: str | None = None
        files: dict[str, bytes] = {}
        for key, param in request.parameters.items():
            kind = param.WhichOneof("parameter_choice")
            if key == "config":
                if kind != "string_param":
                    raise InvalidArgument("load parameter 'config' must be a string holding the ModelConfig as JSON")
                config = param.string_param
            elif key.startswith("file:"):
                if kind != "bytes_param":
                    raise InvalidArgument(f"load parameter {key!r} must carry the file's bytes")
                files[key.removeprefix("file:")] = param.bytes_param
            else:
                raise InvalidArgument(f"unknown load parameter {key!r}; accepted: 'config', 'file:<version>/<name>'")
        if files and config is None:
            raise InvalidArgument("uploading model files needs the 'config' parameter too (as Triton requires)")
        await self.repository.load(request.model_name, config, files)
        return pb.RepositoryModelLoadResponse()

    @grpc_errors
    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: Context
    ) -> pb.RepositoryModelUnloadResponse:
        await self.repository.unload(request.model_name)
        return pb.RepositoryModelUnloadResponse()


def _primary_differs(champion: Tensors, shadow: Tensors) -> bool:
    """Whether the primary outputs differ: the output with the fewest elements, as the live join compares
    with the truth (server/join.py primary_output)."""
    if not champion:
        return False
    name = min(champion, key=lambda n: (champion[n].size, n))
    other = shadow.get(name)
    return other is None or other.shape != champion[name].shape or not bool((other == champion[name]).all())


def _duration(d: Duration) -> pb.StatisticDuration:
    return pb.StatisticDuration(count=d.count, ns=d.ns)


def _statistics(name: str, version: str, s: VersionStats) -> pb.ModelStatistics:
    return pb.ModelStatistics(
        name=name,
        version=version,
        last_inference=s.last_inference_ms,
        inference_count=s.inference_count,
        execution_count=s.execution_count,
        inference_stats=pb.InferStatistics(
            success=_duration(s.success),
            fail=_duration(s.fail),
            queue=_duration(s.queue),
            compute_input=_duration(s.compute_input),
            compute_infer=_duration(s.compute_infer),
            compute_output=_duration(s.compute_output),
            cache_hit=pb.StatisticDuration(),
            cache_miss=pb.StatisticDuration(),
        ),
        batch_stats=[
            pb.InferBatchStatistics(
                batch_size=size,
                compute_input=_duration(b.compute_input),
                compute_infer=_duration(b.compute_infer),
                compute_output=_duration(b.compute_output),
            )
            for size, b in sorted(s.batches.items())
        ],
    )

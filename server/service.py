"""The gRPC edge: the Open Inference Protocol servicer, the one place that maps errors to gRPC statuses.

Each RPC reads its protobuf request, calls the shared request path (inference.py) or the shared
answers (protocol.py) with plain Python values, and sends the protobuf answer. `@grpc_errors` turns a GatewayError into its status
code and message; anything else is a bug on our side: logged with its trace, answered INTERNAL. It also
counts every answer by RPC and status code (onnxgate_requests_total) in the servicer's `answers`.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc

from onnxgate.server import protocol
from onnxgate.server.drain import ends_on_drain
from onnxgate.server.errors import GatewayError, Internal
from onnxgate.server.inference import Inference, State
from onnxgate.server.model import Tensors
from onnxgate.server.overload import deadline_in
from onnxgate.server.pb import grpc_service_pb2 as pb
from onnxgate.server.pb import grpc_service_pb2_grpc as pb_grpc
from onnxgate.server.repository import Repository
from onnxgate.server.stats import RequestCounts
from onnxgate.server.tensors import InferRequest, decode_request, encode_response
from onnxgate.server.wire import details

log = logging.getLogger(__name__)

R = TypeVar("R")
Context = grpc.aio.ServicerContext[Any, Any]
Handler = Callable[..., Awaitable[R]]
STREAM_OK, STREAM_INTERNAL = ("grpc", "ModelStreamInfer", "OK"), ("grpc", "ModelStreamInfer", "INTERNAL")


def grpc_errors(method: Handler[R]) -> Handler[R]:
    """Map errors to statuses, and count the answer; the servicer has `answers` (RequestCounts)."""
    rpc = method.__name__
    ok, internal, cancelled = (("grpc", rpc, code) for code in ("OK", "INTERNAL", "CANCELLED"))

    @functools.wraps(method)
    async def wrapper(self: Any, request: Any, context: Context) -> R:
        counts = self.answers.counts
        try:
            answer = await method(self, request, context)
        except GatewayError as e:
            counts["grpc", rpc, e.code.name] += 1
            if isinstance(e, Internal):
                log.error("internal error in %s: %s", rpc, e.message, exc_info=e)
            await context.abort(e.code, details(e.message))  # bounded: it travels in a trailer
        except asyncio.CancelledError:  # the client cancelled, or its deadline passed
            counts[cancelled] += 1
            raise
        except Exception as e:
            counts[internal] += 1
            log.exception("internal error in %s", rpc)
            await context.abort(
                grpc.StatusCode.INTERNAL,
                details(f"internal error: {type(e).__name__}: {e} (details in the server log)"),
            )
        else:
            counts[ok] += 1
            return answer
        raise AssertionError("unreachable: context.abort raises")

    return wrapper


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, repository: Repository, state: State, inference: Inference, answers: RequestCounts) -> None:
        self.repository = repository
        self.state = state
        self.inference = inference
        self.answers = answers

    @grpc_errors
    async def ServerLive(self, request: pb.ServerLiveRequest, context: Context) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    @grpc_errors
    async def ServerReady(self, request: pb.ServerReadyRequest, context: Context) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.state.ready and not self.state.draining)

    @grpc_errors
    async def ModelReady(self, request: pb.ModelReadyRequest, context: Context) -> pb.ModelReadyResponse:
        return pb.ModelReadyResponse(
            ready=protocol.model_ready(self.repository, request.name, request.version, self.state.draining)
        )

    @grpc_errors
    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context: Context) -> pb.ServerMetadataResponse:
        return protocol.server_metadata()

    @grpc_errors
    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: Context) -> pb.ModelMetadataResponse:
        return protocol.model_metadata(self.repository, request.name, request.version)

    @grpc_errors
    async def ModelConfig(self, request: pb.ModelConfigRequest, context: Context) -> pb.ModelConfigResponse:
        return pb.ModelConfigResponse(config=protocol.model_config(self.repository, request.name, request.version))

    @grpc_errors
    async def ModelInfer(self, request: pb.ModelInferRequest, context: Context) -> pb.ModelInferResponse:
        # the client's deadline: a request still waiting when it passes is not run (DEADLINE_EXCEEDED)
        return await self.inference.run(request, decode_request, _encode, deadline_in(context.time_remaining()))

    @ends_on_drain  # while draining: UNAVAILABLE ends the stream (server/drain.py)
    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[pb.ModelInferRequest], context: Context
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        # errors travel in error_message so one bad request does not end the stream; each answer is counted
        counts = self.answers.counts
        async for request in request_iterator:
            try:
                response = await self.inference.run(request, decode_request, _encode)
            except GatewayError as e:
                counts["grpc", "ModelStreamInfer", e.code.name] += 1
                yield pb.ModelStreamInferResponse(
                    error_message=e.message, infer_response=pb.ModelInferResponse(id=request.id)
                )
            except Exception as e:
                counts[STREAM_INTERNAL] += 1
                log.exception("internal error in ModelStreamInfer")
                yield pb.ModelStreamInferResponse(
                    error_message=f"internal error: {type(e).__name__}: {e}",
                    infer_response=pb.ModelInferResponse(id=request.id),
                )
            else:
                counts[STREAM_OK] += 1
                yield pb.ModelStreamInferResponse(infer_response=response)

    @grpc_errors
    async def ModelStatistics(self, request: pb.ModelStatisticsRequest, context: Context) -> pb.ModelStatisticsResponse:
        return protocol.model_statistics(self.repository, request.name, request.version)

    @grpc_errors
    async def RepositoryIndex(self, request: pb.RepositoryIndexRequest, context: Context) -> pb.RepositoryIndexResponse:
        return protocol.repository_index(self.repository, request.ready)

    @grpc_errors
    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: Context
    ) -> pb.RepositoryModelLoadResponse:
        parameters = {
            key: getattr(p, p.WhichOneof("parameter_choice") or "string_param") for key, p in request.parameters.items()
        }
        config, files = protocol.load_arguments(parameters)
        await self.repository.load(request.model_name, config, files)
        return pb.RepositoryModelLoadResponse()

    @grpc_errors
    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: Context
    ) -> pb.RepositoryModelUnloadResponse:
        await self.repository.unload(request.model_name)
        return pb.RepositoryModelUnloadResponse()


def _encode(infer: InferRequest, version: str, outputs: Tensors) -> pb.ModelInferResponse:
    return encode_response(infer.model, version, infer.id, outputs)

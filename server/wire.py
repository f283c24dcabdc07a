"""Requests that are not the protobuf message their method takes: INVALID_ARGUMENT, not grpc's UNKNOWN.

grpc.aio parses a request with the method handler's deserializer before any servicer code runs; bytes
that do not parse (a truncated message, a string field that is not UTF-8, another message's bytes)
end the call UNKNOWN "Unexpected DecodeError", which says neither whose fault it is nor what to fix.
`parsing(server)` stands in for the server in the generated `add_*Servicer_to_server`: each method
then takes the raw bytes and parses them itself, answering INVALID_ARGUMENT when they do not parse.
Set up once at start; per call it costs one more coroutine frame, no interceptor.

`details(message)` bounds an error message for the grpc-message trailer: an echoed 100 kB model name
would otherwise exceed the client's metadata limit (16 KiB hard, 8 KiB soft by default) and the client
would get RESOURCE_EXHAUSTED "Stream removed" instead of the message.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any

import grpc

from onnxgate.server.errors import GatewayError, InvalidArgument

DETAILS_MAX_BYTES = 2000  # UTF-8 bytes; percent-encoded on the wire at most 3x: 6000 bytes


def details(message: str) -> str:
    """The message, cut to about DETAILS_MAX_BYTES of UTF-8 (saying how much was cut)."""
    data = message.encode("utf-8", "replace")
    if len(data) <= DETAILS_MAX_BYTES:
        return message
    # the middle goes: the start says what is wrong, the end often what is accepted ("models served: ...")
    head = data[: DETAILS_MAX_BYTES // 2].decode("utf-8", "ignore")
    tail = data[-DETAILS_MAX_BYTES // 2 :].decode("utf-8", "ignore")
    return f"{head} [... {len(data) - DETAILS_MAX_BYTES} bytes cut ...] {tail}"


def _parser(parse: Callable[[bytes], Any], method: str) -> Callable[[bytes], Any]:
    def parsed(raw: bytes) -> Any:
        try:
            return parse(raw)
        except Exception as e:  # DecodeError, and whatever else the client's bytes make the parser raise
            raise InvalidArgument(
                f"the request ({len(raw)} bytes) is not a valid {method} request message: {e}; send the method's"
                " protobuf message, its string fields UTF-8"
            ) from None

    return parsed


def _checked(handler: Any, method: str) -> Any:  # grpc.RpcMethodHandler; grpc-stubs type its behaviours sync
    parse_raw = handler.request_deserializer
    if parse_raw is None or handler.unary_stream is not None:
        return handler  # unary-stream: none of the services wrapped here has one
    parse = _parser(parse_raw, method)
    serialize = handler.response_serializer
    if handler.unary_unary is not None:
        unary = handler.unary_unary

        async def unary_unary(raw: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            try:
                request = parse(raw)
            except GatewayError as e:
                await context.abort(e.code, details(e.message))
                raise  # unreachable: abort raises
            return await unary(request, context)

        return grpc.unary_unary_rpc_method_handler(unary_unary, response_serializer=serialize)

    async def requests(raws: AsyncIterator[bytes]) -> AsyncIterator[Any]:
        async for raw in raws:
            yield parse(raw)  # InvalidArgument: the servicer's error mapping answers it

    if handler.stream_unary is not None:
        stream_unary = handler.stream_unary

        async def stream_in(raws: AsyncIterator[bytes], context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            try:
                return await stream_unary(requests(raws), context)
            except GatewayError as e:  # raised by `requests` in a servicer that does not map errors
                await context.abort(e.code, details(e.message))

        return grpc.stream_unary_rpc_method_handler(stream_in, response_serializer=serialize)
    stream_stream = handler.stream_stream
    assert stream_stream is not None

    async def streams(raws: AsyncIterator[bytes], context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
        try:
            async for response in stream_stream(requests(raws), context):
                yield response
        except GatewayError as e:  # ModelStreamInfer answers errors in the stream, but not unparseable frames
            await context.abort(e.code, details(e.message))

    return grpc.stream_stream_rpc_method_handler(streams, response_serializer=serialize)


class ParsingServer:
    """What the generated `add_*Servicer_to_server` calls, with each handler made to parse its requests."""

    def __init__(self, server: grpc.aio.Server) -> None:
        self._server = server

    def add_generic_rpc_handlers(self, handlers: Sequence[Any]) -> None:
        pass  # the same methods arrive in add_registered_method_handlers, where they are wrapped

    def add_registered_method_handlers(self, service: str, handlers: Mapping[str, Any]) -> None:
        checked = {name: _checked(h, f"{service}/{name}") for name, h in handlers.items()}
        self._server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, checked),))
        self._server.add_registered_method_handlers(service, checked)  # type: ignore[attr-defined]


def parsing(server: grpc.aio.Server) -> Any:
    """`server` for the generated add_*Servicer_to_server: its methods answer unparseable requests
    INVALID_ARGUMENT."""
    return ParsingServer(server)

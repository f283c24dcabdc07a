"""Errors that carry their gRPC status code; `service.py` maps them to the wire in one place.

GatewayError              base: a code and a message that tells the caller what to fix
  NotFound                unknown model or version                     -> NOT_FOUND
  InvalidArgument         names, datatypes, shapes, byte counts        -> INVALID_ARGUMENT
  Unavailable             not ready, loading, draining                 -> UNAVAILABLE
  ResourceExhausted       overload: queues full                        -> RESOURCE_EXHAUSTED
  Internal                onnxruntime or other failure on our side     -> INTERNAL (logged with trace)
"""

from __future__ import annotations

import grpc


class GatewayError(Exception):
    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class NotFound(GatewayError):
    code = grpc.StatusCode.NOT_FOUND


class InvalidArgument(GatewayError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class Unavailable(GatewayError):
    code = grpc.StatusCode.UNAVAILABLE


class ResourceExhausted(GatewayError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Internal(GatewayError):
    code = grpc.StatusCode.INTERNAL


class FailedPrecondition(GatewayError):
    """The server's mode does not allow the call (e.g. explicit load while polling)."""

    code = grpc.StatusCode.FAILED_PRECONDITION

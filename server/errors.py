"""Errors that carry their status on both wires: the gRPC code and the HTTP status, declared here once.
`service.py` (gRPC) and `rest.py` (HTTP/REST) each put them on their wire in one place.

GatewayError              base: a code and a message that tells the caller what to fix
  NotFound                unknown model or version                     -> NOT_FOUND           404
  InvalidArgument         names, datatypes, shapes, byte counts        -> INVALID_ARGUMENT    400
  Unavailable             not ready, loading, draining                 -> UNAVAILABLE         503
  ResourceExhausted       overload: queues full; a body too large      -> RESOURCE_EXHAUSTED  429 (413 for a body)
  DeadlineExceeded        the request's deadline passed before its run -> DEADLINE_EXCEEDED   504
  FailedPrecondition      the server's mode refuses the call           -> FAILED_PRECONDITION 400
  Internal                onnxruntime or other failure on our side     -> INTERNAL            500 (logged with trace)
  Unimplemented           a service this gateway was started without   -> UNIMPLEMENTED       501
  Unauthenticated         no bearer token, or not `Bearer <token>`     -> UNAUTHENTICATED     401
  PermissionDenied        a token the call's plane does not hold       -> PERMISSION_DENIED   403
"""

from __future__ import annotations

import grpc


class GatewayError(Exception):
    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN
    http_status: int = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class NotFound(GatewayError):
    code = grpc.StatusCode.NOT_FOUND
    http_status = 404


class InvalidArgument(GatewayError):
    code = grpc.StatusCode.INVALID_ARGUMENT
    http_status = 400


class Unavailable(GatewayError):
    code = grpc.StatusCode.UNAVAILABLE
    http_status = 503


class ResourceExhausted(GatewayError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    http_status = 429


class DeadlineExceeded(GatewayError):
    """The client's deadline (gRPC) or `timeout` parameter (HTTP) passed before the model ran: not run."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED
    http_status = 504


class Internal(GatewayError):
    code = grpc.StatusCode.INTERNAL
    http_status = 500


class FailedPrecondition(GatewayError):
    """The server's mode does not allow the call (e.g. explicit load while polling)."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    http_status = 400


class BodyTooLarge(ResourceExhausted):
    """An HTTP body over the message limit (the same limit as a gRPC message)."""

    http_status = 413


class Unimplemented(GatewayError):
    code = grpc.StatusCode.UNIMPLEMENTED
    http_status = 501


class Unauthenticated(GatewayError):
    """No credentials for a plane that needs a token (server/auth.py); HTTP adds WWW-Authenticate: Bearer."""

    code = grpc.StatusCode.UNAUTHENTICATED
    http_status = 401


class PermissionDenied(GatewayError):
    """A token that is not one of the plane's (server/auth.py)."""

    code = grpc.StatusCode.PERMISSION_DENIED
    http_status = 403

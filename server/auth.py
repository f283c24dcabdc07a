"""Access control: bearer tokens per plane, checked once at each edge; TLS files checked at start.

Three planes, each with its own token file (settings inference_token_file, feedback_token_file,
control_token_file); a plane without one is open:

    inference   GRPCInferenceService: ModelInfer, ModelStreamInfer, metadata, config, statistics, index,
                ModelReady; REST /v2, /v2/models/..., /v2/repository/index
    feedback    onnxgate.v1.Feedback (SendFeedback, StreamFeedback, FeedbackReport); REST .../feedback[/report]
    control     RepositoryModelLoad/Unload (uploads are loads with file: parameters); REST .../load, .../unload
    open        grpc.health.v1.Health, reflection, ServerLive/ServerReady; REST /v2/health/*

A call carries `authorization: Bearer <token>` (gRPC metadata, or the HTTP header). No such header, or
one that is not `Bearer <token>`: UNAUTHENTICATED (HTTP 401 with `WWW-Authenticate: Bearer`); a token
the plane does not hold: PERMISSION_DENIED (HTTP 403). Tokens are compared with hmac.compare_digest,
never logged, and every refusal is counted (onnxgate_requests_total with its code, and
onnxgate_auth_failures_total{protocol,plane,reason}).

A token file holds one token a line (blank lines and '#' comments ignored), so a rotation can overlap:
add the new token, move the clients, remove the old one. The file is re-read when it changes (checked at
most once a second on the request path), so a Kubernetes Secret's update applies without a restart.
"""

from __future__ import annotations

import hmac
import logging
import os
import ssl
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from onnxgate.server.errors import GatewayError, PermissionDenied, Unauthenticated
from onnxgate.server.stats import RequestCounts

log = logging.getLogger(__name__)

PLANES = ("inference", "feedback", "control")
MISSING, MALFORMED, WRONG = "missing", "malformed", "wrong"
CHECK_INTERVAL_S = 1.0

# RPC name -> plane (None: open); an RPC not named here is on the inference plane
RPC_PLANES: dict[str, str | None] = {
    "ServerLive": None,
    "ServerReady": None,
    "RepositoryModelLoad": "control",
    "RepositoryModelUnload": "control",
    "SendFeedback": "feedback",
    "StreamFeedback": "feedback",
    "FeedbackReport": "feedback",
}
OPEN_SERVICES = (
    "grpc.health.v1.Health",
    "grpc.reflection.v1alpha.ServerReflection",
    "grpc.reflection.v1.ServerReflection",
)
FEEDBACK_SERVICE = "onnxgate.v1.Feedback"


class TokenFileError(Exception):
    """A token file that cannot be used at start: the message names the setting and the file."""


class TokenFile:
    """The tokens of one plane, from a file re-read when its identity, size or mtime changes."""

    def __init__(self, setting: str, path: Path, clock: Callable[[], float] = time.monotonic) -> None:
        self.setting = setting
        self.path = path
        self._clock = clock
        self._stamp: tuple[int, int, int] | None = None
        self._checked = 0.0
        try:
            self._tokens = self._read()
        except OSError as e:
            raise TokenFileError(
                f"{setting} {path} cannot be read ({e.strerror or e}): fix the file or unset --{_flag(setting)}"
            ) from None
        if not self._tokens:
            raise TokenFileError(
                f"{setting} {path} holds no token (one a line): add one, or unset --{_flag(setting)} to leave"
                " the plane open"
            )
        self._checked = clock()

    def _read(self) -> tuple[bytes, ...]:
        st = os.stat(self.path)
        stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
        text = self.path.read_bytes()
        self._stamp = stamp
        lines = (line.strip() for line in text.splitlines())
        return tuple(line for line in lines if line and not line.startswith(b"#"))

    def tokens(self) -> tuple[bytes, ...]:
        now = self._clock()
        if now - self._checked >= CHECK_INTERVAL_S:
            self._checked = now
            try:
                st = os.stat(self.path)
                if (st.st_ino, st.st_size, st.st_mtime_ns) != self._stamp:
                    self._tokens = self._read()
                    log.info("%s %s re-read: %d token(s)", self.setting, self.path, len(self._tokens))
            except OSError as e:  # mid-rotation, or removed: keep the tokens we have, look again next second
                log.warning("%s %s cannot be read (%s): keeping its previous tokens", self.setting, self.path, e)
        return self._tokens

    def holds(self, token: bytes) -> bool:
        found = False
        for known in self.tokens():
            found |= hmac.compare_digest(token, known)  # no early exit: the time does not depend on which
        return found


class Auth:
    """The planes' token files, the check both edges make, and the refusal counts."""

    def __init__(self, files: dict[str, TokenFile], answers: RequestCounts) -> None:
        self.files = files
        self.answers = answers
        self.failures: Counter[tuple[str, str, str]] = Counter()  # (protocol, plane, reason)

    @classmethod
    def from_settings(cls, settings: Any, answers: RequestCounts) -> Auth | None:
        """None when no plane has a token file (every plane open: no check at all)."""
        files = {}
        for plane in PLANES:
            path = getattr(settings, f"{plane}_token_file")
            if path is not None:
                files[plane] = TokenFile(f"{plane}_token_file", Path(path))
        return cls(files, answers) if files else None

    def refusal(self, plane: str | None, authorization: bytes | None) -> str | None:
        """None when the call may go on; else the reason (MISSING, MALFORMED or WRONG)."""
        if plane is None:
            return None
        tokens = self.files.get(plane)
        if tokens is None:
            return None
        if authorization is None:
            return MISSING
        scheme, _, token = authorization.strip().partition(b" ")
        token = token.strip()
        if scheme.lower() != b"bearer" or not token:
            return MALFORMED
        return None if tokens.holds(token) else WRONG

    def refuse(self, protocol: str, plane: str, reason: str) -> GatewayError:
        """Count a refusal by reason and return its error (the edge counts the answer with its code)."""
        self.failures[protocol, plane, reason] += 1
        return refusal_error(plane, reason)


def refusal_error(plane: str, reason: str) -> GatewayError:
    """The error a refused call gets: the same code and message on both edges."""
    if reason == MISSING:
        return Unauthenticated(f"the {plane} plane needs a token: send 'authorization: Bearer <token>'")
    if reason == MALFORMED:
        return Unauthenticated(
            f"the {plane} plane needs 'authorization: Bearer <token>' (another scheme, or no token, was sent)"
        )
    return PermissionDenied(f"the token sent is not one of the {plane} plane's tokens")


def grpc_plane(method: str) -> str | None:
    """'/package.Service/Method' -> its plane (None: open)."""
    service, _, rpc = method.lstrip("/").rpartition("/")
    if service in OPEN_SERVICES:
        return None
    if service == FEEDBACK_SERVICE:
        return "feedback"
    return RPC_PLANES.get(rpc, "inference")


def rest_plane(rpc: str) -> str | None:
    """The plane of a REST path, by the RPC it stands for (rest.rpc_of); unknown paths are inference's."""
    return RPC_PLANES.get(rpc, "inference")


class AuthInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]  # generic only in the stubs
    """The gRPC edge's check: before any handler runs; a refused call gets a handler that only aborts."""

    def __init__(self, auth: Auth) -> None:
        self.auth = auth

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler = await continuation(handler_call_details)
        method: str = handler_call_details.method
        plane = grpc_plane(method)
        if handler is None or plane is None:
            return handler
        authorization = None
        for key, value in handler_call_details.invocation_metadata or ():
            if key == "authorization":
                authorization = value.encode("latin-1", "replace") if isinstance(value, str) else value
        reason = self.auth.refusal(plane, authorization)
        if reason is None:
            return handler
        error = self.auth.refuse("grpc", plane, reason)
        self.auth.answers.counts["grpc", method.rpartition("/")[2], error.code.name] += 1
        return _refusing(handler, error.code, error.message)


def _refusing(
    handler: grpc.RpcMethodHandler[Any, Any], code: grpc.StatusCode, message: str
) -> grpc.RpcMethodHandler[Any, Any]:
    async def refuse(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await context.abort(code, message)

    kwargs = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(refuse, **kwargs)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(refuse, **kwargs)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(refuse, **kwargs)
    return grpc.unary_unary_rpc_method_handler(refuse, **kwargs)


class AuthCollector(Collector):
    def __init__(self, auth: Auth) -> None:
        self.auth = auth

    def collect(self) -> Iterator[Metric]:
        failures = CounterMetricFamily(
            "onnxgate_auth_failures",
            "Calls refused for their token, by protocol, plane and reason (missing, malformed, wrong)",
            labels=["protocol", "plane", "reason"],
        )
        for (protocol, plane, reason), n in dict(self.auth.failures).items():
            failures.add_metric([protocol, plane, reason], n)
        yield failures


class TlsError(Exception):
    """TLS files that cannot be used: the message names the settings."""


def check_tls(cert: Path, key: Path, client_ca: Path | None, what: str) -> tuple[bytes, bytes, bytes | None]:
    """Read and check a certificate chain, its key and a client CA; their PEM bytes, or TlsError."""
    names = f"{what}tls_cert_file {cert} and {what}tls_key_file {key}"
    try:
        pems = cert.read_bytes(), key.read_bytes(), client_ca.read_bytes() if client_ca is not None else None
    except OSError as e:
        raise TlsError(f"{e.filename} cannot be read ({e.strerror or e}): fix {what}tls_* files") from None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(cert, key)
    except ssl.SSLError as e:
        raise TlsError(
            f"{names} cannot be used ({e.reason or e}): a PEM certificate chain and the PEM private key that matches it"
        ) from None
    if client_ca is not None:
        try:
            context.load_verify_locations(cafile=client_ca)
        except (ssl.SSLError, ValueError) as e:
            raise TlsError(
                f"{what}tls_client_ca_file {client_ca} is not a PEM CA certificate ({getattr(e, 'reason', e)})"
            ) from None
    return pems


def _flag(setting: str) -> str:
    return setting.replace("_", "-")

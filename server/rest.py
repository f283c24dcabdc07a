"""The HTTP/REST edge: the Open Inference Protocol's REST binding and Triton's HTTP extensions, on
uvicorn (httptools) running a bare ASGI app on the gateway's own event loop, beside grpc.aio.

Chosen by measurement (bench/http_server_choice.py, docs/explanation/benchmarks.md): uvicorn with httptools and no
framework answered 1.2-1.4x the requests/s of aiohttp on the same loop, with the same client.

The same request path as gRPC (inference.py, protocol.py) answers every call, so an answer, its
prediction id and its log record are the same on either protocol. Errors are GatewayErrors mapped to
their HTTP status in one place (`_reply_error`), with the body `{"error": "..."}`. Every answer is counted
by the equivalent gRPC RPC (`rpc_of`) and the gRPC status code (onnxgate_requests_total{protocol="http"}).

    GET  /v2/health/live | /v2/health/ready | /v2 | /v2/models/stats
    GET  /v2/models/{name}[/versions/{v}][/ready|/config|/stats]
    POST /v2/models/{name}[/versions/{v}]/infer
    POST /v2/repository/index | /v2/repository/models/{name}/load | .../unload
    POST /v2/models/{name}/feedback            (one message, or a list of them)
    GET  /v2/models/{name}/feedback/report[?max_unknown_ids=N]
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import math
import socket
import ssl
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, unquote

import uvicorn
from google.protobuf import descriptor as pb_descriptor
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message

from onnxgate.server import protocol
from onnxgate.server.auth import Auth, rest_plane
from onnxgate.server.errors import (
    BodyTooLarge,
    GatewayError,
    Internal,
    InvalidArgument,
    NotFound,
    Unauthenticated,
    Unimplemented,
)
from onnxgate.server.feedback import ACCEPTED, DUPLICATE, PENDING, FeedbackRecord, FeedbackStore, make_record
from onnxgate.server.feedback import truth_tensor as make_truth_tensor
from onnxgate.server.inference import Inference, State
from onnxgate.server.logquery import Report
from onnxgate.server.repository import Repository
from onnxgate.server.rest_tensors import (
    BINARY_TYPE,
    HEADER_LENGTH,
    JSON_TYPE,
    decode_infer,
    encode_infer,
    flatten,
    parse_json,
)
from onnxgate.server.stats import RequestCounts

log = logging.getLogger(__name__)

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
Headers = list[tuple[bytes, bytes]]

STATUS_TEXT: dict[int, str] = {ACCEPTED: "accepted", DUPLICATE: "duplicate", PENDING: "pending"}
# bodies may be JSON, or JSON followed by binary tensors; no header at all is fine too (Triton's clients
# send none); a form or multipart body is a client mistake worth naming (curl -d without -H)
BODY_TYPES = (JSON_TYPE, BINARY_TYPE, "text/plain", "")
FEEDBACK_FIELDS = frozenset(
    {"prediction_id", "model_name", "model_version", "label", "value", "tensors", "reward", "feedback_id",
     "sent_at_unix_ms"}
)  # fmt: skip


class MethodNotAllowed(InvalidArgument):
    http_status = 405


class UnsupportedMediaType(InvalidArgument):
    http_status = 415


class NotImplementedHere(Unimplemented):
    """A service this gateway was started without (feedback without a prediction log)."""

    http_status = 501


@dataclass
class Call:
    method: str
    path: list[str]  # percent-decoded segments after /v2
    query: dict[str, list[str]]
    headers: dict[bytes, bytes]  # lower-case names; the last of repeated headers
    body: bytes


Reply = tuple[int, bytes, Headers]


class RestApp:
    """The ASGI application: read the body within the limit, route, answer, map errors."""

    def __init__(
        self,
        repository: Repository,
        state: State,
        inference: Inference,
        max_body_bytes: int,
        feedback: FeedbackStore | None = None,
        report: Callable[[str, int], Report] | None = None,
        answers: RequestCounts | None = None,
        auth: Auth | None = None,
    ) -> None:
        self.auth = auth  # bearer tokens per plane (server/auth.py); None: every plane open
        self.repository = repository
        self.state = state
        self.inference = inference
        self.max_body_bytes = max_body_bytes
        self.feedback = feedback
        self.report = report
        self.answers = answers if answers is not None else RequestCounts()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # lifespan is off; websockets are not served
            return
        extra: Headers = []
        rpc = "unknown"
        raw_path = scope.get("raw_path") or scope["path"].encode()
        try:
            headers = dict(scope["headers"])
            close = self._body_over_limit(headers)
            if close is not None:  # refused before reading: the connection closes, the body is never read
                status, body, extra = close
                rpc, code = _rpc_of_raw(raw_path), BodyTooLarge.code.name
            else:
                path = _segments(raw_path)
                route = route_of(path)
                rpc = route.rpc
                if self.auth is not None:  # before the body is read
                    self._authorize(rpc, headers)
                call = Call(
                    scope["method"],
                    path,
                    parse_qs(scope.get("query_string", b"").decode("latin-1")),
                    headers,
                    await self._read_body(receive, headers),
                )
                status, body, extra = await self._dispatch(call, route)
                code = "OK" if status < 400 else "UNAVAILABLE"  # 503: not ready (health/ready, model ready)
        except GatewayError as e:
            code = e.code.name
            status, body = _reply_error(e)
            if isinstance(e, BodyTooLarge):
                extra = [(b"connection", b"close")]
            elif isinstance(e, Unauthenticated):
                extra = [(b"www-authenticate", b'Bearer realm="onnxgate"')]
        except Exception as e:
            code = "INTERNAL"
            log.exception("internal error in %s %s", scope.get("method"), scope.get("path"))
            status, body = _reply_error(
                Internal(f"internal error: {type(e).__name__}: {e} (details in the server log)")
            )
        self.answers.counts["http", rpc, code] += 1
        if self.state.draining:  # clients reconnect, to another replica
            extra = [*extra, (b"connection", b"close")]
        content_type = BINARY_TYPE if any(k == b"Inference-Header-Content-Length" for k, _ in extra) else JSON_TYPE
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-type", content_type.encode()), (b"content-length", b"%d" % len(body)), *extra],
            }
        )
        await send({"type": "http.response.body", "body": body})

    def _authorize(self, rpc: str, headers: dict[bytes, bytes]) -> None:
        """Raise the refusal (401/403) when the path's plane needs a token this call does not carry."""
        assert self.auth is not None
        plane = rest_plane(rpc)
        reason = self.auth.refusal(plane, headers.get(b"authorization"))
        if plane is not None and reason is not None:
            raise self.auth.refuse("http", plane, reason)

    def _body_over_limit(self, headers: dict[bytes, bytes]) -> Reply | None:
        declared = headers.get(b"content-length")
        if declared is None or not declared.isdigit() or int(declared) <= self.max_body_bytes:
            return None
        status, body = _reply_error(BodyTooLarge(self._too_large(int(declared))))
        return status, body, [(b"connection", b"close")]

    def _too_large(self, size: int) -> str:
        return (
            f"request body of {size} bytes is over the limit of {self.max_body_bytes} (the gRPC message limit,"
            " --max-message-bytes): send fewer rows per request"
        )

    async def _read_body(self, receive: Receive, headers: dict[bytes, bytes]) -> bytes:
        chunks: list[bytes] = []
        size = 0
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise InvalidArgument("the client went away before sending the whole body")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                raise BodyTooLarge(self._too_large(size))
            chunks.append(chunk)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        encoding = headers.get(b"content-encoding", b"identity").decode("latin-1").strip().lower()
        if encoding in ("gzip", "deflate"):
            body = self._inflate(body, encoding)
        elif encoding != "identity":
            raise UnsupportedMediaType(f"Content-Encoding {encoding!r} is not supported; use gzip, deflate or none")
        return body

    def _inflate(self, body: bytes, encoding: str) -> bytes:
        # bounded: a small compressed body must not become an unbounded one
        inflater = zlib.decompressobj(wbits=31 if encoding == "gzip" else 15)
        try:
            out = inflater.decompress(body, self.max_body_bytes + 1)
        except zlib.error as e:
            raise InvalidArgument(f"the body is not valid {encoding} data: {e}") from None
        if len(out) > self.max_body_bytes or inflater.unconsumed_tail:
            raise BodyTooLarge(self._too_large(len(out)))
        if not inflater.eof:
            raise InvalidArgument(f"the {encoding} body ends early")
        return out

    # -- routing ------------------------------------------------------------------------------

    async def _dispatch(self, call: Call, route: Route) -> Reply:
        """Answer by the RPC the path stands for (`route_of`, the same table the metrics and planes use)."""
        rpc, name, version = route.rpc, route.model, route.version
        if rpc == "ModelInfer":
            return await self._infer(call, name, version)
        if rpc == "SendFeedback":
            return await self._feedback(call, name)
        if rpc in ("RepositoryIndex", "RepositoryModelLoad", "RepositoryModelUnload"):
            return await self._repository(call, rpc, name)
        if rpc == "unknown":
            p = call.path
            if p[:1] == ["models"] and p[2:] == ["versions"]:
                raise NotFound("a path with /versions needs the version number after it")
            where = f"/v2/{'/'.join(p)}"
            if p[:1] == ["repository"]:
                raise NotFound(f"no such path {where}: index, models/NAME/load, models/NAME/unload")
            raise NotFound(f"no such path {where}: see the Open Inference Protocol's REST paths")
        self._get(call)  # everything else reads
        if rpc == "ServerLive":
            return 200, b"", []
        if rpc == "ServerReady":
            if not self.state.ready or self.state.draining:
                return _json(503, {"error": "server is not ready (starting or shutting down)"})
            return 200, b"", []
        if rpc == "ServerMetadata":
            return _message(protocol.server_metadata())
        if rpc == "ModelStatistics":
            return _message(protocol.model_statistics(self.repository, name, version), defaults=True)
        if rpc == "FeedbackReport":
            return await self._report(call, name)
        if rpc == "ModelReady":
            return self._model_ready(name, version)
        if rpc == "ModelConfig":
            return _message(protocol.model_config(self.repository, name, version))
        assert rpc == "ModelMetadata", rpc
        doc = _to_json(protocol.model_metadata(self.repository, name, version))
        columns = self.repository.get(name, version).columns
        if columns is not None:
            # the protocol's metadata has no place for them on gRPC (read the ModelConfig's `columns`
            # parameter there); the REST answer carries them as a `parameters` object
            doc["parameters"] = {"columns": columns.as_json()}
        return _json(200, doc)

    @staticmethod
    def _get(call: Call) -> None:
        """A 405 for anything but GET (or HEAD)."""
        if call.method not in ("GET", "HEAD"):
            raise MethodNotAllowed(f"{call.method} is not allowed here: use GET")

    @staticmethod
    def _post(call: Call) -> None:
        if call.method != "POST":
            raise MethodNotAllowed(f"{call.method} is not allowed here: use POST")
        content_type = call.headers.get(b"content-type", b"").decode("latin-1").split(";")[0].strip().lower()
        if content_type not in BODY_TYPES:
            raise UnsupportedMediaType(
                f"Content-Type {content_type!r} is not accepted: send application/json (curl: -H"
                " 'Content-Type: application/json'), or application/octet-stream with binary tensor data"
            )

    def _model_ready(self, name: str, version: str) -> Reply:
        if protocol.model_ready(self.repository, name, version, self.state.draining):
            return 200, b"", []
        self.repository.get(name, version)  # not served: its NotFound or Unavailable says why
        return _json(503, {"error": "server is shutting down"})

    async def _infer(self, call: Call, name: str, version: str) -> Reply:
        self._post(call)
        header = call.headers.get(HEADER_LENGTH.encode())
        header_length: int | None = None
        if header is not None:
            if not header.strip().isdigit():
                raise InvalidArgument(f"Inference-Header-Content-Length must be a byte count, got {header[:40]!r}")
            header_length = int(header)

        def decode(body: bytes) -> Any:
            return decode_infer(body, header_length, name, version)

        body, json_length = await self.inference.run(call.body, decode, encode_infer)
        if json_length is None:
            return 200, body, []
        return 200, body, [(b"Inference-Header-Content-Length", b"%d" % json_length)]

    async def _repository(self, call: Call, rpc: str, name: str) -> Reply:
        self._post(call)
        doc = parse_json(call.body, "the request body") if call.body.strip() else {}
        if not isinstance(doc, dict):
            raise InvalidArgument("the request body must be a JSON object")
        if rpc == "RepositoryIndex":
            ready = doc.get("ready", False)
            if not isinstance(ready, bool):
                raise InvalidArgument("'ready' must be true or false")
            index = protocol.repository_index(self.repository, ready)
            return _json(200, [_to_json(entry, defaults=True) for entry in index.models])
        parameters = doc.get("parameters", {})
        if not isinstance(parameters, dict):
            raise InvalidArgument("'parameters' must be an object")
        if rpc == "RepositoryModelUnload":
            await self.repository.unload(name)
        else:
            config, files = protocol.load_arguments(_load_parameters(parameters))
            await self.repository.load(name, config, files)
        return 200, b"", []

    # -- feedback -------------------------------------------------------------------------------

    def _store(self) -> FeedbackStore:
        if self.feedback is None:
            raise NotImplementedHere("feedback is off: start the gateway with --predlog-dir to log and join it")
        return self.feedback

    async def _feedback(self, call: Call, model: str) -> Reply:
        self._post(call)
        store = self._store()
        doc = parse_json(call.body, "the feedback body")
        if isinstance(doc, dict):
            record = _feedback_record(doc, model, "the feedback")
            status, feedback_id = await asyncio.wrap_future(store.submit(record))
            return _json(
                200, {"prediction_id": record.prediction_id, "feedback_id": feedback_id, "status": STATUS_TEXT[status]}
            )
        if not isinstance(doc, list) or not doc:
            raise InvalidArgument("the feedback body must be a JSON object, or a non-empty list of them")
        records = []
        for i, item in enumerate(doc):
            if not isinstance(item, dict):
                raise InvalidArgument(f"feedback [{i}] must be a JSON object")
            records.append(_feedback_record(item, model, f"feedback [{i}]"))
        # all checked before any is stored, as a gRPC StreamFeedback that fails leaves nothing half-sent
        results = await asyncio.gather(*(asyncio.wrap_future(store.submit(r)) for r in records), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result
        statuses = [status for status, _ in results]  # type: ignore[misc]
        return _json(
            200,
            {
                "received": len(statuses),
                "accepted": statuses.count(ACCEPTED),
                "duplicate": statuses.count(DUPLICATE),
                "pending": statuses.count(PENDING),
            },
        )

    async def _report(self, call: Call, model: str) -> Reply:
        self._store()
        assert self.report is not None
        raw = call.query.get("max_unknown_ids", ["0"])[-1]
        if not raw.isdigit() or int(raw) > 2**32 - 1:
            raise InvalidArgument(f"max_unknown_ids must be a non-negative integer, got {raw[:40]!r}")
        r = await asyncio.to_thread(self.report, model, int(raw))
        return _json(
            200,
            {
                "predictions": r.predictions,
                "feedback": r.feedback,
                "joined": r.joined,
                "pending": r.pending,
                "unknown": r.unknown,
                "unknown_ids": r.unknown_ids,
                "reused_ids": r.reused_ids,
                "unreadable_segments": len(r.unreadable),
            },
        )


ACCEPTED_READ_S = 0.05  # RestServer.stop: between closing the listener and closing idle connections


class RestServer:
    """uvicorn's server on the running loop: started and stopped by the gateway, never by signals."""

    def __init__(self, app: RestApp, tls: tuple[str, str, str | None] | None = None) -> None:
        # log_config None: uvicorn leaves the process's logging alone
        # tls: (cert, key, client CA or None) files; with a client CA, client certificates are required
        cert, key, client_ca = tls or (None, None, None)
        self._config = uvicorn.Config(
            app, http="httptools", lifespan="off", access_log=False, log_config=None, log_level="warning",
            server_header=False, timeout_keep_alive=75, ssl_certfile=cert, ssl_keyfile=key,
            ssl_ca_certs=client_ca, ssl_cert_reqs=ssl.CERT_REQUIRED if client_ca else ssl.CERT_NONE,
        )  # fmt: skip
        self._server: uvicorn.Server | None = None
        self._ticker: asyncio.Task[None] | None = None
        self.port = 0

    async def start(self, host: str, port: int) -> None:
        """Bind `host:port` (OSError when it cannot be) and serve on the running loop."""
        family, kind, proto, _, address = socket.getaddrinfo(
            host.strip("[]") or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        # proto IPPROTO_TCP (getaddrinfo says so): asyncio sets TCP_NODELAY only on sockets that say TCP,
        # and without it a response's head and body meet Nagle's algorithm and delayed ACKs (40 ms)
        sock = socket.socket(family, kind, proto or socket.IPPROTO_TCP)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
        except OSError:
            sock.close()
            raise
        self.port = sock.getsockname()[1]
        config = self._config
        config.load()
        server = self._server = uvicorn.Server(config)
        server.lifespan = config.lifespan_class(config)
        await server.startup(sockets=[sock])
        # uvicorn's main loop only ticks (the Date header) until should_exit; its signal handling stays off
        self._ticker = asyncio.create_task(server.main_loop())

    async def stop(self, grace_s: float) -> None:
        """Stop accepting, close idle connections, let requests in flight finish within `grace_s`."""
        server = self._server
        if server is None:
            return
        server.should_exit = True
        if self._ticker is not None:
            await self._ticker
        # stop accepting, then give the connections just accepted a moment to read their requests (503
        # while draining): uvicorn's shutdown closes a connection whose request it has not read yet
        for listener in server.servers:
            listener.close()
        await asyncio.sleep(ACCEPTED_READ_S)
        server.config.timeout_graceful_shutdown = max(1, math.ceil(grace_s))
        await server.shutdown()


def _segments(raw_path: bytes) -> list[str]:
    """/v2/a/b%2Fc -> ["a", "b/c"]: split first, then percent-decode, so a name may hold any character."""
    parts = raw_path.split(b"?")[0].split(b"/")
    if len(parts) < 2 or parts[0] != b"" or parts[1] != b"v2":
        raise NotFound("paths start with /v2 (the Open Inference Protocol's REST binding)")
    try:
        segments = [unquote(p.decode("ascii"), errors="strict") for p in parts[2:]]
    except UnicodeError:
        raise InvalidArgument("the path is not valid UTF-8 after percent-decoding") from None
    return segments[:-1] if segments and segments[-1] == "" else segments  # a trailing / is harmless


# the gRPC RPC a REST path stands for: /v2/models/NAME[/versions/V]/<action> and the server-wide paths
_MODEL_RPCS = {"infer": "ModelInfer", "": "ModelMetadata", "ready": "ModelReady", "config": "ModelConfig",
               "stats": "ModelStatistics"}  # fmt: skip
_UNVERSIONED_RPCS = {**_MODEL_RPCS, "feedback": "SendFeedback", "feedback/report": "FeedbackReport"}


@dataclass(frozen=True)
class Route:
    rpc: str  # the RPC the path stands for; "unknown" for no route
    model: str = ""
    version: str = ""


UNKNOWN = Route("unknown")


def route_of(p: list[str]) -> Route:
    """The one routing table: what `_dispatch` answers, what the metrics count and which plane a token needs."""
    if p == ["health", "live"]:
        return Route("ServerLive")
    if p == ["health", "ready"]:
        return Route("ServerReady")
    if not p:
        return Route("ServerMetadata")
    if p == ["models", "stats"]:
        return Route("ModelStatistics")
    if p[0] == "repository":
        if p[1:] == ["index"]:
            return Route("RepositoryIndex")
        if len(p) == 4 and p[1] == "models" and p[2] and p[3] in ("load", "unload"):
            return Route("RepositoryModelLoad" if p[3] == "load" else "RepositoryModelUnload", p[2])
        return UNKNOWN
    if len(p) < 2 or p[0] != "models" or not p[1]:
        return UNKNOWN
    name, rest = p[1], p[2:]
    if rest[:1] == ["versions"]:
        rpc = _MODEL_RPCS.get("/".join(rest[2:])) if len(rest) >= 2 else None
        return Route(rpc, name, rest[1]) if rpc else UNKNOWN
    rpc = _UNVERSIONED_RPCS.get("/".join(rest))
    return Route(rpc, name) if rpc else UNKNOWN


def rpc_of(p: list[str]) -> str:
    """The RPC name a path's answer is counted under; "unknown" for no route."""
    return route_of(p).rpc


def _rpc_of_raw(raw_path: bytes) -> str:
    try:
        return rpc_of(_segments(raw_path))
    except GatewayError:
        return "unknown"


def _reply_error(e: GatewayError) -> tuple[int, bytes]:
    """The one place an error becomes an HTTP answer."""
    if isinstance(e, Internal):
        log.error("internal error: %s", e.message, exc_info=e)
    return e.http_status, json.dumps({"error": e.message}).encode()


def _json(status: int, doc: object) -> Reply:
    return status, json.dumps(doc, separators=(",", ":")).encode(), []


def _message(message: Message, defaults: bool = False) -> Reply:
    return _json(200, _to_json(message, defaults))


def _to_json(message: Message, defaults: bool = False) -> dict[str, Any]:
    """A message in the protocol's JSON form: proto field names, enums by name, and 64-bit integers as
    numbers (as Triton writes them; protobuf's own JSON mapping would quote them)."""
    doc = MessageToDict(message, preserving_proto_field_name=True, always_print_fields_with_no_presence=defaults)
    _unquote_ints(message.DESCRIPTOR, doc)  # type: ignore[arg-type]
    return doc


_INT64 = {pb_descriptor.FieldDescriptor.CPPTYPE_INT64, pb_descriptor.FieldDescriptor.CPPTYPE_UINT64}


def _unquote_ints(descriptor: pb_descriptor.Descriptor, doc: dict[str, Any]) -> None:
    for key, value in doc.items():
        field = descriptor.fields_by_name.get(key)
        if field is None:
            continue
        if field.message_type is not None:
            if field.message_type.GetOptions().map_entry:
                value_field = field.message_type.fields_by_name["value"]
                if value_field.message_type is not None:
                    for item in value.values():
                        _unquote_ints(value_field.message_type, item)
                elif value_field.cpp_type in _INT64:
                    doc[key] = {k: int(v) for k, v in value.items()}
            else:
                for item in value if isinstance(value, list) else [value]:
                    _unquote_ints(field.message_type, item)
        elif field.cpp_type in _INT64:
            doc[key] = [int(v) for v in value] if isinstance(value, list) else int(value)


def _load_parameters(parameters: dict[str, Any]) -> dict[str, object]:
    """REST load parameters -> what protocol.load_arguments takes: `file:` values are base64 text."""
    out: dict[str, object] = {}
    for key, value in parameters.items():
        if key.startswith("file:") and isinstance(value, str):
            try:
                out[key] = base64.b64decode(value, validate=True)
            except (binascii.Error, ValueError):
                raise InvalidArgument(f"load parameter {key!r} must be the file's bytes in base64") from None
        else:
            out[key] = value
    return out


def _feedback_record(doc: dict[str, Any], model: str, what: str) -> FeedbackRecord:
    unknown = sorted(set(doc) - FEEDBACK_FIELDS)
    if unknown:
        raise InvalidArgument(f"{what} has unknown field {unknown[0]!r}; fields: {', '.join(sorted(FEEDBACK_FIELDS))}")
    if doc.get("model_name") not in (None, model):
        raise InvalidArgument(f"{what} names model {doc['model_name']!r} but was sent to model {model!r}")

    def field(key: str, kind: type | tuple[type, ...], expected: str) -> Any:
        value = doc.get(key)
        if value is not None and (not isinstance(value, kind) or isinstance(value, bool)):
            raise InvalidArgument(f"{what}: {key!r} must be {expected}, got {json.dumps(value)[:80]}")
        return value

    tensors = None
    raw_tensors = doc.get("tensors")
    if raw_tensors is not None:
        if not isinstance(raw_tensors, list):
            raise InvalidArgument(f"{what}: 'tensors' must be a list of {{name, datatype, shape, data}}")
        tensors = tuple(_truth(t, f"{what} tensors[{i}]") for i, t in enumerate(raw_tensors))
    sent_at = field("sent_at_unix_ms", int, "an integer (Unix time in ms)")
    return make_record(
        field("prediction_id", str, "a string") or "",
        model=model,
        version=field("model_version", str, "a string") or "",
        label=field("label", str, "a string"),
        value=_number(field("value", (int, float), "a number")),
        tensors=tensors,
        reward=_number(field("reward", (int, float), "a number")),
        feedback_id=field("feedback_id", str, "a string") or "",
        sent_at_ms=sent_at or None,
    )


def _number(x: int | float | None) -> float | None:
    return None if x is None else float(x)


def _truth(t: object, what: str) -> Any:
    if not isinstance(t, dict):
        raise InvalidArgument(f"{what} must be an object with name, datatype, shape and data")
    name, datatype, shape, data = t.get("name"), t.get("datatype"), t.get("shape"), t.get("data")
    if not isinstance(name, str) or not isinstance(datatype, str):
        raise InvalidArgument(f"{what} needs a string 'name' and 'datatype'")
    if not isinstance(shape, list) or not all(type(d) is int for d in shape):
        raise InvalidArgument(f"{what}: 'shape' must be a list of integers")
    flat = flatten(data if isinstance(data, list) else [data])
    if not all(isinstance(x, (int, float)) for x in flat):
        raise InvalidArgument(f"{what}: 'data' must be numbers (true/false count as 1/0)")
    return make_truth_tensor(name, datatype, tuple(shape), tuple(float(x) for x in flat))

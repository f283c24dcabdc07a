"""The gateway's lifecycle: build the gRPC server, load the repository, serve, drain, stop.

gateway = Gateway(settings, repository_root)
await gateway.start()          # binds, loads models, then reports ready
await gateway.stop()           # NOT_SERVING, refuse new work, let in-flight requests finish (drain.py)
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from wsgiref.simple_server import WSGIServer

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection, reflection_pb2

from onnxgate.server.adopt import Adopter, AdoptionCollector
from onnxgate.server.auth import Auth, AuthCollector, AuthInterceptor, TlsError, TokenFileError, check_tls
from onnxgate.server.config import Settings
from onnxgate.server.drain import drain
from onnxgate.server.experiments import Experiments, RoutingCollector
from onnxgate.server.feedback import FeedbackServicer, FeedbackStore
from onnxgate.server.inference import Inference, State
from onnxgate.server.join import Joiner, QualityCollector
from onnxgate.server.logfiles import LogFiles
from onnxgate.server.logquery import Report, report
from onnxgate.server.metrics import gateway_registry, serve_metrics
from onnxgate.server.objectstore import StoreCollector, StoreUnusable, Uploader, log_readers, open_uploader
from onnxgate.server.overload import Limits
from onnxgate.server.pb import feedback_pb2, feedback_pb2_grpc
from onnxgate.server.pb import grpc_service_pb2 as pb
from onnxgate.server.pb import grpc_service_pb2_grpc as pb_grpc
from onnxgate.server.pb.pool import POOL
from onnxgate.server.predlog import PredictionLog, PredLogCollector
from onnxgate.server.preflight import choose, port_error, probe_port
from onnxgate.server.replica_lock import ReplicaInUse, ReplicaLock
from onnxgate.server.repository import Repository
from onnxgate.server.rest import RestApp, RestServer
from onnxgate.server.service import InferenceServicer
from onnxgate.server.stats import RequestCounts
from onnxgate.server.wire import parsing

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
FEEDBACK_SERVICE_NAME = feedback_pb2.DESCRIPTOR.services_by_name["Feedback"].full_name
# the prediction log's writer in the health service (it has no RPCs of its own): NOT_SERVING while it
# cannot write; serving goes on, and so does "" (readiness), since inference does not depend on it
PREDLOG_HEALTH_NAME = "onnxgate.v1.PredictionLog"
# uploads to the object store (server/objectstore.py): NOT_SERVING while they fail
PREDLOG_STORE_HEALTH_NAME = "onnxgate.v1.PredictionLogStore"


class StartupError(Exception):
    """The gateway cannot start for a reason its operator can fix; the message names the setting and how."""


class Gateway:
    def __init__(self, settings: Settings, repository_root: Path) -> None:
        self.settings = settings
        self.state = State(settings.max_inflight)
        self.executor = ThreadPoolExecutor(max_workers=settings.threads, thread_name_prefix="onnxgate-infer")
        self.repository = Repository(
            repository_root,
            self.executor,
            control_mode=settings.model_control_mode,
            intra_op_threads=settings.ort_intra_op_threads,
            default_max_batch_size=settings.default_max_batch_size,
            inline_run_ns=settings.inline_run_us * 1000,
            max_upload_bytes=settings.max_upload_bytes,
            limits=Limits(
                settings.default_max_queued_requests,
                settings.default_max_inflight_rows,
                response_cache_bytes=settings.response_cache_bytes,
            ),
        )
        # answers by protocol, RPC and status code, counted by both edges (onnxgate_requests_total)
        self.answers = RequestCounts()
        self.registry = gateway_registry(self.repository, self.state, self.answers)
        # access control (server/auth.py): TLS files and token files checked before anything starts
        try:
            self.tls = _tls(settings, "")
            self.metrics_tls = _tls(settings, "metrics_")
            self.auth = Auth.from_settings(settings, self.answers)
        except (TlsError, TokenFileError) as e:
            raise StartupError(str(e)) from None
        if self.auth is not None:
            self.registry.register(AuthCollector(self.auth))
        self.registry.register(RoutingCollector(self.repository))
        self.experiments = Experiments(self.repository)
        # the prediction log, feedback and their join (server/predlog.py): only with predlog_dir set
        self.predlog: PredictionLog | None = None
        self.feedback: FeedbackStore | None = None
        self.joiner: Joiner | None = None
        self.replica_lock: ReplicaLock | None = None
        self.uploader: Uploader | None = None
        self.adopter: Adopter | None = None
        predlog_settings = self.predlog_settings = settings.predlog()
        if predlog_settings is not None:
            # before anything reads or recovers the replica directory: one writing process per directory
            try:
                self.replica_lock = ReplicaLock(predlog_settings.replica_dir)
                # an object store: checked, and this replica's sequence numbers raised past what it holds
                self.uploader = open_uploader(predlog_settings)
            except (ReplicaInUse, StoreUnusable) as e:
                raise StartupError(str(e)) from None
            except OSError as e:
                raise StartupError(
                    f"prediction log directory {predlog_settings.log_dir} cannot be used ({e.strerror or e}):"
                    " set --predlog-dir, or --predlog-local-dir with an object store"
                ) from None
            self.predlog = PredictionLog(predlog_settings)
            self.joiner = Joiner(
                log_readers(predlog_settings),
                interval_s=predlog_settings.join_interval_s,
                unknown_after_s=predlog_settings.unknown_after_s,
                window_s=predlog_settings.quality_window_s,
                max_predictions=predlog_settings.join_max_predictions,
                predlog=self.predlog,
            )
            self.feedback = FeedbackStore(predlog_settings, known=self.joiner.known)
            self.joiner.on_feedback = self.feedback.observe
            self.joiner.on_round = self.experiments.on_round
            self.registry.register(PredLogCollector(self.predlog, self.feedback))
            self.registry.register(QualityCollector(self.joiner))
            self.adopter = Adopter(
                predlog_settings.log_dir,
                predlog_settings.replica_id,
                interval_s=predlog_settings.adopt_interval_s,
                uploader=self.uploader,
            )
            self.registry.register(AdoptionCollector(self.adopter))
            if self.uploader is not None:
                self.registry.register(StoreCollector(self.uploader))
        self.health = HealthServicer()
        # one request path for both edges: the same routing, statistics and log records on gRPC and REST
        self.inference = Inference(self.repository, self.state, self.predlog.record if self.predlog else None)
        self.server: grpc.aio.Server | None = None
        self.rest: RestServer | None = None
        self.port = 0
        self.http_port = 0
        self.metrics_port = 0
        self._metrics_server: WSGIServer | None = None
        self._poller: asyncio.Task[None] | None = None
        self._log_watcher: asyncio.Task[None] | None = None
        self._serving = False  # the gRPC server started: only then is there anything to drain

    @property
    def address(self) -> str:
        return f"{self.settings.host}:{self.port}"

    async def start(self) -> None:
        """Bind both ports, then load; a port that cannot be bound raises StartupError (call stop() then)."""
        s = self.settings
        # probe before gRPC binds: a failed bind in gRPC's core only logs a native error line and raises a
        # RuntimeError that does not say why; the probe knows the errno (in use, privileged port, ...)
        # (`onnxgate serve` checked every port before; this one is for a port taken since)
        problem = probe_port("grpc_port", s.host, s.grpc_port)
        if problem is not None:
            raise StartupError(problem)
        # metrics and HTTP bind before gRPC so that a taken port fails with nothing started yet
        if s.metrics_port >= 0:
            try:
                self._metrics_server, self.metrics_port = serve_metrics(
                    self.registry, s.metrics_host or s.host, s.metrics_port, self.metrics_tls
                )
            except OSError as e:
                raise StartupError(port_error("metrics_port", s.metrics_host or s.host, s.metrics_port, e)) from None
        if s.http_port >= 0:
            app = RestApp(
                self.repository,
                self.state,
                self.inference,
                s.max_message_bytes,
                self.feedback,
                self._report if self.feedback is not None else None,
                answers=self.answers,
                auth=self.auth,
            )
            self.rest = RestServer(app, self.tls)
            try:
                await self.rest.start(s.host, s.http_port)
            except OSError as e:
                self.rest = None
                raise StartupError(port_error("http_port", s.host, s.http_port, e)) from None
            self.http_port = self.rest.port
        options = [
            ("grpc.max_receive_message_length", s.max_message_bytes),
            ("grpc.max_send_message_length", s.max_message_bytes),
            ("grpc.so_reuseport", 0),
        ]
        interceptors = [AuthInterceptor(self.auth)] if self.auth is not None else []
        self.server = grpc.aio.server(options=options, interceptors=interceptors)
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(  # type: ignore[no-untyped-call]
            InferenceServicer(self.repository, self.state, self.inference, self.answers), parsing(self.server)
        )
        services = [SERVICE_NAME, health.SERVICE_NAME]
        if self.feedback is not None and self.joiner is not None:
            feedback_pb2_grpc.add_FeedbackServicer_to_server(  # type: ignore[no-untyped-call]
                FeedbackServicer(self.feedback, self._report, self.answers), parsing(self.server)
            )
            services.append(FEEDBACK_SERVICE_NAME)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        _add_to_pool(health_pb2)
        _add_to_pool(reflection_pb2)
        if s.reflection:
            reflection.enable_server_reflection([*services, reflection.SERVICE_NAME], self.server, pool=POOL)
        try:
            if self.tls is not None:
                cert, key, client_ca = self.tls
                credentials = grpc.ssl_server_credentials(
                    [(Path(key).read_bytes(), Path(cert).read_bytes())],
                    root_certificates=Path(client_ca).read_bytes() if client_ca else None,
                    require_client_auth=client_ca is not None,
                )
                self.port = self.server.add_secure_port(f"{s.host}:{s.grpc_port}", credentials)
            else:
                self.port = self.server.add_insecure_port(f"{s.host}:{s.grpc_port}")
        except RuntimeError:  # taken between the probe and here
            self.port = 0
        if self.port == 0:
            raise StartupError(
                f"grpc_port {s.grpc_port} on {s.host} cannot be bound (GRPC_VERBOSITY=debug says why):"
                f" {choose('grpc_port')}"
            )
        await self.server.start()
        self._serving = True
        if self.joiner is not None:
            # one join before serving: feedback for a prediction logged before a restart is ACCEPTED at once
            await asyncio.to_thread(self.joiner.run_once)
            self.joiner.start()
        if self.uploader is not None:
            self.uploader.start()
        if self.adopter is not None:
            self.adopter.start()
        # bind first, then load: liveness answers while a large repository loads, readiness waits
        if s.model_control_mode == "explicit":
            await self.repository.load_all(list(s.load_model))
        else:
            await self.repository.load_all()
        if s.model_control_mode == "poll":
            self._poller = asyncio.create_task(self.repository.poll_forever(s.poll_interval_s))
        if self.predlog is not None:
            self._log_watcher = asyncio.create_task(self._watch_log_health())
        self.state.ready = True
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info(
            "serving gRPC on %s (HTTP/REST port %s, metrics port %s)",
            self.address,
            self.http_port or "off",
            self.metrics_port or "off",
        )

    async def stop(self, grace_s: float | None = None, drain_s: float | None = None, *, stop_grpc: bool = True) -> None:
        """The drain (server/drain.py): health NOT_SERVING and new requests refused at once; both ports
        open for the drain phase (`drain_s`, default --drain-delay-s); requests in flight finish within
        `grace_s` (default --shutdown-grace-s); then the HTTP server stops and the log writers flush and
        close. The gRPC server stops too unless `stop_grpc` is False: `onnxgate serve` exits with it
        still answering UNAVAILABLE, since grpc's own stop cancels calls not yet handed to a handler."""
        start = time.monotonic()
        grace = self.settings.shutdown_grace_s if grace_s is None else grace_s
        delay = self.settings.drain_delay_s if drain_s is None else drain_s
        self.state.draining = True
        await self.health.enter_graceful_shutdown()
        for task in (self._poller, self._log_watcher):
            if task is not None:
                task.cancel()
        if self._serving:  # a start that failed half-way served nothing: no drain phase to wait or report
            await drain(self.state, drain_s=min(delay, grace), deadline=start + grace)
        left = max(0.0, start + grace - time.monotonic())
        if self.rest is not None:
            await self.rest.stop(left)
        if stop_grpc and self.server is not None:
            await self.server.stop(left)
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()
        self.executor.shutdown(wait=False, cancel_futures=True)
        # after the drain: every answered prediction is queued; write it, roll the segments
        # the uploader last: its final pass uploads what the writers rolled at their close
        for closable in (self.adopter, self.joiner, self.feedback, self.predlog, self.uploader):
            if closable is not None:
                await asyncio.to_thread(closable.close)
        if self.replica_lock is not None:  # last: every segment is rolled and closed
            self.replica_lock.release()

    def _report(self, model: str, max_ids: int) -> Report:
        """FeedbackReport: exact counts over the log's files, where every reader reads them (the local
        directory, or the object store), with DuckDB held to a small share of the serving process."""
        assert self.predlog_settings is not None
        s = self.predlog_settings
        location = s.store_uri or s.log_dir
        return report(
            LogFiles.at(location),
            model,
            unknown_after_s=s.unknown_after_s,
            max_ids=max_ids,
            memory_limit="256MB",
            threads=1,
        )

    async def _watch_log_health(self, period_s: float = 1.0) -> None:
        """Mirror the log writers' health into the gRPC health service (the writers run on threads)."""
        shown: dict[str, bool] = {}
        while True:
            for name, writer in (
                (FEEDBACK_SERVICE_NAME, self.feedback),
                (PREDLOG_HEALTH_NAME, self.predlog),
                (PREDLOG_STORE_HEALTH_NAME, self.uploader),
            ):
                if writer is not None and shown.get(name) != writer.healthy:
                    shown[name] = writer.healthy
                    serving = health_pb2.HealthCheckResponse.SERVING
                    await self.health.set(name, serving if shown[name] else health_pb2.HealthCheckResponse.NOT_SERVING)
            await asyncio.sleep(period_s)

    async def wait(self) -> None:
        assert self.server is not None
        await self.server.wait_for_termination()


def _tls(settings: Settings, prefix: str) -> tuple[str, str, str | None] | None:
    """The checked (cert, key, client CA) file names of the gRPC/HTTP ports ("") or the metrics port."""
    cert, key = getattr(settings, f"{prefix}tls_cert_file"), getattr(settings, f"{prefix}tls_key_file")
    if cert is None or key is None:
        return None
    client_ca = getattr(settings, f"{prefix}tls_client_ca_file")
    check_tls(cert, key, client_ca, prefix)
    return str(cert), str(key), str(client_ca) if client_ca is not None else None


def _add_to_pool(module: object) -> None:
    # reflection answers from onnxgate's pool (see proto/generate.py); the health service's
    # descriptors live in protobuf's default pool, so copy its file in for grpcurl and friends
    descriptor = module.DESCRIPTOR  # type: ignore[attr-defined]
    try:
        POOL.FindFileByName(descriptor.name)
    except KeyError:
        POOL.AddSerializedFile(descriptor.serialized_pb)

"""One frozen, typed settings object, from defaults < config file (TOML) < ONNXGATE_* env < CLI flags.

Every setting is declared once in `Settings`; the CLI flags and environment variable names are
derived from the field names (`grpc_port` -> `--grpc-port`, `ONNXGATE_GRPC_PORT`), and values from
every source are converted and checked by the same code, so a bad value gets the same clear error
wherever it came from.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from onnxgate.server.predlog import PredLogSettings

CONTROL_MODES = ("none", "poll", "explicit")
LOG_LEVELS = ("debug", "info", "warning", "error")
EVENT_LOOPS = ("auto", "uvloop", "asyncio")


class SettingsError(Exception):
    """Settings with bad values: one line per problem, each naming the setting, its source and what is
    allowed. All problems are found before one is raised, so an operator fixes them in one round."""

    def __init__(self, *problems: str) -> None:
        super().__init__("\n".join(problems))
        self.problems = list(problems)


@dataclass(frozen=True)
class Settings:
    model_repository: Path | None = field(default=None, metadata={"help": "model repository directory"})
    example: bool = field(
        default=False, metadata={"help": "build (if absent) and serve the embedded example repository"}
    )
    host: str = field(default="127.0.0.1", metadata={"help": "address to listen on (0.0.0.0 in a container)"})
    grpc_port: int = field(default=8001, metadata={"help": "gRPC port (0: any free port)"})
    http_port: int = field(
        default=8000, metadata={"help": "HTTP/REST port of the same protocol (0: any free port, -1: off)"}
    )
    metrics_port: int = field(default=8002, metadata={"help": "Prometheus /metrics port (0: any free port, -1: off)"})
    # access control (server/auth.py, docs/guides/security.md)
    tls_cert_file: Path | None = field(
        default=None, metadata={"help": "PEM certificate chain: TLS on the gRPC and HTTP/REST ports (with the key)"}
    )
    tls_key_file: Path | None = field(default=None, metadata={"help": "PEM private key of tls_cert_file"})
    tls_client_ca_file: Path | None = field(
        default=None, metadata={"help": "PEM CA: mutual TLS, clients must present a certificate it signed"}
    )
    metrics_host: str = field(default="", metadata={"help": "address the metrics port listens on (empty: host)"})
    metrics_tls_cert_file: Path | None = field(
        default=None, metadata={"help": "PEM certificate chain: TLS on the metrics port (with the key)"}
    )
    metrics_tls_key_file: Path | None = field(
        default=None, metadata={"help": "PEM private key of metrics_tls_cert_file"}
    )
    metrics_tls_client_ca_file: Path | None = field(
        default=None, metadata={"help": "PEM CA: scrapers of the metrics port must present a certificate it signed"}
    )
    inference_token_file: Path | None = field(
        default=None,
        metadata={"help": "bearer tokens (one a line, re-read on change) for inference, metadata, index (unset: open)"},
    )
    feedback_token_file: Path | None = field(
        default=None, metadata={"help": "bearer tokens for feedback and its report (unset: open)"}
    )
    control_token_file: Path | None = field(
        default=None, metadata={"help": "bearer tokens for model load/unload and uploads (unset: open)"}
    )
    reflection: bool = field(default=True, metadata={"help": "serve gRPC reflection (for grpcurl)"})
    model_control_mode: str = field(
        default="none",
        metadata={"help": "none: load all at start; poll: also watch the repository; explicit: load/unload by RPC"},
    )
    poll_interval_s: float = field(default=5.0, metadata={"help": "seconds between repository scans in poll mode"})
    load_model: tuple[str, ...] = field(
        default=(), metadata={"help": "models to load at start in explicit mode (repeatable)"}
    )
    max_message_bytes: int = field(
        default=256 * 1024 * 1024, metadata={"help": "largest gRPC message accepted or sent"}
    )
    max_upload_bytes: int = field(
        default=256 * 1024 * 1024,
        metadata={"help": "largest model upload (RepositoryModelLoad files and config, in all) accepted"},
    )
    max_inflight: int = field(default=1024, metadata={"help": "requests in flight before RESOURCE_EXHAUSTED"})
    default_max_queued_requests: int = field(
        default=256,
        metadata={
            "help": "requests in flight per model version before RESOURCE_EXHAUSTED (0: no limit; a model's"
            " config.pbtxt parameter max_queued_requests overrides it)"
        },
    )
    default_max_inflight_rows: int = field(
        default=65536,
        metadata={"help": "batch rows in flight per model version (0: no limit; parameter max_inflight_rows)"},
    )
    response_cache_bytes: int = field(
        default=64 * 1024 * 1024,
        metadata={
            "help": "bound of the response cache of each model version whose config.pbtxt has"
            " response_cache { enable: true }, in bytes of cached outputs (0: no caching)"
        },
    )
    inference_threads: int = field(default=0, metadata={"help": "threads running onnxruntime (0: one per core)"})
    ort_intra_op_threads: int = field(default=1, metadata={"help": "onnxruntime threads inside one run"})
    inline_run_us: int = field(
        default=150,
        metadata={"help": "runs predicted shorter than this (us) stay on the event loop; 0: all on threads"},
    )
    default_max_batch_size: int = field(
        default=1024, metadata={"help": "max_batch_size given to batchable models without config"}
    )
    shutdown_grace_s: float = field(
        default=10.0, metadata={"help": "seconds after SIGTERM that requests in flight get to finish"}
    )
    drain_delay_s: float = field(
        default=5.0,
        metadata={
            "help": "seconds after SIGTERM that both ports stay open answering UNAVAILABLE/503, for load balancers"
            " to move clients away (within the grace; over early after 2 s without requests; 0: none)"
        },
    )
    log_level: str = field(default="info", metadata={"help": "debug, info, warning or error"})
    event_loop: str = field(
        default="auto",
        metadata={
            "help": "the serving process's event loop: uvloop, asyncio, or auto (uvloop where it is installed;"
            " ~10% more gRPC requests/s than asyncio's, docs/explanation/profile.md)"
        },
    )
    # the prediction log and feedback (server/predlog.py): off unless predlog_dir is set
    # a string, not a Path: an object-store URI (s3://bucket/prefix) must keep its '//'
    predlog_dir: str | None = field(
        default=None,
        metadata={
            "help": "prediction log: a directory shared by replicas, or an s3://, gs:// or abfs:// URI"
            " (unset: no log, no feedback)"
        },
    )
    predlog_local_dir: Path | None = field(
        default=None,
        metadata={
            "help": "with an object-store predlog_dir: the local write-ahead directory (open segments, uploads"
            " waiting; unset: ~/.cache/onnxgate/predlog-wal)"
        },
    )
    predlog_adopt_interval_s: float = field(
        default=30.0, metadata={"help": "seconds between looks for segments that dead replicas left open (0: never)"}
    )
    predlog_replica_id: str = field(
        default="", metadata={"help": "this replica's subdirectory of the log (empty: hostname-pid-random)"}
    )
    predlog_queue_size: int = field(default=10_000, metadata={"help": "predictions queued for the log before drops"})
    predlog_flush_records: int = field(default=1_000, metadata={"help": "write the log every N predictions"})
    predlog_flush_ms: float = field(default=200.0, metadata={"help": "... or T ms after the first unwritten one"})
    predlog_retention_s: float = field(default=7 * 24 * 3600.0, metadata={"help": "delete log segments older than"})
    predlog_retention_bytes: int = field(
        default=0, metadata={"help": "... and the oldest while a directory's segments exceed this (0: no limit)"}
    )
    predlog_segment_max_bytes: int = field(
        default=64 * 1024 * 1024, metadata={"help": "roll the open log segment to Parquet at this size"}
    )
    predlog_segment_max_age_s: float = field(default=300.0, metadata={"help": "... or this long after it opened"})
    predlog_sample_rate: tuple[str, ...] = field(
        default=(), metadata={"help": "MODEL=RATE (0-1) fractions of predictions logged; '*' for the default"}
    )
    predlog_log: tuple[str, ...] = field(
        default=(), metadata={"help": "MODEL=inputs|outputs|both: what is logged (default both)"}
    )
    predlog_exclude_inputs: tuple[str, ...] = field(
        default=(), metadata={"help": "MODEL:INPUT inputs never logged (personal data)"}
    )
    predlog_join_interval_s: float = field(default=5.0, metadata={"help": "seconds between quality-metric joins"})
    predlog_quality_window_s: float = field(
        default=3600.0, metadata={"help": "the quality metrics cover predictions of this many seconds (the newest)"}
    )
    predlog_join_max_predictions: int = field(
        default=500_000, metadata={"help": "predictions the live join keeps at most (memory bound)"}
    )
    predlog_unknown_after_s: float = field(
        default=300.0, metadata={"help": "feedback without its prediction after this long is reported unknown"}
    )

    def __post_init__(self) -> None:
        found: list[str] = []

        def _check(ok: bool, name: str, value: object, allowed: str) -> None:
            if not ok:
                found.append(f"setting {name} = {value!r} is invalid: expected {allowed}")

        _check(
            self.model_control_mode in CONTROL_MODES,
            "model_control_mode",
            self.model_control_mode,
            f"one of {', '.join(CONTROL_MODES)}",
        )
        _check(self.log_level in LOG_LEVELS, "log_level", self.log_level, f"one of {', '.join(LOG_LEVELS)}")
        _check(self.event_loop in EVENT_LOOPS, "event_loop", self.event_loop, f"one of {', '.join(EVENT_LOOPS)}")
        _check(0 <= self.grpc_port <= 65535, "grpc_port", self.grpc_port, "a port number 0-65535")
        _check(-1 <= self.http_port <= 65535, "http_port", self.http_port, "a port number 0-65535, or -1 for off")
        _check(
            -1 <= self.metrics_port <= 65535, "metrics_port", self.metrics_port, "a port number 0-65535, or -1 for off"
        )
        for prefix in ("", "metrics_"):
            cert, key = getattr(self, f"{prefix}tls_cert_file"), getattr(self, f"{prefix}tls_key_file")
            if (cert is None) != (key is None):
                found.append(f"{prefix}tls_cert_file and {prefix}tls_key_file go together: set both, or neither")
            if cert is None and getattr(self, f"{prefix}tls_client_ca_file") is not None:
                found.append(
                    f"{prefix}tls_client_ca_file needs TLS: set {prefix}tls_cert_file and {prefix}tls_key_file too"
                )
        _check(self.poll_interval_s > 0, "poll_interval_s", self.poll_interval_s, "a positive number of seconds")
        _check(self.max_message_bytes >= 4096, "max_message_bytes", self.max_message_bytes, "at least 4096")
        _check(self.max_upload_bytes >= 1, "max_upload_bytes", self.max_upload_bytes, "at least 1 byte")
        _check(self.max_inflight >= 1, "max_inflight", self.max_inflight, "at least 1")
        for name in ("default_max_queued_requests", "default_max_inflight_rows"):
            _check(getattr(self, name) >= 0, name, getattr(self, name), "0 or more (0: no limit)")
        _check(self.response_cache_bytes >= 0, "response_cache_bytes", self.response_cache_bytes, "0 or more (0: off)")
        _check(self.inference_threads >= 0, "inference_threads", self.inference_threads, "0 or more")
        _check(self.ort_intra_op_threads >= 1, "ort_intra_op_threads", self.ort_intra_op_threads, "at least 1")
        _check(self.inline_run_us >= 0, "inline_run_us", self.inline_run_us, "0 or more microseconds")
        _check(self.default_max_batch_size >= 0, "default_max_batch_size", self.default_max_batch_size, "0 or more")
        _check(self.shutdown_grace_s >= 0, "shutdown_grace_s", self.shutdown_grace_s, "0 or more seconds")
        _check(self.drain_delay_s >= 0, "drain_delay_s", self.drain_delay_s, "0 or more seconds")
        window = self.predlog_quality_window_s
        _check(window > 0, "predlog_quality_window_s", window, "a positive number of seconds")
        _check(
            self.predlog_join_max_predictions >= 1,
            "predlog_join_max_predictions",
            self.predlog_join_max_predictions,
            "at least 1",
        )
        if self.predlog_dir is not None:
            try:
                self.predlog()  # checks the per-model entries now, with the other settings
            except SettingsError as e:
                found += e.problems
        if self.model_repository is None and not self.example:
            found.append(
                "no model repository: pass --model-repository DIR (or ONNXGATE_MODEL_REPOSITORY), or --example"
            )
        if found:
            raise SettingsError(*found)

    @property
    def threads(self) -> int:
        return self.inference_threads or os.cpu_count() or 1

    def predlog(self) -> PredLogSettings | None:
        """The prediction log's settings; None when it is off."""
        if self.predlog_dir is None:
            return None
        from onnxgate.server.predlog import predlog_settings

        try:
            return predlog_settings(self)
        except ValueError as e:
            raise SettingsError(f"prediction log settings: {e}") from None


FIELDS = {f.name: f for f in dataclasses.fields(Settings)}


def env_name(name: str) -> str:
    return f"ONNXGATE_{name.upper()}"


def load_settings(
    config_file: Path | None = None,
    env: Mapping[str, str] | None = None,
    flags: Mapping[str, Any] | None = None,
) -> Settings:
    """Merge the sources; `flags` holds only the flags given on the command line."""
    values: dict[str, Any] = {}
    found: list[str] = []  # every bad value from every source, reported together

    def take(name: str, value: Any, source: str) -> None:
        try:
            values[name] = _convert(name, value, source)
        except SettingsError as e:
            found.extend(e.problems)

    env = os.environ if env is None else env
    config_file = config_file or (Path(env["ONNXGATE_CONFIG"]) if env.get("ONNXGATE_CONFIG") else None)
    if config_file is not None:
        for key, value in _read_config(config_file).items():
            take(key.replace("-", "_"), value, f"config file {config_file}")
    for name in FIELDS:
        if env_name(name) in env:
            take(name, env[env_name(name)], f"environment variable {env_name(name)}")
    for name, value in (flags or {}).items():
        take(name, value, f"flag --{name.replace('_', '-')}")
    try:
        settings = Settings(**values)
    except SettingsError as e:
        raise SettingsError(*found, *e.problems) from None
    except TypeError as e:
        raise SettingsError(*found, str(e)) from e
    if found:
        raise SettingsError(*found)
    return settings


def _read_config(path: Path) -> dict[str, Any]:
    where = "fix it, or point --config (ONNXGATE_CONFIG) elsewhere"
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise SettingsError(f"config file {path} cannot be read ({e.strerror or e}): {where}") from None
    except UnicodeDecodeError:
        raise SettingsError(f"config file {path} is not UTF-8 text (TOML expected): {where}") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise SettingsError(f"config file {path} is not valid TOML ({e}): {where}") from None


def _convert(name: str, value: Any, source: str) -> Any:
    if name not in FIELDS:
        raise SettingsError(f"{source}: unknown setting {name!r}; known settings: {', '.join(FIELDS)}")
    kind = _base_type(typing.get_type_hints(Settings)[name])
    try:
        if kind is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError("expected true or false")
        if kind is tuple:
            items = value if isinstance(value, list | tuple) else [s for s in str(value).split(",") if s]
            return tuple(str(s) for s in items)
        if kind is Path:
            return Path(value).expanduser()
        if kind is int and isinstance(value, float | bool):
            raise ValueError("expected a whole number")
        return kind(value)
    except (TypeError, ValueError) as e:
        raise SettingsError(f"{source}: setting {name} = {value!r} is not a valid {kind.__name__}: {e}") from None


def _base_type(hint: Any) -> type:
    origin = typing.get_origin(hint)
    if origin in (types.UnionType, typing.Union):
        return _base_type(next(a for a in typing.get_args(hint) if a is not type(None)))
    if origin is tuple:
        return tuple
    return typing.cast(type, hint)

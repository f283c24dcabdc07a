"""The model repository: `<root>/<model>/<version>/model.onnx`, scanned, loaded, swapped, polled.

A new version is loaded and warmed in a worker thread, then published by replacing the model's
`Served` snapshot in one dict assignment; requests already running keep the `ModelVersion` they
hold and finish on it. A version that fails to load is reported in the index with its reason, and
the versions served before keep serving. Load, unload and polling take one asyncio lock, so the
repository changes one step at a time.
"""

from __future__ import annotations

import asyncio
import logging
import re
import shutil
import uuid
from collections import Counter
from collections.abc import Mapping
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path

import onnxruntime as ort
from google.protobuf import text_format

from onnxgate.server.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable
from onnxgate.server.model import ModelVersion
from onnxgate.server.modelspec import (
    CONFIG_FILE,
    ConfigError,
    ModelSpec,
    Unsupported,
    build_spec,
    config_from_json,
    read_config,
    version_policy,
)
from onnxgate.server.pb import model_config_pb2 as mc
from onnxgate.server.routing import Router, check_versions, routing_config
from onnxgate.server.runtime import OnnxModel

log = logging.getLogger(__name__)

MODEL_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
NAME_MAX = 255  # a directory name's bytes on the file systems we run on: longer ones fail with ENAMETOOLONG
UPLOAD_FILE = re.compile(r"^(?:(\d+)/)?([A-Za-z0-9_][A-Za-z0-9_.-]*)$")
Fingerprint = tuple[tuple[str, int, int], ...]
# why a load failed, for onnxgate_model_load_failures_total (failure_reason): a small fixed set
LOAD_FAILURE_REASONS = ("invalid_model", "invalid_config", "unsupported", "io_error", "other")
_ORT = ort.capi.onnxruntime_pybind11_state


@dataclass(frozen=True)
class IndexEntry:
    name: str
    version: str
    state: str  # READY, UNAVAILABLE
    reason: str


@dataclass(frozen=True)
class Served:
    """One model's serving state; replaced whole, never changed in place (readers hold no lock)."""

    name: str
    versions: Mapping[int, ModelVersion]
    fingerprints: Mapping[int, Fingerprint]
    failures: Mapping[int, str] = field(default_factory=dict)
    error: str = ""  # model-level failure, e.g. a config.pbtxt that does not parse
    router: Router | None = None  # which version answers a request naming none (server/routing.py)
    config_fp: Fingerprint = ()  # the model-level config.pbtxt when loaded: a rollback's pin lasts while it does

    @property
    def latest(self) -> ModelVersion | None:
        return self.versions[max(self.versions)] if self.versions else None

    @property
    def spec(self) -> ModelSpec | None:
        latest = self.latest
        return latest.spec if latest else None


class Repository:
    def __init__(
        self,
        root: Path,
        executor: Executor,
        *,
        control_mode: str,
        intra_op_threads: int,
        default_max_batch_size: int,
        inline_run_ns: int = 0,
    ) -> None:
        self.root = root
        self.control_mode = control_mode
        self._executor = executor
        self._intra_op_threads = intra_op_threads
        self._default_max_batch_size = default_max_batch_size
        self._inline_run_ns = inline_run_ns
        self._models: dict[str, Served] = {}
        self._lock = asyncio.Lock()
        # for the metrics: failed load attempts by (model, reason), polls and polls that raised
        self.load_failures: Counter[tuple[str, str]] = Counter()
        self.polls = 0
        self.poll_errors = 0

    # -- reads (hot path: no lock, no I/O) -------------------------------------------------

    def get(self, name: str, version: str = "") -> ModelVersion:
        served = self._models.get(name)
        if served is None or not served.versions:
            raise self._not_serving(name, served)
        if not version:
            latest = served.latest
            assert latest is not None
            return latest
        try:
            number = int(version)
        except ValueError:
            raise InvalidArgument(
                f"model version {version!r} is not an integer; send '' for the served version"
            ) from None
        found = served.versions.get(number)
        if found is None:
            raise NotFound(
                f"model {name!r} has no version {number} being served; served versions: "
                f"{', '.join(map(str, sorted(served.versions)))}"
            )
        return found

    def route(self, name: str) -> tuple[ModelVersion, str, float, Router | None]:
        """The version answering a request that names none: (version, route, propensity, router)."""
        served = self._models.get(name)
        if served is None or not served.versions:
            raise self._not_serving(name, served)
        router = served.router
        if router is None:
            latest = served.latest
            assert latest is not None
            return latest, "latest", 1.0, None
        version, route, propensity = router.choose()
        return version, route, propensity, router

    def served(self, name: str) -> Served:
        served = self._models.get(name)
        if served is None or not served.versions:
            raise self._not_serving(name, served)
        return served

    def _not_serving(self, name: str, served: Served | None) -> Exception:
        if served is not None:
            reasons = served.error or "; ".join(f"version {v}: {r}" for v, r in sorted(served.failures.items()))
            return Unavailable(f"model {name!r} is not ready: {reasons or 'no version loaded'}")
        # only a valid name is looked up on disk: '..', '/etc' or 5000 characters are simply unknown
        if self.control_mode == "explicit" and _valid_name(name) and (self.root / name).is_dir():
            return Unavailable(
                f"model {name!r} is in the repository but not loaded; load it with RepositoryModelLoad"
                f" (HTTP: POST /v2/repository/models/{name}/load)"
            )
        known = ", ".join(sorted(self._models)) or "none"
        return NotFound(f"unknown model {name!r}; models served: {known}")

    def all_served(self) -> list[Served]:
        return [s for s in self._models.values() if s.versions]

    def all_models(self) -> list[Served]:
        """Every model the repository has tried to load, served or not."""
        return list(self._models.values())

    def index(self, ready_only: bool = False) -> list[IndexEntry]:
        entries = []
        names = set(self._models) | set(self._names_on_disk())
        for name in sorted(names):
            served = self._models.get(name)
            if served is None:
                entries.append(IndexEntry(name, "", "UNAVAILABLE", "unloaded"))
                continue
            if served.error:
                entries.append(IndexEntry(name, "", "UNAVAILABLE", served.error))
            for version in sorted(set(served.versions) | set(served.failures)):
                if version in served.versions:
                    entries.append(IndexEntry(name, str(version), "READY", ""))
                else:
                    entries.append(IndexEntry(name, str(version), "UNAVAILABLE", served.failures[version]))
        return [e for e in entries if e.state == "READY"] if ready_only else entries

    # -- changes (serialised by the lock) --------------------------------------------------

    async def load_all(self, names: list[str] | None = None) -> None:
        async with self._lock:
            for name in names if names is not None else self._names_on_disk():
                await self._load_model(name)

    async def poll_once(self) -> None:
        self.polls += 1
        try:
            async with self._lock:
                on_disk = set(self._names_on_disk())
                for name in sorted(on_disk):
                    await self._load_model(name)
                for name in set(self._models) - on_disk:
                    log.info("model %s removed from the repository: unloaded", name)
                    del self._models[name]
        except Exception:
            self.poll_errors += 1
            raise

    async def poll_forever(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.poll_once()
            except Exception:  # a bad scan must not end polling for good
                log.exception("repository poll failed")

    async def load(self, name: str, config_json: str | None, files: Mapping[str, bytes]) -> None:
        if self.control_mode == "poll":
            raise FailedPrecondition(
                "explicit model load is refused while the repository is polled (model control mode 'poll')"
            )
        _check_model_name(name)
        async with self._lock:
            if files or config_json is not None:
                await asyncio.to_thread(self._write_model_dir, name, config_json, files)
            if not (self.root / name).is_dir():
                raise NotFound(f"no model directory {name!r} in the repository {self.root}")
            served = await self._load_model(name)
        if not served.versions:
            raise Unavailable(f"model {name!r} failed to load: {served.error or dict(served.failures)}")
        if served.error:  # e.g. a bad routing config: the versions loaded before serve on, unchanged
            raise FailedPrecondition(f"model {name!r} failed to load: {served.error}; what was served is kept")

    async def unload(self, name: str) -> None:
        if self.control_mode == "poll":
            raise FailedPrecondition(
                "explicit model unload is refused while the repository is polled (model control mode 'poll')"
            )
        async with self._lock:
            if self._models.pop(name, None) is None:
                raise NotFound(f"model {name!r} is not loaded")
            log.info("model %s unloaded", name)

    def _names_on_disk(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and MODEL_NAME.match(p.name))

    async def _load_model(self, name: str) -> Served:
        model_dir = self.root / name
        previous = self._models.get(name) or Served(name, {}, {})
        config_path = model_dir / CONFIG_FILE
        try:
            model_config = read_config(config_path) if config_path.is_file() else None
            routing = routing_config(name, model_config)
        except ConfigError as e:
            self.load_failures[name, failure_reason(e)] += 1
            return self._keep_previous(name, previous, str(e))
        policy = version_policy(model_config or mc.ModelConfig())
        model_file = (model_config.default_model_filename if model_config else "") or "model.onnx"
        available = [
            int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit() and (p / model_file).is_file()
        ]
        model_fp = _fingerprint(config_path)
        versions: dict[int, ModelVersion] = {}
        fingerprints: dict[int, Fingerprint] = {}
        failures: dict[int, str] = {}
        for version in policy.select(available):
            version_dir = model_dir / str(version)
            fp = model_fp + _fingerprint(
                version_dir / model_file, version_dir / CONFIG_FILE, *version_dir.glob("*.txt")
            )
            if version in previous.versions and previous.fingerprints.get(version) == fp:
                versions[version], fingerprints[version] = previous.versions[version], fp
                continue
            try:
                loaded = await asyncio.to_thread(
                    self._load_version, name, version, version_dir / model_file, model_config
                )
            except Exception as e:
                reason = f"{type(e).__name__}: {e}" if not isinstance(e, ConfigError) else str(e)
                log.error("model %s version %s failed to load: %s", name, version, reason)
                self.load_failures[name, failure_reason(e)] += 1
                failures[version] = reason
                continue
            log.info("model %s version %s loaded", name, version)
            versions[version], fingerprints[version] = loaded, fp
        if failures:
            # a broken new version must not take away what was serving: keep the old ones too
            for version, mv in previous.versions.items():
                if version not in versions and version not in failures:
                    versions[version], fingerprints[version] = mv, previous.fingerprints[version]
        try:
            check_versions(name, routing, list(versions))
        except ConfigError as e:
            self.load_failures[name, failure_reason(e)] += 1
            return self._keep_previous(name, previous, str(e))
        router = previous.router
        if router is None or router.config != routing or router.versions != versions or previous.config_fp != model_fp:
            # rebuilt when anything it routes between changed; its counters and (same config file) a
            # rollback's pin carry over
            old, new = max(previous.versions, default=None), max(versions, default=None)
            # a promotion: a newer version became the latest while the one it replaces still serves
            promoted = (new, old) if old is not None and new is not None and new > old and old in versions else None
            router = Router(
                name, routing, versions, previous.router, keep_pin=previous.config_fp == model_fp, promoted=promoted
            )
        served = Served(name, versions, fingerprints, failures, router=router, config_fp=model_fp)
        self._models[name] = served
        return served

    def _keep_previous(self, name: str, previous: Served, error: str) -> Served:
        log.error("model %s: %s; keeping what was served", name, error)
        served = Served(
            name,
            previous.versions,
            previous.fingerprints,
            previous.failures,
            error,
            router=previous.router,
            config_fp=previous.config_fp,
        )
        self._models[name] = served
        return served

    def _load_version(self, name: str, version: int, path: Path, model_config: mc.ModelConfig | None) -> ModelVersion:
        runtime = OnnxModel(path, self._intra_op_threads)
        version_config_path = path.parent / CONFIG_FILE
        version_config = read_config(version_config_path) if version_config_path.is_file() else None
        spec = build_spec(
            name,
            model_config,
            version_config,
            runtime.inputs,
            runtime.outputs,
            path.parent,
            self._default_max_batch_size,
        )
        loaded = ModelVersion(name, version, path, spec, runtime, self._executor, self._inline_run_ns)
        try:
            loaded.ns_per_row = runtime.warm_up()
        except Exception as e:  # zeros are not valid input for every model; serving can still work
            log.warning("model %s version %s: warm-up run failed (%s); serving it cold", name, version, e)
        return loaded

    def _write_model_dir(self, name: str, config_json: str | None, files: Mapping[str, bytes]) -> None:
        """Triton's upload: the `config` and `file:<version>/<name>` load parameters become the model dir."""
        staged = self.root / f".upload-{uuid.uuid4().hex}"
        target = self.root / name
        try:
            if target.is_dir() and not files:
                shutil.copytree(target, staged)
            else:
                staged.mkdir(parents=True)
            if config_json is not None:
                config = config_from_json(config_json)
                config.name = name
                (staged / CONFIG_FILE).write_text(text_format.MessageToString(config))
            for key, data in files.items():
                match = UPLOAD_FILE.match(key)
                if match is None:
                    raise InvalidArgument(f"load parameter 'file:{key}': expected 'file:<version>/<filename>'")
                dest = staged / (match.group(1) or "") / match.group(2)
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(data)
            old = self.root / f".replaced-{uuid.uuid4().hex}"
            if target.exists():
                target.rename(old)
            staged.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        finally:
            shutil.rmtree(staged, ignore_errors=True)


def failure_reason(e: BaseException) -> str:
    """One of LOAD_FAILURE_REASONS: what kind of mistake a failed load was (the log has the message)."""
    if isinstance(e, Unsupported | _ORT.NotImplemented):  # another platform, an op onnxruntime lacks
        return "unsupported"
    if isinstance(e, OSError | _ORT.NoSuchFile) or isinstance(e.__cause__, OSError):
        return "io_error"  # ConfigError from a config file that cannot be read carries its OSError
    if isinstance(e, ConfigError):
        return "invalid_config"
    if isinstance(e, _ORT.InvalidProtobuf | _ORT.InvalidGraph | _ORT.InvalidArgument | _ORT.NoModel | _ORT.Fail):
        return "invalid_model"
    return "other"


def _valid_name(name: str) -> bool:
    return len(name) <= NAME_MAX and MODEL_NAME.match(name) is not None


def _check_model_name(name: str) -> None:
    if not _valid_name(name):
        raise InvalidArgument(
            f"model name {name[:300]!r} is not a valid directory name (letters, digits, '_', '.', '-';"
            f" at most {NAME_MAX} characters)"
        )


def _fingerprint(*paths: Path) -> Fingerprint:
    out = []
    for path in paths:
        try:
            st = path.stat()
        except FileNotFoundError:
            continue
        out.append((path.name, st.st_mtime_ns, st.st_size))
    return tuple(out)

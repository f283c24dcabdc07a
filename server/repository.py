"""The model repository: `<root>/<model>/<version>/model.onnx`, scanned, loaded, swapped, polled.

A new version is loaded and warmed in a worker thread, then published by replacing the model's
`Served` snapshot in one dict assignment; requests already running keep the `ModelVersion` they
hold and finish on it. A version that fails to load is reported in the index with its reason, and
the versions served before keep serving. Load, unload and polling take one asyncio lock, so the
repository changes one step at a time.

Uploads (Triton's RepositoryModelLoad with `config` and `file:<version>/<name>` parameters) are
confined to the repository: every path component is checked (portable file names only; no absolute
paths, '..', backslashes, NUL or empty components), files are created with O_EXCL|O_NOFOLLOW under
directories opened with O_NOFOLLOW, so nothing is written through a symlink, and the whole upload is
capped (max_upload_bytes). A model directory is written in a hidden `.upload-<pid>-<hex>` staging
directory, synced, then swapped in with one atomic rename (RENAME_EXCHANGE where the kernel has
it): a crash leaves either the old directory or the new one, never half of one; the staging
directories a killed process left are removed at the next start and are never loaded (hidden names
are not model names).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import logging
import os
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

from onnxgate.server.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from onnxgate.server.model import ModelVersion
from onnxgate.server.modelspec import (
    CONFIG_FILE,
    ConfigError,
    ModelSpec,
    Unsupported,
    build_spec,
    check_filename,
    config_from_json,
    read_config,
    version_policy,
)
from onnxgate.server.overload import Limits
from onnxgate.server.pb import model_config_pb2 as mc
from onnxgate.server.routing import Router, check_versions, routing_config
from onnxgate.server.runtime import OnnxModel, session_settings

log = logging.getLogger(__name__)

MODEL_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", re.ASCII)  # fullmatch: '$' let "name\n" through
NAME_MAX = 255  # a directory name's bytes on the file systems we run on: longer ones fail with ENAMETOOLONG
# POSIX portable file name characters, not starting with '.' or '-' (no hidden files, no options)
PORTABLE_NAME = MODEL_NAME
VERSION_DIR = re.compile(r"[1-9][0-9]*", re.ASCII)
VERSION_MAX = 2**63 - 1  # Triton's versions are int64
UPLOAD_MAX_DEPTH = 8  # components of one `file:` path, the version included
UPLOAD_MAX_FILES = 1024
# hidden work directories in the repository root: never model names, removed at start when left behind
STAGING_PREFIXES = (".upload-", ".replaced-")
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
        max_upload_bytes: int = 256 * 1024 * 1024,
        limits: Limits | None = None,
    ) -> None:
        self.root = root
        self.max_upload_bytes = max_upload_bytes
        self.control_mode = control_mode
        self._executor = executor
        self._intra_op_threads = intra_op_threads
        self._default_max_batch_size = default_max_batch_size
        self._inline_run_ns = inline_run_ns
        self._limits = limits or Limits()  # per-version overload limits unless a config sets its own
        self._models: dict[str, Served] = {}
        self._lock = asyncio.Lock()
        # for the metrics: failed load attempts by (model, reason), polls and polls that raised
        self.load_failures: Counter[tuple[str, str]] = Counter()
        self.polls = 0
        self.poll_errors = 0
        remove_leftover_staging(root)

    # -- reads (hot path: no lock, no I/O) -------------------------------------------------

    def get(self, name: str, version: str = "") -> ModelVersion:
        served = self._models.get(name)
        if served is None or not served.versions:
            raise self._not_serving(name, served)
        if not version:
            latest = served.latest
            assert latest is not None
            return latest
        # digits only: int() also takes ' 1', '1_0', '+1' and other scripts' digits
        if not (version.isascii() and version.isdigit()) or len(version) > 18:
            raise InvalidArgument(
                f"model version {version[:40]!r} is not an integer (digits 0-9, at most 18); send '' for the"
                " served version"
            )
        number = int(version)
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
                    # a reload that failed while the copy loaded before serves on: READY, with the reason
                    entries.append(IndexEntry(name, str(version), "READY", served.failures.get(version, "")))
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
        _check_upload_size(config_json, files, self.max_upload_bytes)
        paths = {key: upload_path(key) for key in files}  # every path refused before anything is written
        async with self._lock:
            if files or config_json is not None:
                await asyncio.to_thread(self._write_model_dir, name, config_json, files, paths)
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
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and _valid_name(p.name))

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
        try:
            check_filename(name, "default_model_filename", model_file)
            available = [
                int(p.name)
                for p in model_dir.iterdir()
                if VERSION_DIR.fullmatch(p.name) and int(p.name) <= VERSION_MAX and (p / model_file).is_file()
            ]
        except ConfigError as e:
            self.load_failures[name, failure_reason(e)] += 1
            return self._keep_previous(name, previous, str(e))
        except OSError as e:  # the directory went away between the scan and here: the next poll unloads it
            self.load_failures[name, failure_reason(e)] += 1
            return self._keep_previous(name, previous, f"cannot list the model directory: {e}")
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
                if version in previous.versions:
                    # its file changed on disk and no longer loads (corrupted, truncated, half-copied): the
                    # copy loaded before is in memory and keeps serving; the index shows why the reload failed
                    reason = f"reload failed, the version loaded before keeps serving: {reason}"
                    versions[version] = previous.versions[version]
                    fingerprints[version] = previous.fingerprints[version]
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
        version_config_path = path.parent / CONFIG_FILE
        version_config = read_config(version_config_path) if version_config_path.is_file() else None
        parameters = {  # the version's config overrides the model's, as in build_spec
            key: value.string_value
            for config in (model_config, version_config)
            if config is not None
            for key, value in config.parameters.items()
        }
        intra_op_threads, optimization_level = session_settings(name, parameters, self._intra_op_threads)
        runtime = OnnxModel(path, intra_op_threads, optimization_level)
        spec = build_spec(
            name,
            model_config,
            version_config,
            runtime.inputs,
            runtime.outputs,
            path.parent,
            self._default_max_batch_size,
        )
        loaded = ModelVersion(
            name, version, path, spec, runtime, self._executor, self._inline_run_ns, limits=self._limits
        )
        try:
            loaded.ns_per_row = runtime.warm_up()
        except Exception as e:  # zeros are not valid input for every model; serving can still work
            log.warning("model %s version %s: warm-up run failed (%s); serving it cold", name, version, e)
        return loaded

    def _write_model_dir(
        self, name: str, config_json: str | None, files: Mapping[str, bytes], paths: Mapping[str, tuple[str, ...]]
    ) -> None:
        """Triton's upload: the `config` and `file:<version>/<name>` load parameters become the model dir."""
        staged = self.root / f".upload-{os.getpid()}-{uuid.uuid4().hex}"
        target = self.root / name
        try:
            if target.is_dir() and not files:  # a new config for the files already there
                shutil.copytree(target, staged, symlinks=True)
            else:
                staged.mkdir(parents=True)
            if config_json is not None:
                config = config_from_json(config_json)
                config.name = name
                with contextlib.suppress(FileNotFoundError):
                    (staged / CONFIG_FILE).unlink()  # a link is removed, never written through
                _write_confined(staged, (CONFIG_FILE,), text_format.MessageToString(config).encode(), "config")
            for key, data in files.items():
                _write_confined(staged, paths[key], data, f"file:{key}")
            _fsync_tree(staged)
            if not (target.is_dir() and _exchange(staged, target)):  # exchanged: staged holds the old dir
                old = self.root / f".replaced-{os.getpid()}-{uuid.uuid4().hex}"
                if target.exists():
                    target.rename(old)
                staged.rename(target)
                shutil.rmtree(old, ignore_errors=True)
            _fsync_dir(self.root)
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise ResourceExhausted(f"model {name!r} was not written: the repository's disk is full ({e})") from e
            raise
        finally:
            shutil.rmtree(staged, ignore_errors=True)


def upload_path(key: str) -> tuple[str, ...]:
    """A `file:` load parameter's path -> its components, or InvalidArgument saying what is wrong.

    `<version>/<name>[/<name>...]` (a positive integer version, then portable names) or a single
    portable `<name>` in the model directory itself."""
    where = f"load parameter 'file:{key[:300]}'"
    shape = "expected 'file:<version>/<filename>', e.g. 'file:1/model.onnx'"
    if "\x00" in key:
        raise InvalidArgument(f"{where}: the path holds a NUL character; {shape}")
    if "\\" in key:
        raise InvalidArgument(f"{where}: backslashes are refused (the separator is '/'); {shape}")
    if key.startswith("/"):
        raise InvalidArgument(f"{where}: absolute paths are refused, files stay in the model directory; {shape}")
    parts = tuple(key.split("/"))
    if "" in parts:
        raise InvalidArgument(f"{where}: empty path component (a leading, trailing or doubled '/'); {shape}")
    if "." in parts or ".." in parts:
        raise InvalidArgument(f"{where}: '.' and '..' are refused, files stay in the model directory; {shape}")
    if len(parts) > UPLOAD_MAX_DEPTH:
        raise InvalidArgument(f"{where}: more than {UPLOAD_MAX_DEPTH} path components")
    if len(parts) > 1 and (VERSION_DIR.fullmatch(parts[0]) is None or int(parts[0]) > VERSION_MAX):
        raise InvalidArgument(
            f"{where}: the version {parts[0][:300]!r} is not a positive integer (1 to {VERSION_MAX}, no leading"
            f" zeros); {shape}"
        )
    for part in parts:
        if PORTABLE_NAME.fullmatch(part) is None or len(part) > NAME_MAX:
            raise InvalidArgument(
                f"{where}: {part[:300]!r} is not a portable file name (letters, digits, '_', '.', '-', not"
                f" starting with '.' or '-', at most {NAME_MAX} characters); {shape}"
            )
    return parts


def remove_leftover_staging(root: Path) -> None:
    """Remove the hidden upload work directories a killed process left in the repository root.

    Each carries its writer's pid: those of a process that is gone, or of this pid (a previous
    process with the same pid, as in a restarted container), are removed; a live writer's stay."""
    try:
        entries = list(root.iterdir()) if root.is_dir() else []
    except OSError:
        return
    for path in entries:
        prefix = next((p for p in STAGING_PREFIXES if path.name.startswith(p)), None)
        if prefix is None:
            continue
        pid = path.name.removeprefix(prefix).partition("-")[0]
        if pid.isascii() and pid.isdigit() and int(pid) != os.getpid() and _alive(int(pid)):
            continue
        log.warning("removing %s, an upload a stopped process left unfinished", path)
        shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def _write_confined(root: Path, parts: tuple[str, ...], data: bytes, what: str) -> None:
    """Write data at root/parts: directories opened O_NOFOLLOW, the file created O_EXCL|O_NOFOLLOW."""
    if not root.joinpath(*parts).resolve().is_relative_to(root.resolve()):  # upload_path refused it already
        raise InvalidArgument(f"load parameter '{what}' names a path outside the model directory")
    dir_flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(root, dir_flags)
    try:
        for part in parts[:-1]:
            with contextlib.suppress(FileExistsError):
                os.mkdir(part, 0o755, dir_fd=fd)
            try:
                sub = os.open(part, dir_flags, dir_fd=fd)
            except OSError as e:
                if e.errno in (errno.ENOTDIR, errno.ELOOP):
                    raise InvalidArgument(
                        f"load parameter '{what}': {part!r} is a file or a link, not a directory"
                    ) from None
                raise
            os.close(fd)
            fd = sub
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            out = os.open(parts[-1], flags, 0o644, dir_fd=fd)
        except FileExistsError:
            raise InvalidArgument(
                f"load parameter '{what}': the path is given twice, or is a directory of another file"
                " (or 'file:config.pbtxt' beside the 'config' parameter)"
            ) from None
        with os.fdopen(out, "wb") as f:
            f.write(data)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """fsync every file and directory under root: an acknowledged upload survives a power loss."""
    for dirpath, _dirs, filenames in os.walk(root):
        for filename in filenames:
            path = os.path.join(dirpath, filename)
            if os.path.islink(path):
                continue
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); False where that is not available."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


class UploadTooLarge(ResourceExhausted):
    """An upload over max_upload_bytes or UPLOAD_MAX_FILES (HTTP 413, as a body over the limit)."""

    http_status = 413


def _check_upload_size(config_json: str | None, files: Mapping[str, bytes], limit: int) -> None:
    if len(files) > UPLOAD_MAX_FILES:
        raise UploadTooLarge(f"an upload of {len(files)} files is over the limit of {UPLOAD_MAX_FILES} files")
    total = sum(len(data) for data in files.values()) + len((config_json or "").encode())
    if total > limit:
        raise UploadTooLarge(
            f"an upload of {total} bytes (files and config together) is over the limit of {limit} bytes"
            " (max_upload_bytes)"
        )


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
    return len(name) <= NAME_MAX and MODEL_NAME.fullmatch(name) is not None


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

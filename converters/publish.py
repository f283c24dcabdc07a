"""Write a converted model as the next version of `<repository>/<name>/`, atomically.

Everything is written into a hidden directory beside the versions (`.tmp-<pid>-<uuid>-<host>`, which
the gateway ignores because its name is not a number), flushed to disk, then renamed to the version
number in one `rename(2)`: a gateway polling the repository sees either no new version or a complete one.

A process killed while it writes (SIGKILL, a power cut) cannot remove its hidden directory; the next
publish into the model directory does, and so does `onnxgate learn` at each pass (`remove_leftovers`):
a directory whose writer is gone (its pid on this host no longer runs, or is this process's own pid
without this process writing it), or that is older than STALE_S (a writer on another host, or a name
without a pid), is removed. A live writer's directory stays.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from google.protobuf import text_format

from onnxgate.converters.base import (
    LABEL,
    PROBABILITIES,
    Conversion,
    ConversionError,
    TensorSpec,
    feature_columns,
)
from onnxgate.server.pb import model_config_pb2

MODEL_FILE = "model.onnx"
CONFIG_FILE = "config.pbtxt"
COLUMNS_PARAMETER = "columns"  # the source's input columns, JSON (converters.base.feature_columns)
REPORT_FILE = "report.json"
LABELS_FILE = "labels.txt"

_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
_RENAME_ATTEMPTS = 20
STAGING_PREFIX = ".tmp-"
# A hidden directory not known to be a live writer's is a dead run's once it is this old (a publish
# writes for seconds; one an hour old whose writer cannot be asked, on another host, is not running)
STALE_S = 3600.0

log = logging.getLogger(__name__)
_writing: set[str] = set()  # this process's hidden directories being written now
_writing_lock = threading.Lock()


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname())[:64] or "host"


def _staging_name() -> str:
    return f"{STAGING_PREFIX}{os.getpid()}-{uuid.uuid4().hex}-{_host()}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def _leftover(path: Path, now: float) -> bool:
    """Whether a hidden directory is a dead run's (see the module's docstring)."""
    pid, _, rest = path.name.removeprefix(STAGING_PREFIX).partition("-")
    _, _, host = rest.partition("-")
    if pid.isascii() and pid.isdigit() and host == _host():
        if int(pid) == os.getpid():
            with _writing_lock:
                return path.name not in _writing
        return not _alive(int(pid))
    try:
        return now - path.stat().st_mtime > STALE_S
    except OSError:
        return False  # gone already


def remove_leftovers(model_dir: Path) -> list[str]:
    """Remove the hidden directories of publishes that died in `model_dir`; returns their names."""
    try:
        entries = [p for p in Path(model_dir).iterdir() if p.name.startswith(STAGING_PREFIX)]
    except OSError:
        return []
    now = time.time()
    removed = []
    for path in entries:
        if path.is_dir() and not path.is_symlink() and _leftover(path, now):
            log.warning("removing %s, a publish that a stopped process left unfinished", path)
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path.name)
    return removed


def _data_type(datatype: str) -> int:
    # Triton names BYTES tensors TYPE_STRING; every other datatype keeps its name after TYPE_
    name = "TYPE_STRING" if datatype == "BYTES" else f"TYPE_{datatype}"
    return int(model_config_pb2.DataType.Value(name))


def versions(model_dir: Path) -> list[int]:
    if not model_dir.is_dir():
        return []
    return sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit())


def next_version(model_dir: Path) -> int:
    existing = versions(model_dir)
    return existing[-1] + 1 if existing else 1


def model_config(name: str, conversion: Conversion, report: dict[str, Any]) -> model_config_pb2.ModelConfig:
    """The version's ModelConfig: full shapes with -1 batch dimensions, so max_batch_size is 0."""
    config = model_config_pb2.ModelConfig(
        name=name,
        platform="onnxruntime_onnx",
        backend="onnxruntime",
        max_batch_size=0,
        default_model_filename=MODEL_FILE,
    )
    for spec in conversion.inputs:
        config.input.add(name=spec.name, data_type=_data_type(spec.datatype), dims=list(spec.shape))
    for spec in conversion.outputs:
        output = config.output.add(name=spec.name, data_type=_data_type(spec.datatype), dims=list(spec.shape))
        if conversion.labels and spec.name in (LABEL, PROBABILITIES):
            output.label_filename = LABELS_FILE
    config.parameters["conversion_report"].string_value = json.dumps(report, sort_keys=True)
    config.parameters["framework"].string_value = conversion.framework
    config.parameters["task"].string_value = conversion.task
    columns = feature_columns(conversion)
    if columns is not None:
        config.parameters[COLUMNS_PARAMETER].string_value = json.dumps(columns, separators=(",", ":"))
    return config


def _write(path: Path, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_version_files(directory: Path, name: str, conversion: Conversion, report: dict[str, Any]) -> None:
    _write(directory / CONFIG_FILE, text_format.MessageToString(model_config(name, conversion, report)).encode())
    _write(directory / REPORT_FILE, (json.dumps(report, indent=2, sort_keys=True) + "\n").encode())
    _fsync_dir(directory)


def signature(specs: list[TensorSpec]) -> list[dict[str, Any]]:
    return [{"name": s.name, "datatype": s.datatype, "shape": list(s.shape)} for s in specs]


def _write_extra(staging: Path, extra: Mapping[str, bytes | Path]) -> None:
    """Files beside the model (e.g. `training/recipe.json`): bytes written, files and directories copied."""
    for relative, content in extra.items():
        target = staging / relative
        if (
            Path(relative).is_absolute()
            or ".." in Path(relative).parts
            or relative in (MODEL_FILE, CONFIG_FILE, REPORT_FILE, LABELS_FILE)
        ):
            raise ConversionError(f"extra file {relative!r} must be a new relative path inside the version")
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            _write(target, content)
        elif content.is_dir():
            shutil.copytree(content, target)
        else:
            _write(target, content.read_bytes())  # read whole: model files and base data fit in memory
        _fsync_dir(target.parent)


def publish(
    repository: str | Path,
    name: str,
    conversion: Conversion,
    report: dict[str, Any],
    extra: Mapping[str, bytes | Path] | None = None,
) -> Path:
    """Write `conversion` as the next version of model `name`; returns the version directory.

    `report` is stored as report.json and in the config's parameters; its "version" is set here.
    `extra` maps paths inside the version to bytes or files to copy; they are in place before the
    rename, so a version appears with them or not at all.
    """
    if not _NAME.match(name):
        raise ConversionError(f"model name {name!r}: use letters, digits, '_', '-' and '.', not starting with '.'")
    model_dir = Path(repository) / name
    model_dir.mkdir(parents=True, exist_ok=True)
    remove_leftovers(model_dir)
    staging = model_dir / _staging_name()
    with _writing_lock:
        _writing.add(staging.name)
    try:
        return _publish(model_dir, staging, name, conversion, report, extra)
    finally:
        with _writing_lock:
            _writing.discard(staging.name)


def _publish(
    model_dir: Path,
    staging: Path,
    name: str,
    conversion: Conversion,
    report: dict[str, Any],
    extra: Mapping[str, bytes | Path] | None,
) -> Path:
    staging.mkdir()
    try:
        _write(staging / MODEL_FILE, conversion.model.SerializeToString())
        _write_extra(staging, extra or {})
        if conversion.labels:
            _write(staging / LABELS_FILE, "".join(f"{label}\n" for label in conversion.labels).encode())
        for _ in range(_RENAME_ATTEMPTS):
            version = next_version(model_dir)
            report["version"] = version
            # rewritten per attempt: the report names the version it was published as
            _write_version_files(staging, name, conversion, report)
            target = model_dir / str(version)
            if target.exists():
                continue  # another publisher took this number meanwhile
            try:
                os.rename(staging, target)
            except OSError:
                if target.exists():
                    continue
                raise
            _fsync_dir(model_dir)
            return target
        raise ConversionError(f"could not claim a version number in {model_dir} after {_RENAME_ATTEMPTS} attempts")
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise

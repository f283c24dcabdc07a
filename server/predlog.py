"""The prediction log: every (sampled) prediction appended to disk off the hot path.

    handler --record()--> bounded queue --writer thread--> Arrow batches --> segment files

`record()` is the only call the gRPC handler makes: a sampling draw and a `put_nowait`. When the queue
is full the record is dropped and counted; a request is never slowed or failed by the log. The writer
thread groups records by model, converts them to one Arrow record batch per model and flush, appends
it to that model's open segment and fsyncs — every `flush_records` records or `flush_ms` after the
first record waiting, whichever comes first.

Layout (one directory per replica, so replicas sharing a volume never coordinate):

    <log_dir>/<replica_id>/<model>/predictions-<seq>.arrows|parquet
    <log_dir>/<replica_id>/feedback-<seq>.arrows|parquet          (server/feedback.py)

A prediction row: id, model, version, ts (UTC), replica, route and propensity (server/routing.py: why
this version answered and the probability it had of being chosen), and per tensor two list columns,
`input.<name>` (the flattened values) and `input.<name>.shape` (likewise `output.<name>`). A request a
shadow version also scored carries `shadow_version` and its outputs as `shadow.output.<name>` (+ `.shape`)
in the same row: one row per prediction id.

A model whose versions record their source's column names (server/columns.py) also gets
`<log_dir>/<replica_id>/<model>/columns.json`, `{"versions": {"<version>": {"<input>": [names]}}}`, the
names of each input's elements: `onnxgate dataset export` names the features by them (server/dataset.py).
"""

from __future__ import annotations

import collections
import json
import logging
import os
import random
import socket
import threading
import time
import uuid
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol, cast

import numpy as np
import pyarrow as pa
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from onnxgate.server.objectstore import split_location
from onnxgate.server.segments import IO_OPS, IOHealth, RecoveryReport, SegmentWriter, SkipList

if TYPE_CHECKING:
    from onnxgate.server.config import Settings

log = logging.getLogger(__name__)

PREDICTIONS = "predictions"
INPUT_PREFIX = "input."
OUTPUT_PREFIX = "output."
SHADOW_OUTPUT_PREFIX = "shadow.output."
SHAPE_SUFFIX = ".shape"
COLUMNS_FILE = "columns.json"
META_COLUMNS = ("id", "model", "version", "ts", "replica")


def default_replica_id() -> str:
    # hostname is the pod name on Kubernetes; the pid and a random suffix keep two processes of one
    # host (and a restarted process) apart.
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


@dataclass(frozen=True)
class ModelLogPolicy:
    """What is logged for one model. Inputs may hold personal data: leave them out, whole or by name."""

    sample_rate: float = 1.0
    log_inputs: bool = True
    log_outputs: bool = True
    exclude_inputs: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        if not 0.0 <= self.sample_rate <= 1.0:
            raise ValueError(f"sample_rate must be within [0, 1], got {self.sample_rate}")


@dataclass(frozen=True)
class PredLogSettings:
    log_dir: Path
    replica_id: str = field(default_factory=default_replica_id)
    queue_size: int = 10_000
    flush_records: int = 1_000
    flush_ms: float = 200.0
    segment_max_bytes: int = 64 * 1024 * 1024
    segment_max_age_s: float = 300.0
    retention_s: float | None = 7 * 24 * 3600.0
    retention_bytes: int | None = None
    fsync: bool = True
    default_policy: ModelLogPolicy = ModelLogPolicy()
    models: Mapping[str, ModelLogPolicy] = field(default_factory=dict)
    # feedback (server/feedback.py) and the join (server/join.py)
    feedback_queue_size: int = 10_000
    feedback_max_batch: int = 512
    join_interval_s: float = 5.0
    unknown_after_s: float = 300.0
    quality_window_s: float = 3600.0
    join_max_predictions: int = 500_000
    # an object store (s3://...) the rolled segments are uploaded to; log_dir is then the local write-ahead
    # directory (server/objectstore.py)
    store_uri: str | None = None
    adopt_interval_s: float = 30.0  # looks for segments that dead replicas left open (server/adopt.py); 0: never

    def __post_init__(self) -> None:
        if self.adopt_interval_s < 0:
            raise ValueError(f"adopt_interval_s must be >= 0, got {self.adopt_interval_s}")
        if self.queue_size < 1 or self.flush_records < 1 or self.flush_ms <= 0:
            raise ValueError("queue_size and flush_records must be >= 1 and flush_ms > 0")
        if self.segment_max_bytes < 1 or self.segment_max_age_s <= 0:
            raise ValueError("segment_max_bytes must be >= 1 and segment_max_age_s > 0")
        if self.retention_bytes is not None and self.retention_bytes < 0:
            raise ValueError(f"retention_bytes must be >= 0, got {self.retention_bytes}")
        if not self.replica_id or "/" in self.replica_id:
            raise ValueError(f"replica_id must be a non-empty name without '/', got {self.replica_id!r}")

    def policy(self, model: str) -> ModelLogPolicy:
        return self.models.get(model, self.default_policy)

    @property
    def replica_dir(self) -> Path:
        return self.log_dir / self.replica_id


def predlog_settings(s: Settings) -> PredLogSettings:
    """From the gateway's flat settings: `MODEL=RATE`, `MODEL=inputs|outputs|both`, `MODEL:INPUT` entries."""
    assert s.predlog_dir is not None
    rates = dict(_pair(e, "=", "predlog_sample_rate") for e in s.predlog_sample_rate)
    what = dict(_pair(e, "=", "predlog_log") for e in s.predlog_log)
    excluded: dict[str, set[str]] = {}
    for entry in s.predlog_exclude_inputs:
        model, name = _pair(entry, ":", "predlog_exclude_inputs")
        excluded.setdefault(model, set()).add(name)
    for model, choice in what.items():
        if choice not in ("inputs", "outputs", "both"):
            raise ValueError(f"predlog_log {model}={choice}: expected inputs, outputs or both")

    def policy(model: str) -> ModelLogPolicy:
        try:
            rate = float(rates.get(model, rates.get("*", "1")))
        except ValueError:
            raise ValueError(f"predlog_sample_rate for {model}: {rates.get(model)!r} is not a number") from None
        choice = what.get(model, what.get("*", "both"))
        return ModelLogPolicy(
            sample_rate=rate,
            log_inputs=choice != "outputs",
            log_outputs=choice != "inputs",
            exclude_inputs=frozenset(excluded.get(model, set()) | excluded.get("*", set())),
        )

    models = {m: policy(m) for m in {*rates, *what, *excluded} - {"*"}}
    log_dir, store_uri = split_location(s.predlog_dir, s.predlog_local_dir)
    return PredLogSettings(
        log_dir,
        store_uri=store_uri,
        adopt_interval_s=s.predlog_adopt_interval_s,
        replica_id=s.predlog_replica_id or default_replica_id(),
        queue_size=s.predlog_queue_size,
        flush_records=s.predlog_flush_records,
        flush_ms=s.predlog_flush_ms,
        # with an object store the local copies go once uploaded, and retention is the bucket's (lifecycle
        # rules): local retention would race the uploader and could delete what was never uploaded
        retention_s=None if store_uri else s.predlog_retention_s,
        retention_bytes=None if store_uri else s.predlog_retention_bytes or None,
        segment_max_bytes=s.predlog_segment_max_bytes,
        segment_max_age_s=s.predlog_segment_max_age_s,
        default_policy=policy("*"),
        models=models,
        join_interval_s=s.predlog_join_interval_s,
        unknown_after_s=s.predlog_unknown_after_s,
        quality_window_s=s.predlog_quality_window_s,
        join_max_predictions=s.predlog_join_max_predictions,
    )


def _pair(entry: str, sep: str, setting: str) -> tuple[str, str]:
    key, found, value = entry.partition(sep)
    if not found or not key or not value:
        raise ValueError(f"{setting} entry {entry!r}: expected NAME{sep}VALUE")
    return key.strip(), value.strip()


class Prediction(NamedTuple):
    id: str
    model: str
    version: str
    ts_ns: int
    inputs: Mapping[str, np.ndarray]
    outputs: Mapping[str, np.ndarray]
    route: str = "latest"
    propensity: float = 1.0
    shadow_version: str | None = None
    shadow_outputs: Mapping[str, np.ndarray] | None = None
    # input name -> the names of its elements, when the version records its columns (server/columns.py)
    columns: Mapping[str, Sequence[str]] | None = None


@dataclass
class _Flush:
    """A request, put in the queue, to write everything before it now (tests, shutdown)."""

    done: threading.Event = field(default_factory=threading.Event)


_STOP = object()
_MAX_RECENT_IDS = 1_000_000


class PredictionLog:
    def __init__(self, settings: PredLogSettings) -> None:
        self.settings = settings
        # a deque, not a queue.Queue: append and popleft are atomic under the GIL and take no lock, so the
        # request path neither contends with the writer nor wakes it per record (docs/explanation/profile.md)
        self._queue: collections.deque[Prediction | _Flush | object] = collections.deque()
        self._queue_size = settings.queue_size
        self._rates = {name: p.sample_rate for name, p in settings.models.items()}
        self._default_rate = settings.default_policy.sample_rate
        self._count_lock = threading.Lock()  # taken only on the drop / sample-out paths
        self._flush_records = settings.flush_records
        self._wake = threading.Event()
        self.dropped = 0
        self.sampled_out = 0
        self.written = 0
        self.write_errors = 0
        self.flushes = 0
        self.io = IOHealth(PREDICTIONS)  # the writer's I/O errors and health, shared by its segment writers
        self._segments: dict[str, SegmentWriter] = {}
        self.recovery: dict[str, RecoveryReport] = {}
        self._recover_existing()
        self._recent_ids: set[str] = set()
        self._recent_lock = threading.Lock()
        self._columns: dict[str, dict[str, Any]] = {}  # model -> version -> columns written (writer thread)
        self._thread = threading.Thread(target=self._run, name="predlog-writer", daemon=True)
        self._thread.start()

    # -- hot path ------------------------------------------------------------------------------------
    def record(
        self,
        request_id: str,
        model: str,
        version: str,
        inputs: Mapping[str, np.ndarray],
        outputs: Mapping[str, np.ndarray],
        route: str = "latest",
        propensity: float = 1.0,
        shadow_version: str | None = None,
        shadow_outputs: Mapping[str, np.ndarray] | None = None,
        columns: Mapping[str, Sequence[str]] | None = None,
    ) -> None:
        """Queue one prediction for the log; never blocks, never raises for a full queue."""
        rate = self._rates.get(model, self._default_rate)
        if rate < 1.0 and random.random() >= rate:
            with self._count_lock:
                self.sampled_out += 1
            return
        pending = self._queue
        if len(pending) >= self._queue_size:
            with self._count_lock:
                self.dropped += 1
            return
        pending.append(
            Prediction(
                request_id,
                model,
                version,
                time.time_ns(),
                inputs,
                outputs,
                route,
                propensity,
                shadow_version,
                shadow_outputs,
                columns,
            )
        )
        if len(pending) >= self._flush_records:
            self._wake.set()  # a full flush is waiting: the writer's one wake-up for these records

    # -- control -------------------------------------------------------------------------------------
    def flush(self, timeout: float | None = 10.0) -> bool:
        """Write everything recorded so far; True once it is durable."""
        request = _Flush()
        self._queue.append(request)  # control items are never dropped: past the bound by one at most
        self._wake.set()
        return request.done.wait(timeout)

    def close(self, timeout: float = 30.0) -> None:
        """Write what is queued, roll the open segments to Parquet, stop the writer."""
        if not self._thread.is_alive():
            return
        self._queue.append(_STOP)
        self._wake.set()
        self._thread.join(timeout)

    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def healthy(self) -> bool:
        """The writer thread runs and its last write, roll and retention (per model) succeeded."""
        return self.io.healthy and self._thread.is_alive()

    @property
    def last_error(self) -> str:
        """The writer's most recent I/O failure ('' when none; kept after it recovered)."""
        return self.io.last_error

    def seen(self, prediction_id: str) -> bool:
        """Whether this process has written the prediction (feedback answers 'accepted' vs 'pending')."""
        with self._recent_lock:
            return prediction_id in self._recent_ids

    def pop_recent_ids(self) -> set[str]:
        """Ids written since the last call; the joiner takes them over once it has read them from disk."""
        with self._recent_lock:
            ids, self._recent_ids = self._recent_ids, set()
        return ids

    # -- writer thread -------------------------------------------------------------------------------
    def _recover_existing(self) -> None:
        # Roll what a crashed predecessor with this replica id left open, before anything new is written.
        replica_dir = self.settings.replica_dir
        if not replica_dir.is_dir():
            return
        for model_dir in sorted(p for p in replica_dir.iterdir() if p.is_dir()):
            writer = self._segment(model_dir.name)
            if writer.recovery:
                self.recovery[model_dir.name] = writer.recovery

    def _segment(self, model: str) -> SegmentWriter:
        writer = self._segments.get(model)
        if writer is None:
            s = self.settings
            writer = SegmentWriter(
                s.replica_dir / model,
                PREDICTIONS,
                max_bytes=s.segment_max_bytes,
                max_age_s=s.segment_max_age_s,
                fsync=s.fsync,
                retention_s=s.retention_s,
                retention_bytes=s.retention_bytes,
                health=self.io,
            )
            self._segments[model] = writer
        return writer

    def _run(self) -> None:
        flush_s = self.settings.flush_ms / 1000.0
        flush_records = self.settings.flush_records
        while True:
            # One wake-up per flush window, not one per record: record() sets _wake only once a full
            # flush is queued (a writer woken by every record costs the serving thread GIL hand-offs);
            # otherwise what came within flush_s is written when it passes. flush()/close() wake it at once.
            queued = self._queue
            # a flush()/close() still queued (behind more than one flush of records) is not kept waiting
            control_queued = bool(queued) and not isinstance(queued[-1], Prediction)
            if len(queued) < flush_records and not control_queued:
                self._wake.wait(flush_s)
                self._wake.clear()
            pending: list[Prediction] = []
            control = self._drain_into(pending)
            if pending:
                self._write(pending)
            if isinstance(control, _Flush):
                control.done.set()
            if control is _STOP:
                for writer in self._segments.values():
                    writer.close()
                return
            self._roll_idle()

    def _roll_idle(self) -> None:
        for writer in self._segments.values():
            try:
                writer.maybe_roll()  # never raises an I/O error; anything else must not stop the writer either
            except Exception as error:
                self.io.failed("roll", writer.directory, error)

    def _drain_into(self, pending: list[Prediction]) -> object | None:
        """Take what is already queued, up to a full flush; returns a control item met on the way."""
        queued, limit = self._queue, self.settings.flush_records
        while len(pending) < limit:
            try:
                item = queued.popleft()
            except IndexError:
                return None
            if not isinstance(item, Prediction):
                return item
            pending.append(item)
        return None

    def _write(self, records: list[Prediction]) -> None:
        by_model: dict[str, list[Prediction]] = {}
        for r in records:
            by_model.setdefault(r.model, []).append(r)
        for model, group in by_model.items():
            try:
                writer = self._segment(model)
            except Exception as error:  # e.g. its directory cannot be made: counted, tried again next flush
                self.io.failed("write", self.settings.replica_dir / model, error)
                self.write_errors += len(group)
                continue
            try:
                writer.write(build_batch(group, self.settings.policy(model), self.settings.replica_id))
            except Exception:  # a full disk must not kill the writer: count what was lost, keep going
                log.exception("prediction log: writing %d records of model %s failed", len(group), model)
                self.write_errors += len(group)
                continue
            self.written += len(group)
            self._note_columns(model, group)
            with self._recent_lock:
                if len(self._recent_ids) > _MAX_RECENT_IDS:  # nobody takes them over: forget, stay bounded
                    self._recent_ids.clear()
                self._recent_ids.update(r.id for r in group)
        self.flushes += 1

    def _note_columns(self, model: str, group: list[Prediction]) -> None:
        """Keep `<model>/columns.json` naming the inputs' elements of every version logged (writer thread)."""
        known = self._columns.get(model)
        if known is None:
            known = self._columns[model] = read_columns_file(self.settings.replica_dir / model / COLUMNS_FILE)
        given: dict[str, Mapping[str, Sequence[str]]] = {}
        for r in group:  # one mapping per version (the version's own object): no per-record copies
            if r.columns is not None and r.version not in given:
                given[r.version] = r.columns
        new = {v: {k: list(c) for k, c in columns.items()} for v, columns in given.items()}
        if all(known.get(v) == c for v, c in new.items()):
            return
        known.update(new)
        path = self.settings.replica_dir / model / COLUMNS_FILE
        tmp = path.with_name(f".{COLUMNS_FILE}.tmp")
        try:
            tmp.write_text(json.dumps({"versions": known}, sort_keys=True) + "\n", encoding="utf-8")
            os.replace(tmp, path)
        except OSError as error:  # the names are a convenience: the log itself is written
            log.warning("prediction log: cannot write %s: %s", path, error)


def read_columns_file(path: Path) -> dict[str, Any]:
    """version -> {input: [element names]} from one columns.json; {} when absent or unreadable."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    versions = doc.get("versions") if isinstance(doc, dict) else None
    return dict(versions) if isinstance(versions, dict) else {}


# -- records -> Arrow ----------------------------------------------------------------------------------
def build_batch(records: list[Prediction], policy: ModelLogPolicy, replica: str) -> pa.RecordBatch:
    """One record batch for records of one model; tensors as flattened list columns plus shapes."""
    columns: dict[str, pa.Array] = {
        "id": pa.array([r.id for r in records], pa.string()),
        "model": pa.array([r.model for r in records], pa.string()),
        "version": pa.array([r.version for r in records], pa.string()),
        "ts": pa.array([r.ts_ns // 1000 for r in records], pa.timestamp("us", tz="UTC")),
        "replica": pa.array([replica] * len(records), pa.string()),
        "route": pa.array([r.route for r in records], pa.string()),
        "propensity": pa.array([r.propensity for r in records], pa.float64()),
    }
    if policy.log_inputs:
        names = _names(r.inputs for r in records)
        for name in sorted(names - policy.exclude_inputs):
            _add_tensor(columns, INPUT_PREFIX + name, [r.inputs.get(name) for r in records])
    if policy.log_outputs:
        for name in sorted(_names(r.outputs for r in records)):
            _add_tensor(columns, OUTPUT_PREFIX + name, [r.outputs.get(name) for r in records])
        if any(r.shadow_version is not None for r in records):
            columns["shadow_version"] = pa.array([r.shadow_version for r in records], pa.string())
            shadows = [r.shadow_outputs or {} for r in records]
            for name in sorted(_names(iter(shadows))):
                _add_tensor(columns, SHADOW_OUTPUT_PREFIX + name, [s.get(name) for s in shadows])
    return pa.record_batch(columns)


def _names(maps: Iterator[Mapping[str, np.ndarray]]) -> set[str]:
    names: set[str] = set()
    for m in maps:
        names.update(m)
    return names


def _add_tensor(columns: dict[str, pa.Array], column: str, arrays: list[np.ndarray | None]) -> None:
    first = arrays[0]
    if first is not None and all(a is not None and a.shape == first.shape for a in arrays):
        # the usual case, one shape for the whole flush: no per-record numpy calls (the writer's CPU
        # time is taken from the serving threads through the GIL)
        n, size, ndim = len(arrays), first.size, first.ndim
        offsets = np.arange(n + 1, dtype=np.int64) * size
        flat: np.ndarray = np.concatenate(cast(list[np.ndarray], arrays), axis=None)
        columns[column] = pa.LargeListArray.from_arrays(pa.array(offsets), _values(flat))
        shape_offsets = pa.array(np.arange(n + 1, dtype=np.int32) * ndim)
        shapes = pa.array(np.tile(np.asarray(first.shape, np.int64), n), pa.int64())
        columns[column + SHAPE_SUFFIX] = pa.ListArray.from_arrays(shape_offsets, shapes)
        return
    present = [np.asarray(a) for a in arrays if a is not None]
    sizes = np.array([0 if a is None else np.size(a) for a in arrays], dtype=np.int64)
    offsets = np.zeros(len(arrays) + 1, dtype=np.int64)
    np.cumsum(sizes, out=offsets[1:])
    missing = np.array([a is None for a in arrays]) if len(present) < len(arrays) else None
    flat = np.concatenate([a.ravel() for a in present]) if present else np.zeros(0, np.float32)
    mask = None if missing is None else pa.array(missing)
    columns[column] = pa.LargeListArray.from_arrays(pa.array(offsets), _values(flat), mask=mask)
    shape_lists = [[] if a is None else list(np.shape(a)) for a in arrays]
    columns[column + SHAPE_SUFFIX] = pa.array(shape_lists, pa.list_(pa.int64()), mask=missing)


def _values(flat: np.ndarray) -> pa.Array:
    if flat.dtype.kind in "OSU":  # BYTES tensors: numpy object arrays of bytes (or str)
        return pa.array([v if isinstance(v, bytes) else str(v).encode() for v in flat], pa.binary())
    return pa.array(flat)


# -- metrics -------------------------------------------------------------------------------------------
class Writer(Protocol):
    """A writer thread with a health state: PredictionLog, FeedbackStore."""

    io: IOHealth

    @property
    def healthy(self) -> bool: ...


class PredLogCollector(Collector):
    """The log's counters, and the health of its writer threads (predictions, and feedback when given),
    read at scrape time (registered on the server's own registry)."""

    def __init__(self, log_: PredictionLog, feedback: Writer | None = None) -> None:
        self._log = log_
        self._writers: list[Writer] = [log_] if feedback is None else [log_, feedback]

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily(
            "onnxgate_predlog_writer_up",
            "1 while the writer thread runs and its last write, roll and retention succeeded",
            labels=["writer"],
        )
        errors = CounterMetricFamily(
            "onnxgate_predlog_io_errors", "I/O errors of a writer thread, by operation", labels=["writer", "op"]
        )
        for w in self._writers:
            up.add_metric([w.io.writer], 1.0 if w.healthy else 0.0)
            for op in IO_OPS:
                errors.add_metric([w.io.writer, op], w.io.errors[op])
        yield up
        yield errors
        p = self._log
        for name, doc, value in (
            ("onnxgate_predlog_records_written", "Predictions written to the log", p.written),
            ("onnxgate_predlog_records_dropped", "Predictions dropped because the log queue was full", p.dropped),
            ("onnxgate_predlog_records_sampled_out", "Predictions not logged by sampling", p.sampled_out),
            ("onnxgate_predlog_write_errors", "Predictions lost to write errors", p.write_errors),
        ):
            yield CounterMetricFamily(name, doc, value=value)
        yield GaugeMetricFamily(
            "onnxgate_predlog_queue_depth", "Predictions waiting for the writer", value=p.queue_depth()
        )


def model_dirs(log_dir: Path, models: Collection[str] | None = None, skipped: SkipList | None = None) -> Iterator[Path]:
    """Every replica's directory of every (or the named) model, for readers; a replica directory that
    cannot be listed is skipped (and added to `skipped`)."""
    if not log_dir.is_dir():
        return
    for replica in sorted(p for p in log_dir.iterdir() if p.is_dir()):
        try:
            entries = sorted(p for p in replica.iterdir() if p.is_dir())
        except OSError as error:
            if skipped is not None:
                skipped[replica] = f"{type(error).__name__}: {error}"
            continue
        for model_dir in entries:
            if models is None or model_dir.name in models:
                yield model_dir


Recorder = Callable[
    [
        str,
        str,
        str,
        Mapping[str, np.ndarray],
        Mapping[str, np.ndarray],
        str,
        float,
        str | None,
        Mapping[str, np.ndarray] | None,
        Mapping[str, Sequence[str]] | None,
    ],
    None,
]

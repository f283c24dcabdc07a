"""Feedback: ground truth and rewards for logged predictions, durable before they are acknowledged.

    servicer --validate--> FeedbackStore.submit() --queue--> writer thread: append + one fsync per group
                                        ^ future, resolved after the fsync  <--'

Concurrent feedback shares one fsync (group commit): the writer takes everything queued, appends it
as one Arrow batch to `<log_dir>/<replica_id>/feedback-<seq>.arrows`, fsyncs, then resolves every
future of the group. Which message is a duplicate and which feedback is a prediction's truth is
decided by one rule (server/feedback_order.py), here against what this replica stored and what it has
read of the others (all of it at start, the new rows at every join), and again in the join over all
replicas' files.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import hashlib
import logging
import math
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from onnxgate.server.errors import InvalidArgument, ResourceExhausted, Unavailable
from onnxgate.server.feedback_order import FeedbackIndex, Row, content_hash, order_key
from onnxgate.server.logfiles import LogFiles
from onnxgate.server.objectstore import log_readers
from onnxgate.server.pb import feedback_pb2 as fpb
from onnxgate.server.pb import feedback_pb2_grpc as fpb_grpc
from onnxgate.server.pb import grpc_service_pb2 as pb
from onnxgate.server.predlog import PredLogSettings
from onnxgate.server.segments import IOHealth, SegmentWriter, SkipList, read_segments
from onnxgate.server.service import Context, grpc_errors
from onnxgate.server.stats import RequestCounts

if TYPE_CHECKING:  # logquery reads feedback files with this module's schema
    from onnxgate.server.logquery import Report

log = logging.getLogger(__name__)

FEEDBACK = "feedback"
ACCEPTED = fpb.FEEDBACK_STATUS_ACCEPTED
DUPLICATE = fpb.FEEDBACK_STATUS_DUPLICATE
PENDING = fpb.FEEDBACK_STATUS_PENDING

TENSOR_TYPE = pa.struct(
    [
        ("name", pa.string()),
        ("datatype", pa.string()),
        ("shape", pa.list_(pa.int64())),
        ("values", pa.list_(pa.float64())),
    ]
)
SCHEMA = pa.schema(
    [
        ("prediction_id", pa.string()),
        ("feedback_id", pa.string()),
        ("model", pa.string()),
        ("version", pa.string()),
        ("ts", pa.timestamp("us", tz="UTC")),
        ("replica", pa.string()),
        ("label", pa.string()),
        ("value", pa.float64()),
        ("tensors", pa.list_(TENSOR_TYPE)),
        ("reward", pa.float64()),
        # added in 0.1: older segments lack them and read as nulls (schema changes are additive)
        ("sent_at", pa.timestamp("us", tz="UTC")),
        ("content", pa.string()),
    ]
)

# datatype -> the InferTensorContents field that must carry it (ground truth is stored as float64).
_CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP16": "fp32_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
}


SENT_AT_MAX_MS = 253_402_300_800_000  # 10000-01-01T00:00:00Z


@dataclass(frozen=True)
class TruthTensor:
    name: str
    datatype: str
    shape: tuple[int, ...]
    values: tuple[float, ...]


@dataclass(frozen=True)
class FeedbackRecord:
    prediction_id: str
    feedback_id: str
    model: str = ""
    version: str = ""
    label: str | None = None
    value: float | None = None
    tensors: tuple[TruthTensor, ...] | None = None
    reward: float | None = None
    ts_ns: int = 0  # the store's stamp (feedback_order.py), set when it is committed
    sent_at_ms: int | None = None  # the client's time, when it sent one
    content: str = ""


def make_record(
    prediction_id: str,
    *,
    model: str = "",
    version: str = "",
    label: str | None = None,
    value: float | None = None,
    tensors: tuple[TruthTensor, ...] | None = None,
    reward: float | None = None,
    feedback_id: str = "",
    sent_at_ms: int | None = None,
) -> FeedbackRecord:
    """A validated record; without a feedback id the store gives it one when it is stored."""
    if not prediction_id:
        raise InvalidArgument("feedback needs a prediction_id (the id of the ModelInfer request)")
    truths = sum(x is not None for x in (label, value, tensors))
    if truths > 1:
        raise InvalidArgument("feedback carries one ground truth: label, value or tensors")
    if truths == 0 and reward is None:
        raise InvalidArgument("feedback carries a ground truth (label, value, tensors) and/or a reward")
    for what, x in (("value", value), ("reward", reward)):
        if x is not None and not math.isfinite(x):
            raise InvalidArgument(f"feedback {what} must be a finite number, got {x}")
    if label is not None and not label:
        raise InvalidArgument("feedback label is empty")
    if tensors is not None and not tensors:
        raise InvalidArgument("feedback tensors are empty")
    if sent_at_ms is not None and not 0 < sent_at_ms < SENT_AT_MAX_MS:  # stored as a timestamp: years 1970-9999
        raise InvalidArgument(
            f"feedback sent_at_unix_ms must be a Unix time in ms (positive, before year 10000), got {sent_at_ms}"
        )
    content = content_hash(
        model, version, label, value, None if tensors is None else [list(t.__dict__.values()) for t in tensors], reward
    )
    return FeedbackRecord(
        prediction_id, feedback_id, model, version, label, value, tensors, reward, 0, sent_at_ms, content
    )


def record_from_proto(request: fpb.FeedbackRequest) -> FeedbackRecord:
    truth = request.WhichOneof("truth")
    tensors = None
    if truth == "tensors":
        tensors = tuple(_truth_tensor(t) for t in request.tensors.tensors)
    return make_record(
        request.prediction_id,
        model=request.model_name,
        version=request.model_version,
        label=request.label if truth == "label" else None,
        value=request.value if truth == "value" else None,
        tensors=tensors,
        reward=request.reward if request.HasField("reward") else None,
        feedback_id=request.feedback_id,
        sent_at_ms=request.sent_at_unix_ms or None,
    )


def _truth_tensor(t: fpb.TruthTensor) -> TruthTensor:
    field = _CONTENTS_FIELD.get(t.datatype)
    if field is not None:
        others = [f.name for f, v in t.contents.ListFields() if f.name != field and v]
        if others:
            raise InvalidArgument(
                f"truth tensor '{t.name}' of datatype {t.datatype} carries {others[0]}, expected {field}"
            )
    values = getattr(t.contents, field) if field is not None else ()
    return truth_tensor(t.name, t.datatype, tuple(t.shape), tuple(float(v) for v in values))


def truth_tensor(name: str, datatype: str, shape: tuple[int, ...], values: tuple[float, ...]) -> TruthTensor:
    """A checked ground-truth tensor, whichever wire it came on: numeric, its shape holding its values."""
    if datatype not in _CONTENTS_FIELD:
        raise InvalidArgument(
            f"truth tensor '{name}': datatype {datatype!r} is not a numeric datatype "
            f"({', '.join(_CONTENTS_FIELD)}); send a string ground truth as label"
        )
    if any(d < 0 for d in shape):
        raise InvalidArgument(f"truth tensor '{name}': shape {list(shape)} has a negative dimension")
    if math.prod(shape) != len(values):
        raise InvalidArgument(
            f"truth tensor '{name}': shape {list(shape)} holds {math.prod(shape)} elements, {len(values)} given"
        )
    return TruthTensor(name, datatype, shape, values)


def to_batch(records: list[FeedbackRecord], replica: str) -> pa.RecordBatch:
    return pa.record_batch(
        [
            pa.array([r.prediction_id for r in records], pa.string()),
            pa.array([r.feedback_id for r in records], pa.string()),
            pa.array([r.model for r in records], pa.string()),
            pa.array([r.version for r in records], pa.string()),
            pa.array([r.ts_ns // 1000 for r in records], pa.timestamp("us", tz="UTC")),
            pa.array([replica] * len(records), pa.string()),
            pa.array([r.label for r in records], pa.string()),
            pa.array([r.value for r in records], pa.float64()),
            pa.array(
                [None if r.tensors is None else [t.__dict__ for t in r.tensors] for r in records], pa.list_(TENSOR_TYPE)
            ),
            pa.array([r.reward for r in records], pa.float64()),
            pa.array(
                [None if r.sent_at_ms is None else r.sent_at_ms * 1000 for r in records], SCHEMA.field("sent_at").type
            ),
            pa.array([r.content for r in records], pa.string()),
        ],
        schema=SCHEMA,
    )


def read_feedback(log_dir: Path, skipped: SkipList | None = None) -> pa.Table:
    """Every replica's feedback, duplicates included (the join removes them); unreadable files are
    skipped, and listed in `skipped`."""
    tables = [t for replica in _replica_dirs(log_dir) for _, t in read_segments(replica, FEEDBACK, skipped)]
    return pa.concat_tables([conform(t) for t in tables]) if tables else SCHEMA.empty_table()


def recent_feedback(readers: list[LogFiles], window_s: float, skipped: SkipList) -> list[Row]:
    """Every replica's feedback of the last `window_s` (whole segments: a rolled segment whose newest
    row is older is not read), for a store that starts: bounded by the window, not by the log. Of a
    segment listed by two readers (the write-ahead and the store), the first one's is read."""
    cutoff_us = int((time.time() - window_s) * 1e6)
    rows: list[Row] = []
    seen: set[tuple[str, str | None, str, int]] = set()
    for logs in readers:
        for segment in logs.segments(FEEDBACK, skipped=skipped):
            newest = logs.newest_ts(segment)
            if segment.key in seen or (newest is not None and newest < cutoff_us):
                continue
            table = logs.read(segment, skipped)
            if table is not None:
                seen.add(segment.key)
                rows.extend(conform(table).to_pylist())
    return rows


def conform(table: pa.Table) -> pa.Table:
    """A feedback table in today's schema: columns older files lack are added as nulls."""
    for name in SCHEMA.names:
        if name not in table.column_names:
            table = table.append_column(SCHEMA.field(name), pa.nulls(table.num_rows, SCHEMA.field(name).type))
    return table.select(SCHEMA.names).cast(SCHEMA)


def _replica_dirs(log_dir: Path) -> list[Path]:
    return sorted(p for p in log_dir.iterdir() if p.is_dir()) if log_dir.is_dir() else []


_STOP = object()


class FeedbackStore:
    """Appends feedback to this replica's feedback segments; a future per record resolves after fsync."""

    def __init__(self, settings: PredLogSettings, known: Callable[[str], bool] = lambda _id: False) -> None:
        self.settings = settings
        self._known = known
        self.skipped: SkipList = {}
        existing = recent_feedback(log_readers(settings), settings.quality_window_s, self.skipped)
        for path, why in self.skipped.items():
            log.warning("feedback: skipped unreadable log file %s (%s)", path, why)
        # what every replica stored lately: answers DUPLICATE; the clock stamps past all of it
        self._index = FeedbackIndex.of(existing)
        self._index_lock = threading.Lock()  # the writer thread and observe() (the joiner's thread)
        self._clock_us = max((int(r["ts"].timestamp() * 1e6) for r in existing), default=0)
        self.io = IOHealth(FEEDBACK)  # the writer's I/O errors and health (`healthy`)
        self._writer = SegmentWriter(
            settings.replica_dir,
            FEEDBACK,
            max_bytes=settings.segment_max_bytes,
            max_age_s=settings.segment_max_age_s,
            fsync=settings.fsync,
            retention_s=settings.retention_s,
            retention_bytes=settings.retention_bytes,
            health=self.io,
        )
        self.recovery = self._writer.recovery
        self._queue: queue.Queue[tuple[FeedbackRecord, Answer] | object] = queue.Queue(
            maxsize=settings.feedback_queue_size
        )
        self.stored = 0
        self.duplicates = 0
        self.commits = 0
        self.commit_seconds = 0.0
        self._closing = False
        self._closing_lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="feedback-writer", daemon=True)
        self._thread.start()

    def submit(self, record: FeedbackRecord) -> Answer:
        """Queue a record; the future gives (FeedbackStatus, feedback id) once it is durable (or raises)."""
        future: Answer = concurrent.futures.Future()
        with self._closing_lock:  # queued before close's stop marker, or refused: never left unanswered
            if self._closing:
                raise Unavailable("server is shutting down; retry on another replica")
            try:
                self._queue.put_nowait((record, future))
            except queue.Full:
                raise ResourceExhausted("feedback queue is full; retry later") from None
        return future

    def close(self, timeout: float = 30.0) -> None:
        with self._closing_lock:
            self._closing = True
        if self._thread.is_alive():
            self._queue.put(_STOP, timeout=timeout)
            self._thread.join(timeout)

    @property
    def healthy(self) -> bool:
        """The writer thread runs and its last write, roll and retention succeeded (else feedback is
        likely refused UNAVAILABLE)."""
        return self.io.healthy and self._thread.is_alive()

    @property
    def last_error(self) -> str:
        """The writer's most recent I/O failure ('' when none; kept after it recovered)."""
        return self.io.last_error

    def _run(self) -> None:
        while True:
            try:
                item = self._queue.get(timeout=1.0)
            except queue.Empty:
                self._writer.maybe_roll()
                continue
            group: list[tuple[FeedbackRecord, Answer]] = []
            stop = item is _STOP
            while not stop:
                assert isinstance(item, tuple)
                group.append(item)
                if len(group) >= self.settings.feedback_max_batch:
                    break
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                stop = item is _STOP
            if group:
                try:
                    self._commit(group)
                except Exception as error:  # a bug must not stop the writer, nor leave a sender waiting
                    log.exception("feedback: committing %d records failed", len(group))
                    for _, future in group:
                        if not future.done():
                            future.set_exception(Unavailable(f"feedback could not be stored ({error}): retry later"))
            if stop:
                self._writer.close()
                return
            self._writer.maybe_roll()

    def observe(self, rows: list[Row]) -> None:
        """Feedback other replicas stored (read by the join): later resends to this replica are
        DUPLICATE, and this replica's clock stamps past them."""
        mine = self.settings.replica_id
        with self._index_lock:
            for row in sorted((r for r in rows if r["replica"] != mine), key=order_key):
                self._index.add(row)
                self._clock_us = max(self._clock_us, _micros(row["ts"]))
            self._forget_before(self._clock_us - int(self.settings.quality_window_s * 1e6))

    def _forget_before(self, cutoff_us: int) -> None:
        # bounded memory: truths that last changed before the window, or past as many as the live join
        # keeps predictions, are forgotten (the oldest first); a resend of one is then stored again, and
        # every reader of the log still counts it once
        latest = self._index.latest
        while latest:
            pid, row = next(iter(latest.items()))
            if _micros(row["ts"]) >= cutoff_us and len(latest) <= self.settings.join_max_predictions:
                break
            self._index.forget(pid)

    def _commit(self, group: list[tuple[FeedbackRecord, Answer]]) -> None:
        answers: list[tuple[int, str]] = []
        new: list[FeedbackRecord] = []
        staged: list[Row] = []
        with self._index_lock:
            group_index = FeedbackIndex()  # the group's own messages, newer than anything indexed
            for record, _ in group:
                repeated = self._duplicate_of(record, group_index)
                if repeated is not None:
                    answers.append((DUPLICATE, repeated))
                    continue
                self._clock_us = max(time.time_ns() // 1000, self._clock_us + 1)
                record = dataclasses.replace(
                    record,
                    feedback_id=record.feedback_id or _generated_id(self.settings.replica_id, self._clock_us),
                    ts_ns=self._clock_us * 1000,
                )
                row = _index_row(record, self.settings.replica_id)
                group_index.add(row)
                staged.append(row)
                new.append(record)
                answers.append((ACCEPTED if self._known(record.prediction_id) else PENDING, record.feedback_id))
        started = time.perf_counter()
        try:
            if new:
                self._writer.write(to_batch(new, self.settings.replica_id))
        except Exception as exc:  # not durable: nothing of the group is acknowledged (nor indexed)
            log.exception("feedback: writing %d records failed", len(new))
            for _, future in group:
                future.set_exception(
                    Unavailable(f"feedback could not be stored ({type(exc).__name__}: {exc}): retry later")
                )
            return
        self.commits += 1
        self.commit_seconds += time.perf_counter() - started
        self.stored += len(new)
        self.duplicates += len(group) - len(new)
        with self._index_lock:
            for row in staged:
                self._index.add(row)
        for (_, future), answer in zip(group, answers, strict=True):
            future.set_result(answer)

    def _duplicate_of(self, record: FeedbackRecord, group: FeedbackIndex) -> str | None:
        pid, fid, content = record.prediction_id, record.feedback_id, record.content
        repeated = group.duplicate_of(pid, fid, content)
        if repeated is None and fid and self._index.has_id(pid, fid):
            repeated = fid
        if repeated is None and pid not in group.latest:  # else the group holds the current truth
            repeated = self._index.duplicate_of(pid, "", content)
        return repeated


Answer = concurrent.futures.Future[tuple[int, str]]


def _micros(ts: datetime) -> int:
    return (ts - _EPOCH) // timedelta(microseconds=1)


_EPOCH = datetime.fromtimestamp(0, UTC)


def _generated_id(replica: str, stamp_us: int) -> str:
    # unique without coordination: a replica's stamps never repeat
    return hashlib.sha256(f"{replica}/{stamp_us}".encode()).hexdigest()[:32]


def _index_row(record: FeedbackRecord, replica: str) -> Row:
    """What the duplicate check and the order need of a committed record."""
    sent = None if record.sent_at_ms is None else _EPOCH + timedelta(milliseconds=record.sent_at_ms)
    return {
        "prediction_id": record.prediction_id,
        "feedback_id": record.feedback_id,
        "content": record.content,
        "ts": _EPOCH + timedelta(microseconds=record.ts_ns // 1000),
        "sent_at": sent,
        "replica": replica,
    }


class FeedbackServicer(fpb_grpc.FeedbackServicer):
    """onnxgate.v1.Feedback on grpc.aio; `report` answers FeedbackReport: exact counts over the log's
    files (server/logquery.py, the same as `onnxgate dataset report`).

    Errors go through service.grpc_errors like every RPC: InvalidArgument for bad feedback,
    ResourceExhausted for a full feedback queue, UNAVAILABLE (logged) when it could not be stored (a
    full disk, an fsync error): nothing of it is stored, a retry is safe.
    """

    def __init__(self, store: FeedbackStore, report: Callable[[str, int], Report], answers: RequestCounts) -> None:
        self._store = store
        self._report = report
        self.answers = answers  # grpc_errors counts each answer here

    @grpc_errors
    async def SendFeedback(self, request: fpb.FeedbackRequest, context: Context) -> fpb.FeedbackResponse:
        record = record_from_proto(request)
        status, feedback_id = await asyncio.wrap_future(self._store.submit(record))
        return fpb.FeedbackResponse(
            prediction_id=record.prediction_id,
            feedback_id=feedback_id,
            status=status,  # type: ignore[arg-type]
        )

    @grpc_errors
    async def StreamFeedback(
        self, request_iterator: AsyncIterator[fpb.FeedbackRequest], context: Context
    ) -> fpb.StreamFeedbackResponse:
        futures: list[asyncio.Future[tuple[int, str]]] = []
        try:
            async for request in request_iterator:
                try:
                    record = record_from_proto(request)
                except InvalidArgument as e:
                    raise InvalidArgument(f"message {len(futures)}: {e.message}") from None
                futures.append(asyncio.wrap_future(self._store.submit(record)))
            statuses = [status for status, _ in await asyncio.gather(*futures)]
        except BaseException:
            await asyncio.gather(*futures, return_exceptions=True)  # what was submitted still becomes durable
            raise
        return fpb.StreamFeedbackResponse(
            received=len(statuses),
            accepted=statuses.count(ACCEPTED),
            duplicate=statuses.count(DUPLICATE),
            pending=statuses.count(PENDING),
        )

    @grpc_errors
    async def FeedbackReport(self, request: fpb.FeedbackReportRequest, context: Context) -> fpb.FeedbackReportResponse:
        # The report joins the whole log: run it off the event loop.
        r = await asyncio.to_thread(self._report, request.model_name, request.max_unknown_ids)
        return fpb.FeedbackReportResponse(
            predictions=r.predictions,
            feedback=r.feedback,
            joined=r.joined,
            pending=r.pending,
            unknown=r.unknown,
            unknown_ids=r.unknown_ids,
            reused_ids=r.reused_ids,
            unreadable_segments=len(r.unreadable),
        )


def truth_tensors_from_arrays(arrays: dict[str, np.ndarray]) -> list[fpb.TruthTensor]:
    """Client-side helper: numpy arrays -> TruthTensor messages (tests, tools)."""
    out = []
    for name, a in arrays.items():
        a = np.asarray(a)
        datatype = {"b": "BOOL", "i": "INT64", "u": "UINT64", "f": "FP64"}[a.dtype.kind]
        contents = pb.InferTensorContents()
        getattr(contents, _CONTENTS_FIELD[datatype]).extend(a.ravel().tolist())
        out.append(fpb.TruthTensor(name=name, datatype=datatype, shape=list(a.shape), contents=contents))
    return out

"""Feedback: ground truth and rewards for logged predictions, durable before they are acknowledged.

    servicer --validate--> FeedbackStore.submit() --queue--> writer thread: append + one fsync per group
                                        ^ future, resolved after the fsync  <--'

Concurrent feedback shares one fsync (group commit): the writer takes everything queued, appends it
as one Arrow batch to `<log_dir>/<replica_id>/feedback-<seq>.arrows`, fsyncs, then resolves every
future of the group. A feedback already stored (same prediction id and feedback id, in any replica's
files at start or since) is answered DUPLICATE and not stored again; the join dedupes as well, since
two replicas can each receive the same message.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import json
import logging
import math
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from onnxgate.server.errors import InvalidArgument, ResourceExhausted
from onnxgate.server.pb import feedback_pb2 as fpb
from onnxgate.server.pb import feedback_pb2_grpc as fpb_grpc
from onnxgate.server.pb import grpc_service_pb2 as pb
from onnxgate.server.predlog import PredLogSettings
from onnxgate.server.segments import SegmentWriter, read_segments
from onnxgate.server.service import Context, grpc_errors

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
    ts_ns: int = 0

    @property
    def key(self) -> tuple[str, str]:
        return (self.prediction_id, self.feedback_id)


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
) -> FeedbackRecord:
    """A validated record; the feedback id defaults to a hash of the content, so a resend dedupes."""
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
    content = json.dumps(
        [model, version, label, value, tensors and [list(t.__dict__.values()) for t in tensors], reward]
    )
    fid = feedback_id or hashlib.sha256(content.encode()).hexdigest()[:32]
    return FeedbackRecord(prediction_id, fid, model, version, label, value, tensors, reward, time.time_ns())


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
    )


def _truth_tensor(t: fpb.TruthTensor) -> TruthTensor:
    field = _CONTENTS_FIELD.get(t.datatype)
    if field is None:
        raise InvalidArgument(
            f"truth tensor '{t.name}': datatype {t.datatype!r} is not a numeric datatype "
            f"({', '.join(_CONTENTS_FIELD)}); send a string ground truth as label"
        )
    others = [f.name for f, v in t.contents.ListFields() if f.name != field and v]
    if others:
        raise InvalidArgument(f"truth tensor '{t.name}' of datatype {t.datatype} carries {others[0]}, expected {field}")
    values = tuple(float(v) for v in getattr(t.contents, field))
    if any(d < 0 for d in t.shape) or int(np.prod(t.shape)) != len(values):
        raise InvalidArgument(
            f"truth tensor '{t.name}': shape {list(t.shape)} holds {int(np.prod(t.shape))} "
            f"elements, {len(values)} given"
        )
    return TruthTensor(t.name, t.datatype, tuple(t.shape), values)


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
        ],
        schema=SCHEMA,
    )


def read_feedback(log_dir: Path) -> pa.Table:
    """Every replica's feedback, duplicates included (the join removes them)."""
    tables = [t for replica in _replica_dirs(log_dir) for _, t in read_segments(replica, FEEDBACK)]
    return pa.concat_tables([t.cast(SCHEMA) for t in tables]) if tables else SCHEMA.empty_table()


def _replica_dirs(log_dir: Path) -> list[Path]:
    return sorted(p for p in log_dir.iterdir() if p.is_dir()) if log_dir.is_dir() else []


_STOP = object()


class FeedbackStore:
    """Appends feedback to this replica's feedback segments; a future per record resolves after fsync."""

    def __init__(self, settings: PredLogSettings, known: Callable[[str], bool] = lambda _id: False) -> None:
        self.settings = settings
        self._known = known
        existing = read_feedback(settings.log_dir)
        self._seen: set[tuple[str, str]] = set(
            zip(existing["prediction_id"].to_pylist(), existing["feedback_id"].to_pylist(), strict=True)
        )
        self._writer = SegmentWriter(
            settings.replica_dir,
            FEEDBACK,
            max_bytes=settings.segment_max_bytes,
            max_age_s=settings.segment_max_age_s,
            fsync=settings.fsync,
            retention_s=settings.retention_s,
            retention_bytes=settings.retention_bytes,
        )
        self.recovery = self._writer.recovery
        self._queue: queue.Queue[tuple[FeedbackRecord, concurrent.futures.Future[int]] | object] = queue.Queue(
            maxsize=settings.feedback_queue_size
        )
        self.stored = 0
        self.duplicates = 0
        self.commits = 0
        self.commit_seconds = 0.0
        self._thread = threading.Thread(target=self._run, name="feedback-writer", daemon=True)
        self._thread.start()

    def submit(self, record: FeedbackRecord) -> concurrent.futures.Future[int]:
        """Queue a record; the future gives its FeedbackStatus once it is durable (or raises)."""
        future: concurrent.futures.Future[int] = concurrent.futures.Future()
        try:
            self._queue.put_nowait((record, future))
        except queue.Full:
            raise ResourceExhausted("feedback queue is full; retry later") from None
        return future

    def close(self, timeout: float = 30.0) -> None:
        if self._thread.is_alive():
            self._queue.put(_STOP, timeout=timeout)
            self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            try:
                item = self._queue.get(timeout=1.0)
            except queue.Empty:
                self._writer.maybe_roll()
                continue
            group: list[tuple[FeedbackRecord, concurrent.futures.Future[int]]] = []
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
                self._commit(group)
            if stop:
                self._writer.close()
                return
            self._writer.maybe_roll()

    def _commit(self, group: list[tuple[FeedbackRecord, concurrent.futures.Future[int]]]) -> None:
        statuses: list[int] = []
        new: list[FeedbackRecord] = []
        for record, _ in group:
            if record.key in self._seen:
                statuses.append(DUPLICATE)
                continue
            self._seen.add(record.key)
            new.append(record)
            statuses.append(ACCEPTED if self._known(record.prediction_id) else PENDING)
        started = time.perf_counter()
        try:
            if new:
                self._writer.append(to_batch(new, self.settings.replica_id))
                self._writer.sync()
        except Exception as exc:  # not durable: nothing of the group is acknowledged
            log.exception("feedback: writing %d records failed", len(new))
            self._seen.difference_update(r.key for r in new)
            for _, future in group:
                future.set_exception(exc)
            return
        self.commits += 1
        self.commit_seconds += time.perf_counter() - started
        self.stored += len(new)
        self.duplicates += len(group) - len(new)
        for (_, future), status in zip(group, statuses, strict=True):
            future.set_result(status)


class FeedbackServicer(fpb_grpc.FeedbackServicer):
    """onnxgate.v1.Feedback on grpc.aio; `report` answers FeedbackReport (the joiner's view).

    Errors go through service.grpc_errors like every RPC: InvalidArgument for bad feedback,
    ResourceExhausted for a full feedback queue, INTERNAL (logged) when the append or fsync failed.
    """

    def __init__(self, store: FeedbackStore, report: Callable[[str, int], fpb.FeedbackReportResponse]) -> None:
        self._store = store
        self._report = report

    @grpc_errors
    async def SendFeedback(self, request: fpb.FeedbackRequest, context: Context) -> fpb.FeedbackResponse:
        record = record_from_proto(request)
        status = await asyncio.wrap_future(self._store.submit(record))
        return fpb.FeedbackResponse(
            prediction_id=record.prediction_id,
            feedback_id=record.feedback_id,
            status=status,  # type: ignore[arg-type]
        )

    @grpc_errors
    async def StreamFeedback(
        self, request_iterator: AsyncIterator[fpb.FeedbackRequest], context: Context
    ) -> fpb.StreamFeedbackResponse:
        futures: list[asyncio.Future[int]] = []
        try:
            async for request in request_iterator:
                try:
                    record = record_from_proto(request)
                except InvalidArgument as e:
                    raise InvalidArgument(f"message {len(futures)}: {e.message}") from None
                futures.append(asyncio.wrap_future(self._store.submit(record)))
            statuses = await asyncio.gather(*futures)
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
        return await asyncio.to_thread(self._report, request.model_name, request.max_unknown_ids)


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

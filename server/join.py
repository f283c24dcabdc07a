"""Predictions joined with their feedback: live quality per model and version, labelled rows.

Readers see every replica: they scan `<log_dir>/*/` (see server/predlog.py for the layout). Feedback
is deduplicated here and the latest feedback of a prediction is its truth, by the rule of
server/feedback_order.py (clock-proof order, corrections are never duplicates). Feedback whose
prediction is not in the log is *pending* while younger than `unknown_after_s`, then *unknown*:
counted and listed, and still joined if the prediction turns up later. A prediction id that several
logged predictions carry (a client reusing its own ids) is counted as reused; its feedback joins the
latest of them (by time) that matches the feedback's model and version. A file that cannot be read is
skipped and reported (`skipped`), never fatal.

Quality, per (model, version), against the model's primary output (the output with the fewest
elements, e.g. skl2onnx's `label` rather than `probabilities`):
    label truth -> accuracy;  value truth -> MAE, RMSE;  tensor truth -> accuracy for integer outputs,
    MAE/RMSE for float outputs, element-wise;  reward -> mean reward.

Shadow rows (server/routing.py) carry the shadow version's outputs next to the champion's: the live join
keeps the shadow's primary output (the champion's primary output's name) and, for label truth (and
integer tensor truth, element-wise), counts per (model, shadow version) the paired outcomes
(`Snapshot.shadow_pairs`): what McNemar's test of a shadow challenger reads (server/experiments.py).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from onnxgate.server.feedback import FEEDBACK
from onnxgate.server.feedback_order import FeedbackIndex, Row, order_key
from onnxgate.server.logfiles import LogFiles, Segment
from onnxgate.server.predlog import (
    INPUT_PREFIX,
    OUTPUT_PREFIX,
    PREDICTIONS,
    SHADOW_OUTPUT_PREFIX,
    SHAPE_SUFFIX,
    PredictionLog,
    model_dirs,
)
from onnxgate.server.segments import PARQUET_EXT, SkipList, read_segment, segment_paths

log = logging.getLogger(__name__)


def read_predictions(
    log_dir: Path,
    models: Collection[str] | None = None,
    *,
    with_inputs: bool = True,
    cache: dict[Path, pa.Table] | None = None,
    on_segment: Callable[[Path, pa.Table], None] | None = None,
    skipped: SkipList | None = None,
) -> pa.Table | None:
    """Every replica's predictions of the given models as one table (columns of all versions, nulls where
    a version lacks one). `cache` keeps immutable Parquet segments between calls (the periodic joiner);
    `on_segment` sees each segment's table; unreadable files are skipped and listed in `skipped`."""
    tables = []
    live: set[Path] = set()
    for model_dir in model_dirs(log_dir, models, skipped):
        for path in segment_paths(model_dir, PREDICTIONS, skipped):
            table = cache.get(path) if cache is not None else None
            if table is None:
                table = _read(path, with_inputs, skipped)
                if table is not None and cache is not None and path.suffix == PARQUET_EXT:
                    cache[path] = table
            live.add(path)
            if table is not None and table.num_rows:
                tables.append(table)
                if on_segment is not None:
                    on_segment(path, table)
    if cache is not None:
        for gone in set(cache) - live:  # removed by retention
            del cache[gone]
    return pa.concat_tables(tables, promote_options="permissive") if tables else None


def _read(path: Path, with_inputs: bool, skipped: SkipList | None) -> pa.Table | None:
    if with_inputs:
        return read_segment(path, skipped)
    if path.suffix == PARQUET_EXT:
        try:
            names = pq.read_schema(path).names
            return pq.read_table(path, columns=[n for n in names if not n.startswith(INPUT_PREFIX)])
        except FileNotFoundError:
            return None
        except (pa.ArrowException, OSError) as error:
            if skipped is not None:
                skipped[path] = f"{type(error).__name__}: {error}"
            return None
    table = read_segment(path, skipped)
    return None if table is None else table.select([n for n in table.column_names if not n.startswith(INPUT_PREFIX)])


@dataclass
class FeedbackView:
    latest: dict[str, Row]  # prediction id -> its latest feedback
    distinct: int
    duplicates: int


def dedupe_feedback(feedback: pa.Table | list[Row]) -> FeedbackView:
    index = FeedbackIndex.of(feedback if isinstance(feedback, list) else feedback.to_pylist())
    return FeedbackView(index.latest, index.distinct, index.duplicates)


@dataclass
class Joined:
    rows: list[tuple[Row, Row]]  # (prediction, feedback), one per prediction id with feedback
    predictions: int
    feedback: FeedbackView
    pending: list[str]
    unknown: list[str]
    reused: int = 0  # prediction ids carried by more than one logged prediction


def join(
    predictions: pa.Table | None, view: FeedbackView, *, unknown_after_s: float, now: float | None = None
) -> Joined:
    """Inner join by prediction id (of a reused id, the latest matching prediction); unmatched feedback
    is pending or unknown."""
    now = time.time() if now is None else now
    matched: dict[str, Row] = {}
    n_predictions = 0
    reused = 0
    if predictions is not None and predictions.num_rows:
        counts = pc.value_counts(predictions["id"])
        n_predictions = len(counts)
        reused = pc.sum(pc.greater(counts.field("counts"), 1)).as_py() or 0
        if view.latest:
            wanted = pc.is_in(predictions["id"], value_set=pa.array(list(view.latest), pa.string()))
            for row in sorted(predictions.filter(wanted).to_pylist(), key=lambda r: r["ts"]):
                if _matches(row, view.latest[row["id"]]):
                    matched[row["id"]] = row  # later rows of a reused id replace earlier ones
    pending: list[str] = []
    unknown: list[str] = []
    for pid, fb in view.latest.items():
        if pid not in matched:
            (unknown if now - fb["ts"].timestamp() >= unknown_after_s else pending).append(pid)
    rows = [(row, view.latest[pid]) for pid, row in matched.items()]
    return Joined(rows, n_predictions, view, sorted(pending), sorted(unknown), reused)


def _matches(prediction: Row, feedback: Row) -> bool:
    return (not feedback["model"] or feedback["model"] == prediction["model"]) and (
        not feedback["version"] or feedback["version"] == prediction["version"]
    )


def output_names(row: Row) -> list[str]:
    return [
        k[len(OUTPUT_PREFIX) :]
        for k in row
        if k.startswith(OUTPUT_PREFIX) and not k.endswith(SHAPE_SUFFIX) and row[k] is not None
    ]


def primary_output(row: Row) -> str | None:
    """The output a truth is compared with: the one with the fewest elements (a label, not scores)."""
    names = output_names(row)
    return min(names, key=lambda n: (len(row[OUTPUT_PREFIX + n]), n)) if names else None


@dataclass(slots=True)  # one per joined prediction in the live join: no __dict__
class Quality:
    joined: int = 0
    labelled: int = 0
    correct: int = 0
    regressed: int = 0
    abs_error: float = 0.0
    sq_error: float = 0.0
    rewarded: int = 0
    reward: float = 0.0

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.labelled if self.labelled else None

    @property
    def mae(self) -> float | None:
        return self.abs_error / self.regressed if self.regressed else None

    @property
    def rmse(self) -> float | None:
        return math.sqrt(self.sq_error / self.regressed) if self.regressed else None

    @property
    def mean_reward(self) -> float | None:
        return self.reward / self.rewarded if self.rewarded else None

    def merge(self, other: Quality, sign: int) -> None:
        """Add (sign 1) or take away (sign -1) another's sums: a joined row's contribution."""
        for f in dataclasses.fields(self):
            setattr(self, f.name, getattr(self, f.name) + sign * getattr(other, f.name))

    def add(self, prediction: Row, feedback: Row) -> None:
        name = primary_output(prediction)
        self.add_primary(None if name is None else prediction[OUTPUT_PREFIX + name], feedback)

    def add_primary(self, predicted: Sequence[Any] | None, feedback: Row) -> None:
        """One joined prediction, by its primary output's values (see primary_output)."""
        self.joined += 1
        if feedback["reward"] is not None:
            self.rewarded += 1
            self.reward += feedback["reward"]
        if predicted is None:
            return
        if feedback["label"] is not None and len(predicted) == 1:
            self.labelled += 1
            self.correct += _same_label(predicted[0], feedback["label"])
        elif feedback["value"] is not None and len(predicted) == 1:
            self._errors([float(predicted[0])], [feedback["value"]])
        elif feedback["tensors"]:
            truth = [v for t in feedback["tensors"] for v in t["values"]]
            if len(truth) != len(predicted):
                return
            if all(isinstance(p, int) for p in predicted):  # int and bool outputs: classes
                self.labelled += len(truth)
                self.correct += sum(float(p) == t for p, t in zip(predicted, truth, strict=True))
            else:
                self._errors([float(p) for p in predicted], truth)

    def _errors(self, predicted: list[float], truth: list[float]) -> None:
        for p, t in zip(predicted, truth, strict=True):
            self.regressed += 1
            self.abs_error += abs(p - t)
            self.sq_error += (p - t) ** 2


def correctness(predicted: Sequence[Any] | None, feedback: Row) -> list[bool] | None:
    """Per element, whether a primary output's values are right against class truth (a label, or a tensor
    truth for integer outputs), as Quality counts `correct`; None where the truth is not a class."""
    if predicted is None:
        return None
    if feedback["label"] is not None and len(predicted) == 1:
        return [_same_label(predicted[0], feedback["label"])]
    if feedback["label"] is None and feedback["value"] is None and feedback["tensors"]:
        truth = [v for t in feedback["tensors"] for v in t["values"]]
        if len(truth) == len(predicted) and all(isinstance(p, int) for p in predicted):
            return [float(p) == t for p, t in zip(predicted, truth, strict=True)]
    return None


class Pairs(NamedTuple):
    """Paired outcomes of a champion and its shadow on the same labelled predictions (McNemar's table)."""

    n: int  # paired labelled predictions (elements, for tensor truth)
    b: int  # the champion right, the shadow wrong
    c: int  # the champion wrong, the shadow right
    both: int  # both right

    def plus(self, other: Pairs, sign: int) -> Pairs:
        return Pairs(*(x + sign * y for x, y in zip(self, other, strict=True)))


def pairs(champion: Sequence[Any] | None, shadow: Sequence[Any] | None, feedback: Row) -> Pairs | None:
    """The paired outcomes of one joined prediction, or None where there is nothing to pair."""
    right, shadow_right = correctness(champion, feedback), correctness(shadow, feedback)
    if right is None or shadow_right is None or len(right) != len(shadow_right):
        return None
    b = sum(r and not s for r, s in zip(right, shadow_right, strict=True))
    c = sum(s and not r for r, s in zip(right, shadow_right, strict=True))
    return Pairs(len(right), b, c, sum(r and s for r, s in zip(right, shadow_right, strict=True)))


def _same_label(predicted: object, label: str) -> bool:
    if isinstance(predicted, bytes):
        return predicted.decode(errors="replace") == label
    if isinstance(predicted, str):
        return predicted == label
    try:
        return float(predicted) == float(label)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return str(predicted) == label


def quality(joined: Joined) -> dict[tuple[str, str], Quality]:
    out: dict[tuple[str, str], Quality] = {}
    for prediction, feedback in joined.rows:
        out.setdefault((prediction["model"], prediction["version"]), Quality()).add(prediction, feedback)
    return out


@dataclass
class Snapshot:
    """The live join's view after a round: quality per (model, version) over the window, and counts."""

    quality: dict[tuple[str, str], Quality]
    predictions: int  # distinct prediction ids in the window
    joined: int
    pending: list[str]  # feedback without its prediction, younger than unknown_after_s (at most SNAPSHOT_IDS)
    unknown: list[str]  # ... older
    duplicates: int
    reused: int  # prediction ids in the window that several logged predictions carry
    pending_count: int = 0
    unknown_count: int = 0
    at: float = field(default_factory=time.time)
    # (model, shadow version) -> paired outcomes of the champion and the shadow on labelled predictions
    shadow_pairs: dict[tuple[str, str], Pairs] = field(default_factory=dict)


@dataclass(slots=True)
class _Prediction:
    """What the live join keeps of the latest prediction of an id: ~300 bytes, not the row's ~1.5 kB."""

    model: str
    version: str
    ts_us: int
    primary: tuple[Any, ...] | None  # the primary output's values (primary_output)
    count: int = 1
    shadow: tuple[str, tuple[Any, ...]] | None = None  # (shadow version, its output of the primary's name)


_ABSENT = np.iinfo(np.int64).max  # the length of an output a row does not have: never the primary


def predictions_of(batch: pa.RecordBatch) -> list[tuple[str, _Prediction]]:
    """(id, what the live join keeps) for each row of a batch of prediction rows, built column by column
    with the same primary output as primary_output(row). A dict per row (to_pylist) cost the joiner
    5x the CPU, every bit of it holding the GIL that the serving loop waits for."""
    names = batch.schema.names
    ids: list[str] = batch.column("id").to_pylist()
    intern = sys.intern
    models = [intern(m) for m in batch.column("model").to_pylist()]
    versions = [intern(v) for v in batch.column("version").to_pylist()]
    micros = batch.column("ts").cast(pa.timestamp("us", "UTC")).cast(pa.int64()).to_pylist()
    outputs = sorted(
        n[len(OUTPUT_PREFIX) :] for n in names if n.startswith(OUTPUT_PREFIX) and not n.endswith(SHAPE_SUFFIX)
    )
    primary: list[str | None] = [None] * len(ids)
    if outputs:
        # per row, the output with the fewest elements; ties to the first name (sorted), as primary_output
        lengths = np.stack(
            [pc.list_value_length(batch.column(OUTPUT_PREFIX + o)).fill_null(_ABSENT).to_numpy() for o in outputs]
        )
        chosen = lengths.argmin(axis=0)
        present = lengths.min(axis=0) != _ABSENT
        primary = [outputs[c] if ok else None for c, ok in zip(chosen.tolist(), present.tolist(), strict=True)]
    values = {o: batch.column(OUTPUT_PREFIX + o).to_pylist() for o in set(primary) if o is not None}
    shadow_versions = batch.column("shadow_version").to_pylist() if "shadow_version" in names else None
    shadow_values: dict[str, list[Any] | None] = {}
    result = []
    for i, pid in enumerate(ids):
        name = primary[i]
        shadow = None
        if name is not None and shadow_versions is not None and shadow_versions[i] is not None:
            if name not in shadow_values:
                column = SHADOW_OUTPUT_PREFIX + name
                shadow_values[name] = batch.column(column).to_pylist() if column in names else None
            column_values = shadow_values[name]
            if column_values is not None and column_values[i] is not None:
                shadow = (intern(shadow_versions[i]), tuple(column_values[i]))
        kept = None if name is None else tuple(values[name][i])
        result.append((pid, _Prediction(models[i], versions[i], micros[i], kept, shadow=shadow)))
    return result


class Joiner:
    """The live join: every `interval_s`, predictions ⋈ feedback over what is new since the last round.

    Incremental: a watermark per segment (rows consumed) means each round reads only the open segments
    that grew and segments it has not finished; a rolled segment read to its end is never read again.
    Bounded: it keeps the predictions of the last `window_s` of prediction time (at most
    `max_predictions` of them), their feedback, and feedback still waiting for its prediction; what
    leaves the window leaves the quality metrics with it. So the metrics are the quality of the recent
    predictions, and memory does not grow with the log. Exact numbers over everything the log holds are
    the `dataset` commands' and FeedbackReport's (they read the files).
    """

    def __init__(
        self,
        log: LogFiles | Path | Sequence[LogFiles],
        *,
        interval_s: float,
        unknown_after_s: float,
        window_s: float = 3600.0,
        max_predictions: int = 500_000,
        predlog: PredictionLog | None = None,
    ) -> None:
        self.logs = [LogFiles.at(log)] if isinstance(log, Path) else [log] if isinstance(log, LogFiles) else list(log)
        self.interval_s = interval_s
        self.unknown_after_s = unknown_after_s
        self.window_s = window_s
        self.max_predictions = max_predictions
        self._predlog = predlog
        self._done: dict[SegmentKey, int] = {}  # rows consumed per segment
        self._sizes: dict[SegmentKey, int] = {}  # bytes of an open segment when last read
        self._complete: set[SegmentKey] = set()  # rolled and consumed to the end (or older than the window)
        # in order of arrival, the oldest first. OrderedDicts: eviction takes the oldest again and again,
        # and a plain dict walks past every slot deleted at its front to find it (k evictions: k x n)
        self._predictions: OrderedDict[str, _Prediction] = OrderedDict()
        self._feedback = FeedbackIndex()
        self._contributions: dict[str, tuple[tuple[str, str], Quality]] = {}
        self._quality: dict[tuple[str, str], Quality] = {}
        # shadow rows: prediction id -> ((model, shadow version), its paired outcomes), and their sums
        self._pair_contributions: dict[str, tuple[tuple[str, str], Pairs]] = {}
        self._pairs: dict[tuple[str, str], Pairs] = {}
        self._pending: OrderedDict[str, float] = OrderedDict()  # prediction id -> its feedback's stamp (s)
        self._newest_us = 0  # the newest prediction time seen: the window ends there
        self._reused = 0
        self.skipped: SkipList = {}  # unreadable files met by the latest round
        self.segments_read = 0  # work done, for the metrics (and to show it grows with new rows only)
        self.rows_read = 0
        self.last_round_s = 0.0
        # the feedback store's observe(): every round tells it the new feedback other replicas stored
        self.on_feedback: Callable[[list[Row]], None] | None = None
        # live experiments (server/experiments.py): every round's snapshot, on this thread, after the round
        self.on_round: Callable[[Snapshot], None] | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.snapshot: Snapshot | None = None
        self._thread = threading.Thread(target=self._run, name="predlog-joiner", daemon=True)

    def start(self) -> Joiner:
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(10)

    def known(self, prediction_id: str) -> bool:
        """Whether the prediction is in the window (as of the last round, or written by this process since)."""
        return prediction_id in self._predictions or (self._predlog is not None and self._predlog.seen(prediction_id))

    def run_once(self) -> Snapshot:
        started = time.perf_counter()
        with self._lock:
            if self._predlog is not None:
                self._predlog.pop_recent_ids()  # written before this point: on disk, read below
            now = time.time()
            skipped: SkipList = {}
            listed: set[SegmentKey] = set()
            cutoff_us = (self._newest_us or int(now * 1e6)) - int(self.window_s * 1e6)
            for logfiles in self.logs:
                for kind in (PREDICTIONS, FEEDBACK):
                    for segment in logfiles.segments(kind, skipped=skipped):
                        listed.add(segment.key)
                        for rows in self._read_new(logfiles, segment, cutoff_us, skipped):
                            self._take(kind, rows, now)
            for gone in set(self._done) - listed:  # removed by retention
                self._done.pop(gone, None)
                self._sizes.pop(gone, None)
                self._complete.discard(gone)
            for path in skipped.keys() - self.skipped.keys():
                log.warning("prediction log: skipped unreadable file %s (%s)", path, skipped[path])
            self.skipped = skipped
            self._evict(now)
            self.snapshot = self._snapshot(now)
            self.last_round_s = time.perf_counter() - started
            snapshot = self.snapshot
        if self.on_round is not None:
            try:
                self.on_round(snapshot)
            except Exception:  # the join's metrics must not stop for an experiment's failure
                log.exception("live experiments failed on the join round")
        return snapshot

    def _take(self, kind: str, batch: pa.RecordBatch, now: float) -> None:
        """One chunk of new rows. A chunk at a time, evicting as it goes, so that catching up with a large
        log (the first round) stays within the same bounds as every later round."""
        if kind == PREDICTIONS:
            for pid, prediction in predictions_of(batch):
                self._add_prediction(pid, prediction)
            self._evict(now)
            return
        rows: list[Row] = batch.to_pylist()
        if self.on_feedback is not None:
            self.on_feedback(rows)
        for row in sorted(rows, key=order_key):
            self._add_feedback(row)

    # -- reading what is new --------------------------------------------------------------------------
    def _read_new(
        self, logfiles: LogFiles, segment: Segment, cutoff_us: int, skipped: SkipList
    ) -> Iterator[pa.RecordBatch]:
        """The rows of a segment past its watermark, in chunks of CHUNK_ROWS."""
        key = segment.key
        if key in self._complete or (not segment.rolled and self._sizes.get(key) == segment.size):
            return
        if segment.rolled and key not in self._done:
            newest = logfiles.newest_ts(segment)
            if newest is not None and newest < cutoff_us:  # all of it before the window: never needed
                self._complete.add(key)
                return
        table = logfiles.read(segment, skipped)
        if table is None:
            return
        self.segments_read += 1
        done = self._done.get(key, 0)
        self._done[key] = table.num_rows
        if segment.rolled:
            self._complete.add(key)
        else:
            self._sizes[key] = segment.size
        if table.num_rows <= done:
            return
        if segment.kind == PREDICTIONS:  # the inputs are not needed for quality
            table = table.select([n for n in table.column_names if not n.startswith(INPUT_PREFIX)])
        for batch in table.slice(done).to_batches(max_chunksize=CHUNK_ROWS):
            self.rows_read += batch.num_rows
            yield batch

    # -- the join -------------------------------------------------------------------------------------
    def _add_prediction(self, pid: str, new: _Prediction) -> None:
        self._newest_us = max(self._newest_us, new.ts_us)
        current = self._predictions.pop(pid, None)
        if current is not None:
            if current.count == 1:
                self._reused += 1
            new.count = current.count + 1
            if new.ts_us < current.ts_us:  # a reused id: the latest prediction is the one joined
                new.model, new.version, new.ts_us, new.primary, new.shadow = (
                    current.model, current.version, current.ts_us, current.primary, current.shadow,
                )  # fmt: skip
        self._predictions[pid] = new
        if pid in self._feedback.latest:
            self._join(pid)

    def _add_feedback(self, row: Row) -> None:
        pid = row["prediction_id"]
        if self._feedback.add(row) and self._feedback.latest[pid] is row:  # the prediction's truth changed
            self._join(pid)

    def _join(self, pid: str) -> None:
        feedback = self._feedback.latest[pid]
        prediction = self._predictions.get(pid)
        self._unjoin(pid)
        if prediction is None or not _matches({"model": prediction.model, "version": prediction.version}, feedback):
            self._pending[pid] = feedback["ts"].timestamp()
            return
        self._pending.pop(pid, None)
        contribution = Quality()
        contribution.add_primary(prediction.primary, feedback)
        key = (prediction.model, prediction.version)
        self._contributions[pid] = (key, contribution)
        self._quality.setdefault(key, Quality()).merge(contribution, 1)
        if prediction.shadow is not None:
            paired = pairs(prediction.primary, prediction.shadow[1], feedback)
            if paired is not None and paired.n:
                shadow_key = (prediction.model, prediction.shadow[0])
                self._pair_contributions[pid] = (shadow_key, paired)
                self._pairs[shadow_key] = self._pairs.get(shadow_key, _NO_PAIRS).plus(paired, 1)

    def _unjoin(self, pid: str) -> None:
        old = self._contributions.pop(pid, None)
        if old is not None:
            key, contribution = old
            self._quality[key].merge(contribution, -1)
            if not self._quality[key].joined:
                del self._quality[key]
        paired = self._pair_contributions.pop(pid, None)
        if paired is not None:
            shadow_key, counts = paired
            left = self._pairs[shadow_key].plus(counts, -1)
            if left.n:
                self._pairs[shadow_key] = left
            else:
                del self._pairs[shadow_key]

    def _evict(self, now: float) -> None:
        cutoff_us = self._newest_us - int(self.window_s * 1e6)
        while self._predictions:
            pid, oldest = next(iter(self._predictions.items()))
            if len(self._predictions) <= self.max_predictions and oldest.ts_us >= cutoff_us:
                break
            del self._predictions[pid]
            if oldest.count > 1:
                self._reused -= 1
            self._unjoin(pid)
            self._feedback.forget(pid)
            self._pending.pop(pid, None)
        while self._pending:  # feedback that waited a whole window for its prediction
            pid, stamp = next(iter(self._pending.items()))
            if now - stamp < self.window_s and len(self._pending) <= self.max_predictions:
                break
            del self._pending[pid]
            self._feedback.forget(pid)

    def _snapshot(self, now: float) -> Snapshot:
        # waiting feedback is in the order it began to wait: the unknown ones (waited longest) come first,
        # so counting them stops at the first younger one; the lists keep at most SNAPSHOT_IDS ids each
        unknown: list[str] = []
        unknown_count = 0
        for pid, stamp in self._pending.items():
            if now - stamp < self.unknown_after_s:
                break
            unknown_count += 1
            if len(unknown) < SNAPSHOT_IDS:
                unknown.append(pid)
        pending_count = len(self._pending) - unknown_count
        pending = list(itertools.islice(reversed(self._pending), min(pending_count, SNAPSHOT_IDS)))
        quality = {key: dataclasses.replace(q) for key, q in self._quality.items()}
        return Snapshot(
            quality,
            len(self._predictions),
            len(self._contributions),
            sorted(pending),
            sorted(unknown),
            self._feedback.duplicates,
            self._reused,
            pending_count=pending_count,
            unknown_count=unknown_count,
            shadow_pairs=dict(self._pairs),
        )

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.run_once()
            except Exception:  # a bad segment must not stop the metrics: log and try again next round
                log.exception("prediction log: join failed")


SegmentKey = tuple[str, str | None, str, int]
_NO_PAIRS = Pairs(0, 0, 0, 0)
CHUNK_ROWS = 10_000
SNAPSHOT_IDS = 1000


class QualityCollector(Collector):
    """Live quality metrics from the joiner's latest snapshot, read at scrape time."""

    def __init__(self, joiner: Joiner) -> None:
        self._joiner = joiner

    def collect(self) -> Iterator[Metric]:
        snap = self._joiner.snapshot
        labels = ["model", "version"]
        families = {
            "joined": GaugeMetricFamily(
                "onnxgate_quality_joined_predictions", "Predictions of the quality window with feedback", labels=labels
            ),
            "accuracy": GaugeMetricFamily(
                "onnxgate_quality_accuracy_ratio",
                "Accuracy of the primary output against label feedback",
                labels=labels,
            ),
            "mae": GaugeMetricFamily(
                "onnxgate_quality_mae", "Mean absolute error against value feedback", labels=labels
            ),
            "rmse": GaugeMetricFamily(
                "onnxgate_quality_rmse", "Root mean squared error against value feedback", labels=labels
            ),
            "mean_reward": GaugeMetricFamily(
                "onnxgate_quality_mean_reward", "Mean reward of joined predictions", labels=labels
            ),
        }
        pending = GaugeMetricFamily("onnxgate_feedback_pending", "Feedback waiting for its prediction")
        unknown = GaugeMetricFamily(
            "onnxgate_feedback_unknown", "Feedback whose prediction id was not found within the grace period"
        )
        duplicates = GaugeMetricFamily(
            "onnxgate_feedback_duplicates", "Duplicate feedback messages the live join has met"
        )
        reused = GaugeMetricFamily(
            "onnxgate_predlog_reused_prediction_ids", "Prediction ids that more than one logged prediction carries"
        )
        unreadable = GaugeMetricFamily(
            "onnxgate_predlog_unreadable_files", "Log files the latest join skipped because they could not be read"
        )
        j = self._joiner
        window = GaugeMetricFamily(
            "onnxgate_predlog_join_window_predictions", "Predictions the live join holds (its quality window)"
        )
        work = [
            CounterMetricFamily(
                "onnxgate_predlog_join_segments_read", "Segments the live join read", value=j.segments_read
            ),
            CounterMetricFamily("onnxgate_predlog_join_rows_read", "New rows the live join read", value=j.rows_read),
            GaugeMetricFamily(
                "onnxgate_predlog_join_last_round_seconds", "Duration of the latest join round", value=j.last_round_s
            ),
        ]
        if snap is not None:
            for (model, version), q in sorted(snap.quality.items()):
                for key, fam in families.items():
                    value = q.joined if key == "joined" else getattr(q, key)
                    if value is not None:
                        fam.add_metric([model, version], value)
            pending.add_metric([], snap.pending_count)
            unknown.add_metric([], snap.unknown_count)
            duplicates.add_metric([], snap.duplicates)
            reused.add_metric([], snap.reused)
            window.add_metric([], snap.predictions)
            unreadable.add_metric([], len(self._joiner.skipped))
        yield from families.values()
        yield from (pending, unknown, duplicates, reused, unreadable, window, *work)

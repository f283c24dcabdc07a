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
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from onnxgate.server.feedback import read_feedback
from onnxgate.server.feedback_order import FeedbackIndex, Row
from onnxgate.server.pb import feedback_pb2 as fpb
from onnxgate.server.predlog import INPUT_PREFIX, OUTPUT_PREFIX, PREDICTIONS, SHAPE_SUFFIX, PredictionLog, model_dirs
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


@dataclass
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

    def add(self, prediction: Row, feedback: Row) -> None:
        self.joined += 1
        if feedback["reward"] is not None:
            self.rewarded += 1
            self.reward += feedback["reward"]
        name = primary_output(prediction)
        if name is None:
            return
        predicted = prediction[OUTPUT_PREFIX + name]
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
    joined: Joined
    quality: dict[tuple[str, str], Quality]
    at: float = field(default_factory=time.time)


class Joiner:
    """Re-joins the whole log every `interval_s` in a background thread; keeps the latest snapshot."""

    def __init__(
        self, log_dir: Path, *, interval_s: float, unknown_after_s: float, predlog: PredictionLog | None = None
    ) -> None:
        self.log_dir = log_dir
        self.interval_s = interval_s
        self.unknown_after_s = unknown_after_s
        self._predlog = predlog
        self._cache: dict[Path, pa.Table] = {}
        self._ids: set[str] = set()
        self._id_rows: dict[Path, int] = {}
        self.skipped: SkipList = {}  # unreadable files met by the latest join
        # the feedback store's observe(): every join tells it what other replicas stored
        self.on_feedback: Callable[[list[Row]], None] | None = None
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
        """Whether the prediction is in the log (as of the last join, or written by this process since)."""
        return prediction_id in self._ids or (self._predlog is not None and self._predlog.seen(prediction_id))

    def run_once(self) -> Snapshot:
        with self._lock:
            recent = self._predlog.pop_recent_ids() if self._predlog is not None else set()
            skipped: SkipList = {}
            predictions = read_predictions(
                self.log_dir, with_inputs=False, cache=self._cache, on_segment=self._add_ids, skipped=skipped
            )
            feedback = read_feedback(self.log_dir, skipped).to_pylist()
            for path in skipped.keys() - self.skipped.keys():
                log.warning("prediction log: skipped unreadable file %s (%s)", path, skipped[path])
            self.skipped = skipped
            if self.on_feedback is not None:
                self.on_feedback(feedback)
            joined = join(predictions, dedupe_feedback(feedback), unknown_after_s=self.unknown_after_s)
            self._ids |= recent
            self.snapshot = Snapshot(joined, quality(joined))
            return self.snapshot

    def _add_ids(self, path: Path, table: pa.Table) -> None:
        # Only rows not seen before: a stream segment grows between joins, and its Parquet roll (same
        # stem) holds the same rows; ids stay known after retention removes their segment.
        stem = path.with_suffix("")
        done = self._id_rows.get(stem, 0)
        if table.num_rows > done:
            self._ids.update(table["id"].slice(done).to_pylist())
            self._id_rows[stem] = table.num_rows

    def report(self, model: str = "", max_unknown_ids: int = 0) -> fpb.FeedbackReportResponse:
        """A fresh join, summarised for FeedbackReport (optionally one model's share of it)."""
        snap = self.run_once()
        j = snap.joined
        rows = [r for r in j.rows if not model or r[0]["model"] == model]
        fb = j.feedback.latest

        def mine(ids: list[str]) -> list[str]:
            return [i for i in ids if not model or fb[i]["model"] in ("", model)]

        unknown = mine(j.unknown)
        predictions = j.predictions
        if model:
            table = read_predictions(self.log_dir, [model], with_inputs=False, cache=self._cache)
            predictions = 0 if table is None else len(pc.unique(table["id"]))
        return fpb.FeedbackReportResponse(
            predictions=predictions,
            feedback=j.feedback.distinct,
            joined=len(rows),
            pending=len(mine(j.pending)),
            unknown=len(unknown),
            unknown_ids=unknown[:max_unknown_ids],
            reused_ids=j.reused,
            unreadable_segments=len(self.skipped),
        )

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.run_once()
            except Exception:  # a bad segment must not stop the metrics: log and try again next round
                log.exception("prediction log: join failed")


class QualityCollector(Collector):
    """Live quality metrics from the joiner's latest snapshot, read at scrape time."""

    def __init__(self, joiner: Joiner) -> None:
        self._joiner = joiner

    def collect(self) -> Iterator[Metric]:
        snap = self._joiner.snapshot
        labels = ["model", "version"]
        families = {
            "joined": GaugeMetricFamily(
                "onnxgate_quality_joined_predictions", "Predictions with feedback (latest join)", labels=labels
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
        duplicates = GaugeMetricFamily("onnxgate_feedback_duplicates", "Duplicate feedback messages in the log")
        reused = GaugeMetricFamily(
            "onnxgate_predlog_reused_prediction_ids", "Prediction ids that more than one logged prediction carries"
        )
        unreadable = GaugeMetricFamily(
            "onnxgate_predlog_unreadable_files", "Log files the latest join skipped because they could not be read"
        )
        if snap is not None:
            for (model, version), q in sorted(snap.quality.items()):
                for key, fam in families.items():
                    value = q.joined if key == "joined" else getattr(q, key)
                    if value is not None:
                        fam.add_metric([model, version], value)
            pending.add_metric([], len(snap.joined.pending))
            unknown.add_metric([], len(snap.joined.unknown))
            duplicates.add_metric([], snap.joined.feedback.duplicates)
            reused.add_metric([], snap.joined.reused)
            unreadable.add_metric([], len(self._joiner.skipped))
        yield from families.values()
        yield from (pending, unknown, duplicates, reused, unreadable)

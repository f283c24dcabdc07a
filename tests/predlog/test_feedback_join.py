"""Feedback store, join, quality and export without a server: dedupe, early feedback, unknown ids,
two replicas in one log directory, exact exported rows."""

from __future__ import annotations

import concurrent.futures
import math
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import pytest
from prometheus_client import CollectorRegistry

from onnxgate.server.dataset import export, parse_since
from onnxgate.server.errors import InvalidArgument
from onnxgate.server.feedback import (
    ACCEPTED,
    DUPLICATE,
    PENDING,
    FeedbackStore,
    TruthTensor,
    make_record,
    read_feedback,
    record_from_proto,
)
from onnxgate.server.join import Joiner, QualityCollector
from onnxgate.server.logfiles import LogFiles
from onnxgate.server.logquery import report
from onnxgate.server.pb import feedback_pb2 as fpb
from onnxgate.server.predlog import PredictionLog
from tests.predlog.helpers import record_iris, settings


def test_feedback_is_durable_before_the_future_resolves_and_dedupes(tmp_path: Path) -> None:
    store = FeedbackStore(settings(tmp_path))
    status, first_id = store.submit(make_record("p1", label="1")).result(5)
    assert status == PENDING and first_id  # no prediction p1 anywhere; the store gave it an id
    [segment] = list((tmp_path / "r1").glob("feedback-*.arrows"))
    assert read_feedback(tmp_path).num_rows == 1 and segment.stat().st_size > 0
    assert store.submit(make_record("p1", label="1")).result(5) == (DUPLICATE, first_id)  # a resend
    assert store.submit(make_record("p1", label="2")).result(5)[0] == PENDING  # a corrected label is new feedback
    assert store.submit(make_record("p1", label="1", feedback_id="k")).result(5)[0] == PENDING
    assert store.submit(make_record("p1", label="9", feedback_id="k")).result(5)[0] == DUPLICATE  # same key
    store.close()
    assert read_feedback(tmp_path).num_rows == 3
    # a restarted store knows what is stored (in any replica's files)
    again = FeedbackStore(settings(tmp_path, replica="r2"))
    assert again.submit(make_record("p1", label="1")).result(5)[0] == DUPLICATE
    again.close()


def test_group_commit_shares_fsyncs(tmp_path: Path) -> None:
    store = FeedbackStore(settings(tmp_path))
    futures = [store.submit(make_record(f"p{i}", value=float(i))) for i in range(2000)]
    concurrent.futures.wait(futures, 30)
    assert all(f.result()[0] == PENDING for f in futures)
    store.close()
    assert store.stored == 2000 and store.commits < 2000 / 4
    assert read_feedback(tmp_path).num_rows == 2000


def test_status_accepted_when_the_prediction_is_known(tmp_path: Path) -> None:
    s = settings(tmp_path)
    log = PredictionLog(s)
    joiner = Joiner(tmp_path, interval_s=3600, unknown_after_s=3600, predlog=log)
    store = FeedbackStore(s, known=joiner.known)
    record_iris(log, "p1", [1, 2, 3, 4], 2)
    assert log.flush()
    assert store.submit(make_record("p1", label="2")).result(5)[0] == ACCEPTED
    assert store.submit(make_record("p2", label="2")).result(5)[0] == PENDING
    store.close()
    log.close()


@pytest.mark.parametrize(
    "request_, message",
    [
        (fpb.FeedbackRequest(label="x"), "prediction_id"),
        (fpb.FeedbackRequest(prediction_id="p"), "ground truth"),
        (fpb.FeedbackRequest(prediction_id="p", value=math.nan), "finite"),
        (fpb.FeedbackRequest(prediction_id="p", label=""), "label is empty"),
        (fpb.FeedbackRequest(prediction_id="p", tensors=fpb.TruthTensors()), "tensors are empty"),
        (
            fpb.FeedbackRequest(
                prediction_id="p",
                tensors=fpb.TruthTensors(tensors=[fpb.TruthTensor(name="t", datatype="BYTES", shape=[1])]),
            ),
            "not a numeric datatype",
        ),
        (
            fpb.FeedbackRequest(
                prediction_id="p",
                tensors=fpb.TruthTensors(
                    tensors=[fpb.TruthTensor(name="t", datatype="FP32", shape=[1], contents={"int64_contents": [1]})]
                ),
            ),
            "expected fp32_contents",
        ),
        (
            fpb.FeedbackRequest(
                prediction_id="p",
                tensors=fpb.TruthTensors(
                    tensors=[fpb.TruthTensor(name="t", datatype="FP32", shape=[2], contents={"fp32_contents": [1]})]
                ),
            ),
            "2 elements",
        ),
    ],
)
def test_bad_feedback_is_invalid_argument(request_: fpb.FeedbackRequest, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        record_from_proto(request_)


def test_tensor_and_reward_feedback_from_proto() -> None:
    r = record_from_proto(
        fpb.FeedbackRequest(
            prediction_id="p",
            reward=0.5,
            tensors=fpb.TruthTensors(
                tensors=[fpb.TruthTensor(name="t", datatype="INT64", shape=[1, 2], contents={"int64_contents": [1, 2]})]
            ),
        )
    )
    assert r.tensors == (TruthTensor("t", "INT64", (1, 2), (1.0, 2.0)),) and r.reward == 0.5
    assert record_from_proto(fpb.FeedbackRequest(prediction_id="p", reward=0.0)).reward == 0.0


def _scenario(tmp_path: Path, unknown_after_s: float = 0.0) -> tuple[Joiner, CollectorRegistry]:
    """Two replicas share the log: predictions on r1 (and a few on r2), feedback on both."""
    s1 = settings(tmp_path, "r1", unknown_after_s=unknown_after_s)
    s2 = settings(tmp_path, "r2", unknown_after_s=unknown_after_s)
    log1, log2 = PredictionLog(s1), PredictionLog(s2)
    fb1, fb2 = FeedbackStore(s1), FeedbackStore(s2)
    # feedback before its prediction exists (early), on replica 2
    assert fb2.submit(make_record("p0", label="0")).result(5)[0] == PENDING
    for i in range(8):
        record_iris(log1 if i < 6 else log2, f"p{i}", [i, i + 0.5, 0, 1], i % 3, version="1" if i < 4 else "2")
    log1.flush()
    log2.flush()
    futures = [
        (fb1 if i % 2 else fb2).submit(make_record(f"p{i}", label=str(i % 3 if i != 4 else 0)))  # p4: wrong
        for i in range(1, 6)
    ]
    futures.append(fb2.submit(make_record("p1", label="1")))  # the same feedback again, other replica: dedupe
    futures.append(fb2.submit(make_record("p6", label="0", reward=1.0, feedback_id="f6")))
    futures.append(fb1.submit(make_record("ghost", label="1")))  # never predicted
    futures.append(fb1.submit(make_record("p7", label="1", model="other")))  # wrong model: does not join
    for f in futures:
        f.result(5)
    for closable in (log1, log2, fb1, fb2):
        closable.close()
    joiner = Joiner(tmp_path, interval_s=3600, unknown_after_s=unknown_after_s)
    registry = CollectorRegistry()
    registry.register(QualityCollector(joiner))
    return joiner, registry


def test_join_and_quality_across_two_replicas(tmp_path: Path) -> None:
    joiner, registry = _scenario(tmp_path)
    snap = joiner.run_once()
    assert (snap.predictions, snap.joined) == (8, 7)
    assert joiner.known("p7") and joiner.known("p0") and not joiner.known("ghost")  # ids of both replicas
    assert snap.unknown == ["ghost", "p7"] and snap.pending == []
    assert snap.duplicates == 1
    v1, v2 = snap.quality[("iris", "1")], snap.quality[("iris", "2")]
    assert (v1.labelled, v1.correct) == (4, 4)
    assert (v2.labelled, v2.correct, v2.rewarded, v2.mean_reward) == (3, 2, 1, 1.0)

    def metric(name: str, version: str) -> float | None:
        return registry.get_sample_value(name, {"model": "iris", "version": version})

    assert metric("onnxgate_quality_accuracy_ratio", "1") == 1.0
    assert metric("onnxgate_quality_accuracy_ratio", "2") == pytest.approx(2 / 3)
    assert metric("onnxgate_quality_joined_predictions", "2") == 3
    assert registry.get_sample_value("onnxgate_feedback_unknown") == 2
    # FeedbackReport's numbers come from the files (exact, whole log)
    exact = report(LogFiles.at(tmp_path), unknown_after_s=0.0, max_ids=10)
    assert (exact.predictions, exact.feedback, exact.joined, exact.unknown) == (8, 9, 7, 2)
    assert exact.unknown_ids == ["ghost", "p7"]


def test_unmatched_feedback_is_pending_within_the_grace_period(tmp_path: Path) -> None:
    joiner, _ = _scenario(tmp_path, unknown_after_s=3600)
    snap = joiner.run_once()
    assert snap.pending == ["ghost", "p7"] and snap.unknown == []


def test_regression_quality(tmp_path: Path) -> None:
    s = settings(tmp_path)
    log, store = PredictionLog(s), FeedbackStore(s)
    for i, (pred, truth) in enumerate([(1.0, 2.0), (3.0, 3.0), (5.0, 2.0)]):
        log.record(f"p{i}", "reg", "1", {"x": np.ones((1, 2), np.float32)}, {"y": np.array([[pred]], np.float32)})
        store.submit(make_record(f"p{i}", value=truth)).result(5)
    log.record("t", "reg", "1", {"x": np.ones((2, 2), np.float32)}, {"y": np.array([[1.0], [2.0]], np.float32)})
    store.submit(make_record("t", tensors=(TruthTensor("y", "FP64", (2, 1), (1.0, 4.0)),))).result(5)
    log.close()
    store.close()
    q = Joiner(tmp_path, interval_s=60, unknown_after_s=60).run_once().quality[("reg", "1")]
    assert q.regressed == 5 and q.mae == pytest.approx((1 + 0 + 3 + 0 + 2) / 5)
    assert q.rmse == pytest.approx(math.sqrt((1 + 0 + 9 + 0 + 4) / 5))


def test_export_rows_are_exact(tmp_path: Path) -> None:
    _scenario(tmp_path)
    out = tmp_path / "out" / "iris.parquet"
    assert export(tmp_path, "iris", out) == 7
    table = pq.read_table(out).sort_by("prediction_id")
    rows = table.to_pylist()
    assert [r["prediction_id"] for r in rows] == [f"p{i}" for i in range(7)]
    r1 = rows[1]
    assert (r1["x_0"], r1["x_1"], r1["x_2"], r1["x_3"]) == (1.0, 1.5, 0.0, 1.0)
    assert r1["prediction"] == 1 and r1["truth_label"] == "1" and r1["version"] == "1"
    assert r1["output_probabilities_0"] == pytest.approx(1 / 3)
    assert rows[3]["prediction"] == 0 and rows[3]["truth_label"] == "0"
    assert rows[6]["reward"] == 1.0 and rows[6]["feedback_id"] == "f6" and rows[6]["version"] == "2"
    assert all(r["predicted_at"].tzinfo is not None and r["feedback_at"] for r in rows)
    assert export(tmp_path, "iris", tmp_path / "v2.parquet", version="2") == 3
    assert export(tmp_path, "iris", tmp_path / "none.parquet", since=datetime(2999, 1, 1, tzinfo=UTC)) == 0
    csv = pcsv.read_csv(tmp_path / "out.csv") if export(tmp_path, "iris", tmp_path / "out.csv") else None
    assert csv is not None and csv.num_rows == 7
    assert sorted(csv["x_0"].to_pylist()) == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0]


def test_parse_since() -> None:
    assert parse_since("0") == datetime(1970, 1, 1, tzinfo=UTC)
    assert parse_since("2024-05-01T12:00:00") == datetime(2024, 5, 1, 12, tzinfo=UTC)

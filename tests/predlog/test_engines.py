"""The DuckDB engine (server/logquery.py) computes exactly what the pure-pyarrow path computes: the same
export tables (columns, types, values, row order) and the same reports, on logs written by the real
PredictionLog and FeedbackStore and by real gateways: corrections, duplicates across replicas, a
feedback id resent after a correction, rows older than the `content` column, reused ids, pending and
unknown feedback, model/version/since filters, open and rolled segments, corrupt files."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from onnxgate.server import logquery
from onnxgate.server.dataset import arrow_report, build_table, joined_rows
from onnxgate.server.feedback import SCHEMA, FeedbackStore, TruthTensor, make_record, read_feedback
from onnxgate.server.logfiles import LogFiles
from onnxgate.server.predlog import PredictionLog
from tests.conftest import GatewayHandle
from tests.predlog.e2e_helpers import Clients, argmax_repository, features
from tests.predlog.helpers import record_iris, settings, wait_for

pytestmark = pytest.mark.wall_clock


def arrow_export(log_dir: Path, model: str, **kw: object) -> pa.Table:
    return build_table(joined_rows(log_dir, model, **kw))  # type: ignore[arg-type]


def assert_same_exports(log_dir: Path, model: str, **kw: object) -> pa.Table:
    expected = arrow_export(log_dir, model, **kw)
    got = logquery.export_table(LogFiles.at(log_dir), model, **kw)  # type: ignore[arg-type]
    assert got.schema == expected.schema, f"{model} {kw}\n{got.schema}\n!=\n{expected.schema}"
    assert got.to_pylist() == expected.to_pylist(), f"{model} {kw}"
    return got


def assert_same_reports(log_dir: Path, models: list[str], now: float, unknown_after_s: float) -> None:
    log = LogFiles.at(log_dir)
    for model in ["", *models]:
        expected = arrow_report(log_dir, model, unknown_after_s=unknown_after_s, now=now)
        assert logquery.report(log, model, unknown_after_s=unknown_after_s, now=now) == expected, model


def _library_log(tmp_path: Path) -> tuple[float, list[PredictionLog]]:
    """Two replicas' predictions and three replicas' feedback, an old-format feedback file, corrupt files.
    Returns the `now` at which ghost-old is unknown and ghost-new pending (after 0.3 s), and the
    prediction logs still open (their segments are `.arrows` until closed)."""
    s1, s2, s3 = settings(tmp_path, "r1"), settings(tmp_path, "r2"), settings(tmp_path, "r3")
    log1, log2 = PredictionLog(s1), PredictionLog(s2)
    fb1, fb2 = FeedbackStore(s1), FeedbackStore(s2)  # neither reads the other's feedback from here on
    for i in range(12):
        # p3 and p9 were shadowed: shadow.* columns in some segments, none in others
        shadow = "2" if i in (3, 9) else None
        record_iris(
            log1 if i % 2 else log2, f"p{i}", [i, i + 0.5, 0, 1], i % 3, version="1" if i < 6 else "2", shadow=shadow
        )
    record_iris(log1, "reused", [1, 0, 0, 0], 0)
    time.sleep(0.01)
    record_iris(log2, "reused", [0, 2, 0, 0], 1, version="2")  # the latest: it joins
    y = np.array([[1.5], [2.5]], np.float32)
    log1.record("t0", "reg", "1", {"x": np.ones((2, 2), np.float32)}, {"y": y})
    log1.record("t1", "reg", "1", {"x": np.zeros((2, 2), np.float32)}, {"y": y})
    log1.record("shared", "reg", "1", {"x": np.ones((2, 2), np.float32)}, {"y": y})
    record_iris(log2, "shared", [3, 3, 3, 3], 2)  # an id on two models: feedback names its model
    assert log1.flush() and log2.flush()

    def send(store: FeedbackStore, pid: str, **kw: object) -> None:
        store.submit(make_record(pid, **kw)).result(5)  # type: ignore[arg-type]

    send(fb1, "p1", label="0")
    send(fb2, "p1", label="1")  # a correction on another replica
    send(fb1, "p2", label="2")
    send(fb2, "p2", label="2")  # the same message on another replica: a duplicate
    send(fb1, "p3", label="0", feedback_id="k3")
    send(fb2, "p3", label="0", feedback_id="k3")  # the same key on another replica
    now_ms = int(time.time() * 1000)
    send(fb1, "p4", label="1", sent_at_ms=now_ms)
    send(fb2, "p4", label="2", sent_at_ms=now_ms - 60_000)  # sent earlier by the client: not the truth
    send(fb1, "p5", label="1", model="other")  # names another model: never joins
    send(fb1, "p6", label="1", version="1")  # p6 is version 2: never joins
    send(fb2, "p8", reward=0.5)
    send(fb1, "p9", value=2.0, model="iris", version="2")
    send(fb2, "reused", label="1")
    send(fb1, "shared", tensors=(TruthTensor("y", "FP64", (2, 1), (1.0, 2.0)),), model="reg")
    send(fb2, "t0", tensors=(TruthTensor("y", "FP64", (2, 1), (1.0, 4.0)),), reward=1.0)
    send(fb1, "t1", value=3.0)
    # a feedback id resent after a correction, whose first message was a content duplicate: the resend
    # is judged afresh (a correction back to "1") by feedback_order's rule
    send(fb1, "p10", label="1", feedback_id="a")
    send(fb2, "p10", label="1", feedback_id="b")  # r2 has not read r1's: stored, a duplicate by content
    send(fb1, "p10", label="2", feedback_id="c")
    fb3 = FeedbackStore(s3)  # reads all: b was not accepted, so b again is new feedback
    send(fb3, "p10", label="1", feedback_id="b")
    send(fb3, "ghost-old", label="1")
    time.sleep(0.5)
    send(fb3, "ghost-new", label="1")
    now = time.time() + 0.1
    for store in (fb1, fb2, fb3):
        store.close()
    # an old replica's feedback file, written before `sent_at` and `content` existed
    old = tmp_path / "old"
    old.mkdir()
    rows = [
        make_record("p11", label="2", feedback_id="o1"),
        make_record("p11", label="2", feedback_id="o2"),  # same content: a duplicate (digest computed)
        make_record("p0", label="0", feedback_id="o3"),
    ]
    stamped = [
        {
            **{f: None for f in SCHEMA.names},
            "prediction_id": r.prediction_id,
            "feedback_id": r.feedback_id,
            "model": "",
            "version": "",
            "label": r.label,
            "ts": datetime.fromtimestamp(now - 10 + k, UTC),
            "replica": "old",
        }
        for k, r in enumerate(rows)
    ]
    old_schema = pa.schema([f for f in SCHEMA if f.name not in ("sent_at", "content")])
    pq.write_table(
        pa.Table.from_pylist(stamped, schema=SCHEMA).select(old_schema.names), old / "feedback-00000001.parquet"
    )
    # another replica's corrupt files
    (tmp_path / "bad" / "iris").mkdir(parents=True)
    (tmp_path / "bad" / "feedback-00000001.parquet").write_bytes(b"PAR1 this is not parquet")
    (tmp_path / "bad" / "iris" / "predictions-00000001.parquet").write_bytes(b"\x00" * 100)
    return now, [log1, log2]


def test_duckdb_equals_arrow_on_a_library_written_log(tmp_path: Path) -> None:
    now, logs = _library_log(tmp_path)
    for rolled in (False, True):  # the open `.arrows` segments first, then rolled to Parquet
        if rolled:
            for log in logs:
                log.close()
            assert list(tmp_path.glob("r1/iris/*.parquet")) and not list(tmp_path.glob("r*/*/*.arrows"))
        else:
            assert list(tmp_path.glob("r1/iris/*.arrows"))
        iris = assert_same_exports(tmp_path, "iris")
        assert_same_exports(tmp_path, "iris", version="2")
        assert_same_exports(tmp_path, "iris", since=datetime.fromtimestamp(now - 60, UTC))
        assert_same_exports(tmp_path, "iris", since=datetime(2999, 1, 1, tzinfo=UTC))
        reg = assert_same_exports(tmp_path, "reg")
        assert_same_exports(tmp_path, "missing")
        assert_same_reports(tmp_path, ["iris", "reg", "missing"], now, unknown_after_s=0.3)

        # not only equal: right (the rule of server/feedback_order.py)
        rows = {r["prediction_id"]: r for r in iris.to_pylist()}
        assert set(rows) == {"p0", "p1", "p2", "p3", "p4", "p8", "p9", "p10", "p11", "reused"}
        assert (rows["p1"]["truth_label"], rows["p4"]["truth_label"]) == ("1", "1")
        assert (rows["p10"]["truth_label"], rows["p10"]["feedback_id"]) == ("1", "b")
        assert rows["reused"]["x_1"] == 2.0 and rows["reused"]["version"] == "2"
        assert rows["p8"]["reward"] == 0.5 and rows["p9"]["truth_value"] == 2.0
        assert iris.column_names[4:10] == ["x_0", "x_1", "x_2", "x_3", "prediction", "output_probabilities_0"]
        # the served answers only: routing and shadow columns are the log's, left out by every engine
        assert not [c for c in iris.column_names if c.startswith(("shadow", "route", "propensity"))]
        assert rows["p3"]["prediction"] == 0 and rows["p9"]["prediction"] == 0
        assert iris["predicted_at"].to_pylist() == sorted(iris["predicted_at"].to_pylist())
        assert reg["truth_y_1"].to_pylist() == [4.0, None, 2.0] and reg["prediction_0"].type == pa.float64()
        summary = logquery.report(LogFiles.at(tmp_path), unknown_after_s=0.3, now=now)
        assert (summary.unknown_ids, summary.pending_ids) == (["ghost-old", "p5", "p6"], ["ghost-new"])
        assert (summary.reused_ids, summary.duplicates, len(summary.unreadable)) == (2, 4, 2)
    assert read_feedback(tmp_path).num_rows == 25  # every message the stores wrote, duplicates too


def test_duckdb_equals_arrow_on_gateway_logs(start_gateway: Callable[..., GatewayHandle], tmp_path: Path) -> None:
    """Two gateways (replicas) share one log: the same feedback sent to both, corrections, a reused id,
    ghosts; compared while the segments are open, and after the gateways stopped (rolled)."""
    repo, log_dir = argmax_repository(tmp_path / "repo"), tmp_path / "log"
    gateways = [
        start_gateway(
            repo, predlog_dir=log_dir, predlog_replica_id=name, predlog_flush_ms=20, predlog_join_interval_s=3600
        )
        for name in ("a", "b")
    ]
    clients = [Clients(gw.address) for gw in gateways]
    for i in range(40):
        clients[i % 2].infer(f"p{i}", features(i))
    clients[0].infer("p7", features(8))  # reused: the later one joins
    assert all(wait_for(lambda gw=gw: gw.gateway.predlog.flush(), 10) for gw in gateways)  # type: ignore[misc]
    for i in range(30):
        clients[i % 2].send(f"p{i}", str(i % 4))
    for i in range(0, 10):
        clients[(i + 1) % 2].send(f"p{i}", str(i % 4))  # the same message on the other replica
    for i in range(10, 15):
        clients[i % 2].send(f"p{i}", str((i + 1) % 4))  # corrections
    clients[1].send("ghost", "1")
    now = time.time() + 1
    assert_same_exports(log_dir, "argmax")
    assert_same_reports(log_dir, ["argmax"], now, unknown_after_s=300)
    for c in clients:
        c.close()
    for gw in gateways:
        gw.stop()
    assert list(log_dir.glob("*/argmax/*.parquet")) and list(log_dir.glob("*/feedback-*.parquet"))
    table = assert_same_exports(log_dir, "argmax")
    assert_same_exports(log_dir, "argmax", since=datetime.fromtimestamp(now - 3600, UTC), version="1")
    assert_same_reports(log_dir, ["argmax"], now, unknown_after_s=0)
    assert table.num_rows == 30 and table.column_names[-3:] == ["reward", "feedback_id", "feedback_at"]
    assert logquery.report(LogFiles.at(log_dir), unknown_after_s=0, now=now).duplicates == 10


def test_a_models_report_counts_its_own_feedback_not_every_models(tmp_path: Path) -> None:
    """Three models with 1,500 labelled predictions each: each model's report says 1,500 feedback messages
    (it said 4,500, the whole log's), and the report without a model says 4,500. Feedback naming no model
    is counted for the model whose prediction it joins, and while pending, in every model's report."""
    s = settings(tmp_path, "r1")
    log, store = PredictionLog(s), FeedbackStore(s)
    models = ["a", "b", "c"]
    for i in range(1500):
        for model in models:
            record_iris(log, f"{model}{i}", [i, 0, 0, 0], i % 3, model=model)
    assert log.flush()
    answers = [
        store.submit(make_record(f"{model}{i}", model=model if i % 2 else "", label=str(i % 3)))
        for i in range(1500)
        for model in models
    ]
    answers.append(store.submit(make_record("ghost", label="1")))  # no model, never predicted: pending
    answers.append(store.submit(make_record("ghost-c", model="c", label="1")))
    answers.append(store.submit(make_record("a7", label="2")))  # a correction of a's a7
    for answer in answers:
        answer.result(10)
    now = time.time() + 1
    reports = {m: logquery.report(LogFiles.at(tmp_path), m, unknown_after_s=3600, now=now) for m in ["", *models]}
    assert {m: r.feedback for m, r in reports.items()} == {"": 4503, "a": 1502, "b": 1501, "c": 1502}
    assert {m: r.joined for m, r in reports.items()} == {"": 4500, "a": 1500, "b": 1500, "c": 1500}
    assert_same_reports(tmp_path, models, now, unknown_after_s=3600)
    log.close()
    store.close()

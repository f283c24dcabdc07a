"""The live join: incremental (each round reads only what is new) and bounded (a window of predictions)."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from onnxgate.server.feedback import FeedbackStore, make_record
from onnxgate.server.join import Joiner
from onnxgate.server.predlog import PredictionLog
from tests.predlog.helpers import record_iris, settings

pytestmark = pytest.mark.wall_clock


@pytest.fixture
def now() -> datetime:
    """The time at the start of the test: segments are placed around it, and the joiner's window (which ends
    at the wall clock before it has seen a prediction) sees them there however long the suite ran before."""
    return datetime.now(UTC)


def _segment(log_dir: Path, seq: int, ids: list[str], labels: list[int], at: datetime, replica: str = "r0") -> None:
    """A rolled prediction segment written as the log writes them, with the times we choose."""
    n = len(ids)
    table = pa.table(
        {
            "id": ids,
            "model": ["m"] * n,
            "version": ["1"] * n,
            "ts": pa.array([at + timedelta(milliseconds=i) for i in range(n)], pa.timestamp("us", tz="UTC")),
            "replica": [replica] * n,
            "output.label": pa.array([[v] for v in labels], pa.large_list(pa.int64())),
            "output.label.shape": pa.array([[1]] * n, pa.list_(pa.int64())),
        }
    )
    path = log_dir / replica / "m" / f"predictions-{seq:08d}.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)


def _feedback(log_dir: Path, labels: dict[str, str]) -> None:
    store = FeedbackStore(settings(log_dir, "fb"))
    for pid, label in labels.items():
        store.submit(make_record(pid, label=label)).result(5)
    store.close()


def test_each_round_reads_only_what_is_new(tmp_path: Path, now: datetime) -> None:
    for seq in range(1, 6):
        ids = [f"s{seq}-{i}" for i in range(100)]
        _segment(tmp_path, seq, ids, [i % 2 for i in range(100)], now - timedelta(minutes=10 - seq))
    _feedback(tmp_path, {f"s1-{i}": "1" for i in range(10)})  # 5 right (odd i), 5 wrong
    joiner = Joiner(tmp_path, interval_s=3600, unknown_after_s=3600)
    first = joiner.run_once()
    assert (first.predictions, first.joined, joiner.rows_read) == (500, 10, 510)
    assert first.quality[("m", "1")].accuracy == 0.5
    segments = joiner.segments_read
    assert segments == 6
    # nothing new: nothing is read
    joiner.run_once()
    assert (joiner.segments_read, joiner.rows_read) == (segments, 510)
    # a new segment and new feedback: only they are read
    _segment(tmp_path, 6, [f"s6-{i}" for i in range(100)], [1] * 100, now)
    _feedback(tmp_path, {"s6-0": "1", "s1-0": "0"})  # s1-0 (predicted 0) corrected from wrong to right
    later = joiner.run_once()
    assert joiner.segments_read == segments + 2 and joiner.rows_read == 510 + 100 + 2
    assert (later.predictions, later.joined) == (600, 11)
    assert later.quality[("m", "1")].correct == 7 and later.quality[("m", "1")].labelled == 11


def test_an_open_segment_is_read_again_only_when_it_grew(tmp_path: Path) -> None:
    s = settings(tmp_path, flush_ms=10.0)
    log = PredictionLog(s)
    joiner = Joiner(tmp_path, interval_s=3600, unknown_after_s=3600, predlog=log)
    record_iris(log, "a", [1, 2, 3, 4], 1)
    assert log.flush()
    assert joiner.run_once().predictions == 1 and joiner.rows_read == 1
    read = joiner.segments_read
    joiner.run_once()
    assert joiner.segments_read == read  # same size: not read
    record_iris(log, "b", [1, 2, 3, 4], 2)
    assert log.flush()
    assert joiner.run_once().predictions == 2 and joiner.rows_read == 2  # only the new row
    log.close()  # rolled to Parquet: the same rows, not counted again
    assert joiner.run_once().predictions == 2 and joiner.rows_read == 2


def test_the_window_bounds_what_is_kept_and_measured(tmp_path: Path, now: datetime) -> None:
    _segment(tmp_path, 1, ["old-0", "old-1"], [1, 1], now - timedelta(hours=3))
    _segment(tmp_path, 2, ["new-0", "new-1", "new-2", "new-3"], [1, 1, 1, 0], now)
    _feedback(tmp_path, {"old-0": "0", "old-1": "0", "new-0": "1", "new-3": "1"})
    joiner = Joiner(tmp_path, interval_s=3600, unknown_after_s=3600, window_s=3600)
    snap = joiner.run_once()
    # the old segment lies wholly before the window: skipped by its footer, never read
    assert joiner.segments_read == 2 and snap.predictions == 4
    assert snap.quality[("m", "1")].labelled == 2 and snap.quality[("m", "1")].accuracy == 0.5
    # the two old ids' feedback found no prediction in the window
    assert snap.pending == ["old-0", "old-1"]
    capped = Joiner(tmp_path, interval_s=3600, unknown_after_s=3600, window_s=3600, max_predictions=2)
    snap = capped.run_once()
    assert snap.predictions == 2  # the newest two: new-2, new-3
    assert snap.quality[("m", "1")].labelled == 1 and snap.quality[("m", "1")].accuracy == 0.0


def test_predictions_leaving_the_window_take_their_quality_with_them(tmp_path: Path, now: datetime) -> None:
    _segment(tmp_path, 1, ["a", "b"], [1, 1], now - timedelta(minutes=50))
    _feedback(tmp_path, {"a": "1", "b": "0"})
    joiner = Joiner(tmp_path, interval_s=3600, unknown_after_s=3600, window_s=3600)
    assert joiner.run_once().quality[("m", "1")].accuracy == 0.5
    _segment(tmp_path, 2, ["c"], [1], now + timedelta(minutes=20))  # the window moves past a and b
    _feedback(tmp_path, {"c": "1"})
    snap = joiner.run_once()
    assert snap.predictions == 1 and snap.pending == []
    q = snap.quality[("m", "1")]
    assert (q.labelled, q.accuracy) == (1, 1.0)
    assert not joiner.known("a") and joiner.known("c")


@pytest.mark.parametrize("reused_first", [True, False])
def test_a_reused_id_joins_its_latest_prediction(tmp_path: Path, reused_first: bool, now: datetime) -> None:
    first, second = (["x", "y"], ["x"]) if reused_first else (["y", "x"], ["x"])
    _segment(tmp_path, 1, first, [0, 0], now - timedelta(minutes=2))
    _segment(tmp_path, 2, second, [1], now - timedelta(minutes=1))
    _feedback(tmp_path, {"x": "1"})
    snap = Joiner(tmp_path, interval_s=3600, unknown_after_s=3600).run_once()
    assert (snap.predictions, snap.reused, snap.quality[("m", "1")].accuracy) == (2, 1, 1.0)


def test_the_columnar_view_of_prediction_rows_matches_the_row_by_row_one() -> None:
    """predictions_of (the live join's column-at-a-time reading) keeps, for every row, what primary_output
    picks row by row: missing outputs, equal-length ties (to the first name), shadows with and without
    their output."""
    from onnxgate.server.join import predictions_of, primary_output
    from onnxgate.server.predlog import OUTPUT_PREFIX, SHADOW_OUTPUT_PREFIX

    rng = random.Random(7)
    epoch = datetime.fromtimestamp(0, UTC)
    rows = []
    for i in range(400):
        shadow = rng.choice([None, "3"])
        rows.append({
            "id": f"p{i}",
            "model": "m",
            "version": rng.choice(["1", "2"]),
            "ts": epoch + timedelta(seconds=1.7e9 + i, microseconds=rng.randrange(10**6)),
            OUTPUT_PREFIX + "label": None if rng.random() < 0.2 else [rng.randrange(3)],
            OUTPUT_PREFIX + "probabilities": None if rng.random() < 0.1 else [rng.random()] * rng.choice([1, 3]),
            "shadow_version": shadow,
            SHADOW_OUTPUT_PREFIX + "label": None if shadow is None or rng.random() < 0.2 else [rng.randrange(3)],
        })  # fmt: skip
    schema = pa.schema([
        ("id", pa.string()), ("model", pa.string()), ("version", pa.string()), ("ts", pa.timestamp("us", tz="UTC")),
        (OUTPUT_PREFIX + "label", pa.large_list(pa.int64())),
        (OUTPUT_PREFIX + "probabilities", pa.large_list(pa.float64())),
        ("shadow_version", pa.string()), (SHADOW_OUTPUT_PREFIX + "label", pa.large_list(pa.int64())),
    ])  # fmt: skip
    batch = pa.RecordBatch.from_pylist(rows, schema=schema)
    kinds = set()
    for (pid, kept), row in zip(predictions_of(batch), batch.to_pylist(), strict=True):
        name = primary_output(row)
        primary = None if name is None else tuple(row[OUTPUT_PREFIX + name])
        shadow_values = None if name is None else row.get(SHADOW_OUTPUT_PREFIX + name)
        shadow = None
        if row["shadow_version"] is not None and shadow_values is not None:
            shadow = (row["shadow_version"], tuple(shadow_values))
        micros = (row["ts"] - epoch) // timedelta(microseconds=1)
        assert (pid, kept.model, kept.version, kept.ts_us, kept.primary, kept.shadow) == (
            row["id"], row["model"], row["version"], micros, primary, shadow,
        )  # fmt: skip
        kinds.add((name, shadow is not None))
    assert kinds == {(None, False), ("label", False), ("label", True), ("probabilities", False)}

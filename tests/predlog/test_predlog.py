"""The prediction log on its own: queue, drops, flush policy, layout, what is logged, recovery."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from onnxgate.server.predlog import PredictionLog, PredLogSettings
from onnxgate.server.segments import read_segments, read_stream, recover
from tests.predlog.helpers import ModelLogPolicy, record_iris, rows, settings, wait_for

REPO = Path(__file__).resolve().parents[2]


def test_full_queue_drops_and_counts_without_blocking(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log = PredictionLog(settings(tmp_path, queue_size=5, flush_records=1))
    entered, release = threading.Event(), threading.Event()
    real_write = log._write

    def blocked_write(records: list) -> None:  # type: ignore[type-arg]
        entered.set()
        release.wait(10)
        real_write(records)

    monkeypatch.setattr(log, "_write", blocked_write)
    record_iris(log, "first", [1, 2, 3, 4], 0)
    assert entered.wait(5)  # the writer holds "first" and is stuck writing it
    started = time.perf_counter()
    for i in range(12):
        record_iris(log, f"p{i}", [1, 2, 3, 4], 0)
    assert time.perf_counter() - started < 0.5  # never waits for the writer
    assert log.dropped == 7 and log.queue_depth() == 5
    release.set()
    assert log.flush()
    log.close()
    assert log.written == 6
    assert rows(tmp_path / "r1" / "iris") == 6


def test_flushes_every_n_records(tmp_path: Path) -> None:
    log = PredictionLog(settings(tmp_path, flush_records=10, flush_ms=60_000))
    for i in range(10):
        record_iris(log, f"p{i}", [i, 0, 0, 0], 0)
    assert wait_for(lambda: rows(tmp_path / "r1" / "iris") == 10, 5)
    for i in range(5):
        record_iris(log, f"q{i}", [i, 0, 0, 0], 0)
    time.sleep(0.3)
    assert rows(tmp_path / "r1" / "iris") == 10  # 5 < N and T is far away: still queued
    log.close()  # a graceful close writes the rest
    assert rows(tmp_path / "r1" / "iris") == 15


def test_flushes_every_t_ms(tmp_path: Path) -> None:
    log = PredictionLog(settings(tmp_path, flush_records=1000, flush_ms=100))
    started = time.monotonic()
    for i in range(3):
        record_iris(log, f"p{i}", [i, 0, 0, 0], 0)
    assert wait_for(lambda: rows(tmp_path / "r1" / "iris") == 3, 5)
    assert 0.05 <= time.monotonic() - started < 2.0
    log.close()


def test_record_layout_values_and_shapes(tmp_path: Path) -> None:
    log = PredictionLog(settings(tmp_path))
    log.record(
        "a",
        "m",
        "2",
        {"x": np.arange(6, dtype=np.float32).reshape(2, 3), "name": np.array([b"ann", b"bob"], dtype=object)},
        {"y": np.array([1.5, 2.5], np.float64)},
    )
    log.close()
    [path] = list((tmp_path / "r1" / "m").glob("predictions-*.parquet"))  # rolled to Parquet on close
    row = pq.read_table(path).to_pylist()[0]
    assert row["id"] == "a" and row["model"] == "m" and row["version"] == "2" and row["replica"] == "r1"
    assert row["input.x"] == [0, 1, 2, 3, 4, 5] and row["input.x.shape"] == [2, 3]
    assert row["input.name"] == [b"ann", b"bob"] and row["output.y"] == [1.5, 2.5]
    assert row["ts"].tzinfo is not None


def test_per_model_choice_of_what_is_logged(tmp_path: Path) -> None:
    models = {
        "private": ModelLogPolicy(exclude_inputs=frozenset({"email"})),
        "outputs_only": ModelLogPolicy(log_inputs=False),
        "inputs_only": ModelLogPolicy(log_outputs=False),
    }
    log = PredictionLog(settings(tmp_path, models=models))
    inputs = {"x": np.ones((1, 2), np.float32), "email": np.array([b"a@b.c"], dtype=object)}
    outputs = {"y": np.zeros(1, np.float32)}
    for model in [*models, "default"]:
        log.record("id", model, "1", inputs, outputs)
    log.close()

    def columns(model: str) -> set[str]:
        [(_, table)] = list(read_segments(tmp_path / "r1" / model, "predictions"))
        return {c for c in table.column_names if "." in c and not c.endswith(".shape")}

    assert columns("private") == {"input.x", "output.y"}
    assert columns("outputs_only") == {"output.y"}
    assert columns("inputs_only") == {"input.x", "input.email"}
    assert columns("default") == {"input.x", "input.email", "output.y"}


def test_sampling_rate_per_model(tmp_path: Path) -> None:
    log = PredictionLog(
        settings(tmp_path, models={"half": ModelLogPolicy(sample_rate=0.5), "none": ModelLogPolicy(sample_rate=0.0)})
    )
    for i in range(2000):
        record_iris(log, f"h{i}", [0, 0, 0, 0], 0, model="half")
        record_iris(log, f"n{i}", [0, 0, 0, 0], 0, model="none")
    log.close()
    logged = rows(tmp_path / "r1" / "half")
    assert 850 < logged < 1150
    assert rows(tmp_path / "r1" / "none") == 0
    assert log.sampled_out == 2000 + (2000 - logged)


def test_segments_roll_by_size_and_schema(tmp_path: Path) -> None:
    log = PredictionLog(settings(tmp_path, flush_records=10, segment_max_bytes=1))
    for i in range(30):
        record_iris(log, f"p{i}", [i, 0, 0, 0], 0)
        if i % 10 == 9:
            assert log.flush()
    log.record("other", "iris", "2", {"z": np.zeros(1, np.int64)}, {"label": np.zeros(1, np.int64)})
    log.close()
    files = sorted(p.name for p in (tmp_path / "r1" / "iris").iterdir())
    assert all(f.endswith(".parquet") for f in files) and len(files) >= 4
    assert rows(tmp_path / "r1" / "iris") == 31


def test_retention_removes_old_segments(tmp_path: Path) -> None:
    log = PredictionLog(settings(tmp_path, segment_max_bytes=1, retention_bytes=1))
    for i in range(3):
        record_iris(log, f"p{i}", [i, 0, 0, 0], 0)
        log.flush()
    log.close()
    assert rows(tmp_path / "r1" / "iris") <= 1  # every rolled segment exceeds 1 byte: only the newest survives


def test_torn_last_segment_is_cut_and_reported(tmp_path: Path) -> None:
    log = PredictionLog(settings(tmp_path))
    for i in range(4):
        record_iris(log, f"p{i}", [i, 0, 0, 0], 0)
    assert log.flush()
    record_iris(log, "p4", [4, 0, 0, 0], 0)
    assert log.flush()
    # Simulate a crash in the middle of the next write: the stream file stays open, a partial batch at its end.
    [stream] = list((tmp_path / "r1" / "iris").glob("*.arrows"))
    whole = stream.read_bytes()
    stream.write_bytes(whole + whole[-200:-17])
    assert read_stream(stream).torn and read_stream(stream).table.num_rows == 5  # readers skip the torn tail

    reopened = PredictionLog(settings(tmp_path))
    report = reopened.recovery["iris"]
    assert report.torn == (stream.name,) and report.bytes_cut == 183
    assert not list((tmp_path / "r1" / "iris").glob("*.arrows"))
    record_iris(reopened, "p5", [5, 0, 0, 0], 0)
    reopened.close()
    assert rows(tmp_path / "r1" / "iris") == 6


def test_unreadable_stream_is_removed_and_reported(tmp_path: Path) -> None:
    d = tmp_path / "seg"
    d.mkdir()
    (d / "predictions-00000001.arrows").write_bytes(b"\xff\xff\xff\xff\x40")
    report = recover(d, "predictions")
    assert report.torn == ("predictions-00000001.arrows",) and not list(d.iterdir())


CHILD = """
import sys, time
import numpy as np
from pathlib import Path
from onnxgate.server.predlog import PredictionLog, PredLogSettings
log = PredictionLog(PredLogSettings(Path(sys.argv[1]), replica_id="crashy", flush_ms=20))
for i in range(50):
    log.record(f"p{i}", "iris", "1", {"x": np.full((1, 4), i, np.float32)}, {"label": np.array([i % 3])})
assert log.flush()
print("flushed", flush=True)
for i in range(50, 10**9):  # keep writing until killed
    log.record(f"p{i}", "iris", "1", {"x": np.full((1, 4), i, np.float32)}, {"label": np.array([i % 3])})
    time.sleep(0.0005)
"""


def test_flushed_predictions_survive_kill_9(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(tmp_path)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == b"flushed"
    time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    log = PredictionLog(PredLogSettings(tmp_path, replica_id="crashy"))
    log.close()
    table = next(iter(read_segments(tmp_path / "crashy" / "iris", "predictions")))[1]
    ids = table["id"].to_pylist()
    assert ids[:50] == [f"p{i}" for i in range(50)]
    assert ids == [f"p{i}" for i in range(len(ids))]  # a prefix: nothing flushed is lost, nothing reordered
    assert len(ids) > 50


def test_uniform_and_mixed_flushes_share_one_schema() -> None:
    from onnxgate.server.predlog import Prediction, build_batch

    x = np.ones((1, 4), np.float32)
    uniform = [Prediction("a", "m", "1", 0, {"x": x}, {}), Prediction("b", "m", "1", 0, {"x": x}, {})]
    mixed = [
        Prediction("c", "m", "1", 0, {"x": x}, {}),
        Prediction("d", "m", "1", 0, {"x": np.ones((2, 4), np.float32)}, {}),
    ]
    a, b = build_batch(uniform, ModelLogPolicy(), "r"), build_batch(mixed, ModelLogPolicy(), "r")
    assert a.schema.equals(b.schema)  # else every change of path would roll the segment
    assert b.column("input.x.shape").to_pylist() == [[1, 4], [2, 4]]
    assert a.column("input.x").to_pylist() == [[1.0] * 4] * 2

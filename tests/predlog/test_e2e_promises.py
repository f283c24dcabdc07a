"""The prediction log's promises with real gateway processes: one writer per replica directory, clock-proof
corrections, duplicates across replicas, ACCEPTED right after a restart, unreadable files skipped,
reused client ids reported. Clocks are shifted with Debian's libfaketime (.ci/deps/faults.sh)."""

from __future__ import annotations

import glob
import json
import re
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from onnxgate.server.feedback import read_feedback
from onnxgate.server.join import dedupe_feedback
from onnxgate.server.pb import feedback_pb2 as fpb
from tests.conftest import SpawnedGateway
from tests.predlog.e2e_helpers import Clients, argmax_repository, features
from tests.predlog.helpers import wait_for

ACCEPTED = fpb.FeedbackStatus.Value("FEEDBACK_STATUS_ACCEPTED")
DUPLICATE = fpb.FeedbackStatus.Value("FEEDBACK_STATUS_DUPLICATE")
PENDING = fpb.FeedbackStatus.Value("FEEDBACK_STATUS_PENDING")


def _faketime(clock_file: Path, offset: str) -> dict[str, str]:
    """Environment that runs a process on a clock read from `clock_file` at every call (steps at run time)."""
    libs = glob.glob("/usr/lib/*/faketime/libfaketimeMT.so.1")
    assert libs, "libfaketime is missing: run .ci/deps/faults.sh"
    clock_file.write_text(offset + "\n")
    return {
        "LD_PRELOAD": libs[0],
        "FAKETIME_TIMESTAMP_FILE": str(clock_file),
        "FAKETIME_NO_CACHE": "1",
        "FAKETIME_DONT_FAKE_MONOTONIC": "1",  # timers and deadlines stay real
    }


def _spawn(
    spawn_gateway: Callable[..., SpawnedGateway], repo: Path, log_dir: Path, replica: str, *extra: str, **kw: object
) -> SpawnedGateway:
    return spawn_gateway(
        "--model-repository",
        str(repo),
        "--predlog-dir",
        str(log_dir),
        "--predlog-replica-id",
        replica,
        "--predlog-flush-ms",
        "20",
        "--predlog-join-interval-s",
        "0.2",
        *extra,
        **kw,
    )


def _truth(log_dir: Path, pid: str) -> str:
    return str(dedupe_feedback(read_feedback(log_dir)).latest[pid]["label"])


def test_a_second_process_with_the_same_replica_id_refuses_to_start(
    spawn_gateway: Callable[..., SpawnedGateway], tmp_path: Path
) -> None:
    repo, log_dir = argmax_repository(tmp_path / "repo"), tmp_path / "log"
    first = _spawn(spawn_gateway, repo, log_dir, "r")
    c = Clients(first.address)
    c.infer("p1", features(1))
    assert c.send("p1", "1").status in (ACCEPTED, PENDING)
    with pytest.raises(RuntimeError) as refused:
        _spawn(spawn_gateway, repo, log_dir, "r")
    message = str(refused.value)
    assert "exited with 2" in message and "is in use by another process" in message
    assert f"pid {first.process.pid}" in message and "--predlog-replica-id" in message
    assert "Traceback" not in message
    # the first one was not disturbed: it keeps logging and acknowledging, and loses nothing
    for i in range(2, 6):
        c.infer(f"p{i}", features(i))
        assert c.send(f"p{i}", str(i % 4)).status in (ACCEPTED, PENDING)
    c.close()
    assert first.terminate() == 0
    assert set(read_feedback(log_dir)["prediction_id"].to_pylist()) == {"p1", "p2", "p3", "p4", "p5"}
    # after the holder exited, the id is free again
    again = _spawn(spawn_gateway, repo, log_dir, "r")
    assert again.terminate() == 0


def test_corrections_follow_the_replica_order_not_its_clock(
    spawn_gateway: Callable[..., SpawnedGateway], tmp_path: Path
) -> None:
    repo, log_dir, clock = argmax_repository(tmp_path / "repo"), tmp_path / "log", tmp_path / "clock"
    gw = _spawn(spawn_gateway, repo, log_dir, "r", env=_faketime(clock, "+0"))
    c = Clients(gw.address)
    c.infer("p", features(1))
    first = c.send("p", "0")
    clock.write_text("-1h\n")  # the clock steps back an hour between the label and its correction
    assert c.send("p", "1").status != DUPLICATE
    # back to the first value: a correction, not a duplicate of the first message
    back = c.send("p", "0")
    assert back.status != DUPLICATE and back.feedback_id != first.feedback_id
    assert c.send("p", "0").status == DUPLICATE  # a resend of the truth in force
    c.close()
    assert gw.terminate() == 0
    assert _truth(log_dir, "p") == "0"
    view = dedupe_feedback(read_feedback(log_dir))
    assert (view.distinct, view.duplicates) == (3, 0)


def _rows_joined(gw: SpawnedGateway) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{gw.metrics_port}/metrics", timeout=10) as r:
        text = r.read().decode()
    match = re.search(r"^onnxgate_predlog_join_rows_read_total (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def test_replicas_with_disagreeing_clocks(spawn_gateway: Callable[..., SpawnedGateway], tmp_path: Path) -> None:
    repo, log_dir = argmax_repository(tmp_path / "repo"), tmp_path / "log"
    ahead = _spawn(spawn_gateway, repo, log_dir, "ahead")
    behind = _spawn(spawn_gateway, repo, log_dir, "behind", env=_faketime(tmp_path / "clock", "-1h"))
    ca, cb = Clients(ahead.address), Clients(behind.address)
    for pid in ("seen", "sent-at"):
        ca.infer(pid, features(2))
        ca.send(pid, "1")
    # a replica whose clock is an hour behind stamps past the feedback it has read (at every join) ...
    # (its live join has read both predictions and both messages of the other replica)
    assert wait_for(lambda: _rows_joined(behind) >= 4, 10)
    # ... so the same message sent to it again is a duplicate, and a correction sent to it wins
    assert cb.send("seen", "1").status == DUPLICATE
    assert cb.send("seen", "2").status == ACCEPTED
    # the client's own time orders corrections even before the other replica's feedback was read
    ca.send("sent-at", "3", sent_at_unix_ms=int(time.time() * 1000) - 60_000)
    cb.send("sent-at", "2", sent_at_unix_ms=int(time.time() * 1000))
    ca.close()
    cb.close()
    assert ahead.terminate() == 0 and behind.terminate() == 0
    assert _truth(log_dir, "seen") == "2" and _truth(log_dir, "sent-at") == "2"


def test_feedback_for_a_logged_prediction_is_accepted_right_after_a_restart(
    spawn_gateway: Callable[..., SpawnedGateway], tmp_path: Path
) -> None:
    repo, log_dir = argmax_repository(tmp_path / "repo"), tmp_path / "log"
    gw = _spawn(spawn_gateway, repo, log_dir, "r")
    c = Clients(gw.address)
    for i in range(5):
        c.infer(f"p{i}", features(i))
    c.close()
    assert gw.terminate() == 0
    # joins an hour apart: only the join before serving can know the predictions
    restarted = _spawn(spawn_gateway, repo, log_dir, "r", "--predlog-join-interval-s", "3600")
    c = Clients(restarted.address)
    assert [c.send(f"p{i}", str(i % 4)).status for i in range(5)] == [ACCEPTED] * 5
    assert c.send("never", "1").status == PENDING
    c.close()


def test_unreadable_files_are_skipped_and_reported(
    spawn_gateway: Callable[..., SpawnedGateway], tmp_path: Path
) -> None:
    repo, log_dir = argmax_repository(tmp_path / "repo"), tmp_path / "log"
    # another replica's files, corrupt: a feedback segment and a prediction segment
    other = log_dir / "other"
    (other / "argmax").mkdir(parents=True)
    (other / "feedback-00000001.parquet").write_bytes(b"PAR1 this is not parquet")
    (other / "argmax" / "predictions-00000001.parquet").write_bytes(b"\x00" * 100)
    gw = _spawn(spawn_gateway, repo, log_dir, "r")
    c = Clients(gw.address)
    c.infer("p", features(3))
    assert wait_for(lambda: c.report().predictions == 1, 10)
    assert c.send("p", "3").status == ACCEPTED
    report = c.report()
    assert (report.joined, report.unreadable_segments) == (1, 2)
    with urllib.request.urlopen(f"http://127.0.0.1:{gw.metrics_port}/metrics", timeout=10) as r:
        assert "onnxgate_predlog_unreadable_files 2.0" in r.read().decode()
    c.close()
    assert gw.terminate() == 0
    out = subprocess.run(
        [sys.executable, "-m", "onnxgate", "dataset", "report", "--predlog-dir", str(log_dir)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    assert summary["joined"] == 1 and len(summary["unreadable_files"]) == 2
    export = subprocess.run(
        [sys.executable, "-m", "onnxgate", "dataset", "export", "--predlog-dir", str(log_dir), "--model", "argmax",
         "--out", str(tmp_path / "out.parquet")],
        capture_output=True,
        text=True,
        timeout=60,
    )  # fmt: skip
    assert export.returncode == 0 and "wrote 1 rows" in export.stdout
    assert "skipped unreadable file" in export.stderr and "feedback-00000001.parquet" in export.stderr


def test_a_reused_client_id_is_reported_and_joins_its_latest_prediction(
    spawn_gateway: Callable[..., SpawnedGateway], tmp_path: Path
) -> None:
    repo, log_dir = argmax_repository(tmp_path / "repo"), tmp_path / "log"
    gw = _spawn(spawn_gateway, repo, log_dir, "r")
    c = Clients(gw.address)
    c.infer("mine", features(1))
    time.sleep(0.05)  # two flushes apart: their times differ
    c.infer("mine", features(2))
    c.infer("other", features(3))
    assert wait_for(lambda: c.report().predictions == 2, 10)
    c.send("mine", "2")
    report = c.report()
    assert (report.reused_ids, report.joined) == (1, 1)
    c.close()
    assert gw.terminate() == 0
    out = tmp_path / "out.parquet"
    subprocess.run(
        [sys.executable, "-m", "onnxgate", "dataset", "export", "--predlog-dir", str(log_dir), "--model", "argmax",
         "--out", str(out)],
        check=True,
        capture_output=True,
        timeout=60,
    )  # fmt: skip
    [row] = pq.read_table(out).to_pylist()
    assert row["prediction"] == 2 and row["truth_label"] == "2"

"""Through the real gRPC server: predictions logged, feedback joined, quality exported as metrics,
the dataset exported exactly; two gateway processes sharing one log; a SIGKILL in the middle."""

from __future__ import annotations

import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import grpc
import pyarrow.parquet as pq
import pytest

from onnxgate.server.cli import main as cli
from onnxgate.server.feedback import read_feedback
from onnxgate.server.join import read_predictions
from onnxgate.server.pb import feedback_pb2 as fpb
from tests.conftest import GatewayHandle, SpawnedGateway
from tests.predlog.e2e_helpers import Clients, argmax_repository, features, label_of
from tests.predlog.helpers import wait_for

N = 40


def _export(log_dir: Path, out: Path, *extra: str) -> list[dict[str, object]]:
    assert (
        cli(["dataset", "export", "--predlog-dir", str(log_dir), "--model", "argmax", "--out", str(out), *extra]) == 0
    )
    return sorted(pq.read_table(out).to_pylist(), key=lambda r: int(str(r["prediction_id"])[1:]))


def test_predictions_feedback_metrics_and_export(start_gateway: Callable[..., GatewayHandle], tmp_path: Path) -> None:
    log_dir = tmp_path / "log"
    gw = start_gateway(
        argmax_repository(tmp_path / "repo"),
        predlog_dir=log_dir,
        predlog_flush_ms=4000,
        predlog_join_interval_s=0.2,
        predlog_unknown_after_s=0.5,
    )
    predlog = gw.gateway.predlog
    assert predlog is not None
    c = Clients(gw.address)
    for i in range(30):
        assert label_of(c.infer(f"p{i}", features(i))) == i % 4
    assert predlog.flush()
    for i in range(30, N):  # these stay queued (4 s flush window) while their feedback arrives
        c.infer(f"p{i}", features(i))
    status = fpb.FeedbackStatus
    early = [c.send(f"p{i}", str(i % 4)).status for i in range(30, 35)]
    assert predlog.written == 30 and early == [status.Value("FEEDBACK_STATUS_PENDING")] * 5
    # p0-p4 right, p5-p9 wrong; then p0-p4 again: duplicates
    assert all(
        c.send(f"p{i}", str(i % 4 if i < 5 else (i + 1) % 4)).status == status.Value("FEEDBACK_STATUS_ACCEPTED")
        for i in range(10)
    )
    assert all(c.send(f"p{i}", str(i % 4)).status == status.Value("FEEDBACK_STATUS_DUPLICATE") for i in range(5))
    stream = [fpb.FeedbackRequest(prediction_id=f"p{i}", label=str(i % 4), reward=float(i)) for i in range(10, 20)]
    summary = c.feedback.StreamFeedback(iter([*stream, stream[0]]), timeout=10)
    assert (summary.received, summary.accepted, summary.duplicate) == (11, 10, 1)
    for ghost in ("ghost-a", "ghost-b", "ghost-c"):
        c.send(ghost, "1")
    for bad in (
        fpb.FeedbackRequest(label="1"),
        fpb.FeedbackRequest(
            prediction_id="p1",
            tensors=fpb.TruthTensors(tensors=[fpb.TruthTensor(name="t", datatype="BYTES", shape=[1])]),
        ),
    ):
        with pytest.raises(grpc.RpcError) as err:
            c.feedback.SendFeedback(bad, timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    assert wait_for(lambda: predlog.written == N, 10)
    time.sleep(0.6)  # the ghosts pass the grace period
    report = c.report()
    assert (report.predictions, report.joined, report.feedback, report.unknown) == (N, 25, 28, 3)
    assert list(report.unknown_ids) == ["ghost-a", "ghost-b", "ghost-c"]

    def scrape() -> str:
        with urllib.request.urlopen(gw.metrics_url, timeout=10) as r:
            return str(r.read().decode())

    accuracy = 'onnxgate_quality_accuracy_ratio{model="argmax",version="1"} 0.8'  # 20 of 25 right
    assert wait_for(lambda: accuracy in scrape(), 10), scrape()
    assert 'onnxgate_quality_mean_reward{model="argmax",version="1"} 14.5' in scrape()
    assert "onnxgate_predlog_records_written_total 40.0" in scrape()
    c.close()
    gw.stop()

    rows = _export(log_dir, tmp_path / "argmax.parquet")
    expected = [*range(20), *range(30, 35)]
    assert [r["prediction_id"] for r in rows] == [f"p{i}" for i in expected]
    for r, i in zip(rows, expected, strict=True):
        x = features(i)
        assert [r[f"x_{k}"] for k in range(4)] == [float(v) for v in x]
        assert r["prediction"] == i % 4 and r["version"] == "1"
        assert r["truth_label"] == str(i % 4 if not 5 <= i < 10 else (i + 1) % 4)
        assert r["reward"] == (float(i) if 10 <= i < 20 else None)
        assert [r[f"output_scores_{k}"] for k in range(4)] == [float(v) for v in x]
    assert (
        cli(["dataset", "export", "--predlog-dir", str(log_dir), "--model", "argmax", "--out", str(tmp_path / "a.csv")])
        == 0
    )
    assert len((tmp_path / "a.csv").read_text().splitlines()) == 26


def _spawn(spawn_gateway: Callable[..., SpawnedGateway], repo: Path, log_dir: Path, *extra: str) -> SpawnedGateway:
    return spawn_gateway(
        "--model-repository",
        str(repo),
        "--predlog-dir",
        str(log_dir),
        "--predlog-flush-ms",
        "50",
        "--predlog-unknown-after-s",
        "3600",
        *extra,
    )


def test_two_gateways_share_one_log(spawn_gateway: Callable[..., SpawnedGateway], tmp_path: Path) -> None:
    repo, log_dir = argmax_repository(tmp_path / "repo"), tmp_path / "log"
    a = _spawn(spawn_gateway, repo, log_dir, "--predlog-replica-id", "a")
    b = _spawn(spawn_gateway, repo, log_dir, "--predlog-replica-id", "b")
    ca, cb = Clients(a.address), Clients(b.address)
    for i in range(30):
        ca.infer(f"p{i}", features(i))
    for i in range(0, 30, 2):  # feedback for the even ones, to the other replica
        cb.send(f"p{i}", str(i % 4), reward=1.0)
    cb.send("p0", "0", reward=1.0)  # duplicate
    for i in range(30, 34):  # and the other way round
        cb.infer(f"p{i}", features(i))
        ca.send(f"p{i}", str(i % 4))
    assert wait_for(lambda: cb.report().joined == 19, 15)
    report = ca.report()
    assert (report.predictions, report.joined, report.feedback, report.pending) == (34, 19, 19, 0)
    ca.close()
    cb.close()
    assert a.terminate() == 0 and b.terminate() == 0
    assert {p.name for p in log_dir.iterdir()} == {"a", "b"}
    rows = _export(log_dir, tmp_path / "out.parquet")
    assert [r["prediction_id"] for r in rows] == [f"p{i}" for i in [*range(0, 30, 2), *range(30, 34)]]
    assert all(r["prediction"] == int(str(r["truth_label"])) for r in rows)


def test_sigkill_loses_nothing_acknowledged(spawn_gateway: Callable[..., SpawnedGateway], tmp_path: Path) -> None:
    repo, log_dir = argmax_repository(tmp_path / "repo"), tmp_path / "log"
    gw = _spawn(spawn_gateway, repo, log_dir, "--predlog-replica-id", "r")
    answered: list[tuple[str, float]] = []
    acked: list[str] = []
    stop = threading.Event()

    def traffic(worker: int) -> None:
        c = Clients(gw.address)
        i = 0
        try:
            while not stop.is_set():
                pid = f"w{worker}-{i}"
                c.infer(pid, features(i))
                answered.append((pid, time.monotonic()))
                c.send(pid, str(i % 4))
                acked.append(pid)
                c.send(f"early-{worker}-{i}", "1")  # feedback whose prediction comes later (or never)
                acked.append(f"early-{worker}-{i}")
                i += 1
        except grpc.RpcError:
            pass  # the server died under us
        finally:
            c.close()

    threads = [threading.Thread(target=traffic, args=(w,)) for w in range(3)]
    for t in threads:
        t.start()
    time.sleep(3.0)
    gw.process.kill()  # SIGKILL, mid-stream
    killed_at = time.monotonic()
    gw.process.wait(10)
    stop.set()
    for t in threads:
        t.join(10)
    assert len(acked) > 50

    # before the restart: every acknowledged feedback is on disk (readers skip a torn tail)
    stored = set(read_feedback(log_dir)["prediction_id"].to_pylist())
    assert set(acked) <= stored
    left_open = list((log_dir / "r").rglob("*.arrows"))
    assert left_open  # the killed process had open segments
    restarted = _spawn(spawn_gateway, repo, log_dir, "--predlog-replica-id", "r")
    predictions = read_predictions(log_dir)
    assert predictions is not None
    logged = set(predictions["id"].to_pylist())
    flushed = {pid for pid, at in answered if at < killed_at - 1.5}  # answered long before: written (50 ms window)
    assert flushed <= logged and len(flushed) > 10
    assert not any(p.exists() for p in left_open)  # the restarted writers rolled (and repaired) them
    # the join continues: predictions and feedback after the restart join as well
    c = Clients(restarted.address)
    for i in range(5):
        c.infer(f"after-{i}", features(i))
        c.send(f"after-{i}", str(i % 4))
    joined_before = len({p for p in acked if p in logged})
    assert wait_for(lambda: c.report().joined == joined_before + 5, 15)
    c.close()
    assert restarted.terminate() == 0
    assert set(acked) <= set(read_feedback(log_dir)["prediction_id"].to_pylist())

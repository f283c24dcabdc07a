"""Faults injected from outside a real gateway process (issue #14): a file size limit (`prlimit`: writes
fail as on a full disk, then space comes back), a clock eight days ahead (libfaketime), and clients
whose requests alternate between output subsets; checked with the readers on the real files."""

from __future__ import annotations

import glob
import subprocess
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from onnxgate.server.feedback import read_feedback
from onnxgate.server.join import read_predictions
from onnxgate.server.pb import feedback_pb2 as fpb
from onnxgate.server.pb import grpc_service_pb2 as pb
from tests.conftest import SpawnedGateway
from tests.predlog.e2e_helpers import Clients, argmax_repository, features, label_of
from tests.predlog.helpers import wait_for

DUPLICATE = fpb.FeedbackStatus.Value("FEEDBACK_STATUS_DUPLICATE")


def _spawn(
    spawn_gateway: Callable[..., SpawnedGateway], tmp_path: Path, *extra: str, **kw: object
) -> tuple[SpawnedGateway, Path]:
    log_dir = tmp_path / "log"
    gw = spawn_gateway(
        "--model-repository",
        str(argmax_repository(tmp_path / "repo")),
        "--predlog-dir",
        str(log_dir),
        "--predlog-replica-id",
        "r",
        "--predlog-flush-ms",
        "20",
        "--predlog-unknown-after-s",
        "3600",
        *extra,
        **kw,
    )
    return gw, log_dir


def _metrics(gw: SpawnedGateway) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{gw.metrics_port}/metrics", timeout=10) as r:
        text = r.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _metric(gw: SpawnedGateway, name: str, **labels: str) -> float:
    return _metrics(gw).get((name, tuple(sorted(labels.items()))), -1.0)


def _set_fsize(gw: SpawnedGateway, soft: str) -> None:
    # only the soft limit moves: raising a hard limit needs a privilege this process may not have
    subprocess.run(["prlimit", "--pid", str(gw.process.pid), f"--fsize={soft}:unlimited"], check=True, timeout=10)


def _send(c: Clients, pid: str, label: str) -> fpb.FeedbackResponse | grpc.RpcError:
    try:
        response: fpb.FeedbackResponse = c.feedback.SendFeedback(
            fpb.FeedbackRequest(prediction_id=pid, label=label), timeout=5
        )
    except grpc.RpcError as error:
        return error
    return response


def _assert_unavailable(answer: fpb.FeedbackResponse | grpc.RpcError) -> None:
    assert isinstance(answer, grpc.RpcError), answer
    assert answer.code() == grpc.StatusCode.UNAVAILABLE, (answer.code(), answer.details())
    assert "retry later" in str(answer.details())


def _feedback_counts(log_dir: Path) -> Counter[str]:
    return Counter(read_feedback(log_dir)["prediction_id"].to_pylist())


def _prediction_ids(log_dir: Path) -> list[str]:
    table = read_predictions(log_dir)
    return [] if table is None else [str(i) for i in table["id"].to_pylist()]


def test_failed_appends_lose_no_acknowledged_feedback(
    spawn_gateway: Callable[..., SpawnedGateway], tmp_path: Path
) -> None:
    # every file of the process may grow to 12 kB: the feedback and prediction segments hit it in turn
    gw, log_dir = _spawn(spawn_gateway, tmp_path, prefix=("prlimit", "--fsize=12000:unlimited", "--"))
    c = Clients(gw.address)
    acked: list[str] = []
    refused: list[str] = []
    answered = 0
    deadline = time.monotonic() + 30

    def step() -> None:
        nonlocal answered
        pid = f"p{answered}"
        assert label_of(c.infer(pid, features(answered))) == answered % 4  # serving never fails
        answer = _send(c, pid, str(answered % 4))
        answered += 1
        if isinstance(answer, grpc.RpcError):
            _assert_unavailable(answer)
            refused.append(pid)
        else:
            acked.append(pid)

    while len(refused) < 2 or _metric(gw, "onnxgate_predlog_write_errors_total") <= 0:
        assert time.monotonic() < deadline, (len(acked), refused)
        step()
    assert _metric(gw, "onnxgate_predlog_io_errors_total", writer="feedback", op="write") >= 2
    assert _metric(gw, "onnxgate_predlog_io_errors_total", writer="predictions", op="write") >= 1
    # space again: feedback is stored, a resend of an acknowledged one is a duplicate
    _set_fsize(gw, "unlimited")
    refused_before = len(refused)
    for _ in range(20):
        step()
    assert len(refused) == refused_before
    assert c.send(acked[0], "0").status == DUPLICATE
    assert wait_for(
        lambda: (
            _metric(gw, "onnxgate_predlog_records_written_total") + _metric(gw, "onnxgate_predlog_write_errors_total")
            == answered
        ),
        10,
    )
    written = _metric(gw, "onnxgate_predlog_records_written_total")
    c.close()
    assert gw.terminate() == 0

    # every acknowledged feedback once, nothing refused; the sealed segments were rolled like the others
    assert _feedback_counts(log_dir) == Counter(acked)
    assert not list(log_dir.rglob("*.arrows"))
    # every written prediction readable, once; the lost ones were counted
    ids = _prediction_ids(log_dir)
    assert len(ids) == len(set(ids)) == written < answered
    assert set(ids) <= {f"p{i}" for i in range(answered)}


def test_writers_survive_failed_rolls_and_report_health(
    spawn_gateway: Callable[..., SpawnedGateway], tmp_path: Path
) -> None:
    gw, log_dir = _spawn(spawn_gateway, tmp_path, "--predlog-segment-max-age-s", "1.5")
    c = Clients(gw.address)
    c.infer("p0", features(0))
    c.send("p0", "0")
    assert wait_for(lambda: _metric(gw, "onnxgate_predlog_records_written_total") == 1, 5)
    _set_fsize(gw, "300")  # the open segments' rolls (1.5 s after they opened) cannot write their Parquet

    def down(writer: str) -> bool:
        failed = _metric(gw, "onnxgate_predlog_io_errors_total", writer=writer, op="roll") >= 1
        return failed and _metric(gw, "onnxgate_predlog_writer_up", writer=writer) == 0

    assert wait_for(lambda: down("feedback") and down("predictions"), 10), _metrics(gw)
    # the health service says so per writer; readiness ("") stays SERVING: inference does not need the log
    assert wait_for(lambda: _health(gw, FEEDBACK_HEALTH) == _health(gw, PREDLOG_HEALTH) == NOT_SERVING, 5)
    assert _health(gw, "") == SERVING
    # the writer answers (no hang until the deadline): UNAVAILABLE; serving goes on
    _assert_unavailable(_send(c, "p1", "1"))
    assert label_of(c.infer("p1", features(1))) == 1
    assert wait_for(lambda: _metric(gw, "onnxgate_predlog_write_errors_total") >= 1, 10)

    _set_fsize(gw, "unlimited")  # space again: the failed rolls are retried, the writers recover
    up = "onnxgate_predlog_writer_up"
    assert wait_for(lambda: _metric(gw, up, writer="feedback") == _metric(gw, up, writer="predictions") == 1, 10)
    assert wait_for(lambda: _health(gw, FEEDBACK_HEALTH) == _health(gw, PREDLOG_HEALTH) == SERVING, 5)
    for i in range(2, 6):
        c.infer(f"p{i}", features(i))
        assert not isinstance(_send(c, f"p{i}", str(i % 4)), grpc.RpcError)
    assert _metric(gw, "onnxgate_predlog_io_errors_total", writer="feedback", op="roll") >= 1  # still counted
    c.close()
    assert gw.terminate() == 0
    assert _feedback_counts(log_dir) == Counter(["p0", "p2", "p3", "p4", "p5"])
    assert {"p0", "p2", "p3", "p4", "p5"} <= set(_prediction_ids(log_dir))


FEEDBACK_HEALTH, PREDLOG_HEALTH = "onnxgate.v1.Feedback", "onnxgate.v1.PredictionLog"
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


def _health(gw: SpawnedGateway, service: str) -> int:
    with grpc.insecure_channel(gw.address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return int(stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status)


def _faketime(offset: str) -> dict[str, str]:
    libs = glob.glob("/usr/lib/*/faketime/libfaketimeMT.so.1")
    assert libs, "libfaketime is missing: run .ci/deps/faults.sh"
    return {"LD_PRELOAD": libs[0], "FAKETIME": offset, "FAKETIME_DONT_FAKE_MONOTONIC": "1"}


def _old_segment(path: Path, age: timedelta) -> None:
    ts = datetime.now(UTC) - age
    table = pa.table(
        {
            "id": ["ancient"],
            "model": ["argmax"],
            "version": ["1"],
            "ts": pa.array([ts], pa.timestamp("us", tz="UTC")),
            "replica": ["r"],
        }
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)


def test_retention_goes_by_the_datas_time_not_the_clock(
    spawn_gateway: Callable[..., SpawnedGateway], tmp_path: Path
) -> None:
    # genuinely old data (30 days), with a sequence number past everything the gateway will write
    old = tmp_path / "log" / "r" / "argmax" / "predictions-00000500.parquet"
    _old_segment(old, timedelta(days=30))
    # the process clock is 8 days ahead of the files' times; retention is 7 days; segments roll often
    gw, log_dir = _spawn(spawn_gateway, tmp_path, "--predlog-segment-max-age-s", "0.2", env=_faketime("+8d"))
    c = Clients(gw.address)
    model_dir = log_dir / "r" / "argmax"
    answered = 0

    def rolled_a_few() -> bool:
        nonlocal answered
        c.infer(f"p{answered}", features(answered))
        if answered % 5 == 0:
            c.send(f"p{answered}", "0")
        answered += 1
        return len(list(model_dir.glob("predictions-*.parquet"))) >= 4 and not old.exists()

    assert wait_for(rolled_a_few, 20), sorted(p.name for p in model_dir.iterdir())
    c.close()
    assert gw.terminate() == 0
    assert not old.exists()
    ids = _prediction_ids(log_dir)
    assert sorted(ids) == sorted(f"p{i}" for i in range(answered))  # every segment it wrote kept
    assert _feedback_counts(log_dir) == Counter(f"p{i}" for i in range(0, answered, 5))


def test_alternating_output_subsets_share_segments(
    spawn_gateway: Callable[..., SpawnedGateway], tmp_path: Path
) -> None:
    gw, log_dir = _spawn(spawn_gateway, tmp_path, "--predlog-flush-records", "1")  # a flush per request
    c = Clients(gw.address)
    subsets: list[list[str]] = [["label"], ["scores"], []]  # [] asks for every output
    n = 45
    for i in range(n):
        x = features(i).reshape(1, 4)
        request = pb.ModelInferRequest(
            model_name="argmax",
            id=f"p{i}",
            inputs=[pb.ModelInferRequest.InferInputTensor(name="x", datatype="FP32", shape=[1, 4])],
            outputs=[pb.ModelInferRequest.InferRequestedOutputTensor(name=o) for o in subsets[i % 3]],
            raw_input_contents=[x.astype("<f4").tobytes()],
        )
        c.infer_stub.ModelInfer(request, timeout=10)
    assert wait_for(lambda: _metric(gw, "onnxgate_predlog_records_written_total") == n, 10)
    c.close()
    assert gw.terminate() == 0

    segments = list((log_dir / "r" / "argmax").glob("predictions-*"))
    assert 1 <= len(segments) <= 3, sorted(p.name for p in segments)  # by schema growth, not per flush
    table = read_predictions(log_dir)
    assert table is not None and table.num_rows == n
    for row in table.to_pylist():
        i = int(str(row["id"])[1:])
        x = features(i)
        assert np.allclose(np.asarray(row["input.x"], np.float32), x)
        wanted = subsets[i % 3] or ["label", "scores"]
        assert (row["output.label"] is not None) == ("label" in wanted)
        assert (row["output.scores"] is not None) == ("scores" in wanted)
        if "label" in wanted:
            assert row["output.label"] == [i % 4] and row["output.label.shape"] == [1]
        if "scores" in wanted:
            assert np.allclose(np.asarray(row["output.scores"], np.float32), x)
            assert row["output.scores.shape"] == [1, 4]

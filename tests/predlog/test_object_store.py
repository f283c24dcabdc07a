"""The prediction log in an object store (issue 13): real gateways writing to a real S3-compatible
server (moto, on loopback), segments rolled and uploaded, local copies removed; a SIGKILL while the
store is down loses nothing acknowledged; the export reads the store like a local log."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from onnxgate.server.cli import main as cli
from onnxgate.server.objectstore import UploadConflict, Uploader, open_uploader, redact
from onnxgate.server.predlog import PredLogSettings
from onnxgate.server.segments import next_seq
from tests.conftest import SpawnedGateway
from tests.predlog.e2e_helpers import Clients, argmax_repository, features
from tests.predlog.helpers import wait_for
from tests.predlog.s3_helpers import CREDENTIALS, S3, running_s3

STORE_HEALTH = "onnxgate.v1.PredictionLogStore"
SERVE = [sys.executable, "-m", "onnxgate", "serve", "--grpc-port", "0", "--metrics-port", "-1", "--http-port", "-1"]


@pytest.fixture
def s3(monkeypatch: pytest.MonkeyPatch) -> Iterator[S3]:
    with running_s3() as server:
        for name, value in CREDENTIALS.items():
            monkeypatch.setenv(name, value)
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{server.port}")  # this process: moto itself
        yield server


def _spawn(spawn_gateway: Callable[..., SpawnedGateway], s3: S3, repo: Path, wal: Path, *extra: str) -> SpawnedGateway:
    return spawn_gateway(
        "--model-repository",
        str(repo),
        "--predlog-dir",
        s3.uri,
        "--predlog-local-dir",
        str(wal),
        "--predlog-flush-ms",
        "50",
        "--predlog-segment-max-age-s",
        "1",
        "--predlog-unknown-after-s",
        "3600",
        *extra,
        env=s3.env,
    )


def _metrics(gw: SpawnedGateway) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{gw.metrics_port}/metrics", timeout=10) as r:
        text = r.read().decode()
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples if not s.labels}


def _health(gw: SpawnedGateway, service: str) -> int:
    with grpc.insecure_channel(gw.address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return int(stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status)


def _local_segments(wal: Path) -> list[Path]:
    return sorted(p for p in wal.rglob("*") if p.suffix in (".arrows", ".parquet"))


def _ids(table: pa.Table | None, column: str) -> Counter[str]:
    return Counter() if table is None else Counter(table[column].to_pylist())


def test_segments_are_uploaded_then_removed_locally_and_the_export_reads_the_store(
    spawn_gateway: Callable[..., SpawnedGateway], s3: S3, tmp_path: Path
) -> None:
    repo, wal = argmax_repository(tmp_path / "repo"), tmp_path / "wal"
    gw = _spawn(spawn_gateway, s3, repo, wal, "--predlog-replica-id", "r")
    c = Clients(gw.address)
    for i in range(20):
        c.infer(f"p{i}", features(i))
    for i in range(0, 20, 2):
        c.send(f"p{i}", str(i % 4))
    c.close()
    everything = {f"p{i}" for i in range(20)}

    def uploaded() -> bool:
        return (
            set(_ids(s3.rows("predictions"), "id")) == everything
            and len(_ids(s3.rows("feedback"), "prediction_id")) == 10
            and not _local_segments(wal)
        )

    assert wait_for(uploaded, 20), (s3.objects(), _local_segments(wal))
    # the layout of a local log, under the URI: <replica>/<model>/predictions-<seq>.parquet, <replica>/feedback-...
    keys = s3.objects()
    assert keys and all(k.startswith(("r/argmax/predictions-", "r/feedback-")) and k.endswith(".parquet") for k in keys)
    metrics = _metrics(gw)
    assert metrics["onnxgate_predlog_uploaded_segments_total"] == len(keys)
    assert metrics["onnxgate_predlog_upload_errors_total"] == 0
    assert metrics["onnxgate_predlog_upload_pending_segments"] == 0
    assert metrics["onnxgate_predlog_uploader_up"] == 1
    assert _health(gw, STORE_HEALTH) == health_pb2.HealthCheckResponse.SERVING
    assert gw.terminate() == 0
    assert s3.objects() == keys  # nothing was left to upload at shutdown, nothing written twice

    # the export from the store equals the export of the same files read from a local directory
    local_copy = tmp_path / "copy"
    fs, root = pafs.FileSystem.from_uri(s3.uri)
    pafs.copy_files(root, str(local_copy), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    from_store, from_disk = tmp_path / "store.parquet", tmp_path / "disk.parquet"
    for source, out in ((s3.uri, from_store), (str(local_copy), from_disk)):
        assert cli(["dataset", "export", "--predlog-dir", source, "--model", "argmax", "--out", str(out)]) == 0
    store_table, disk_table = pq.read_table(from_store), pq.read_table(from_disk)
    assert store_table.num_rows == 10
    assert store_table.equals(disk_table)


def test_a_sigkill_while_the_store_is_down_loses_nothing_acknowledged(
    spawn_gateway: Callable[..., SpawnedGateway], s3: S3, tmp_path: Path
) -> None:
    repo, wal = argmax_repository(tmp_path / "repo"), tmp_path / "wal"
    # a generated replica id: the restart is another replica; segments roll after 2 s (the last ones stay open)
    gw = _spawn(spawn_gateway, s3, repo, wal, "--predlog-segment-max-age-s", "2")
    acked: list[str] = []
    answered: list[tuple[str, float]] = []
    c = Clients(gw.address)

    def traffic(first: int, n: int) -> None:
        for i in range(first, first + n):
            c.infer(f"p{i}", features(i))
            answered.append((f"p{i}", time.monotonic()))
            c.send(f"p{i}", str(i % 4))
            acked.append(f"p{i}")

    traffic(0, 10)
    assert wait_for(lambda: len(_ids(s3.rows("feedback"), "prediction_id")) == 10, 20)
    s3.proxy.down()  # the store is unreachable for the gateway from now on
    traffic(10, 10)
    # the uploads fail: counted, retried, the store's health NOT_SERVING; the rolled segments wait locally
    assert wait_for(lambda: _metrics(gw)["onnxgate_predlog_upload_errors_total"] > 0, 30)
    assert wait_for(lambda: _health(gw, STORE_HEALTH) == health_pb2.HealthCheckResponse.NOT_SERVING, 10)
    assert _health(gw, "") == health_pb2.HealthCheckResponse.SERVING  # serving goes on
    assert wait_for(lambda: _metrics(gw)["onnxgate_predlog_upload_pending_segments"] > 0, 10)
    traffic(20, 5)  # and these stay in open segments (rolled after 2 s of age)
    time.sleep(0.3)  # flushed (50 ms window), not yet rolled
    gw.process.kill()
    killed_at = time.monotonic()
    gw.process.wait(10)
    c.close()
    left = _local_segments(wal)
    assert any(p.suffix == ".parquet" for p in left) and any(p.suffix == ".arrows" for p in left), left

    s3.proxy.up()
    restarted = _spawn(spawn_gateway, s3, repo, wal, "--predlog-adopt-interval-s", "0.5")
    flushed = {pid for pid, at in answered if at < killed_at - 0.25}
    assert len(flushed) >= 20

    def all_in_store() -> bool:
        return set(acked) <= set(_ids(s3.rows("feedback"), "prediction_id")) and flushed <= set(
            _ids(s3.rows("predictions"), "id")
        )

    assert wait_for(all_in_store, 30), (s3.objects(), _local_segments(wal))
    assert wait_for(lambda: not _local_segments(wal), 10), _local_segments(wal)
    # exactly once: every prediction and every feedback message in one object of the store
    feedback, predictions = _ids(s3.rows("feedback"), "prediction_id"), _ids(s3.rows("predictions"), "id")
    assert all(n == 1 for n in feedback.values()) and all(n == 1 for n in predictions.values())
    assert _metrics(restarted)["onnxgate_predlog_adopted_segments_total"] >= 1  # the killed replica's open ones
    assert restarted.terminate() == 0


def _settings(wal: Path, uri: str, replica: str = "r") -> PredLogSettings:
    return PredLogSettings(wal, replica_id=replica, store_uri=uri)


def _write_parquet(path: Path, ids: list[str]) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"id": ids}), path)
    return path.read_bytes()


def test_an_upload_repeated_after_a_crash_writes_the_same_object_and_a_conflict_is_never_overwritten(
    s3: S3, tmp_path: Path
) -> None:
    wal = tmp_path / "wal"
    uploader = open_uploader(_settings(wal, s3.uri))
    assert uploader is not None
    fs, root = pafs.FileSystem.from_uri(s3.uri)
    # a crash between the upload and the local delete: the object is there, the file too
    first = wal / "r" / "m" / "predictions-00000001.parquet"
    data = _write_parquet(first, ["a", "b"])
    with fs.open_output_stream(f"{root}/r/m/predictions-00000001.parquet") as out:
        out.write(data)
    assert uploader.upload_dir(wal / "r") == 1
    assert not first.exists() and s3.objects() == {"r/m/predictions-00000001.parquet": len(data)}
    assert next_seq(wal / "r" / "m", "predictions") == 2  # the number stays used after the file went
    # the store holds the next key with other bytes (a replica id reused with a new local directory)
    second = wal / "r" / "m" / "predictions-00000002.parquet"
    _write_parquet(second, ["c"])
    other = _write_parquet(tmp_path / "other.parquet", ["someone", "else"])
    with fs.open_output_stream(f"{root}/r/m/predictions-00000002.parquet") as out:
        out.write(other)
    with pytest.raises(UploadConflict, match="never overwritten"):
        uploader.upload_dir(wal / "r")
    assert second.exists() and not uploader.healthy and uploader.errors == 1
    with fs.open_input_file(f"{root}/r/m/predictions-00000002.parquet") as f:
        assert f.read() == other


def test_sequence_numbers_continue_past_the_store_when_the_local_directory_is_new(s3: S3, tmp_path: Path) -> None:
    fs, root = pafs.FileSystem.from_uri(s3.uri)
    for key in ("r/argmax/predictions-00000007.parquet", "r/feedback-00000003.parquet", "q/feedback-00000009.parquet"):
        with fs.open_output_stream(f"{root}/{key}") as out:
            out.write(b"x")
    wal = tmp_path / "wal"  # empty: a pod's emptyDir, gone with the pod that wrote those segments
    assert open_uploader(_settings(wal, s3.uri)) is not None
    assert next_seq(wal / "r" / "argmax", "predictions") == 8
    assert next_seq(wal / "r", "feedback") == 4  # replica q's numbers are q's own


def test_an_unusable_store_stops_the_start_with_one_line(s3: S3, tmp_path: Path) -> None:
    repo = argmax_repository(tmp_path / "repo")
    for location, expected in (
        ("ftp://bucket/log", "predlog_dir 'ftp://bucket/log' is not usable"),
        ("s3://KEY:SECRET@no-such-bucket/log", "bucket 'no-such-bucket' does not exist"),
    ):
        done = subprocess.run(
            [
                *SERVE,
                "--model-repository",
                str(repo),
                "--predlog-dir",
                location,
                "--predlog-local-dir",
                str(tmp_path / "wal"),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, **s3.env},
        )
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2 and len(lines) == 1 and expected in lines[0], done.stderr
        assert "SECRET" not in done.stderr
    assert not list(tmp_path.glob("s3:*")) and not list(Path.cwd().glob("s3:*"))  # no local folder named s3:


def test_refused_credentials_stop_the_start_with_one_line(tmp_path: Path) -> None:
    repo = argmax_repository(tmp_path / "repo")
    with running_s3(authenticate=True) as server:
        env = {**os.environ, **server.env, "AWS_ACCESS_KEY_ID": "AKIAWRONG", "AWS_SECRET_ACCESS_KEY": "hush-hush"}
        done = subprocess.run(
            [
                *SERVE,
                "--model-repository",
                str(repo),
                "--predlog-dir",
                server.uri,
                "--predlog-local-dir",
                str(tmp_path),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
        )
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and "refuses the credentials" in lines[0], done.stderr
    assert "hush-hush" not in done.stderr


def test_uris_are_shown_without_credentials() -> None:
    assert redact("s3://AKIA:hush@bucket/log") == "s3://***@bucket/log"
    assert redact("s3://bucket/log?access_key=AKIA&secret_key=hush") == "s3://bucket/log?***"


def test_the_uploader_thread_retries_until_the_store_comes_back(
    s3: S3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    wal = tmp_path / "wal"
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.env["AWS_ENDPOINT_URL"])  # through the proxy, cut now
    s3.proxy.down()
    # a store unreachable at start is not a start-up error: the uploader retries, unhealthy meanwhile
    uploader = open_uploader(_settings(wal, s3.uri))
    assert isinstance(uploader, Uploader) and not uploader.healthy
    path = wal / "r" / "feedback-00000001.parquet"
    _write_parquet(path, ["f"])
    uploader.poll_s, uploader.max_backoff_s = 0.1, 0.5
    uploader.start()
    try:
        assert wait_for(lambda: uploader.errors >= 2, 30)
        assert path.exists() and not uploader.healthy
        s3.proxy.up()
        assert wait_for(lambda: not path.exists(), 30)
        assert wait_for(lambda: uploader.healthy, 5) and "r/feedback-00000001.parquet" in s3.objects()
    finally:
        uploader.close(5)

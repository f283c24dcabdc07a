"""No orphaned segments (issue 13): what a replica killed mid-traffic left open is rolled to Parquet,
exactly once, by a live replica sharing the log directory; Parquet readers alone then see every row."""

from __future__ import annotations

import os
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import grpc
import pyarrow as pa
import pyarrow.parquet as pq
from prometheus_client.parser import text_string_to_metric_families

from onnxgate.server.adopt import Adopter
from onnxgate.server.replica_lock import ReplicaLock
from tests.conftest import SpawnedGateway
from tests.predlog.e2e_helpers import Clients, argmax_repository, features
from tests.predlog.helpers import wait_for

ADOPTED = "onnxgate_predlog_adopted_segments_total"


def _spawn(spawn_gateway: Callable[..., SpawnedGateway], repo: Path, log_dir: Path) -> SpawnedGateway:
    # generated replica ids; segments stay open (an hour) unless adopted; a look every half second
    return spawn_gateway(
        "--model-repository",
        str(repo),
        "--predlog-dir",
        str(log_dir),
        "--predlog-flush-ms",
        "50",
        "--predlog-segment-max-age-s",
        "3600",
        "--predlog-adopt-interval-s",
        "0.5",
    )


def _metric(gw: SpawnedGateway, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{gw.metrics_port}/metrics", timeout=10) as r:
        text = r.read().decode()
    return next(s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == name)


def _replica_dir_of(log_dir: Path, pid: int) -> Path:
    # the lock file names its holder: "pid N on host H since T"
    (found,) = [d for d in log_dir.iterdir() if (d / ".lock").read_text().startswith(f"pid {pid} ")]
    return found


def _parquet_rows(replica_dir: Path) -> dict[Path, int]:
    return {p: pq.read_metadata(p).num_rows for p in sorted(replica_dir.rglob("*.parquet"))}


def _read_parquet(paths: list[Path]) -> pa.Table:
    return pa.concat_tables([pq.read_table(p) for p in paths], promote_options="permissive")


def test_a_dead_replicas_open_segments_are_adopted_exactly_once(
    spawn_gateway: Callable[..., SpawnedGateway], tmp_path: Path
) -> None:
    repo, log_dir = argmax_repository(tmp_path / "repo"), tmp_path / "log"
    doomed = _spawn(spawn_gateway, repo, log_dir)
    survivor = _spawn(spawn_gateway, repo, log_dir)
    dead_dir = _replica_dir_of(log_dir, doomed.process.pid)
    answered: list[tuple[str, float]] = []
    acked: list[str] = []
    stop = threading.Event()

    def traffic(worker: int) -> None:
        c = Clients(doomed.address)
        i = 0
        try:
            while not stop.is_set():
                pid = f"w{worker}-{i}"
                c.infer(pid, features(i))
                answered.append((pid, time.monotonic()))
                c.send(pid, str(i % 4))
                acked.append(pid)
                i += 1
        except grpc.RpcError:
            pass  # the server died under us
        finally:
            c.close()

    threads = [threading.Thread(target=traffic, args=(w,)) for w in range(2)]
    for t in threads:
        t.start()
    time.sleep(2.5)
    # while its writer lives, nothing of it is adopted (the survivor looked several times meanwhile); listed
    # before the kill, since the survivor may adopt them right after it (no roll or new schema comes between)
    left_open = list(dead_dir.rglob("*.arrows"))
    assert left_open and not list(dead_dir.rglob("*.parquet")) and _metric(survivor, ADOPTED) == 0
    doomed.process.kill()  # SIGKILL, mid-traffic
    killed_at = time.monotonic()
    doomed.process.wait(10)
    stop.set()
    for t in threads:
        t.join(10)
    assert len(acked) > 20

    assert wait_for(lambda: not list(dead_dir.rglob("*.arrows")), 15), list(dead_dir.rglob("*"))
    # a Parquet-only reader sees every acknowledged feedback and every prediction flushed before the kill
    feedback = _read_parquet(list(dead_dir.glob("feedback-*.parquet")))
    predictions = _read_parquet(list((dead_dir / "argmax").glob("predictions-*.parquet")))
    assert set(acked) <= set(feedback["prediction_id"].to_pylist())
    flushed = {pid for pid, at in answered if at < killed_at - 0.5}
    assert len(flushed) > 10 and flushed <= set(predictions["id"].to_pylist())
    # counted (the scrape may come a moment after the last file went)
    assert wait_for(lambda: _metric(survivor, ADOPTED) == len(left_open), 5), _metric(survivor, ADOPTED)
    adopted = _metric(survivor, ADOPTED)
    # exactly once: later rounds change nothing (same files, same rows), and count nothing more
    files = _parquet_rows(dead_dir)
    time.sleep(1.6)  # three more rounds
    assert _parquet_rows(dead_dir) == files and _metric(survivor, ADOPTED) == adopted
    assert survivor.terminate() == 0


def _open_segment(directory: Path, ids: list[str]) -> Path:
    """A stream segment as a writer killed mid-write leaves it: complete batches, then a torn one."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "predictions-00000001.arrows"
    table = pa.table({"id": ids})
    with pa.OSFile(str(path), "wb") as f, pa.ipc.new_stream(f, table.schema) as writer:
        writer.write_table(table)
    with open(path, "ab") as f:
        f.write(b"\xff\xff\xff\xff\x40\x00\x00\x00torn")
    return path


def test_a_directory_without_a_lock_is_adopted_after_the_grace_period(tmp_path: Path) -> None:
    log_dir = tmp_path / "log"
    stream = _open_segment(log_dir / "old-replica" / "m", ["a", "b"])
    adopter = Adopter(log_dir, "me", interval_s=0, lockless_grace_s=3600)
    assert adopter.adopt_once() == 0 and stream.exists()  # written less than an hour ago: maybe alive
    an_hour_ago = time.time() - 3700
    for p in (stream, stream.parent, stream.parent.parent):
        os.utime(p, (an_hour_ago, an_hour_ago))
    assert adopter.adopt_once() == 1
    assert not stream.exists() and pq.read_table(stream.with_suffix(".parquet"))["id"].to_pylist() == ["a", "b"]
    assert adopter.adopt_once() == 0 and adopter.adopted == 1


def test_a_directory_whose_lock_is_held_is_not_adopted(tmp_path: Path) -> None:
    log_dir = tmp_path / "log"
    lock = ReplicaLock(log_dir / "alive")  # held by this process: a live writer
    stream = _open_segment(log_dir / "alive" / "m", ["a"])
    adopter = Adopter(log_dir, "me", interval_s=0)
    assert adopter.adopt_once() == 0 and stream.exists()
    lock.release()  # its holder is gone
    assert adopter.adopt_once() == 1 and not stream.exists()

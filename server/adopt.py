"""Segments a dead replica left open are adopted: rolled to Parquet, exactly once, by a live replica.

A replica killed by SIGKILL or the OOM killer leaves its open `.arrows` segments behind. Under a
generated replica id (or a pod name that never comes back) no process would ever roll them, and
readers of Parquet alone (DuckDB, Spark, pandas) would never see those rows. So every live gateway
looks, every `predlog_adopt_interval_s` and off the serving path, at the other replica directories of
its local log directory (with an object store: of its local write-ahead directory):

- A directory whose `.lock` it can take (flock LOCK_EX|LOCK_NB) has no live writer: the kernel drops
  the lock when its holder dies. Holding the lock, it recovers the directory as the replica itself
  would at its start (segments.recover: cut a torn tail, roll to Parquet, remove the stream file) and,
  with an object store, uploads the directory's Parquet files; then it lets go. The lock makes
  adoption exclusive (two gateways never adopt one directory at once, nor race a replica restarting
  under the same id: that one waits, see replica_lock.py), and recover() is idempotent: a second round
  finds nothing left to roll.
- A directory with segments but no `.lock` at all (written before locks existed) is orphaned once its
  newest file is older than LOCKLESS_GRACE_S: those writers rolled their open segment after
  predlog_segment_max_age_s (default 300 s) even when idle, so a file untouched for an hour has no
  writer left. The adopter creates the `.lock` and takes it, as above.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from onnxgate.server.objectstore import Uploader, waiting_files
from onnxgate.server.replica_lock import ADOPTING, LOCK_NAME
from onnxgate.server.segments import recover

log = logging.getLogger(__name__)

LOCKLESS_GRACE_S = 3600.0
_STREAM = re.compile(r"^(?P<kind>[a-z]+)-\d{8}\.arrows$")


class Adopter:
    """Adopts the segments dead replicas left open in `log_dir` (all replica directories but `own`)."""

    def __init__(
        self,
        log_dir: Path,
        own_replica: str,
        *,
        interval_s: float,
        uploader: Uploader | None = None,
        lockless_grace_s: float = LOCKLESS_GRACE_S,
    ) -> None:
        self.log_dir = log_dir
        self.own_replica = own_replica
        self.interval_s = interval_s
        self.uploader = uploader
        self.lockless_grace_s = lockless_grace_s
        self.adopted = 0  # segments rolled for dead replicas
        self.errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="predlog-adopter", daemon=True)

    def start(self) -> Adopter:
        if self.interval_s > 0:
            self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(30)

    def _run(self) -> None:
        # the first round at once: what a predecessor in this pod (an OOM kill) left is rolled right away
        while True:
            self.adopt_once()
            if self._stop.wait(self.interval_s):
                return

    def adopt_once(self) -> int:
        """One round over every other replica directory; returns the segments rolled. Never raises."""
        try:
            replicas = sorted(p for p in self.log_dir.iterdir() if p.is_dir() and p.name != self.own_replica)
        except FileNotFoundError:
            return 0
        except OSError as error:
            self.errors += 1
            log.error("prediction log: cannot list %s to adopt dead replicas' segments: %s", self.log_dir, error)
            return 0
        rolled = 0
        for replica_dir in replicas:
            if self._stop.is_set():
                break
            try:
                rolled += self._adopt(replica_dir)
            except Exception as error:  # e.g. a full disk, the store down: the next round tries again
                self.errors += 1
                log.error(
                    "prediction log: adopting %s failed (%s: %s); tried again in %ss",
                    replica_dir,
                    type(error).__name__,
                    error,
                    self.interval_s,
                )
        return rolled

    def _adopt(self, replica_dir: Path) -> int:
        streams = [p for d in _dirs(replica_dir) for p in _streams(d)]
        waiting = waiting_files(replica_dir) if self.uploader is not None else []
        if not streams and not waiting:  # nothing to do: its lock is not even looked at
            return 0
        lock_path = replica_dir / LOCK_NAME
        if not lock_path.exists() and time.time() - _newest_mtime(replica_dir) < self.lockless_grace_s:
            return 0  # written before locks existed, and maybe by a writer still alive
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return 0  # its writer is alive (or another gateway adopts it right now)
            os.ftruncate(fd, 0)
            since = time.strftime("%FT%TZ", time.gmtime())
            os.write(fd, f"{ADOPTING} by pid {os.getpid()} on host {socket.gethostname()} since {since}\n".encode())
            rolled = 0
            for directory in _dirs(replica_dir):
                for kind in sorted({m["kind"] for p in _streams(directory) if (m := _STREAM.match(p.name))}):
                    n = len(recover(directory, kind).rolled)
                    rolled += n
                    self.adopted += n
            if rolled:
                log.warning(
                    "prediction log: adopted %d segment(s) that dead replica %s left open: rolled to Parquet",
                    rolled,
                    replica_dir.name,
                )
            if self.uploader is not None:
                self.uploader.upload_dir(replica_dir)
            return rolled
        finally:
            os.close(fd)  # lets go of the lock


def _dirs(replica_dir: Path) -> list[Path]:
    """The replica directory (feedback) and its model directories (predictions)."""
    try:
        return [replica_dir, *sorted(p for p in replica_dir.iterdir() if p.is_dir())]
    except FileNotFoundError:
        return []


def _streams(directory: Path) -> Iterator[Path]:
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return
    yield from (directory / n for n in names if _STREAM.match(n))


def _newest_mtime(replica_dir: Path) -> float:
    newest = 0.0
    for directory in _dirs(replica_dir):
        for entry in os.scandir(directory):
            try:
                newest = max(newest, entry.stat().st_mtime)
            except FileNotFoundError:
                continue
    return newest


class AdoptionCollector(Collector):
    def __init__(self, adopter: Adopter) -> None:
        self._adopter = adopter

    def collect(self) -> Iterator[Metric]:
        yield CounterMetricFamily(
            "onnxgate_predlog_adopted_segments",
            "Segments that dead replicas left open, rolled to Parquet by this gateway",
            value=self._adopter.adopted,
        )
        yield CounterMetricFamily(
            "onnxgate_predlog_adoption_errors", "Adoption attempts that failed (retried)", value=self._adopter.errors
        )

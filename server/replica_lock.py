"""One writer per replica directory: an exclusive lock held for the whole life of the process.

Every file under `<log_dir>/<replica_id>/` is written by exactly one process; recovery (cutting torn
tails, rolling leftover stream segments) is only safe because nobody else appends to them. Two
processes with the same replica id (a copy-pasted `--predlog-replica-id`, a restarted pod whose
predecessor still drains) would destroy each other's segments, so the second one refuses to start.

The lock is `flock` on `<replica_dir>/.lock`: the kernel drops it when the holder dies (SIGKILL and OOM
included), so a restart never waits for a stale lock. On NFS (a Kubernetes RWX volume), Linux maps flock
to POSIX byte-range locks, which the NFS server arbitrates between hosts. The file holds who took the
lock, for the message the second process prints.
"""

from __future__ import annotations

import fcntl
import os
import socket
import time
from pathlib import Path

LOCK_NAME = ".lock"
# what a live replica adopting this directory (server/adopt.py) writes into the lock while it holds it
ADOPTING = "adopting"
ADOPTION_WAIT_S = 60.0


class ReplicaInUse(Exception):
    """Another live process holds this replica directory."""


class ReplicaLock:
    def __init__(self, replica_dir: Path) -> None:
        replica_dir.mkdir(parents=True, exist_ok=True)
        self.path = replica_dir / LOCK_NAME
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + ADOPTION_WAIT_S
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                holder = _read_holder(fd)
            # another replica rolls what this replica's predecessor left open: done in moments, then ours
            if holder.startswith(ADOPTING) and time.monotonic() < deadline:
                time.sleep(0.1)
                continue
            os.close(fd)
            raise ReplicaInUse(
                f"prediction log directory {replica_dir} is in use by another process ({holder}): each process "
                "needs its own replica id: set a different --predlog-replica-id (ONNXGATE_PREDLOG_REPLICA_ID) or "
                "leave it unset for a generated one, or stop the other process"
            ) from None
        os.ftruncate(fd, 0)
        os.write(
            fd,
            f"pid {os.getpid()} on host {socket.gethostname()} since {time.strftime('%FT%TZ', time.gmtime())}\n".encode(),
        )
        self._fd: int | None = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None


def _read_holder(fd: int) -> str:
    try:
        return os.pread(fd, 512, 0).decode(errors="replace").strip() or "holder unknown"
    except OSError:
        return "holder unknown"

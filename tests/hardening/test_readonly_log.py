"""The prediction log's directory made read-only under a running gateway (issue 10, faults).

The gateway runs as an unprivileged user (util-linux `setpriv`, uid 65534): root ignores directory
permissions, so a test running as root could not make a directory read-only for itself otherwise.
Serving continues, the lost records are counted, health and metrics say so, feedback is refused with
UNAVAILABLE rather than acknowledged without being stored; once writable again, the writers recover and
every acknowledged feedback is on disk.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from tests.conftest import SpawnedGateway
from tests.predlog.e2e_helpers import Clients, argmax_repository, features, label_of
from tests.predlog.helpers import wait_for
from tests.predlog.test_e2e_faults import (
    FEEDBACK_HEALTH,
    NOT_SERVING,
    PREDLOG_HEALTH,
    SERVING,
    _assert_unavailable,
    _feedback_counts,
    _health,
    _metric,
    _send,
)

NOBODY = 65534
AS_NOBODY = ("setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--")


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory the unprivileged gateway can reach (pytest's own tmp is root's alone)."""
    if shutil.which("setpriv") is None:
        pytest.fail("setpriv is missing: .ci/deps/faults.sh installs util-linux")
    base = Path(tempfile.mkdtemp(prefix="onnxgate-ro-", dir="/tmp"))
    base.chmod(0o755)
    yield base
    for path in [base, *base.rglob("*")]:
        if path.is_dir() and not path.is_symlink():
            path.chmod(0o755)
    shutil.rmtree(base, ignore_errors=True)


def _set_writable(log_dir: Path, writable: bool) -> None:
    mode = 0o755 if writable else 0o555
    for path in [log_dir, *log_dir.rglob("*")]:
        if path.is_dir():
            path.chmod(mode)


def test_read_only_log_directory(spawn_gateway: Callable[..., SpawnedGateway], shared_dir: Path) -> None:
    repo = argmax_repository(shared_dir / "repo")
    log_dir, home = shared_dir / "log", shared_dir / "home"
    for d in (log_dir, home):
        d.mkdir()
        os.chown(d, NOBODY, NOBODY)
    gw = spawn_gateway(
        "--model-repository", str(repo), "--predlog-dir", str(log_dir), "--predlog-replica-id", "r",
        "--predlog-flush-ms", "20", "--predlog-segment-max-age-s", "1", "--predlog-unknown-after-s", "3600",
        prefix=AS_NOBODY, env={"HOME": str(home)},
    )  # fmt: skip
    c = Clients(gw.address)
    acked: list[str] = []
    for i in range(3):
        c.infer(f"p{i}", features(i))
        assert not isinstance(_send(c, f"p{i}", str(i % 4)), grpc.RpcError)
        acked.append(f"p{i}")
    assert wait_for(lambda: _metric(gw, "onnxgate_predlog_records_written_total") == 3, 10)

    _set_writable(log_dir, False)  # no new file can be made: rolls and new segments fail
    assert stat.S_IMODE(log_dir.stat().st_mode) == 0o555

    def down() -> bool:
        up = "onnxgate_predlog_writer_up"
        return _metric(gw, up, writer="feedback") == 0 and _metric(gw, up, writer="predictions") == 0

    i = 3
    refused: list[str] = []
    deadline_rounds = 400
    while not (down() and refused):
        assert deadline_rounds > 0, "the writers never reported the read-only directory"
        deadline_rounds -= 1
        pid = f"p{i}"
        assert label_of(c.infer(pid, features(i))) == i % 4  # serving never fails
        answer = _send(c, pid, str(i % 4))
        if isinstance(answer, grpc.RpcError):
            _assert_unavailable(answer)
            refused.append(pid)
        else:
            acked.append(pid)
        i += 1
        time.sleep(0.05)  # the writers roll every second: give them a chance
    assert wait_for(lambda: _health(gw, FEEDBACK_HEALTH) == _health(gw, PREDLOG_HEALTH) == NOT_SERVING, 5)
    assert _health(gw, "") == SERVING  # readiness: inference does not need the log
    assert _metric(gw, "onnxgate_predlog_io_errors_total", writer="feedback", op="roll") >= 1

    _set_writable(log_dir, True)  # writable again: the writers recover
    up = "onnxgate_predlog_writer_up"
    assert wait_for(lambda: _metric(gw, up, writer="feedback") == _metric(gw, up, writer="predictions") == 1, 15)
    assert wait_for(lambda: _health(gw, FEEDBACK_HEALTH) == _health(gw, PREDLOG_HEALTH) == SERVING, 5)
    for j in range(i, i + 3):
        c.infer(f"p{j}", features(j))
        assert not isinstance(_send(c, f"p{j}", str(j % 4)), grpc.RpcError)
        acked.append(f"p{j}")
    c.close()
    assert gw.terminate() == 0
    # every acknowledged feedback on disk, once; none of the refused ones
    assert _feedback_counts(log_dir) == Counter(acked)

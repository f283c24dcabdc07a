"""SegmentWriter details the end-to-end tests do not show: new directories fsynced into their parents
(observed with strace), byte retention by the data's own time."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from onnxgate.server.segments import SegmentWriter, parquet_max_ts

pytestmark = pytest.mark.wall_clock

TS = pa.timestamp("us", tz="UTC")


def test_new_directories_are_fsynced_into_their_parents(tmp_path: Path) -> None:
    assert shutil.which("strace"), "strace is missing: run .ci/deps/faults.sh"
    model_dir = tmp_path / "log" / "replica" / "model"
    code = (
        "import sys; from pathlib import Path; from onnxgate.server.segments import SegmentWriter; "
        "SegmentWriter(Path(sys.argv[1]), 'predictions', max_bytes=1 << 20, max_age_s=60)"
    )
    trace = tmp_path / "trace.txt"
    strace = ["strace", "-f", "-qq", "-e", "trace=mkdir,mkdirat,openat,open,fsync", "-o", str(trace)]
    subprocess.run(
        [*strace, sys.executable, "-c", code, str(model_dir)],
        check=True,
        timeout=60,
    )
    calls = [line.split(maxsplit=1)[1] for line in trace.read_text().splitlines() if " = " in line]
    assert model_dir.is_dir()
    for d in (tmp_path / "log", tmp_path / "log" / "replica", model_dir):
        made = next(i for i, c in enumerate(calls) if re.match(rf'mkdir(at)?\((AT_FDCWD, )?"{d}"', c))
        opened = next(
            ((i, c) for i, c in enumerate(calls) if i > made and re.match(rf'open(at)?\((AT_FDCWD, )?"{d.parent}"', c)),
            None,
        )
        assert opened is not None, f"{d.parent} not opened (to fsync) after {d} was made: {calls[made:]}"
        fd = opened[1].rsplit("= ", 1)[1].strip()
        assert any(c.startswith(f"fsync({fd})") for c in calls[opened[0] :]), (d, calls[made:])


def _segment(path: Path, when: datetime, rows: int = 200) -> None:
    pq.write_table(pa.table({"id": [f"x{i}" for i in range(rows)], "ts": pa.array([when] * rows, TS)}), path)


def test_byte_retention_deletes_the_oldest_data_first_never_the_just_rolled(tmp_path: Path) -> None:
    now = datetime.now(UTC)
    # sequence numbers in the opposite order of the data's age
    _segment(tmp_path / "predictions-00000001.parquet", now - timedelta(hours=1))
    _segment(tmp_path / "predictions-00000002.parquet", now - timedelta(days=2))
    size = (tmp_path / "predictions-00000001.parquet").stat().st_size
    assert parquet_max_ts(tmp_path / "predictions-00000002.parquet") == (now - timedelta(days=2)).timestamp() * 1e6 // 1
    writer = SegmentWriter(
        tmp_path, "predictions", max_bytes=1 << 20, max_age_s=60, retention_s=None, retention_bytes=int(size * 1.5)
    )
    writer.write(pa.record_batch({"id": ["new"], "ts": pa.array([now], TS)}))
    writer.roll()
    assert writer.health.healthy
    names = sorted(p.name for p in tmp_path.glob("*.parquet"))
    # over the budget: the two-day-old data goes (though its sequence number is higher); that is enough
    assert names == ["predictions-00000001.parquet", "predictions-00000003.parquet"]
    writer.retention_bytes = 1  # the just-rolled segment stays, whatever the budget
    writer.write(pa.record_batch({"id": ["newer"], "ts": pa.array([now], TS)}))
    writer.roll()
    assert sorted(p.name for p in tmp_path.glob("*.parquet")) == ["predictions-00000004.parquet"]

"""Segment files: the on-disk unit of the prediction log, one writer per directory, many readers.

A segment is first an Arrow IPC *stream* file (`<kind>-<seq>.arrows`) that the writer appends record
batches to and fsyncs; a flushed batch therefore survives `kill -9` (and power loss). When the segment
is big or old enough it is rolled: rewritten as `<kind>-<seq>.parquet` (tmp file, fsync, rename),
then the stream file is removed. Readers prefer the Parquet file of a sequence number when both exist
(a crash between the rename and the unlink), and read a stream file up to its last complete batch: a
batch being appended, or torn by a crash, is simply not there yet.

On open, a writer recovers its own directory: a stream file left by a crash is cut at its last
complete batch and rolled to Parquet; what was cut is reported, never silently accepted.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import pyarrow as pa
import pyarrow.parquet as pq

log = logging.getLogger(__name__)

STREAM_EXT = ".arrows"
PARQUET_EXT = ".parquet"
_NAME = re.compile(r"^(?P<kind>[a-z]+)-(?P<seq>\d{8})\.(?P<ext>arrows|parquet)$")


@dataclass(frozen=True)
class RecoveryReport:
    """What opening a directory found: segments rolled after a crash, and torn tails cut off."""

    rolled: tuple[str, ...] = ()
    torn: tuple[str, ...] = ()
    bytes_cut: int = 0

    def __bool__(self) -> bool:
        return bool(self.rolled or self.torn)


@dataclass(frozen=True)
class StreamRead:
    table: pa.Table | None
    torn: bool  # bytes after the last complete batch (a crash, or a batch being written right now)
    good_bytes: int
    total_bytes: int


def read_stream(path: Path) -> StreamRead:
    """Every complete batch of a stream file; a torn tail is reported, not raised."""
    data = path.read_bytes()
    buf = pa.BufferReader(data)
    try:
        reader = pa.ipc.open_stream(buf)
    except (pa.ArrowInvalid, OSError):
        return StreamRead(None, torn=len(data) > 0, good_bytes=0, total_bytes=len(data))
    batches: list[pa.RecordBatch] = []
    good = buf.tell()
    torn = False
    while True:
        try:
            batches.append(reader.read_next_batch())
        except StopIteration:
            break
        except (pa.ArrowInvalid, OSError):
            torn = True
            break
        good = buf.tell()
    table = pa.Table.from_batches(batches, schema=reader.schema)
    torn = torn or (good < len(data) and not _only_eos(data[good:]))
    return StreamRead(table, torn=torn, good_bytes=good, total_bytes=len(data))


def _only_eos(tail: bytes) -> bool:
    # A closed stream ends with the end-of-stream marker (continuation token + zero length).
    return tail in (b"", b"\xff\xff\xff\xff\x00\x00\x00\x00", b"\x00\x00\x00\x00")


def segment_paths(directory: Path, kind: str) -> list[Path]:
    """The readable segments of one kind in one directory, oldest first, one path per sequence number."""
    by_seq: dict[int, Path] = {}
    try:
        entries = list(directory.iterdir())
    except FileNotFoundError:
        return []
    for path in entries:
        m = _NAME.match(path.name)
        if not m or m["kind"] != kind:
            continue
        seq = int(m["seq"])
        if seq not in by_seq or path.suffix == PARQUET_EXT:
            by_seq[seq] = path
    return [by_seq[s] for s in sorted(by_seq)]


def read_segment(path: Path) -> pa.Table | None:
    """One segment as a table; None when it vanished (rolled meanwhile) or holds no complete batch."""
    try:
        if path.suffix == PARQUET_EXT:
            return pq.read_table(path)
        result = read_stream(path)
    except FileNotFoundError:
        parquet = path.with_suffix(PARQUET_EXT)  # rolled between listing and reading
        return pq.read_table(parquet) if parquet.exists() else None
    return result.table


def read_segments(directory: Path, kind: str) -> Iterator[tuple[Path, pa.Table]]:
    for path in segment_paths(directory, kind):
        table = read_segment(path)
        if table is not None and table.num_rows:
            yield path, table


def fsync_dir(directory: Path) -> None:
    # A new or renamed file's directory entry is only durable once its directory is synced.
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def roll_to_parquet(stream_path: Path, table: pa.Table | None) -> Path | None:
    """Rewrite a stream segment as Parquet (atomically), then remove the stream file."""
    target: Path | None = None
    if table is not None and table.num_rows:
        target = stream_path.with_suffix(PARQUET_EXT)
        tmp = stream_path.with_suffix(".parquet.tmp")
        pq.write_table(table, tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
        fsync_dir(stream_path.parent)
    stream_path.unlink(missing_ok=True)
    return target


def recover(directory: Path, kind: str) -> RecoveryReport:
    """Make a directory this process is about to write clean: roll leftover stream files, cut torn tails."""
    rolled: list[str] = []
    torn: list[str] = []
    cut = 0
    for tmp in directory.glob(f"{kind}-*.tmp"):
        tmp.unlink(missing_ok=True)
    for path in sorted(directory.glob(f"{kind}-*{STREAM_EXT}")):
        if path.with_suffix(PARQUET_EXT).exists():  # crashed after rolling, before the unlink
            path.unlink()
            continue
        result = read_stream(path)
        if result.torn:
            torn.append(path.name)
            cut += result.total_bytes - result.good_bytes
            log.warning(
                "prediction log: %s had a torn tail; cut %d bytes after the last complete batch",
                path,
                result.total_bytes - result.good_bytes,
            )
        roll_to_parquet(path, result.table)
        rolled.append(path.name)
    return RecoveryReport(tuple(rolled), tuple(torn), cut)


def next_seq(directory: Path, kind: str) -> int:
    seqs = [int(m["seq"]) for p in directory.iterdir() if (m := _NAME.match(p.name)) and m["kind"] == kind]
    return max(seqs, default=0) + 1


class SegmentWriter:
    """Appends record batches to the current stream segment of one directory; rolls it to Parquet.

    Only one thread of one process writes a directory (the layout gives every replica its own), so
    nothing here is locked.
    """

    def __init__(
        self,
        directory: Path,
        kind: str,
        *,
        max_bytes: int,
        max_age_s: float,
        fsync: bool = True,
        retention_s: float | None = None,
        retention_bytes: int | None = None,
    ) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.kind = kind
        self.max_bytes = max_bytes
        self.max_age_s = max_age_s
        self.fsync = fsync
        self.retention_s = retention_s
        self.retention_bytes = retention_bytes
        self.recovery = recover(directory, kind)
        self._seq = next_seq(directory, kind)
        self._file: BinaryIO | None = None
        self._writer: pa.ipc.RecordBatchStreamWriter | None = None
        self._schema: pa.Schema | None = None
        self._opened_at = 0.0
        self._path: Path | None = None

    def append(self, batch: pa.RecordBatch) -> None:
        """Write a batch to the open segment (a new one when the schema changed); durable after sync()."""
        if self._writer is not None and not batch.schema.equals(self._schema):
            self.roll()
        if self._writer is None:
            self._open(batch.schema)
        assert self._writer is not None
        self._writer.write_batch(batch)

    def sync(self) -> None:
        if self._file is None:
            return
        self._file.flush()
        if self.fsync:
            os.fsync(self._file.fileno())

    def maybe_roll(self) -> None:
        if self._file is None:
            return
        if self._file.tell() >= self.max_bytes or time.monotonic() - self._opened_at >= self.max_age_s:
            self.roll()

    def roll(self) -> None:
        if self._writer is None or self._file is None or self._path is None:
            return
        self._writer.close()
        self.sync()
        self._file.close()
        path, self._path, self._writer, self._file, self._schema = self._path, None, None, None, None
        self._seq += 1
        roll_to_parquet(path, read_stream(path).table)
        self._apply_retention()

    def close(self) -> None:
        self.roll()

    def _open(self, schema: pa.Schema) -> None:
        self._path = self.directory / f"{self.kind}-{self._seq:08d}{STREAM_EXT}"
        self._file = open(self._path, "wb")  # noqa: SIM115 - lives until the segment is rolled
        self._writer = pa.ipc.new_stream(self._file, schema)
        self._schema = schema
        self._opened_at = time.monotonic()
        if self.fsync:
            fsync_dir(self.directory)

    def _apply_retention(self) -> None:
        if self.retention_s is None and self.retention_bytes is None:
            return
        parquet = [p for p in segment_paths(self.directory, self.kind) if p.suffix == PARQUET_EXT]
        stats = [(p, p.stat()) for p in parquet]
        now = time.time()
        total = sum(s.st_size for _, s in stats)
        for path, st in stats:  # oldest first
            too_old = self.retention_s is not None and now - st.st_mtime > self.retention_s
            too_big = self.retention_bytes is not None and total > self.retention_bytes
            if not (too_old or too_big):
                break
            path.unlink(missing_ok=True)
            total -= st.st_size

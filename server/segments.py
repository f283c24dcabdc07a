"""Segment files: the on-disk unit of the prediction log, one writer per directory, many readers.

A segment is first an Arrow IPC *stream* file (`<kind>-<seq>.arrows`) that the writer appends record
batches to and fsyncs; a flushed batch therefore survives `kill -9` (and power loss). When the segment
is big or old enough it is rolled: rewritten as `<kind>-<seq>.parquet` (tmp file, fsync, rename),
then the stream file is removed. Readers prefer the Parquet file of a sequence number when both exist
(a crash between the rename and the unlink), and read a stream file up to its last complete batch: a
batch being appended, or torn by a crash, is simply not there yet.

On open, a writer recovers its own directory: a stream file left by a crash is cut at its last
complete batch and rolled to Parquet; what was cut is reported, never silently accepted.

A write that fails (disk full, file size limit, fsync error) seals its segment at the last durable
batch; the next write starts a new one (SegmentWriter). Rolls and retention that fail are retried.
Retention goes by the data's own time (`ts`), never by file times against the wall clock.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
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


def read_stream(source: Path | bytes) -> StreamRead:
    """Every complete batch of a stream file (or its bytes); a torn tail is reported, not raised."""
    data = source.read_bytes() if isinstance(source, Path) else source
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


def segment_paths(directory: Path, kind: str, skipped: SkipList | None = None) -> list[Path]:
    """The readable segments of one kind in one directory, oldest first, one path per sequence number."""
    by_seq: dict[int, Path] = {}
    try:
        entries = list(directory.iterdir())
    except FileNotFoundError:
        return []
    except OSError as error:  # e.g. another replica's directory this process may not read
        if skipped is not None:
            skipped[directory] = f"{type(error).__name__}: {error}"
        return []
    for path in entries:
        m = _NAME.match(path.name)
        if not m or m["kind"] != kind:
            continue
        seq = int(m["seq"])
        if seq not in by_seq or path.suffix == PARQUET_EXT:
            by_seq[seq] = path
    return [by_seq[s] for s in sorted(by_seq)]


# Unreadable files met by a reader: path -> why. One corrupt or unreadable file (a disk error, a file
# dropped in by hand, another replica's permissions) is skipped and reported, never fatal to a reader.
SkipList = dict[Path, str]


def read_segment(path: Path, skipped: SkipList | None = None) -> pa.Table | None:
    """One segment as a table; None when it vanished (rolled meanwhile), holds no complete batch, or
    cannot be read (then it is added to `skipped`)."""
    try:
        if path.suffix == PARQUET_EXT:
            return pq.read_table(path)
        result = read_stream(path)
    except FileNotFoundError:
        parquet = path.with_suffix(PARQUET_EXT)  # rolled between listing and reading
        return read_segment(parquet, skipped) if parquet.exists() else None
    except (pa.ArrowException, OSError) as error:
        if skipped is not None:
            skipped[path] = f"{type(error).__name__}: {error}"
        return None
    return result.table


def read_segments(directory: Path, kind: str, skipped: SkipList | None = None) -> Iterator[tuple[Path, pa.Table]]:
    for path in segment_paths(directory, kind, skipped):
        table = read_segment(path, skipped)
        if table is not None and table.num_rows:
            yield path, table


def fsync_dir(directory: Path) -> None:
    # A new or renamed file's directory entry is only durable once its directory is synced.
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_dirs(directory: Path) -> None:
    """`mkdir -p` whose result survives a power loss: each directory created is fsynced into its parent."""
    missing: list[Path] = []
    for d in (directory, *directory.parents):
        if d.is_dir():
            break
        missing.append(d)
    for d in reversed(missing):  # outermost first
        try:
            d.mkdir()
        except FileExistsError:  # another process (a replica starting too) made it meanwhile
            if not d.is_dir():
                raise
        fsync_dir(d.parent)


# The version of the table contract (docs/reference/log-table.md) a rolled segment follows, in its Parquet key-value
# metadata: 1 = the columns of today's prediction and feedback rows. Additive changes keep it.
LOG_SCHEMA_VERSION_KEY = b"onnxgate.log_schema_version"
LOG_SCHEMA_VERSION = b"1"


def roll_to_parquet(stream_path: Path, table: pa.Table | None) -> Path | None:
    """Rewrite a stream segment as Parquet (atomically), then remove the stream file."""
    target: Path | None = None
    if table is not None and table.num_rows:
        target = stream_path.with_suffix(PARQUET_EXT)
        tmp = stream_path.with_suffix(".parquet.tmp")
        try:
            metadata = {**(table.schema.metadata or {}), LOG_SCHEMA_VERSION_KEY: LOG_SCHEMA_VERSION}
            pq.write_table(table.replace_schema_metadata(metadata), tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except BaseException:  # e.g. a full disk: no partial Parquet file is left behind
            tmp.unlink(missing_ok=True)
            raise
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
    return max(*seqs, seq_mark(directory, kind), 0) + 1


def seq_mark_path(directory: Path, kind: str) -> Path:
    return directory / f".{kind}-seq"


def seq_mark(directory: Path, kind: str) -> int:
    """The highest sequence number used by segments no longer here (uploaded to an object store, then
    removed: server/objectstore.py); 0 when none. A new segment must never reuse one."""
    try:
        return int(seq_mark_path(directory, kind).read_text())
    except FileNotFoundError:
        return 0


WRITE, ROLL, RETENTION = "write", "roll", "retention"
IO_OPS = (WRITE, ROLL, RETENTION)


class IOHealth:
    """What one writer thread's file I/O went through: its health state and error counters.

    Every failure is counted per operation (write, roll, retention) and remembered per directory until
    the same operation succeeds there again; the writer is `healthy` while nothing is failing.
    `last_error` is the most recent failure ('' when none; kept after a recovery). Changed by the
    writer thread only; read by scrapes and health checks.
    """

    def __init__(self, writer: str) -> None:
        self.writer = writer
        self.errors: dict[str, int] = dict.fromkeys(IO_OPS, 0)
        self.last_error = ""
        self._failing: dict[tuple[str, Path], str] = {}

    @property
    def healthy(self) -> bool:
        return not self._failing

    def failing(self, op: str, where: Path) -> bool:
        return (op, where) in self._failing

    def failed(self, op: str, where: Path, error: BaseException) -> None:
        self.errors[op] += 1
        message = f"{op} in {where}: {type(error).__name__}: {error}"
        if (op, where) in self._failing:  # still failing: counted, logged once
            log.debug("%s writer: %s (still failing)", self.writer, message)
        else:
            log.error("%s writer: %s; retried later", self.writer, message, exc_info=error)
        self._failing[(op, where)] = message
        self.last_error = message

    def ok(self, op: str, where: Path) -> None:
        if self._failing.pop((op, where), None) is not None:
            log.warning("%s writer: %s in %s works again", self.writer, op, where)


class SegmentWriter:
    """Writes record batches durably to the open stream segment of one directory; rolls it to Parquet.

    The writer owns the file: pyarrow only serializes the schema and batch messages, the bytes are
    written here (os.write, fsync) and the size up to the last durable message is tracked. A write that
    fails (a short write on a full disk, EFBIG, an fsync error) is never followed by appends to the same
    stream: the segment is sealed (truncated back to its last durable message, closed) and the next
    write begins a new segment. Sealed segments are rolled to Parquet at the next roll opportunity
    (`maybe_roll`, `close`); until then readers read the sealed stream file.

    A batch whose columns are a subset of the open segment's (same types) is written into it, missing
    columns as nulls; a batch with new columns rolls to a new segment whose schema is the union, so
    segments multiply with schema growth, not with flushes.

    `write` raises (after sealing); `maybe_roll`, `roll` and `close` never do: their failures are
    logged, counted in `health`, and retried at the next `maybe_roll` after `retry_s`. Only one thread
    of one process writes a directory (the layout gives every replica its own): nothing is locked.
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
        health: IOHealth | None = None,
        retry_s: float = 1.0,
    ) -> None:
        make_dirs(directory)
        self.directory = directory
        self.kind = kind
        self.max_bytes = max_bytes
        self.max_age_s = max_age_s
        self.fsync = fsync
        self.retention_s = retention_s
        self.retention_bytes = retention_bytes
        self.health = health if health is not None else IOHealth(kind)
        self.retry_s = retry_s
        self._sealed: list[Path] = []  # closed stream segments, oldest first, waiting to be rolled
        try:
            self.recovery = recover(directory, kind)
        except (OSError, pa.ArrowException) as error:  # e.g. a full disk: roll them later
            self.health.failed(ROLL, directory, error)
            self.recovery = RecoveryReport()
            self._sealed = sorted(directory.glob(f"{kind}-*{STREAM_EXT}"))
        self._seq = next_seq(directory, kind)
        self._fd: int | None = None
        self._path: Path | None = None
        self._schema: pa.Schema | None = None  # the open segment's
        self._last_schema: pa.Schema | None = None  # the latest segment's: the next one starts with it
        self._size = 0  # bytes of the open segment, all durable
        self._opened_at = 0.0
        self._retry_at = 0.0
        self._newest_us: int | None = None  # the newest `ts` this writer wrote: the clock of retention
        self._max_ts: dict[Path, int | None] = {}  # a rolled segment's newest `ts` (Parquet statistics)

    def write(self, batch: pa.RecordBatch) -> None:
        """Append a batch to the open segment (a new one when needed) and make it durable.

        On failure the segment is sealed at its last durable message, the error counted, and the
        error raised: the batch is not stored, and nothing after it goes into the same file."""
        base = self._schema if self._schema is not None else self._last_schema
        schema = batch.schema if base is None else widen(base, batch.schema)
        if self._fd is not None and not schema.equals(self._schema):
            self.roll()
        if self._fd is None:
            self._open(schema)
        assert self._schema is not None
        self._append(conform(batch, self._schema).serialize())
        self.health.ok(WRITE, self.directory)
        self._newest_us = _newest(self._newest_us, batch)

    def maybe_roll(self) -> None:
        """Roll the open segment when it is big or old enough; retry what failed. Never raises."""
        now = time.monotonic()
        if self._fd is not None and (self._size >= self.max_bytes or now - self._opened_at >= self.max_age_s):
            self.roll()
        elif now >= self._retry_at:
            if self._sealed:
                self._roll_sealed()
            if self._fd is None and self._last_schema is not None and self.health.failing(WRITE, self.directory):
                self._probe()

    def roll(self) -> None:
        """Close the open segment; roll it and every sealed one to Parquet; apply retention. Never raises."""
        self._seal()
        self._roll_sealed()

    def close(self) -> None:
        self.roll()

    def _open(self, schema: pa.Schema) -> None:
        path = self.directory / f"{self.kind}-{self._seq:08d}{STREAM_EXT}"
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        except OSError as error:
            self.health.failed(WRITE, self.directory, error)
            self._retry_at = time.monotonic() + self.retry_s
            raise
        self._fd, self._path, self._schema, self._size = fd, path, schema, 0
        self._last_schema = schema
        self._opened_at = time.monotonic()
        self._append(schema.serialize(), new_entry=True)

    def _append(self, data: pa.Buffer, *, new_entry: bool = False) -> None:
        assert self._fd is not None
        view = memoryview(data)
        try:
            done = 0
            while done < len(view):
                n = os.write(self._fd, view[done:])
                if n <= 0:
                    raise OSError(errno.ENOSPC, "write wrote nothing")
                done += n
            if self.fsync:
                os.fsync(self._fd)
                if new_entry:
                    fsync_dir(self.directory)
        except OSError as error:
            self.health.failed(WRITE, self.directory, error)
            self._retry_at = time.monotonic() + self.retry_s
            self._seal()
            raise
        self._size += len(view)

    def _seal(self) -> None:
        """Close the open segment at its last durable message: nothing written after it remains."""
        fd, path = self._fd, self._path
        if fd is None or path is None:
            return
        self._fd, self._path, self._schema = None, None, None
        self._seq += 1
        try:
            os.ftruncate(fd, self._size)  # a no-op unless a write failed
            if self.fsync:
                os.fsync(fd)
        except OSError as error:  # readers still stop at the last complete message; nothing follows it
            log.error("%s: cannot cut %s back to %d bytes: %s", self.kind, path, self._size, error)
        finally:
            os.close(fd)
        if self._size == 0:  # not even the schema made it
            path.unlink(missing_ok=True)
        else:
            self._sealed.append(path)
        self._size = 0

    def _probe(self) -> None:
        # Writes failed and none came since (e.g. clients keep away from an unhealthy replica): begin the
        # next segment now; once its schema message is durable, writing works again.
        assert self._last_schema is not None
        try:
            self._open(self._last_schema)
        except OSError:
            return
        self.health.ok(WRITE, self.directory)

    def _roll_sealed(self) -> None:
        rolled: Path | None = None
        while self._sealed:
            path = self._sealed[0]
            try:
                table = read_stream(path).table
                target = roll_to_parquet(path, table)
            except FileNotFoundError:
                target = None
            except (OSError, pa.ArrowException) as error:
                self.health.failed(ROLL, self.directory, error)
                self._retry_at = time.monotonic() + self.retry_s
                return
            self._sealed.pop(0)
            if target is not None and table is not None:
                self._max_ts[target] = _max_us(table.column("ts")) if "ts" in table.column_names else None
                rolled = target
        self.health.ok(ROLL, self.directory)
        if rolled is not None:
            self._apply_retention(rolled)

    def _apply_retention(self, just_rolled: Path) -> None:
        """Delete rolled segments older than the retention by the data's own time, never the one just
        rolled: a segment's age is the newest `ts` this writer wrote minus the segment's newest `ts`."""
        if self.retention_s is None and self.retention_bytes is None:
            return
        newest = _newest_of(self._newest_us, self._max_ts.get(just_rolled))
        try:
            candidates: list[tuple[Path, int | None, int]] = []
            total = just_rolled.stat().st_size
            for path in segment_paths(self.directory, self.kind):
                if path.suffix != PARQUET_EXT or path == just_rolled:
                    continue
                size = path.stat().st_size
                total += size
                candidates.append((path, self._segment_max_ts(path), size))
            doomed: list[Path] = []
            if self.retention_s is not None and newest is not None:
                limit_us = newest - self.retention_s * 1e6
                doomed = [p for p, ts, _ in candidates if ts is not None and ts < limit_us]
            if self.retention_bytes is not None:
                total -= sum(size for p, _, size in candidates if p in doomed)
                # oldest data first; a segment of unknown age last
                for path, _, size in sorted(candidates, key=lambda c: (c[1] is None, c[1] or 0)):
                    if total <= self.retention_bytes:
                        break
                    if path not in doomed:
                        doomed.append(path)
                        total -= size
            for path in doomed:
                path.unlink(missing_ok=True)
                self._max_ts.pop(path, None)
        except (OSError, pa.ArrowException) as error:
            self.health.failed(RETENTION, self.directory, error)
            self._retry_at = time.monotonic() + self.retry_s
            return
        self.health.ok(RETENTION, self.directory)

    def _segment_max_ts(self, path: Path) -> int | None:
        if path not in self._max_ts:
            self._max_ts[path] = parquet_max_ts(path)
        return self._max_ts[path]


def parquet_max_ts(source: Path | pa.NativeFile) -> int | None:
    """The newest `ts` of a Parquet segment (µs since the epoch), from its footer's statistics."""
    metadata = pq.ParquetFile(source).metadata
    newest: int | None = None
    for i in range(metadata.num_row_groups):
        group = metadata.row_group(i)
        for j in range(group.num_columns):
            column = group.column(j)
            stats = column.statistics
            if column.path_in_schema != "ts" or stats is None or not stats.has_min_max:
                continue
            value = stats.max
            if not isinstance(value, datetime):
                return None  # not a timestamp we know: of unknown age
            if value.tzinfo is None:
                value = value.replace(tzinfo=UTC)
            newest = _newest_of(newest, (value - _EPOCH) // timedelta(microseconds=1))
    return newest


_EPOCH = datetime.fromtimestamp(0, UTC)
_PER_US = {"s": 1_000_000, "ms": 1_000, "us": 1}


def _max_us(column: pa.Array | pa.ChunkedArray) -> int | None:
    """The newest value of a timestamp column in µs since the epoch (None: empty or not timestamps)."""
    if not pa.types.is_timestamp(column.type):
        return None
    value = pc.max(column).value
    if value is None:
        return None
    unit = column.type.unit
    return int(value) // 1000 if unit == "ns" else int(value) * _PER_US[unit]


def _newest(current: int | None, batch: pa.RecordBatch) -> int | None:
    if "ts" not in batch.schema.names:
        return current
    return _newest_of(current, _max_us(batch.column("ts")))


def _newest_of(a: int | None, b: int | None) -> int | None:
    return b if a is None else a if b is None else max(a, b)


def widen(schema: pa.Schema, new: pa.Schema) -> pa.Schema:
    """The schema a batch of schema `new` is written with after `schema`: `schema` itself when `new`'s
    columns are a subset of it (same types); else the union; `new` when a column changed its type."""
    fields = {f.name: f.type for f in schema}
    if all(f.name in fields and fields[f.name].equals(f.type) for f in new):
        return schema
    try:
        return pa.unify_schemas([schema, new])
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return new


def conform(batch: pa.RecordBatch, schema: pa.Schema) -> pa.RecordBatch:
    """The batch in `schema` (a superset of its columns): columns in that order, missing ones as nulls."""
    if batch.schema.equals(schema):
        return batch
    names = set(batch.schema.names)
    columns = [batch.column(f.name) if f.name in names else pa.nulls(batch.num_rows, f.type) for f in schema]
    return pa.RecordBatch.from_arrays(columns, schema=schema)

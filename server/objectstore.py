"""The prediction log in an object store (s3://, gs://, abfs://): a local write-ahead, then uploads.

    writers --append, fsync--> <local_dir>/<replica>/<model>/predictions-<seq>.arrows   (feedback is
                               acknowledged after this fsync, as with a local log)
            --roll---------->  <local_dir>/<replica>/<model>/predictions-<seq>.parquet
    Uploader thread --PUT--->  <uri>/<replica>/<model>/predictions-<seq>.parquet, then the local file goes

An object keeps its file's path relative to the local directory, so the store has the layout of a local
log and `LogFiles.at(uri)` reads it like one. An upload writes the whole file to its final key, which
an object store shows whole or not at all (an S3 PUT or multipart completion, a GCS or Azure block
commit): readers never see part of a segment. The local file is removed only once the object is there
with the file's size; a crash in between leaves the file, and the next pass (or the next start, or the
replica that adopts the directory: server/adopt.py) uploads it again: the same key, the same bytes.
Before each upload the key is looked up: an object with the same bytes is that case (nothing is
written); an object with other bytes is never overwritten (a conflict: the file stays, the uploader
reports unhealthy).

Sequence numbers stay unique although uploaded files leave the local directory: `.<kind>-seq`
(segments.seq_mark) keeps the highest number uploaded from each directory, and at start the store's
listing of this replica raises it (a local directory lost with its pod, a replica id that comes back).

Credentials and endpoint come from the environment the filesystem reads (for S3: AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, AWS_DEFAULT_REGION, or an instance role); a URI is shown
without the credentials it may carry.
"""

from __future__ import annotations

import logging
import os
import random
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.fs as pafs
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from onnxgate.server.logfiles import REMOTE_SCHEMES, LogFiles
from onnxgate.server.segments import fsync_dir, make_dirs, seq_mark, seq_mark_path

if TYPE_CHECKING:
    from onnxgate.server.predlog import PredLogSettings

log = logging.getLogger(__name__)

DEFAULT_LOCAL_DIR = Path("~/.cache/onnxgate/predlog-wal")
_SEGMENT = re.compile(r"^(?P<kind>[a-z]+)-(?P<seq>\d{8})\.(?P<ext>arrows|parquet)$")
# error texts of a store that refuses the credentials (S3 and compatible, GCS, Azure), as pyarrow reports them
_DENIED = re.compile(
    r"ACCESS_DENIED|INVALID_ACCESS_KEY|SIGNATURE_DOES_NOT_MATCH|AccessDenied|InvalidAccessKeyId|"
    r"SignatureDoesNotMatch|InvalidClientTokenId|PermissionDenied|AuthenticationFailed|Unauthorized"
)


class StoreUnusable(Exception):
    """The object store cannot be used for a reason only its operator can fix (start-up error)."""


class UploadConflict(OSError):
    """The store already holds a segment's key with other bytes: it is never overwritten."""


def split_location(predlog_dir: str, local_dir: Path | None) -> tuple[Path, str | None]:
    """For the `predlog_dir` setting: (the directory this replica writes, the object store's URI or None).

    A local directory is both; an object store's URI gets the local write-ahead directory `local_dir`
    (default ~/.cache/onnxgate/predlog-wal)."""
    scheme, sep, rest = predlog_dir.partition("://")
    if not sep:
        return Path(predlog_dir).expanduser(), None
    if scheme not in REMOTE_SCHEMES or not rest.strip("/"):
        raise ValueError(
            f"predlog_dir {redact(predlog_dir)!r} is not usable: expected a local directory or an object store URI"
            f" ({', '.join(s + '://BUCKET/PREFIX' for s in REMOTE_SCHEMES)}); set --predlog-dir or ONNXGATE_PREDLOG_DIR"
        )
    return (local_dir or DEFAULT_LOCAL_DIR).expanduser(), predlog_dir.rstrip("/")


def redact(text: str) -> str:
    """`text` fit for logs: credentials written into a URI (scheme://KEY:SECRET@bucket, ?secret_key=) are hidden."""
    return re.sub(r"(?<=://)[^/@\s]*@", "***@", re.sub(r"\?\S*", "?***", text))


def _why(error: BaseException) -> str:
    return redact(f"{type(error).__name__}: {error}".strip())


def log_readers(settings: PredLogSettings) -> list[LogFiles]:
    """What a reader inside the gateway reads, in this order.

    A local log: its directory. A log in an object store: the local write-ahead directory (this
    replica's open segments and the Parquet files waiting for upload, and those of any replica sharing
    the volume), then the store (every replica's uploaded segments). A segment moves from the first to
    the second (uploaded, then removed locally), so listing them in this order never misses one; it may
    be listed by both: `Segment.key` is the same, read it once. Readers outside the gateway (export,
    DuckDB, Spark) read the store alone."""
    if settings.store_uri is None:
        return [LogFiles.at(settings.log_dir)]
    return [LogFiles.at(settings.log_dir), LogFiles.at(settings.store_uri)]


def open_uploader(settings: PredLogSettings) -> Uploader | None:
    """The uploader of a log in an object store (None for a local log), its store checked and this
    replica's sequence numbers raised past what the store holds. Raises StoreUnusable for what only the
    operator can fix: a URI pyarrow cannot open, a bucket that does not exist, refused credentials. A
    store that cannot be reached now is logged and left to the uploader's retries (its health says so):
    the local write-ahead directory holds the log meanwhile, and serving does not depend on the log."""
    if settings.store_uri is None:
        return None
    shown = redact(settings.store_uri)
    where = "fix --predlog-dir (ONNXGATE_PREDLOG_DIR)"
    try:
        store = LogFiles.at(settings.store_uri)
    except (ValueError, OSError, pa.ArrowException) as error:
        raise StoreUnusable(f"prediction log store {shown} cannot be opened ({_why(error)}): {where}") from None
    uploader = Uploader(store, settings.log_dir, settings.replica_dir)
    bucket = store.root.split("/", 1)[0]
    try:
        info = store.fs.get_file_info(bucket)
        if info.type == pafs.FileType.NotFound:
            raise StoreUnusable(
                f"prediction log store {shown}: bucket {bucket!r} does not exist: create it, or {where}"
            )
        seed_sequences(store, settings.log_dir, settings.replica_id)
    except (OSError, pa.ArrowException) as error:
        if _DENIED.search(str(error)):
            raise StoreUnusable(
                f"prediction log store {shown} refuses the credentials ({_why(error)}): check AWS_ACCESS_KEY_ID and"
                " AWS_SECRET_ACCESS_KEY (or the instance role, or the store's own variables) and the bucket's policy"
            ) from None
        # e.g. the network or the store is down: uploads are retried; sequence numbers are still safe, since
        # an upload never overwrites a key holding other bytes
        log.error(
            "prediction log store %s cannot be reached at start (%s); serving anyway: rolled segments wait in %s"
            " and uploads are retried",
            shown,
            _why(error),
            settings.replica_dir,
        )
        uploader.failed(settings.replica_dir, error)
    return uploader


def seed_sequences(store: LogFiles, local_root: Path, replica: str) -> None:
    """Raise this replica's sequence marks to the highest numbers the store holds of it."""
    prefix = f"{store.root}/{replica}"
    highest: dict[tuple[str, str], int] = {}  # (model or "", kind) -> seq
    for info in store.fs.get_file_info(pafs.FileSelector(prefix, recursive=True, allow_not_found=True)):
        parts = info.path[len(prefix) :].strip("/").split("/")
        m = _SEGMENT.match(parts[-1])
        if info.type != pafs.FileType.File or m is None or len(parts) > 2:
            continue
        key = (parts[0] if len(parts) == 2 else "", m["kind"])
        highest[key] = max(highest.get(key, 0), int(m["seq"]))
    for (model, kind), seq in highest.items():
        raise_seq_mark(local_root / replica / model if model else local_root / replica, kind, seq)


def raise_seq_mark(directory: Path, kind: str, seq: int) -> None:
    """Record (durably) that `seq` was used in `directory`, unless a higher number is recorded already."""
    if seq_mark(directory, kind) >= seq:
        return
    make_dirs(directory)
    path = seq_mark_path(directory, kind)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(f"{seq}\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(directory)


def waiting_files(directory: Path) -> list[Path]:
    """The rolled segments of one replica directory waiting for upload, oldest first per directory."""
    found: list[tuple[str, int, Path]] = []
    for sub in (directory, *sorted(p for p in _subdirs(directory))):
        try:
            names = os.listdir(sub)
        except FileNotFoundError:
            continue
        for name in names:
            m = _SEGMENT.match(name)
            if m is not None and m["ext"] == "parquet":
                found.append((str(sub), int(m["seq"]), sub / name))
    return [path for _, _, path in sorted(found)]


def _subdirs(directory: Path) -> Iterator[Path]:
    try:
        yield from (p for p in directory.iterdir() if p.is_dir())
    except FileNotFoundError:
        return


class Uploader:
    """Uploads the rolled segments of the local write-ahead directory to the store, then removes them.

    A thread uploads this replica's directory about every second; the adopter (server/adopt.py) calls
    `upload_dir` for a dead replica's directory while it holds that directory's lock. A failure is
    logged once, counted, and retried with exponential backoff (1 s doubling to `max_backoff_s`, with
    jitter); the uploader is unhealthy from a failure until the same directory uploads again."""

    def __init__(
        self, store: LogFiles, local_root: Path, replica_dir: Path, *, poll_s: float = 1.0, max_backoff_s: float = 60.0
    ) -> None:
        self.store = store
        self.local_root = local_root
        self.replica_dir = replica_dir
        self.poll_s = poll_s
        self.max_backoff_s = max_backoff_s
        self.uploaded = 0  # segments uploaded
        self.uploaded_bytes = 0
        self.errors = 0
        self.last_error = ""
        self._failing: dict[Path, str] = {}  # directory -> its latest failure
        self._count_lock = threading.Lock()  # this thread and the adopter's
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="predlog-uploader", daemon=True)

    @property
    def location(self) -> str:
        return redact(self.store.uri)

    @property
    def healthy(self) -> bool:
        """Nothing is failing to upload (and the thread runs, once started)."""
        return not self._failing and (self._thread.is_alive() or self._thread.ident is None)

    def pending(self) -> list[Path]:
        """This replica's segments waiting for upload."""
        return waiting_files(self.replica_dir)

    def start(self) -> Uploader:
        self._thread.start()
        return self

    def close(self, timeout: float = 30.0) -> None:
        """Stop the thread, then upload what the writers rolled at their close (one pass; what fails
        stays in the local directory and is uploaded at the next start)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        try:
            self.upload_dir(self.replica_dir)
        except Exception as error:  # counted and logged by upload_dir; the files stay
            log.warning("prediction log: %d segment(s) not uploaded at shutdown (%s)", len(self.pending()), error)

    def _run(self) -> None:
        backoff = 0.0
        delay = 0.0
        while not self._stop.wait(delay):
            try:
                self.upload_dir(self.replica_dir)
            except Exception:  # counted and logged by upload_dir; a bug must not stop the uploads either
                backoff = min(self.max_backoff_s, backoff * 2 or 1.0)
                delay = backoff * random.uniform(0.5, 1.0)
                continue
            backoff = 0.0
            delay = self.poll_s

    def upload_dir(self, directory: Path) -> int:
        """Upload every rolled segment waiting in one replica directory (oldest first), removing each
        local file once its object is there; stops at the first failure and raises it."""
        done = 0
        for path in waiting_files(directory):
            try:
                size = self._upload(path)
            except Exception as error:
                self.failed(directory, error)
                raise
            done += 1
            with self._count_lock:
                self.uploaded += 1
                self.uploaded_bytes += size
        if self._failing.pop(directory, None) is not None:
            log.warning("prediction log: uploads from %s to %s work again", directory, self.location)
        return done

    def failed(self, directory: Path, error: BaseException) -> None:
        message = f"upload from {directory} to {self.location}: {_why(error)}"
        with self._count_lock:
            self.errors += 1
            first = directory not in self._failing
            self._failing[directory] = message
            self.last_error = message
        if first:
            log.error("prediction log: %s; retried with backoff", message)
        else:
            log.debug("prediction log: %s (still failing)", message)

    def _upload(self, path: Path) -> int:
        rel = path.relative_to(self.local_root).as_posix()
        key = f"{self.store.root}/{rel}"
        try:
            data = path.read_bytes()
        except FileNotFoundError:  # uploaded by another pass meanwhile (this thread and an adopter)
            return 0
        fs = self.store.fs
        info = fs.get_file_info(key)
        if info.type == pafs.FileType.File:
            # there already: uploaded before a crash kept the local file from going, or a conflict
            if info.size != len(data) or _read(fs, key) != data:
                raise UploadConflict(
                    f"{self.location}/{rel} exists with other content and is never overwritten; {path} is kept."
                    " Was the replica id reused with a new local directory? Move the file aside to resolve"
                )
        else:
            stream = fs.open_output_stream(key, compression=None)
            stream.write(data)
            stream.close()  # the object appears here, whole
            written = fs.get_file_info(key)
            if written.size != len(data):  # never left for readers: retried, to the same key
                fs.delete_file(key)
                raise OSError(f"{self.location}/{rel}: {written.size} bytes stored of {len(data)}")
        m = _SEGMENT.match(path.name)
        assert m is not None
        raise_seq_mark(path.parent, m["kind"], int(m["seq"]))  # before the file goes: its number stays used
        path.unlink(missing_ok=True)
        fsync_dir(path.parent)
        return len(data)


def _read(fs: pafs.FileSystem, key: str) -> bytes:
    with fs.open_input_file(key) as f:
        return bytes(f.read())


class StoreCollector(Collector):
    """The uploader's counters and health, read at scrape time."""

    def __init__(self, uploader: Uploader) -> None:
        self._uploader = uploader

    def collect(self) -> Iterator[Metric]:
        u = self._uploader
        yield GaugeMetricFamily(
            "onnxgate_predlog_uploader_up", "1 while rolled segments upload to the object store", value=float(u.healthy)
        )
        yield CounterMetricFamily("onnxgate_predlog_uploaded_segments", "Segments uploaded", value=u.uploaded)
        yield CounterMetricFamily(
            "onnxgate_predlog_uploaded_bytes", "Bytes of segments uploaded", value=u.uploaded_bytes
        )
        yield CounterMetricFamily("onnxgate_predlog_upload_errors", "Failed uploads (each retried)", value=u.errors)
        pending = u.pending()
        yield GaugeMetricFamily(
            "onnxgate_predlog_upload_pending_segments", "Rolled segments waiting for upload", value=len(pending)
        )
        yield GaugeMetricFamily(
            "onnxgate_predlog_upload_pending_bytes",
            "Bytes of rolled segments waiting for upload (the local directory must hold them)",
            value=sum(_size(p) for p in pending),
        )


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0

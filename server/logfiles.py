"""Where the prediction log's files are, for readers: a local directory or an object store, one listing.

    log = LogFiles.at("/var/lib/onnxgate/predlog")        # or "s3://bucket/prefix", "gs://...", "abfs://..."
    for segment in log.segments("predictions", models={"iris"}):
        table = log.read(segment)                          # None when it vanished or cannot be read

A listing is one recursive scan of the log (a paginated LIST on an object store), parsed into
`Segment`s: replica, model, kind, sequence number, rolled (immutable Parquet) or open (an Arrow stream
still being appended to, or left by a crash). Of a sequence number present both ways (a crash between
the roll's rename and the unlink), the Parquet file is the one listed.

The layout (docs/guides/prediction-log.md):
    <root>/<replica>/<model>/predictions-<seq>.arrows|parquet
    <root>/<replica>/feedback-<seq>.arrows|parquet
Anything else under the root (locks, temporary files, state) is not a segment and is ignored.
"""

from __future__ import annotations

import os
import re
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from onnxgate.server.segments import PARQUET_EXT, STREAM_EXT, SkipList, parquet_max_ts, read_stream

_FILE = re.compile(r"^(?P<kind>[a-z]+)-(?P<seq>\d{8})\.(?P<ext>arrows|parquet)$")
# object stores the log can be read from, by URI scheme (pyarrow's filesystems)
REMOTE_SCHEMES = ("s3", "gs", "gcs", "abfs", "abfss", "hdfs")


@dataclass(frozen=True)
class Segment:
    replica: str
    model: str | None  # None for feedback segments
    kind: str
    seq: int
    path: str  # in the LogFiles' filesystem
    rolled: bool  # Parquet: immutable; else an Arrow stream, possibly growing
    size: int

    @property
    def key(self) -> tuple[str, str | None, str, int]:
        """The segment whatever its form: the stream and its Parquet roll share it."""
        return (self.replica, self.model, self.kind, self.seq)


class LogFiles:
    def __init__(self, fs: pafs.FileSystem, root: str, uri: str) -> None:
        self.fs = fs
        self.root = root.rstrip("/")
        self.uri = uri

    @classmethod
    def at(cls, location: str | Path) -> LogFiles:
        text = str(location)
        scheme, sep, _ = text.partition("://")
        if sep and scheme in REMOTE_SCHEMES:
            fs, root = pafs.FileSystem.from_uri(text)
            return cls(fs, root, text)
        if sep:
            raise ValueError(
                f"{text}: unsupported scheme {scheme!r}; expected a local path or {', '.join(REMOTE_SCHEMES)}"
            )
        root = os.path.abspath(text)
        return cls(pafs.LocalFileSystem(), root, root)

    @property
    def local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    def segments(
        self, kind: str, models: Collection[str] | None = None, skipped: SkipList | None = None
    ) -> list[Segment]:
        """Every replica's segments of one kind, ordered by (replica, model, seq)."""
        found: dict[tuple[str, str | None, str, int], Segment] = {}
        for path, size in self._files(skipped):
            segment = self._parse(path, size)
            if segment is None or segment.kind != kind:
                continue
            if models is not None and segment.model not in models:
                continue
            if segment.key not in found or segment.rolled:
                found[segment.key] = segment
        return [found[k] for k in sorted(found, key=lambda k: (k[0], k[1] or "", k[3]))]

    def read(
        self, segment: Segment, skipped: SkipList | None = None, columns: list[str] | None = None
    ) -> pa.Table | None:
        """One segment as a table (the complete batches of a stream); None when it vanished meanwhile
        (rolled: list again) or cannot be read (then it is added to `skipped`)."""
        try:
            if segment.rolled:
                table = pq.read_table(segment.path, filesystem=self.fs, columns=columns)
            else:
                with self.fs.open_input_file(segment.path) as f:
                    data = f.read()
                table = read_stream(data).table
                if table is not None and columns is not None:
                    table = table.select([c for c in columns if c in table.column_names])
        except FileNotFoundError:
            return None
        except (pa.ArrowException, OSError) as error:
            if skipped is not None:
                skipped[Path(segment.path)] = f"{type(error).__name__}: {error}"
            return None
        return table

    def newest_ts(self, segment: Segment) -> int | None:
        """The newest `ts` of a rolled segment (µs since the epoch) from its Parquet footer, without reading
        its rows; None for an open segment or when the footer does not say (read it then)."""
        if not segment.rolled:
            return None
        try:
            with self.fs.open_input_file(segment.path) as f:
                return parquet_max_ts(f)
        except (pa.ArrowException, OSError):
            return None  # the read will report what is wrong

    def _files(self, skipped: SkipList | None) -> list[tuple[str, int]]:
        if self.local:
            return _walk_local(self.root, skipped)
        try:
            infos = self.fs.get_file_info(pafs.FileSelector(self.root, recursive=True, allow_not_found=True))
        except OSError as error:
            if skipped is not None:
                skipped[Path(self.root)] = f"{type(error).__name__}: {error}"
            return []
        return [(i.path, i.size or 0) for i in infos if i.type == pafs.FileType.File]

    def _parse(self, path: str, size: int) -> Segment | None:
        parts = path[len(self.root) :].strip("/").split("/")
        m = _FILE.match(parts[-1])
        if m is None or len(parts) not in (2, 3):
            return None
        model = parts[1] if len(parts) == 3 else None
        if (model is None) != (m["kind"] == "feedback"):
            return None
        return Segment(parts[0], model, m["kind"], int(m["seq"]), path, m["ext"] == PARQUET_EXT[1:], size)


def _walk_local(root: str, skipped: SkipList | None) -> list[tuple[str, int]]:
    out: list[tuple[str, int]] = []

    def unreadable(error: OSError) -> None:  # e.g. another replica's directory this process may not list
        # a log not written yet, or a directory removed while walking: nothing to read, nothing wrong
        if skipped is not None and error.filename and not isinstance(error, FileNotFoundError):
            skipped[Path(error.filename)] = f"{type(error).__name__}: {error}"

    for directory, _, files in os.walk(root, onerror=unreadable):
        if directory.count(os.sep) - root.count(os.sep) > 2:
            continue
        for name in files:
            if name.endswith((PARQUET_EXT, STREAM_EXT)):
                path = os.path.join(directory, name)
                try:
                    out.append((path, os.stat(path).st_size))
                except FileNotFoundError:
                    continue  # rolled or removed by retention since the listing
    return out

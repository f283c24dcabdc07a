"""An S3-compatible server for the tests: moto's, on a loopback port, behind a proxy the test can cut.

The gateway reaches the store through `Proxy`: `down()` makes every connection fail (the store is
unreachable for the gateway) while moto keeps its objects; `up()` brings it back. The test process
itself talks to moto directly.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.fs as pafs

from onnxgate.server.logfiles import LogFiles

BUCKET = "onnxgate-log"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def free_port() -> int:
    # moto cannot bind port 0 and tell which port it got: take a free one first
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_listening(port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


class Proxy:
    """A TCP forwarder to one port; down() closes every connection and refuses new ones."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        self._up = True
        self._lock = threading.Lock()
        self._open: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def down(self) -> None:
        with self._lock:
            self._up = False
            for s in self._open:
                _close(s)
            self._open.clear()

    def up(self) -> None:
        with self._lock:
            self._up = True

    def close(self) -> None:
        self.down()
        _close(self._listener)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            with self._lock:
                if not self._up:
                    _close(client)
                    continue
                try:
                    upstream = socket.create_connection(("127.0.0.1", self.target_port), 5)
                except OSError:
                    _close(client)
                    continue
                self._open += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=_pump, args=(a, b), daemon=True).start()


def _pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        _close(src)
        _close(dst)


def _close(s: socket.socket) -> None:
    with contextlib.suppress(OSError):
        s.shutdown(socket.SHUT_RDWR)
    s.close()


@dataclass
class S3:
    port: int  # moto's own
    proxy: Proxy
    env: dict[str, str] = field(default_factory=dict)  # for a gateway: through the proxy

    @property
    def uri(self) -> str:
        return f"s3://{BUCKET}/log"

    def store(self) -> LogFiles:
        """The log in the store, read by this process (straight from moto)."""
        return LogFiles.at(self.uri)

    def objects(self) -> dict[str, int]:
        """Every object under the log's prefix: key relative to it -> size."""
        fs, root = pafs.FileSystem.from_uri(self.uri)
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
        return {i.path[len(root) + 1 :]: i.size or 0 for i in infos if i.type == pafs.FileType.File}

    def rows(self, kind: str) -> pa.Table | None:
        store = self.store()
        tables = [t for s in store.segments(kind) if (t := store.read(s)) is not None]
        return pa.concat_tables(tables, promote_options="permissive") if tables else None


@contextlib.contextmanager
def running_s3(timeout: float = 30.0, *, authenticate: bool = False) -> Iterator[S3]:
    """moto on a free loopback port, the bucket made, a proxy in front; stopped when the generator ends.
    The caller sets AWS_ENDPOINT_URL and CREDENTIALS in its own environment (reads straight from moto).
    `authenticate`: after making the bucket, moto checks credentials, and knows none (every key is refused)."""
    # moto's count of requests served before it checks credentials: the bucket's HEAD and PUT
    auth = {"INITIAL_NO_AUTH_ACTION_COUNT": "2"} if authenticate else {}
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, **auth},
    )
    proxy: Proxy | None = None
    try:
        wait_listening(port, timeout)
        pafs.S3FileSystem(
            access_key=CREDENTIALS["AWS_ACCESS_KEY_ID"],
            secret_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
            region=CREDENTIALS["AWS_DEFAULT_REGION"],
            endpoint_override=f"http://127.0.0.1:{port}",
            allow_bucket_creation=True,
        ).create_dir(BUCKET)
        proxy = Proxy(port)
        yield S3(port, proxy, {**CREDENTIALS, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{proxy.port}"})
    finally:
        if proxy is not None:
            proxy.close()
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)

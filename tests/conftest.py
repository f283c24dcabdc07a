"""Shared fixtures: real gateways on loopback ports, built from real model repositories.

`start_gateway(repository, **settings)` runs a Gateway in-process (its event loop on a thread) and
returns a handle with `.address`; `spawn_gateway(*args)` runs `onnxgate serve` as a subprocess, for
tests that need a separate process (two replicas, SIGKILL). Both bind port 0.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from onnxgate.server.app import Gateway
from onnxgate.server.config import load_settings
from onnxgate.server.example import ensure_example_repository
from onnxgate.server.pb import grpc_service_pb2_grpc as pb_grpc

READY_LINE = re.compile(r"onnxgate: serving gRPC on (\S+) metrics on (\S+) http on (\S+)")


@dataclass
class GatewayHandle:
    gateway: Gateway
    loop: asyncio.AbstractEventLoop
    thread: threading.Thread
    channels: list[grpc.Channel] = field(default_factory=list)

    @property
    def address(self) -> str:
        return self.gateway.address

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.gateway.metrics_port}/metrics"

    def stub(self) -> pb_grpc.GRPCInferenceServiceStub:
        channel = grpc.insecure_channel(
            self.address, options=[("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]
        )
        self.channels.append(channel)
        return pb_grpc.GRPCInferenceServiceStub(channel)

    def call(self, coro: Any, timeout: float = 60) -> Any:
        """Run a coroutine on the gateway's event loop (e.g. repository.poll_once())."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self, grace_s: float = 1.0) -> None:
        for channel in self.channels:
            channel.close()
        if self.loop.is_running():
            self.call(self.gateway.stop(grace_s, drain_s=0))  # no drain phase: nobody to move away
            self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture
def start_gateway() -> Iterator[Callable[..., GatewayHandle]]:
    handles: list[GatewayHandle] = []

    def start(repository: Path, **overrides: Any) -> GatewayHandle:
        flags = {"model_repository": repository, "grpc_port": 0, "metrics_port": 0, "http_port": 0, **overrides}
        settings = load_settings(env={}, flags=flags)
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, daemon=True)
        thread.start()
        gateway = Gateway(settings, repository)
        asyncio.run_coroutine_threadsafe(gateway.start(), loop).result(120)
        handle = GatewayHandle(gateway, loop, thread)
        handles.append(handle)
        return handle

    yield start
    for handle in handles:
        handle.stop()


@pytest.fixture(scope="session")
def example_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The embedded example repository, built once per test session (read-only for tests)."""
    return ensure_example_repository(tmp_path_factory.mktemp("example") / "repository")


@pytest.fixture
def example_copy(example_repository: Path, tmp_path: Path) -> Path:
    """A writable copy of the example repository."""
    import shutil

    target = tmp_path / "repository"
    shutil.copytree(example_repository, target)
    return target


@dataclass
class SpawnedGateway:
    process: subprocess.Popen[str]
    address: str
    metrics_port: int
    http_port: int = 0

    def terminate(self, timeout: float = 20) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)

    def kill(self) -> None:
        self.process.kill()
        self.process.wait(10)


@pytest.fixture
def spawn_gateway() -> Iterator[Callable[..., SpawnedGateway]]:
    spawned: list[SpawnedGateway] = []

    def spawn(
        *args: str, env: dict[str, str] | None = None, timeout: float = 120, prefix: Sequence[str] = ()
    ) -> SpawnedGateway:
        # prefix: a command that runs the gateway by exec'ing it (prlimit, faketime): the pid stays the gateway's
        cmd = [
            *prefix,
            sys.executable,
            "-m",
            "onnxgate",
            "serve",
            "--grpc-port",
            "0",
            "--metrics-port",
            "0",
            "--http-port",
            "0",
            *args,
        ]
        process = subprocess.Popen(
            cmd,
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            text=True,
            # no drain phase at SIGTERM (nobody to move away) unless a test sets one: --drain-delay-s wins
            env={**os.environ, "ONNXGATE_DRAIN_DELAY_S": "0", **(env or {})},
        )
        lines = []
        assert process.stderr is not None
        for line in process.stderr:
            lines.append(line)
            match = READY_LINE.search(line)
            if match:
                metrics, http = match.group(2), match.group(3)
                gw = SpawnedGateway(
                    process,
                    match.group(1),
                    int(metrics) if metrics.isdigit() else 0,
                    int(http) if http.isdigit() else 0,
                )
                spawned.append(gw)
                # keep draining stderr so the child never blocks on a full pipe
                threading.Thread(target=lambda: [None for _ in process.stderr or []], daemon=True).start()
                return gw
        process.wait(timeout)
        raise RuntimeError(f"onnxgate serve exited with {process.returncode} before serving:\n{''.join(lines)}")

    yield spawn
    for gw in spawned:
        if gw.process.poll() is None:
            gw.kill()

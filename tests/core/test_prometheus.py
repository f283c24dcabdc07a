"""A real Prometheus (.ci/deps/prometheus.sh) scrapes a real gateway every second while known traffic goes
over gRPC and REST; PromQL through its HTTP API then sees exactly the answers sent, by code, plausible
rates, and a finite p99 from the latency histogram. `promtool check metrics` finds nothing to say about
the exposition, and the metrics reference's example queries all evaluate."""

from __future__ import annotations

import json
import math
import re
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from onnxgate.server.pb import grpc_service_pb2 as pb
from tests.conftest import GatewayHandle
from tests.traffic import grpc_infer, http_request, rest_infer_body, send_known_traffic

METRICS_DOC = Path(__file__).resolve().parents[2] / "docs" / "reference" / "metrics.md"
SCRAPE_S = 1
# a loopback request to a small tabular model takes about a millisecond (docs/explanation/benchmarks.md); the bound
# only catches a broken histogram (an empty one gives NaN, a wrong unit 1000x), not a slow machine
P99_BOUND_S = 0.5


def _binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is missing: run .ci/deps/prometheus.sh")
    return path


def _free_port() -> int:
    # Prometheus cannot listen on port 0; a port free a moment ago is retried if taken in between
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Prometheus:
    def __init__(self, process: subprocess.Popen[bytes], port: int, log: Path) -> None:
        self.process, self.port, self.log = process, port, log

    def get(self, path: str, **params: str) -> Any:
        url = f"http://127.0.0.1:{self.port}{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        with urllib.request.urlopen(url, timeout=10) as response:
            return json.loads(response.read()) if path.startswith("/api/") else response.status

    def query(self, promql: str, at: float | None = None) -> list[dict[str, Any]]:
        params = {"query": promql} if at is None else {"query": promql, "time": f"{at:.3f}"}
        doc = self.get("/api/v1/query", **params)
        assert doc["status"] == "success", (promql, doc)
        result: list[dict[str, Any]] = doc["data"]["result"]
        return result

    def scalar(self, promql: str, at: float | None = None) -> float:
        (sample,) = self.query(promql, at)
        return float(sample["value"][1])

    def wait(self, what: str, ok: Callable[[], bool], timeout_s: float = 30) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"prometheus exited ({self.process.returncode}):\n{self.log.read_text()[-3000:]}")
            try:
                if ok():
                    return
            except (OSError, ValueError):
                pass
            time.sleep(0.2)
        pytest.fail(f"prometheus: {what} not within {timeout_s} s:\n{self.log.read_text()[-3000:]}")


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[Callable[[int], Prometheus]]:
    binary = _binary("prometheus")
    started: list[Prometheus] = []

    def start(target_port: int) -> Prometheus:
        config = tmp_path / "prometheus.yml"
        config.write_text(
            f"global:\n  scrape_interval: {SCRAPE_S}s\n  scrape_timeout: {SCRAPE_S}s\n"
            f"scrape_configs:\n  - job_name: onnxgate\n"
            f"    static_configs:\n      - targets: ['127.0.0.1:{target_port}']\n"
        )
        for attempt in range(3):
            port = _free_port()
            log = tmp_path / f"prometheus-{attempt}.log"
            cmd = [binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / f'tsdb-{attempt}'}",
                   f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"]  # fmt: skip
            with log.open("wb") as out:
                process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
            prom = Prometheus(process, port, log)
            started.append(prom)
            deadline = time.monotonic() + 30
            while process.poll() is None and time.monotonic() < deadline:
                try:
                    if prom.get("/-/ready") == 200:
                        return prom
                except OSError:
                    time.sleep(0.1)
            if process.poll() is None:
                break
            if "address already in use" not in log.read_text():
                break
        pytest.fail(f"prometheus did not start:\n{log.read_text()[-3000:]}")

    yield start
    for prom in started:
        if prom.process.poll() is None:
            prom.process.terminate()
            try:
                prom.process.wait(10)
            except subprocess.TimeoutExpired:
                prom.process.kill()
                prom.process.wait(10)


def test_prometheus_scrapes_counts_rates_and_quantiles(start_gateway, example_repository: Path, prometheus) -> None:  # type: ignore[no-untyped-def]
    handle: GatewayHandle = start_gateway(example_repository, max_message_bytes=65536)
    prom: Prometheus = prometheus(handle.gateway.metrics_port)
    prom.wait("the gateway's target up", lambda: prom.query('up{job="onnxgate"} == 1') != [])

    expected = send_known_traffic(handle)
    # steady traffic over several scrapes, so that rate() has increases to see (a series' first sample
    # is not an increase: the known traffic's errors only show in rate() if more of them follow)
    stub, port = handle.stub(), handle.gateway.http_port
    sent = 0
    traffic_start = time.time()
    while time.time() - traffic_start < 5 * SCRAPE_S:
        stub.ModelInfer(grpc_infer("iris"), timeout=30)
        assert http_request(port, "POST", "/v2/models/iris/infer", rest_infer_body()) == 200
        assert http_request(port, "POST", "/v2/models/nope/infer", rest_infer_body()) == 404
        sent += 2
        expected["grpc", "ModelInfer", "OK"] += 1
        expected["http", "ModelInfer", "OK"] += 1
        expected["http", "ModelInfer", "NOT_FOUND"] += 1
        time.sleep(0.05)
    traffic_end = time.time()
    total = sum(expected.values())

    # until a scrape after the last answer is in, and at least six scrapes in all
    prom.wait("the last answers scraped", lambda: prom.scalar("sum(onnxgate_requests_total)") == total)
    prom.wait("six scrapes", lambda: prom.scalar('count_over_time(up{job="onnxgate"}[1m])') >= 6)

    by_code = {s["metric"]["code"]: float(s["value"][1]) for s in prom.query("sum by (code) (onnxgate_requests_total)")}
    want: Counter[str] = Counter()
    for (_, _, code), n in expected.items():
        want[code] += n
    assert by_code == want
    assert {"OK", "NOT_FOUND", "INVALID_ARGUMENT", "UNIMPLEMENTED", "RESOURCE_EXHAUSTED"} <= set(by_code)
    by_protocol_rpc = {
        (s["metric"]["protocol"], s["metric"]["rpc"]): float(s["value"][1])
        for s in prom.query('sum by (protocol, rpc) (onnxgate_requests_total{code="OK"})')
    }
    assert by_protocol_rpc[("grpc", "ModelInfer")] == expected["grpc", "ModelInfer", "OK"]
    assert by_protocol_rpc[("http", "ModelInfer")] == expected["http", "ModelInfer", "OK"]

    # at the end of the steady traffic: the 5 s window holds only it (the known traffic came before)
    at = traffic_end - 0.5
    sent_per_s = sent / (traffic_end - traffic_start)
    rate = prom.scalar('sum(rate(onnxgate_requests_total{rpc="ModelInfer",code="OK"}[5s]))', at)
    assert 0.25 * sent_per_s < rate < 4 * sent_per_s, (rate, sent_per_s)
    p99 = prom.scalar("histogram_quantile(0.99, sum by (le) (rate(onnxgate_request_duration_seconds_bucket[10s])))", at)
    assert math.isfinite(p99) and 0 < p99 < P99_BOUND_S, p99
    rows = prom.scalar('sum(rate(onnxgate_inference_rows_total{model="iris"}[5s]))', at)
    assert rows > 0
    # a third of the steady traffic failed (NOT_FOUND)
    failed = prom.scalar(
        "sum(rate(onnxgate_requests_total{code!='OK'}[5s])) / sum(rate(onnxgate_requests_total[5s]))", at
    )
    assert 0.15 < failed < 0.5, failed

    for promql in readme_queries():
        prom.query(promql)  # every example in docs/reference/metrics.md evaluates (status success)

    # the exposition Prometheus read is clean for promtool's linter too
    text = urllib.request.urlopen(handle.metrics_url, timeout=10).read()
    check = subprocess.run([_binary("promtool"), "check", "metrics"], input=text, capture_output=True, timeout=60)
    assert check.returncode == 0 and check.stdout == b"" and check.stderr == b"", check


def test_promtool_finds_nothing_on_a_fresh_gateway(start_gateway, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    # no model at all: the families with no series yet must still be well-formed
    handle = start_gateway(tmp_path)
    handle.stub().ServerLive(pb.ServerLiveRequest(), timeout=30)
    text = urllib.request.urlopen(handle.metrics_url, timeout=10).read()
    check = subprocess.run([_binary("promtool"), "check", "metrics"], input=text, capture_output=True, timeout=60)
    assert check.returncode == 0 and check.stdout == b"" and check.stderr == b"", check


def readme_queries() -> list[str]:
    """The PromQL examples of the metrics reference (```promql blocks, one query a line)."""
    blocks = re.findall(r"```promql\n(.*?)```", METRICS_DOC.read_text(), re.S)
    queries = [
        line.strip() for block in blocks for line in block.splitlines() if line.strip() and not line.startswith("#")
    ]
    assert queries, "no ```promql block in docs/reference/metrics.md"
    return queries

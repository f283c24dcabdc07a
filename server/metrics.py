"""Prometheus metrics, read from the gateway's own counters at scrape time.

Nothing is recorded on the request path for Prometheus: the collector walks the per-version
statistics (the same numbers ModelStatistics reports) when /metrics is scraped. Each gateway has
its own CollectorRegistry, so several gateways in one process (tests) never share a counter.
"""

from __future__ import annotations

from collections.abc import Iterator
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from onnxgate.server.inference import State
from onnxgate.server.repository import Repository

NS = 1e-9


class GatewayCollector(Collector):
    def __init__(self, repository: Repository, state: State) -> None:
        self.repository = repository
        self.state = state

    def collect(self) -> Iterator[Metric]:
        labels = ["model", "version"]
        requests = CounterMetricFamily(
            "onnxgate_inference_requests", "Inference requests answered", labels=[*labels, "outcome"]
        )
        rows = CounterMetricFamily("onnxgate_inference_rows", "Batch rows inferred", labels=labels)
        runs = CounterMetricFamily(
            "onnxgate_inference_executions", "onnxruntime runs (several requests when batched)", labels=labels
        )
        seconds = CounterMetricFamily(
            "onnxgate_inference_request_seconds", "Time spent answering successful requests", labels=labels
        )
        queue = CounterMetricFamily(
            "onnxgate_inference_queue_seconds", "Time requests waited for a runner", labels=labels
        )
        compute = CounterMetricFamily("onnxgate_inference_compute_seconds", "Time inside onnxruntime", labels=labels)
        ready = GaugeMetricFamily("onnxgate_model_version_ready", "1 for each version being served", labels=labels)
        for served in self.repository.all_served():
            for number, version in served.versions.items():
                key = [served.name, str(number)]
                s = version.stats
                requests.add_metric([*key, "success"], s.success.count)
                requests.add_metric([*key, "fail"], s.fail.count)
                rows.add_metric(key, s.inference_count)
                runs.add_metric(key, s.execution_count)
                seconds.add_metric(key, s.success.ns * NS)
                queue.add_metric(key, s.queue.ns * NS)
                compute.add_metric(key, s.compute_infer.ns * NS)
                ready.add_metric(key, 1)
        yield from (requests, rows, runs, seconds, queue, compute, ready)
        yield GaugeMetricFamily("onnxgate_inflight_requests", "Inference requests in flight", value=self.state.inflight)
        yield GaugeMetricFamily(
            "onnxgate_ready", "1 when the server is ready", value=int(self.state.ready and not self.state.draining)
        )


def serve_metrics(registry: CollectorRegistry, host: str, port: int) -> tuple[WSGIServer, int]:
    server, _thread = start_http_server(port, addr=host, registry=registry)
    return server, server.server_port

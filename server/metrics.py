"""Prometheus metrics, read from the gateway's own counters at scrape time.

No prometheus_client call is made on the request path: the edges count answers in a dict
(stats.RequestCounts), the versions count requests and fill fixed-bucket histograms in plain lists
(stats.VersionStats, the same numbers ModelStatistics reports), the repository counts its loads and
polls; the collector reads them all when /metrics is scraped. Each gateway has its own
CollectorRegistry (gateway_registry), so several gateways in one process (tests) never share a counter.
The metrics are listed in the README's "Metrics" section.
"""

from __future__ import annotations

import platform
from collections.abc import Iterator
from itertools import accumulate
from wsgiref.simple_server import WSGIServer

import onnxruntime
from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from onnxgate import __version__
from onnxgate.server.inference import State
from onnxgate.server.repository import Repository
from onnxgate.server.stats import BATCH_BOUNDS, DURATION_BOUNDS_NS, Histogram, RequestCounts

NS = 1e-9
# the `le` labels: b / 1e9 is the float nearest the exact bound, so 25_000 ns reads "2.5e-05"
DURATION_LE = [*(repr(b / 1e9) for b in DURATION_BOUNDS_NS), "+Inf"]
BATCH_LE = [*(repr(float(b)) for b in BATCH_BOUNDS), "+Inf"]


def gateway_registry(repository: Repository, state: State, answers: RequestCounts) -> CollectorRegistry:
    """A gateway's registry: its own metrics, and the process's (CPU, memory, open files, Python)."""
    registry = CollectorRegistry()
    registry.register(GatewayCollector(repository, state, answers))
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    return registry


def _buckets(hist: Histogram, le: list[str]) -> list[tuple[str, float]]:
    return list(zip(le, accumulate(list(hist.counts)), strict=True))  # a copy: the loop's thread adds on


class GatewayCollector(Collector):
    def __init__(self, repository: Repository, state: State, answers: RequestCounts | None = None) -> None:
        self.repository = repository
        self.state = state
        self.answers = answers if answers is not None else RequestCounts()
        self.build_labels = [__version__, onnxruntime.__version__, platform.python_version()]

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
        durations = HistogramMetricFamily(
            "onnxgate_request_duration_seconds",
            "Successful inference requests on the server, decode to encode (shadow runs not included)",
            labels=labels,
        )
        queued = HistogramMetricFamily(
            "onnxgate_queue_duration_seconds",
            "Time each request waited for a runner or its batch (0 when run at once)",
            labels=labels,
        )
        computed = HistogramMetricFamily(
            "onnxgate_compute_duration_seconds", "Time inside onnxruntime per run", labels=labels
        )
        sizes = HistogramMetricFamily("onnxgate_batch_size", "Rows per onnxruntime run", labels=labels)
        # the response cache's, for the versions of models that enable it (server/cache.py)
        hits = CounterMetricFamily(
            "onnxgate_response_cache_hits", "Requests answered from the response cache", labels=labels
        )
        misses = CounterMetricFamily(
            "onnxgate_response_cache_misses", "Requests of cached models not found in the response cache", labels=labels
        )
        held = GaugeMetricFamily(
            "onnxgate_response_cache_bytes", "Bytes of outputs the response cache holds", labels=labels
        )
        entries = GaugeMetricFamily(
            "onnxgate_response_cache_entries", "Answers the response cache holds", labels=labels
        )
        # the dynamic batcher's row limit now: max_batch_size, or where a latency objective put it (AIMD)
        limits = GaugeMetricFamily("onnxgate_batch_limit_rows", "Rows a dynamic batch may hold now", labels=labels)
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
                durations.add_metric(key, _buckets(s.request_duration, DURATION_LE), s.request_duration.total * NS)
                queued.add_metric(key, _buckets(s.queue_duration, DURATION_LE), s.queue_duration.total * NS)
                computed.add_metric(key, _buckets(s.compute_duration, DURATION_LE), s.compute_duration.total * NS)
                sizes.add_metric(key, _buckets(s.batch_size, BATCH_LE), s.batch_size.total)
                if version.batcher is not None:
                    limits.add_metric(key, version.batcher.limit)
                cache = version.cache
                if cache is not None:
                    hits.add_metric(key, cache.hits)
                    misses.add_metric(key, cache.misses)
                    held.add_metric(key, cache.bytes)
                    entries.add_metric(key, len(cache))
        yield from (requests, rows, runs, seconds, queue, compute, ready, durations, queued, computed, sizes)
        yield from (hits, misses, held, entries, limits)
        answers = CounterMetricFamily(
            "onnxgate_requests",
            "Answers by protocol, RPC (for HTTP: the RPC its path stands for) and gRPC status code",
            labels=["protocol", "rpc", "code"],
        )
        for (protocol, rpc, code), n in dict(self.answers.counts).items():
            answers.add_metric([protocol, rpc, code], n)
        yield answers
        yield from self._repository()
        yield GaugeMetricFamily("onnxgate_inflight_requests", "Inference requests in flight", value=self.state.inflight)
        yield GaugeMetricFamily(
            "onnxgate_ready", "1 when the server is ready", value=int(self.state.ready and not self.state.draining)
        )
        info = GaugeMetricFamily(
            "onnxgate_build_info", "1, labelled with the versions serving", labels=["version", "onnxruntime", "python"]
        )
        info.add_metric(self.build_labels, 1)
        yield info

    def _repository(self) -> Iterator[Metric]:
        repository = self.repository
        failures = CounterMetricFamily(
            "onnxgate_model_load_failures",
            "Failed load attempts (a version or a model's config) by reason; polling retries each poll",
            labels=["model", "reason"],
        )
        for (model, reason), n in dict(repository.load_failures).items():
            failures.add_metric([model, reason], n)
        loaded = GaugeMetricFamily(
            "onnxgate_model_versions_loaded", "Versions served per model (0: it failed to load)", labels=["model"]
        )
        for served in repository.all_models():
            loaded.add_metric([served.name], len(served.versions))
        yield failures
        yield loaded
        yield CounterMetricFamily("onnxgate_repository_polls", "Repository polls (poll mode)", value=repository.polls)
        yield CounterMetricFamily(
            "onnxgate_repository_poll_errors", "Repository polls that failed", value=repository.poll_errors
        )


def serve_metrics(
    registry: CollectorRegistry, host: str, port: int, tls: tuple[str, str, str | None] | None = None
) -> tuple[WSGIServer, int]:
    """/metrics on `host:port`; `tls` (cert, key, client CA or None): HTTPS, client certificates required
    when a client CA is given."""
    if tls is None:
        server, _thread = start_http_server(port, addr=host, registry=registry)
    else:
        cert, key, client_ca = tls
        server, _thread = start_http_server(
            port,
            addr=host,
            registry=registry,
            certfile=cert,
            keyfile=key,
            client_cafile=client_ca,
            client_auth_required=client_ca is not None,
        )
    return server, server.server_port

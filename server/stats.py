"""Per-version counters behind ModelStatistics (Triton's statistics extension) and the metrics.

Updated only from the event loop's thread after a run completes, so plain integers suffice.
Durations are cumulative nanoseconds, counts are requests (or batch rows for inference_count),
as Triton reports them; perf_analyzer reads them between two snapshots.

Beside them, the histograms behind the Prometheus metrics (server/metrics.py): fixed bucket bounds,
one bisect and one list increment per observation, no prometheus_client call on the request path;
the collector reads and cumulates them at scrape time. Answers by protocol, RPC and status code are
counted by the edges in RequestCounts.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections import Counter
from dataclasses import dataclass, field

# bucket upper bounds (inclusive, as Prometheus' `le`): sub-millisecond tabular models to seconds-long ones
DURATION_BOUNDS_NS: tuple[int, ...] = (
    25_000, 50_000, 100_000, 250_000, 500_000,
    1_000_000, 2_500_000, 5_000_000, 10_000_000, 25_000_000, 50_000_000, 100_000_000, 250_000_000, 500_000_000,
    1_000_000_000, 2_500_000_000, 5_000_000_000, 10_000_000_000,
)  # fmt: skip
BATCH_BOUNDS: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


@dataclass
class Histogram:
    """Observations per bucket (not cumulative; the last one is +Inf) and their sum. The VersionStats
    methods observe inline (bisect_left on `bounds`: a value equal to a bound falls in its bucket)."""

    bounds: tuple[int, ...]
    counts: list[int] = field(init=False)
    total: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.bounds) + 1)


def _durations() -> Histogram:
    return Histogram(DURATION_BOUNDS_NS)


def _batch_sizes() -> Histogram:
    return Histogram(BATCH_BOUNDS)


class RequestCounts:
    """Answers by (protocol, rpc, status code name): one dict increment where each edge maps its errors
    (service.grpc_errors and ModelStreamInfer for gRPC, RestApp for HTTP). Owned by the gateway, shared by
    both edges, read by the collector; incremented on the event loop's thread only."""

    def __init__(self) -> None:
        self.counts: Counter[tuple[str, str, str]] = Counter()


@dataclass
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, ns: int, count: int = 1) -> None:
        self.count += count
        self.ns += ns


@dataclass
class BatchStats:
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)


@dataclass
class VersionStats:
    last_inference_ms: int = 0
    inference_count: int = 0  # batch rows served
    execution_count: int = 0  # model runs
    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)
    # the response cache (server/cache.py): hits (key and lookup time), misses (lookup and insertion time)
    cache_hit: Duration = field(default_factory=Duration)
    cache_miss: Duration = field(default_factory=Duration)
    batches: dict[int, BatchStats] = field(default_factory=dict)
    # Prometheus histograms: per request answered through an edge, decode to encode (record_output);
    # per request, the wait for a runner or a batch; per onnxruntime run, its time and its rows
    request_duration: Histogram = field(default_factory=_durations)
    queue_duration: Histogram = field(default_factory=_durations)
    compute_duration: Histogram = field(default_factory=_durations)
    batch_size: Histogram = field(default_factory=_batch_sizes)

    # plain field updates, no helper calls: these run once or twice for every request
    def record_request(
        self, rows: int, total_ns: int, queue_ns: int, input_ns: int, infer_ns: int, output_ns: int
    ) -> None:
        self.last_inference_ms = time.time_ns() // 1_000_000
        self.inference_count += rows
        success, queue, infer = self.success, self.queue, self.compute_infer
        success.count += 1
        success.ns += total_ns
        queue.count += 1
        queue.ns += queue_ns
        infer.count += 1
        infer.ns += infer_ns
        self.compute_input.count += 1
        self.compute_input.ns += input_ns
        self.compute_output.count += 1
        self.compute_output.ns += output_ns
        hist = self.queue_duration
        hist.counts[bisect_left(DURATION_BOUNDS_NS, queue_ns)] += 1
        hist.total += queue_ns

    def record_execution(self, batch_size: int, input_ns: int, infer_ns: int, output_ns: int) -> None:
        self.execution_count += 1
        batch = self.batches.get(batch_size)
        if batch is None:
            batch = self.batches[batch_size] = BatchStats()
        batch.compute_input.count += 1
        batch.compute_input.ns += input_ns
        batch.compute_infer.count += 1
        batch.compute_infer.ns += infer_ns
        batch.compute_output.count += 1
        batch.compute_output.ns += output_ns
        hist = self.compute_duration
        hist.counts[bisect_left(DURATION_BOUNDS_NS, infer_ns)] += 1
        hist.total += infer_ns
        sizes = self.batch_size
        sizes.counts[bisect_left(BATCH_BOUNDS, batch_size)] += 1
        sizes.total += batch_size

    def record_cache_hit(self, total_ns: int, lookup_ns: int) -> None:
        """A request answered from the response cache: a success and a cache hit, as Triton counts it (not
        in inference_count, execution_count, queue or compute)."""
        self.last_inference_ms = time.time_ns() // 1_000_000
        self.success.add(total_ns)
        self.cache_hit.add(lookup_ns)

    def record_output(self, encode_ns: int, request_ns: int = 0) -> None:
        """Encoding the response, timed after record_request counted the request; `request_ns`: the whole
        request on the server, decode to encode (request_duration; 0: not observed)."""
        self.compute_output.ns += encode_ns
        self.success.ns += encode_ns
        if request_ns:
            hist = self.request_duration
            hist.counts[bisect_left(DURATION_BOUNDS_NS, request_ns)] += 1
            hist.total += request_ns

    def record_failure(self, total_ns: int) -> None:
        self.fail.add(total_ns)

"""Per-version counters behind ModelStatistics (Triton's statistics extension) and the metrics.

Updated only from the event loop's thread after a run completes, so plain integers suffice.
Durations are cumulative nanoseconds, counts are requests (or batch rows for inference_count),
as Triton reports them; perf_analyzer reads them between two snapshots.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field


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
    batches: dict[int, BatchStats] = field(default_factory=dict)

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

    def record_output(self, encode_ns: int) -> None:
        """Encoding the response, timed after record_request counted the request."""
        self.compute_output.ns += encode_ns
        self.success.ns += encode_ns

    def record_failure(self, total_ns: int) -> None:
        self.fail.add(total_ns)

"""Triton's perf_analyzer drives the gateway unchanged and reads its server-side statistics."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

PERF_ANALYZER = Path(__file__).resolve().parents[2] / ".venv-pa" / "bin" / "perf_analyzer"


def test_perf_analyzer_measures_with_server_statistics(start_gateway, example_repository: Path) -> None:  # type: ignore[no-untyped-def]
    if not PERF_ANALYZER.exists():
        pytest.fail("perf_analyzer is missing: run .ci/deps/perf-analyzer.sh (the test command does)")
    handle = start_gateway(example_repository)
    run = subprocess.run(
        [str(PERF_ANALYZER), "-m", "iris", "-i", "grpc", "-u", handle.address, "-b", "2",
         "--concurrency-range", "2", "--measurement-interval", "1000", "--stability-percentage", "100"],
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    # perf_analyzer read ModelMetadata and ModelConfig, then measured the statistics it fetched
    server = run.stdout[run.stdout.index("Server:") :]
    inferences = int(re.search(r"Inference count: (\d+)", server).group(1))  # type: ignore[union-attr]
    successes = int(re.search(r"Successful request count: (\d+)", server).group(1))  # type: ignore[union-attr]
    assert successes > 0 and inferences == 2 * successes  # batch 2: two rows per request
    assert re.search(r"Avg request latency: \d+ usec", server)

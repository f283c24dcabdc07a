"""The gateway's Prometheus metrics, read from /metrics of a real gateway: every answer counted by protocol,
RPC and code on both edges, the latency and batch-size histograms, the repository's load failures and
polls, the process metrics and the build info. (A real Prometheus scrapes them in test_prometheus.py.)"""

from __future__ import annotations

import math
import urllib.request
from collections import Counter
from pathlib import Path

import grpc
import onnxruntime as ort
import pytest
from prometheus_client.parser import text_string_to_metric_families

from onnxgate.server.modelspec import ConfigError, Unsupported
from onnxgate.server.pb import feedback_pb2 as fpb
from onnxgate.server.repository import LOAD_FAILURE_REASONS, failure_reason
from onnxgate.server.rest import rpc_of
from onnxgate.server.stats import DURATION_BOUNDS_NS, VersionStats
from tests.conftest import GatewayHandle
from tests.models import add_mul, identity, write_version
from tests.predlog.e2e_helpers import Clients, argmax_repository, features
from tests.traffic import http_request, ok_inferences, send_known_traffic

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(handle: GatewayHandle) -> tuple[str, Samples]:
    text = urllib.request.urlopen(handle.metrics_url, timeout=10).read().decode()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[s.name, frozenset(s.labels.items())] = s.value
    return text, samples


def select(samples: Samples, name: str, **labels: str) -> dict[frozenset[tuple[str, str]], float]:
    want = set(labels.items())
    return {k: v for (n, k), v in samples.items() if n == name and want <= k}


def test_every_answer_is_counted_by_protocol_rpc_and_code(start_gateway, example_repository: Path) -> None:  # type: ignore[no-untyped-def]
    handle = start_gateway(example_repository, max_message_bytes=65536)
    expected = send_known_traffic(handle)
    _, samples = scrape(handle)
    counted = {
        (d["protocol"], d["rpc"], d["code"]): v
        for k, v in select(samples, "onnxgate_requests_total").items()
        for d in [dict(k)]
    }
    assert counted == dict(expected)
    # the request histogram observes each successful inference once, beside the existing counters
    oks = ok_inferences(expected)
    durations = select(samples, "onnxgate_request_duration_seconds_count", model="iris")
    assert sum(durations.values()) == oks
    successes = select(samples, "onnxgate_inference_requests_total", model="iris", outcome="success")
    assert sum(successes.values()) == oks


def test_histograms_are_cumulative_and_agree_with_the_counters(start_gateway, example_repository: Path) -> None:  # type: ignore[no-untyped-def]
    handle = start_gateway(example_repository, max_message_bytes=65536)
    send_known_traffic(handle, ok_infers=20)
    text, samples = scrape(handle)
    for version in ("1", "2"):
        labels = {"model": "iris", "version": version}
        runs = samples["onnxgate_inference_executions_total", frozenset(labels.items())]
        rows = samples["onnxgate_inference_rows_total", frozenset(labels.items())]
        requests = samples["onnxgate_inference_requests_total", frozenset({**labels, "outcome": "success"}.items())]
        for name, count in (
            ("onnxgate_request_duration_seconds", None),
            ("onnxgate_queue_duration_seconds", requests),
            ("onnxgate_compute_duration_seconds", runs),
            ("onnxgate_batch_size", runs),
        ):
            buckets = sorted(
                ((float(dict(k)["le"]), v) for k, v in select(samples, name + "_bucket", **labels).items()),
            )
            values = [v for _, v in buckets]
            assert values == sorted(values), name  # cumulative
            assert buckets[-1][0] == math.inf
            assert samples[name + "_count", frozenset(labels.items())] == values[-1]
            if count is not None:
                assert values[-1] == count, name
        # rows per run: their sum is the rows inferred; a batch of 3 rows is in the le=4 bucket and above
        assert samples["onnxgate_batch_size_sum", frozenset(labels.items())] == rows
    assert "# TYPE onnxgate_request_duration_seconds histogram" in text
    assert 'le="2.5e-05"' in text and 'le="10.0"' in text and 'le="1024.0"' in text


def test_histogram_buckets_hold_values_up_to_their_bound() -> None:
    stats = VersionStats()
    for ns in (1, 25_000, 25_001, 10_000_000_000, 10_000_000_001):
        stats.record_request(1, ns, ns, 0, ns, 0)
        stats.record_execution(1, 0, ns, 0)
        stats.record_output(0, ns)
    last = len(DURATION_BOUNDS_NS)
    for hist in (stats.request_duration, stats.queue_duration, stats.compute_duration):
        assert hist.counts[0] == 2 and hist.counts[1] == 1 and hist.counts[last - 1] == 1 and hist.counts[last] == 1
        assert hist.total == sum((1, 25_000, 25_001, 10_000_000_000, 10_000_000_001))
    for rows in (1, 2, 3, 1024, 1025):
        stats.record_execution(rows, 0, 0, 0)
    assert stats.batch_size.counts == [5 + 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 1, 1]
    stats.record_output(100)  # request_ns 0: the time is added to the counters, nothing observed
    assert sum(stats.request_duration.counts) == 5


@pytest.mark.parametrize(
    ("path", "rpc"),
    [
        ("", "ServerMetadata"),
        ("health/live", "ServerLive"),
        ("health/ready", "ServerReady"),
        ("models/stats", "ModelStatistics"),
        ("models/iris", "ModelMetadata"),
        ("models/iris/versions/2", "ModelMetadata"),
        ("models/iris/ready", "ModelReady"),
        ("models/iris/versions/1/ready", "ModelReady"),
        ("models/iris/config", "ModelConfig"),
        ("models/iris/stats", "ModelStatistics"),
        ("models/iris/infer", "ModelInfer"),
        ("models/iris/versions/1/infer", "ModelInfer"),
        ("models/iris/feedback", "SendFeedback"),
        ("models/iris/feedback/report", "FeedbackReport"),
        ("models/iris/versions/1/feedback", "unknown"),
        ("models/iris/versions", "unknown"),
        ("models/iris/other", "unknown"),
        ("models", "unknown"),
        ("repository/index", "RepositoryIndex"),
        ("repository/models/iris/load", "RepositoryModelLoad"),
        ("repository/models/iris/unload", "RepositoryModelUnload"),
        ("repository/models/iris", "unknown"),
        ("nothing", "unknown"),
    ],
)
def test_rest_paths_count_as_their_rpc(path: str, rpc: str) -> None:
    assert rpc_of(path.split("/") if path else []) == rpc


def test_load_failures_by_reason_versions_loaded_and_polls(start_gateway, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    write_version(tmp_path, "ok", 1, identity("FP32"))
    write_version(tmp_path, "ok", 2, identity("FP32"))
    write_version(tmp_path, "truncated", 1, add_mul().SerializeToString()[:50])
    write_version(
        tmp_path, "contradicts", 1, add_mul(), config='input [ { name: "a" data_type: TYPE_INT32 dims: [4] } ]'
    )
    write_version(tmp_path, "typo", 1, add_mul(), config="max_batch_size: eight")
    write_version(tmp_path, "tensorrt", 1, add_mul(), config='platform: "tensorrt_plan"')
    handle = start_gateway(tmp_path, model_control_mode="poll", poll_interval_s=3600)
    _, samples = scrape(handle)
    failures = {
        dict(k)["model"]: (dict(k)["reason"], v)
        for k, v in select(samples, "onnxgate_model_load_failures_total").items()
    }
    assert failures == {
        "truncated": ("invalid_model", 1),
        "contradicts": ("invalid_config", 1),
        "typo": ("invalid_config", 1),
        "tensorrt": ("unsupported", 1),
    }
    loaded = {dict(k)["model"]: v for k, v in select(samples, "onnxgate_model_versions_loaded").items()}
    assert loaded == {"ok": 1, "truncated": 0, "contradicts": 0, "typo": 0, "tensorrt": 0}
    assert samples["onnxgate_repository_polls_total", frozenset()] == 0
    # polling retries what failed: each failing model counts again; the fixed one loads
    write_version(tmp_path, "truncated", 1, add_mul())
    handle.call(handle.gateway.repository.poll_once())
    _, samples = scrape(handle)
    failures = {dict(k)["model"]: v for k, v in select(samples, "onnxgate_model_load_failures_total").items()}
    assert failures == {"truncated": 1, "contradicts": 2, "typo": 2, "tensorrt": 2}
    assert select(samples, "onnxgate_model_versions_loaded", model="truncated") == {
        frozenset({("model", "truncated")}): 1
    }
    assert samples["onnxgate_repository_polls_total", frozenset()] == 1
    assert samples["onnxgate_repository_poll_errors_total", frozenset()] == 0


def test_failure_reasons_are_a_fixed_set() -> None:
    def chained(cause: BaseException) -> ConfigError:
        try:
            raise ConfigError("config.pbtxt: cannot read") from cause
        except ConfigError as e:
            return e

    ort_errors = ort.capi.onnxruntime_pybind11_state
    cases = {
        ConfigError("bad"): "invalid_config",
        Unsupported("platform"): "unsupported",
        ort_errors.NotImplemented("op"): "unsupported",
        ort_errors.InvalidProtobuf("x"): "invalid_model",
        ort_errors.InvalidGraph("x"): "invalid_model",
        ort_errors.NoSuchFile("x"): "io_error",
        PermissionError("x"): "io_error",
        chained(OSError("x")): "io_error",
        RuntimeError("x"): "other",
    }
    for error, reason in cases.items():
        assert failure_reason(error) == reason, error
    assert set(cases.values()) == set(LOAD_FAILURE_REASONS)


def test_process_metrics_and_build_info(start_gateway, example_repository: Path) -> None:  # type: ignore[no-untyped-def]
    handle = start_gateway(example_repository)
    _, samples = scrape(handle)
    for name in ("process_cpu_seconds_total", "process_resident_memory_bytes", "process_open_fds"):
        assert samples[name, frozenset()] > 0, name
    ((labels, value),) = select(samples, "onnxgate_build_info").items()
    info = dict(labels)
    assert value == 1 and info["version"] and info["onnxruntime"] == ort.__version__ and info["python"].startswith("3.")
    assert select(samples, "python_info")
    # counters that exist whether or not anything happened yet
    assert samples["onnxgate_repository_poll_errors_total", frozenset()] == 0
    assert Counter(dict(k)["code"] for k in select(samples, "onnxgate_requests_total")) == Counter()


def test_feedback_answers_are_counted_on_both_protocols(start_gateway, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    handle = start_gateway(argmax_repository(tmp_path / "repo"), predlog_dir=tmp_path / "log")
    clients = Clients(handle.address)
    try:
        clients.infer("p0", features(0))
        clients.send("p0", "0")
        with pytest.raises(grpc.RpcError) as err:
            clients.feedback.SendFeedback(fpb.FeedbackRequest(prediction_id="p0"), timeout=10)  # no truth
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.RpcError):
            clients.feedback.StreamFeedback(iter([fpb.FeedbackRequest(prediction_id="")]), timeout=10)
        clients.report(model="argmax")
    finally:
        clients.close()
    port = handle.gateway.http_port
    assert http_request(port, "POST", "/v2/models/argmax/feedback", b'{"prediction_id": "p0", "label": "0"}') == 200
    assert http_request(port, "POST", "/v2/models/argmax/feedback", b'{"label": 3}') == 400
    assert http_request(port, "GET", "/v2/models/argmax/feedback/report") == 200
    _, samples = scrape(handle)
    counted = {
        (d["protocol"], d["rpc"], d["code"]): v
        for k, v in select(samples, "onnxgate_requests_total").items()
        for d in [dict(k)]
    }
    assert counted == {
        ("grpc", "ModelInfer", "OK"): 1,
        ("grpc", "SendFeedback", "OK"): 1,
        ("grpc", "SendFeedback", "INVALID_ARGUMENT"): 1,
        ("grpc", "StreamFeedback", "INVALID_ARGUMENT"): 1,
        ("grpc", "FeedbackReport", "OK"): 1,
        ("http", "SendFeedback", "OK"): 1,
        ("http", "SendFeedback", "INVALID_ARGUMENT"): 1,
        ("http", "FeedbackReport", "OK"): 1,
    }

"""The opt-in response cache (server/cache.py) through a real gateway: hits, misses, the bound, statistics, metrics."""

from __future__ import annotations

import urllib.request
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as tc
import tritonclient.http as httpclient

from onnxgate.server.cache import ResponseCache, answer_bytes, cache_key
from onnxgate.server.join import read_predictions
from tests.conftest import GatewayHandle
from tests.models import add_mul, identity, write_version

CACHED = "max_batch_size: 16\nresponse_cache { enable: true }\n"
# one answer of add_mul for one row: two outputs of 4 FP32 each
ONE_ROW_ANSWER = answer_bytes({"sum": np.zeros((1, 4), np.float32), "scaled": np.zeros((1, 4), np.float32)})


def repository(root: Path) -> Path:
    write_version(root, "cached", 1, add_mul(2.0), CACHED)
    write_version(root, "plain", 1, add_mul(2.0))
    write_version(root, "batched", 1, add_mul(2.0), CACHED + "dynamic_batching { max_queue_delay_microseconds: 100 }\n")
    write_version(root, "strings", 1, identity("BYTES"), "max_batch_size: 8\nresponse_cache { enable: true }\n")
    return root


def add_inputs(a: np.ndarray, b: np.ndarray) -> list[tc.InferInput]:
    inputs = [tc.InferInput("a", list(a.shape), "FP32"), tc.InferInput("b", list(b.shape), "FP32")]
    inputs[0].set_data_from_numpy(a)
    inputs[1].set_data_from_numpy(b)
    return inputs


def stats(client: tc.InferenceServerClient, model: str) -> object:
    (s,) = client.get_inference_statistics(model, "1").model_stats
    return s


def test_repeated_requests_hit_and_skip_onnxruntime(start_gateway, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    root = repository(tmp_path)
    handle: GatewayHandle = start_gateway(root)
    client = tc.InferenceServerClient(handle.address)
    session = ort.InferenceSession(str(root / "cached" / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    b = np.full((3, 4), 0.5, np.float32)
    expected = dict(zip(("sum", "scaled"), session.run(["sum", "scaled"], {"a": a, "b": b}), strict=True))
    for model in ("cached", "batched", "plain"):
        for _ in range(3):
            result = client.infer(model, add_inputs(a, b))
            for name, want in expected.items():
                np.testing.assert_array_equal(result.as_numpy(name), want)
    for model in ("cached", "batched"):
        s = stats(client, model)
        i = s.inference_stats  # type: ignore[attr-defined]
        assert (i.cache_miss.count, i.cache_hit.count) == (1, 2)
        assert i.cache_hit.ns > 0 and i.cache_miss.ns > 0
        # as Triton counts: hits are successes, but no execution, rows, queue or compute
        assert i.success.count == 3 and i.queue.count == 1 and i.compute_infer.count == 1
        assert s.execution_count == 1 and s.inference_count == 3  # type: ignore[attr-defined]
    # a model without the option never caches
    s = stats(client, "plain")
    i = s.inference_stats  # type: ignore[attr-defined]
    assert (i.cache_miss.count, i.cache_hit.count, i.cache_hit.ns) == (0, 0, 0)
    assert s.execution_count == 3 and s.inference_count == 9  # type: ignore[attr-defined]
    assert handle.gateway.repository.get("plain", "1").cache is None


def test_any_difference_misses(start_gateway, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    handle: GatewayHandle = start_gateway(repository(tmp_path))
    client = tc.InferenceServerClient(handle.address)
    a = np.ones((2, 4), np.float32)
    other = a.copy()
    other[1, 3] = 1.0001
    client.infer("cached", add_inputs(a, a))
    client.infer("cached", add_inputs(a, other))  # one value differs
    client.infer("cached", add_inputs(a[:1], a[:1]))  # another shape
    client.infer("cached", add_inputs(a, a), outputs=[tc.InferRequestedOutput("sum")])  # other outputs
    top = [tc.InferRequestedOutput("sum", class_count=2)]
    classified = client.infer("cached", add_inputs(a, other), outputs=top)  # classification asked
    again = client.infer("cached", add_inputs(a, other), outputs=top)  # the only repeat
    np.testing.assert_array_equal(classified.as_numpy("sum"), again.as_numpy("sum"))
    i = stats(client, "cached").inference_stats  # type: ignore[attr-defined]
    assert (i.cache_miss.count, i.cache_hit.count) == (5, 1)
    # BYTES inputs: elements framed by their lengths, so the same bytes split otherwise miss
    x1 = np.array([[b"ab", b"c", b""]], dtype=object)
    x2 = np.array([[b"a", b"bc", b""]], dtype=object)
    for x in (x1, x2, x1):
        t = tc.InferInput("x", [1, 3], "BYTES")
        t.set_data_from_numpy(x)
        np.testing.assert_array_equal(client.infer("strings", [t]).as_numpy("y"), x)
    i = stats(client, "strings").inference_stats  # type: ignore[attr-defined]
    assert (i.cache_miss.count, i.cache_hit.count) == (2, 1)


def test_the_bound_evicts_the_least_recently_used(start_gateway, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    handle: GatewayHandle = start_gateway(repository(tmp_path), response_cache_bytes=2 * ONE_ROW_ANSWER)
    client = tc.InferenceServerClient(handle.address)
    cache = handle.gateway.repository.get("cached", "1").cache
    assert cache is not None and cache.max_bytes == 2 * ONE_ROW_ANSWER

    def ask(value: float) -> None:
        x = np.full((1, 4), value, np.float32)
        client.infer("cached", add_inputs(x, x))

    ask(1)  # miss: held 1
    ask(2)  # miss: held 1, 2
    ask(1)  # hit: 1 becomes the most recent
    ask(3)  # miss: 2 evicted
    assert len(cache) == 2 and cache.bytes == 2 * ONE_ROW_ANSWER and cache.evictions == 1
    ask(1)  # hit
    ask(2)  # miss: evicted before
    i = stats(client, "cached").inference_stats  # type: ignore[attr-defined]
    assert (i.cache_miss.count, i.cache_hit.count) == (4, 2)
    # an answer larger than the whole bound is answered but not held
    big = np.ones((8, 4), np.float32)  # 2 x (8 x 4 x 4 bytes) > 2 one-row answers
    client.infer("cached", add_inputs(big, big))
    client.infer("cached", add_inputs(big, big))
    i = stats(client, "cached").inference_stats  # type: ignore[attr-defined]
    assert (i.cache_miss.count, i.cache_hit.count) == (6, 2) and cache.bytes <= cache.max_bytes


def test_zero_bytes_turns_every_cache_off(start_gateway, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    handle: GatewayHandle = start_gateway(repository(tmp_path), response_cache_bytes=0)
    assert handle.gateway.repository.get("cached", "1").cache is None


def test_http_statistics_metrics_and_the_prediction_log_see_the_hits(start_gateway, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    log_dir = tmp_path / "log"
    handle: GatewayHandle = start_gateway(repository(tmp_path / "repo"), predlog_dir=str(log_dir))
    port = handle.gateway.http_port
    client = httpclient.InferenceServerClient(f"127.0.0.1:{port}")
    x = np.ones((2, 4), np.float32)
    for i in range(3):
        inputs = [httpclient.InferInput("a", [2, 4], "FP32"), httpclient.InferInput("b", [2, 4], "FP32")]
        inputs[0].set_data_from_numpy(x)
        inputs[1].set_data_from_numpy(x)
        result = client.infer("cached", inputs, request_id=f"r{i}")
        np.testing.assert_array_equal(result.as_numpy("sum"), x * 2)
    (entry,) = client.get_inference_statistics("cached", "1")["model_stats"]
    assert entry["inference_stats"]["cache_hit"]["count"] == 2
    assert entry["inference_stats"]["cache_miss"]["count"] == 1
    assert entry["execution_count"] == 1
    client.close()
    with urllib.request.urlopen(handle.metrics_url) as response:
        text = response.read().decode()
    assert 'onnxgate_response_cache_hits_total{model="cached",version="1"} 2.0' in text
    assert 'onnxgate_response_cache_misses_total{model="cached",version="1"} 1.0' in text
    assert 'onnxgate_response_cache_entries{model="cached",version="1"} 1.0' in text
    assert 'onnxgate_response_cache_hits_total{model="plain"' not in text
    handle.stop()  # the log written out
    table = read_predictions(log_dir, ["cached"])
    assert table is not None and sorted(table.column("id").to_pylist()) == ["r0", "r1", "r2"]


def test_cache_unit_keys_and_read_only_answers() -> None:
    a = np.arange(8, dtype=np.float32).reshape(2, 4)
    key = cache_key(1, {"a": a}, ["y"], {})
    assert key == cache_key(1, {"a": a.copy()}, ["y"], {})
    assert key == cache_key(1, {"a": np.asfortranarray(a)}, ["y"], {})  # the values, not the layout
    assert len({key, cache_key(2, {"a": a}, ["y"], {}), cache_key(1, {"a": a.reshape(4, 2)}, ["y"], {})}) == 3
    assert key != cache_key(1, {"a": a.astype(np.float64)}, ["y"], {})
    assert key != cache_key(1, {"a": a}, ["y"], {"y": 1})
    cache = ResponseCache(1 << 20)
    out = {"y": a * 2}
    assert cache.get(key) is None
    cache.put(key, out)
    hit = cache.get(key)
    assert hit is not None and hit["y"] is out["y"] and hit is not out  # no copy of the arrays
    with pytest.raises(ValueError, match="read-only"):
        hit["y"][0, 0] = 5
    assert (cache.hits, cache.misses) == (1, 1)


def test_rows_of_a_batch_are_held_without_the_batch() -> None:
    batch = np.arange(64, dtype=np.float32).reshape(16, 4)
    rows = batch[2:3]
    cache = ResponseCache(1 << 20)
    cache.put(b"k", {"y": rows})
    hit = cache.get(b"k")
    assert hit is not None and hit["y"].base is None and not hit["y"].flags.writeable
    np.testing.assert_array_equal(hit["y"], batch[2:3])
    assert cache.bytes == answer_bytes({"y": rows})

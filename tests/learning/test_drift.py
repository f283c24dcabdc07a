"""Drift without labels (onnxgate.learning.drift): the statistics on seeded samples, the live inputs read
back from a log written by a real PredictionLog, and the Prometheus collector. Every sample is seeded."""

from __future__ import annotations

import io
import math
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from onnxgate.learning.drift import (
    CATEGORICAL,
    CHI2,
    KS,
    NUMERIC,
    PSI_EPSILON,
    REFERENCE_FILE,
    DriftCollector,
    FeatureDrift,
    categorical_drift,
    feature_drift,
    live_features,
    numeric_drift,
    reference_files,
)
from onnxgate.server.logfiles import LogFiles
from onnxgate.server.predlog import PredictionLog
from onnxgate.server.segments import SkipList
from tests.predlog.helpers import settings

pytestmark = pytest.mark.wall_clock

MODEL = "shop"
X_COLUMNS = ["length", "width", "height", "weight"]
MAPPING = {"x": X_COLUMNS, "color": ["colour"]}


# -- the statistics ----------------------------------------------------------------------------------------
def test_a_shifted_normal_is_flagged_and_the_same_distribution_is_not() -> None:
    reference = np.random.default_rng(1).normal(0.0, 1.0, 5000)
    shifted = numeric_drift(reference, np.random.default_rng(2).normal(1.0, 1.0, 2000))
    same = numeric_drift(reference, np.random.default_rng(3).normal(0.0, 1.0, 2000))
    assert (shifted.kind, shifted.test) == (NUMERIC, KS)
    assert shifted.psi > 0.2 and shifted.p_value < 1e-6
    assert same.psi < 0.1 and same.p_value > 0.01
    assert same.statistic < shifted.statistic
    assert (shifted.n_reference, shifted.n_live) == (5000, 2000)


def test_a_wider_spread_with_the_same_mean_is_flagged() -> None:
    # the mean did not move: a mean-based check would miss it, the deciles' tails do not
    reference = np.random.default_rng(4).normal(0.0, 1.0, 5000)
    wider = numeric_drift(reference, np.random.default_rng(5).normal(0.0, 2.5, 2000))
    assert wider.psi > 0.2


def test_psi_is_the_formula_over_reference_deciles() -> None:
    reference = np.arange(1000, dtype=float)  # deciles at 99.9, 199.8, ...: 100 values per bin
    live = np.full(50, 2000.0)  # all beyond the reference's range: the last (open-ended) bin
    drift = numeric_drift(reference, live)
    expected = (1.0 - 0.1) * math.log(1.0 / 0.1) + 9 * (PSI_EPSILON - 0.1) * math.log(PSI_EPSILON / 0.1)
    assert drift.psi == pytest.approx(expected)
    assert drift.statistic == pytest.approx(1.0)  # KS: the samples do not overlap


def test_a_changed_category_mix_is_flagged_and_the_same_mix_is_not() -> None:
    colours = np.array(["red", "green", "blue"])
    reference = np.random.default_rng(6).choice(colours, 5000, p=[0.5, 0.3, 0.2])
    changed = categorical_drift(reference, np.random.default_rng(7).choice(colours, 2000, p=[0.2, 0.3, 0.5]))
    same = categorical_drift(reference, np.random.default_rng(8).choice(colours, 2000, p=[0.5, 0.3, 0.2]))
    assert (changed.kind, changed.test) == (CATEGORICAL, CHI2)
    assert changed.psi > 0.2 and changed.p_value < 1e-6
    assert same.psi < 0.1 and same.p_value > 0.01


def test_chi_square_is_pearsons_statistic_and_a_new_category_counts() -> None:
    reference = ["a"] * 60 + ["b"] * 40
    live = ["a"] * 30 + ["b"] * 50 + ["c"] * 20  # "c" never seen in training
    drift = categorical_drift(pd.Series(reference), pd.Series(live))
    observed = np.array([[60, 40, 0], [30, 50, 20]], dtype=float)
    expected = observed.sum(axis=1, keepdims=True) * observed.sum(axis=0) / observed.sum()
    assert drift.statistic == pytest.approx(((observed - expected) ** 2 / expected).sum())
    assert drift.psi > 0.2  # a fifth of live traffic in a category with no reference mass


def test_bytes_and_str_are_one_category_and_a_single_category_does_not_drift() -> None:
    drift = categorical_drift(np.array([b"red"] * 10, dtype=object), np.array(["red"] * 5, dtype=object))
    assert drift.psi == pytest.approx(0.0) and drift.statistic == 0.0 and drift.p_value == 1.0


def test_feature_drift_per_column_kinds_missing_values_and_columns_absent_from_live() -> None:
    rng = np.random.default_rng(9)
    reference = pd.DataFrame(
        {
            "age": rng.normal(40, 10, 3000),
            "plan": rng.choice(["free", "pro"], 3000, p=[0.8, 0.2]),
            "store": rng.integers(0, 4, 3000),  # numbers that name something: categorical when told
            "member": rng.random(3000) < 0.3,
            "target": rng.random(3000),  # not an input: the live rows do not have it
        }
    )
    live = pd.DataFrame(
        {
            "age": np.concatenate([rng.normal(55, 10, 900), [np.nan] * 100]),  # older customers, some unknown
            "plan": rng.choice(["free", "pro"], 1000, p=[0.8, 0.2]),
            "store": rng.integers(0, 4, 1000),
            "member": rng.random(1000) < 0.3,
        }
    )
    drift = feature_drift(reference, live, categorical={"store"})
    assert set(drift) == {"age", "plan", "store", "member"}
    assert drift["age"].kind == NUMERIC and drift["age"].psi > 0.2 and drift["age"].n_live == 900
    assert drift["plan"].kind == CATEGORICAL and drift["plan"].psi < 0.1
    assert drift["store"].kind == CATEGORICAL and drift["member"].kind == CATEGORICAL
    assert feature_drift(reference, live)["store"].kind == NUMERIC


def test_a_side_without_values_gives_nan_not_a_number_that_looks_measured() -> None:
    drift = numeric_drift(np.arange(10.0), np.array([np.nan, np.nan]))
    assert drift.n_live == 0 and math.isnan(drift.psi) and math.isnan(drift.p_value)
    assert drift.as_dict()["psi"] is None


# -- live inputs from the prediction log -------------------------------------------------------------------
def record(log: PredictionLog, i: int, version: str = "1", batch: int = 1, shift: float = 0.0) -> None:
    """Request i: x = [i, i+.25, i+.5, i+.75] (+ shift) per batch row, a [batch, 4] float32 matrix, and a
    BYTES input colour, "red" for odd i."""
    x = np.array([[i + shift, i + 0.25, i + 0.5, i + 0.75]] * batch, np.float32)
    color = np.array([[b"red" if i % 2 else b"blue"]] * batch, dtype=object)
    log.record(f"p{i}", MODEL, version, {"x": x, "color": color}, {"label": np.zeros(batch, np.int64)})


def write(log_dir: Path, replica: str, requests: list[tuple[int, str]], close: bool = True) -> PredictionLog:
    log = PredictionLog(settings(log_dir, replica))
    for i, version in requests:
        record(log, i, version)
        time.sleep(0.002)  # distinct timestamps: the tests check which rows are the newest
    assert log.flush()
    if close:
        log.close()  # rolled to Parquet
    return log


def test_live_features_reads_a_matrix_and_a_string_input_with_a_column_mapping(tmp_path: Path) -> None:
    log = write(tmp_path, "r1", [(i, "1") for i in range(5)])
    live = live_features(LogFiles.at(tmp_path), MODEL, "1", since_s=None, max_rows=100, columns=MAPPING)
    log.close()
    assert list(live.columns) == ["colour", *X_COLUMNS]
    assert live["length"].tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]  # oldest first
    assert live["weight"].tolist() == [0.75, 1.75, 2.75, 3.75, 4.75]
    assert live["colour"].tolist() == ["blue", "red", "blue", "red", "blue"]  # bytes decoded to str
    unnamed = live_features(LogFiles.at(tmp_path), MODEL, None, since_s=None, max_rows=100)
    assert list(unnamed.columns) == ["color", "x_0", "x_1", "x_2", "x_3"]  # `dataset export`'s names


def test_live_features_expands_a_batched_request_into_rows(tmp_path: Path) -> None:
    log = PredictionLog(settings(tmp_path, "r1"))
    record(log, 7, batch=3)
    record(log, 8)
    assert log.flush()
    log.close()
    live = live_features(LogFiles.at(tmp_path), MODEL, None, since_s=None, max_rows=100, columns=MAPPING)
    assert live["length"].tolist() == [7.0, 7.0, 7.0, 8.0]
    two = live_features(LogFiles.at(tmp_path), MODEL, None, since_s=None, max_rows=2, columns=MAPPING)
    assert two["length"].tolist() == [7.0, 8.0]  # the newest two feature rows


def test_live_features_newest_rows_across_replicas_versions_and_open_segments(tmp_path: Path) -> None:
    write(tmp_path, "r1", [(i, "1") for i in range(0, 10)])  # rolled
    write(tmp_path, "r2", [(i, "1") for i in range(10, 20)])  # rolled
    write(tmp_path, "r1", [(i, "2" if i % 5 == 0 else "1") for i in range(20, 30)])  # r1's second segment
    open_log = write(tmp_path, "r2", [(i, "1") for i in range(30, 35)], close=False)  # still an .arrows stream
    try:
        logfiles = LogFiles.at(tmp_path)
        assert any(not s.rolled for s in logfiles.segments("predictions", {MODEL}))
        newest = live_features(logfiles, MODEL, "1", since_s=None, max_rows=12, columns=MAPPING)
        expected = [i for i in range(35) if not (20 <= i < 30 and i % 5 == 0)][-12:]
        assert newest["length"].tolist() == [float(i) for i in expected]
        every_version = live_features(logfiles, MODEL, None, since_s=None, max_rows=1000, columns=MAPPING)
        assert every_version["length"].tolist() == [float(i) for i in range(35)]
        only_v2 = live_features(logfiles, MODEL, "2", since_s=None, max_rows=1000, columns=MAPPING)
        assert only_v2["length"].tolist() == [20.0, 25.0]
        assert live_features(logfiles, "another-model", None, since_s=None, max_rows=10).empty
    finally:
        open_log.close()


def test_live_features_since(tmp_path: Path) -> None:
    log = PredictionLog(settings(tmp_path, "r1"))
    for i in range(5):
        record(log, i)
    assert log.flush()
    time.sleep(0.01)
    since = time.time()
    time.sleep(0.01)
    for i in range(5, 8):
        record(log, i)
    log.close()
    live = live_features(LogFiles.at(tmp_path), MODEL, None, since_s=since, max_rows=100, columns=MAPPING)
    assert live["length"].tolist() == [5.0, 6.0, 7.0]
    assert live_features(LogFiles.at(tmp_path), MODEL, None, since_s=time.time() + 60, max_rows=100).empty


def test_live_features_stops_reading_once_it_holds_the_newest_rows(tmp_path: Path) -> None:
    write(tmp_path, "r1", [(i, "1") for i in range(0, 10)])
    write(tmp_path, "r1", [(i, "1") for i in range(10, 20)])
    # the oldest segment of the replica is not Parquet: reading it would put it on the skip list
    (tmp_path / "r1" / MODEL / "predictions-00000000.parquet").write_bytes(b"not a parquet file")
    skipped: SkipList = {}
    live = live_features(LogFiles.at(tmp_path), MODEL, None, since_s=None, max_rows=10, skipped=skipped)
    assert live["x_0"].tolist() == [float(i) for i in range(10, 20)]
    assert skipped == {}, "read a segment older than the newest max_rows rows"
    # asking for more reaches it: it is skipped and reported, the rest is read
    everything = live_features(LogFiles.at(tmp_path), MODEL, None, since_s=None, max_rows=100, skipped=skipped)
    assert len(everything) == 20
    assert [p.name for p in skipped] == ["predictions-00000000.parquet"]


def test_a_mapping_of_the_wrong_width_is_refused(tmp_path: Path) -> None:
    write(tmp_path, "r1", [(0, "1")])
    with pytest.raises(ValueError, match=r"input 'x' has 4 values per row in the log but the column mapping names 3"):
        live_features(LogFiles.at(tmp_path), MODEL, None, since_s=None, max_rows=10, columns={"x": ["a", "b", "c"]})


def test_drift_of_logged_inputs_against_the_training_reference(tmp_path: Path) -> None:
    # training: length ~ N(0, 1), colours half and half; live traffic: length shifted by 3, colours the same
    rng = np.random.default_rng(10)
    reference = pd.DataFrame({"length": rng.normal(0.0, 1.0, 2000), "colour": rng.choice(["red", "blue"], 2000)})
    log = PredictionLog(settings(tmp_path, "r1"))
    for i, value in enumerate(rng.normal(3.0, 1.0, 400)):
        record(log, i, shift=float(value) - i)  # x[0] = value
    log.close()
    live = live_features(LogFiles.at(tmp_path), MODEL, None, since_s=None, max_rows=1000, columns=MAPPING)
    drift = feature_drift(reference, live)
    assert set(drift) == {"length", "colour"}
    assert drift["length"].psi > 0.2 and drift["length"].n_live == 400
    assert drift["colour"].psi < 0.1


# -- the collector -----------------------------------------------------------------------------------------
def test_the_collector_exports_the_latest_values_on_its_registry() -> None:
    registry = CollectorRegistry()
    collector = DriftCollector()
    registry.register(collector)
    assert registry.get_sample_value("onnxgate_drift_psi", {"model": "m", "version": "1", "feature": "a"}) is None
    collector.update(
        "m",
        "1",
        {
            "a": FeatureDrift(NUMERIC, KS, 0.31, 0.25, 1e-9, 1000, 500),
            "b": FeatureDrift(CATEGORICAL, CHI2, 0.02, 3.5, 0.17, 1000, 500),
            "c": FeatureDrift(NUMERIC, KS, math.nan, math.nan, math.nan, 1000, 0),
        },
    )
    collector.update("m", "2", {"a": FeatureDrift(NUMERIC, KS, 0.05, 0.04, 0.6, 1000, 800)})

    def value(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, labels)

    assert value("onnxgate_drift_psi", model="m", version="1", feature="a") == 0.31
    assert value("onnxgate_drift_psi", model="m", version="2", feature="a") == 0.05
    assert value("onnxgate_drift_statistic", model="m", version="1", feature="a", test="ks") == 0.25
    assert value("onnxgate_drift_statistic", model="m", version="1", feature="b", test="chi2") == 3.5
    assert value("onnxgate_drift_p_value", model="m", version="1", feature="b", test="chi2") == 0.17
    assert value("onnxgate_drift_psi", model="m", version="1", feature="c") is None  # no live values
    # the newest values replace the old ones, features no longer computed included
    collector.update("m", "1", {"a": FeatureDrift(NUMERIC, KS, 0.12, 0.1, 0.01, 1000, 500)})
    assert value("onnxgate_drift_psi", model="m", version="1", feature="a") == 0.12
    assert value("onnxgate_drift_psi", model="m", version="1", feature="b") is None
    collector.forget("m", "1")
    text = generate_latest(registry).decode()
    assert 'version="1"' not in text and 'onnxgate_drift_psi{feature="a",model="m",version="2"} 0.05' in text
    collector.forget("m")
    assert "onnxgate_drift_psi{" not in generate_latest(registry).decode()
    # no global state: a second collector on another registry shares nothing
    other = CollectorRegistry()
    other.register(DriftCollector())
    assert "onnxgate_drift_psi{" not in generate_latest(other).decode()


def test_a_collector_keeps_only_the_measured_version_and_the_models_still_there() -> None:
    registry = CollectorRegistry()
    collector = DriftCollector()
    registry.register(collector)
    for model, version in (("m", "5"), ("m", "6"), ("n", "1")):
        collector.update(model, version, {"a": FeatureDrift(NUMERIC, KS, 0.3, 0.2, 0.01, 100, 100)})
    collector.keep_only("m", "6")  # version 5 retired: its series goes, it does not stay frozen
    text = generate_latest(registry).decode()
    assert 'version="5"' not in text and 'model="m",version="6"' in text and 'model="n"' in text
    collector.keep_models({"m"})
    assert 'model="n"' not in generate_latest(registry).decode()


# -- a version's drift reference ---------------------------------------------------------------------------
def test_a_drift_reference_is_a_bounded_seeded_sample_of_the_training_rows_drawn_by_weight() -> None:
    rng = np.random.default_rng(12)
    X = pd.DataFrame({"a": np.arange(25_000, dtype=np.float64), "colour": rng.choice(["red", "blue"], 25_000)})

    def read(files: dict[str, bytes]) -> pd.DataFrame:
        assert list(files) == [REFERENCE_FILE]
        return pd.read_parquet(io.BytesIO(files[REFERENCE_FILE]))

    small = read(reference_files(X.iloc[:300]))
    pd.testing.assert_frame_equal(small, X.iloc[:300])  # every row when there are few
    big = read(reference_files(X, max_rows=10_000, seed=3))
    assert len(big) == 10_000 and big["a"].is_unique and big["a"].is_monotonic_increasing
    pd.testing.assert_frame_equal(big, read(reference_files(X, max_rows=10_000, seed=3)))  # seeded
    # weights: the newest rows weigh 100 times the oldest, so the sample is mostly the newest rows
    weight = np.where(np.arange(25_000) >= 20_000, 100.0, 1.0)
    weighted = read(reference_files(X, weight, max_rows=10_000))
    assert len(weighted) == 10_000 and (weighted["a"] >= 20_000).mean() > 0.9

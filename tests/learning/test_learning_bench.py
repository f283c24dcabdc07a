"""bench/learning.py, small: its streams and measures, and two scenarios end to end through a real gateway,
feedback and the Learner. The structure and sanity of the report, not the loop's targets (the benchmark's job)."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from onnxgate.learning.streams import (
    LABEL_NOISE,
    SCENARIOS,
    Oracle,
    Stream,
    backoff_schedule,
    expected_quality,
    labels_until_within,
)

ROOT = Path(__file__).resolve().parents[2]


def _bench() -> ModuleType:
    if "bench_learning" not in sys.modules:
        spec = importlib.util.spec_from_file_location("bench_learning", ROOT / "bench" / "learning.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules["bench_learning"] = module
        spec.loader.exec_module(module)
    return sys.modules["bench_learning"]


@pytest.mark.parametrize("scenario", SCENARIOS)
@pytest.mark.parametrize("task", ["classifier", "regressor"])
def test_streams_are_seeded_and_change_where_they_say(task: str, scenario: str) -> None:
    stream = Stream(task, scenario, 2000, 1000, span=400, back=1500)
    at = np.arange(2000)
    one = stream.frame(at, np.random.default_rng(1))
    assert one.equals(stream.frame(at, np.random.default_rng(1)))
    share = stream.share_b(at)
    assert (share[:1000] == 0).all()
    expected_b = {"abrupt": 1.0, "gradual": 1.0, "recurring": 1.0}.get(scenario, 0.0)
    assert share[1400] == expected_b
    if scenario == "recurring":
        assert share[1500] == 0
    x = one[["x0", "x1", "x2", "x3"]].to_numpy()
    mean, var = stream.truth(x, at)
    assert np.isfinite(mean).all() and (var >= 0).all()
    if task == "classifier":  # the oracle of the labels (the most likely class) is right 1 - noise of the time
        best = (mean > 0.5).astype(float)
        if scenario != "noise":
            assert expected_quality(task, best[:1000], mean[:1000], var[:1000]) == pytest.approx(
                100 * (1 - LABEL_NOISE)
            )
        else:
            assert expected_quality(task, best[1000:], mean[1000:], var[1000:]) == 50.0


def test_measures() -> None:
    assert labels_until_within([50, 80, 94, 95, 95], [95] * 5, 0, 5, 100) == 200
    assert labels_until_within([50, 95, 80, 95, 95], [95] * 5, 0, 5, 100) == 300  # 3 blocks in a row, or to the end
    assert labels_until_within([50, 50, 50], [95] * 3, 0, 3, 100) is None
    assert backoff_schedule(4500, 100, 500, 3) == [500, 1000, 1500, 2500, 3500, 4500]
    stream = Stream("classifier", "abrupt", 1000, 500)
    rng = np.random.default_rng(0)
    oracle = Oracle(stream, stream.base(500, rng))
    x = stream.inputs(np.full(2000, 600), rng)
    before = stream.quality(oracle.predict(x), x, np.full(2000, 600))
    at = np.arange(500, 800)
    oracle.learn(stream.frame(at, rng), at)  # rows of B only: it knows where the change is
    after = stream.quality(oracle.predict(x), x, np.full(2000, 600))
    assert before < 70 < 85 < after


def test_two_scenarios_end_to_end_report_sanely(tmp_path: Path) -> None:
    bench = _bench()
    cfg = bench.Config(block=100, base_rows=600, pre=400, post=800, span=300, steady=400, noise_labels=200)
    results = []
    for scenario in ("none", "abrupt"):
        (tmp_path / scenario).mkdir()
        results.append(
            bench.run_scenario(tmp_path / scenario, "classifier", scenario, cfg, bench.POLICIES["classifier"])
        )
    none, abrupt = results
    for r in results:
        assert len(r.blocks) == 12 and [b.index for b in r.blocks] == list(range(12))
        assert all(math.isfinite(b.live) and math.isfinite(b.oracle) for b in r.blocks)
        assert all(0 <= m.block < 12 and m.labels == (m.block + 1) * 100 for m in r.decisions)
        s = r.summary
        assert {"changes", "area", "promotions", "false_promotions", "retrains", "steady_retrains_per_1k"} <= set(s)
        assert math.isfinite(s["area"]) and math.isfinite(s["steady_retrains_per_1k"])
        json.dumps(s)
    # no change: nothing to promote, every retrain is the label trigger's, within the back-off's schedule
    assert none.summary["promotions"] == 0 and none.summary["false_promotions"] == 0
    assert all(m.trigger.startswith("labels") for m in none.decisions if m.outcome in bench.RETRAINS)
    assert "schedule_per_1k" in none.summary
    # the abrupt change is seen: live quality falls after label 400, the oracle recovers within the segment
    [change] = abrupt.summary["changes"]
    assert change["at"] == 400 and "met" in change and change["oracle_labels"] is not None
    assert abrupt.blocks[4].live < 70 < abrupt.summary["changes"][0]["oracle_plateau"]
    assert all(b.version == "1" for b in none.blocks)
    report = bench.table(results, None)
    assert report.count("\n| classifier |") == 2 and "abrupt" in report
    bench.plot(results, tmp_path / "learning-classifier.png", "classifier")
    assert (tmp_path / "learning-classifier.png").stat().st_size > 10_000


def test_noise_runs_count_promotions(tmp_path: Path) -> None:
    bench = _bench()
    cfg = bench.Config(block=100, base_rows=600, noise_labels=200)
    noise = bench.noise_runs(tmp_path, 2, cfg, bench.POLICIES["classifier"])
    assert noise["runs"] == 2 and len(noise["per_run"]) == 2
    assert noise["promotions"] == sum(r["promotions"] for r in noise["per_run"])
    assert noise["met"] == (noise["promotions"] == 0)
    assert "Pure-noise runs: 2" in bench.table([], noise)

"""Choosing data by recency after a change, and never promoting noise over repeated runs."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from onnxgate.converters.publish import versions
from onnxgate.learning import decisions
from onnxgate.learning.change import newest_change, row_losses
from onnxgate.learning.demo import concept
from onnxgate.learning.learn import POLICY_FILE, Learner
from onnxgate.learning.retrain import Rule, retrain
from tests.conftest import GatewayHandle
from tests.learning.test_loop import _convert, _flush, _serve, _stream


def _bernoulli(seed: int, *parts: tuple[int, float]) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.concatenate([(rng.random(n) < p).astype(np.float64) for n, p in parts])


def test_an_abrupt_change_is_found_where_it_happened() -> None:
    change = newest_change(_bernoulli(0, (1000, 0.05), (300, 0.5)))
    assert change is not None and abs(change.index - 1000) <= 10
    assert change.before < 0.1 < 0.4 < change.after and change.n_after == 1300 - change.index


def test_no_change_is_called_on_a_stationary_stream_in_200_seeded_streams() -> None:
    assert sum(newest_change(_bernoulli(seed, (2000, 0.2))) is not None for seed in range(200)) == 0


def test_the_newest_change_wins_when_a_concept_returns() -> None:
    change = newest_change(_bernoulli(1, (800, 0.05), (400, 0.5), (300, 0.05)))
    assert change is not None and abs(change.index - 1200) <= 10 and change.after < 0.1


def test_too_few_rows_after_a_change_are_not_a_change_yet() -> None:
    assert newest_change(_bernoulli(2, (1000, 0.05), (15, 0.5))) is None


def test_regression_losses_are_scaled_so_an_outlier_does_not_hide_a_shift() -> None:
    rng = np.random.default_rng(3)
    truth = np.r_[rng.normal(0, 1, 600), rng.normal(3, 1, 300)]
    predicted = np.zeros(900)
    truth[10] = 1e6  # one wild label
    losses = row_losses("regression", predicted, truth)
    assert losses.min() >= 0.0 and losses.max() <= 1.0
    change = newest_change(losses)
    assert change is not None and abs(change.index - 600) <= 15


def test_delta_is_checked() -> None:
    with pytest.raises(ValueError, match="delta"):
        newest_change(np.zeros(10), delta=2.0)


def test_after_an_abrupt_change_windows_are_chosen_and_judged_on_the_rows_since(
    tmp_path: Path, start_gateway: Callable[..., GatewayHandle]
) -> None:
    rng = np.random.default_rng(11)
    repo = _convert(tmp_path, concept("A", 1000, rng))
    gw = _serve(start_gateway, repo, tmp_path / "log")
    _stream(gw.address, "m", concept("A", 600, rng))
    _stream(gw.address, "m", concept("B", 80, rng))
    _flush(gw)
    early = retrain(repo, "m", str(tmp_path / "log"), Rule(min_rows_after_change=150))
    # the change is seen, but fewer rows since it than min_rows_after_change do not make train, validation, test
    assert early.outcome == "not enough data" and "a change at labelled row" in early.reason, early
    assert "since the change:" in early.reason and "150 needed" in early.reason
    _stream(gw.address, "m", concept("B", 220, rng))
    _flush(gw)
    decision = retrain(repo, "m", str(tmp_path / "log"), Rule())
    assert decision.outcome == "promoted", decision.reason
    assert abs(decision.rows["change_at_row"] - 600) <= 10 and decision.rows["since_change"] >= 290
    # validation and test hold only rows since the change; the chosen window starts at it or later
    assert decision.rows["validation"] + decision.rows["test"] <= decision.rows["since_change"]
    assert decision.window in ("since the change", "newest 1/2 of feedback", "newest 1/4 of feedback")
    assert decision.test is not None and decision.test["change"]["index"] == decision.rows["change_at_row"]
    assert decision.test["challenger"] - decision.test["champion"] > 0.3  # coin flip -> the new concept
    assert versions(repo / "m") == [1, 2]


def test_pure_noise_is_never_promoted_over_repeated_runs_and_each_run_spends_less_alpha(
    tmp_path: Path, start_gateway: Callable[..., GatewayHandle]
) -> None:
    rng = np.random.default_rng(12)
    repo = _convert(tmp_path, concept("A", 1000, rng))
    gw = _serve(start_gateway, repo, tmp_path / "log")
    traffic = concept("A", 600, rng)
    _stream(gw.address, "m", traffic, labels=rng.integers(0, 2, len(traffic)))  # labels independent of inputs
    _flush(gw)
    made = [retrain(repo, "m", str(tmp_path / "log"), Rule(min_rows=200, seed=seed)) for seed in range(5)]
    assert [d.outcome for d in made] == ["rejected"] * 5, [d.reason for d in made]
    assert versions(repo / "m") == [1]
    looks = [d["test"]["look"] for d in decisions.read(repo / "m")]
    alphas = [d["test"]["alpha"] for d in decisions.read(repo / "m")]
    assert looks == [1, 2, 3, 4, 5]
    assert alphas == pytest.approx([0.01 / (k * (k + 1)) for k in looks]) and sum(alphas) < 0.01


def test_the_loop_retrains_on_a_change_and_again_only_with_twice_the_rows_since(
    tmp_path: Path, start_gateway: Callable[..., GatewayHandle]
) -> None:
    rng = np.random.default_rng(13)
    repo = _convert(tmp_path, concept("A", 1000, rng))
    # only the change trigger can fire: labels wait for 10,000, drift past a PSI of 1000, quality is off
    (repo / "m" / POLICY_FILE).write_text(
        "retrain_after_labels = 10000\ndrift_psi_above = 1000.0\nmin_interval_s = 0\n"
    )
    gw = _serve(start_gateway, repo, tmp_path / "log")
    _stream(gw.address, "m", concept("A", 500, rng))
    _flush(gw)
    learner = Learner(repo, str(tmp_path / "log"))
    assert learner.tick() == []  # no change, no run
    _stream(gw.address, "m", concept("B", 150, rng))
    _flush(gw)
    first = learner.tick()
    assert len(first) == 1 and first[0].trigger.startswith("change: a change at labelled row"), first
    assert first[0].seen["since_change"] >= 60 and "labelled rows since the change at" in first[0].next
    assert learner.tick() == [] and learner.tick() == []  # an unchanged log: the same change, no new rows
    seen = first[0].seen["since_change"]
    _stream(gw.address, "m", concept("B", seen + 10, rng))
    _flush(gw)
    again = learner.tick()
    assert len(again) == 1 and again[0].trigger.startswith("change:"), again
    assert again[0].seen["since_change"] >= 2 * seen

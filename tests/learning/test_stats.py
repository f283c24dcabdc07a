"""The significance tests behind promotion and rollback (onnxgate.learning.stats).

Exact p-values are checked against scipy and a published table; the bootstrap's error rates on seeded
synthetic data; the rule itself on models actually trained (a challenger fit to shuffled labels must
never be promoted). Every random choice is seeded.
"""

from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest
from scipy import stats as sps
from sklearn.linear_model import LinearRegression, LogisticRegression

from onnxgate.learning.stats import (
    KEEP,
    NOT_ENOUGH_DATA,
    PROMOTE,
    REJECT,
    ROLLBACK,
    PairedTest,
    decide,
    mcnemar_exact,
    paired_bootstrap,
    significantly_worse,
)


def paired_outcomes(b: int, c: int, both_right: int = 0, both_wrong: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Right/wrong outcomes with the given 2x2 table: b = champion right only, c = challenger right only."""
    champion = np.array([True] * both_right + [True] * b + [False] * c + [False] * both_wrong)
    challenger = np.array([True] * both_right + [False] * b + [True] * c + [False] * both_wrong)
    return champion, challenger


# -- McNemar ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(6))
def test_mcnemar_p_values_equal_scipy_binomtest(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(20, 400))
    champion = rng.random(n) < 0.7
    challenger = rng.random(n) < rng.uniform(0.5, 0.9)
    test = mcnemar_exact(champion, challenger)
    b = int(np.sum(champion & ~challenger))
    c = int(np.sum(~champion & challenger))
    assert (test.b, test.c, test.n) == (b, c, n)
    assert test.p_value_two_sided == pytest.approx(sps.binomtest(c, b + c, 0.5).pvalue, rel=1e-9)
    assert test.p_value == pytest.approx(sps.binomtest(c, b + c, 0.5, alternative="greater").pvalue, rel=1e-9)
    assert test.p_value_worse == pytest.approx(sps.binomtest(c, b + c, 0.5, alternative="less").pvalue, rel=1e-9)
    assert test.champion == pytest.approx(champion.mean())
    assert test.challenger == pytest.approx(challenger.mean())
    assert test.difference == pytest.approx(challenger.mean() - champion.mean())


def test_mcnemar_matches_a_published_table() -> None:
    # Fagerland, Lydersen & Laake (2013), BMC Med Res Methodol 13:91, Table 1: airway hyper-responsiveness
    # before/after in 21 children, yes/yes 1, yes/no 1, no/yes 7, no/no 12; exact conditional p = 0.070.
    before, after = paired_outcomes(b=1, c=7, both_right=1, both_wrong=12)
    test = mcnemar_exact(before, after)
    assert test.p_value_two_sided == pytest.approx(18 / 256)  # 2 * P(X <= 1), X ~ Bin(8, 1/2)
    assert round(test.p_value_two_sided, 3) == 0.070
    assert test.p_value == pytest.approx(9 / 256)  # P(X >= 7)
    assert test.n == 21 and test.difference == pytest.approx(6 / 21)


def test_mcnemar_without_discordant_pairs_has_p_one() -> None:
    champion, challenger = paired_outcomes(b=0, c=0, both_right=30, both_wrong=10)
    test = mcnemar_exact(champion, challenger)
    assert (test.b, test.c) == (0, 0)
    assert test.p_value == test.p_value_worse == test.p_value_two_sided == 1.0
    assert test.difference == 0.0
    assert decide(test, margin=0.0, alpha=0.05, min_rows=10).outcome == REJECT


def test_mcnemar_accepts_zero_one_and_refuses_other_values() -> None:
    as_bool = mcnemar_exact(np.array([True, False, True]), np.array([False, False, True]))
    as_int = mcnemar_exact(np.array([1, 0, 1]), np.array([0, 0, 1]))
    assert as_bool == as_int
    with pytest.raises(ValueError, match="0/1"):
        mcnemar_exact(np.array([0, 2]), np.array([0, 1]))
    with pytest.raises(ValueError, match="same rows"):
        mcnemar_exact(np.array([True]), np.array([True, False]))


def test_no_rows_is_not_enough_data_and_json_ready() -> None:
    test = mcnemar_exact(np.array([], bool), np.array([], bool))
    assert test.n == 0 and math.isnan(test.champion)
    verdict = decide(test, margin=0.0, alpha=0.05, min_rows=1)
    assert verdict.outcome == NOT_ENOUGH_DATA
    # a decision log is JSON: NaN (which JSON lacks) must not reach it
    text = json.dumps(verdict.as_dict(), allow_nan=False)
    assert json.loads(text)["test"]["champion"] is None


# -- paired bootstrap --------------------------------------------------------------------------------------
def correlated_losses(rng: np.random.Generator, n: int, shift: float) -> tuple[np.ndarray, np.ndarray]:
    """Losses of two models on the same rows: mostly the row's difficulty, shared; `shift` is the true mean
    loss the challenger saves."""
    difficulty = rng.gamma(2.0, 1.0, n)
    champion = difficulty + rng.normal(0.0, 0.5, n)
    challenger = difficulty + rng.normal(0.0, 0.5, n) - shift
    return champion, challenger


def test_bootstrap_error_rates_when_there_is_no_difference() -> None:
    # 200 seeded repetitions with a true difference of 0: the 95% interval covers 0 about 95% of the time,
    # and the one-sided test at alpha 0.05 says "significant" about 5% of the time. Bounds: +-3 binomial
    # standard deviations (0.015 for 0.95 over 200 repetitions), so the test fails only for a real bias.
    repetitions, covered, significant = 200, 0, 0
    for seed in range(repetitions):
        champion, challenger = correlated_losses(np.random.default_rng(seed), 200, shift=0.0)
        test = paired_bootstrap(champion, challenger, n_resamples=1000, seed=seed)
        assert test.interval is not None
        covered += test.interval[0] <= 0.0 <= test.interval[1]
        significant += test.p_value < 0.05
    assert 0.90 <= covered / repetitions <= 0.995
    assert 0.90 <= 1 - significant / repetitions <= 0.995


def test_bootstrap_interval_agrees_with_the_normal_approximation() -> None:
    champion, challenger = correlated_losses(np.random.default_rng(7), 5000, shift=0.1)
    test = paired_bootstrap(champion, challenger, seed=1)
    d = champion - challenger
    half = 1.959964 * d.std(ddof=1) / math.sqrt(d.size)
    assert test.interval is not None
    assert test.interval[0] == pytest.approx(d.mean() - half, abs=0.1 * half)
    assert test.interval[1] == pytest.approx(d.mean() + half, abs=0.1 * half)
    assert test.difference == pytest.approx(d.mean())
    assert test.champion == pytest.approx(champion.mean()) and test.challenger == pytest.approx(challenger.mean())
    assert test.p_value < 0.001 and test.p_value_worse > 0.999


def test_bootstrap_is_seeded() -> None:
    champion, challenger = correlated_losses(np.random.default_rng(3), 300, shift=0.02)
    assert paired_bootstrap(champion, challenger, seed=5) == paired_bootstrap(champion, challenger, seed=5)
    assert paired_bootstrap(champion, challenger, seed=5) != paired_bootstrap(champion, challenger, seed=6)


def test_bootstrap_of_identical_losses_is_never_significant() -> None:
    losses = np.random.default_rng(0).random(500)
    test = paired_bootstrap(losses, losses.copy())
    assert test.difference == 0.0 and test.interval == (0.0, 0.0)
    assert test.p_value == 1.0 and decide(test, margin=0.0, alpha=0.05, min_rows=1).outcome == REJECT


def test_bootstrap_of_ten_thousand_rows_is_fast() -> None:
    champion, challenger = correlated_losses(np.random.default_rng(0), 10_000, shift=0.01)
    paired_bootstrap(champion[:100], challenger[:100], n_resamples=100)  # numpy's first-call costs
    start = time.perf_counter()
    test = paired_bootstrap(champion, challenger, n_resamples=10_000)
    elapsed = time.perf_counter() - start
    assert test.n_resamples == 10_000
    # ~0.5 s on one idle core; the bound leaves room for a loaded CI machine, and still fails a
    # per-resample Python loop or an implementation that materialises 10k x 10k float64 copies.
    assert elapsed < 2.5, f"10k resamples of 10k rows took {elapsed:.2f} s"


def test_bootstrap_refuses_bad_input() -> None:
    with pytest.raises(ValueError, match="finite"):
        paired_bootstrap(np.array([1.0, np.nan]), np.array([1.0, 2.0]))
    with pytest.raises(ValueError, match="same rows"):
        paired_bootstrap(np.ones(3), np.ones(4))
    with pytest.raises(ValueError, match="confidence"):
        paired_bootstrap(np.ones(3), np.ones(3), confidence=95)


# -- the rule on trained models ----------------------------------------------------------------------------
def classification_data(seed: int, n: int = 1200) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 5))
    y = (X @ np.array([1.5, -1.0, 0.8, 0.0, 0.3]) + rng.normal(0.0, 0.5, n) > 0).astype(int)
    return X, y


@pytest.mark.parametrize("seed", range(10))
def test_a_challenger_trained_on_shuffled_labels_is_never_promoted(seed: int) -> None:
    X, y = classification_data(seed)
    train, test_rows = slice(0, 800), slice(800, None)
    champion = LogisticRegression().fit(X[train], y[train])
    shuffled = np.random.default_rng(1000 + seed).permutation(y[train])
    challenger = LogisticRegression().fit(X[train], shuffled)
    truth = y[test_rows]
    test = mcnemar_exact(champion.predict(X[test_rows]) == truth, challenger.predict(X[test_rows]) == truth)
    verdict = decide(test, margin=0.0, alpha=0.05, min_rows=100)
    assert verdict.outcome == REJECT, verdict.reason
    # and the other way round the same data is decisive: the test can tell models apart
    reverse = mcnemar_exact(challenger.predict(X[test_rows]) == truth, champion.predict(X[test_rows]) == truth)
    assert decide(reverse, margin=0.05, alpha=0.05, min_rows=100).outcome == PROMOTE


@pytest.mark.parametrize("seed", range(5))
def test_a_regressor_trained_on_shuffled_targets_is_never_promoted(seed: int) -> None:
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(900, 4))
    y = X @ np.array([2.0, -1.0, 0.5, 0.0]) + rng.normal(0.0, 1.0, 900)
    champion = LinearRegression().fit(X[:600], y[:600])
    challenger = LinearRegression().fit(X[:600], rng.permutation(y[:600]))
    champion_loss = (champion.predict(X[600:]) - y[600:]) ** 2
    challenger_loss = (challenger.predict(X[600:]) - y[600:]) ** 2
    verdict = decide(paired_bootstrap(champion_loss, challenger_loss, seed=seed), margin=0.0, alpha=0.05, min_rows=100)
    assert verdict.outcome == REJECT, verdict.reason
    reverse = decide(paired_bootstrap(challenger_loss, champion_loss, seed=seed), margin=0.5, alpha=0.05, min_rows=100)
    assert reverse.outcome == PROMOTE, reverse.reason


def test_a_random_challenger_is_rejected_whatever_the_seed() -> None:
    # a challenger guessing at random against a 75%-accurate champion, 50 seeded draws: never promoted
    for seed in range(50):
        rng = np.random.default_rng(seed)
        champion = rng.random(400) < 0.75
        challenger = rng.random(400) < 0.5
        assert decide(mcnemar_exact(champion, challenger), margin=0.0, alpha=0.05, min_rows=100).outcome == REJECT


# -- margin and min_rows -----------------------------------------------------------------------------------
def significantly_better() -> PairedTest:
    """The challenger right on 60 more rows of 1000 than the champion: +0.06, p far below 0.05."""
    champion, challenger = paired_outcomes(b=20, c=80, both_right=800, both_wrong=100)
    test = mcnemar_exact(champion, challenger)
    assert test.difference == pytest.approx(0.06) and test.p_value < 1e-9
    return test


def test_the_margin_is_enforced() -> None:
    test = significantly_better()
    promoted = decide(test, margin=0.05, alpha=0.05, min_rows=500)
    assert promoted.outcome == PROMOTE and promoted.promoted
    assert "margin 0.05" in promoted.reason
    rejected = decide(test, margin=0.07, alpha=0.05, min_rows=500)
    assert rejected.outcome == REJECT and not rejected.promoted
    assert "below the margin 0.07" in rejected.reason and "not significant" not in rejected.reason


def test_min_rows_is_enforced() -> None:
    test = significantly_better()
    verdict = decide(test, margin=0.0, alpha=0.05, min_rows=1001)
    assert verdict.outcome == NOT_ENOUGH_DATA
    assert verdict.reason == "1000 paired rows, fewer than the 1001 required"
    assert decide(test, margin=0.0, alpha=0.05, min_rows=1000).outcome == PROMOTE


def test_significance_is_enforced_with_every_unmet_condition_named() -> None:
    # +0.04 observed on 50 rows (b=1, c=3): large enough for the margin, far from significant
    champion, challenger = paired_outcomes(b=1, c=3, both_right=40, both_wrong=6)
    verdict = decide(mcnemar_exact(champion, challenger), margin=0.01, alpha=0.05, min_rows=10)
    assert verdict.outcome == REJECT
    assert "not significant" in verdict.reason and "margin" not in verdict.reason
    both = decide(mcnemar_exact(champion, challenger), margin=0.1, alpha=0.05, min_rows=10)
    assert "below the margin 0.1" in both.reason and "not significant" in both.reason


def test_the_rule_refuses_nonsense_settings() -> None:
    test = significantly_better()
    with pytest.raises(ValueError, match="alpha"):
        decide(test, margin=0.0, alpha=5.0, min_rows=1)
    with pytest.raises(ValueError, match="margin"):
        decide(test, margin=-0.1, alpha=0.05, min_rows=1)


# -- rollback ----------------------------------------------------------------------------------------------
def test_a_significantly_worse_live_version_is_rolled_back() -> None:
    # champion = the previous version, challenger = the live one, which lost 6 points
    previous, live = paired_outcomes(b=80, c=20, both_right=800, both_wrong=100)
    test = mcnemar_exact(previous, live)
    verdict = significantly_worse(test, margin=0.02, alpha=0.05, min_rows=500)
    assert verdict.outcome == ROLLBACK and verdict.rollback, verdict.reason
    assert significantly_worse(test, margin=0.1, alpha=0.05, min_rows=500).outcome == KEEP
    assert significantly_worse(test, margin=0.0, alpha=0.05, min_rows=5000).outcome == NOT_ENOUGH_DATA
    # the same pair with the roles as in a promotion: the live version would not be promoted either
    assert decide(test, margin=0.0, alpha=0.05, min_rows=500).outcome == REJECT


def test_a_live_version_no_worse_is_kept() -> None:
    # equally good versions, 100 seeded draws at alpha 0.01: about one false rollback expected, and the
    # exact test is conservative; more than 4 would be a test that does not hold its level
    rollbacks = 0
    for seed in range(100):
        rng = np.random.default_rng(seed)
        previous = rng.random(500) < 0.8
        live = rng.random(500) < 0.8
        rollbacks += significantly_worse(mcnemar_exact(previous, live), margin=0.0, alpha=0.01, min_rows=100).rollback
    assert rollbacks <= 4
    # and a better live version is never rolled back
    previous, live = paired_outcomes(b=20, c=80, both_right=800, both_wrong=100)
    verdict = significantly_worse(mcnemar_exact(previous, live), margin=0.0, alpha=0.05, min_rows=1)
    assert verdict.outcome == KEEP and "not significant" in verdict.reason

"""Start simple, escalate only when it pays: a ladder of model families climbed in one retrain.

A model converted with `onnxgate convert ... --recipe sklearn --ladder logistic,gbm` keeps the ladder in
its training record (`options.ladder` in recipe.json). Every retrain starts again from the simplest
family: the candidate windows are trained with it, and on the window validation chose:

    rung 0 (the simplest) fitted on the window, scored on the validation slice
    its learning curve: the validation score when fitted on 1/4, 1/2 and all of the window's rows
      (seeded subsets); the curve has *flattened* when going from 1/2 to all the rows gains less than
      1 accuracy point (classifiers), or saves less than 2% of the mean squared error (regressors)
      (`options.ladder_flat` in recipe.json replaces the 0.01 / 0.02)
      -> still rising: more rows help this family more than a more complex one would; stop here
    rung 1 fitted on the same window and scored on the same rows; paired test (McNemar / paired
      bootstrap, learning/stats.py) against the family kept so far
      -> significantly better (one-sided p < alpha, the rule's alpha): kept, and its own curve decides
         whether rung 2 is tried
      -> otherwise: the simpler family stays (the simplest not significantly worse wins)

The family kept then goes through the usual promotion test against the champion on the test slice.
Every step (curve, scores, p-values, why it stopped) is a `candidates` entry with a "ladder" key in
the decision log, and the published version's record names its family (`options.family`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from onnxgate.learning.data import MIN_WINDOW_ROWS, Window
from onnxgate.learning.evaluate import CLASSIFICATION, compare

FLAT_ACCURACY = 0.01  # accuracy gained from 1/2 to all of the window's rows, below which the curve is flat
FLAT_RELATIVE_MSE = 0.02  # share of the mean squared error saved from 1/2 to all the rows, below which flat
CURVE_SHARES = (4, 2)  # the curve's points besides all the rows: 1/4 and 1/2 of them


@dataclass(frozen=True)
class Scored:
    """One fitted family on the validation slice: its score (higher is better) and answers, or an error."""

    score: float | None
    predicted: np.ndarray | None = None
    error: str | None = None


# (family, window, tag) -> the family fitted on the window, scored on the validation slice
Fit = Callable[[str, Window, str], Scored]


@dataclass(frozen=True)
class Climb:
    family: str  # the family kept
    steps: list[dict[str, Any]]  # one per rung tried, for the decision log
    summary: str  # in words, for the decision's reason


def subset(window: Window, share: int, seed: int) -> Window | None:
    """A seeded random 1/share of the window's rows (time order kept), or None when too few to fit."""
    n = len(window.y) // share
    if n < MIN_WINDOW_ROWS:
        return None
    keep = np.sort(np.random.default_rng(seed).permutation(len(window.y))[:n])
    y = window.y.iloc[keep].reset_index(drop=True)
    if y.nunique() < 2:
        return None
    weight = None if window.weight is None else window.weight[keep]
    return Window(f"{window.name} (1/{share})", window.X.iloc[keep].reset_index(drop=True), y, weight, n, 0)


def flattened(task: str, half: float | None, full: float, flat: float | None = None) -> tuple[bool, float | None]:
    """(has the curve flattened, the gain from 1/2 to all the rows in its unit). Scores are higher-better:
    accuracy, or -MSE. No 1/2 point (too few rows for a curve): not flat, a small window is for the
    simple family."""
    if half is None:
        return False, None
    if task == CLASSIFICATION:
        gain = full - half
        return gain < (FLAT_ACCURACY if flat is None else flat), gain
    mse_half, mse_full = -half, -full
    gain = (mse_half - mse_full) / mse_half if mse_half > 0 else 0.0
    return gain < (FLAT_RELATIVE_MSE if flat is None else flat), gain


def climb(
    ladder: list[str],
    task: str,
    window: Window,
    truth: np.ndarray,
    fit: Fit,
    *,
    alpha: float,
    seed: int = 0,
    flat: float | None = None,
    first: Scored | None = None,
) -> Climb:
    """Climb `ladder` (simplest first) on one window; `truth`: the validation slice's targets.
    `first`: rung 0 already fitted on the window (the window choice did it), else fitted here."""
    steps: list[dict[str, Any]] = []
    kept, kept_scored = ladder[0], first if first is not None else fit(ladder[0], window, "all")
    if kept_scored.score is None:
        steps.append({"ladder": kept, "rung": 0, "window": window.name, "score": None, "error": kept_scored.error})
        return Climb(kept, steps, f"ladder: {kept} could not be fitted ({kept_scored.error})")
    metric = "accuracy" if task == CLASSIFICATION else "-mse"
    step: dict[str, Any] = {
        "ladder": kept,
        "rung": 0,
        "window": window.name,
        "rows": len(window.y),
        "score": kept_scored.score,
        "metric": metric,
    }
    for rung in range(1, len(ladder) + 1):
        if rung == len(ladder):
            step["stop"] = "the top of the ladder"
            steps.append(step)
            return Climb(kept, steps, f"ladder: {kept}, the top of {'->'.join(ladder)}")
        # the family kept so far: its learning curve decides whether a more complex one is worth a try
        points: dict[str, float | None] = {}
        for share in CURVE_SHARES:
            part = subset(window, share, seed + share)
            points[f"1/{share}"] = None if part is None else fit(kept, part, f"1-{share}").score
        points["all"] = kept_scored.score
        assert kept_scored.score is not None
        flat_now, gain = flattened(task, points["1/2"], kept_scored.score, flat)
        step |= {"curve": points, "curve_gain": gain, "flattened": flat_now}
        if not flat_now:
            why = "too few rows for a curve" if gain is None else f"gains {gain:+.3g} from 1/2 to all rows"
            step["stop"] = f"learning curve still rising ({why}): more rows, not a more complex family"
            steps.append(step)
            return Climb(kept, steps, f"ladder: {kept}; its learning curve is still rising ({why})")
        steps.append(step)
        family = ladder[rung]
        tried = fit(family, window, "all")
        step = {"ladder": family, "rung": rung, "window": window.name, "rows": len(window.y), "metric": metric}
        step["score"] = tried.score
        if tried.score is None or tried.predicted is None or kept_scored.predicted is None:
            step |= {"error": tried.error, "stop": f"{family} could not be fitted: {kept} stays"}
            steps.append(step)
            return Climb(kept, steps, f"ladder: {kept}; {family} could not be fitted ({tried.error})")
        test = compare(task, kept_scored.predicted, tried.predicted, truth, seed=seed)
        better = test.difference > 0 and test.p_value < alpha
        step |= {"versus": kept, "difference": test.difference, "p_value": test.p_value, "kept": better}
        if not better:
            step["stop"] = f"not significantly better than {kept} (p = {test.p_value:.3g}, alpha {alpha:g})"
            steps.append(step)
            return Climb(
                kept,
                steps,
                f"ladder: {kept}; {family} was not significantly better on validation (p = {test.p_value:.3g})",
            )
        previous = kept
        kept, kept_scored = family, tried
        step["escalated_from"] = previous
    raise AssertionError("unreachable: the loop returns at the top of the ladder")

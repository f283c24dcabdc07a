"""Where the labelled stream changed: the newest change in the served version's per-row loss, by time.

    losses = row_losses(task, predicted, truth)     # 0/1 for classifiers, squared error scaled to [0, 1]
    change = newest_change(losses)                  # None, or the first row of the newest regime

A retrain after a change must learn from the rows after it and be judged on them: a window chosen on a
validation slice that still holds the old concept picks the old concept (the loop then served coin-flip
accuracy for ~1,200 labels after an abrupt change, where a refit on the new rows matched an oracle).

The test is ADWIN's (Bifet and Gavaldà, "Learning from time-changing data with adaptive windowing", 2007):
every split of the window into an older and a newer part is a candidate, and a split is a change when
the two means differ by more than a bound that holds for all splits at once with probability 1 - delta:

    eps_cut = sqrt(2 / m * var * ln(2 / delta')) + 2 / (3 m) * ln(2 / delta'),   m = 1 / (1/n0 + 1/n1),
    delta' = delta / n

As ADWIN does, the window then drops the part before the split and is tested again, until no split is a
change: what is left is the newest regime, and its first row is the change point. Gradual changes end
somewhere in the transition; a concept that comes back (A -> B -> A) ends at the return.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

# the chance, over the whole window, of calling a change where there is none: small, because each false
# alarm throws old rows away for the next retrain
DEFAULT_DELTA = 0.002
MIN_SIDE = 10  # rows each side of a split at least (the bound makes small sides rare anyway)


@dataclass(frozen=True)
class Change:
    """The newest change: `index` is the first row after it; means and counts are of the last cut made."""

    index: int
    before: float  # mean loss of the rows just before the change (the part cut away last)
    after: float  # mean loss since the change
    n_before: int
    n_after: int
    bound: float  # eps_cut at that split
    delta: float

    def as_dict(self) -> dict[str, Any]:
        return {k: round(v, 6) if isinstance(v, float) else v for k, v in asdict(self).items()}

    def describe(self) -> str:
        return (
            f"a change at labelled row {self.index}: mean loss {self.before:.3f} over {self.n_before} rows before,"
            f" {self.after:.3f} over {self.n_after} since (|difference| > {self.bound:.3f}, delta {self.delta:g})"
        )


def row_losses(task: str, predicted: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Per-row loss in [0, 1]: wrong (1) or right (0) for classifiers; for regressors the squared error
    divided by its 99th percentile and clipped, so one outlier does not hide a shift of the mean."""
    from onnxgate.learning.evaluate import CLASSIFICATION, same_label

    if task == CLASSIFICATION:
        return 1.0 - same_label(predicted, truth).astype(np.float64)
    error = (np.asarray(predicted, np.float64) - np.asarray(truth, np.float64)) ** 2
    if not len(error):
        return error
    scale = float(np.quantile(error, 0.99))
    return np.clip(error / scale, 0.0, 1.0) if scale > 0 else np.zeros_like(error)


def newest_change(losses: np.ndarray, *, delta: float = DEFAULT_DELTA, min_side: int = MIN_SIDE) -> Change | None:
    """The first row of the newest regime of `losses` (oldest first), or None when no split is a change."""
    x = np.asarray(losses, dtype=np.float64)
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must be between 0 and 1, got {delta}")
    start, found = 0, None
    while True:
        cut = _strongest_split(x[start:], delta, min_side)
        if cut is None:
            return found
        k, before, after, bound = cut
        found = Change(start + k, before, after, k, len(x) - start - k, bound, delta)
        start += k


def _strongest_split(x: np.ndarray, delta: float, min_side: int) -> tuple[int, float, float, float] | None:
    """The split whose difference of means exceeds its bound by the largest factor, or None."""
    n = len(x)
    if n < 2 * min_side:
        return None
    total = np.cumsum(x)
    k = np.arange(min_side, n - min_side + 1)
    n0, n1 = k.astype(np.float64), (n - k).astype(np.float64)
    mean0 = total[k - 1] / n0
    mean1 = (total[-1] - total[k - 1]) / n1
    m = 1.0 / (1.0 / n0 + 1.0 / n1)
    log_term = math.log(2.0 / (delta / n))
    variance = float(np.var(x))
    bound = np.sqrt(2.0 / m * variance * log_term) + 2.0 / (3.0 * m) * log_term
    ratio = np.abs(mean0 - mean1) / bound
    best = int(np.argmax(ratio))
    if ratio[best] <= 1.0:
        return None
    return int(k[best]), float(mean0[best]), float(mean1[best]), float(bound[best])

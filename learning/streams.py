"""Seeded streams with a known change, for measuring the learning loop (bench/learning.py).

Four standard-normal features x0..x3; two concepts, A (what the served model was trained on) and B:

    classifier   y = 1[x·w > 0], flipped with probability LABEL_NOISE      w_A = (1, 1, 0, 0)
    regressor    y = x·w + N(0, SIGMA²)                                    w_B = (1, -1, 0.5, 0)

A stream of `length` labels, the change at label `change`:

    abrupt       A, then B
    gradual      A, then each row is B with a probability rising linearly from 0 to 1 over `span` labels
    recurring    A, then B, then A again from label `back`
    covariate    the inputs move (x0 + 1, x2 + 2) at the change; the concept stays A
    none         A throughout
    noise        from the change on, labels independent of the inputs (a fair coin; a normal draw with
                 the variance of A's target)

Because the conditional distribution of the label is known at every position, a version's quality can
be computed without the noise of sampled labels: `expected_quality` (accuracy, or R² against the variance
of A's target, both in points: 0-100) scores predictions against P(y | x), not against the labels drawn.
`Oracle` is the reference a loop is measured against: the same estimator refitted on every row of the
current concept, knowing where it began.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

FEATURES = ["x0", "x1", "x2", "x3"]
SCENARIOS = ("abrupt", "gradual", "recurring", "covariate", "none", "noise")
TASKS = ("classifier", "regressor")
W_A = np.array([1.0, 1.0, 0.0, 0.0])
W_B = np.array([1.0, -1.0, 0.5, 0.0])
LABEL_NOISE = 0.05
SIGMA = 0.5
VAR_A = float(W_A @ W_A + SIGMA**2)  # the variance of A's target: R² is measured against it
SHIFT = np.array([1.0, 0.0, 2.0, 0.0])  # the covariate scenario's move of the inputs' means


@dataclass(frozen=True)
class Stream:
    task: str
    scenario: str
    length: int
    change: int
    span: int = 0  # gradual: labels over which B's share rises from 0 to 1
    back: int = 0  # recurring: where A returns
    seed: int = 0

    def __post_init__(self) -> None:
        if self.task not in TASKS or self.scenario not in SCENARIOS:
            raise ValueError(f"task {self.task!r} / scenario {self.scenario!r}: use {TASKS} / {SCENARIOS}")

    def concept_changes(self) -> list[int]:
        """Where the relation between inputs and labels changes (a covariate shift is not one)."""
        if self.scenario in ("abrupt", "gradual", "noise"):
            return [self.change]
        if self.scenario == "recurring":
            return [self.change, self.back]
        return []

    def share_b(self, at: np.ndarray) -> np.ndarray:
        """The probability that a row at label position `at` follows concept B."""
        at = np.asarray(at, dtype=np.float64)
        if self.scenario == "abrupt":
            return (at >= self.change).astype(np.float64)
        if self.scenario == "gradual":
            return np.clip((at - self.change + 1) / max(self.span, 1), 0.0, 1.0)
        if self.scenario == "recurring":
            return ((at >= self.change) & (at < self.back)).astype(np.float64)
        return np.zeros_like(at)

    def noise(self, at: np.ndarray) -> np.ndarray:
        return np.asarray(at) >= self.change if self.scenario == "noise" else np.zeros(np.shape(at), bool)

    def inputs(self, at: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        x = rng.standard_normal((len(at), len(FEATURES)))
        if self.scenario == "covariate":
            x += np.outer(np.asarray(at) >= self.change, SHIFT)
        return x

    def truth(self, x: np.ndarray, at: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The label's conditional distribution per row: (P(y = 1 | x), its variance) for the classifier,
        (E[y | x], Var[y | x]) for the regressor."""
        m = self.share_b(at)
        noise = self.noise(at)
        if self.task == "classifier":
            p_a = np.where(x @ W_A > 0, 1 - LABEL_NOISE, LABEL_NOISE)
            p_b = np.where(x @ W_B > 0, 1 - LABEL_NOISE, LABEL_NOISE)
            p = np.where(noise, 0.5, (1 - m) * p_a + m * p_b)
            return p, p * (1 - p)
        f_a, f_b = x @ W_A, x @ W_B
        mean = np.where(noise, 0.0, (1 - m) * f_a + m * f_b)
        var = np.where(noise, VAR_A, SIGMA**2 + m * (1 - m) * (f_a - f_b) ** 2)
        return mean, var

    def labels(self, x: np.ndarray, at: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        mean, var = self.truth(x, at)
        if self.task == "classifier":
            return (rng.random(len(x)) < mean).astype(np.int64)
        return np.asarray(mean + np.sqrt(var) * rng.standard_normal(len(x)))

    def frame(self, at: np.ndarray, rng: np.random.Generator) -> pd.DataFrame:
        x = self.inputs(at, rng)
        out = pd.DataFrame(x, columns=FEATURES)
        out["y"] = self.labels(x, at, rng)
        return out

    def base(self, rows: int, rng: np.random.Generator) -> pd.DataFrame:
        """The served model's training data: concept A on the unshifted inputs."""
        return Stream(self.task, "none", rows, rows).frame(np.zeros(rows, np.int64), rng)

    def quality(self, predicted: np.ndarray, x: np.ndarray, at: np.ndarray) -> float:
        return expected_quality(self.task, predicted, *self.truth(x, at))


def expected_quality(task: str, predicted: np.ndarray, mean: np.ndarray, var: np.ndarray) -> float:
    """Accuracy against P(y = 1 | x), or R² against Var(A's target), in points (0-100)."""
    predicted = np.asarray(predicted, dtype=np.float64).reshape(-1)
    if task == "classifier":
        return float(100 * np.mean(np.where(predicted == 1, mean, 1 - mean)))
    return float(100 * (1 - np.mean((predicted - mean) ** 2 + var) / VAR_A))


def measured_quality(task: str, predicted: np.ndarray, y: np.ndarray) -> float:
    """The same on the labels actually drawn (what a client would see)."""
    predicted = np.asarray(predicted, dtype=np.float64).reshape(-1)
    y = np.asarray(y, dtype=np.float64)
    if task == "classifier":
        return float(100 * np.mean(predicted == y))
    return float(100 * (1 - np.mean((predicted - y) ** 2) / VAR_A))


def estimator(task: str) -> Any:
    """The served model's estimator (and the oracle's): plain scikit-learn, the `sklearn` recipe refits it."""
    from sklearn.linear_model import LinearRegression, LogisticRegression

    return LogisticRegression() if task == "classifier" else LinearRegression()


@dataclass
class Oracle:
    """The same estimator refitted, after every block, on every labelled row of the current concept: the
    base data and the stream while there was no change, the rows since the latest change after one (it
    knows where each change is). Before `min_rows` rows of a new concept it keeps its previous model."""

    stream: Stream
    base: pd.DataFrame
    min_rows: int = 20
    model: Any = None
    rows: list[pd.DataFrame] = field(default_factory=list)
    since: int = 0  # position of the latest change seen

    def __post_init__(self) -> None:
        self.model = estimator(self.stream.task).fit(self.base[FEATURES], self.base["y"])
        self.rows = [self.base.assign(at=-1)]

    def predict(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(self.model.predict(pd.DataFrame(x, columns=FEATURES)))

    def learn(self, frame: pd.DataFrame, at: np.ndarray) -> None:
        """Rows with their labels and positions, in stream order; refit on the current concept's."""
        latest = max((c for c in self.stream.concept_changes() if c <= int(at[-1])), default=None)
        if latest is not None and latest != self.since:
            self.since = latest
            self.rows = []
        self.rows.append(frame.assign(at=at))
        data = pd.concat(self.rows, ignore_index=True)
        if latest is not None:
            data = data[data["at"] >= latest]
        if len(data) < self.min_rows or (self.stream.task == "classifier" and data["y"].nunique() < 2):
            return
        self.model = estimator(self.stream.task).fit(data[FEATURES], data["y"])


def labels_until_within(
    curve: list[float], reference: list[float], start: int, end: int, block: int, points: float = 3.0, run: int = 3
) -> int | None:
    """Labels after block `start` until `curve` is within `points` of `reference` (at least
    reference - points) for `run` blocks in a row (or to `end`); None when it never is in [start, end)."""
    for k in range(start, end):
        window = range(k, min(k + run, end))
        if all(curve[j] >= reference[j] - points for j in window):
            return (k - start) * block
    return None


def backoff_schedule(length: int, block: int, labels_needed: int, backoff_after: int) -> list[int]:
    """Label counts at which the label trigger retrains when every challenger is rejected (ticks at block
    ends): N, 2N, 3N, then N doubles after each `backoff_after` rejections in a row."""
    out, last, needed, rejected = [], 0, labels_needed, 0
    for labels in range(block, length + 1, block):
        if labels - last >= needed:
            out.append(labels)
            last, rejected = labels, rejected + 1
            if rejected >= backoff_after:
                needed, rejected = needed * 2, 0
    return out

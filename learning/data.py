"""Training rows for a retrain: the model's joined feedback as training columns, split by time.

    labelled = feedback_rows(log, "iris", record)        # the dataset export's join (DuckDB), as rows
    split = time_split(labelled)                         # oldest -> train, then validation, newest -> test
    for window in candidate_windows(record, split.train) # base + feedback, feedback only, recency-weighted

The test slice is the most recent labelled traffic: what the next version will meet first. It is never
trained on and never used to choose between candidates (the validation slice before it is).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from onnxgate.learning.training import TrainingRecord
from onnxgate.server.logfiles import LogFiles
from onnxgate.server.logquery import export_table


class NotEnoughData(Exception):
    """Too few labelled rows to train and test a challenger; the message says how many and how many more."""


@dataclass
class Labelled:
    """Rows with ground truth, in time order: features as the training data's columns, the target."""

    X: pd.DataFrame
    y: pd.Series
    at: np.ndarray  # prediction time (datetime64[us])
    version: np.ndarray  # the version that made the prediction

    def __len__(self) -> int:
        return len(self.y)

    def rows(self, index: slice | np.ndarray) -> Labelled:
        return Labelled(
            self.X.iloc[index].reset_index(drop=True),
            self.y.iloc[index].reset_index(drop=True),
            self.at[index],
            self.version[index],
        )


def feedback_rows(log: LogFiles, model: str, record: TrainingRecord) -> Labelled:
    """The model's predictions that have ground truth, mapped back to training rows, oldest first."""
    table = export_table(log, model).to_pandas()
    truth = "truth_value" if record.task == "regression" else "truth_label"
    if table.empty or truth not in table:
        return _empty(record)
    table = table[table[truth].notna()].reset_index(drop=True)
    X = pd.DataFrame(
        {
            column: _feature(table, name, i)
            for name, columns in record.columns.items()
            for i, column in enumerate(columns)
        }
    )
    y = _as_target(table[truth], record)
    keep = X.notna().all(axis=1).to_numpy() & y.notna().to_numpy()
    at = table["predicted_at"].to_numpy(dtype="datetime64[us]")
    order = np.argsort(at[keep], kind="stable")
    return Labelled(
        X[keep].iloc[order].reset_index(drop=True),
        y[keep].iloc[order].reset_index(drop=True),
        at[keep][order],
        table["version"].to_numpy()[keep][order],
    )


def _feature(table: pd.DataFrame, name: str, index: int) -> pd.Series:
    """Column `index` of model input `name` in the export (one column `<name>` or `<name>_<i>` per element)."""
    column = f"{name}_{index}" if f"{name}_{index}" in table else name
    values = table[column]
    if values.dtype == object:  # a list per row (a string tensor) or a decoded scalar
        values = values.map(lambda v: _scalar(v, index if column == name else 0))
    return values.reset_index(drop=True)


def _scalar(value: Any, index: int) -> Any:
    if isinstance(value, list | tuple | np.ndarray):
        value = value[index] if len(value) > index else None
    return value.decode() if isinstance(value, bytes) else value


def _as_target(values: pd.Series, record: TrainingRecord) -> pd.Series:
    """Ground truth (a label string or a value) in the base data's target dtype."""
    kind = record.target_dtype.kind
    if kind in "fiub":
        numeric = pd.to_numeric(values, errors="coerce")
        return numeric.astype(np.float64 if kind == "f" or numeric.isna().any() else record.target_dtype)
    return values.astype(str)


def _empty(record: TrainingRecord) -> Labelled:
    columns = [c for cs in record.columns.values() for c in cs]
    return Labelled(
        pd.DataFrame(columns=columns), pd.Series([], dtype=object), np.array([], "datetime64[us]"), np.array([])
    )


@dataclass
class Split:
    train: Labelled
    validation: Labelled
    test: Labelled


def time_split(
    rows: Labelled,
    *,
    test_fraction: float = 0.25,
    validation_fraction: float = 0.25,
    min_rows: int = 100,
    max_held_out: int = 1000,
) -> Split:
    """Oldest rows to train, then validation, the newest to test; refused below `min_rows` labelled rows.
    Each held-out slice is at most `max_held_out` rows: with a long history, a fraction of it would reach
    back past a recent change, and the decision is about what the model meets now."""
    n = len(rows)
    if n < min_rows:
        raise NotEnoughData(
            f"{n} labelled rows in the prediction log, {min_rows} needed to train and test a challenger "
            f"({min_rows - n} more; set --min-rows to change)"
        )
    n_test = min(max(1, round(n * test_fraction)), max_held_out)
    n_validation = min(max(1, round(n * validation_fraction)), max_held_out)
    cut_validation, cut_test = n - n_test - n_validation, n - n_test
    return Split(
        rows.rows(slice(0, cut_validation)), rows.rows(slice(cut_validation, cut_test)), rows.rows(slice(cut_test, n))
    )


MIN_WINDOW_ROWS = 50  # fewer rows do not make a model worth converting and comparing
# ... except the rows since a detected change: the only rows of the concept the model meets now, and a
# model of them beats one of the old concept (the validation slice, also since the change, decides)
MIN_CHANGE_WINDOW_ROWS = 30


@dataclass
class Window:
    """One candidate training set: a name for the decision log, rows, and optional sample weights."""

    name: str
    X: pd.DataFrame
    y: pd.Series
    weight: np.ndarray | None
    feedback_rows: int
    base_rows: int


def candidate_windows(
    record: TrainingRecord, feedback: Labelled, *, since: int | None = None, half_life_fraction: float = 0.25
) -> list[Window]:
    """base + feedback; feedback only; the rows since a detected change (row `since` on: learning/change.py);
    the newest half, quarter and eighth of the feedback (each when it holds MIN_WINDOW_ROWS rows and two
    classes or values to fit); base + feedback with weights halving every `half_life_fraction` of the
    feedback's time span into the past (base rows weigh as the oldest feedback)."""
    base_X, base_y = record.base_data()
    both_X = pd.concat([base_X, feedback.X], ignore_index=True)
    both_y = pd.concat([base_y.astype(feedback.y.dtype) if len(feedback) else base_y, feedback.y], ignore_index=True)
    windows = [Window("base+feedback", both_X, both_y, None, len(feedback), len(base_y))]
    if len(feedback) and feedback.y.nunique() >= 2:
        windows.append(Window("feedback", feedback.X, feedback.y, None, len(feedback), 0))
    if since is not None and 0 < since < len(feedback):
        recent = feedback.rows(slice(since, len(feedback)))
        if len(recent) >= MIN_CHANGE_WINDOW_ROWS and recent.y.nunique() >= 2:
            windows.append(Window("since the change", recent.X, recent.y, None, len(recent), 0))
    for share in (2, 4, 8):  # after an abrupt change only the newest rows hold the new concept: how many,
        newest = feedback.rows(slice(len(feedback) - len(feedback) // share, len(feedback)))  # validation says
        if len(newest) >= MIN_WINDOW_ROWS and newest.y.nunique() >= 2:
            windows.append(Window(f"newest 1/{share} of feedback", newest.X, newest.y, None, len(newest), 0))
    if len(feedback) >= 2:
        age = (feedback.at.max() - feedback.at).astype("timedelta64[us]").astype(np.float64)
        span = max(float(age.max()), 1.0)
        recent = 0.5 ** (age / (span * half_life_fraction))
        weight = np.concatenate([np.full(len(base_y), recent.min()), recent])
        windows.append(Window("recency-weighted", both_X, both_y, weight / weight.mean(), len(feedback), len(base_y)))
    return windows


def concat(a: Labelled, b: Labelled) -> Labelled:
    return Labelled(
        pd.concat([a.X, b.X], ignore_index=True),
        pd.concat([a.y, b.y], ignore_index=True),
        np.concatenate([a.at, b.at]),
        np.concatenate([a.version, b.version]),
    )

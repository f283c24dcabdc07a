"""Drift without labels: the live inputs of a model, read from the prediction log, against its training data.

    live = live_features(LogFiles.at(log_dir), "iris", "3", since_s=time.time() - 3600, max_rows=10_000,
                         columns={"x": ["sepal_length", "sepal_width", "petal_length", "petal_width"]})
    drift = feature_drift(reference, live)            # {feature: FeatureDrift}
    collector.update("iris", "3", drift)             # onnxgate_drift_* on the registry it is registered on

Per feature, numeric: the population stability index over 10 quantile bins of the reference, and the
two-sample Kolmogorov-Smirnov statistic; categorical (strings, bytes, booleans, or named in
`categorical`): PSI over the categories and Pearson's chi-square test of homogeneity. PSI reads the same
for both kinds (< 0.1: stable, 0.1-0.2: moving, > 0.2: shifted, the usual rule of thumb); the tests'
p-values become tiny at large sample sizes even for harmless shifts, so thresholds belong on PSI or the
statistic, and the p-value is reported for reading.
"""

from __future__ import annotations

import heapq
import io
import math
import threading
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Final, Literal

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from scipy import stats as sps

from onnxgate.learning.training import TrainingRecord
from onnxgate.server.logfiles import LogFiles, Segment
from onnxgate.server.predlog import INPUT_PREFIX, PREDICTIONS, SHAPE_SUFFIX
from onnxgate.server.segments import SkipList

NUMERIC: Final = "numeric"
CATEGORICAL: Final = "categorical"
KS: Final = "ks"
CHI2: Final = "chi2"
PSI_BINS = 10
# Floor of a bin's share before the log in PSI: an empty bin on one side would make it infinite; 1e-4 is
# the customary value (small against any share a 10-bin histogram of a real sample has).
PSI_EPSILON = 1e-4
REFERENCE_FILE = "drift_reference.parquet"
REFERENCE_ROWS = 10_000  # PSI over 10 bins and the KS statistic are steady long before this


@dataclass(frozen=True)
class FeatureDrift:
    """One feature's drift: `kind` "numeric" (test "ks") or "categorical" (test "chi2"); `psi`; the test's
    `statistic` and `p_value`; the non-missing values compared on each side. NaN numbers: a side had no
    values."""

    kind: Literal["numeric", "categorical"]
    test: Literal["ks", "chi2"]
    psi: float
    statistic: float
    p_value: float
    n_reference: int
    n_live: int

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready (NaN as None)."""
        return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in asdict(self).items()}


def feature_drift(
    reference: pd.DataFrame, live: pd.DataFrame, categorical: set[str] | None = None
) -> dict[str, FeatureDrift]:
    """Drift of every reference column that `live` has too (a target column, or an input the log does not
    keep, is left out). A column is categorical when named in `categorical` or when its values are not
    numbers (strings, bytes, booleans, pandas categories); missing values are left out on both sides."""
    named = categorical or set()
    out: dict[str, FeatureDrift] = {}
    for feature in reference.columns:
        if feature not in live.columns:
            continue
        ref, cur = reference[feature], live[feature]
        if feature in named or _is_categorical(ref) or _is_categorical(cur):
            out[str(feature)] = categorical_drift(ref, cur)
        else:
            out[str(feature)] = numeric_drift(ref, cur)
    return out


def numeric_drift(reference: pd.Series | np.ndarray, live: pd.Series | np.ndarray) -> FeatureDrift:
    """PSI over the reference's deciles (outer bins open-ended, so live values beyond the reference's range
    count) and the two-sample KS test."""
    ref = _finite_values(reference)
    cur = _finite_values(live)
    if ref.size == 0 or cur.size == 0:
        return FeatureDrift(NUMERIC, KS, math.nan, math.nan, math.nan, int(ref.size), int(cur.size))
    # Inner edges only: (-inf, q10], (q10, q20], ..., (q90, inf). Repeated quantiles (a discrete feature)
    # collapse into one edge, so a value that dominates the reference gets one bin, not several empty ones.
    edges = np.unique(np.quantile(ref, np.linspace(0.0, 1.0, PSI_BINS + 1)[1:-1]))
    bins = edges.size + 1
    ref_counts = np.bincount(np.searchsorted(edges, ref, side="left"), minlength=bins)
    cur_counts = np.bincount(np.searchsorted(edges, cur, side="left"), minlength=bins)
    ks = sps.ks_2samp(ref, cur)
    return FeatureDrift(
        NUMERIC, KS, _psi(ref_counts, cur_counts), float(ks.statistic), float(ks.pvalue), int(ref.size), int(cur.size)
    )


def categorical_drift(reference: pd.Series | np.ndarray, live: pd.Series | np.ndarray) -> FeatureDrift:
    """PSI over the categories of either side (a category new in live counts as a shift) and Pearson's
    chi-square test of homogeneity on the 2 x categories table of counts."""
    ref = _category_values(reference)
    cur = _category_values(live)
    if ref.size == 0 or cur.size == 0:
        return FeatureDrift(CATEGORICAL, CHI2, math.nan, math.nan, math.nan, int(ref.size), int(cur.size))
    categories, codes = np.unique(np.concatenate([ref, cur]), return_inverse=True)
    ref_counts = np.bincount(codes[: ref.size], minlength=categories.size)
    cur_counts = np.bincount(codes[ref.size :], minlength=categories.size)
    if categories.size < 2:
        statistic, p_value = 0.0, 1.0  # one category on both sides: nothing can differ
    else:
        # Every category has a count on some side, so no expected frequency is 0. No Yates correction: the
        # plain Pearson statistic, the same formula whatever the number of categories.
        result = sps.chi2_contingency(np.vstack([ref_counts, cur_counts]), correction=False)
        statistic, p_value = float(result.statistic), float(result.pvalue)
    return FeatureDrift(
        CATEGORICAL, CHI2, _psi(ref_counts, cur_counts), statistic, p_value, int(ref.size), int(cur.size)
    )


def live_features(
    log: LogFiles,
    model: str,
    version: str | None,
    *,
    since_s: float | None,
    max_rows: int,
    columns: dict[str, list[str]] | None = None,
    skipped: SkipList | None = None,
) -> pd.DataFrame:
    """The newest logged inputs of `model` (of `version`, or of every version when None), logged at or after
    `since_s` (Unix time in seconds; None: any time), as feature columns, at most `max_rows` rows, oldest
    first.

    Each logged request becomes one row per element of its batch dimension (the first; a tensor without
    dimensions is one row): an input of shape [1, k] gives k columns, `<input>_0 .. <input>_{k-1}`, or
    `<input>` when k is 1 (the names of `onnxgate dataset export`), or the names `columns[<input>]` gives
    (the training record's mapping; its length must be k). String (BYTES) inputs are decoded to str.
    Rows lacking an input, whose inputs disagree on the batch size, or whose row width differs from the
    newest row's (another version's shape) are left out.

    Bounded: segments are read newest first (per replica by sequence number, replicas merged by the newest
    `ts` in each rolled segment's footer) and reading stops once `max_rows` rows are held and no unread
    segment can hold a newer one. Unreadable segments are skipped (and added to `skipped`).
    """
    if max_rows < 1:
        raise ValueError(f"max_rows must be at least 1, got {max_rows}")
    since_us = None if since_s is None else math.floor(since_s * 1_000_000)
    table = _newest_rows(log, model, version, since_us, max_rows, skipped)
    if table is None or table.num_rows == 0:
        return pd.DataFrame()
    return _flatten(table, max_rows, columns or {})


def reference_files(
    X: pd.DataFrame, weight: np.ndarray | None = None, *, max_rows: int = REFERENCE_ROWS, seed: int = 0
) -> dict[str, bytes]:
    """The drift reference of a version trained on the rows X (with sample weights `weight`), as the
    extra file of its publish: {REFERENCE_FILE: Parquet bytes}. At most `max_rows` rows, a seeded sample;
    with weights, drawn with replacement in proportion to them, so that it looks like what the model
    learnt (a recency-weighted window's old rows count as little as they weighed)."""
    n = len(X)
    rng = np.random.default_rng(seed)
    w = None if weight is None else np.clip(np.asarray(weight, dtype=np.float64), 0.0, None)
    if w is not None and n and w.sum() > 0:  # weighted: rows drawn by weight (with replacement)
        rows = np.sort(rng.choice(n, size=min(n, max_rows), replace=True, p=w / w.sum()))
    elif n > max_rows:
        rows = np.sort(rng.choice(n, size=max_rows, replace=False))
    else:
        rows = np.arange(n)
    sample = X.iloc[rows].reset_index(drop=True)
    buffer = io.BytesIO()
    sample.to_parquet(buffer, index=False)
    return {REFERENCE_FILE: buffer.getvalue()}


def reference_of(version_dir: Path, record: TrainingRecord) -> pd.DataFrame:
    """The rows a version's live inputs are compared with: its drift reference when it keeps one, else
    its training record's base data (the model's training columns, as the log's rows are named)."""
    path = Path(version_dir) / REFERENCE_FILE
    if path.is_file():
        return record.features(pd.read_parquet(path))
    base_X, _ = record.base_data()
    return base_X


class DriftCollector(Collector):
    """`onnxgate_drift_psi{model,version,feature}`, `onnxgate_drift_statistic{model,version,feature,test}` and
    `onnxgate_drift_p_value{model,version,feature,test}` from the latest values given to `update`, read at
    scrape time. No global state: register it on the registry of the process that computes drift.
    NaN values (a side without data) are not exported."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._latest: dict[tuple[str, str], dict[str, FeatureDrift]] = {}

    def update(self, model: str, version: str, drift: Mapping[str, FeatureDrift]) -> None:
        """Replace the values of (model, version): features no longer computed stop being exported."""
        with self._lock:
            self._latest[(model, version)] = dict(drift)

    def forget(self, model: str, version: str | None = None) -> None:
        """Stop exporting a version (a version retired), or every version of a model (None)."""
        with self._lock:
            for key in [k for k in self._latest if k[0] == model and (version is None or k[1] == version)]:
                del self._latest[key]

    def keep_only(self, model: str, version: str) -> None:
        """Stop exporting every version of `model` but `version` (the others were retired)."""
        with self._lock:
            for key in [k for k in self._latest if k[0] == model and k[1] != version]:
                del self._latest[key]

    def keep_models(self, models: set[str]) -> None:
        """Stop exporting the models not in `models` (gone from the repository)."""
        with self._lock:
            for key in [k for k in self._latest if k[0] not in models]:
                del self._latest[key]

    def collect(self) -> Iterator[Metric]:
        psi = GaugeMetricFamily(
            "onnxgate_drift_psi",
            "Population stability index of a feature's live inputs against the training reference",
            labels=["model", "version", "feature"],
        )
        statistic = GaugeMetricFamily(
            "onnxgate_drift_statistic",
            "Drift test statistic of a feature (test: ks for numeric, chi2 for categorical)",
            labels=["model", "version", "feature", "test"],
        )
        p_value = GaugeMetricFamily(
            "onnxgate_drift_p_value",
            "P-value of the drift test of a feature (test: ks for numeric, chi2 for categorical)",
            labels=["model", "version", "feature", "test"],
        )
        with self._lock:
            latest = [(key, dict(values)) for key, values in self._latest.items()]
        for (model, version), features in sorted(latest):
            for feature, d in sorted(features.items()):
                if not math.isnan(d.psi):
                    psi.add_metric([model, version, feature], d.psi)
                if not math.isnan(d.statistic):
                    statistic.add_metric([model, version, feature, d.test], d.statistic)
                if not math.isnan(d.p_value):
                    p_value.add_metric([model, version, feature, d.test], d.p_value)
        yield psi
        yield statistic
        yield p_value


# -- the statistics --------------------------------------------------------------------------------------
def _psi(ref_counts: np.ndarray, cur_counts: np.ndarray) -> float:
    ref = np.maximum(ref_counts / ref_counts.sum(), PSI_EPSILON)
    cur = np.maximum(cur_counts / cur_counts.sum(), PSI_EPSILON)
    return float(np.sum((cur - ref) * np.log(cur / ref)))


def _is_categorical(values: pd.Series) -> bool:
    return not pd.api.types.is_numeric_dtype(values.dtype) or pd.api.types.is_bool_dtype(values.dtype)


def _finite_values(values: pd.Series | np.ndarray) -> np.ndarray:
    array = np.asarray(pd.to_numeric(pd.Series(values)).to_numpy(dtype=np.float64, na_value=np.nan))
    finite: np.ndarray = array[np.isfinite(array)]
    return finite


def _category_values(values: pd.Series | np.ndarray) -> np.ndarray:
    """Non-missing values as str (bytes decoded), so that b"red", "red" and a category "red" are one."""
    series = pd.Series(values).dropna()
    return np.array([v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in series], dtype=str)


# -- reading the log -------------------------------------------------------------------------------------
def _newest_rows(
    log: LogFiles, model: str, version: str | None, since_us: int | None, max_rows: int, skipped: SkipList | None
) -> pa.Table | None:
    """The logged rows of the model (ts and input columns) newest first: at least the newest `max_rows` of
    them when there are that many, from as few segments as that takes."""
    per_replica: dict[str, list[Segment]] = {}
    for segment in log.segments(PREDICTIONS, models={model}, skipped=skipped):
        per_replica.setdefault(segment.replica, []).append(segment)
    queues = [sorted(s, key=lambda seg: seg.seq, reverse=True) for s in per_replica.values()]
    # A heap of each replica's newest unread segment, by the newest `ts` it can hold (an open segment or a
    # footer without statistics: unknown, so first). Within a replica a later sequence number holds later
    # rows, so a replica's head bounds everything the replica has left.
    heap: list[tuple[float, int, int]] = []

    def push(replica: int, position: int) -> None:
        if position >= len(queues[replica]):
            return
        newest = log.newest_ts(queues[replica][position])
        bound = math.inf if newest is None else float(newest)
        if since_us is not None and bound < since_us:
            return  # this segment and the replica's older ones hold nothing recent enough
        heapq.heappush(heap, (-bound, replica, position))

    for replica in range(len(queues)):
        push(replica, 0)
    tables: list[pa.Table] = []
    held: list[np.ndarray] = []  # the ts of the rows held, to know the max_rows-th newest
    while heap:
        negative_bound, replica, position = heapq.heappop(heap)
        if held and sum(a.size for a in held) >= max_rows:
            stamps = np.concatenate(held)
            cutoff = np.partition(stamps, stamps.size - max_rows)[stamps.size - max_rows]
            if -negative_bound < cutoff:
                break  # no unread segment can hold a row newer than the newest max_rows held
        push(replica, position + 1)
        table = log.read(queues[replica][position], skipped)
        if table is None or table.num_rows == 0:
            continue
        table = _select(table, version, since_us)
        if table.num_rows:
            tables.append(table)
            held.append(_micros(table["ts"]))
    if not tables:
        return None
    rows = pa.concat_tables(tables, promote_options="permissive")
    newest_first = pc.sort_indices(rows, [("ts", "descending")])
    return rows.take(newest_first)


def _select(table: pa.Table, version: str | None, since_us: int | None) -> pa.Table:
    keep = [c for c in table.column_names if c == "ts" or c.startswith(INPUT_PREFIX)]
    mask = None
    if version is not None:
        mask = pc.equal(table["version"], version)
    if since_us is not None:
        recent = pc.greater_equal(_micros_array(table["ts"]), pa.scalar(since_us, pa.int64()))
        mask = recent if mask is None else pc.and_(mask, recent)
    selected = table.select(keep)
    return selected if mask is None else selected.filter(pc.fill_null(mask, False))


def _micros_array(ts: pa.ChunkedArray) -> pa.ChunkedArray:
    return pc.cast(pc.cast(ts, pa.timestamp("us", tz="UTC")), pa.int64())


def _micros(ts: pa.ChunkedArray) -> np.ndarray:
    return np.asarray(_micros_array(ts).to_numpy(zero_copy_only=False), dtype=np.int64)


def _flatten(rows: pa.Table, max_rows: int, columns: Mapping[str, list[str]]) -> pd.DataFrame:
    """Logged rows (newest first) -> feature rows (oldest first), at most the newest max_rows."""
    inputs = sorted(
        c[len(INPUT_PREFIX) :]
        for c in rows.column_names
        if c.startswith(INPUT_PREFIX) and not c.endswith(SHAPE_SUFFIX) and c + SHAPE_SUFFIX in rows.column_names
    )
    if not inputs:
        return pd.DataFrame()
    valid = np.ones(rows.num_rows, dtype=bool)
    batch: np.ndarray | None = None
    widths: dict[str, int] = {}
    for name in inputs:
        values = rows[INPUT_PREFIX + name]
        shapes = rows[INPUT_PREFIX + name + SHAPE_SUFFIX]
        present = ~np.asarray(pc.is_null(values).to_numpy(zero_copy_only=False), dtype=bool)
        present &= ~np.asarray(pc.is_null(shapes).to_numpy(zero_copy_only=False), dtype=bool)
        sizes = _filled(pc.list_value_length(values))
        rank = _filled(pc.list_value_length(shapes))
        rows_of = np.where(rank >= 1, _first_dimension(shapes), 1)  # a tensor without dimensions is one row
        present &= (rows_of > 0) & (sizes > 0)
        width = np.where(rows_of > 0, sizes // np.maximum(rows_of, 1), 0)
        # the newest usable row's width is the model's current one: older rows of another width are another
        # shape (a version that changed its input), not comparable column by column
        usable = np.flatnonzero(present)
        if usable.size == 0:
            return pd.DataFrame()
        expected = int(width[usable[0]])
        if name in columns and len(columns[name]) != expected:
            raise ValueError(
                f"input {name!r} has {expected} values per row in the log but the column mapping names "
                f"{len(columns[name])}: {columns[name]}"
            )
        widths[name] = expected
        valid &= present & (width == expected) & (sizes == rows_of * expected)
        batch = rows_of if batch is None else batch
        valid &= rows_of == batch  # every input of a request must have the same batch size
    assert batch is not None  # at least one input
    chosen = np.flatnonzero(valid)
    # newest first: keep logged rows until max_rows feature rows are covered
    covered = np.cumsum(batch[chosen])
    chosen = chosen[: int(np.searchsorted(covered, max_rows, side="left")) + 1]
    take = pa.array(chosen, pa.int64())
    frame: dict[str, Any] = {}
    for name in inputs:
        flat = pc.list_flatten(rows[INPUT_PREFIX + name].take(take))
        values = _numpy(flat).reshape(-1, widths[name])[:max_rows][::-1]  # oldest first
        names = columns.get(name) or _default_names(name, widths[name])
        for j, column in enumerate(names):
            frame[column] = values[:, j]
    return pd.DataFrame(frame)


def _first_dimension(shapes: pa.ChunkedArray) -> np.ndarray:
    """Each row's first dimension (0 where the shape is null or has none)."""
    lists = shapes.combine_chunks() if isinstance(shapes, pa.ChunkedArray) else shapes
    starts = np.asarray(lists.offsets.to_numpy(zero_copy_only=False)[:-1], dtype=np.int64)
    dims = np.asarray(lists.values.to_numpy(zero_copy_only=False), dtype=np.int64)
    lengths = _filled(pc.list_value_length(lists))
    out = np.zeros(len(lists), dtype=np.int64)
    has = lengths > 0
    out[has] = dims[starts[has]]
    return out


def _filled(array: pa.ChunkedArray | pa.Array, default: int = 0) -> np.ndarray:
    return np.asarray(pc.fill_null(array, default).to_numpy(zero_copy_only=False), dtype=np.int64)


def _numpy(flat: pa.ChunkedArray | pa.Array) -> np.ndarray:
    if pa.types.is_binary(flat.type) or pa.types.is_large_binary(flat.type):
        return np.array([b.decode("utf-8", "replace") for b in flat.to_pylist()], dtype=object)
    if pa.types.is_string(flat.type) or pa.types.is_large_string(flat.type):
        return np.array(flat.to_pylist(), dtype=object)
    values: np.ndarray = np.asarray(flat.to_numpy(zero_copy_only=False))
    return values


def _default_names(name: str, width: int) -> list[str]:
    return [name] if width == 1 else [f"{name}_{j}" for j in range(width)]


__all__ = [
    "CATEGORICAL",
    "CHI2",
    "KS",
    "NUMERIC",
    "PSI_BINS",
    "PSI_EPSILON",
    "REFERENCE_FILE",
    "REFERENCE_ROWS",
    "DriftCollector",
    "FeatureDrift",
    "categorical_drift",
    "feature_drift",
    "live_features",
    "numeric_drift",
    "reference_files",
    "reference_of",
]

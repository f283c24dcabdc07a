"""`onnxgate evaluate --model NAME --candidate V`: what version V would have scored on the logged traffic, from the
prediction log alone, side by side with what the served versions scored.

    report = evaluate(LogFiles.at("/var/lib/onnxgate/predlog"), "iris", "3", repository=Path("models"))
    print(table(report))

The labelled rows are the export's (logquery.export_table: each prediction's truth by the feedback rule);
each row's routing is read from its prediction segment (`route`, `propensity`, `shadow_version`,
`shadow.output.<name>`: docs/reference/log-table.md). The estimators:

- **observed**: each served version's quality on the rows it answered (Wilson interval for accuracy,
  a seeded bootstrap for MSE). Biased as an estimate of a version on *all* traffic when the routing
  depended on the request (a bandit); unbiased under a fixed split.
- **shadow** (exact): V's logged shadow outputs against the truth of the rows V shadowed. Exact for those
  rows; a sample of the traffic when shadowing was sampled.
- **ips** / **snips**: inverse propensity scoring of the policy "always V" over the routed rows (route
  latest, split or bandit; requests that named a version are left out: their version was not the
  router's choice). A row V answered weighs 1/propensity, any other 0; IPS = sum(w r) / n,
  SNIPS = sum(w r) / sum(w). Seeded bootstrap intervals, and the effective sample size
  ESS = sum(w)^2 / sum(w^2). Rows logged before propensities existed are refused (not guessed as 1).
- **replay** (direct method, with --model-repository): V's quality on every labelled row, its own logged
  outputs where it answered or shadowed, its ONNX file scored with onnxruntime on the logged inputs
  elsewhere. Exact when V is deterministic and the log kept every input V reads.

The metric is accuracy when the truth is a label, mean squared error when it is a value. A request is one
row; requests whose primary output holds more than one element (batched requests) are left out and counted.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa

from onnxgate.learning.evaluate import predict, same_label
from onnxgate.learning.training import TrainingRecord
from onnxgate.server.logfiles import LogFiles
from onnxgate.server.logquery import export_table
from onnxgate.server.predlog import INPUT_PREFIX, OUTPUT_PREFIX, PREDICTIONS, SHAPE_SUFFIX
from onnxgate.server.segments import SkipList

SHADOW_OUTPUT_PREFIX = "shadow." + OUTPUT_PREFIX
ROUTED = ("latest", "split", "bandit", "pinned")  # routes the router chose; "explicit" requests named their version
Metric = Literal["accuracy", "mse"]
DEFAULT_RESAMPLES = 2000
DEFAULT_CONFIDENCE = 0.95


class OffPolicyError(ValueError):
    """The logs cannot answer the question asked (no labelled rows, no propensities, ...)."""


@dataclass
class Estimate:
    estimator: str  # observed | shadow | ips | snips | replay
    version: str
    value: float | None
    interval: tuple[float, float] | None
    n: int  # rows the estimate rests on
    ess: float | None = None  # effective sample size (importance-weighted estimators)
    note: str = ""

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["interval"] = list(self.interval) if self.interval is not None else None
        return out


@dataclass
class Report:
    model: str
    candidate: str
    metric: Metric
    labelled: int
    estimates: list[Estimate]
    skipped_rows: dict[str, int] = field(default_factory=dict)  # why -> rows left out
    unreadable: dict[str, str] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "candidate": self.candidate,
            "metric": self.metric,
            "labelled": self.labelled,
            "estimates": [e.as_dict() for e in self.estimates],
            "skipped_rows": self.skipped_rows,
            "unreadable_files": self.unreadable,
        }


@dataclass
class Rows:
    """The labelled rows, one per prediction id, as arrays."""

    ids: list[str]
    version: np.ndarray  # str
    route: np.ndarray  # str; "" when not logged
    propensity: np.ndarray  # float64; nan when not logged
    predicted: np.ndarray  # object: the served version's primary output (one element)
    shadow_version: np.ndarray  # str; "" when none
    shadow_predicted: np.ndarray  # object; None when none
    truth: np.ndarray  # object (label) or float64 (value)
    inputs: list[dict[str, np.ndarray]]  # per row, the logged input tensors (for replay)


# -- the statistics -------------------------------------------------------------------------------------------
def wilson(successes: int, n: int, confidence: float = DEFAULT_CONFIDENCE) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion."""
    if n == 0:
        return (math.nan, math.nan)
    from scipy.stats import norm

    z = float(norm.ppf(0.5 + confidence / 2.0))
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def bootstrap_mean(values: np.ndarray, *, n_resamples: int, confidence: float, seed: int) -> tuple[float, float]:
    """Percentile interval of the mean of `values` (seeded)."""
    if values.size == 0:
        return (math.nan, math.nan)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, values.size, size=(n_resamples, values.size))
    means = values[idx].mean(axis=1)
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return (float(low), float(high))


def importance_weighted(
    rewards: np.ndarray,
    weights: np.ndarray,
    *,
    n_resamples: int = DEFAULT_RESAMPLES,
    confidence: float = DEFAULT_CONFIDENCE,
    seed: int = 0,
) -> tuple[Estimate, Estimate]:
    """(IPS, SNIPS) of per-row `rewards` (any value where the weight is 0) with importance `weights`,
    percentile intervals from one seeded bootstrap over the rows (both estimators on the same resamples)."""
    n = int(weights.size)
    if n == 0:
        raise OffPolicyError("no routed rows to weigh")
    r = np.where(weights > 0, rewards, 0.0).astype(np.float64)
    w = weights.astype(np.float64)
    total_w = float(w.sum())
    ess = total_w**2 / float((w * w).sum()) if total_w > 0 else 0.0
    ips = float((w * r).sum() / n)
    snips = float((w * r).sum() / total_w) if total_w > 0 else math.nan
    rng = np.random.default_rng(seed)
    ips_b = np.empty(n_resamples)
    snips_b = np.empty(n_resamples)
    chunk = max(1, 2_000_000 // n)
    for start in range(0, n_resamples, chunk):
        stop = min(n_resamples, start + chunk)
        idx = rng.integers(0, n, size=(stop - start, n))
        wr = (w * r)[idx].sum(axis=1)
        ws = w[idx].sum(axis=1)
        ips_b[start:stop] = wr / n
        with np.errstate(invalid="ignore", divide="ignore"):
            snips_b[start:stop] = wr / ws
    tail = (1.0 - confidence) / 2.0

    def interval(values: np.ndarray) -> tuple[float, float] | None:
        finite = values[np.isfinite(values)]
        if finite.size == 0:
            return None
        low, high = np.quantile(finite, [tail, 1.0 - tail])
        return (float(low), float(high))

    return (
        Estimate("ips", "", ips, interval(ips_b), n, ess),
        Estimate("snips", "", snips if total_w > 0 else None, interval(snips_b), n, ess),
    )


# -- reading the log ------------------------------------------------------------------------------------------
def _primary(row: Mapping[str, Any], prefix: str) -> tuple[bool, Any]:
    """(found, value) of the row's primary output under `prefix` (join.primary_output's rule: the one with
    the fewest elements, then by name); found=False when none; value None when it is not one element."""
    names = sorted(c for c in row if c.startswith(prefix) and not c.endswith(SHAPE_SUFFIX) and row[c] is not None)
    if not names:
        return (False, None)
    best = min(names, key=lambda c: (len(row[c]), c))
    values = row[best]
    return (True, values[0] if len(values) == 1 else None)


def _inputs(row: Mapping[str, Any], dtypes: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The row's logged input tensors, shaped and typed as logged (float32 stays float32)."""
    out = {}
    for column, values in row.items():
        if column.startswith(INPUT_PREFIX) and not column.endswith(SHAPE_SUFFIX) and values is not None:
            shape = row.get(column + SHAPE_SUFFIX) or [1, len(values)]
            out[column[len(INPUT_PREFIX) :]] = np.asarray(values, dtype=dtypes.get(column)).reshape(shape)
    return out


def load_rows(
    log: LogFiles, model: str, *, with_inputs: bool = False, skipped: SkipList | None = None
) -> tuple[Rows, Metric, dict[str, int]]:
    """The model's labelled rows with their routing (see the module's docstring)."""
    skipped = {} if skipped is None else skipped
    export = export_table(log, model, skipped=skipped)
    if export.num_rows == 0:
        raise OffPolicyError(f"no labelled predictions of {model!r} in {log.uri} (feedback joins none)")
    labels = export["truth_label"].to_pylist()
    values = export["truth_value"].to_pylist()
    if any(v is not None for v in labels):
        metric: Metric = "accuracy"
        truth_of = {pid: t for pid, t in zip(export["prediction_id"].to_pylist(), labels, strict=True) if t is not None}
    elif any(v is not None for v in values):
        metric = "mse"
        truth_of = {pid: t for pid, t in zip(export["prediction_id"].to_pylist(), values, strict=True) if t is not None}
    else:
        raise OffPolicyError(
            f"the feedback of {model!r} holds neither labels nor values (tensor truths are not evaluated)"
        )
    # the rows themselves, from the segments: of a reused id the latest (as the export)
    latest: dict[str, dict[str, Any]] = {}
    for segment in log.segments(PREDICTIONS, [model], skipped):
        table = log.read(segment, skipped)
        if table is None or not table.num_rows:
            continue
        keep = [
            c
            for c in table.column_names
            if c in ("id", "version", "ts", "route", "propensity", "shadow_version")
            or c.startswith((OUTPUT_PREFIX, SHADOW_OUTPUT_PREFIX))
            or (with_inputs and c.startswith(INPUT_PREFIX))
        ]
        dtypes = {
            c: _numpy_type(table.schema.field(c).type)
            for c in keep
            if c.startswith(INPUT_PREFIX) and not c.endswith(SHAPE_SUFFIX)
        }
        for row in table.select(keep).to_pylist():
            pid = row["id"]
            if pid in truth_of and (pid not in latest or row["ts"] >= latest[pid]["ts"]):
                row["_dtypes"] = dtypes
                latest[pid] = row
    skipped_rows: dict[str, int] = {}
    out: dict[str, list[Any]] = {k: [] for k in ("ids", "version", "route", "p", "pred", "sv", "spred", "truth", "in")}
    for pid, row in latest.items():
        found, predicted = _primary(row, OUTPUT_PREFIX)
        if not found or predicted is None:
            why = "no output logged" if not found else "batched request (more than one element)"
            skipped_rows[why] = skipped_rows.get(why, 0) + 1
            continue
        shadow_found, shadow = _primary(row, SHADOW_OUTPUT_PREFIX)
        propensity = row.get("propensity")
        out["ids"].append(pid)
        out["version"].append(str(row["version"]))
        out["route"].append(row.get("route") or "")
        out["p"].append(math.nan if propensity is None else float(propensity))
        out["pred"].append(predicted)
        out["sv"].append((row.get("shadow_version") or "") if shadow_found and shadow is not None else "")
        out["spred"].append(shadow if shadow_found else None)
        out["truth"].append(truth_of[pid])
        out["in"].append(_inputs(row, row["_dtypes"]) if with_inputs else {})
    rows = Rows(
        ids=out["ids"],
        version=np.asarray(out["version"], dtype=str),
        route=np.asarray(out["route"], dtype=str),
        propensity=np.asarray(out["p"], dtype=np.float64),
        predicted=np.asarray(out["pred"], dtype=object),
        shadow_version=np.asarray(out["sv"], dtype=str),
        shadow_predicted=np.asarray(out["spred"], dtype=object),
        truth=np.asarray(out["truth"], dtype=object if metric == "accuracy" else np.float64),
        inputs=out["in"],
    )
    return rows, metric, skipped_rows


# -- the estimators -------------------------------------------------------------------------------------------
def scores(metric: Metric, predicted: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Per row: 1/0 correct (accuracy) or the squared error (mse)."""
    if predicted.size == 0:
        return np.zeros(0)
    if metric == "accuracy":
        return same_label(np.asarray(list(predicted), dtype=object), np.asarray(list(truth), dtype=object)).astype(
            np.float64
        )
    return (np.asarray(list(predicted), dtype=np.float64) - truth.astype(np.float64)) ** 2


def _plain(
    estimator: str, version: str, metric: Metric, s: np.ndarray, *, n_resamples: int, confidence: float, seed: int
) -> Estimate:
    n = int(s.size)
    if n == 0:
        return Estimate(estimator, version, None, None, 0, note="no rows")
    if metric == "accuracy":
        return Estimate(estimator, version, float(s.mean()), wilson(int(s.sum()), n, confidence), n)
    interval = bootstrap_mean(s, n_resamples=n_resamples, confidence=confidence, seed=seed)
    return Estimate(estimator, version, float(s.mean()), interval, n)


def observed(
    rows: Rows,
    metric: Metric,
    *,
    n_resamples: int = DEFAULT_RESAMPLES,
    confidence: float = DEFAULT_CONFIDENCE,
    seed: int = 0,
) -> list[Estimate]:
    """Each served version's quality on the rows it answered."""
    s = scores(metric, rows.predicted, rows.truth)
    return [
        _plain(
            "observed", str(v), metric, s[rows.version == v], n_resamples=n_resamples, confidence=confidence, seed=seed
        )
        for v in sorted(set(rows.version.tolist()), key=_version_key)
    ]


def shadow(
    rows: Rows,
    metric: Metric,
    candidate: str,
    *,
    n_resamples: int = DEFAULT_RESAMPLES,
    confidence: float = DEFAULT_CONFIDENCE,
    seed: int = 0,
) -> Estimate:
    """The candidate's shadow outputs against the truth: exact on the rows it shadowed."""
    mask = rows.shadow_version == candidate
    s = scores(metric, rows.shadow_predicted[mask], rows.truth[mask])
    est = _plain("shadow", candidate, metric, s, n_resamples=n_resamples, confidence=confidence, seed=seed)
    if not mask.any():
        est.note = f"no shadow outputs of version {candidate} in the log"
    return est


def ips(
    rows: Rows,
    metric: Metric,
    candidate: str,
    *,
    n_resamples: int = DEFAULT_RESAMPLES,
    confidence: float = DEFAULT_CONFIDENCE,
    seed: int = 0,
) -> tuple[Estimate, Estimate]:
    """(IPS, SNIPS) of "always `candidate`" over the routed rows. Raises OffPolicyError when the routed
    rows lack propensities (logs written before onnxgate recorded them) or hold impossible ones."""
    missing = np.isnan(rows.propensity)
    if missing.any():
        raise OffPolicyError(
            f"{int(missing.sum())} of {missing.size} labelled rows have no propensity (logged before onnxgate "
            "recorded routing): IPS/SNIPS need the probability each answering version had of being chosen, "
            "and will not assume one; evaluate a window of newer logs, or use the shadow/replay estimates"
        )
    routed = np.isin(rows.route, ROUTED)
    if not routed.any():
        raise OffPolicyError("no routed rows: every labelled request named its version (route explicit)")
    p = rows.propensity[routed]
    bad = (p <= 0) | (p > 1)
    if bad.any():
        raise OffPolicyError(
            f"{int(bad.sum())} routed rows have a propensity outside (0, 1]: {sorted(set(p[bad]))[:5]}"
        )
    answered = rows.version[routed] == candidate
    weights = np.where(answered, 1.0 / p, 0.0)
    s = np.zeros(int(routed.sum()))
    s[answered] = scores(metric, rows.predicted[routed][answered], rows.truth[routed][answered])
    est_ips, est_snips = importance_weighted(s, weights, n_resamples=n_resamples, confidence=confidence, seed=seed)
    for e in (est_ips, est_snips):
        e.version = candidate
        e.note = f"{int(answered.sum())} rows answered by {candidate}"
        if not answered.any():
            e.note = f"version {candidate} answered none of the {int(routed.sum())} routed rows"
    return est_ips, est_snips


def replay(
    rows: Rows,
    metric: Metric,
    candidate: str,
    version_dir: Path,
    *,
    n_resamples: int = DEFAULT_RESAMPLES,
    confidence: float = DEFAULT_CONFIDENCE,
    seed: int = 0,
) -> Estimate:
    """The candidate on every labelled row: its logged outputs where it answered or shadowed, its ONNX file
    scored on the logged inputs elsewhere."""
    model_file = version_dir / "model.onnx"
    if not model_file.is_file():
        raise OffPolicyError(f"no {model_file} to replay")
    predicted = np.full(len(rows.ids), None, dtype=object)
    own = rows.version == candidate
    predicted[own] = rows.predicted[own]
    from_shadow = (rows.version != candidate) & (rows.shadow_version == candidate)
    predicted[from_shadow] = rows.shadow_predicted[from_shadow]
    todo = np.flatnonzero(np.asarray([p is None for p in predicted], dtype=bool))
    scored = 0
    if todo.size:
        names = sorted(set().union(*(rows.inputs[i].keys() for i in todo)))
        complete = [i for i in todo if set(rows.inputs[i]) == set(names)]
        if len(complete) < todo.size:
            raise OffPolicyError(f"{todo.size - len(complete)} rows lack logged inputs; the replay needs all of them")
        batch = {n: np.concatenate([rows.inputs[i][n] for i in todo]) for n in names}
        if TrainingRecord.exists(version_dir):  # typed as the version's record says its inputs are
            record = TrainingRecord.load(version_dir)
            batch = record.inputs_from_features(record.features_from_inputs(batch))
        out = predict(model_file, batch)
        if len(out) != todo.size:
            raise OffPolicyError(f"replay answered {len(out)} rows for {todo.size} (batched requests?)")
        for i, value in zip(todo, out, strict=True):
            predicted[i] = value.item() if hasattr(value, "item") else value
        scored = int(todo.size)
    s = scores(metric, predicted, rows.truth)
    est = _plain("replay", candidate, metric, s, n_resamples=n_resamples, confidence=confidence, seed=seed)
    est.note = f"{scored} rows scored by onnxruntime, {int(s.size) - scored} from logged outputs"
    return est


def evaluate(
    log: LogFiles,
    model: str,
    candidate: str,
    *,
    repository: Path | None = None,
    n_resamples: int = DEFAULT_RESAMPLES,
    confidence: float = DEFAULT_CONFIDENCE,
    seed: int = 0,
) -> Report:
    """Every estimate the log allows; an estimator the log cannot serve is a row with its reason."""
    skipped: SkipList = {}
    version_dir = repository / model / candidate if repository is not None else None
    rows, metric, skipped_rows = load_rows(log, model, with_inputs=version_dir is not None, skipped=skipped)
    if not rows.ids:
        raise OffPolicyError(f"no labelled prediction of {model!r} with a single-element output ({skipped_rows})")
    kw: dict[str, Any] = {"n_resamples": n_resamples, "confidence": confidence, "seed": seed}
    estimates = observed(rows, metric, **kw)
    estimates.append(shadow(rows, metric, candidate, **kw))
    try:
        estimates.extend(ips(rows, metric, candidate, **kw))
    except OffPolicyError as e:
        estimates.extend(Estimate(name, candidate, None, None, 0, note=str(e)) for name in ("ips", "snips"))
    if version_dir is not None:
        try:
            estimates.append(replay(rows, metric, candidate, version_dir, **kw))
        except (OffPolicyError, ValueError, RuntimeError) as e:
            estimates.append(Estimate("replay", candidate, None, None, 0, note=str(e)))
    return Report(
        model=model,
        candidate=candidate,
        metric=metric,
        labelled=len(rows.ids),
        estimates=estimates,
        skipped_rows=skipped_rows,
        unreadable={str(p): why for p, why in skipped.items()},
    )


def _numpy_type(t: pa.DataType) -> Any:
    """The numpy dtype of a logged tensor column's elements (object for strings and bytes)."""
    value = t.value_type if pa.types.is_list(t) or pa.types.is_large_list(t) else t
    try:
        return np.dtype(value.to_pandas_dtype())
    except (NotImplementedError, TypeError):
        return object


def _version_key(v: str) -> tuple[int, str]:
    return (int(v), "") if v.isdigit() else (sys.maxsize, v)


# -- the command ----------------------------------------------------------------------------------------------
def text(report: Report) -> str:
    lines = [
        f"model {report.model}, candidate version {report.candidate}: {report.metric} on {report.labelled} "
        "labelled predictions",
        "",
        f"{'estimator':<10} {'version':>7} {'value':>8} {'interval':>19} {'n':>7} {'ESS':>8}  note",
    ]
    for e in report.estimates:
        value = f"{e.value:.4f}" if e.value is not None and math.isfinite(e.value) else "-"
        interval = f"[{e.interval[0]:.4f}, {e.interval[1]:.4f}]" if e.interval is not None else "-"
        ess = f"{e.ess:.1f}" if e.ess is not None else ""
        lines.append(f"{e.estimator:<10} {e.version:>7} {value:>8} {interval:>19} {e.n:>7} {ess:>8}  {e.note}")
    for why, count in sorted(report.skipped_rows.items()):
        lines.append(f"left out: {count} rows ({why})")
    for path, why in sorted(report.unreadable.items()):
        lines.append(f"unreadable: {path}: {why}")
    return "\n".join(lines)


def configure_parser(parser: argparse.ArgumentParser) -> None:
    # the model's name was the first positional argument: still taken, hidden, with a deprecation line
    parser.add_argument("positional_model", nargs="?", help=argparse.SUPPRESS)
    parser.add_argument("--model", help="the model (required)")
    parser.add_argument("--candidate", required=True, help="the version to evaluate on the logged traffic")
    parser.add_argument("--predlog-dir", required=True, help="the prediction log (a directory or s3://, gs://, ...)")
    parser.add_argument(
        "--model-repository", type=Path, help="the model repository: adds the replay estimate (V's ONNX file)"
    )
    parser.add_argument("--confidence", type=float, default=DEFAULT_CONFIDENCE)
    parser.add_argument("--resamples", type=int, default=DEFAULT_RESAMPLES, help="bootstrap resamples")
    parser.add_argument("--seed", type=int, default=0, help="the bootstrap's seed")
    parser.add_argument("--json", action="store_true")


def run(args: argparse.Namespace) -> int:
    try:
        report = evaluate(
            LogFiles.at(args.predlog_dir),
            args.model,
            args.candidate,
            repository=args.model_repository,
            n_resamples=args.resamples,
            confidence=args.confidence,
            seed=args.seed,
        )
    except (OffPolicyError, ValueError, OSError, pa.ArrowException) as e:
        print(f"onnxgate evaluate: {e}", file=sys.stderr)
        return 2
    print(json.dumps(report.as_json(), indent=1) if args.json else text(report))
    return 0

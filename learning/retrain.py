"""`onnxgate retrain --model NAME`: one retrain of a served model from its own traffic, and one decision.

    labelled rows (the log's join) -> the newest change in the champion's per-row loss (learning/change.py)
      -> time split: train | validation | test (the newest); after a change, validation and test are
         rows since the change, so the window is chosen and judged on the concept the model meets now
      -> a challenger per candidate window (base + feedback, feedback only, since the change, the newest
         shares, recency-weighted), trained by the model's recipe in its own ecosystem, converted with the
         parity check
      -> the best on the validation slice, trained again on train + validation
      -> champion and challenger scored with onnxruntime on their ONNX files on the test slice
      -> promoted only when better by the margin AND significantly so at this look's share of alpha
         (learning/stats.py); else nothing
    every run: a decision appended to <model>/decisions.jsonl and printed

Repeated looks: every run against the same champion is another chance to promote noise, so each spends
a share of one error budget: look k (k = 1 + the decided runs against this champion) tests at
alpha / (k (k + 1)), and the shares sum to alpha over any number of runs. The margin is a real effect
size by default (2 accuracy points; for regressors, 2% of the champion's mean squared error).

Nothing is written into the repository until the decision is to promote: challengers are trained and
converted in a temporary directory, and the new version is written aside and renamed into place, so a
crash at any point leaves the repository as it was. Exit code: 0 for any decision, 1 when it failed.

Two recipe options (recipe.json `options`, set by `onnxgate convert --ladder ... --online`):
- `ladder` (sklearn recipe): model families from the simplest, climbed on the chosen window only when
  the simpler one's learning curve has flattened (learning/ladder.py);
- `online`: one more candidate, "online": the served model updated on the newest rows (those since the
  change, else those the champion served) by `partial_fit` (scikit-learn) or more boosting rounds
  (xgboost, lightgbm, catboost), judged on validation and promoted by the same rule as any window.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from onnxgate.converters.publish import versions
from onnxgate.learning import decisions, ladder
from onnxgate.learning.change import Change, newest_change, row_losses
from onnxgate.learning.data import (
    Labelled,
    NotEnoughData,
    Split,
    Window,
    candidate_windows,
    concat,
    feedback_rows,
    time_split,
)
from onnxgate.learning.decisions import FAILED, MODEL_CARD_FILE, NOT_ENOUGH_DATA, PROMOTED, REJECTED, Decision
from onnxgate.learning.drift import reference_files
from onnxgate.learning.evaluate import CLASSIFICATION, compare, predict, same_label
from onnxgate.learning.recipes import convert_checked, publish_version, retrain_native
from onnxgate.learning.stats import decide
from onnxgate.learning.training import RecipeError, TrainingRecord
from onnxgate.server.logfiles import LogFiles

log = logging.getLogger(__name__)

ONLINE = "online"  # the candidate that updates the served model on the newest rows (recipe option `online`)
ONLINE_MIN_ROWS = 10


@dataclass(frozen=True)
class Rule:
    """When a challenger is promoted (and how it is trained)."""

    # the least improvement worth a version: accuracy points for classifiers; for regressors a share of the
    # champion's mean squared error (0.02: 2% less). The observed improvement must reach it.
    margin: float = 0.02
    # the error budget over all runs against one champion (see the module's docstring): 0.01 keeps pure
    # noise out (100 seeded noise runs of the learning benchmark), a real change passes far below it
    alpha: float = 0.01
    min_rows: int = 100  # labelled rows needed at all (train + validation + test)
    test_fraction: float = 0.25
    validation_fraction: float = 0.25
    mode: str = "refit"  # or "continue" (boosters: more trees on the served model)
    seed: int = 0
    # rows since a detected change needed to retrain on it (train + validation + test of the new concept):
    # fewer than min_rows, since a change in the champion's loss is itself evidence, and the model
    # serves the old concept's answers while it waits
    min_rows_after_change: int = 60


def champion_version(model_dir: Path) -> str:
    """The version a retrain starts from and is measured against: the newest with a training record."""
    for version in reversed(versions(model_dir)):
        if TrainingRecord.exists(model_dir / str(version)):
            return str(version)
    raise RecipeError(
        f"no version of {model_dir.name} keeps a training record: convert it with "
        "`onnxgate convert ... --recipe RECIPE --training-data FILE` first"
    )


def retrain(repository: Path, name: str, log_location: str | Path, rule: Rule, *, trigger: str = "manual") -> Decision:
    """One retrain; the decision is appended to the model's decision log before it is returned."""
    started = time.monotonic()
    model_dir = repository / name
    try:
        decision = _run(model_dir, name, LogFiles.at(log_location), rule)
    except NotEnoughData as e:
        decision = Decision(name, NOT_ENOUGH_DATA, str(e))
    except (RecipeError, OSError, ValueError) as e:
        log.exception("retrain of %s failed", name)
        decision = Decision(name, FAILED, f"{type(e).__name__}: {e}")
    decision.trigger = trigger
    decision.seconds = round(time.monotonic() - started, 3)
    decisions.append(model_dir, decision)
    return decision


def _run(model_dir: Path, name: str, logfiles: LogFiles, rule: Rule) -> Decision:
    champion = champion_version(model_dir)
    record = TrainingRecord.load(model_dir / champion)
    labelled = feedback_rows(logfiles, name, record)
    change = champion_change(record, model_dir / champion, labelled)
    split = _split(labelled, change, rule)
    since = None if change is None else change.index  # where the new regime starts in split.train
    rows = {"train": len(split.train), "validation": len(split.validation), "test": len(split.test)}
    if change is not None:
        rows |= {"change_at_row": change.index, "since_change": len(labelled) - change.index}
    rungs = _ladder(record, rule)
    with tempfile.TemporaryDirectory(prefix=f"onnxgate-retrain-{name}-") as tmp:
        work = Path(tmp)
        windows = candidate_windows(record, split.train, since=since)
        modes = [rule.mode] * len(windows)
        if record.options.get("online"):
            recent = _online_window(split.train, since, champion)
            if recent is None:
                log.info("%s: no rows for an online update since version %s", name, champion)
            else:
                windows.append(recent)
                modes.append("continue")
        predictions: dict[str, np.ndarray | None] = {}
        candidates = []
        for i, (window, mode) in enumerate(zip(windows, modes, strict=True)):
            family = rungs[0] if rungs and mode == "refit" else None
            result, predictions[window.name] = _scored(
                record, window, split.validation, work / f"w{i}", rule, mode=mode, family=family
            )
            if family is not None:
                result["family"] = family
            candidates.append(result)
        usable = [c for c in candidates if c["score"] is not None]
        if not usable:
            return Decision(
                name,
                FAILED,
                "no candidate window gave a usable model: "
                + "; ".join(f"{c['window']}: {c.get('error', 'no score')}" for c in candidates),
                champion,
                candidates=candidates,
                rows=rows,
            )
        best = max(usable, key=lambda c: c["score"])
        chosen_family: str | None = None
        climbed: ladder.Climb | None = None
        if rungs and best["window"] != ONLINE:
            climbed = _climb(
                record,
                rungs,
                next(w for w in windows if w.name == best["window"]),
                best,
                predictions,
                split.validation,
                work / "ladder",
                rule,
            )
            chosen_family = climbed.family
            candidates.extend(climbed.steps)
        # the chosen window again, on every row before the test slice
        history = concat(split.train, split.validation)
        final_mode = rule.mode
        if best["window"] == ONLINE:
            final_window = _online_window(history, since, champion)
            assert final_window is not None  # it had rows in the training pool alone
            final_mode = "continue"
        else:
            final_window = next(w for w in candidate_windows(record, history, since=since) if w.name == best["window"])
        native = retrain_native(
            record,
            final_window.X,
            final_window.y,
            workdir=work / "final",
            mode=final_mode,
            sample_weight=final_window.weight,
            seed=rule.seed,
            family=chosen_family,
        )
        conversion, report, passed = convert_checked(native, record, split.test.X)
        if not passed:
            return Decision(
                name,
                FAILED,
                "the challenger failed the parity check against its native model",
                champion,
                window=best["window"],
                candidates=candidates,
                rows=rows,
            )
        test = _paired(record, model_dir / champion, conversion.model.SerializeToString(), split.test, rule)
        look = 1 + _looks(model_dir, champion)
        alpha = rule.alpha / (look * (look + 1))
        margin = rule.margin if record.task == CLASSIFICATION else rule.margin * test.champion
        # min_rows was enforced on all labelled rows (time_split); the test slice is a share of them
        verdict = decide(test, margin=margin, alpha=alpha, min_rows=1)
        evaluation = {**test.as_dict(), "look": look, "alpha_budget": rule.alpha, "alpha": alpha, "margin": margin}
        if change is not None:
            evaluation["change"] = change.as_dict()
        reason = verdict.reason + (
            f"; look {look} against version {champion}, alpha {rule.alpha:g} / {look * (look + 1)}"
        )
        if change is not None:
            reason += f"; chosen and judged on the rows since {change.describe()}"
        if climbed is not None:
            reason += f"; {climbed.summary}"
        elif best["window"] == ONLINE:
            reason += f"; online: version {champion} updated on its {len(final_window.y)} newest rows"
        if verdict.outcome != "promote":
            return Decision(
                name,
                REJECTED,
                reason,
                champion,
                window=best["window"],
                test=evaluation,
                candidates=candidates,
                rows=rows,
            )
        card = {
            "parent_version": champion,
            "recipe": record.recipe,
            "mode": final_mode,
            "hyperparameters": record.hyperparameters,
            "base_data_sha256": record.base_sha256,
            "window": best["window"],
            "family": chosen_family,
            "ladder": climbed.steps if climbed is not None else None,
            "rows": {**rows, "window_feedback": final_window.feedback_rows, "window_base": final_window.base_rows},
            "feedback_from": str(split.train.at.min()) if len(split.train) else None,
            "feedback_to": str(split.validation.at.max()) if len(split.validation) else None,
            "evaluation": evaluation,
            "rule": {"margin": rule.margin, "alpha": rule.alpha, "min_rows": rule.min_rows},
            "parity": {
                k: v for k, v in report.get("parity", {}).items() if k in ("passed", "rows", "sample", "tolerance")
            },
            "decision": PROMOTED,
            "reason": reason,
            "at": time.time(),
        }
        card_json = json.dumps(card, indent=1, sort_keys=True, default=str).encode()
        extra = {MODEL_CARD_FILE: card_json, **reference_files(final_window.X, final_window.weight, seed=rule.seed)}
        published = (
            record if chosen_family is None else replace(record, options={**record.options, "family": chosen_family})
        )
        directory = publish_version(model_dir.parent, name, conversion, report, native, published, extra)
    return Decision(
        name,
        PROMOTED,
        reason,
        champion,
        version=directory.name,
        window=best["window"],
        test=evaluation,
        candidates=candidates,
        rows=rows,
    )


def champion_change(record: TrainingRecord, champion_dir: Path, labelled: Labelled) -> Change | None:
    """The newest change in the champion's loss over the labelled rows (all of them, oldest first)."""
    if not len(labelled):
        return None
    predicted = predict(champion_dir / "model.onnx", record.inputs_from_features(labelled.X))
    return newest_change(row_losses(record.task, predicted, labelled.y.to_numpy()))


def _split(labelled: Labelled, change: Change | None, rule: Rule) -> Split:
    """train | validation | test by time; after a change, validation and test come from the rows since it
    (the training pool keeps every older row: the windows decide what to train on)."""

    def split(rows: Labelled, min_rows: int) -> Split:
        return time_split(
            rows, test_fraction=rule.test_fraction, validation_fraction=rule.validation_fraction, min_rows=min_rows
        )

    whole = split(labelled, rule.min_rows)  # min_rows labelled rows at all, change or not
    if change is None:
        return whole
    recent = labelled.rows(slice(change.index, len(labelled)))
    try:
        held = split(recent, rule.min_rows_after_change)
    except NotEnoughData as e:
        raise NotEnoughData(f"{change.describe()}; since the change: {e}") from None
    return Split(concat(labelled.rows(slice(0, change.index)), held.train), held.validation, held.test)


def _looks(model_dir: Path, champion: str) -> int:
    """Runs already decided (rejected or promoted) against this champion: each spent a share of alpha."""
    return sum(
        1
        for d in decisions.read(model_dir)
        if d.get("champion") == champion and d.get("outcome") in (REJECTED, PROMOTED)
    )


def _ladder(record: TrainingRecord, rule: Rule) -> list[str]:
    """The record's ladder of families (simplest first), when this run refits an sklearn model; else []."""
    rungs = record.options.get("ladder") or []
    if record.recipe != "sklearn" or rule.mode != "refit" or len(rungs) < 1:
        return []
    return [str(r) for r in rungs]


def _online_window(rows: Labelled, since: int | None, champion: str) -> Window | None:
    """The newest rows, for an online update of the served model: those since the detected change, else
    those the champion served (it has not learned from them); None when fewer than ONLINE_MIN_ROWS."""
    if since is not None and 0 <= since < len(rows):
        start = since
    else:
        served = np.flatnonzero(np.asarray(rows.version).astype(str) == champion)
        if not len(served):
            return None
        start = int(served[0])
    newest = rows.rows(slice(start, len(rows)))
    if len(newest) < ONLINE_MIN_ROWS:
        return None
    return Window(ONLINE, newest.X, newest.y, None, len(newest), 0)


def _climb(
    record: TrainingRecord,
    rungs: list[str],
    window: Window,
    best: dict[str, Any],
    predictions: dict[str, np.ndarray | None],
    validation: Labelled,
    work: Path,
    rule: Rule,
) -> ladder.Climb:
    """The ladder climbed on the chosen window (learning/ladder.py), every fit scored on validation."""

    def fit(family: str, rows: Window, tag: str) -> ladder.Scored:
        result, predicted = _scored(record, rows, validation, work / f"{family}-{tag}", rule, family=family)
        return ladder.Scored(result["score"], predicted, result.get("error"))

    flat = record.options.get("ladder_flat")
    return ladder.climb(
        rungs,
        record.task,
        window,
        validation.y.to_numpy(),
        fit,
        alpha=rule.alpha,
        seed=rule.seed,
        flat=None if flat is None else float(flat),
        first=ladder.Scored(best["score"], predictions.get(window.name)),
    )


def _candidate(record: TrainingRecord, window: Any, validation: Labelled, work: Path, rule: Rule) -> dict[str, Any]:
    """Train, convert and score one window on the validation slice (higher score is better)."""
    return _scored(record, window, validation, work, rule)[0]


def _scored(
    record: TrainingRecord,
    window: Any,
    validation: Labelled,
    work: Path,
    rule: Rule,
    *,
    mode: str | None = None,
    family: str | None = None,
) -> tuple[dict[str, Any], np.ndarray | None]:
    """Train, convert and score one window on the validation slice (higher score is better), and the
    challenger's answers there (None when it failed)."""
    mode = rule.mode if mode is None else mode
    result: dict[str, Any] = {"window": window.name, "rows": len(window.y), "score": None}
    if mode != rule.mode:
        result["mode"] = mode
    try:
        native = retrain_native(
            record,
            window.X,
            window.y,
            workdir=work,
            mode=mode,
            sample_weight=window.weight,
            seed=rule.seed,
            family=family,
        )
        conversion, _, passed = convert_checked(native, record, validation.X)
    except RecipeError as e:
        result["error"] = str(e)
        return result, None
    if not passed:
        result["error"] = "parity check failed"
        return result, None
    predicted = predict(conversion.model.SerializeToString(), record.inputs_from_features(validation.X))
    if record.task == CLASSIFICATION:
        result["score"] = float(np.mean(same_label(predicted, validation.y.to_numpy())))
        result["metric"] = "accuracy"
    else:
        result["score"] = -float(np.mean((predicted.astype(np.float64) - validation.y.to_numpy(np.float64)) ** 2))
        result["metric"] = "-mse"
    return result, predicted


def _paired(record: TrainingRecord, champion_dir: Path, challenger: bytes, test: Labelled, rule: Rule) -> Any:
    inputs = record.inputs_from_features(test.X)
    champion_pred = predict(champion_dir / "model.onnx", inputs)
    challenger_pred = predict(challenger, inputs)
    return compare(record.task, champion_pred, challenger_pred, test.y.to_numpy(), seed=rule.seed)


# -- the command ------------------------------------------------------------------------------------
def configure_parser(parser: argparse.ArgumentParser) -> None:
    # the model's name was the first positional argument: still taken, hidden, with a deprecation line
    parser.add_argument("positional_model", nargs="?", help=argparse.SUPPRESS)
    parser.add_argument("--model", help="the model to retrain (required)")
    parser.add_argument("--model-repository", type=Path, required=True)
    parser.add_argument("--predlog-dir", required=True, help="the prediction log: a directory or an object-store URI")
    add_rule_arguments(parser)
    parser.add_argument("--gateway", help="host:port of a gateway in explicit mode: told to load a promoted version")
    parser.add_argument("--json", action="store_true", help="print the decision as JSON instead of a table")


def add_rule_arguments(parser: argparse.ArgumentParser) -> None:
    default = Rule()
    parser.add_argument(
        "--margin",
        type=float,
        default=default.margin,
        help="least improvement to promote: accuracy points, or a share of the champion's MSE for regressors",
    )
    parser.add_argument(
        "--alpha",
        type=float,
        default=default.alpha,
        help="error budget over all runs against one champion (run k tests at alpha/(k(k+1)))",
    )
    parser.add_argument("--min-rows", type=int, default=default.min_rows, help="labelled rows needed to retrain")
    parser.add_argument(
        "--min-rows-after-change",
        type=int,
        default=default.min_rows_after_change,
        help="labelled rows since a detected change needed to retrain on it",
    )
    parser.add_argument("--test-fraction", type=float, default=default.test_fraction)
    parser.add_argument("--validation-fraction", type=float, default=default.validation_fraction)
    parser.add_argument("--mode", choices=("refit", "continue"), default=default.mode)
    parser.add_argument("--seed", type=int, default=default.seed)


def rule_from(args: argparse.Namespace) -> Rule:
    return Rule(
        args.margin,
        args.alpha,
        args.min_rows,
        args.test_fraction,
        args.validation_fraction,
        args.mode,
        args.seed,
        args.min_rows_after_change,
    )


def run(args: argparse.Namespace) -> int:
    decision = retrain(args.model_repository, args.model, args.predlog_dir, rule_from(args))
    if decision.outcome == PROMOTED and args.gateway:
        tell_gateway(args.gateway, args.model)
    if args.json:
        print(json.dumps(decision.to_json(), default=str))
    else:
        print(decisions.table([decision.to_json()]))
    return 1 if decision.outcome == FAILED else 0


def tell_gateway(address: str, name: str) -> None:
    """An explicit-mode gateway loads what it is told to: RepositoryModelLoad after a promotion."""
    from onnxgate.client import Client, OnnxgateError

    try:
        with Client(address, timeout=60) as client:
            client.load_model(name)
    except OnnxgateError as e:
        print(f"onnxgate retrain: promoted, but the gateway at {address} did not load it: {e}", file=sys.stderr)

"""`onnxgate learn`: the long-running loop that keeps every model with a training record learning.

Every `--interval-s`, per model (its policy in `<repository>/<model>/learning.toml`, all keys optional):

    retrain when   N new labels since the last run        retrain_after_labels = 500
              or   live accuracy / RMSE past a threshold   accuracy_below = 0.8 | rmse_above = 2.5
              or   input drift (PSI) past a threshold      drift_psi_above = 0.2 (over >= drift_min_rows inputs)
              or   a change in the champion's per-row loss (learning/change.py) with min_rows_after_change
                   rows since it; the same change again only with twice the rows the last decision had
    but never      within min_interval_s of the last run   min_interval_s = 600
    back off       after K rejected challengers in a row, N doubles (backoff_after = 3), until drift or
                   a quality drop re-arms it; the reason is recorded in the decision log and the state
    re-arm only    on new evidence: after a run that did not promote, against the same champion,
                   drift fires again only above drift_rearm_factor x the PSI that run saw (1.5), quality
                   only below what it saw by more than its noise, labels after N new ones
    promote with   margin, alpha, min_rows, test_fraction, validation_fraction, mode (retrain.Rule)

Drift is measured on the inputs the champion answered, against the rows it was trained on (its drift
reference, drift.reference_of). An unchanged log never retrains twice: every trigger needs evidence the
last decision did not see. Each decision records why it ran (`trigger`), what the loop saw (`seen`) and
what will make it run next (`next`).

The loop's state per model (`<model>/learning-state.json`, written atomically) survives restarts. A
retrain runs in this process, never in the gateway's; the gateway sees a promoted version by polling
the repository (or, in explicit mode, through `--gateway`). Hidden directories a killed publish left in
a model directory are removed at each pass.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import signal
import threading
import time
import tomllib
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server

from onnxgate.converters.publish import remove_leftovers
from onnxgate.learning import decisions
from onnxgate.learning.data import feedback_rows
from onnxgate.learning.decisions import FAILED, NOT_ENOUGH_DATA, PROMOTED, REJECTED, Decision
from onnxgate.learning.drift import DriftCollector, feature_drift, live_features, reference_of
from onnxgate.learning.evaluate import CLASSIFICATION, same_label
from onnxgate.learning.retrain import Rule, champion_change, champion_version, retrain, tell_gateway
from onnxgate.learning.training import TrainingRecord
from onnxgate.server.logfiles import LogFiles

log = logging.getLogger(__name__)

POLICY_FILE = "learning.toml"
STATE_FILE = "learning-state.json"


@dataclass(frozen=True)
class Policy:
    retrain_after_labels: int = 500
    accuracy_below: float | None = None
    rmse_above: float | None = None
    drift_psi_above: float | None = 0.2
    min_interval_s: float = 600.0
    backoff_after: int = 3
    quality_rows: int = 200  # the newest labelled rows live quality is measured on
    drift_rows: int = 2000  # the newest logged inputs drift is measured on
    drift_min_rows: int = 500  # fewer live rows: no drift measured (PSI over 10 bins is noise below this)
    # after a run that did not promote, drift fires again only above this many times the PSI it saw
    drift_rearm_factor: float = 1.5
    rule: Rule = field(default_factory=Rule)

    @classmethod
    def load(cls, model_dir: Path) -> Policy:
        path = model_dir / POLICY_FILE
        if not path.exists():
            return cls()
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
            raise ValueError(f"{path}: {e}") from None
        rule_keys = {f.name for f in dataclasses.fields(Rule)}
        own = {f.name for f in dataclasses.fields(cls)} - {"rule"}
        unknown = set(data) - rule_keys - own
        if unknown:
            raise ValueError(f"{path}: unknown keys {sorted(unknown)}; known: {sorted(own | rule_keys)}")
        rule = Rule(**{k: v for k, v in data.items() if k in rule_keys})
        return cls(**{k: v for k, v in data.items() if k in own}, rule=rule)


@dataclass
class State:
    labels_needed: int = 0  # N now (doubles when backing off); 0: the policy's
    labels_at_last_run: int = 0
    last_run: float = 0.0
    rejections_in_a_row: int = 0
    backoff_reason: str = ""
    last_trigger: str = ""
    history: list[str] = field(default_factory=list)
    # what the last decision saw, against which champion: a trigger needs evidence beyond it
    seen_version: str = ""
    seen_drift: float = 0.0  # the worst feature's PSI (0: not measured)
    seen_quality: float | None = None
    last_outcome: str = ""
    labels_next: int = 0  # new labels the next run waits for when fewer than labels_needed (0: labels_needed)
    # the change in the champion's loss the last decision saw (the time of its first row; "": none), the
    # labelled rows since it then, and the newest labelled row it saw (epoch seconds): a change found among
    # rows a decision already saw is that change again (each champion places it a few rows apart) and
    # triggers only with twice the rows; a change after them is new
    seen_change_at: str = ""
    seen_change_rows: int = 0
    seen_until: float = 0.0
    next: str = ""  # what makes the next run happen, as the last decision recorded it

    @classmethod
    def load(cls, model_dir: Path) -> State:
        try:
            data = json.loads((model_dir / STATE_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return cls()
        known = {f.name for f in dataclasses.fields(cls)}
        try:  # a key of a newer or older onnxgate is ignored, not a reason to forget the rest
            return cls(**{k: v for k, v in data.items() if k in known})
        except TypeError:
            return cls()

    def save(self, model_dir: Path) -> None:
        tmp = model_dir / f".{STATE_FILE}.tmp"
        tmp.write_text(json.dumps(dataclasses.asdict(self), indent=1), encoding="utf-8")
        os.replace(tmp, model_dir / STATE_FILE)


@dataclass
class Check:
    """What one tick measured for a model, and the trigger that fired (empty: none)."""

    labels: int
    new_labels: int
    quality: float | None
    drift: dict[str, float]
    trigger: str
    champion: str = ""
    drift_rows: int = 0  # the live inputs of the champion drift was measured on
    quality_rows: int = 0  # the labelled rows quality was measured on
    change_at: str = ""  # the newest change in the champion's loss: the time of its first row ("": none)
    change_s: float = 0.0  # ... in epoch seconds
    since_change: int = 0  # labelled rows since it
    until: float = 0.0  # the newest labelled row's time, epoch seconds

    @property
    def worst_drift(self) -> float:
        return max(self.drift.values(), default=0.0)

    def seen(self) -> dict[str, Any]:
        """The evidence a decision records."""
        worst = max(self.drift, key=lambda f: self.drift[f], default=None)
        return {
            "version": self.champion,
            "labels": self.labels,
            "new_labels": self.new_labels,
            "drift_psi": round(self.worst_drift, 6) if worst is not None else None,
            "drift_feature": worst,
            "drift_rows": self.drift_rows,
            "quality": None if self.quality is None else round(self.quality, 6),
            "quality_rows": self.quality_rows,
            "change_at": self.change_at or None,
            "since_change": self.since_change,
        }


class Learner:
    def __init__(self, repository: Path, log_location: str | Path, *, gateway: str | None = None) -> None:
        self.repository = repository
        self.log_location = log_location
        self.gateway = gateway
        self.registry = CollectorRegistry()
        self.runs = Counter(
            "onnxgate_learn_runs", "Retrain runs by outcome", ["model", "outcome"], registry=self.registry
        )
        self.seconds = Histogram(
            "onnxgate_learn_run_seconds", "Seconds per retrain run", ["model"], registry=self.registry,
            buckets=(1, 5, 15, 30, 60, 120, 300, 900, 1800),
        )  # fmt: skip
        self.drift = DriftCollector()
        self.registry.register(self.drift)

    def models(self) -> list[str]:
        out = []
        for model_dir in sorted(p for p in self.repository.iterdir() if p.is_dir()):
            try:
                champion_version(model_dir)
            except Exception:  # no version with a training record: not ours to retrain
                continue
            out.append(model_dir.name)
        return out

    def tick(self, now: float | None = None) -> list[Decision]:
        """One pass over every model: check the triggers, retrain where one fires."""
        now = time.time() if now is None else now
        made = []
        names = self.models()
        self.drift.keep_models(set(names))
        for name in names:
            try:
                decision = self.tick_model(name, now)
            except Exception:  # one model's trouble must not stop the others
                log.exception("learn: %s", name)
                continue
            if decision is not None:
                made.append(decision)
        return made

    def tick_model(self, name: str, now: float) -> Decision | None:
        model_dir = self.repository / name
        remove_leftovers(model_dir)  # what a publish killed mid-write left aside
        policy = Policy.load(model_dir)
        state = State.load(model_dir)
        if not state.labels_needed:
            state.labels_needed = policy.retrain_after_labels
        check = self.check(name, policy, state)
        if not check.trigger:
            state.save(model_dir)
            return None
        if now - state.last_run < policy.min_interval_s:
            log.info("learn: %s: %s, but the last run was %.0fs ago", name, check.trigger, now - state.last_run)
            state.save(model_dir)
            return None
        started = time.monotonic()
        backed_off: list[Decision] = []
        completed: list[Decision] = []

        def complete(decision: Decision) -> None:  # before the decision is written: what was seen, what next
            if not completed:
                completed.append(decision)
                backed_off.extend(self._after(decision, check, policy, state, now))

        try:
            with decisions.completing(complete):
                decision = retrain(self.repository, name, self.log_location, policy.rule, trigger=check.trigger)
        except Exception:
            # a crash counts as a decision for re-arming: the same evidence does not run it again
            complete(Decision(name, FAILED, "the retrain crashed", check.champion, trigger=check.trigger))
            state.save(model_dir)
            raise
        complete(decision)  # a decision not written through `append` (none is, today)
        self.seconds.labels(name).observe(time.monotonic() - started)
        self.runs.labels(name, decision.outcome).inc()
        for extra in backed_off:
            decisions.append(model_dir, extra)
        state.save(model_dir)
        if decision.outcome == PROMOTED and self.gateway:
            tell_gateway(self.gateway, name)
        return decision

    def check(self, name: str, policy: Policy, state: State) -> Check:
        """Measure labels, live quality and the champion's input drift; fire a trigger only on evidence the
        last decision against this champion did not see (`bars`)."""
        model_dir = self.repository / name
        champion = champion_version(model_dir)
        record = TrainingRecord.load(model_dir / champion)
        logfiles = LogFiles.at(self.log_location)
        labelled = feedback_rows(logfiles, name, record)
        labels = len(labelled)
        quality = _quality(record, labelled, policy.quality_rows, model_dir / champion)
        self.drift.keep_only(name, champion)  # a retired version's series stops, it does not freeze
        live = live_features(logfiles, name, champion, since_s=None, max_rows=policy.drift_rows, columns=record.columns)
        drift: dict[str, float] = {}
        if len(live) >= policy.drift_min_rows:
            reference = reference_of(model_dir / champion, record)
            results = feature_drift(reference, live[[c for c in reference.columns if c in live]])
            drift = {feature: d.psi for feature, d in results.items() if not math.isnan(d.psi)}
            self.drift.update(name, champion, results)
        new_labels = labels - state.labels_at_last_run
        check = Check(labels, new_labels, quality, drift, "", champion, len(live), min(labels, policy.quality_rows))
        change = champion_change(record, model_dir / champion, labelled)
        if labels:
            check.until = _epoch_s(labelled.at[-1])
        if change is not None:
            check.change_at, check.change_s = str(labelled.at[change.index]), _epoch_s(labelled.at[change.index])
            check.since_change = labels - change.index
        drift_bar, quality_bar = bars(record, policy, state, champion)
        worst = check.worst_drift
        trigger = ""
        if drift_bar is not None and worst > drift_bar:
            trigger = f"drift: PSI {worst:.3f} > {drift_bar:.3g}" + _since(drift_bar, policy.drift_psi_above)
        elif quality is not None and quality_bar is not None and _past(record, quality, quality_bar):
            trigger = f"quality: {_metric(record)} {quality:.4f} past {quality_bar:.4g}" + _since(
                quality_bar, _threshold(record, policy)
            )
        elif change is not None and check.since_change >= change_bar(policy, state, check.change_s):
            trigger = f"change: {change.describe()}"
        elif new_labels >= (state.labels_next or state.labels_needed):
            trigger = f"labels: {new_labels} new >= {state.labels_next or state.labels_needed}"
        if trigger.startswith(("drift", "quality")) and state.labels_needed != policy.retrain_after_labels:
            state.history.append(f"re-armed by {trigger}")  # a real signal: the label trigger counts from N again
            state.labels_needed, state.rejections_in_a_row, state.backoff_reason = policy.retrain_after_labels, 0, ""
        state.last_trigger = trigger
        check.trigger = trigger
        return check

    def _after(self, decision: Decision, check: Check, policy: Policy, state: State, now: float) -> list[Decision]:
        """The state after a decision, and the decision's `seen` and `next`; returns the "backed off"
        decision to append after it, if the label trigger backs off."""
        state.last_run = now
        state.labels_at_last_run = check.labels
        state.last_outcome = decision.outcome
        state.seen_version = check.champion or (decision.champion or "")
        state.seen_drift = check.worst_drift
        state.seen_quality = check.quality
        state.seen_change_at, state.seen_change_rows = check.change_at, check.since_change
        state.seen_until = check.until
        # too few rows to train and test: min_rows new labels are enough new evidence to try again
        state.labels_next = min(state.labels_needed, policy.rule.min_rows) if decision.outcome == NOT_ENOUGH_DATA else 0
        extra: list[Decision] = []
        if decision.outcome == REJECTED:
            state.rejections_in_a_row += 1
            if state.rejections_in_a_row >= policy.backoff_after:
                state.labels_needed *= 2
                state.rejections_in_a_row = 0
                state.backoff_reason = (
                    f"{policy.backoff_after} challengers in a row were not significantly better: iterating no "
                    f"longer pays at this rate of labels; the label trigger now waits for {state.labels_needed}"
                )
                state.history.append(state.backoff_reason)
                extra.append(
                    Decision(
                        decision.model, "backed off", state.backoff_reason, decision.champion, trigger=decision.trigger
                    )
                )
        elif decision.outcome == PROMOTED:
            state.rejections_in_a_row = 0
        record = TrainingRecord.load(self.repository / decision.model / check.champion)
        # after a promotion the new version is the champion: its inputs, against its own reference
        champion = decision.version if decision.outcome == PROMOTED and decision.version else check.champion
        state.next = next_run(record, policy, state, champion, check.labels)
        decision.seen = check.seen()
        decision.next = state.next
        for d in extra:
            d.seen, d.next = decision.seen, state.next
        return extra

    def serve(self, interval_s: float, stop: threading.Event) -> None:
        while not stop.is_set():
            for decision in self.tick():
                log.info("learn: %s: %s (%s): %s", decision.model, decision.outcome, decision.trigger, decision.reason)
            stop.wait(interval_s)


def _quality(record: TrainingRecord, labelled: Any, rows: int, champion_dir: Path) -> float | None:
    """Live quality of the served version on its newest labelled predictions (from the log's join)."""
    if not len(labelled):
        return None
    recent = labelled.rows(slice(max(0, len(labelled) - rows), len(labelled)))
    from onnxgate.learning.evaluate import predict

    predicted = predict(champion_dir / "model.onnx", record.inputs_from_features(recent.X))
    if record.task == CLASSIFICATION:
        return float(np.mean(same_label(predicted, recent.y.to_numpy())))
    return float(np.sqrt(np.mean((predicted.astype(np.float64) - recent.y.to_numpy(np.float64)) ** 2)))


# -- re-arming ---------------------------------------------------------------------------------------------
# After a run that did not promote, the same champion, the same evidence: nothing runs again. Drift must
# reach drift_rearm_factor x the worst PSI the last decision saw (when that was past the threshold; else
# the threshold); live quality must be worse than what it saw by more than its noise: accuracy by two
# standard errors of a proportion over the rows it is measured on (at least QUALITY_MIN_DROP), RMSE by
# RMSE_REARM_FACTOR; labels count from the last run (N of them, or after "not enough data" min_rows, when
# fewer). A promotion starts afresh: the new champion's own
# inputs against its own reference, quality against the thresholds.
QUALITY_MIN_DROP = 0.02
RMSE_REARM_FACTOR = 1.1


def bars(record: TrainingRecord, policy: Policy, state: State, champion: str) -> tuple[float | None, float | None]:
    """(drift PSI, quality) a trigger must get past now; None: that trigger is off."""
    gated = state.seen_version == champion and state.last_outcome not in ("", PROMOTED)
    drift_bar = policy.drift_psi_above
    if drift_bar is not None and gated and state.seen_drift > drift_bar:
        drift_bar = state.seen_drift * policy.drift_rearm_factor
    quality_bar = _threshold(record, policy)
    seen = state.seen_quality
    if quality_bar is not None and gated and seen is not None and _past(record, seen, quality_bar):
        if record.task == CLASSIFICATION:
            drop = max(QUALITY_MIN_DROP, 2 * math.sqrt(max(seen * (1 - seen), 0.0) / max(policy.quality_rows, 1)))
            quality_bar = seen - drop
        else:
            quality_bar = seen * RMSE_REARM_FACTOR
    return drift_bar, quality_bar


def next_run(record: TrainingRecord, policy: Policy, state: State, champion: str, labels: int) -> str:
    """What makes the loop run next, in words (the `next` of a decision)."""
    drift_bar, quality_bar = bars(record, policy, state, champion)
    needed = state.labels_next or state.labels_needed
    parts = [f"after {needed} more labels ({labels + needed} labelled)"]
    if drift_bar is not None:
        parts.append(f"drift PSI above {drift_bar:.3g} on version {champion}'s inputs")
    if quality_bar is not None:
        parts.append(f"{_metric(record)} {'below' if record.task == CLASSIFICATION else 'above'} {quality_bar:.3g}")
    if state.seen_change_at:
        rows = change_bar(policy, state, state.seen_until)
        parts.append(f"{rows} labelled rows since the change at {state.seen_change_at}, or a newer change")
    else:
        parts.append(f"a change in its loss with {policy.rule.min_rows_after_change} labelled rows since")
    text = ", or ".join(parts)
    if policy.min_interval_s > 0:
        text += f"; not within {policy.min_interval_s:g}s of this run"
    return text


def change_bar(policy: Policy, state: State, change_s: float) -> int:
    """Labelled rows since a change the change trigger needs: min_rows_after_change for a change after every row the
    last decision saw; for one among them (the change it saw), twice the rows it had since its change
    (each run on it has twice the evidence: a change is retrained on a few times, geometrically, not on
    every pass)."""
    if state.seen_change_at and change_s <= state.seen_until:
        return max(policy.rule.min_rows_after_change, 2 * state.seen_change_rows)
    return policy.rule.min_rows_after_change


def _epoch_s(at: Any) -> float:
    return float(np.datetime64(at, "us").astype(np.int64)) / 1e6


def _threshold(record: TrainingRecord, policy: Policy) -> float | None:
    return policy.accuracy_below if record.task == CLASSIFICATION else policy.rmse_above


def _metric(record: TrainingRecord) -> str:
    return "accuracy" if record.task == CLASSIFICATION else "RMSE"


def _past(record: TrainingRecord, quality: float, bar: float) -> bool:
    return quality < bar if record.task == CLASSIFICATION else quality > bar


def _since(bar: float, threshold: float | None) -> str:
    return "" if threshold is None or bar == threshold else " (grown past what the last decision saw)"


# -- the command ------------------------------------------------------------------------------------
def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model-repository", type=Path, required=True)
    parser.add_argument("--predlog-dir", required=True, help="the prediction log: a directory or an object-store URI")
    parser.add_argument("--interval-s", type=float, default=60.0, help="seconds between checks")
    parser.add_argument("--metrics-port", type=int, default=-1, help="Prometheus metrics of the loop (-1: off)")
    parser.add_argument("--host", default="127.0.0.1", help="address of the metrics port")
    parser.add_argument("--gateway", help="host:port of a gateway in explicit mode: told to load promoted versions")
    parser.add_argument("--once", action="store_true", help="one pass over the models, then exit")


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.model_repository.is_dir():
        print(f"onnxgate learn: model repository {args.model_repository} is not a directory", flush=True)
        return 2
    learner = Learner(args.model_repository, args.predlog_dir, gateway=args.gateway)
    if args.metrics_port >= 0:
        start_http_server(args.metrics_port, addr=args.host, registry=learner.registry)
    if args.once:
        for d in learner.tick():
            print(decisions.table([d.to_json()]), flush=True)
        return 0
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    print(
        f"onnxgate learn: watching {args.model_repository} every {args.interval_s}s "
        f"(since {datetime.now(UTC).isoformat(timespec='seconds')})",
        flush=True,
    )
    learner.serve(args.interval_s, stop)
    return 0

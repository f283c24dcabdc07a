"""`onnxgate learn`: the long-running loop that keeps every model with a training record learning.

Every `--interval-s`, per model (its policy in `<repository>/<model>/learning.toml`, all keys optional):

    retrain when   N new labels since the last run        retrain_after_labels = 500
              or   live accuracy / RMSE past a threshold   accuracy_below = 0.8 | rmse_above = 2.5
              or   input drift (PSI) past a threshold      drift_psi_above = 0.2 (over >= drift_min_rows inputs)
    but never      within min_interval_s of the last run   min_interval_s = 600
    back off       after K rejected challengers in a row, N doubles (backoff_after = 3), until drift or
                   a quality drop re-arms it; the reason is recorded in the decision log and the state
    promote with   margin, alpha, min_rows, test_fraction, validation_fraction, mode (retrain.Rule)

The loop's state per model (`<model>/learning-state.json`, written atomically) survives restarts. A
retrain runs in this process, never in the gateway's; the gateway sees a promoted version by polling
the repository (or, in explicit mode, through `--gateway`).
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

from onnxgate.learning import decisions
from onnxgate.learning.data import feedback_rows
from onnxgate.learning.decisions import PROMOTED, REJECTED, Decision
from onnxgate.learning.drift import DriftCollector, feature_drift, live_features
from onnxgate.learning.evaluate import CLASSIFICATION, same_label
from onnxgate.learning.retrain import Rule, champion_version, retrain, tell_gateway
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

    @classmethod
    def load(cls, model_dir: Path) -> State:
        try:
            return cls(**json.loads((model_dir / STATE_FILE).read_text(encoding="utf-8")))
        except (OSError, ValueError, TypeError):
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
        for name in self.models():
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
        decision = retrain(self.repository, name, self.log_location, policy.rule, trigger=check.trigger)
        self.seconds.labels(name).observe(time.monotonic() - started)
        self.runs.labels(name, decision.outcome).inc()
        self._after(decision, check, policy, state, now)
        state.save(model_dir)
        if decision.outcome == PROMOTED and self.gateway:
            tell_gateway(self.gateway, name)
        return decision

    def check(self, name: str, policy: Policy, state: State) -> Check:
        model_dir = self.repository / name
        champion = champion_version(model_dir)
        record = TrainingRecord.load(model_dir / champion)
        logfiles = LogFiles.at(self.log_location)
        labelled = feedback_rows(logfiles, name, record)
        labels = len(labelled)
        quality = _quality(record, labelled, policy.quality_rows, model_dir / champion)
        live = live_features(logfiles, name, None, since_s=None, max_rows=policy.drift_rows, columns=record.columns)
        drift: dict[str, float] = {}
        if len(live) >= policy.drift_min_rows:
            base_X, _ = record.base_data()
            results = feature_drift(base_X, live[[c for c in base_X.columns if c in live]])
            drift = {feature: d.psi for feature, d in results.items() if not math.isnan(d.psi)}
            self.drift.update(name, champion, results)
        trigger = ""
        new_labels = labels - state.labels_at_last_run
        worst = max(drift.values(), default=0.0)
        if policy.drift_psi_above is not None and worst > policy.drift_psi_above:
            trigger = f"drift: PSI {worst:.3f} > {policy.drift_psi_above}"
        elif quality is not None and _dropped(record, quality, policy):
            trigger = f"quality: {quality:.4f} past its threshold"
        elif new_labels >= state.labels_needed:
            trigger = f"labels: {new_labels} new >= {state.labels_needed}"
        if trigger.startswith(("drift", "quality")) and state.labels_needed != policy.retrain_after_labels:
            state.history.append(f"re-armed by {trigger}")  # a real signal: the label trigger counts from N again
            state.labels_needed, state.rejections_in_a_row, state.backoff_reason = policy.retrain_after_labels, 0, ""
        state.last_trigger = trigger
        return Check(labels, new_labels, quality, drift, trigger)

    def _after(self, decision: Decision, check: Check, policy: Policy, state: State, now: float) -> None:
        state.last_run = now
        state.labels_at_last_run = check.labels
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
                decisions.append(
                    self.repository / decision.model,
                    Decision(
                        decision.model, "backed off", state.backoff_reason, decision.champion, trigger=decision.trigger
                    ),
                )
        elif decision.outcome == PROMOTED:
            state.rejections_in_a_row = 0

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


def _dropped(record: TrainingRecord, quality: float, policy: Policy) -> bool:
    if record.task == CLASSIFICATION:
        return policy.accuracy_below is not None and quality < policy.accuracy_below
    return policy.rmse_above is not None and quality > policy.rmse_above


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

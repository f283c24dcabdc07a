"""`onnxgate models show --model NAME`: a model's versions and lineage, which of them are served, the learning
loop's decisions and state, and (with --predlog-dir) the drift of the inputs the newest trainable version
answered against the rows it was trained on (its drift reference, or its base data).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from onnxgate.converters.publish import versions
from onnxgate.learning import decisions
from onnxgate.learning.decisions import MODEL_CARD_FILE
from onnxgate.learning.drift import feature_drift, live_features, reference_of
from onnxgate.learning.learn import STATE_FILE, Policy
from onnxgate.learning.training import TrainingRecord
from onnxgate.server.logfiles import LogFiles
from onnxgate.server.modelspec import CONFIG_FILE, ConfigError, read_config, version_policy


def describe(repository: Path, name: str, log_location: str | None, *, drift_rows: int = 2000) -> dict[str, Any]:
    model_dir = repository / name
    if not model_dir.is_dir():
        raise ValueError(f"no model {name!r} in {repository}")
    available = versions(model_dir)
    policy = version_policy(read_config(model_dir / CONFIG_FILE)) if (model_dir / CONFIG_FILE).is_file() else None
    served = policy.select(available) if policy is not None else available[-1:]
    rows = []
    for v in available:
        vdir = model_dir / str(v)
        card = json.loads((vdir / MODEL_CARD_FILE).read_text()) if (vdir / MODEL_CARD_FILE).is_file() else {}
        record = TrainingRecord.load(vdir) if TrainingRecord.exists(vdir) else None
        rows.append(
            {
                "version": str(v),
                "served": v in served,
                "recipe": record.recipe if record else None,
                "parent": card.get("parent_version"),
                "window": card.get("window"),
                "evaluation": card.get("evaluation"),
            }
        )
    out: dict[str, Any] = {"model": name, "versions": rows, "decisions": decisions.read(model_dir)}
    state = model_dir / STATE_FILE
    out["learning"] = {"policy": Policy.load(model_dir).__dict__ | {"rule": Policy.load(model_dir).rule.__dict__}}
    if state.is_file():
        out["learning"]["state"] = json.loads(state.read_text())
    newest = next((r for r in reversed(rows) if r["recipe"]), None)
    if log_location and newest is not None:
        record = TrainingRecord.load(model_dir / newest["version"])
        live = live_features(
            LogFiles.at(log_location),
            name,
            newest["version"],
            since_s=None,
            max_rows=drift_rows,
            columns=record.columns,
        )
        if len(live):
            reference = reference_of(model_dir / newest["version"], record)
            out["drift_version"] = newest["version"]
            out["drift"] = {
                feature: d.as_dict()
                for feature, d in feature_drift(reference, live[[c for c in reference if c in live]]).items()
            }
    return out


def text(info: dict[str, Any]) -> str:
    lines = [
        f"model {info['model']}",
        "",
        f"{'version':>7} {'served':>6} {'recipe':<10} {'parent':>6} {'window':<18} evaluation",
    ]
    for r in info["versions"]:
        ev = r["evaluation"] or {}
        summary = (
            f"{ev.get('metric', '')} {ev.get('champion', '')} -> {ev.get('challenger', '')}, p={ev.get('p_value', '')}"
            if ev
            else ""
        )
        lines.append(
            f"{r['version']:>7} {'yes' if r['served'] else '':>6} {r['recipe'] or '-':<10} {r['parent'] or '-':>6} "
            f"{r['window'] or '-':<18} {summary}"
        )
    state = info["learning"].get("state")
    if state:
        lines += [
            "",
            f"learning: label trigger at {state.get('labels_needed')} new labels; last trigger: {state.get('last_trigger') or '-'}",
        ]
        if state.get("backoff_reason"):
            lines.append(f"  backed off: {state['backoff_reason']}")
        if state.get("next"):
            lines.append(f"  next run: {state['next']}")
    if info["decisions"]:
        lines += ["", decisions.table(info["decisions"][-10:])]
    if "drift" in info:
        lines += ["", f"drift of version {info.get('drift_version')}'s inputs against its training rows"]
        lines += [f"{'feature':<20} {'test':<5} {'PSI':>8} {'statistic':>10} {'p':>10}"]
        for feature, d in sorted(info["drift"].items(), key=lambda kv: -(kv[1].get("psi") or 0)):
            psi = d.get("psi")
            lines.append(
                f"{feature:<20} {d.get('test', ''):<5} {'-' if psi is None or math.isnan(psi) else f'{psi:.3f}':>8} "
                f"{_g(d.get('statistic')):>10} {_g(d.get('p_value')):>10}"
            )
    return "\n".join(lines)


def _g(value: object) -> str:
    return f"{value:.3g}" if isinstance(value, float) else "-"


def configure_parser(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="models_command", required=True)
    show = sub.add_parser("show", help="versions, lineage, decisions and drift of one model")
    # the model's name was the first positional argument: still taken, hidden, with a deprecation line
    show.add_argument("positional_model", nargs="?", help=argparse.SUPPRESS)
    show.add_argument("--model", help="the model (required)")
    show.add_argument("--model-repository", type=Path, required=True)
    show.add_argument("--predlog-dir", help="the prediction log, for the drift of live inputs")
    show.add_argument("--json", action="store_true")


def run(args: argparse.Namespace) -> int:
    try:
        info = describe(args.model_repository, args.model, args.predlog_dir)
    except (ValueError, ConfigError, OSError) as e:
        print(f"onnxgate models: {e}", file=sys.stderr)
        return 2
    print(json.dumps(info, indent=1, default=str) if args.json else text(info))
    return 0

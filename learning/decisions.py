"""Every retrain's decision, kept: the model's decision log and the new version's model card.

    <repository>/<model>/decisions.jsonl     one JSON object per run, appended and fsynced
    <repository>/<model>/<version>/model_card.json   lineage of a version the loop published

The gateway ignores both (only numeric directories are versions). A decision is recorded whatever the
outcome: promoted, rejected, not enough data, failed; with the numbers it was made on. A run of the
learning loop also records why it ran (`trigger`), what the loop saw when it decided (`seen`: labels,
worst drift PSI, live quality) and what will make it run next (`next`); the loop fills those in through
`completing` before the decision is written.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from onnxgate.server.experiments import DECISIONS_FILE, append_decision

MODEL_CARD_FILE = "model_card.json"

PROMOTED = "promoted"
REJECTED = "rejected"
NOT_ENOUGH_DATA = "not enough data"
FAILED = "failed"


@dataclass
class Decision:
    model: str
    outcome: str  # promoted | rejected | not enough data | failed
    reason: str
    champion: str | None = None  # the version the challenger was measured against
    version: str | None = None  # the version published (promoted only)
    window: str | None = None  # the training window chosen on the validation slice
    test: dict[str, Any] | None = None  # the paired test (learning/stats.py) on the test slice
    candidates: list[dict[str, Any]] = field(default_factory=list)  # each window's validation result
    rows: dict[str, int] = field(default_factory=dict)  # train / validation / test / base
    trigger: str = "manual"
    seconds: float = 0.0
    at: float = field(default_factory=time.time)
    seen: dict[str, Any] = field(default_factory=dict)  # the loop's evidence: labels, drift_psi, quality
    next: str = ""  # what makes the loop run next, e.g. "after 1000 more labels, or drift PSI above 0.84"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


_completing: contextvars.ContextVar[Callable[[Decision], None] | None] = contextvars.ContextVar(
    "onnxgate_decision_completing", default=None
)


@contextlib.contextmanager
def completing(complete: Callable[[Decision], None]) -> Iterator[None]:
    """Within the block, `append` first hands each decision to `complete` (which may fill in fields,
    e.g. the loop's `seen` and `next`), then writes it."""
    token = _completing.set(complete)
    try:
        yield
    finally:
        _completing.reset(token)


def append(model_dir: Path, decision: Decision) -> None:
    """Append one decision durably, in the log the gateway's live decisions go to too."""
    complete = _completing.get()
    if complete is not None:
        _completing.set(None)  # what `complete` appends itself is written as it is
        try:
            complete(decision)
        finally:
            _completing.set(complete)
    append_decision(model_dir, decision.to_json())


def read(model_dir: Path) -> list[dict[str, Any]]:
    """The decision log, oldest first; a torn last line (a crash mid-append) is skipped."""
    path = model_dir / DECISIONS_FILE
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def table(decisions: list[dict[str, Any]]) -> str:
    """A short table of decisions for people (what `retrain` prints and `models show` lists)."""
    header = (
        f"{'when (UTC)':<20} {'outcome':<16} {'champion':>8} {'new':>5} {'window':<18} {'metric':>17} {'p':>8}  reason"
    )
    lines = [header]
    for d in decisions:
        test = d.get("test") or {}
        metric = ""
        if test:
            metric = f"{_num(test.get('champion'))} -> {_num(test.get('challenger'))}"
        p = test.get("p_value")
        lines.append(
            f"{time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(d.get('at', 0))):<20} {d.get('outcome', ''):<16} "
            f"{d.get('champion') or '-':>8} {d.get('version') or '-':>5} {d.get('window') or '-':<18} {metric:>17} "
            f"{'-' if p is None else f'{p:.3g}':>8}  {d.get('reason', '')}"
        )
    return "\n".join(lines)


def _num(value: object) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)

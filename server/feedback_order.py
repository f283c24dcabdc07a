"""Which feedback of a prediction is its truth, and which messages are duplicates.

One rule, used by the feedback store when it answers a message and by the join that trains and
measures on the log, so both always agree.

Order. The feedback of one prediction is ordered by `order_key`:
    (event time, stamp, replica, feedback id)
- event time: the client's `sent_at` when it sent one, else the stamp;
- stamp (`ts`): the receiving replica's hybrid clock: the wall clock, but never earlier than the
  replica's previous stamp nor than any feedback stamp it has read from other replicas. A clock that
  steps back cannot reorder one replica's messages; a replica whose clock is behind still stamps past
  feedback it has seen (at start and at every join).
Limit: two replicas whose clocks disagree, receiving a message and its correction within one join
interval, order them by their clocks; a client that sends `sent_at` is ordered by its own clock.

Duplicates. A message is a duplicate when its (prediction id, feedback id) is already stored, or when
its content (truth, reward, model, version) equals the content of the prediction's current truth: a
resend. Any other content is a correction, even back to an earlier value (A, then B, then A: A).
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from collections.abc import Iterable
from datetime import datetime
from typing import Any

Row = dict[str, Any]


def content_hash(
    model: str, version: str, label: str | None, value: float | None, tensors: Any, reward: float | None
) -> str:
    """A stable digest of what a feedback message says (not who sent it or when)."""
    text = json.dumps([model, version, label, value, tensors, reward], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def row_content(row: Row) -> str:
    """The content digest of a stored row (rows written before the column existed get it computed)."""
    stored = row.get("content")
    if stored:
        return str(stored)
    tensors = None if row["tensors"] is None else [list(t.values()) for t in row["tensors"]]
    return content_hash(row["model"], row["version"], row["label"], row["value"], tensors, row["reward"])


def order_key(row: Row) -> tuple[datetime, datetime, str, str]:
    ts: datetime = row["ts"]
    sent: datetime | None = row.get("sent_at")
    return (sent or ts, ts, row["replica"] or "", row["feedback_id"])


class FeedbackIndex:
    """The latest feedback per prediction id, and what was stored, for duplicate checks."""

    def __init__(self) -> None:
        # ordered by when a prediction's truth last changed; an OrderedDict, since the feedback store
        # forgets from its front (a plain dict would walk past every slot deleted there)
        self.latest: OrderedDict[str, Row] = OrderedDict()
        self._ids: dict[str, set[str]] = {}  # prediction id -> its stored feedback ids
        self.distinct = 0
        self.duplicates = 0

    @classmethod
    def of(cls, rows: Iterable[Row]) -> FeedbackIndex:
        """Rows in any order (several replicas' files): applied in the feedback order."""
        index = cls()
        for row in sorted(rows, key=order_key):
            index.add(row)
        return index

    def duplicate_of(self, prediction_id: str, feedback_id: str, content: str) -> str | None:
        """The stored feedback id this message repeats, or None when it is new."""
        if feedback_id and self.has_id(prediction_id, feedback_id):
            return feedback_id
        current = self.latest.get(prediction_id)
        if current is not None and row_content(current) == content:
            return str(current["feedback_id"])
        return None

    def has_id(self, prediction_id: str, feedback_id: str) -> bool:
        return feedback_id in self._ids.get(prediction_id, ())

    def add(self, row: Row) -> bool:
        """Take a stored row into account; False when it is a duplicate."""
        pid = row["prediction_id"]
        if self.duplicate_of(pid, row["feedback_id"], row_content(row)) is not None:
            self.duplicates += 1
            return False
        self._ids.setdefault(pid, set()).add(row["feedback_id"])
        self.distinct += 1
        current = self.latest.get(pid)
        if current is None or order_key(row) > order_key(current):
            self.latest.pop(pid, None)  # re-inserted at the end: `latest` stays in order of change
            self.latest[pid] = row
        return True

    def forget(self, prediction_id: str) -> None:
        """Drop a prediction's feedback (bounded memory: it left the window of the live join)."""
        self.latest.pop(prediction_id, None)
        self._ids.pop(prediction_id, None)

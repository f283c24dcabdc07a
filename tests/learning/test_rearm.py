"""The learning loop stops: a trigger re-arms only on new evidence, an unchanged log never retrains twice
(restarts included), and drift is measured on the inputs the champion answered against the rows it was
trained on. Real gateways log real clients' requests; the Learner retrains on that log."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from onnxgate.client import Client
from onnxgate.converters.publish import versions
from onnxgate.learning import decisions
from onnxgate.learning.demo import FEATURES, concept
from onnxgate.learning.drift import REFERENCE_FILE, feature_drift, live_features, reference_of
from onnxgate.learning.learn import POLICY_FILE, Learner, Policy, State, bars, next_run
from onnxgate.learning.training import TrainingRecord
from onnxgate.server.logfiles import LogFiles
from tests.conftest import GatewayHandle
from tests.learning.test_loop import _convert, _flush, _serve, _stream


def _inputs(address: str, frame: pd.DataFrame) -> list[str]:
    """One request per row, no ground truth; the versions that answered."""
    x = frame[FEATURES].to_numpy(np.float32)
    with Client(address) as client:
        return [client.infer("m", {"input": x[i : i + 1]}).version for i in range(len(x))]


def _dead_writers_leftover(model_dir: Path) -> Path:
    """A hidden directory as a publish killed mid-write leaves it (its writer's pid no longer runs)."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait(30)
    host = "".join(c if c.isalnum() or c == "." else "_" for c in socket.gethostname())[:64]
    leftover = model_dir / f".tmp-{dead.pid}-0f0f-{host}"
    leftover.mkdir()
    (leftover / "model.onnx").write_bytes(b"half a model")
    return leftover


def test_an_unchanged_log_never_retrains_twice_and_new_drift_re_arms(
    tmp_path: Path, start_gateway: Callable[..., GatewayHandle]
) -> None:
    rng = np.random.default_rng(21)
    repo = _convert(tmp_path, concept("A", 1000, rng))
    (repo / "m" / POLICY_FILE).write_text(
        "retrain_after_labels = 100000\ndrift_psi_above = 0.2\ndrift_min_rows = 300\nmin_interval_s = 0\n"
        "min_rows = 100\n"
    )
    gw = _serve(start_gateway, repo, tmp_path / "log")
    moved = concept("A", 400, rng)
    moved["x2"] += 1.0  # the inputs move, the concept does not: no challenger is better
    _stream(gw.address, "m", moved)
    _flush(gw)
    learner = Learner(repo, str(tmp_path / "log"))
    made = [d for _ in range(4) for d in learner.tick()]
    assert len(made) == 1 and made[0].outcome != "promoted", made
    assert made[0].trigger.startswith("drift: PSI")
    [logged] = decisions.read(repo / "m")
    seen = logged["seen"]["drift_psi"]
    assert logged["seen"]["version"] == "1" and logged["seen"]["drift_feature"] == "x2" and seen > 0.5
    assert logged["seen"]["labels"] == 400 and logged["seen"]["drift_rows"] == 400
    assert f"drift PSI above {seen * 1.5:.3g} on version 1's inputs" in logged["next"], logged["next"]
    assert "after 100000 more labels (100400 labelled)" in logged["next"]
    assert State.load(repo / "m").next == logged["next"]
    # restarted on the unchanged log: no run, however often it looks; a dead publish's leftovers go
    leftover = _dead_writers_leftover(repo / "m")
    for _ in range(3):
        assert Learner(repo, str(tmp_path / "log")).tick() == []
    assert len(decisions.read(repo / "m")) == 1
    assert not leftover.exists()
    # new evidence: the inputs move further, past 1.5 x what the decision saw
    further = concept("A", 600, rng)
    further["x2"] += 5.0
    _inputs(gw.address, further)
    _flush(gw)
    [again] = learner.tick()
    assert again.trigger.startswith("drift: PSI") and "grown past what the last decision saw" in again.trigger
    assert again.seen["drift_psi"] > 1.5 * seen
    assert [learner.tick() for _ in range(2)] == [[], []]
    assert len([d for d in decisions.read(repo / "m") if d["outcome"] != "backed off"]) == 2


def test_drift_is_measured_on_the_champions_inputs_against_what_it_was_trained_on(
    tmp_path: Path, start_gateway: Callable[..., GatewayHandle]
) -> None:
    rng = np.random.default_rng(22)
    repo = _convert(tmp_path, concept("A", 1000, rng))
    (repo / "m" / POLICY_FILE).write_text(
        "retrain_after_labels = 100000\ndrift_psi_above = 0.2\ndrift_min_rows = 300\nmin_interval_s = 0\n"
        "min_rows = 300\n"
    )
    gw = start_gateway(repo, model_control_mode="explicit", load_model=("m",), predlog_dir=str(tmp_path / "log"),
                       predlog_flush_ms=20.0, predlog_join_interval_s=3600.0)  # fmt: skip

    def new_concept(n: int) -> pd.DataFrame:  # the inputs and the rule both change
        frame = concept("B", n, rng)
        frame["x2"] += 2.0
        frame["y"] = ((frame["x0"] - frame["x1"] + 0.5 * (frame["x2"] - 2.0)) > 0).astype(np.int64)
        return frame

    _stream(gw.address, "m", new_concept(800))
    _flush(gw)
    learner = Learner(repo, str(tmp_path / "log"), gateway=gw.address)
    [promoted] = learner.tick()
    assert promoted.outcome == "promoted" and promoted.trigger.startswith("drift"), promoted
    assert versions(repo / "m") == [1, 2]

    def psi(version: str) -> float | None:
        labels = {"model": "m", "version": version, "feature": "x2"}
        return learner.registry.get_sample_value("onnxgate_drift_psi", labels)

    assert psi("1") is not None and psi("1") > 1.0  # type: ignore[operator]
    # version 2 keeps the rows it was trained on, and is compared with them
    v2 = repo / "m" / "2"
    card = json.loads((v2 / "model_card.json").read_text())
    reference = pd.read_parquet(v2 / REFERENCE_FILE)
    assert list(reference.columns) == FEATURES and len(reference) > 0
    # chosen: a window of the new rows only (600 before the test slice), so the reference is the new inputs
    assert card["rows"]["window_base"] == 0 and len(reference) == card["rows"]["window_feedback"] == 600
    assert abs(float(reference["x2"].mean()) - 2.0) < 0.2
    # the inputs version 1 answered are not version 2's: until version 2 has answered enough, no drift
    # is measured, nothing runs, and version 1's series is gone rather than frozen
    assert learner.tick() == []
    assert psi("1") is None and psi("2") is None
    answered = _inputs(gw.address, new_concept(400))
    assert set(answered) == {"2"}
    _flush(gw)
    made = learner.tick()
    record = TrainingRecord.load(v2)
    live = live_features(LogFiles.at(tmp_path / "log"), "m", "2", since_s=None, max_rows=2000, columns=record.columns)
    assert len(live) == 400  # the inputs version 2 answered, not version 1's 800
    against_own = feature_drift(reference_of(v2, record), live)["x2"].psi
    against_base = feature_drift(record.base_data()[0], live)["x2"].psi
    assert psi("2") == against_own and psi("1") is None
    assert against_own < 0.2 < 1.0 < against_base, (against_own, against_base)
    assert made == []  # the new concept's inputs are what version 2 was trained on: no drift, no run
    assert not [p for p in os.listdir(repo / "m") if p.startswith(".tmp-")]


def test_the_bars_a_trigger_must_pass_after_a_decision(tmp_path: Path) -> None:
    rng = np.random.default_rng(23)
    repo = _convert(tmp_path, concept("A", 300, rng))
    record = TrainingRecord.load(repo / "m" / "1")
    policy = Policy(accuracy_below=0.8, drift_psi_above=0.2, quality_rows=200, min_interval_s=0)
    fresh = State(labels_needed=500)
    assert bars(record, policy, fresh, "1") == (0.2, 0.8)  # nothing decided yet: the thresholds
    rejected = State(labels_needed=500, seen_version="1", last_outcome="rejected", seen_drift=0.6, seen_quality=0.7)
    drift_bar, quality_bar = bars(record, policy, rejected, "1")
    assert drift_bar == pytest.approx(0.9)  # 1.5 x what the decision saw
    assert quality_bar == pytest.approx(0.7 - 2 * np.sqrt(0.7 * 0.3 / 200))  # worse by two standard errors
    assert bars(record, policy, rejected, "2") == (0.2, 0.8)  # another champion: its own evidence
    promoted = State(labels_needed=500, seen_version="1", last_outcome="promoted", seen_drift=0.6, seen_quality=0.7)
    assert bars(record, policy, promoted, "1") == (0.2, 0.8)
    below = State(labels_needed=500, seen_version="1", last_outcome="rejected", seen_drift=0.1, seen_quality=0.9)
    assert bars(record, policy, below, "1") == (0.2, 0.8)  # it saw no drift and good quality: crossing is new
    assert next_run(record, policy, rejected, "1", 1000) == (
        "after 500 more labels (1500 labelled), or drift PSI above 0.9 on version 1's inputs, or accuracy below 0.635,"
        " or a change in its loss with 60 labelled rows since"
    )
    changed = State(labels_needed=500, seen_change_at="2030-01-01 00:00:00", seen_change_rows=150, seen_until=1.9e9)
    assert next_run(record, policy, changed, "1", 1000).endswith(
        "300 labelled rows since the change at 2030-01-01 00:00:00, or a newer change"
    )
    rejected.labels_next = 100  # after "not enough data": min_rows new labels
    assert next_run(record, policy, rejected, "1", 40).startswith("after 100 more labels (140 labelled)")

"""The learning loop end to end: a real gateway logs predictions and feedback sent by a real client;
`onnxgate retrain` / the Learner retrain, decide with a paired test, and publish (or not)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from onnxgate.client import Client
from onnxgate.converters.publish import versions
from onnxgate.learning import decisions
from onnxgate.learning.demo import FEATURES, concept, run_demo
from onnxgate.learning.learn import POLICY_FILE, STATE_FILE, Learner, Policy, State
from onnxgate.learning.retrain import Rule, retrain
from onnxgate.server.cli import main as onnxgate
from tests.conftest import GatewayHandle
from tests.learning.test_recipes import _R_GLM, _rscript


def _convert(tmp_path: Path, frame: pd.DataFrame, name: str = "m", recipe: str = "sklearn") -> Path:
    """A logistic regression trained on `frame`, converted with its recipe and training data."""
    import joblib
    from sklearn.linear_model import LogisticRegression

    frame.to_csv(tmp_path / "base.csv", index=False)
    joblib.dump(LogisticRegression().fit(frame[FEATURES], frame["y"]), tmp_path / "model.joblib")
    repo = tmp_path / "repo"
    args = ["convert", str(tmp_path / "model.joblib"), "--model-repository", str(repo), "--model", name]
    assert onnxgate([*args, "--recipe", recipe, "--training-data", str(tmp_path / "base.csv"), "--target", "y"]) == 0
    return repo


@contextlib.contextmanager
def _importable(directory: Path) -> Iterator[None]:
    """A user-function recipe's module on sys.path (as a user's PYTHONPATH would put it)."""
    sys.path.insert(0, str(directory))
    try:
        yield
    finally:
        sys.path.remove(str(directory))


def _stream(address: str, model: str, frame: pd.DataFrame, labels: np.ndarray | None = None) -> None:
    """One request per row, and its ground truth (or the labels given) sent back by the prediction id."""
    x = frame[FEATURES].to_numpy(np.float32)
    truth = frame["y"].to_numpy() if labels is None else labels
    with Client(address) as client:
        for i in range(len(frame)):
            result = client.infer(model, {"input": x[i : i + 1]})
            client.send_feedback(result.id, label=str(int(truth[i])))


def _serve(start_gateway: Callable[..., GatewayHandle], repo: Path, log: Path) -> GatewayHandle:
    return start_gateway(repo, predlog_dir=str(log), predlog_flush_ms=20.0, predlog_join_interval_s=3600.0)


def _flush(gw: GatewayHandle) -> None:
    assert gw.gateway.predlog is not None and gw.gateway.predlog.flush()


def test_a_concept_change_is_retrained_promoted_and_recovers_within_3_points_of_the_oracle(
    tmp_path: Path, start_gateway: Callable[..., GatewayHandle], capsys: pytest.CaptureFixture[str]
) -> None:
    result = run_demo(tmp_path, per_concept=1000, block=200, base_rows=1500, settle_s=180)
    assert result.promotions, "nothing was promoted after the change"
    assert all(result.blocks[i].concept == "B" for i, _ in result.promotions)  # none before the change
    assert result.recovered >= result.oracle - 0.03, (result.recovered, result.oracle)
    promoted = [d for d in result.decisions if d["outcome"] == "promoted"]
    assert promoted and all(d["test"]["p_value"] < 0.05 and d["test"]["difference"] >= 0 for d in promoted)
    newest = tmp_path / "repository" / "drifty" / result.promotions[-1][1]
    card = json.loads((newest / "model_card.json").read_text())
    assert card["decision"] == "promoted" and card["parent_version"] and card["evaluation"]["test"] == "mcnemar_exact"
    # lineage is visible to clients: the served version's ModelConfig carries its card
    gw = start_gateway(tmp_path / "repository")
    with Client(gw.address) as client:
        assert client.model_ready("drifty", newest.name)
    config = gw.gateway.repository.get("drifty", newest.name).spec.config
    assert json.loads(config.parameters["model_card"].string_value)["parent_version"] == card["parent_version"]
    assert onnxgate(["models", "show", "--model", "drifty", "--model-repository", str(tmp_path / "repository")]) == 0
    shown = capsys.readouterr().out
    assert "promoted" in shown and f"{newest.name:>7}    yes" in shown


def test_without_drift_nothing_is_promoted_and_the_label_trigger_backs_off(
    tmp_path: Path, start_gateway: Callable[..., GatewayHandle]
) -> None:
    rng = np.random.default_rng(3)
    repo = _convert(tmp_path, concept("A", 1500, rng))
    (repo / "m" / POLICY_FILE).write_text(
        "retrain_after_labels = 200\nmin_interval_s = 0\nbackoff_after = 2\nmin_rows = 150\ndrift_psi_above = 5.0\n"
    )
    gw = _serve(start_gateway, repo, tmp_path / "log")
    learner = Learner(repo, str(tmp_path / "log"))
    outcomes = []
    for _ in range(3):
        _stream(gw.address, "m", concept("A", 200, rng))
        _flush(gw)
        outcomes += [d.outcome for d in learner.tick()]
    state = State.load(repo / "m")
    # two challengers no better than the champion, then the label trigger waits for twice as many labels
    assert outcomes == ["rejected", "rejected"], outcomes
    assert state.labels_needed == 400 and "not significantly better" in state.backoff_reason
    log = decisions.read(repo / "m")
    assert [d["outcome"] for d in log] == ["rejected", "rejected", "backed off"]
    assert all(d["test"]["p_value"] >= 0.05 or d["test"]["difference"] <= 0 for d in log[:2])
    assert versions(repo / "m") == [1]
    assert (repo / "m" / STATE_FILE).exists()
    runs = learner.registry.get_sample_value("onnxgate_learn_runs_total", {"model": "m", "outcome": "rejected"})
    assert runs == 2


def test_a_challenger_trained_on_shuffled_labels_is_never_promoted(
    tmp_path: Path, start_gateway: Callable[..., GatewayHandle]
) -> None:
    rng = np.random.default_rng(4)
    repo = _convert(tmp_path, concept("A", 1000, rng))
    gw = _serve(start_gateway, repo, tmp_path / "log")
    traffic = concept("A", 500, rng)
    _stream(gw.address, "m", traffic, labels=rng.permutation(traffic["y"].to_numpy()))
    _flush(gw)
    decision = retrain(repo, "m", str(tmp_path / "log"), Rule(min_rows=300))
    assert decision.outcome == "rejected", decision
    assert versions(repo / "m") == [1]


def test_too_few_labels_are_refused_with_a_message(
    tmp_path: Path, start_gateway: Callable[..., GatewayHandle], capsys: pytest.CaptureFixture[str]
) -> None:
    rng = np.random.default_rng(5)
    repo = _convert(tmp_path, concept("A", 500, rng))
    gw = _serve(start_gateway, repo, tmp_path / "log")
    _stream(gw.address, "m", concept("B", 40, rng))
    _flush(gw)
    args = ["retrain", "--model", "m", "--model-repository", str(repo), "--predlog-dir", str(tmp_path / "log")]
    assert onnxgate([*args, "--min-rows", "100"]) == 0  # a decision, not a failure
    out = capsys.readouterr().out
    assert "not enough data" in out and "40 labelled rows in the prediction log, 100 needed" in out
    assert versions(repo / "m") == [1]


_SLOW_RECIPE = """
import time
from pathlib import Path

from sklearn.linear_model import LogisticRegression


def train(X, y, previous_model):
    Path(__file__).with_name("training-started").write_text("yes")
    time.sleep(60)
    return LogisticRegression().fit(X, y)
"""


def test_a_crash_in_the_middle_of_a_retrain_leaves_the_repository_as_it_was(
    tmp_path: Path, start_gateway: Callable[..., GatewayHandle]
) -> None:
    rng = np.random.default_rng(6)
    (tmp_path / "slow_recipe.py").write_text(_SLOW_RECIPE)
    with _importable(tmp_path):
        repo = _convert(tmp_path, concept("A", 600, rng), recipe="python:slow_recipe:train")
    gw = _serve(start_gateway, repo, tmp_path / "log")
    _stream(gw.address, "m", concept("B", 200, rng))
    _flush(gw)
    before = sorted((str(p.relative_to(repo)), p.stat().st_size) for p in repo.rglob("*"))
    process = subprocess.Popen(
        [sys.executable, "-m", "onnxgate", "retrain", "--model", "m", "--model-repository", str(repo),
         "--predlog-dir", str(tmp_path / "log"), "--min-rows", "100"],
        env={**os.environ, "PYTHONPATH": str(tmp_path)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while not (tmp_path / "training-started").exists():
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)  # in the middle of training the challenger
    process.wait(10)
    after = sorted((str(p.relative_to(repo)), p.stat().st_size) for p in repo.rglob("*"))
    assert after == before
    assert versions(repo / "m") == [1]


def test_an_r_glm_is_refit_in_r_and_promoted_with_parity(
    tmp_path: Path, start_gateway: Callable[..., GatewayHandle]
) -> None:
    _rscript(_R_GLM, tmp_path, str(tmp_path))  # glm.rds trained on train.csv (x1, x2, y)
    repo = tmp_path / "repo"
    args = ["convert", str(tmp_path / "glm.rds"), "--model-repository", str(repo), "--model", "churn"]
    assert onnxgate([*args, "--recipe", "r", "--training-data", str(tmp_path / "train.csv")]) == 0
    gw = _serve(start_gateway, repo, tmp_path / "log")
    rng = np.random.default_rng(7)
    x = rng.normal(size=(700, 2)).astype(np.float32)
    flipped = (x[:, 0] - 1.5 * x[:, 1] > 0).astype(int)  # a relation the R model never saw
    with Client(gw.address) as client:
        for i in range(len(x)):
            result = client.infer("churn", {"input": x[i : i + 1]})
            client.send_feedback(result.id, label=str(flipped[i]))
    _flush(gw)
    decision = retrain(repo, "churn", str(tmp_path / "log"), Rule(min_rows=300))
    assert decision.outcome == "promoted", decision
    new = repo / "churn" / str(decision.version)
    card = json.loads((new / "model_card.json").read_text())
    assert card["recipe"] == "r" and card["parity"]["passed"]
    assert (new / "training" / "model.rds").is_file()  # trained by R, kept for the next refit
    report = json.loads((new / "report.json").read_text())
    assert "R's predict()" in report["notes"][0]


def test_input_drift_is_measured_without_labels_and_triggers_a_retrain(
    tmp_path: Path, start_gateway: Callable[..., GatewayHandle], capsys: pytest.CaptureFixture[str]
) -> None:
    rng = np.random.default_rng(8)
    repo = _convert(tmp_path, concept("A", 1000, rng))
    (repo / "m" / POLICY_FILE).write_text(
        "retrain_after_labels = 100000\ndrift_psi_above = 0.2\ndrift_min_rows = 300\n"
    )
    gw = _serve(start_gateway, repo, tmp_path / "log")
    shifted = concept("A", 400, rng)
    shifted["x2"] += 2.5  # the inputs move; no ground truth is sent
    x = shifted[FEATURES].to_numpy(np.float32)
    with Client(gw.address) as client:
        for i in range(len(x)):
            client.infer("m", {"input": x[i : i + 1]})
    _flush(gw)
    learner = Learner(repo, str(tmp_path / "log"))
    state = State.load(repo / "m")
    state.labels_needed = 100000
    check = learner.check("m", learner_policy(repo), state)
    assert check.trigger.startswith("drift: PSI") and check.drift["x2"] > 1.0 and check.drift["x0"] < 0.2
    psi = learner.registry.get_sample_value("onnxgate_drift_psi", {"model": "m", "version": "1", "feature": "x2"})
    assert psi is not None and psi > 1.0
    assert (
        onnxgate(
            ["models", "show", "--model", "m", "--model-repository", str(repo), "--predlog-dir", str(tmp_path / "log")]
        )
        == 0
    )
    shown = capsys.readouterr().out.splitlines()
    assert next(line for line in shown if line.startswith("x2")).split()[1] == "ks"


def learner_policy(repo: Path) -> Policy:
    return Policy.load(repo / "m")


_BROKEN_RECIPE = """
def train(X, y, previous_model):
    raise RuntimeError("the feature store is down")
"""


def test_a_failing_recipe_is_a_recorded_failure_and_publishes_nothing(
    tmp_path: Path, start_gateway: Callable[..., GatewayHandle], capsys: pytest.CaptureFixture[str]
) -> None:
    rng = np.random.default_rng(9)
    (tmp_path / "broken_recipe.py").write_text(_BROKEN_RECIPE)
    with _importable(tmp_path):
        repo = _convert(tmp_path, concept("A", 400, rng), recipe="python:broken_recipe:train")
        # an explicit-mode gateway: it loads only what it is told to
        gw = start_gateway(repo, model_control_mode="explicit", load_model=("m",), predlog_dir=str(tmp_path / "log"))
        _stream(gw.address, "m", concept("B", 200, rng))
        _flush(gw)
        args = ["retrain", "--model", "m", "--model-repository", str(repo), "--predlog-dir", str(tmp_path / "log")]
        assert onnxgate([*args, "--min-rows", "100", "--gateway", gw.address]) == 1
    out = capsys.readouterr().out
    assert "failed" in out and "the feature store is down" in out
    [decision] = decisions.read(repo / "m")
    assert decision["outcome"] == "failed" and "the feature store is down" in decision["reason"]
    assert versions(repo / "m") == [1]
    with Client(gw.address) as client:
        assert [m.version for m in client.repository_index() if m.name == "m" and m.state == "READY"] == ["1"]


def test_a_promotion_is_loaded_by_an_explicit_mode_gateway(
    tmp_path: Path, start_gateway: Callable[..., GatewayHandle]
) -> None:
    rng = np.random.default_rng(10)
    repo = _convert(tmp_path, concept("A", 800, rng))
    gw = start_gateway(repo, model_control_mode="explicit", load_model=("m",), predlog_dir=str(tmp_path / "log"))
    _stream(gw.address, "m", concept("B", 600, rng))
    _flush(gw)
    args = ["retrain", "--model", "m", "--model-repository", str(repo), "--predlog-dir", str(tmp_path / "log")]
    assert onnxgate([*args, "--min-rows", "300", "--gateway", gw.address]) == 0
    assert versions(repo / "m") == [1, 2]
    with Client(gw.address) as client:
        result = client.infer("m", {"input": np.zeros((1, 4), np.float32)})
    assert result.version == "2"  # told through RepositoryModelLoad, no polling

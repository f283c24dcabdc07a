"""Start simple, escalate only when it pays (a ladder of model families), and learn between retrains
(the `online` candidate): real files, a real gateway's log, onnxruntime scoring, the paired tests."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from onnxgate.converters.publish import versions
from onnxgate.learning import decisions
from onnxgate.learning.data import Window
from onnxgate.learning.demo import FEATURES, concept
from onnxgate.learning.ladder import Scored, climb, flattened
from onnxgate.learning.recipes import RecipeError, family_name, retrain
from onnxgate.learning.retrain import Rule
from onnxgate.learning.retrain import retrain as retrain_model
from onnxgate.learning.training import TrainingRecord
from onnxgate.server.cli import main as onnxgate
from tests.conftest import GatewayHandle
from tests.learning.test_loop import _flush, _serve, _stream


def _xor(n: int, rng: np.random.Generator, noise: float = 0.03) -> pd.DataFrame:
    """A concept no linear model can learn: the label is the sign of x0 * x1."""
    x = rng.standard_normal((n, 4))
    y = (x[:, 0] * x[:, 1] > 0).astype(np.int64)
    frame = pd.DataFrame(x, columns=FEATURES)
    frame["y"] = np.where(rng.random(n) < noise, 1 - y, y)
    return frame


def _convert(tmp_path: Path, frame: pd.DataFrame, estimator: Any, *options: str) -> Path:
    import joblib

    frame.to_csv(tmp_path / "base.csv", index=False)
    joblib.dump(estimator.fit(frame[FEATURES], frame["y"]), tmp_path / "model.joblib")
    repo = tmp_path / "repo"
    args = ["convert", str(tmp_path / "model.joblib"), "--model-repository", str(repo), "--model", "m", "--quiet"]
    training = ["--recipe", "sklearn", "--training-data", str(tmp_path / "base.csv"), "--target", "y"]
    assert onnxgate([*args, *training, *options]) == 0
    return repo


def _ladder_steps(decision: Any) -> list[dict[str, Any]]:
    return [c for c in decision.candidates if "ladder" in c]


# ---------------------------------------------------------------- the ladder


def test_flattening_is_under_one_accuracy_point_or_two_percent_of_the_mse() -> None:
    flat, gain = flattened("classification", 0.90, 0.905)
    assert flat is True and gain == pytest.approx(0.005)
    assert flattened("classification", 0.90, 0.93)[0] is False
    assert flattened("regression", -1.0, -0.99)[0] is True  # 1% of the MSE saved
    assert flattened("regression", -1.0, -0.90)[0] is False  # 10%
    assert flattened("classification", None, 0.9) == (False, None)  # too few rows for a curve: stay simple


def test_a_rising_curve_stops_the_climb_before_the_complex_family_is_fitted() -> None:
    rng = np.random.default_rng(0)
    frame = concept("A", 400, rng)
    window = Window("w", frame[FEATURES], frame["y"], None, 400, 0)
    truth = frame["y"].to_numpy()
    fitted: list[tuple[str, str]] = []

    def fit(family: str, rows: Window, tag: str) -> Scored:
        fitted.append((family, tag))
        # a simple family that still gains 5 points per doubling of the rows
        score = {"1-4": 0.80, "1-2": 0.85, "all": 0.90}[tag]
        return Scored(score, truth.copy())

    result = climb(["logistic", "gbm"], "classification", window, truth, fit, alpha=0.05)
    assert result.family == "logistic" and ("gbm", "all") not in fitted
    assert result.steps[0]["flattened"] is False and "still rising" in result.steps[0]["stop"]
    assert result.steps[0]["curve"] == {"1/4": 0.80, "1/2": 0.85, "all": 0.90}


def test_ladder_names_resolve_per_task_and_unknown_ones_are_refused(tmp_path: Path) -> None:
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.linear_model import LogisticRegression

    assert family_name(LogisticRegression(), "classification") == "logistic"
    assert family_name(HistGradientBoostingClassifier(), "classification") == "gbm"
    rng = np.random.default_rng(1)
    frame = concept("A", 200, rng)
    frame.to_csv(tmp_path / "base.csv", index=False)
    import joblib

    joblib.dump(LogisticRegression().fit(frame[FEATURES], frame["y"]), tmp_path / "model.joblib")
    args = ["convert", str(tmp_path / "model.joblib"), "--model-repository", str(tmp_path / "repo"), "--model", "m"]
    training = ["--recipe", "sklearn", "--training-data", str(tmp_path / "base.csv"), "--target", "y", "--quiet"]
    assert onnxgate([*args, *training, "--ladder", "logistic,ridge"]) != 0  # ridge regresses
    assert onnxgate([*args, *training, "--online"]) != 0  # LogisticRegression has no partial_fit
    assert not (tmp_path / "repo" / "m").exists() or versions(tmp_path / "repo" / "m") == []
    assert onnxgate([*args, *training, "--ladder", "logistic,sklearn.ensemble.GradientBoostingClassifier"]) == 0
    record = TrainingRecord.load(tmp_path / "repo" / "m" / "1")
    assert record.options == {"ladder": ["logistic", "sklearn.ensemble.GradientBoostingClassifier"]}
    X, y = record.base_data()
    with pytest.raises(RecipeError, match="LogisticRegression has no partial_fit"):
        retrain(record, X, y, workdir=tmp_path / "w", mode="continue")
    native = retrain(record, X, y, workdir=tmp_path / "gb", family="sklearn.ensemble.GradientBoostingClassifier")
    assert family_name(joblib.load(native), "classification") == "sklearn.ensemble._gb.GradientBoostingClassifier"


def test_on_a_linear_concept_the_ladder_stays_at_the_simplest_family(
    tmp_path: Path, start_gateway: Callable[..., GatewayHandle]
) -> None:
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(21)
    repo = _convert(tmp_path, concept("A", 1500, rng), LogisticRegression(), "--ladder", "logistic,gbm")
    gw = _serve(start_gateway, repo, tmp_path / "log")
    _stream(gw.address, "m", concept("A", 800, rng))
    _flush(gw)
    decision = retrain_model(repo, "m", str(tmp_path / "log"), Rule())
    steps = _ladder_steps(decision)
    assert [s["ladder"] for s in steps] == ["logistic", "gbm"], steps
    assert steps[0]["flattened"] is True and set(steps[0]["curve"]) == {"1/4", "1/2", "all"}
    assert steps[1]["kept"] is False and "not significantly better than logistic" in steps[1]["stop"]
    assert "ladder: logistic" in decision.reason
    # the same family as the champion, on the same concept: nothing worth a version
    assert decision.outcome == "rejected" and versions(repo / "m") == [1]
    logged = decisions.read(repo / "m")[-1]
    assert [c["ladder"] for c in logged["candidates"] if "ladder" in c] == ["logistic", "gbm"]


def test_on_a_nonlinear_concept_the_ladder_escalates_to_gbm_and_promotes_it(
    tmp_path: Path, start_gateway: Callable[..., GatewayHandle]
) -> None:
    import joblib
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(22)
    repo = _convert(tmp_path, _xor(2000, rng), LogisticRegression(), "--ladder", "logistic,gbm")
    gw = _serve(start_gateway, repo, tmp_path / "log")
    _stream(gw.address, "m", _xor(800, rng))
    _flush(gw)
    decision = retrain_model(repo, "m", str(tmp_path / "log"), Rule())
    steps = _ladder_steps(decision)
    assert [s["ladder"] for s in steps] == ["logistic", "gbm"], steps
    assert steps[0]["flattened"] is True  # a line does not learn XOR from more rows
    assert steps[1]["kept"] is True and steps[1]["p_value"] < 0.05 and steps[1]["difference"] > 0.2
    assert decision.outcome == "promoted", decision.reason
    assert decision.test is not None and decision.test["challenger"] - decision.test["champion"] > 0.3
    new = repo / "m" / str(decision.version)
    record = TrainingRecord.load(new)
    assert record.options["family"] == "gbm" and record.options["ladder"] == ["logistic", "gbm"]
    assert record.model_path is not None
    assert family_name(joblib.load(record.model_path), "classification") == "gbm"
    card = json.loads((new / "model_card.json").read_text())
    assert card["family"] == "gbm" and [s["ladder"] for s in card["ladder"]] == ["logistic", "gbm"]


# ---------------------------------------------------------------- online


def test_after_a_change_an_online_update_of_a_partial_fit_model_is_a_candidate_behind_the_same_rule(
    tmp_path: Path, start_gateway: Callable[..., GatewayHandle]
) -> None:
    from sklearn.linear_model import SGDClassifier

    rng = np.random.default_rng(23)
    repo = _convert(tmp_path, concept("A", 1000, rng), SGDClassifier(loss="log_loss", random_state=0), "--online")
    assert TrainingRecord.load(repo / "m" / "1").options == {"online": True}
    gw = _serve(start_gateway, repo, tmp_path / "log")
    _stream(gw.address, "m", concept("A", 500, rng))
    _stream(gw.address, "m", concept("B", 400, rng))
    _flush(gw)
    decision = retrain_model(repo, "m", str(tmp_path / "log"), Rule())
    online = [c for c in decision.candidates if c["window"] == "online"]
    assert len(online) == 1 and online[0]["mode"] == "continue" and online[0]["score"] is not None, online
    since = next(c for c in decision.candidates if c["window"] == "since the change")
    assert online[0]["rows"] == since["rows"]  # the rows since the change, as partial_fit's input
    assert online[0]["score"] > 0.7  # the served model on concept B is near a coin flip; updated, it is not
    assert decision.outcome == "promoted", decision.reason
    assert decision.test is not None and decision.test["p_value"] < decision.test["alpha"]
    assert versions(repo / "m") == [1, 2]


def test_an_online_update_chosen_on_validation_is_published_as_a_partial_fit_of_the_served_model(
    tmp_path: Path, start_gateway: Callable[..., GatewayHandle], monkeypatch: pytest.MonkeyPatch
) -> None:
    import joblib
    from sklearn.linear_model import SGDClassifier

    from onnxgate.learning import retrain as retrain_module

    real = retrain_module._scored

    def online_first(*args: Any, **kwargs: Any) -> tuple[dict[str, Any], Any]:
        # the refit windows often edge the online update out on validation: make it the choice, and let
        # everything after (the update on train + validation, parity, the paired test, publish) run as is
        result, predicted = real(*args, **kwargs)
        if result["window"] == "online" and result["score"] is not None:
            result = {**result, "score": result["score"] + 1.0}
        return result, predicted

    monkeypatch.setattr(retrain_module, "_scored", online_first)
    rng = np.random.default_rng(23)
    repo = _convert(tmp_path, concept("A", 1000, rng), SGDClassifier(loss="log_loss", random_state=0), "--online")
    gw = _serve(start_gateway, repo, tmp_path / "log")
    _stream(gw.address, "m", concept("A", 500, rng))
    _stream(gw.address, "m", concept("B", 400, rng))
    _flush(gw)
    decision = retrain_model(repo, "m", str(tmp_path / "log"), Rule())
    assert decision.window == "online" and decision.outcome == "promoted", decision.reason
    assert "online: version 1 updated on its" in decision.reason
    assert decision.test is not None and decision.test["p_value"] < decision.test["alpha"]
    card = json.loads((repo / "m" / "2" / "model_card.json").read_text())
    assert card["mode"] == "continue" and card["window"] == "online"
    served = joblib.load(tmp_path / "model.joblib")
    updated = joblib.load(TrainingRecord.load(repo / "m" / "2").model_path)
    # the same estimator, moved on from where it was (partial_fit), not refit from scratch
    assert type(updated) is SGDClassifier and list(updated.classes_) == list(served.classes_)
    assert updated.t_ > served.t_ and not np.allclose(updated.coef_, served.coef_)

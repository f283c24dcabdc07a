"""HistGradientBoosting with a sample of its own training rows: compared as served, boundary rows reported.

scikit-learn's histogram boosting splits float64 values at float64 thresholds (midpoints between
training values); the served model reads float32. A value just above a threshold can round to the
same float32 as the threshold and take the other branch: those rows are counted apart, everything else
must agree.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import pandas as pd
from sklearn.ensemble import HistGradientBoostingClassifier, HistGradientBoostingRegressor

from onnxgate.converters import convert, parity, sample
from tests.converters.helpers import check_published, published, run_cli
from tests.converters.serving import served, text

RNG = np.random.default_rng(16)


def _training(n: int) -> pd.DataFrame:
    """`a` holds 1.0 and 1.0 + 1e-9 (one float32 value, two float64 values) and decides the target."""
    return pd.DataFrame({"a": np.where(RNG.random(n) < 0.3, 1.0 + 1e-9, 1.0), "b": RNG.normal(size=n)})


def _on_boundary(frame: pd.DataFrame) -> np.ndarray:
    return np.flatnonzero(frame["a"].to_numpy() > 1.0)


def test_classifier_boundary_rows_reported_and_served_as_float32(
    tmp_path: Path, start_gateway: Callable[..., Any]
) -> None:
    frame = _training(300)
    target = ((frame["a"] > 1.0) ^ (frame["b"] > 1.2)).astype(int)
    model = HistGradientBoostingClassifier(max_iter=10, random_state=0).fit(frame.to_numpy(), target)
    joblib.dump(model, tmp_path / "hgb.joblib")
    frame.to_csv(tmp_path / "train.csv", index=False)

    assert run_cli(tmp_path / "hgb.joblib", tmp_path / "repo", "hgb", "--sample", str(tmp_path / "train.csv")) == 0
    version = published(tmp_path / "repo", "hgb")
    rep = check_published(version, "sklearn", "classification")
    boundary = _on_boundary(frame)
    assert rep["parity"]["float32_boundary_rows"] == len(boundary) > 0
    examples = rep["parity"]["float32_boundary_examples"]
    assert examples and {e["row"] for e in examples} <= set(boundary.tolist())
    assert all(e["input"] == "input" and e["index"] == 0 and e["float32"] == 1.0 for e in examples)
    assert rep["parity"]["outputs"][1]["max_abs_diff"] < 1e-5  # the other rows agree

    # the gateway answers in float32: the native answer on every row but the reported ones
    x = frame.to_numpy()
    answers = served(
        start_gateway, tmp_path / "repo", "hgb", {"input": x.astype(np.float32)}, ["label", "probabilities"]
    )
    native_labels, native_probabilities = model.predict(x), model.predict_proba(x)
    rest = np.setdiff1d(np.arange(len(x)), boundary)
    np.testing.assert_allclose(answers["probabilities"][rest], native_probabilities[rest], atol=1e-5)
    assert np.array(text(answers["label"]))[rest].tolist() == [str(v) for v in native_labels[rest]]
    # on the boundary rows the float32 answer is the native model's on float32(a) == 1.0
    np.testing.assert_allclose(
        answers["probabilities"][boundary], model.predict_proba(x[boundary].astype(np.float32)), atol=1e-5
    )


def test_regressor_on_float64_sample(tmp_path: Path) -> None:
    frame = _training(200)
    target = 3.0 * (frame["a"] > 1.0) + frame["b"]
    model = HistGradientBoostingRegressor(max_iter=15, random_state=0).fit(frame.to_numpy(), target)
    joblib.dump(model, tmp_path / "hgb.joblib")
    frame.to_csv(tmp_path / "train.csv", index=False)

    report_file = tmp_path / "report.json"
    assert (
        run_cli(
            tmp_path / "hgb.joblib",
            tmp_path / "repo",
            "reg",
            "--sample",
            str(tmp_path / "train.csv"),
            "--report",
            str(report_file),
        )
        == 0
    )
    rep = json.loads(report_file.read_text())
    assert rep["parity"]["float32_boundary_rows"] == len(_on_boundary(frame))
    check_published(published(tmp_path / "repo", "reg"), "sklearn", "regression")


def test_a_genuine_difference_still_refuses(tmp_path: Path) -> None:
    """A reference that disagrees where no float32 step of a value on a threshold explains it is refused."""
    frame = _training(120)
    target = ((frame["a"] > 1.0) ^ (frame["b"] > 1.2)).astype(int)
    model = HistGradientBoostingClassifier(max_iter=5, random_state=0).fit(frame.to_numpy(), target)
    joblib.dump(model, tmp_path / "hgb.joblib")
    frame.to_csv(tmp_path / "train.csv", index=False)
    conversion = convert(tmp_path / "hgb.joblib")
    given = sample.read_file(tmp_path / "train.csv", conversion.inputs, cast=False)
    rows = sample.cast_rows(given, conversion.inputs)

    honest = parity.check(conversion, rows, "train.csv", given=given)
    assert honest.passed and honest.float32_boundary_rows == len(_on_boundary(frame))
    # rows cast before the native model sees them: no boundary excuse is needed or given
    assert parity.check(conversion, rows, "train.csv").float32_boundary_rows == 0

    original = conversion.predict_native
    plain = int(np.flatnonzero(frame["a"].to_numpy() == 1.0)[0])
    edge = int(_on_boundary(frame)[0])

    def wrong(rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        answer = {k: np.array(v, copy=True) for k, v in original(rows).items()}
        for r in (plain, edge):
            answer["probabilities"][r] = [0.5 - 0.4 * (answer["label"][r] == 0), 0.5 + 0.4 * (answer["label"][r] == 0)]
            answer["label"][r] = 1 - answer["label"][r]
        return answer

    conversion.predict_native = wrong
    refused = parity.check(conversion, rows, "train.csv", given=given)
    assert not refused.passed
    label = refused.outputs[0]
    assert {e["row"] for e in label.examples} == {plain, edge}
    assert refused.float32_boundary_rows == len(_on_boundary(frame)) - 1

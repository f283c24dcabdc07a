"""Gradient-boosting model files: XGBoost (Python binding and Debian's C++ CLI), LightGBM, CatBoost."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import catboost
import lightgbm
import numpy as np
import pytest
import xgboost

from onnxgate.converters import ConversionError, convert
from tests.converters.helpers import assert_classifier_matches, check_published, published, run_cli, run_onnx

RNG = np.random.default_rng(11)
X = RNG.normal(size=(400, 5)).astype(np.float32)
BINARY = (X[:, 0] + X[:, 1] > 0).astype(int)
MULTI = (X[:, 0] > 0).astype(int) + (X[:, 2] > 0.5)
LARGE = 1e5 + 2e4 * X[:, 0] - 5e3 * X[:, 3]
ROWS = RNG.normal(size=(200, 5)).astype(np.float32)

XGB_CASES: dict[str, tuple[dict[str, Any], np.ndarray]] = {
    "binary": ({"objective": "binary:logistic"}, BINARY),
    "multiclass": ({"objective": "multi:softprob", "num_class": 3}, MULTI),
    "softmax": ({"objective": "multi:softmax", "num_class": 3}, MULTI),
    "regression": ({"objective": "reg:squarederror"}, LARGE),
}


def softmax(margins: np.ndarray) -> np.ndarray:
    e = np.exp(margins - margins.max(axis=1, keepdims=True))
    return np.asarray(e / e.sum(axis=1, keepdims=True))


@pytest.mark.parametrize("suffix", [".json", ".ubj"])
@pytest.mark.parametrize("case", list(XGB_CASES))
def test_xgboost_python_binding(tmp_path: Path, case: str, suffix: str) -> None:
    params, target = XGB_CASES[case]
    # named features: onnxmltools refuses them, the converter must drop them
    data = xgboost.DMatrix(X, label=target, feature_names=[f"sensor_{i}" for i in range(5)])
    booster = xgboost.train({"max_depth": 3, "eta": 0.3, **params}, data, num_boost_round=15)
    source = tmp_path / f"model{suffix}"
    booster.save_model(source)

    assert run_cli(source, tmp_path / "repo", "xgb") == 0
    version = published(tmp_path / "repo", "xgb")
    task = "regression" if case == "regression" else "classification"
    rep = check_published(version, "xgboost", task)
    assert any("feature names dropped" in note for note in rep["notes"])

    outputs = run_onnx(version, {"input": ROWS})
    native = xgboost.DMatrix(ROWS, feature_names=[f"sensor_{i}" for i in range(5)])
    if case == "regression":
        np.testing.assert_allclose(outputs["prediction"].reshape(-1), booster.predict(native), rtol=1e-5)
        return
    if case == "binary":
        p = booster.predict(native)
        probabilities = np.stack([1 - p, p], axis=1)
    elif case == "softmax":
        probabilities = softmax(booster.predict(native, output_margin=True))
    else:
        probabilities = booster.predict(native)
    assert_classifier_matches(outputs, probabilities.argmax(axis=1), probabilities)


def _train_with_debian_cli(workdir: Path, model_out: str) -> Path:
    if shutil.which("xgboost") is None:
        pytest.fail("Debian's xgboost CLI is missing: run .ci/deps/converters-python.sh")
    lines = [
        f"{label} " + " ".join(f"{i}:{v:.6f}" for i, v in enumerate(row)) for row, label in zip(X, BINARY, strict=True)
    ]
    (workdir / "train.libsvm").write_text("\n".join(lines) + "\n")
    (workdir / "train.conf").write_text(
        "booster = gbtree\nobjective = binary:logistic\neta = 0.3\nmax_depth = 3\nnum_round = 12\n"
        f'data = "train.libsvm?format=libsvm"\nmodel_out = "{model_out}"\n'
    )
    subprocess.run(["xgboost", "train.conf"], cwd=workdir, check=True, capture_output=True)
    return workdir / model_out


def test_xgboost_model_trained_by_debian_cli(tmp_path: Path) -> None:
    source = _train_with_debian_cli(tmp_path, "cli-model.json")
    assert run_cli(source, tmp_path / "repo", "cli") == 0
    version = published(tmp_path / "repo", "cli")
    check_published(version, "xgboost", "classification")
    # the native prediction comes from the C++ tool itself: `task=pred` on the same rows
    lines = [f"0 " + " ".join(f"{i}:{v:.6f}" for i, v in enumerate(row)) for row in ROWS]  # noqa: F541
    (tmp_path / "rows.libsvm").write_text("\n".join(lines) + "\n")
    subprocess.run(
        [
            "xgboost",
            "train.conf",
            "task=pred",
            "model_in=cli-model.json",
            "test:data=rows.libsvm?format=libsvm",
            "name_pred=pred.txt",
        ],
        cwd=tmp_path,
        check=True,
        capture_output=True,
    )
    positive = np.loadtxt(tmp_path / "pred.txt")
    rounded = np.array([[float(f"{v:.6f}") for v in row] for row in ROWS], dtype=np.float32)
    outputs = run_onnx(version, {"input": rounded})
    np.testing.assert_allclose(outputs["probabilities"][:, 1], positive, atol=1e-5)
    assert (outputs["label"] == (positive > 0.5)).all()


def test_xgboost_legacy_binary_from_debian_cli_is_refused_with_advice(tmp_path: Path) -> None:
    source = _train_with_debian_cli(tmp_path, "cli-model.bin")
    with pytest.raises(ConversionError, match=r"legacy binary format.*model_out=NAME\.json"):
        convert(source)  # detected as XGBoost from its contents, then refused
    assert run_cli(source, tmp_path / "repo", "cli") == 2
    assert not (tmp_path / "repo" / "cli").exists() or not any((tmp_path / "repo" / "cli").iterdir())


@pytest.mark.parametrize("case", ["binary", "multiclass", "regression"])
def test_lightgbm_text_model(tmp_path: Path, case: str) -> None:
    choices: dict[str, dict[str, Any]] = {
        "binary": {"objective": "binary"},
        "multiclass": {"objective": "multiclass", "num_class": 3},
        "regression": {"objective": "regression"},
    }
    params = choices[case]
    target = {"binary": BINARY, "multiclass": MULTI, "regression": LARGE}[case]
    booster = lightgbm.train({**params, "verbose": -1, "num_leaves": 8}, lightgbm.Dataset(X, label=target), 15)
    booster.save_model(tmp_path / "model.txt")

    assert run_cli(tmp_path / "model.txt", tmp_path / "repo", "lgb") == 0
    version = published(tmp_path / "repo", "lgb")
    check_published(version, "lightgbm", "regression" if case == "regression" else "classification")
    outputs = run_onnx(version, {"input": ROWS})
    raw = np.asarray(booster.predict(ROWS))
    if case == "regression":
        np.testing.assert_allclose(outputs["prediction"].reshape(-1), raw, rtol=1e-5)
        return
    probabilities = np.stack([1 - raw, raw], axis=1) if raw.ndim == 1 else raw
    assert outputs["label"].shape == (len(ROWS),)
    assert_classifier_matches(outputs, probabilities.argmax(axis=1), probabilities)


@pytest.mark.parametrize("case", ["binary-strings", "multiclass", "regression"])
def test_catboost_cbm(tmp_path: Path, case: str) -> None:
    if case == "regression":
        model = catboost.CatBoostRegressor(iterations=25, depth=3, verbose=0, random_seed=0).fit(X, LARGE)
    elif case == "multiclass":
        model = catboost.CatBoostClassifier(
            iterations=25, depth=3, verbose=0, random_seed=0, loss_function="MultiClass"
        )
        model.fit(X, MULTI)
    else:
        model = catboost.CatBoostClassifier(iterations=25, depth=3, verbose=0, random_seed=0)
        model.fit(X, np.where(BINARY == 1, "fraud", "ok"))
    model.save_model(str(tmp_path / "model.cbm"))

    assert run_cli(tmp_path / "model.cbm", tmp_path / "repo", "cb") == 0
    version = published(tmp_path / "repo", "cb")
    rep = check_published(version, "catboost", "regression" if case == "regression" else "classification")
    outputs = run_onnx(version, {"input": ROWS})
    if case == "regression":
        np.testing.assert_allclose(outputs["prediction"].reshape(-1), model.predict(ROWS), rtol=1e-5)
        return
    if case == "binary-strings":
        assert rep["labels"] == ["fraud", "ok"]
    assert_classifier_matches(outputs, model.predict(ROWS).reshape(-1), model.predict_proba(ROWS))


def test_catboost_categorical_features_are_refused(tmp_path: Path) -> None:
    frame = [[float(a), c] for a, c in zip(X[:100, 0], RNG.choice(["a", "b"], 100), strict=True)]
    model = catboost.CatBoostClassifier(iterations=5, depth=2, verbose=0, cat_features=[1]).fit(frame, BINARY[:100])
    model.save_model(str(tmp_path / "cat.cbm"))
    with pytest.raises(ConversionError, match="categorical features"):
        convert(tmp_path / "cat.cbm")

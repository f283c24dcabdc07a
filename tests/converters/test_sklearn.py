"""scikit-learn pickles and joblib files: pipelines with string columns, binary/multiclass, regression."""

from __future__ import annotations

import pickle
from pathlib import Path

import joblib
import numpy as np
import pandas as pd
import pytest
from sklearn.compose import ColumnTransformer
from sklearn.ensemble import GradientBoostingRegressor, RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler
from sklearn.tree import DecisionTreeClassifier

from onnxgate.server.pb import model_config_pb2
from tests.converters.helpers import (
    assert_classifier_matches,
    check_published,
    config,
    published,
    run_cli,
    run_onnx,
)

RNG = np.random.default_rng(7)


def customers(n: int) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "age": RNG.normal(40, 12, n),
            "income": RNG.normal(50_000, 15_000, n),
            "city": RNG.choice(["paris", "rome", "oslo", "lima"], n),
        }
    )


def test_pipeline_with_column_transformer_and_string_column(tmp_path: Path) -> None:
    frame = customers(400)
    target = np.where((frame.age > 40) & (frame.city != "rome"), "churn", "stay")
    pipeline = Pipeline(
        [
            (
                "columns",
                ColumnTransformer(
                    [
                        ("num", StandardScaler(), ["age", "income"]),
                        ("cat", OneHotEncoder(handle_unknown="ignore"), ["city"]),
                    ]
                ),
            ),
            ("model", LogisticRegression(max_iter=500)),
        ]
    ).fit(frame, target)
    source = tmp_path / "churn.joblib"
    joblib.dump(pipeline, source)

    assert run_cli(source, tmp_path / "repo", "churn") == 0
    version = published(tmp_path / "repo", "churn")
    assert version.name == "1"
    rep = check_published(version, "sklearn", "classification")
    assert rep["labels"] == ["churn", "stay"]
    cfg = config(version)
    types = {i.name: (i.data_type, list(i.dims)) for i in cfg.input}
    assert types == {
        "age": (model_config_pb2.TYPE_FP32, [-1, 1]),
        "income": (model_config_pb2.TYPE_FP32, [-1, 1]),
        "city": (model_config_pb2.TYPE_STRING, [-1, 1]),
    }

    rows = customers(50)
    feeds = {
        "age": rows[["age"]].to_numpy(np.float32),
        "income": rows[["income"]].to_numpy(np.float32),
        "city": rows[["city"]].to_numpy(dtype=object),
    }
    native_rows = pd.DataFrame({k: v[:, 0] for k, v in feeds.items()}).astype({"age": float, "income": float})
    outputs = run_onnx(version, feeds)
    assert_classifier_matches(outputs, pipeline.predict(native_rows), pipeline.predict_proba(native_rows))


@pytest.mark.parametrize("n_classes", [2, 3])
def test_tree_classifier_binary_and_multiclass(tmp_path: Path, n_classes: int) -> None:
    x = RNG.normal(size=(300, 4))
    y = np.digitize(x[:, 0] + 0.3 * x[:, 1], [-0.5, 0.5][: n_classes - 1])
    model = RandomForestClassifier(n_estimators=15, max_depth=5, random_state=0).fit(x, y)
    source = tmp_path / "forest.pkl"
    source.write_bytes(pickle.dumps(model))

    assert run_cli(source, tmp_path / "repo", "forest") == 0
    version = published(tmp_path / "repo", "forest")
    check_published(version, "sklearn", "classification")
    assert (version / "labels.txt").read_text().splitlines() == [str(c) for c in range(n_classes)]

    rows = RNG.normal(size=(100, 4)).astype(np.float32)
    outputs = run_onnx(version, {"input": rows})
    assert outputs["label"].dtype == np.int64
    assert_classifier_matches(outputs, model.predict(rows), model.predict_proba(rows))


def test_large_valued_regression(tmp_path: Path) -> None:
    x = RNG.normal(size=(300, 3))
    y = 250_000 + 40_000 * x[:, 0] - 10_000 * x[:, 1] ** 2
    model = GradientBoostingRegressor(n_estimators=40, random_state=0).fit(x, y)
    joblib.dump(model, tmp_path / "houses.joblib")

    assert run_cli(tmp_path / "houses.joblib", tmp_path / "repo", "houses") == 0
    version = published(tmp_path / "repo", "houses")
    check_published(version, "sklearn", "regression")
    rows = RNG.normal(size=(100, 3)).astype(np.float32)
    got = run_onnx(version, {"input": rows})["prediction"].reshape(-1)
    np.testing.assert_allclose(got, model.predict(rows), rtol=1e-3)


def test_user_sample_file_is_used(tmp_path: Path) -> None:
    x = RNG.normal(size=(200, 3))
    model = DecisionTreeClassifier(max_depth=4, random_state=0).fit(x, (x[:, 0] > 0).astype(int))
    joblib.dump(model, tmp_path / "tree.joblib")
    pd.DataFrame(x[:37], columns=["a", "b", "c"]).to_csv(tmp_path / "rows.csv", index=False)

    assert run_cli(tmp_path / "tree.joblib", tmp_path / "repo", "tree", "--sample", str(tmp_path / "rows.csv")) == 0
    rep = check_published(published(tmp_path / "repo", "tree"), "sklearn", "classification")
    assert rep["parity"]["rows"] == 37 and "rows.csv" in rep["parity"]["sample"]

    pd.DataFrame(x[:5, :2]).to_csv(tmp_path / "narrow.csv", index=False)
    assert run_cli(tmp_path / "tree.joblib", tmp_path / "repo", "tree", "--sample", str(tmp_path / "narrow.csv")) == 2

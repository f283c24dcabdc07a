"""scikit-learn clusterers, anomaly detectors and string imputers: converted by the CLI, served, compared."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import pandas as pd
import pytest
from sklearn.cluster import DBSCAN, KMeans
from sklearn.compose import ColumnTransformer
from sklearn.ensemble import IsolationForest
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler

from onnxgate.converters import ConversionError, convert
from onnxgate.server.pb import model_config_pb2
from tests.converters.helpers import check_published, config, published, run_cli
from tests.converters.serving import served, text

RNG = np.random.default_rng(11)


def _blobs(n: int) -> np.ndarray:
    """Three clusters far from zero, on scales of their own (as unscaled sensor data are)."""
    centres = np.array([[0.0, 900.0, 5.0], [3.0, 1000.0, 6.0], [-2.0, 1100.0, 4.0]])
    return centres[RNG.integers(0, 3, size=n)] + RNG.normal(size=(n, 3)) * [1.0, 30.0, 0.3]


def test_kmeans_label_and_distances(tmp_path: Path, start_gateway: Callable[..., Any]) -> None:
    x = _blobs(300)
    model = KMeans(n_clusters=3, n_init=3, random_state=0).fit(x)
    joblib.dump(model, tmp_path / "kmeans.joblib")
    pd.DataFrame(x, columns=["a", "b", "c"]).to_csv(tmp_path / "train.csv", index=False)

    for args in ((), ("--sample", str(tmp_path / "train.csv"))):  # generated rows, then the training rows
        assert run_cli(tmp_path / "kmeans.joblib", tmp_path / "repo", "segments", *args) == 0
    version = published(tmp_path / "repo", "segments")
    rep = check_published(version, "sklearn", "clustering")
    assert rep["parity"]["rows"] == 300 and rep["task"] == "clustering"
    assert {o["name"]: o["max_rel_diff"] for o in rep["parity"]["outputs"]}["distances"] < 1e-4
    outputs = {o.name: (o.data_type, list(o.dims)) for o in config(version).output}
    assert outputs == {"label": (model_config_pb2.TYPE_INT64, [-1]), "distances": (model_config_pb2.TYPE_FP32, [-1, 3])}

    rows = _blobs(40)
    answers = served(
        start_gateway, tmp_path / "repo", "segments", {"input": rows.astype(np.float32)}, ["label", "distances"]
    )
    assert answers["label"].tolist() == model.predict(rows).tolist()
    np.testing.assert_allclose(answers["distances"], model.transform(rows), rtol=1e-4, atol=1e-3)


def test_isolation_forest_score_and_label(tmp_path: Path, start_gateway: Callable[..., Any]) -> None:
    x = np.concatenate([RNG.normal(size=(280, 4)), RNG.uniform(-6, 6, size=(20, 4))])
    model = IsolationForest(n_estimators=40, random_state=0).fit(x)
    joblib.dump(model, tmp_path / "iforest.joblib")

    assert run_cli(tmp_path / "iforest.joblib", tmp_path / "repo", "outliers") == 0
    version = published(tmp_path / "repo", "outliers")
    rep = check_published(version, "sklearn", "anomaly")
    assert rep["opsets"]["ai.onnx.ml"] == 3
    outputs = {o.name: (o.data_type, list(o.dims)) for o in config(version).output}
    assert outputs == {"label": (model_config_pb2.TYPE_INT64, [-1]), "score": (model_config_pb2.TYPE_FP32, [-1])}

    rows = np.concatenate([RNG.normal(size=(30, 4)), RNG.uniform(-6, 6, size=(10, 4))]).astype(np.float32)
    answers = served(start_gateway, tmp_path / "repo", "outliers", {"input": rows}, ["label", "score"])
    expected = model.predict(rows)
    assert set(expected.tolist()) == {-1, 1}  # both answers are exercised
    assert answers["label"].tolist() == expected.tolist()
    np.testing.assert_allclose(answers["score"], model.decision_function(rows), atol=1e-5)


def test_clusterers_without_predict_are_refused(tmp_path: Path) -> None:
    joblib.dump(DBSCAN().fit(_blobs(50)), tmp_path / "dbscan.joblib")
    with pytest.raises(ConversionError, match=r"DBSCAN assigns no cluster to new rows.*KMeans"):
        convert(tmp_path / "dbscan.joblib")


def _customers(n: int) -> pd.DataFrame:
    city = RNG.choice(["paris", "rome", "oslo"], n).astype(object)
    city[RNG.random(n) < 0.2] = np.nan  # what pandas reads for an empty cell
    return pd.DataFrame({"age": RNG.normal(40, 10, n), "city": city})


@pytest.mark.parametrize("strategy", ["most_frequent", "constant"])
def test_string_imputer_with_nan_missing_values(
    tmp_path: Path, start_gateway: Callable[..., Any], strategy: str
) -> None:
    frame = _customers(300)
    target = ((frame["age"] > 45) | frame["city"].isna()).astype(int)
    strings = Pipeline(
        [
            ("fill", SimpleImputer(strategy=strategy, fill_value="unknown" if strategy == "constant" else None)),
            ("onehot", OneHotEncoder(handle_unknown="ignore")),
        ]
    )
    model = Pipeline(
        [
            ("columns", ColumnTransformer([("num", StandardScaler(), ["age"]), ("cat", strings, ["city"])])),
            ("model", LogisticRegression()),
        ]
    ).fit(frame, target)
    joblib.dump(model, tmp_path / "churn.joblib")
    frame.to_csv(tmp_path / "train.csv", index=False)  # missing cities are empty cells

    for args in ((), ("--sample", str(tmp_path / "train.csv"))):
        assert run_cli(tmp_path / "churn.joblib", tmp_path / "repo", "churn", *args) == 0
    version = published(tmp_path / "repo", "churn")
    rep = check_published(version, "sklearn", "classification")
    assert rep["parity"]["rows"] == 300
    assert any("'city': a missing value is sent as the empty string" in note for note in rep["notes"])

    rows = _customers(40)
    feeds = {
        "age": rows[["age"]].to_numpy(np.float32),
        "city": rows[["city"]].fillna("").to_numpy(dtype=object),  # a client sends "" for a missing string
    }
    assert (feeds["city"] == "").sum() > 0
    answers = served(start_gateway, tmp_path / "repo", "churn", feeds, ["label", "probabilities"])
    native_rows = rows.assign(age=feeds["age"][:, 0].astype(np.float64))
    np.testing.assert_allclose(answers["probabilities"], model.predict_proba(native_rows), atol=1e-5)
    assert text(answers["label"]) == [str(v) for v in model.predict(native_rows)]


def test_empty_string_category_cannot_mean_missing(tmp_path: Path) -> None:
    frame = pd.DataFrame({"city": np.array(["", "rome", np.nan, "oslo"] * 10, dtype=object), "age": np.arange(40.0)})
    strings = Pipeline([("fill", SimpleImputer(strategy="most_frequent")), ("onehot", OneHotEncoder())])
    model = Pipeline(
        [
            ("columns", ColumnTransformer([("cat", strings, ["city"])], remainder="passthrough")),
            ("m", LogisticRegression()),
        ]
    ).fit(frame, np.arange(40) % 2)
    joblib.dump(model, tmp_path / "m.joblib")
    with pytest.raises(ConversionError, match="knows the empty string as a category"):
        convert(tmp_path / "m.joblib")

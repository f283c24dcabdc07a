"""Converted models served by the real gateway, called with tritonclient, compared with the native models."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import catboost
import joblib
import numpy as np
import pandas as pd
import tritonclient.grpc as grpcclient
from sklearn.compose import ColumnTransformer
from sklearn.ensemble import RandomForestClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler

from tests.converters.helpers import run_cli
from tests.converters.test_boosters import ROWS, _train_with_debian_cli

RNG = np.random.default_rng(21)


def _frame(n: int) -> pd.DataFrame:
    return pd.DataFrame(
        {"tenure": RNG.normal(24, 10, n), "plan": RNG.choice(["basic", "plus", "pro"], n), "spend": RNG.gamma(2, 30, n)}
    )


def _infer(client: grpcclient.InferenceServerClient, model: str, feeds: dict[str, np.ndarray]) -> Any:
    inputs = []
    for name, values in feeds.items():
        datatype = "BYTES" if values.dtype == object else "FP32"
        tensor = grpcclient.InferInput(name, list(values.shape), datatype)
        tensor.set_data_from_numpy(values)
        inputs.append(tensor)
    outputs = [grpcclient.InferRequestedOutput(n) for n in ("label", "probabilities")]
    return client.infer(model, inputs, outputs=outputs)


def test_converted_models_are_served_by_the_gateway(tmp_path: Path, start_gateway: Callable[..., Any]) -> None:
    repo = tmp_path / "repo"
    # scikit-learn pipeline with a string column (BYTES input), string class labels
    frame = _frame(400)
    target = np.where((frame.plan == "basic") & (frame.tenure < 24), "leaves", "stays")
    pipeline = Pipeline(
        [
            (
                "prep",
                ColumnTransformer([("num", StandardScaler(), ["tenure", "spend"]), ("cat", OneHotEncoder(), ["plan"])]),
            ),
            ("forest", RandomForestClassifier(n_estimators=10, max_depth=4, random_state=0)),
        ]
    ).fit(frame, target)
    joblib.dump(pipeline, tmp_path / "churn.joblib")
    assert run_cli(tmp_path / "churn.joblib", repo, "churn") == 0
    # XGBoost model trained by Debian's C++ command-line tool
    cli_model = _train_with_debian_cli(tmp_path, "cli-model.json")
    assert run_cli(cli_model, repo, "cli_xgb") == 0
    # CatBoost binary classifier
    cat = catboost.CatBoostClassifier(iterations=20, depth=3, verbose=0, random_seed=0)
    cat.fit(ROWS, (ROWS[:, 0] > 0).astype(int))
    cat.save_model(str(tmp_path / "cat.cbm"))
    assert run_cli(tmp_path / "cat.cbm", repo, "cat") == 0

    handle = start_gateway(repo)
    client = grpcclient.InferenceServerClient(handle.address)
    try:
        for name in ("churn", "cli_xgb", "cat"):
            assert client.is_model_ready(name, "1")
            params = client.get_model_config(name).config.parameters
            assert json.loads(params["conversion_report"].string_value)["parity"]["passed"]

        rows = _frame(25)
        feeds = {
            "tenure": rows[["tenure"]].to_numpy(np.float32),
            "plan": rows[["plan"]].to_numpy(dtype=object),
            "spend": rows[["spend"]].to_numpy(np.float32),
        }
        native_rows = pd.DataFrame({k: v[:, 0] for k, v in feeds.items()}).astype({"tenure": float, "spend": float})
        result = _infer(client, "churn", feeds)
        np.testing.assert_allclose(result.as_numpy("probabilities"), pipeline.predict_proba(native_rows), atol=1e-5)
        served = [v.decode() if isinstance(v, bytes) else str(v) for v in result.as_numpy("label").reshape(-1)]
        assert served == list(pipeline.predict(native_rows))

        x = ROWS[:30]
        import xgboost

        booster = xgboost.Booster(model_file=str(cli_model))
        positive = booster.predict(xgboost.DMatrix(x))
        result = _infer(client, "cli_xgb", {"input": x})
        np.testing.assert_allclose(result.as_numpy("probabilities")[:, 1], positive, atol=1e-5)
        assert (result.as_numpy("label").reshape(-1) == (positive > 0.5)).all()

        result = _infer(client, "cat", {"input": x})
        np.testing.assert_allclose(result.as_numpy("probabilities"), cat.predict_proba(x), atol=1e-5)
        assert (result.as_numpy("label").reshape(-1) == cat.predict(x)).all()
    finally:
        client.close()

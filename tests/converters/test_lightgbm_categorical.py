"""LightGBM trained on pandas category columns: the served model takes the category strings."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightgbm as lgb
import numpy as np
import pandas as pd

from tests.converters.helpers import check_published, published, run_cli
from tests.converters.serving import served

RNG = np.random.default_rng(4)
PLANS, CITIES = ["basic", "plus", "pro"], ["oslo", "rome", "lima"]


def _frame(n: int) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "spend": RNG.gamma(2.0, 30.0, n),
            "plan": pd.Categorical(RNG.choice(PLANS, n), categories=PLANS),
            "tenure": RNG.normal(24, 10, n),
            "city": pd.Categorical(RNG.choice(CITIES, n), categories=CITIES),
        }
    )


def test_category_strings_are_mapped_to_codes_in_the_graph(tmp_path: Path, start_gateway: Callable[..., Any]) -> None:
    frame = _frame(500)
    target = ((frame["plan"] == "pro") | ((frame["city"] == "rome") & (frame["tenure"] > 20))).astype(int)
    params = {"objective": "binary", "verbose": -1, "num_leaves": 8, "min_data_per_group": 5, "cat_smooth": 1}
    booster = lgb.train(params, lgb.Dataset(frame, target), num_boost_round=15)
    booster.save_model(tmp_path / "churn.txt")  # pandas_categorical is written at the end of the file
    frame.to_csv(tmp_path / "train.csv", index=False)  # categories as their strings

    for args in ((), ("--sample", str(tmp_path / "train.csv"))):
        assert run_cli(tmp_path / "churn.txt", tmp_path / "repo", "churn", *args) == 0
    rep = check_published(published(tmp_path / "repo", "churn"), "lightgbm", "classification")
    assert rep["parity"]["rows"] == 500
    assert {i["name"]: (i["datatype"], i["shape"]) for i in rep["inputs"]} == {
        "spend": ("FP32", [-1, 1]),
        "plan": ("BYTES", [-1, 1]),
        "tenure": ("FP32", [-1, 1]),
        "city": ("BYTES", [-1, 1]),
    }

    rows = _frame(40)
    cities = rows["city"].astype(str).to_numpy(dtype=object)
    cities[:3] = "paris"  # never seen: pandas codes it -1, LightGBM reads it as missing
    feeds = {
        "spend": rows[["spend"]].to_numpy(np.float32),
        "plan": rows[["plan"]].astype(str).to_numpy(dtype=object),
        "tenure": rows[["tenure"]].to_numpy(np.float32),
        "city": cities.reshape(-1, 1),
    }
    answers = served(start_gateway, tmp_path / "repo", "churn", feeds, ["label", "probabilities"])
    native_rows = pd.DataFrame(
        {
            "spend": feeds["spend"][:, 0].astype(np.float64),
            "plan": pd.Categorical(feeds["plan"][:, 0], categories=PLANS),
            "tenure": feeds["tenure"][:, 0].astype(np.float64),
            "city": pd.Categorical([c if c in CITIES else None for c in cities], categories=CITIES),
        }
    )
    positive = np.asarray(lgb.Booster(model_file=tmp_path / "churn.txt").predict(native_rows))
    np.testing.assert_allclose(answers["probabilities"][:, 1], positive, atol=1e-5)
    assert answers["label"].tolist() == (positive > 0.5).astype(int).tolist()
    assert len(set(answers["label"].tolist())) == 2

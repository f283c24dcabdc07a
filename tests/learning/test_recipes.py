"""Recipes recorded at conversion, and retraining with them: real libraries, real Rscript, small data.

Each test converts a model with `onnxgate convert --recipe ... --training-data ...` (the CLI entry),
loads the record back, retrains on drifted rows, converts and checks the result (parity against the
native library, or R's own predict()), and publishes it as the next version.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import joblib
import numpy as np
import pandas as pd
import pytest

from onnxgate.learning.recipes import RecipeError, convert_checked, publish_version, retrain
from onnxgate.learning.training import TrainingRecord
from tests.converters.helpers import check_published, published, run_cli, run_onnx


def _published_record(repo: Path, name: str, framework: str, task: str) -> tuple[Path, TrainingRecord]:
    version = published(repo, name)
    check_published(version, framework, task)
    return version, TrainingRecord.load(version)


def _sha256(path: Path) -> str:
    return f"sha256:{hashlib.sha256(path.read_bytes()).hexdigest()}"


# ---------------------------------------------------------------- scikit-learn


def _shop_frame(n: int, seed: int, flip: bool = False) -> pd.DataFrame:
    """A row id (given to the pipeline, which drops it), a string column, two numbers, the target."""
    rng = np.random.default_rng(seed)
    age = rng.uniform(18, 70, n)
    income = rng.normal(50, 15, n)
    city = rng.choice(["lyon", "oslo", "quito"], n)
    score = 0.08 * (age - 44) + 0.1 * (income - 50) + np.where(city == "oslo", 1.5, -0.5)
    bought = ((-score if flip else score) + rng.normal(0, 0.5, n) > 0).astype(np.int64)
    # columns in an order of their own: the record maps them by name
    return pd.DataFrame({"row_id": np.arange(n), "city": city, "age": age, "bought": bought, "income": income})


def _shop_pipeline(frame: pd.DataFrame) -> object:
    from sklearn.compose import ColumnTransformer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    columns = ColumnTransformer(
        [("num", StandardScaler(), ["age", "income"]), ("cat", OneHotEncoder(handle_unknown="ignore"), ["city"])],
        remainder="drop",
    )
    model = make_pipeline(columns, LogisticRegression(C=0.5, max_iter=500))
    return model.fit(frame.drop(columns=["bought"]), frame["bought"])


@pytest.fixture
def shop(tmp_path: Path) -> tuple[Path, Path, pd.DataFrame, Path]:
    """A pipeline converted with --recipe sklearn: (repository, version 1, training frame, model file)."""
    frame = _shop_frame(150, seed=1)
    frame.to_csv(tmp_path / "train.csv", index=False)
    source = tmp_path / "shop.joblib"
    joblib.dump(_shop_pipeline(frame), source)
    repo = tmp_path / "repo"
    code = run_cli(source, repo, "shop", "--recipe", "sklearn", "--training-data", str(tmp_path / "train.csv"))
    assert code == 0
    return repo, published(repo, "shop"), frame, source


def test_convert_records_the_training_record(shop: tuple[Path, Path, pd.DataFrame, Path]) -> None:
    _, version, frame, source = shop
    report = check_published(version, "sklearn", "classification")
    training = version / "training"
    assert sorted(p.name for p in training.iterdir()) == ["base.parquet", "model.joblib", "recipe.json"]
    assert (training / "model.joblib").read_bytes() == source.read_bytes()
    recipe = json.loads((training / "recipe.json").read_text())
    # the target is the one column no input takes; row_id is an input (the pipeline drops it itself)
    assert recipe["target"] == "bought" and recipe["recipe"] == "sklearn" and recipe["framework"] == "sklearn"
    assert {i["name"]: i["columns"] for i in recipe["inputs"]} == {c: [c] for c in ["row_id", "city", "age", "income"]}
    assert {i["name"]: i["datatype"] for i in recipe["inputs"]}["city"] == "BYTES"
    assert recipe["labels"] == ["0", "1"] and recipe["task"] == "classification"
    assert recipe["hyperparameters"]["logisticregression__C"] == 0.5
    assert recipe["base_data"]["sha256"] == _sha256(training / "base.parquet")
    assert recipe["base_data"]["rows"] == 150 and recipe["base_data"]["source"] == "train.csv"
    # the training data was the parity sample, and the report names the record
    assert report["parity"]["sample"] == "training data train.csv" and report["parity"]["rows"] == 150
    assert report["training"]["target"] == "bought"

    record = TrainingRecord.load(version)
    X, y = record.base_data()
    assert list(X.columns) == ["row_id", "city", "age", "income"]
    np.testing.assert_array_equal(y.to_numpy(), frame["bought"].to_numpy())
    np.testing.assert_allclose(X["income"].to_numpy(), frame["income"].to_numpy())
    # logged tensors -> training rows -> tensors: the same values (numbers through float32, as served)
    inputs = record.inputs_from_features(X)
    assert inputs["city"].dtype == object and inputs["age"].dtype == np.float32 and inputs["age"].shape == (150, 1)
    back = record.features_from_inputs({k: v.astype(np.bytes_) if v.dtype == object else v for k, v in inputs.items()})
    assert list(back["city"]) == list(frame["city"])
    np.testing.assert_allclose(back["age"].to_numpy(), frame["age"].to_numpy(), rtol=1e-6)
    assert record.target_dtype == np.dtype(np.int64)


def test_sklearn_refit_is_published_with_its_own_record(
    shop: tuple[Path, Path, pd.DataFrame, Path], tmp_path: Path
) -> None:
    from sklearn.base import clone

    repo, version, _, source = shop
    record = TrainingRecord.load(version)
    drifted = _shop_frame(200, seed=2, flip=True)
    X, y = record.features(drifted), drifted["bought"]
    native = retrain(record, X, y, workdir=tmp_path / "work", seed=3)
    refit = joblib.load(native)
    # a clone with the same hyperparameters, fitted on the new rows
    assert refit.get_params()["logisticregression__C"] == 0.5
    by_hand = clone(joblib.load(source)).fit(X, y)
    np.testing.assert_allclose(refit.predict_proba(X), by_hand.predict_proba(X), atol=1e-9)

    conversion, report, passed = convert_checked(native, record, X)
    assert passed, report["parity"]
    v2 = publish_version(repo, "shop", conversion, report, native, record, {"model_card.json": b'{"parent": 1}'})
    assert v2.name == "2" and (v2 / "model_card.json").read_bytes() == b'{"parent": 1}'
    check_published(v2, "sklearn", "classification")
    served = run_onnx(v2, record.inputs_from_features(X))
    np.testing.assert_array_equal(served["label"], refit.predict(X))
    np.testing.assert_allclose(served["probabilities"], refit.predict_proba(X), atol=1e-5)
    old = run_onnx(version, record.inputs_from_features(X))
    assert (old["label"] != served["label"]).mean() > 0.5  # the concept flipped; the refit followed it

    again = TrainingRecord.load(v2)
    assert (v2 / "training" / "model.joblib").read_bytes() == native.read_bytes()
    assert again.base_sha256 == record.base_sha256 == _sha256(v2 / "training" / "base.parquet")
    assert again.columns == record.columns and again.target == "bought"


# ---------------------------------------------------------------- R


_R_GLM = r"""
args <- commandArgs(trailingOnly = TRUE)
set.seed(11)
n <- 160
train <- data.frame(x1 = rnorm(n), x2 = rnorm(n))
train$y <- rbinom(n, 1, plogis(0.4 + 1.5 * train$x1 - train$x2))
saveRDS(glm(y ~ x1 + x2, data = train, family = binomial()), file.path(args[1], "glm.rds"))
write.csv(train, file.path(args[1], "train.csv"), row.names = FALSE)
"""

_R_DIRECT = r"""
args <- commandArgs(trailingOnly = TRUE)
d <- read.csv(args[1])
m <- glm(y ~ x1 + x2, data = d, family = binomial())
writeLines(sprintf("%.17g", predict(m, d, type = "response")))
"""


def _rscript(script: str, tmp_path: Path, *args: str) -> str:
    if shutil.which("Rscript") is None:
        pytest.fail("R is not installed (run .ci/deps/converters-r-java.sh)")
    path = tmp_path / "script.R"
    path.write_text(script)
    done = subprocess.run(["Rscript", "--vanilla", str(path), *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_r_glm_is_refit_in_r_and_published(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _rscript(_R_GLM, tmp_path, str(tmp_path))
    repo = tmp_path / "repo"
    assert (
        run_cli(tmp_path / "glm.rds", repo, "churn", "--recipe", "r", "--training-data", str(tmp_path / "train.csv"))
        == 0
    )
    version, record = _published_record(repo, "churn", "rdata", "classification")
    assert record.target == "y" and record.columns == {"input": ["x1", "x2"]}
    assert record.hyperparameters == {"class": "glm", "family": "binomial", "link": "logit"}

    rng = np.random.default_rng(5)
    new = pd.DataFrame({"x1": rng.normal(size=180), "x2": rng.normal(size=180)})
    new["y"] = (rng.uniform(size=180) < 1 / (1 + np.exp(-(-1.0 - 2.0 * new["x1"] + 0.5 * new["x2"])))).astype(int)
    X = record.features(new)
    native = retrain(record, X, new["y"], workdir=tmp_path / "work", seed=1)
    assert native.suffix == ".rds"
    conversion, report, passed = convert_checked(native, record, X)
    assert passed and "R's predict()" in report["notes"][0]  # parity against R itself
    v2 = publish_version(repo, "churn", conversion, report, native, record)
    check_published(v2, "rdata", "classification")

    # the refit is the glm R fits directly on the new rows
    new.to_csv(tmp_path / "new.csv", index=False)
    direct = np.array([float(v) for v in _rscript(_R_DIRECT, tmp_path, str(tmp_path / "new.csv")).split()])
    served = run_onnx(v2, record.inputs_from_features(X))
    np.testing.assert_allclose(served["probabilities"][:, 1], direct, atol=1e-5)
    assert not np.allclose(run_onnx(version, record.inputs_from_features(X))["probabilities"][:, 1], direct, atol=0.05)
    assert TrainingRecord.load(v2).model_path == v2 / "training" / "model.rds"

    # without R there is no refit, and the message says what to install
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(RecipeError, match="Rscript is not on PATH"):
        retrain(record, X, new["y"], workdir=tmp_path / "again")


# ---------------------------------------------------------------- boosters


def _boost_frame(n: int, seed: int, flip: bool = False) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame(rng.normal(size=(n, 3)), columns=["a", "b", "c"])
    signal = frame["a"] - 0.5 * frame["b"]
    frame["label"] = ((-signal if flip else signal) > 0).astype(np.int64)
    return frame


def test_xgboost_continued_training(tmp_path: Path) -> None:
    import xgboost

    frame = _boost_frame(200, seed=1)
    served = xgboost.train(
        {"objective": "binary:logistic", "max_depth": 2, "seed": 0, "nthread": 1},
        xgboost.DMatrix(frame[["a", "b", "c"]], label=frame["label"]),
        5,
    )
    served.save_model(tmp_path / "model.json")
    frame.to_csv(tmp_path / "train.csv", index=False)
    repo = tmp_path / "repo"
    code = run_cli(
        tmp_path / "model.json", repo, "risk", "--recipe", "xgboost", "--training-data", str(tmp_path / "train.csv")
    )
    assert code == 0
    _, record = _published_record(repo, "risk", "xgboost", "classification")
    assert record.target == "label" and record.columns == {"input": ["a", "b", "c"]}
    assert record.hyperparameters == {"objective": "binary:logistic", "max_depth": 2, "num_boost_round": 5}

    drifted = _boost_frame(200, seed=2, flip=True)
    X = record.features(drifted)
    native = retrain(record, X, drifted["label"], workdir=tmp_path / "work", mode="continue", seed=0)
    grown = xgboost.Booster()
    grown.load_model(native)
    assert grown.num_boosted_rounds() > served.num_boosted_rounds()
    matrix = xgboost.DMatrix(X)
    # continued: the served trees first, unchanged, then new ones that follow the drift
    np.testing.assert_allclose(grown[: served.num_boosted_rounds()].predict(matrix), served.predict(matrix), atol=1e-6)
    assert np.abs(grown.predict(matrix) - served.predict(matrix)).max() > 0.1
    conversion, report, passed = convert_checked(native, record, X)
    assert passed, report["parity"]
    v2 = publish_version(repo, "risk", conversion, report, native, record)
    assert TrainingRecord.load(v2).hyperparameters["num_boost_round"] == grown.num_boosted_rounds()


def test_lightgbm_refit(tmp_path: Path) -> None:
    import lightgbm

    frame = _boost_frame(200, seed=3)
    frame["value"] = 2 * frame.pop("label") + frame["c"]
    params = {"objective": "regression", "num_leaves": 4, "learning_rate": 0.3, "verbosity": -1, "seed": 0}
    served = lightgbm.train(params, lightgbm.Dataset(frame[["a", "b", "c"]], label=frame["value"]), 8)
    served.save_model(tmp_path / "model.txt")
    frame.to_csv(tmp_path / "train.csv", index=False)
    repo = tmp_path / "repo"
    code = run_cli(
        tmp_path / "model.txt", repo, "value", "--recipe", "lightgbm", "--training-data", str(tmp_path / "train.csv")
    )
    assert code == 0
    _, record = _published_record(repo, "value", "lightgbm", "regression")
    # the booster file names its features (its converter does not): the target is inferred by name
    assert record.target == "value" and record.columns == {"input": ["a", "b", "c"]}

    drifted = frame.assign(value=-frame["value"])
    native = retrain(record, record.features(drifted), drifted["value"], workdir=tmp_path / "work")
    refit = lightgbm.Booster(model_file=str(native))
    assert refit.current_iteration() == 8 and refit.params["num_leaves"] == 4
    X = record.features(drifted)
    assert np.corrcoef(refit.predict(X.to_numpy()), served.predict(X.to_numpy()))[0, 1] < 0
    _, report, passed = convert_checked(native, record, X)
    assert passed, report["parity"]


def test_catboost_refit_needs_the_target_when_columns_have_no_names(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import catboost

    frame = _boost_frame(150, seed=4)
    served = catboost.CatBoostClassifier(
        iterations=10, depth=3, random_seed=0, verbose=False, allow_writing_files=False, thread_count=1
    )
    served.fit(frame[["a", "b", "c"]].to_numpy(), frame["label"])  # an array: CatBoost names the columns 0, 1, 2
    served.save_model(str(tmp_path / "model.cbm"))
    frame.to_csv(tmp_path / "train.csv", index=False)
    repo = tmp_path / "repo"
    args = ("--recipe", "catboost", "--training-data", str(tmp_path / "train.csv"))
    assert run_cli(tmp_path / "model.cbm", repo, "cb", *args) == 2
    assert "pass --target (one of ['a', 'b', 'c', 'label'])" in capsys.readouterr().err
    assert not (repo / "cb").exists() or not list((repo / "cb").iterdir())
    assert run_cli(tmp_path / "model.cbm", repo, "cb", *args, "--target", "label") == 0
    _, record = _published_record(repo, "cb", "catboost", "classification")
    assert record.columns == {"input": ["a", "b", "c"]}

    drifted = _boost_frame(150, seed=5, flip=True)
    X = record.features(drifted)
    native = retrain(record, X, drifted["label"], workdir=tmp_path / "work", seed=1)
    refit = catboost.CatBoost()
    refit.load_model(str(native))
    assert refit.tree_count_ == 10 and refit.get_all_params()["depth"] == 3
    agreement = (refit.predict(X.to_numpy(), prediction_type="Class") == drifted["label"].to_numpy()).mean()
    assert agreement > 0.8
    _, report, passed = convert_checked(native, record, X)
    assert passed, report["parity"]


# ---------------------------------------------------------------- a user function

USER_RECIPE = """
from sklearn.linear_model import Ridge

seen = []


def train(X, y, previous_model):
    seen.append(previous_model)
    return Ridge(alpha=previous_model.alpha * 2).fit(X, y)


def broken(X, y, previous_model):
    raise ValueError("no good rows today")
"""


def test_user_function_recipe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from sklearn.linear_model import Ridge

    # the user's module is importable as any Python module is: installed, or its directory on PYTHONPATH
    (tmp_path / "my_recipe.py").write_text(USER_RECIPE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "my_recipe", raising=False)
    frame = _boost_frame(120, seed=6)
    frame["value"] = 3 * frame["a"] - frame["b"]
    frame = frame.drop(columns=["label"])
    joblib.dump(Ridge(alpha=1.0).fit(frame[["a", "b", "c"]], frame["value"]), tmp_path / "ridge.joblib")
    frame.to_csv(tmp_path / "train.csv", index=False)
    repo = tmp_path / "repo"
    args = ("--training-data", str(tmp_path / "train.csv"))
    assert run_cli(tmp_path / "ridge.joblib", repo, "ridge", "--recipe", "python:my_recipe:train", *args) == 0
    _, record = _published_record(repo, "ridge", "sklearn", "regression")
    assert record.recipe == "python:my_recipe:train" and record.target == "value"

    X = record.features(frame)
    native = retrain(record, X, -frame["value"], workdir=tmp_path / "work")
    import my_recipe  # type: ignore[import-not-found]

    assert type(my_recipe.seen[0]).__name__ == "Ridge" and my_recipe.seen[0].alpha == 1.0  # the served model
    assert joblib.load(native).alpha == 2.0
    conversion, report, passed = convert_checked(native, record, X)
    assert passed
    v2 = publish_version(repo, "ridge", conversion, report, native, record)
    np.testing.assert_allclose(
        run_onnx(v2, record.inputs_from_features(X))["prediction"].ravel(),
        joblib.load(native).predict(X),
        rtol=1e-4,
        atol=1e-4,
    )
    assert TrainingRecord.load(v2).recipe == "python:my_recipe:train"

    failing = dataclasses.replace(record, recipe="python:my_recipe:broken")
    with pytest.raises(RecipeError, match=r"python:my_recipe:broken.*raised ValueError: no good rows today"):
        retrain(failing, X, frame["value"], workdir=tmp_path / "work2")
    with pytest.raises(RecipeError, match="takes no sample_weight"):
        retrain(record, X, frame["value"], workdir=tmp_path / "work3", sample_weight=np.ones(len(X)))


# ---------------------------------------------------------------- refusals


def test_bad_recipes_and_data_are_refused_clearly(
    shop: tuple[Path, Path, pd.DataFrame, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    repo, version, frame, source = shop
    capsys.readouterr()
    train = str(tmp_path / "train.csv")

    def refused(*args: str) -> str:
        assert run_cli(source, repo, "shop", *args) == 2
        return capsys.readouterr().err

    assert (
        "recipe 'xgboost' retrains xgboost models, and this source is a sklearn model: use --recipe sklearn"
        in refused("--recipe", "xgboost", "--training-data", train)
    )
    assert "unknown recipe 'spark'" in refused("--recipe", "spark", "--training-data", train)
    assert "cannot import module 'no_such_module_here'" in refused(
        "--recipe", "python:no_such_module_here:fit", "--training-data", train
    )
    assert "--recipe and --training-data go together" in refused("--recipe", "sklearn")
    assert "target column 'price' is not in training data 'train.csv'" in refused(
        "--recipe", "sklearn", "--training-data", train, "--target", "price"
    )
    frame.assign(note=1.0).to_csv(tmp_path / "wide.csv", index=False)
    assert "the columns the model does not read are ['bought', 'note']; pass --target" in refused(
        "--recipe", "sklearn", "--training-data", str(tmp_path / "wide.csv")
    )
    frame.drop(columns=["age"]).to_csv(tmp_path / "narrow.csv", index=False)
    assert "lacks columns the model reads: ['age']" in refused(
        "--recipe", "sklearn", "--training-data", str(tmp_path / "narrow.csv")
    )
    assert [p.name for p in (repo / "shop").iterdir()] == ["1"]  # nothing published, nothing left aside

    record = TrainingRecord.load(version)
    X, y = record.base_data()
    with pytest.raises(RecipeError, match="mode 'continue' is for xgboost, lightgbm and catboost"):
        retrain(record, X, y, workdir=tmp_path / "w", mode="continue")
    with pytest.raises(RecipeError, match="lack the columns \\['city'\\]"):
        retrain(record, X.drop(columns=["city"]), y, workdir=tmp_path / "w")
    with pytest.raises(RecipeError, match="150 training rows but 3 target values"):
        retrain(record, X, y[:3], workdir=tmp_path / "w")
    with pytest.raises(RecipeError, match="could not refit Pipeline"):
        retrain(record, X, pd.Series(np.zeros(len(X), dtype=int)), workdir=tmp_path / "w")  # one class only
    (version / "training" / "base.parquet").write_bytes(b"changed")
    with pytest.raises(RecipeError, match=r"base training data .* changed"):
        record.base_data()

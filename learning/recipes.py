"""Retrain a model in its own ecosystem, then convert and check it like any model `onnxgate convert` takes.

    retrain(record, X, y, workdir=..., mode="refit"|"continue", sample_weight=None, seed=0) -> native file
    convert_checked(native, record, X)            -> (Conversion, report, parity passed), nothing written
    publish_version(repo, name, conversion, report, native, record, extra) -> the new version directory

Recipes (named at conversion, kept in `training/recipe.json`, see training.py):
- `sklearn`: a clone of the estimator or pipeline (same hyperparameters, `random_state` = seed) fitted anew;
  `family=` (a ladder's rung, learning/ladder.py) fits another estimator class instead (in the pipeline's
  last step); `mode="continue"`: the served estimator updated by `partial_fit` on the rows given (online
  learning: SGD*, *NB, Perceptron, MLP*, ...; a pipeline's fitted preprocessing is kept as it is);
- `xgboost`, `lightgbm`, `catboost`: refit with the recorded parameters and number of rounds, or
  `mode="continue"`: more rounds boosted on top of the served model (options.continue_rounds in
  recipe.json, by default half the served model's rounds);
- `r`: lm, glm and randomForest refit *in R* by Rscript (`update(model, data = new)`), saved with saveRDS;
- `python:module:function`: `function(X, y, previous_model)` (and `sample_weight=` when it takes one)
  returns an estimator object, a booster, or the path of a model file.

Every failure is a RecipeError whose message says what went wrong (R missing, the user function raised,
labels the booster cannot take, ...).
"""

from __future__ import annotations

import inspect
import json
import math
import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from onnxgate import converters
from onnxgate.converters import parity, publish
from onnxgate.converters.base import Conversion, ConversionError
from onnxgate.learning.training import (
    BUILTIN_RECIPES,
    PYTHON_PREFIX,
    TRAINING_DIR,
    RecipeError,
    TrainingRecord,
    load_user_function,
)

__all__ = [
    "FAMILIES",
    "MODES",
    "RecipeError",
    "convert_checked",
    "describe",
    "family_class",
    "family_estimator",
    "family_name",
    "next_record",
    "publish_version",
    "retrain",
    "retrain_native",
]

MODES = ("refit", "continue")
R_TIMEOUT_S = 600


def retrain(
    record: TrainingRecord,
    X: pd.DataFrame,
    y: pd.Series,
    *,
    workdir: Path,
    mode: str = "refit",
    sample_weight: np.ndarray | None = None,
    seed: int = 0,
    family: str | None = None,
) -> Path:
    """Train the record's model again on (X, y) with its recipe; returns the new native file in `workdir`.

    X has the record's training columns (`record.feature_columns`; others are ignored), y the target.
    `family` (sklearn recipe, refit only): the estimator class to fit, a ladder name or a dotted class path.
    """
    if mode not in MODES:
        raise RecipeError(f"mode {mode!r}: use one of {', '.join(MODES)}")
    if mode == "continue" and record.recipe not in ("xgboost", "lightgbm", "catboost", "sklearn"):
        raise RecipeError(
            f"recipe {record.recipe!r} refits; mode 'continue' is for xgboost, lightgbm and catboost, and"
            " scikit-learn estimators with partial_fit"
        )
    if family is not None and (record.recipe != "sklearn" or mode != "refit"):
        raise RecipeError(f"a model family ({family!r}) is refit by the sklearn recipe only")
    features = record.features(X)
    target = pd.Series(y).reset_index(drop=True)
    if len(features) == 0:
        raise RecipeError("no training rows")
    if len(target) != len(features):
        raise RecipeError(f"{len(features)} training rows but {len(target)} target values")
    if target.isna().any():
        raise RecipeError(f"{int(target.isna().sum())} training rows have no target value")
    weight = None if sample_weight is None else np.asarray(sample_weight, dtype=np.float64).reshape(-1)
    if weight is not None and (len(weight) != len(features) or not np.all(np.isfinite(weight)) or (weight < 0).any()):
        raise RecipeError(f"sample_weight needs {len(features)} finite values >= 0 (got {len(weight)})")
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if record.recipe.startswith(PYTHON_PREFIX):
        return _python(record, features, target, workdir, weight)
    if record.model_path is None or not record.model_path.is_file():
        raise RecipeError(f"the record's native model file is missing ({record.model_path})")
    trainers = {"sklearn": _sklearn, "xgboost": _xgboost, "lightgbm": _lightgbm, "catboost": _catboost, "r": _r}
    trainer = trainers.get(record.recipe)
    if trainer is None:
        raise RecipeError(f"unknown recipe {record.recipe!r}")
    if family is not None:
        return _sklearn(record, features, target, workdir, mode, weight, seed, family)
    return trainer(record, features, target, workdir, mode, weight, seed)


# the name the retrain command imported first; the same function
retrain_native = retrain


# ---------------------------------------------------------------- scikit-learn


def _sklearn(
    record: TrainingRecord,
    X: pd.DataFrame,
    y: pd.Series,
    workdir: Path,
    mode: str,
    weight: np.ndarray | None,
    seed: int,
    family: str | None = None,
) -> Path:
    import joblib
    from sklearn.base import clone
    from sklearn.utils.validation import has_fit_parameter

    assert record.model_path is not None
    model = _joblib_load(record.model_path)
    if mode == "continue":
        return _partial_fit(model, X, y, workdir, weight)
    fresh = clone(model if family is None else family_estimator(family, record.task, model))
    # random_state is not a hyperparameter to keep: the seed makes a retrain reproducible
    seeded = {k: seed for k in fresh.get_params(deep=True) if k == "random_state" or k.endswith("__random_state")}
    fresh.set_params(**seeded)
    kwargs: dict[str, Any] = {}
    if weight is not None:
        final_name, final = (fresh.steps[-1][0], fresh.steps[-1][1]) if hasattr(fresh, "steps") else ("", fresh)
        if not has_fit_parameter(final, "sample_weight"):
            raise RecipeError(f"{type(final).__name__}.fit takes no sample_weight: train it without weights")
        kwargs = {f"{final_name}__sample_weight" if final_name else "sample_weight": weight}
    # an estimator fitted on a DataFrame names its columns; one fitted on an array must get an array again
    data: Any = X if hasattr(model, "feature_names_in_") else X.to_numpy()
    try:
        fresh.fit(data, y.to_numpy(), **kwargs)
    except Exception as error:  # scikit-learn raises ValueError, TypeError, ... on bad data
        raise RecipeError(
            f"scikit-learn could not refit {type(model).__name__}: {type(error).__name__}: {error}"
        ) from error
    out = workdir / "model.joblib"
    joblib.dump(fresh, out)
    return out


def _partial_fit(model: Any, X: pd.DataFrame, y: pd.Series, workdir: Path, weight: np.ndarray | None) -> Path:
    """The served estimator (or a pipeline's last step) updated by one `partial_fit` call on (X, y)."""
    import copy

    import joblib

    updated = copy.deepcopy(model)
    final = updated.steps[-1][1] if hasattr(updated, "steps") else updated
    if not callable(getattr(final, "partial_fit", None)):
        raise RecipeError(
            f"{type(final).__name__} has no partial_fit: mode 'continue' is for xgboost, lightgbm and catboost,"
            " and scikit-learn estimators with partial_fit (SGDClassifier, MultinomialNB, MLPRegressor, ...)"
        )
    data: Any = X if hasattr(model, "feature_names_in_") else X.to_numpy()
    if hasattr(updated, "steps"):
        for _, step in updated.steps[:-1]:
            if step is not None and step != "passthrough":
                data = step.transform(data)
    kwargs: dict[str, Any] = {}
    if weight is not None:
        if "sample_weight" not in inspect.signature(final.partial_fit).parameters:
            raise RecipeError(f"{type(final).__name__}.partial_fit takes no sample_weight: update it without weights")
        kwargs["sample_weight"] = weight
    try:
        final.partial_fit(data, y.to_numpy(), **kwargs)
    except Exception as error:  # scikit-learn raises ValueError, TypeError, ... on bad data
        raise RecipeError(
            f"scikit-learn could not update {type(final).__name__}: {type(error).__name__}: {error}"
        ) from error
    out = workdir / "model.joblib"
    joblib.dump(updated, out)
    return out


# ladder names -> scikit-learn classes, per task; any other name is a dotted class path
FAMILIES: dict[str, dict[str, str]] = {
    "classification": {
        "logistic": "sklearn.linear_model.LogisticRegression",
        "tree": "sklearn.tree.DecisionTreeClassifier",
        "forest": "sklearn.ensemble.RandomForestClassifier",
        "gbm": "sklearn.ensemble.HistGradientBoostingClassifier",
    },
    "regression": {
        "linear": "sklearn.linear_model.LinearRegression",
        "ridge": "sklearn.linear_model.Ridge",
        "tree": "sklearn.tree.DecisionTreeRegressor",
        "forest": "sklearn.ensemble.RandomForestRegressor",
        "gbm": "sklearn.ensemble.HistGradientBoostingRegressor",
    },
}


def family_class(family: str, task: str) -> type:
    """A ladder's rung (a short name of FAMILIES[task], or `module.Class`) -> the scikit-learn class."""
    import importlib

    path = FAMILIES.get(task, {}).get(family, family)
    module_name, _, class_name = path.rpartition(".")
    names = ", ".join(FAMILIES.get(task, {}))
    if not module_name:
        raise RecipeError(f"model family {family!r}: use one of {names} ({task}), or a class path module.Class")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as error:
        raise RecipeError(f"model family {family!r}: cannot import {path} ({error})") from error
    if not isinstance(cls, type) or not callable(getattr(cls, "fit", None)):
        raise RecipeError(f"model family {family!r}: {path} is not an estimator class")
    return cls


def family_estimator(family: str, task: str, served: Any) -> Any:
    """An unfitted estimator of `family` in the served model's place: the served estimator itself (its
    hyperparameters kept) when it is of that class, else the class with its defaults; in a pipeline, the
    last step is replaced and the preprocessing kept."""
    from sklearn.base import clone

    cls = family_class(family, task)
    final = served.steps[-1][1] if hasattr(served, "steps") else served
    if type(final) is cls:
        return served
    if hasattr(served, "steps"):
        pipeline = clone(served)
        pipeline.steps[-1] = (pipeline.steps[-1][0], cls())
        return pipeline
    return cls()


def family_name(estimator: Any, task: str) -> str:
    """The ladder name of an estimator's class (a pipeline's last step), else its class path."""
    final = estimator.steps[-1][1] if hasattr(estimator, "steps") else estimator
    for short in FAMILIES.get(task, {}):
        if type(final) is family_class(short, task):
            return short
    return f"{type(final).__module__}.{type(final).__qualname__}"


def _joblib_load(path: Path) -> Any:
    from onnxgate.converters import sklearn as sklearn_converter

    try:
        return sklearn_converter.load(path)
    except ConversionError as error:
        raise RecipeError(str(error)) from error


# ---------------------------------------------------------------- boosters


def _class_codes(record: TrainingRecord, y: pd.Series, library: str) -> np.ndarray:
    """Booster files learn classes 0..C-1: the targets must be those integers."""
    if record.task != "classification":
        return np.asarray(y.to_numpy(dtype=np.float64))
    n_classes = len(record.labels or []) or 2
    try:
        codes = np.asarray(pd.to_numeric(y, errors="raise"), dtype=np.float64)
    except (ValueError, TypeError):
        codes = np.array([math.nan])
    if not np.all(np.isin(codes, np.arange(n_classes))):
        raise RecipeError(
            f"{library} classifier files learn the classes 0..{n_classes - 1}; the target holds other values"
            f" ({sorted(set(map(str, y.unique())))[:10]}): encode the labels as those integers"
        )
    return codes


def _continue_rounds(record: TrainingRecord, served_rounds: int) -> int:
    return int(record.options.get("continue_rounds") or max(1, served_rounds // 2))


def _xgboost(
    record: TrainingRecord,
    X: pd.DataFrame,
    y: pd.Series,
    workdir: Path,
    mode: str,
    weight: np.ndarray | None,
    seed: int,
) -> Path:
    import xgboost

    assert record.model_path is not None
    booster = xgboost.Booster()
    booster.load_model(str(record.model_path))
    served_rounds = booster.num_boosted_rounds()
    params = {k: v for k, v in record.hyperparameters.items() if k != "num_boost_round"}
    params.update(seed=seed, nthread=1)  # one thread: the same trees on every machine
    labels = _class_codes(record, y, "XGBoost")
    matrix = xgboost.DMatrix(X.to_numpy(np.float32), label=labels, weight=weight, feature_names=booster.feature_names)
    try:
        if mode == "continue":
            new = xgboost.train(params, matrix, _continue_rounds(record, served_rounds), xgb_model=booster)
        else:
            new = xgboost.train(params, matrix, int(record.hyperparameters.get("num_boost_round", served_rounds)))
    except xgboost.core.XGBoostError as error:
        raise RecipeError(f"XGBoost could not train: {str(error).strip().splitlines()[0]}") from error
    out = workdir / "model.json"
    new.save_model(str(out))
    return out


# lightgbm's own counts and seeds: the number of rounds is given to train(), `seed` derives the others
_LGB_DROP = {
    "num_iterations",
    "num_iteration",
    "n_iter",
    "num_tree",
    "num_trees",
    "num_round",
    "num_rounds",
    "nrounds",
    "num_boost_round",
    "n_estimators",
    "max_iter",
    "bagging_seed",
    "feature_fraction_seed",
    "extra_seed",
    "drop_seed",
    "objective_seed",
    "data_random_seed",
}


def _lightgbm(
    record: TrainingRecord,
    X: pd.DataFrame,
    y: pd.Series,
    workdir: Path,
    mode: str,
    weight: np.ndarray | None,
    seed: int,
) -> Path:
    import lightgbm

    assert record.model_path is not None
    booster = lightgbm.Booster(model_file=str(record.model_path))
    params = {k: v for k, v in booster.params.items() if k not in _LGB_DROP}
    params.update(seed=seed, deterministic=True, num_threads=1, verbosity=-1)
    names = booster.feature_name()
    dataset = lightgbm.Dataset(
        X.to_numpy(np.float64),
        label=_class_codes(record, y, "LightGBM"),
        weight=weight,
        feature_name=names if len(names) == X.shape[1] else "auto",
        params={"verbosity": -1},
    )
    served_rounds = booster.current_iteration()
    try:
        if mode == "continue":
            new = lightgbm.train(params, dataset, _continue_rounds(record, served_rounds), init_model=booster)
        else:
            new = lightgbm.train(params, dataset, served_rounds)
    except lightgbm.basic.LightGBMError as error:
        raise RecipeError(f"LightGBM could not train: {error}") from error
    out = workdir / "model.txt"
    new.save_model(str(out))
    return out


# set per run, not hyperparameters: output, logging and the seed
_CATBOOST_DROP = {
    "verbose",
    "verbose_eval",
    "logging_level",
    "silent",
    "allow_writing_files",
    "train_dir",
    "random_seed",
}


def _catboost(
    record: TrainingRecord,
    X: pd.DataFrame,
    y: pd.Series,
    workdir: Path,
    mode: str,
    weight: np.ndarray | None,
    seed: int,
) -> Path:
    import catboost

    assert record.model_path is not None
    served = catboost.CatBoost()
    served.load_model(str(record.model_path))
    everything = served.get_all_params()
    params = {k: v for k, v in served.get_params().items() if k not in _CATBOOST_DROP}
    params.setdefault("loss_function", everything.get("loss_function"))
    params.setdefault("iterations", served.tree_count_)
    if record.task == "classification" and "class_names" in everything:
        params["class_names"] = everything["class_names"]  # the served label order, whatever the rows hold
    params.update(random_seed=seed, thread_count=1, allow_writing_files=False, logging_level="Silent")
    init_model = None
    if mode == "continue":
        params["iterations"] = _continue_rounds(record, served.tree_count_)
        init_model = served
    target = y.to_numpy()
    try:
        new = catboost.CatBoost(params)
        new.fit(X.to_numpy(np.float64), target, sample_weight=weight, init_model=init_model)
    except catboost.CatBoostError as error:
        raise RecipeError(f"CatBoost could not train: {error}") from error
    out = workdir / "model.cbm"
    new.save_model(str(out))
    return out


# ---------------------------------------------------------------- R

_R_REFIT = r"""
args <- commandArgs(trailingOnly = TRUE)
m <- readRDS(args[1])
target <- args[4]
forest <- inherits(m, "randomForest")
if (forest) suppressPackageStartupMessages(library(randomForest))
if (is.null(m$terms)) stop("the model was not fitted with a formula: update() cannot refit it; fit it with one")
d <- read.csv(args[2], colClasses = "character", check.names = FALSE)
w <- NULL
if (".onnxgate_weight" %in% names(d)) {
  w <- as.numeric(d[[".onnxgate_weight"]])
  d[[".onnxgate_weight"]] <- NULL
}
for (v in setdiff(names(d), target)) {
  lv <- if (forest) m$forest$xlevels[[v]] else NULL
  d[[v]] <- if (is.character(lv)) factor(d[[v]], levels = union(lv, sort(unique(d[[v]])))) else as.numeric(d[[v]])
}
old <- if (!is.null(m$model)) m$model[[1]] else m$y
if (is.factor(old)) {
  y <- factor(d[[target]], levels = levels(old))
  if (anyNA(y)) stop(sprintf("target values %s are not among the model's classes %s",
                             paste(unique(d[[target]][is.na(y)]), collapse = ", "), paste(levels(old), collapse = ", ")))
  if (forest && any(table(y) == 0)) stop(sprintf("no training rows of the classes %s: randomForest needs them all",
                                                 paste(levels(y)[table(y) == 0], collapse = ", ")))
  d[[target]] <- y
} else {
  d[[target]] <- as.numeric(d[[target]])
}
# the formula itself (not the name it had in the user's session), evaluated here
f <- formula(m$terms)
environment(f) <- globalenv()
set.seed(as.integer(args[5]))
onnxgate_weights <- w
new <- if (forest) update(m, formula = f, data = d) else
  if (is.null(w)) update(m, formula = f, data = d, weights = NULL) else
  update(m, formula = f, data = d, weights = onnxgate_weights)
saveRDS(new, args[3])
"""


def _r(
    record: TrainingRecord,
    X: pd.DataFrame,
    y: pd.Series,
    workdir: Path,
    mode: str,
    weight: np.ndarray | None,
    seed: int,
) -> Path:
    assert record.model_path is not None
    rscript = shutil.which("Rscript")
    if rscript is None:
        raise RecipeError("recipe 'r' refits in R: Rscript is not on PATH (Debian: r-base-core, r-cran-randomforest)")
    frame = X.copy()
    if record.target in frame.columns:
        raise RecipeError(f"the target column {record.target!r} is also a training column")
    frame[record.target] = y.to_numpy()
    if weight is not None:
        if record.hyperparameters.get("class") == "randomForest":
            # randomForest takes no case weights: its bootstrap draws rows in proportion to them instead
            rng = np.random.default_rng(seed)
            frame = frame.iloc[rng.choice(len(frame), size=len(frame), p=weight / weight.sum())]
        else:
            frame[".onnxgate_weight"] = weight
    data = workdir / "train.csv"
    # repr of each float: R reads back exactly the value Python holds
    frame.to_csv(data, index=False, float_format=None)
    script = workdir / "refit.R"
    script.write_text(_R_REFIT)
    out = workdir / "model.rds"
    try:
        done = subprocess.run(
            [rscript, "--vanilla", str(script), str(record.model_path), str(data), str(out), record.target, str(seed)],
            capture_output=True,
            text=True,
            timeout=R_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired as error:
        raise RecipeError(f"R did not finish refitting within {R_TIMEOUT_S}s") from error
    if done.returncode != 0 or not out.is_file():
        raise RecipeError(f"R could not refit {record.model_path.name}: {done.stderr.strip()[-2000:]}")
    return out


# ---------------------------------------------------------------- a user function


def _python(record: TrainingRecord, X: pd.DataFrame, y: pd.Series, workdir: Path, weight: np.ndarray | None) -> Path:
    function = load_user_function(record.recipe)
    previous = _previous_model(record)
    kwargs: dict[str, Any] = {}
    if weight is not None:
        try:
            takes_weight = "sample_weight" in inspect.signature(function).parameters
        except (TypeError, ValueError):
            takes_weight = False
        if not takes_weight:
            raise RecipeError(f"recipe {record.recipe!r}: the function takes no sample_weight argument")
        kwargs["sample_weight"] = weight
    try:
        result = function(X, y, previous, **kwargs)
    except Exception as error:  # the user's code: whatever it raises is a failed recipe
        raise RecipeError(f"recipe {record.recipe!r}: the function raised {type(error).__name__}: {error}") from error
    return _save(result, workdir, record.recipe)


def _previous_model(record: TrainingRecord) -> Any:
    """The served model as a Python object where its library loads it, else the path of its file."""
    path = record.model_path
    if path is None or not path.is_file():
        return None
    if record.framework == "sklearn":
        return _joblib_load(path)
    if record.framework == "xgboost":
        import xgboost

        booster = xgboost.Booster()
        booster.load_model(str(path))
        return booster
    if record.framework == "lightgbm":
        import lightgbm

        return lightgbm.Booster(model_file=str(path))
    if record.framework == "catboost":
        import catboost

        model = catboost.CatBoost()
        model.load_model(str(path))
        return model
    return path


def _save(result: Any, workdir: Path, recipe: str) -> Path:
    """What a user function returned, as a file `onnxgate convert` reads."""
    if result is None:
        raise RecipeError(f"recipe {recipe!r}: the function returned None, not a model or a model file")
    if isinstance(result, str | Path):
        source = Path(result)
        if not source.is_file():
            raise RecipeError(f"recipe {recipe!r}: the function returned {str(result)!r}, which is not a file")
        out = workdir / f"model{source.suffix}"
        shutil.copyfile(source, out)
        return out
    module = type(result).__module__
    if module.startswith("xgboost") and type(result).__name__ == "Booster":
        out = workdir / "model.json"
    elif module.startswith("lightgbm") and type(result).__name__ == "Booster":
        out = workdir / "model.txt"
    elif module.startswith("catboost") and hasattr(result, "save_model"):
        out = workdir / "model.cbm"
    else:
        import joblib

        out = workdir / "model.joblib"
        try:
            joblib.dump(result, out)
        except Exception as error:  # pickling raises many types
            raise RecipeError(
                f"recipe {recipe!r}: the returned {type(result).__name__} cannot be saved: {error}"
            ) from error
        return out
    result.save_model(str(out))
    return out


# ---------------------------------------------------------------- hyperparameters


def _jsonable(params: Mapping[str, Any]) -> dict[str, Any]:
    """Scalars (and lists of them) only: estimator objects and callables are not hyperparameters to record."""
    out: dict[str, Any] = {}
    for key, value in params.items():
        if isinstance(value, np.generic):
            value = value.item()
        if value is None or isinstance(value, bool | int | str) or (isinstance(value, float) and math.isfinite(value)):
            out[str(key)] = value
        elif isinstance(value, list | tuple) and all(isinstance(v, bool | int | float | str) for v in value):
            out[str(key)] = list(value)
    return out


def _xgb_depth(booster: Any) -> int:
    def depth(node: dict[str, Any]) -> int:
        return 1 + max((depth(child) for child in node.get("children", [])), default=-1)

    return max((depth(json.loads(tree)) for tree in booster.get_dump(dump_format="json")), default=0)


_LGB_KEEP = (
    "objective",
    "num_class",
    "learning_rate",
    "num_leaves",
    "max_depth",
    "min_data_in_leaf",
    "feature_fraction",
    "bagging_fraction",
    "bagging_freq",
    "lambda_l1",
    "lambda_l2",
)


def describe(recipe: str, framework: str, native_file: Path | None) -> dict[str, Any]:
    """The hyperparameters a native model file exposes (recorded in recipe.json and the model card).

    XGBoost files keep the objective and the trees but not the training parameters: the recipe
    records the objective, classes, rounds and the depth the trees reached, and trains with those.
    """
    if native_file is None or not Path(native_file).is_file():
        return {}
    path = Path(native_file)
    if framework == "sklearn":
        return _jsonable(_joblib_load(path).get_params(deep=True))
    if framework == "xgboost":
        import xgboost

        booster = xgboost.Booster()
        booster.load_model(str(path))
        learner = json.loads(booster.save_config())["learner"]
        params: dict[str, Any] = {"objective": learner["objective"]["name"], "max_depth": _xgb_depth(booster)}
        n_classes = int(learner["learner_model_param"].get("num_class", "0"))
        if n_classes > 1:
            params["num_class"] = n_classes
        params["num_boost_round"] = booster.num_boosted_rounds()
        return params
    if framework == "lightgbm":
        import lightgbm

        lgb_booster = lightgbm.Booster(model_file=str(path))
        kept = {k: lgb_booster.params[k] for k in _LGB_KEEP if k in lgb_booster.params}
        return _jsonable({**kept, "num_iterations": lgb_booster.current_iteration()})
    if framework == "catboost":
        import catboost

        model = catboost.CatBoost()
        model.load_model(str(path))
        everything = model.get_all_params()
        chosen = {
            k: everything[k] for k in ("loss_function", "depth", "learning_rate", "l2_leaf_reg") if k in everything
        }
        return _jsonable({**chosen, **model.get_params(), "iterations": model.tree_count_})
    if framework == "rdata":
        return _r_hyperparameters(path)
    return {}


def _r_hyperparameters(path: Path) -> dict[str, Any]:
    from onnxgate.converters import rdata

    obj = rdata.read_rds(path)
    if "forest" in obj and "ntree" in obj:
        values = {"class": "randomForest", "ntree": obj["ntree"], "mtry": obj.get("mtry")}
        return _jsonable(
            {k: np.asarray(getattr(v, "values", v)).ravel()[0] if v is not None else None for k, v in values.items()}
        )
    if "family" in obj:
        family = obj["family"]
        return {
            "class": "glm",
            "family": str(np.asarray(getattr(family["family"], "values", family["family"])).ravel()[0]),
            "link": str(np.asarray(getattr(family["link"], "values", family["link"])).ravel()[0]),
        }
    return {"class": "lm"}


# ---------------------------------------------------------------- convert, check, publish


def _framework_of(record: TrainingRecord, native_file: Path) -> str:
    """Built-in recipes write what they read; a user function may return a model of any framework."""
    if record.recipe in BUILTIN_RECIPES:
        return record.framework
    try:
        return converters.detect_framework(str(native_file))
    except ConversionError as error:
        raise RecipeError(f"recipe {record.recipe!r} returned a model onnxgate cannot read: {error}") from error


def convert_checked(
    native_file: Path, record: TrainingRecord, X: pd.DataFrame, tolerance: parity.Tolerance | None = None
) -> tuple[Conversion, dict[str, Any], bool]:
    """Convert a retrained native model and check parity on the rows X (training columns); nothing written.

    The same code as `onnxgate convert` (converters.convert_and_check). The retrained model must take
    the inputs the served one takes (names, datatypes, shapes): clients and the prediction log rely on them.
    """
    features = record.features(X)
    if len(features) == 0:
        raise RecipeError("no rows to check parity on")
    rows = record.inputs_from_features(features)

    def attach(conversion: Conversion) -> converters.Attached:
        served = [(i.name, i.datatype, tuple(i.shape[1:])) for i in record.inputs]
        retrained = [(s.name, s.datatype, tuple(s.shape[1:])) for s in conversion.inputs]
        if served != retrained:
            raise RecipeError(f"the retrained model takes the inputs {retrained}, the served one {served}")
        return converters.Attached(sample=rows, sample_origin=f"{len(features)} training rows given by the caller")

    try:
        checked = converters.convert_and_check(
            native_file, _framework_of(record, native_file), attach=attach, tolerance=tolerance
        )
    except RecipeError:
        raise
    except ConversionError as error:
        raise RecipeError(f"the retrained model cannot be converted: {error}") from error
    return checked.conversion, checked.report, checked.parity.passed


def next_record(record: TrainingRecord, native_file: Path) -> TrainingRecord:
    """The training record of a version retrained from `record` into `native_file`."""
    framework = _framework_of(record, native_file)
    return record.with_model(native_file, framework, describe(record.recipe, framework, native_file))


def publish_version(
    repository: Path,
    name: str,
    conversion: Conversion,
    report: dict[str, Any],
    native_file: Path,
    record: TrainingRecord,
    extra: Mapping[str, bytes] | None = None,
) -> Path:
    """Publish a retrained model as the next version, atomically, with its own training record.

    `record` is the served version's record (its recipe, columns and base data carry over);
    `extra` maps further files of the version (e.g. "model_card.json") to their bytes.
    """
    new = next_record(record, native_file)
    files = new.files()
    for path, data in (extra or {}).items():
        if path in files or path.split("/", 1)[0] == TRAINING_DIR:
            raise RecipeError(f"extra file {path!r} would replace the training record")
        if not isinstance(data, bytes):
            raise RecipeError(f"extra file {path!r}: give its bytes (e.g. json.dumps(card).encode())")
        files[path] = data
    report = {**report, "training": new.summary()}
    try:
        return publish.publish(repository, name, conversion, report, files)
    except ConversionError as error:
        raise RecipeError(f"cannot publish {name}: {error}") from error

"""The training record: what a published version keeps so that it can be trained again.

`onnxgate convert SRC --recipe RECIPE --training-data FILE [--target COL]` writes, inside the version
directory (before the atomic rename, so a version has its record or does not exist):

    <version>/training/model.<ext>   the native model file, copied (what `previous_model` and
                                     continued boosting start from)
    <version>/training/recipe.json   recipe, framework, task, labels, hyperparameters, the target column,
                                     and for each model input the ordered training columns it takes
    <version>/training/base.parquet  the base training data (all its columns), its sha256 in recipe.json

The column map is what ties the prediction log to training rows: a logged row holds one 2-D tensor
per model input (`input.<name>`); input `name` takes `columns[name]` in order (a matrix input several,
a per-column input one). `features_from_inputs` and `inputs_from_features` go both ways.
"""

from __future__ import annotations

import hashlib
import importlib
import io
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from onnxgate.converters import Attached
from onnxgate.converters.base import Conversion, ConversionError, Rows, TensorSpec
from onnxgate.converters.sample import as_datatype, columns_by_input

TRAINING_DIR = "training"
RECIPE_FILE = "recipe.json"
BASE_FILE = "base.parquet"
FORMAT = 1

# recipe -> the converter frameworks (converters.CONVERTERS keys) whose native files it retrains
BUILTIN_RECIPES: dict[str, tuple[str, ...]] = {
    "sklearn": ("sklearn",),
    "xgboost": ("xgboost",),
    "lightgbm": ("lightgbm",),
    "catboost": ("catboost",),
    "r": ("rdata",),
}
PYTHON_PREFIX = "python:"
_DEFAULT_SUFFIX = {"sklearn": ".joblib", "xgboost": ".json", "lightgbm": ".txt", "catboost": ".cbm", "rdata": ".rds"}


class RecipeError(ConversionError):
    """A recipe that cannot run, or a record that cannot be written or read, with what to do about it.

    A ConversionError, so that `onnxgate convert --recipe ...` reports it like any conversion error.
    """


@dataclass(frozen=True)
class InputColumns:
    """One model input and the training columns it takes, in order."""

    name: str
    datatype: str  # Open Inference Protocol datatype of the served tensor
    shape: tuple[int, ...]
    columns: tuple[str, ...]


@dataclass(frozen=True)
class TrainingRecord:
    """A version's `training/` directory, loaded (or about to be written, for a new version)."""

    recipe: str
    framework: str  # the converter that reads model_path (converters.CONVERTERS key)
    task: str
    labels: list[str] | None
    hyperparameters: dict[str, Any]
    target: str
    target_dtype: np.dtype[Any]
    inputs: tuple[InputColumns, ...]
    base_sha256: str
    base_rows: int
    base_columns: tuple[str, ...]
    base_source: str  # the file the base data came from, for people reading the record
    model_path: Path | None  # the native model (None: a `module:attr` source, python recipes only)
    base_path: Path
    created: str = ""
    options: dict[str, Any] = field(default_factory=dict)

    # ------------------------------------------------------------ reading

    @staticmethod
    def exists(version_dir: Path) -> bool:
        return (Path(version_dir) / TRAINING_DIR / RECIPE_FILE).is_file()

    @classmethod
    def load(cls, version_dir: Path) -> TrainingRecord:
        """The record of a published version; RecipeError when it has none or it is unreadable."""
        directory = Path(version_dir) / TRAINING_DIR
        path = directory / RECIPE_FILE
        if not path.is_file():
            raise RecipeError(
                f"{version_dir} keeps no training record (no {TRAINING_DIR}/{RECIPE_FILE}): convert the model with"
                " `onnxgate convert ... --recipe RECIPE --training-data FILE`"
            )
        try:
            data = json.loads(path.read_text())
            if data.get("format") != FORMAT:
                raise RecipeError(f"{path}: format {data.get('format')!r}, this onnxgate reads format {FORMAT}")
            base = data["base_data"]
            return cls(
                recipe=str(data["recipe"]),
                framework=str(data["framework"]),
                task=str(data["task"]),
                labels=data.get("labels"),
                hyperparameters=dict(data.get("hyperparameters") or {}),
                target=str(data["target"]),
                target_dtype=np.dtype(data["target_dtype"]),
                inputs=tuple(
                    InputColumns(i["name"], i["datatype"], tuple(i["shape"]), tuple(i["columns"]))
                    for i in data["inputs"]
                ),
                base_sha256=str(base["sha256"]),
                base_rows=int(base["rows"]),
                base_columns=tuple(base["columns"]),
                base_source=str(base.get("source", "")),
                model_path=directory / data["model_file"] if data.get("model_file") else None,
                base_path=directory / base["file"],
                created=str(data.get("created", "")),
                options=dict(data.get("options") or {}),
            )
        except (KeyError, TypeError, ValueError) as error:
            if isinstance(error, RecipeError):
                raise
            raise RecipeError(f"{path} is not a readable training record: {type(error).__name__}: {error}") from error

    @property
    def columns(self) -> dict[str, list[str]]:
        """Model input name -> the training columns it takes, in order."""
        return {i.name: list(i.columns) for i in self.inputs}

    @property
    def feature_columns(self) -> list[str]:
        """Every training column the model reads, in input order (the columns of X)."""
        return [c for i in self.inputs for c in i.columns]

    def base_frame(self) -> pd.DataFrame:
        """The base training data as recorded, after checking its sha256."""
        try:
            data = self.base_path.read_bytes()
        except OSError as error:
            raise RecipeError(f"the base training data {self.base_path} cannot be read: {error}") from error
        digest = f"sha256:{hashlib.sha256(data).hexdigest()}"
        if digest != self.base_sha256:
            raise RecipeError(f"the base training data {self.base_path} changed: {digest}, recorded {self.base_sha256}")
        return pd.read_parquet(io.BytesIO(data))

    def base_data(self) -> tuple[pd.DataFrame, pd.Series]:
        """(X, y): the base data's training columns (see `feature_columns`) and its target."""
        frame = self.base_frame()
        return self.features(frame), frame[self.target].reset_index(drop=True)

    def features(self, frame: pd.DataFrame) -> pd.DataFrame:
        """The training columns of `frame`, typed as the model takes them (strings, float64)."""
        missing = [c for c in self.feature_columns if c not in frame.columns]
        if missing:
            raise RecipeError(f"training rows lack the columns {missing} the model reads (they have {list(frame)})")
        out = {}
        for spec in self.inputs:
            for column in spec.columns:
                out[column] = _typed(frame[column].to_numpy(), spec.datatype)
        return pd.DataFrame(out, columns=self.feature_columns)

    def features_from_inputs(self, inputs: Mapping[str, np.ndarray]) -> pd.DataFrame:
        """Model-input tensors (name -> 2-D array, as the prediction log holds them) -> training rows."""
        out: dict[str, np.ndarray] = {}
        for spec in self.inputs:
            if spec.name not in inputs:
                raise RecipeError(f"no values for model input {spec.name!r} (got {sorted(inputs)})")
            values = np.asarray(inputs[spec.name])
            values = values.reshape(len(values), -1)
            if values.shape[1] != len(spec.columns):
                raise RecipeError(
                    f"input {spec.name!r} has {values.shape[1]} values per row; the record maps {len(spec.columns)}"
                    f" columns to it: {list(spec.columns)}"
                )
            for i, column in enumerate(spec.columns):
                out[column] = _typed(values[:, i], spec.datatype)
        return pd.DataFrame(out, columns=self.feature_columns)

    def inputs_from_features(self, X: pd.DataFrame) -> dict[str, np.ndarray]:
        """Training rows -> model-input tensors with the served datatypes, ready for onnxruntime."""
        missing = [c for c in self.feature_columns if c not in X.columns]
        if missing:
            raise RecipeError(f"training rows lack the columns {missing} the model reads (they have {list(X)})")
        rows: dict[str, np.ndarray] = {}
        for spec in self.inputs:
            matrix = np.stack([X[c].to_numpy() for c in spec.columns], axis=1)
            tensor = TensorSpec(spec.name, spec.datatype, spec.shape)
            try:
                rows[spec.name] = as_datatype(matrix.reshape((-1, *spec.shape[1:])), tensor)
            except ConversionError as error:
                raise RecipeError(str(error)) from error
        return rows

    # ------------------------------------------------------------ writing

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "recipe": self.recipe,
            "framework": self.framework,
            "task": self.task,
            "labels": self.labels,
            "hyperparameters": self.hyperparameters,
            "target": self.target,
            "target_dtype": self.target_dtype.str if self.target_dtype.kind != "O" else "object",
            "inputs": [
                {"name": i.name, "datatype": i.datatype, "shape": list(i.shape), "columns": list(i.columns)}
                for i in self.inputs
            ],
            "model_file": self.model_path and _model_file(self.model_path, self.framework),
            "base_data": {
                "file": BASE_FILE,
                "sha256": self.base_sha256,
                "rows": self.base_rows,
                "columns": list(self.base_columns),
                "source": self.base_source,
            },
            "created": self.created,
            "options": self.options,
        }

    def files(self) -> dict[str, bytes | Path]:
        """The `training/` files of a version, for `publish.publish(..., extra=...)`."""
        files: dict[str, bytes | Path] = {
            f"{TRAINING_DIR}/{RECIPE_FILE}": (json.dumps(self.to_json(), indent=2, sort_keys=True) + "\n").encode(),
            f"{TRAINING_DIR}/{BASE_FILE}": self.base_path,
        }
        if self.model_path is not None:
            files[f"{TRAINING_DIR}/{_model_file(self.model_path, self.framework)}"] = self.model_path
        return files

    def summary(self) -> dict[str, Any]:
        """The record in a few fields, for the conversion report."""
        return {
            "recipe": self.recipe,
            "target": self.target,
            "columns": self.columns,
            "base_data_sha256": self.base_sha256,
            "base_rows": self.base_rows,
        }

    def with_model(
        self, native_file: Path, framework: str, hyperparameters: dict[str, Any] | None = None
    ) -> TrainingRecord:
        """The record of a retrained version: the new native file, the same recipe, columns and base data."""
        return replace(
            self,
            framework=framework,
            model_path=Path(native_file),
            hyperparameters=self.hyperparameters if hyperparameters is None else hyperparameters,
            created=_now(),
        )


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _model_file(path: Path, framework: str) -> str:
    suffix = path.suffix.lower() or _DEFAULT_SUFFIX.get(framework, "")
    return f"model{suffix}"


def _typed(values: np.ndarray, datatype: str) -> np.ndarray:
    """A training column as the model takes it: str for BYTES inputs, float64 for numbers."""
    if datatype == "BYTES":
        return np.array([v.decode() if isinstance(v, bytes) else str(v) for v in values], dtype=object)
    if datatype == "BOOL":
        return values.astype(np.bool_)
    try:
        return values.astype(np.float64)
    except (TypeError, ValueError) as error:
        raise RecipeError(f"a column for a {datatype} input holds values that are not numbers: {error}") from error


# ---------------------------------------------------------------- recipes named at conversion


def check_recipe(recipe: str, framework: str) -> None:
    """Refuse a recipe that cannot retrain models of `framework` (a converters.CONVERTERS key)."""
    if recipe.startswith(PYTHON_PREFIX):
        load_user_function(recipe)
        return
    frameworks = BUILTIN_RECIPES.get(recipe)
    if frameworks is None:
        raise RecipeError(
            f"unknown recipe {recipe!r}: use one of {', '.join(BUILTIN_RECIPES)}, or python:module:function"
        )
    if framework not in frameworks:
        fitting = [name for name, fws in BUILTIN_RECIPES.items() if framework in fws]
        advice = f"--recipe {fitting[0]}" if fitting else "a python:module:function recipe"
        raise RecipeError(
            f"recipe {recipe!r} retrains {'/'.join(frameworks)} models, and this source is a {framework} model:"
            f" use {advice}"
        )


def load_user_function(recipe: str) -> Callable[..., Any]:
    """`python:module:function` -> the function; the module must be importable (installed or on PYTHONPATH)."""
    parts = recipe[len(PYTHON_PREFIX) :].rsplit(":", 1)
    if len(parts) != 2 or not all(parts):
        raise RecipeError(f"recipe {recipe!r}: write a user function as python:module:function")
    module_name, function_name = parts
    try:
        module = importlib.import_module(module_name)
    except Exception as error:  # an import runs user code: any exception means the same thing here
        raise RecipeError(
            f"recipe {recipe!r}: cannot import module {module_name!r} ({type(error).__name__}: {error});"
            " install it or put its directory on PYTHONPATH"
        ) from error
    function = getattr(module, function_name, None)
    if not callable(function):
        raise RecipeError(f"recipe {recipe!r}: module {module_name!r} has no function {function_name!r}")
    return function  # type: ignore[no-any-return]


def check_options(options: Mapping[str, Any], recipe: str, task: str, source: Path | None) -> None:
    """Refuse recipe options the model cannot use: `ladder` (a list of model families, simplest first:
    the sklearn recipe only, each a name of recipes.FAMILIES[task] or a class path) and `online` (an
    update of the served model: scikit-learn estimators with partial_fit, or a booster's more rounds)."""
    from onnxgate.learning import recipes  # recipes imports this module

    ladder = options.get("ladder")
    if ladder is not None:
        if recipe != "sklearn":
            raise RecipeError(f"--ladder climbs scikit-learn model families: it needs --recipe sklearn, not {recipe}")
        if not isinstance(ladder, list) or not ladder or not all(isinstance(f, str) and f for f in ladder):
            raise RecipeError(f"--ladder: give model families simplest first, e.g. logistic,gbm (got {ladder!r})")
        for family in ladder:
            recipes.family_class(family, task)
    if options.get("online"):
        if recipe in ("xgboost", "lightgbm", "catboost"):
            return
        if recipe != "sklearn" or source is None:
            raise RecipeError(
                f"--online updates the served model: scikit-learn estimators with partial_fit, or xgboost,"
                f" lightgbm and catboost boosters (recipe {recipe!r} refits only)"
            )
        model = recipes._joblib_load(source)
        final = model.steps[-1][1] if hasattr(model, "steps") else model
        if not callable(getattr(final, "partial_fit", None)):
            raise RecipeError(
                f"--online: {type(final).__name__} has no partial_fit (SGDClassifier, SGDRegressor, MultinomialNB,"
                " Perceptron, MLPClassifier ... have)"
            )


# ---------------------------------------------------------------- recording at conversion


def read_training_data(path: Path) -> pd.DataFrame:
    """A CSV (with a header) or Parquet file as a DataFrame; CSV types as `--sample` reads them (pyarrow)."""
    import pyarrow.csv
    import pyarrow.parquet

    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"training data {str(path)!r} does not exist")
    suffix = path.suffix.lower()
    try:
        if suffix == ".csv":
            table = pyarrow.csv.read_csv(path)
        elif suffix in (".parquet", ".pq"):
            table = pyarrow.parquet.read_table(path)
        else:
            raise RecipeError(f"training data {path.name!r}: expected .csv or .parquet")
    except RecipeError:
        raise
    except Exception as error:  # pyarrow raises several unrelated types for unreadable files
        raise RecipeError(f"training data {path.name!r} cannot be read: {error}") from error
    names = list(table.column_names)
    if len(set(names)) != len(names):
        raise RecipeError(f"training data {path.name!r} repeats column names: {names}")
    if all(_is_number(n) for n in names) and names != [str(i) for i in range(len(names))]:
        raise RecipeError(f"training data {path.name!r} has no header: its first line must name the columns")
    if table.num_rows == 0:
        raise RecipeError(f"training data {path.name!r} has no rows")
    return table.to_pandas()


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _native_columns(framework: str, source: Path) -> list[str] | None:
    """Feature names a booster file keeps but its converter does not pass on (None: none, or generic)."""
    names: list[str] = []
    if framework == "lightgbm":
        import lightgbm

        names = list(lightgbm.Booster(model_file=str(source)).feature_name())
        generic = [f"Column_{i}" for i in range(len(names))]
    elif framework == "catboost":
        import catboost

        model = catboost.CatBoost()
        model.load_model(str(source))
        names = [str(n) for n in model.feature_names_]
        generic = [str(i) for i in range(len(names))]
    else:
        return None
    return names if names and names != generic else None


def map_columns(
    conversion: Conversion, names: list[str], target: str | None, what: str, known: list[str] | None = None
) -> tuple[dict[str, list[str]], str]:
    """(input -> its training columns, the target column) for a table with columns `names`.

    Columns go to inputs by name, as `--sample` matches them (converters.sample.columns_by_input);
    the target is `target`, else the one column no input takes. A model that names no columns takes
    the table's columns by position, all but the target, which must then be given.
    """
    if target is not None and target not in names:
        raise RecipeError(f"target column {target!r} is not in {what} (its columns: {names})")
    try:
        wanted = columns_by_input(names, conversion.inputs, conversion.input_columns or known, what)
    except ConversionError as error:
        raise RecipeError(str(error)) from error
    if wanted is None:
        if target is None:
            raise RecipeError(
                f"the model does not name its input columns, so {what} gives them by position and the target"
                f" cannot be told apart: pass --target (one of {names})"
            )
        features = [n for n in names if n != target]
        width = int(np.prod(conversion.inputs[0].shape[1:])) if len(conversion.inputs[0].shape) > 1 else 1
        if len(features) != width:
            raise RecipeError(
                f"the model does not name its input columns and reads {width}; {what} has {len(features)} besides"
                f" the target {target!r}: give exactly the model's columns and the target"
            )
        wanted = {conversion.inputs[0].name: features}
    used = {c for columns in wanted.values() for c in columns}
    if target is None:
        candidates = [n for n in names if n not in used]
        if len(candidates) != 1:
            raise RecipeError(
                f"cannot tell the target column of {what}: "
                + (
                    f"the columns the model does not read are {candidates}; pass --target"
                    if candidates
                    else "the model reads every column; add the target column"
                )
            )
        target = candidates[0]
    elif target in used:
        raise RecipeError(f"target column {target!r} is also an input of the model")
    return wanted, target


def _parquet_bytes(frame: pd.DataFrame) -> bytes:
    import pyarrow
    import pyarrow.parquet

    buffer = io.BytesIO()
    pyarrow.parquet.write_table(pyarrow.Table.from_pandas(frame, preserve_index=False), buffer)
    return buffer.getvalue()


@dataclass
class Recorder:
    """`onnxgate convert --recipe R --training-data F`: builds the record once the model is converted.

    `attach` is handed to converters.convert_to_repository: it maps columns (refusing with a clear
    message), offers training rows as the parity sample, and returns the `training/` files.
    """

    source: str
    framework: str
    recipe: str
    training_data: Path
    target: str | None = None
    rows: int = 256
    seed: int = 0
    options: dict[str, Any] = field(default_factory=dict)  # recipe options: ladder, online (see check_options)

    def __post_init__(self) -> None:
        check_recipe(self.recipe, self.framework)
        if self.framework not in _DEFAULT_SUFFIX and not self.recipe.startswith(PYTHON_PREFIX):
            raise RecipeError(f"{self.framework} models are retrained only by python:module:function recipes")
        self.frame = read_training_data(self.training_data)

    def attach(self, conversion: Conversion) -> Attached:
        what = f"training data {self.training_data.name!r}"
        source = Path(self.source)
        known = _native_columns(self.framework, source) if source.is_file() else None
        columns, target = map_columns(conversion, list(self.frame.columns), self.target, what, known)
        from onnxgate.learning import recipes  # recipes imports this module; here only its describe()

        check_options(self.options, self.recipe, conversion.task, source if source.is_file() else None)
        data = _parquet_bytes(self.frame)
        target_values = self.frame[target]
        record = TrainingRecord(
            recipe=self.recipe,
            framework=self.framework,
            task=conversion.task,
            labels=conversion.labels,
            hyperparameters=recipes.describe(self.recipe, self.framework, source if source.is_file() else None),
            target=target,
            target_dtype=np.dtype(object) if target_values.dtype.kind not in "biuf" else target_values.dtype,
            inputs=tuple(InputColumns(s.name, s.datatype, s.shape, tuple(columns[s.name])) for s in conversion.inputs),
            base_sha256=f"sha256:{hashlib.sha256(data).hexdigest()}",
            base_rows=len(self.frame),
            base_columns=tuple(str(c) for c in self.frame.columns),
            base_source=self.training_data.name,
            model_path=source if source.is_file() else None,
            base_path=self.training_data,  # replaced by the Parquet copy below
            created=_now(),
            options=dict(self.options),
        )
        files = record.files()
        files[f"{TRAINING_DIR}/{BASE_FILE}"] = data
        return Attached(
            files=files,
            sample=self._sample(record),
            sample_origin=f"training data {self.training_data.name}",
            report={"training": record.summary()},
        )

    def _sample(self, record: TrainingRecord) -> Rows:
        """Up to `rows` training rows (a seeded draw when there are more) as model inputs."""
        frame = self.frame
        if len(frame) > self.rows:
            frame = frame.sample(n=self.rows, random_state=self.seed)
        return record.inputs_from_features(record.features(frame))

"""Spark ML pipelines trained in PySpark (local mode), saved with write().save(), converted through the CLI.

The expected answers come from Spark itself: each test runs the saved pipeline's transform() on held-out
rows and compares the published ONNX model (and, for one model, the gateway's gRPC answers) with it. One
SparkSession serves the whole module; it is the converter's own (`spark.session()`), so the JPMML-SparkML
jars are on its classpath.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import tritonclient.grpc as grpcclient

from onnxgate import converters
from onnxgate.converters import spark as spark_converter
from onnxgate.converters.cli import EXIT_ERROR
from tests.converters.helpers import check_published, published, run_cli, run_onnx

pyspark = pytest.importorskip("pyspark", reason="the spark extra is not installed (.ci/deps/spark.sh)")
from pyspark.ml import Pipeline, PipelineModel  # noqa: E402
from pyspark.ml.classification import GBTClassifier, LogisticRegression, RandomForestClassifier  # noqa: E402
from pyspark.ml.feature import (  # noqa: E402
    OneHotEncoder,
    StandardScaler,
    StringIndexer,
    StringIndexerModel,
    VectorAssembler,
)
from pyspark.ml.regression import LinearRegression, RandomForestRegressor  # noqa: E402
from pyspark.sql import DataFrame, SparkSession  # noqa: E402

TRAIN, HELD_OUT = 400, 60
NUMERIC = ["tenure", "spend"]
STRINGS = ["plan", "region"]


def _frame(n: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    # float32-representable numbers: the served model reads FP32, so Spark and ONNX see the same values
    tenure = rng.normal(24, 10, n).astype(np.float32).astype(np.float64)
    spend = rng.gamma(2, 30, n).astype(np.float32).astype(np.float64)
    plan = rng.choice(["basic", "plus", "pro"], n, p=[0.5, 0.3, 0.2])
    region = rng.choice(["north", "south", "east", "west"], n)
    score = 0.08 * (tenure - 24) + 0.02 * (spend - 60) + np.where(plan == "pro", 1.0, 0.0) + rng.normal(0, 0.8, n)
    score += np.where(region == "north", 0.5, 0.0)
    return pd.DataFrame(
        {
            "plan": plan,
            "region": region,
            "tenure": tenure,
            "spend": spend,
            "churn": np.where(score > 0.3, "leaves", "stays"),
            "tier": np.where(score > 0.8, "gold", np.where(score > -0.5, "silver", "bronze")),
            "revenue": 3.0 * tenure + 0.5 * spend + np.where(plan == "pro", 40.0, 0.0) + rng.normal(0, 5, n),
        }
    )


def _indexers() -> list[Any]:
    return [StringIndexer(inputCols=STRINGS, outputCols=[f"{c}_idx" for c in STRINGS])]


def _one_hot() -> list[Any]:
    return [
        *_indexers(),
        OneHotEncoder(inputCols=[f"{c}_idx" for c in STRINGS], outputCols=[f"{c}_vec" for c in STRINGS]),
        VectorAssembler(inputCols=[f"{c}_vec" for c in STRINGS] + NUMERIC, outputCol="features"),
    ]


def _indexed() -> list[Any]:
    """Trees split on the StringIndexer's indices directly (categorical features, no one-hot)."""
    return [*_indexers(), VectorAssembler(inputCols=[f"{c}_idx" for c in STRINGS] + NUMERIC, outputCol="features")]


def _label(column: str) -> Any:
    return StringIndexer(inputCol=column, outputCol="label")


# name -> (stages, task); every classifier's label is a string column indexed by a StringIndexer
MODELS: dict[str, tuple[Callable[[], list[Any]], str]] = {
    "logistic_binary": (
        lambda: [*_one_hot(), _label("churn"), LogisticRegression(regParam=0.01, maxIter=30)],
        "classification",
    ),
    "logistic_multiclass": (
        lambda: [*_one_hot(), _label("tier"), LogisticRegression(regParam=0.01, maxIter=30)],
        "classification",
    ),
    "forest_classifier": (
        lambda: [*_indexed(), _label("tier"), RandomForestClassifier(numTrees=12, maxDepth=4, seed=1)],
        "classification",
    ),
    "gbt_classifier": (
        lambda: [*_indexed(), _label("churn"), GBTClassifier(maxIter=10, maxDepth=3, seed=1)],
        "classification",
    ),
    "linear_regressor": (lambda: [*_one_hot(), LinearRegression(labelCol="revenue", regParam=0.1)], "regression"),
    "forest_regressor": (
        lambda: [*_one_hot(), RandomForestRegressor(labelCol="revenue", numTrees=8, maxDepth=4, seed=1)],
        "regression",
    ),
}


@pytest.fixture(scope="module")
def spark() -> Iterator[SparkSession]:
    session: SparkSession = spark_converter.session()
    yield session
    session.stop()


@pytest.fixture(scope="module")
def trained(spark: SparkSession, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each pipeline fitted on the same training frame and saved as Spark saves it (metadata/ + stages/)."""
    out = tmp_path_factory.mktemp("spark")
    frame = spark.createDataFrame(_frame(TRAIN, seed=0))
    frame.cache()
    saved = {}
    for name, (stages, _task) in MODELS.items():
        model = Pipeline(stages=stages()).fit(frame)
        model.write().save(str(out / name))
        saved[name] = out / name
    return saved


@pytest.fixture(scope="module")
def held_out(tmp_path_factory: pytest.TempPathFactory) -> tuple[pd.DataFrame, Path]:
    """Rows no model was trained on, and the same rows as a CSV sample for `onnxgate convert --sample`."""
    rows = _frame(HELD_OUT, seed=7)
    path = tmp_path_factory.mktemp("held_out") / "held_out.csv"
    rows[STRINGS + NUMERIC].to_csv(path, index=False)
    return rows, path


def spark_answers(spark: SparkSession, directory: Path, rows: pd.DataFrame) -> dict[str, np.ndarray]:
    """The saved pipeline's own transform() on the rows: label names, probabilities, or predictions."""
    model = PipelineModel.load(str(directory))
    frame: DataFrame = spark.createDataFrame(rows[STRINGS + NUMERIC].reset_index(drop=True).reset_index())
    scored = model.transform(frame).orderBy("index").collect()
    prediction = np.array([r["prediction"] for r in scored])
    if "probability" not in scored[0].asDict():
        return {"prediction": prediction}
    indexer = next(s for s in model.stages if isinstance(s, StringIndexerModel) and s.getOutputCol() == "label")
    labels = indexer.labels
    return {
        "label": np.array([labels[int(p)] for p in prediction], dtype=object),
        "probabilities": np.array([r["probability"].toArray() for r in scored]),
        "classes": np.array(labels, dtype=object),
    }


def feeds(rows: pd.DataFrame) -> dict[str, np.ndarray]:
    """One [-1, 1] tensor per column, as the converted model's signature asks (strings as BYTES)."""
    out = {c: rows[[c]].to_numpy(dtype=object) for c in STRINGS}
    out.update({c: rows[[c]].to_numpy(np.float32) for c in NUMERIC})
    return out


def assert_matches_spark(got: dict[str, np.ndarray], expected: dict[str, np.ndarray], classes: list[str]) -> None:
    if "prediction" in expected and "probabilities" not in expected:
        np.testing.assert_allclose(got["prediction"], expected["prediction"], rtol=1e-4, atol=1e-3)
        return
    # the served columns are in the published labels' order; Spark's in its label index order
    order = [list(expected["classes"]).index(c) for c in classes]
    np.testing.assert_allclose(got["probabilities"], expected["probabilities"][:, order], atol=1e-5, rtol=0)
    assert [str(v) for v in got["label"]] == [str(v) for v in expected["label"]]


@pytest.mark.parametrize("name", list(MODELS))
def test_pipeline_converts_with_parity_against_spark(
    name: str, spark: SparkSession, trained: dict[str, Path], held_out: tuple[pd.DataFrame, Path], tmp_path: Path
) -> None:
    rows, csv = held_out
    task = MODELS[name][1]
    repo = tmp_path / "repo"
    # no --framework: the directory layout says Spark
    assert run_cli(trained[name], repo, name, "--sample", str(csv)) == 0
    version = published(repo, name)
    rep = check_published(version, "spark", task)
    assert rep["parity"]["rows"] == HELD_OUT and "held_out.csv" in rep["parity"]["sample"]
    assert "transform()" in " ".join(rep["notes"])
    assert {spec["name"] for spec in rep["inputs"]} == set(STRINGS + NUMERIC)
    expected = spark_answers(spark, trained[name], rows)
    if task == "classification":
        # the label StringIndexer's labels, not Spark's 0..k-1 indices
        assert sorted(rep["labels"]) == sorted(expected["classes"])
    assert_matches_spark(run_onnx(version, feeds(rows)), expected, rep["labels"] or [])


def test_detected_from_the_directory_layout(trained: dict[str, Path], tmp_path: Path) -> None:
    assert converters.detect_framework(str(trained["logistic_binary"])) == "spark"
    assert converters.resolve_framework("pyspark") == "spark"
    (tmp_path / "stages").mkdir()
    (tmp_path / "metadata").mkdir()
    (tmp_path / "metadata" / "part-00000").write_text('{"class":"com.example.NotSpark"}\n')
    with pytest.raises(converters.ConversionError, match="is a directory"):
        converters.detect_framework(str(tmp_path))
    # the hash covers the pipeline's files: two different pipelines never share it
    assert converters.source_hash(str(trained["logistic_binary"])) != converters.source_hash(
        str(trained["logistic_multiclass"])
    )


def test_unsupported_stage_is_named(spark: SparkSession, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    frame = spark.createDataFrame(_frame(60, seed=3))
    stages: list[Any] = [
        VectorAssembler(inputCols=NUMERIC, outputCol="raw"),
        StandardScaler(inputCol="raw", outputCol="features"),
        StringIndexer(inputCol="churn", outputCol="label"),
        LogisticRegression(),
    ]
    Pipeline(stages=stages).fit(frame).write().save(str(tmp_path / "scaled"))
    assert run_cli(tmp_path / "scaled", tmp_path / "repo", "scaled", "--framework", "spark") == EXIT_ERROR
    err = capsys.readouterr().err
    assert "org.apache.spark.ml.feature.StandardScalerModel" in err and "stage 1" in err
    assert not (tmp_path / "repo" / "scaled").exists()


def test_served_by_the_gateway_matches_spark(
    spark: SparkSession,
    trained: dict[str, Path],
    held_out: tuple[pd.DataFrame, Path],
    tmp_path: Path,
    start_gateway: Callable[..., Any],
) -> None:
    rows, _ = held_out
    repo = tmp_path / "repo"
    assert run_cli(trained["forest_classifier"], repo, "tier", "--framework", "spark") == 0
    labels = (published(repo, "tier") / "labels.txt").read_text().splitlines()
    handle = start_gateway(repo)
    client = grpcclient.InferenceServerClient(handle.address)
    try:
        assert client.is_model_ready("tier", "1")
        tensors = []
        for column, values in feeds(rows).items():
            tensor = grpcclient.InferInput(column, list(values.shape), "BYTES" if values.dtype == object else "FP32")
            tensor.set_data_from_numpy(values)
            tensors.append(tensor)
        result = client.infer(
            "tier", tensors, outputs=[grpcclient.InferRequestedOutput(n) for n in ("label", "probabilities")]
        )
        got = {
            "label": np.array([v.decode() for v in result.as_numpy("label")], dtype=object),
            "probabilities": result.as_numpy("probabilities"),
        }
    finally:
        client.close()
    assert_matches_spark(got, spark_answers(spark, trained["forest_classifier"], rows), labels)

"""Spark ML -> ONNX: a saved `PipelineModel` directory, through PMML, checked against Spark's own transform().

A PipelineModel saved with `model.write().save(dir)` is the same directory whatever language trained it
(Scala, Java, PySpark): `metadata/` (JSON: the stage uids) and `stages/<i>_<uid>/` (each stage's JSON
metadata and Parquet data). The conversion:

1. reads the stages' JSON metadata (no Spark needed) and refuses, naming the stage class, anything outside
   the stages the project has tested (`SUPPORTED_STAGES`);
2. derives the input schema Spark never saves: columns read by a StringIndexer are strings, every other
   raw column is a double; the label is the predictor's `labelCol`, or the input of the StringIndexer
   that produced it;
3. loads the pipeline in a local SparkSession and writes PMML with JPMML-SparkML (the jars PyPI's
   `pyspark2pmml` ships), then builds the ONNX graph with onnxgate's own PMML converter (`pmml.py`);
4. the parity reference is not a PMML scorer but the pipeline itself: Spark's `transform()` in local mode,
   on the same rows a client would send.

Classifiers answer `label` (the label StringIndexer's labels when there is one) and `probabilities`
(columns in label order); regressors answer `prediction`.
"""

from __future__ import annotations

import contextlib
import glob
import json
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from onnxgate.converters.base import (
    LABEL,
    PREDICTION,
    PROBABILITIES,
    Conversion,
    ConversionError,
    ConvertOptions,
    MissingDependency,
    Rows,
)
from onnxgate.converters.pmml import INPUT, convert_pmml

_ML = "org.apache.spark.ml."
FEATURE_STAGES = {
    _ML + "feature.StringIndexerModel",
    _ML + "feature.OneHotEncoderModel",
    _ML + "feature.VectorAssembler",
}
CLASSIFIERS = {
    _ML + "classification.LogisticRegressionModel",
    _ML + "classification.RandomForestClassificationModel",
    _ML + "classification.GBTClassificationModel",
    _ML + "classification.DecisionTreeClassificationModel",
}
REGRESSORS = {
    _ML + "regression.LinearRegressionModel",
    _ML + "regression.RandomForestRegressionModel",
    _ML + "regression.GBTRegressionModel",
    _ML + "regression.DecisionTreeRegressionModel",
}
SUPPORTED_STAGES = FEATURE_STAGES | CLASSIFIERS | REGRESSORS
_STRING_INDEXER = _ML + "feature.StringIndexerModel"
_ROW_ID = "__onnxgate_row"


@dataclass(frozen=True)
class Stage:
    index: int
    cls: str
    uid: str
    params: dict[str, Any]  # defaultParamMap overlaid with paramMap: what the stage runs with

    @property
    def short(self) -> str:
        return self.cls.rsplit(".", 1)[-1]

    def columns(self, single: str, multiple: str) -> list[str]:
        """A stage's input or output columns, whether it was given `inputCol` or `inputCols`."""
        if multiple in self.params:
            return [str(c) for c in self.params[multiple]]
        return [str(self.params[single])] if single in self.params else []


@dataclass
class Plan:
    """What the stages' metadata says: the stages in order, the raw input columns and the label."""

    stages: list[Stage]
    predictor: Stage
    strings: list[str]  # raw columns a StringIndexer reads
    numbers: list[str]  # other raw columns (VectorAssembler inputs)
    label: str | None  # the raw label column (classifiers), when the schema needs it
    label_is_string: bool
    spark_version: str
    classification: bool = field(init=False)

    def __post_init__(self) -> None:
        self.classification = self.predictor.cls in CLASSIFIERS


# ---------------------------------------------------------------- the saved directory


def _metadata(directory: Path) -> dict[str, Any]:
    parts = sorted((directory / "metadata").glob("part-*"))
    if not parts:
        raise ConversionError(f"{directory} has no metadata/part-* file: not a directory Spark ML saved")
    try:
        data: dict[str, Any] = json.loads(parts[0].read_text().splitlines()[0])
    except (OSError, ValueError, IndexError) as exc:
        raise ConversionError(f"cannot read Spark ML metadata in {parts[0]}: {exc}") from exc
    return data


def plan(directory: Path) -> Plan:
    """The stages and the input schema, from the JSON metadata alone (refusing unsupported stages)."""
    top = _metadata(directory)
    if top.get("class") != _ML + "PipelineModel":
        raise ConversionError(
            f"{directory} holds a {top.get('class')!r}, not a PipelineModel; save the fitted pipeline "
            "(pipeline.fit(df).write().save(dir))"
        )
    uids = [str(u) for u in top.get("paramMap", {}).get("stageUids", [])]
    by_uid = {}
    for sub in (directory / "stages").iterdir():
        if sub.is_dir() and "_" in sub.name:
            by_uid[sub.name.split("_", 1)[1]] = sub
    stages = []
    for i, uid in enumerate(uids):
        if uid not in by_uid:
            raise ConversionError(f"{directory}/stages has no directory for stage {i} ({uid})")
        meta = _metadata(by_uid[uid])
        params = {**meta.get("defaultParamMap", {}), **meta.get("paramMap", {})}
        stages.append(Stage(i, str(meta.get("class", "?")), uid, params))
    if not stages:
        raise ConversionError(f"the PipelineModel in {directory} has no stages")
    for stage in stages:
        if stage.cls not in SUPPORTED_STAGES:
            hint = " (a nested pipeline: save the inner stages in one flat Pipeline)" if "Pipeline" in stage.cls else ""
            raise ConversionError(
                f"Spark stage {stage.index} is {stage.cls}{hint}, which onnxgate does not convert; supported: "
                + ", ".join(sorted(c.rsplit(".", 1)[-1] for c in SUPPORTED_STAGES))
            )
    predictors = [s for s in stages if s.cls in CLASSIFIERS | REGRESSORS]
    if len(predictors) != 1 or predictors[0] is not stages[-1]:
        raise ConversionError(
            "the pipeline must end with exactly one model (a classifier or regressor) and hold no other; found "
            + (", ".join(s.short for s in predictors) or "none")
        )
    predictor = predictors[0]
    features = str(predictor.params.get("featuresCol", "features"))
    if not any(features in s.columns("outputCol", "outputCols") for s in stages[:-1]):
        raise ConversionError(
            f"the model's features column {features!r} is not made by a stage of the pipeline: save the "
            "VectorAssembler (and the StringIndexer/OneHotEncoder stages) in the same PipelineModel, so the "
            "converted model takes the raw columns"
        )
    # Spark predicts the class with the largest probability/threshold ratio; the converted model takes the
    # largest probability, which is the same only for the default thresholds
    threshold = predictor.params.get("threshold", 0.5)
    if predictor.params.get("thresholds") or float(threshold) != 0.5:
        raise ConversionError(
            f"the {predictor.short} sets threshold(s) ({predictor.params.get('thresholds') or threshold}); the converted "
            "model predicts the most probable class, so refit without them and apply the thresholds to `probabilities`"
        )
    for stage in stages:
        if stage.cls == _STRING_INDEXER and stage.params.get("handleInvalid") == "keep":
            raise ConversionError(
                f"Spark stage {stage.index} (StringIndexerModel on {stage.columns('inputCol', 'inputCols')}) has "
                "handleInvalid='keep', whose extra 'unknown' index the PMML route does not carry; refit with "
                "handleInvalid='error' or 'skip'"
            )
    produced: dict[str, Stage] = {}
    strings: list[str] = []
    numbers: list[str] = []
    for stage in stages:
        outputs = stage.columns("outputCol", "outputCols")
        if stage is predictor:
            inputs = [str(stage.params.get("featuresCol", "features"))]
        else:
            inputs = stage.columns("inputCol", "inputCols")
        for column in inputs:
            if column in produced or column in strings or column in numbers:
                continue
            (strings if stage.cls == _STRING_INDEXER else numbers).append(column)
        for column in outputs:
            produced[column] = stage
    label_col = str(predictor.params.get("labelCol", "label"))
    label: str | None = label_col
    label_is_string = False
    if label_col in produced and produced[label_col].cls == _STRING_INDEXER:
        indexer = produced[label_col]
        label = indexer.columns("inputCol", "inputCols")[indexer.columns("outputCol", "outputCols").index(label_col)]
        label_is_string = True
        # the label's raw column is a target, not an input (Spark's StringIndexerModel skips a missing column)
        strings.remove(label)
    elif label_col in produced:
        raise ConversionError(
            f"the label {label_col!r} is made by a {produced[label_col].short}; only a StringIndexer is supported"
        )
    return Plan(stages, predictor, strings, numbers, label, label_is_string, str(top.get("sparkVersion", "?")))


# ---------------------------------------------------------------- Spark and JPMML-SparkML


def _pyspark2pmml_jars(spark_version: str) -> tuple[list[str], str]:
    """The JPMML-SparkML jars for this Spark (exact major.minor, else the newest bundled) and their version."""
    try:
        import pyspark2pmml
    except ImportError as exc:
        raise MissingDependency("pyspark2pmml", "spark") from exc
    base = Path(pyspark2pmml.__file__).parent
    bundled = {}
    for sub in base.glob("spark[0-9]*"):
        digits = sub.name[len("spark") :]
        if digits.isdigit() and len(digits) >= 2:
            bundled[(int(digits[0]), int(digits[1:]))] = sub
    if not bundled:
        raise ConversionError(f"pyspark2pmml in {base} bundles no JPMML-SparkML jars")
    major, minor = (int(v) for v in spark_version.split(".")[:2])
    pick = (major, minor) if (major, minor) in bundled else max(bundled)
    jars = sorted(glob.glob(str(bundled[pick] / "resources" / "*.jar")))
    jars += sorted(glob.glob(str(base / "shared" / "resources" / "*.jar")))
    return jars, f"{pick[0]}.{pick[1]}"


def session() -> Any:
    """The SparkSession conversions run in: the active one, or a local one with JPMML-SparkML's jars.

    Local mode with two cores, no web UI and a small driver: a conversion loads one pipeline and scores a
    few hundred rows. A session someone else started must have been given the jars (`spark.jars`); tests
    share this one so that the gateway's process runs one JVM.
    """
    try:
        import pyspark
        from pyspark.sql import SparkSession
    except ImportError as exc:
        raise MissingDependency("pyspark", "spark") from exc
    active = SparkSession.getActiveSession()
    if active is not None:
        return active
    jars, _ = _pyspark2pmml_jars(pyspark.__version__)
    builder = (
        SparkSession.builder.master("local[2]")
        .appName("onnxgate-convert")
        .config("spark.ui.enabled", "false")
        .config("spark.driver.memory", "1g")
        .config("spark.sql.shuffle.partitions", "2")
        .config("spark.jars", ",".join(jars))
    )
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("ERROR")
    return spark


_LIFTED: dict[str, str] = {}  # "from": the Spark version JPMML-SparkML expected before _jpmml_ready lifted it


def _jpmml_ready(spark: Any) -> list[str]:
    """Load JPMML-SparkML's builder in the session's JVM; returns notes on what was done to make it load.

    JPMML-SparkML refuses, in a static initialiser, to run on a Spark major.minor other than the one it was
    built for, and pyspark2pmml 0.12 bundles builds up to Spark 4.2. The check guards against silent changes
    in Spark's model classes; here the parity check against Spark's own transform() is that guard, so on a
    newer Spark the expected version (a mutable int[] in ConverterFactory) is set to the running one and
    the conversion notes say so.
    """
    jvm = spark.sparkContext._jvm
    loader = jvm.java.lang.Thread.currentThread().getContextClassLoader()
    try:
        factory = jvm.java.lang.Class.forName("org.jpmml.sparkml.ConverterFactory", True, loader)
    except Exception as exc:
        raise ConversionError(
            "the running SparkSession has no JPMML-SparkML on its classpath: start it with "
            "spark.jars set to pyspark2pmml's jars (onnxgate.converters.spark.session() does)"
        ) from exc
    expected = factory.getDeclaredField("VERSION")
    expected.setAccessible(True)
    version = expected.get(None)
    built = [int(version[i]) for i in range(len(version))]
    running = [int(v) for v in spark.version.split(".")[: len(built)]]
    if built != running:
        for i, value in enumerate(running):
            jvm.java.lang.reflect.Array.setInt(version, i, value)
        _LIFTED["from"] = ".".join(map(str, built))
    if "from" not in _LIFTED:
        return []
    # every conversion in this JVM says so, not only the one that lifted it
    return [
        f"JPMML-SparkML built for Spark {_LIFTED['from']} ran on Spark {spark.version}; its version check was "
        "lifted, and parity against Spark's own transform() is what vouches for the result"
    ]


def _schema(p: Plan) -> Any:
    from pyspark.sql.types import DoubleType, StringType, StructField, StructType

    fields = [StructField(c, StringType()) for c in p.strings] + [StructField(c, DoubleType()) for c in p.numbers]
    if p.label is not None:
        fields.append(StructField(p.label, StringType() if p.label_is_string else DoubleType()))
    return StructType(fields)


def _java_message(exc: Exception) -> str:
    """The Java exception's own message (py4j puts it after the Python-side preamble), one line."""
    java = getattr(exc, "java_exception", None)
    text = str(java.toString()) if java is not None else str(exc)
    return text.strip().splitlines()[0] if text.strip() else type(exc).__name__


# ---------------------------------------------------------------- conversion


def convert(source: str, options: ConvertOptions) -> Conversion:
    directory = Path(source)
    if not directory.is_dir():
        raise ConversionError(f"{source!r} is not a directory: give the directory PipelineModel.write().save() wrote")
    p = plan(directory)
    spark = session()
    notes = _jpmml_ready(spark)
    from pyspark.ml import PipelineModel

    try:
        pipeline = PipelineModel.load(str(directory.resolve()))
    except Exception as exc:
        raise ConversionError(f"Spark cannot load the PipelineModel in {directory}: {_java_message(exc)}") from exc
    from pyspark2pmml import PMMLBuilder

    try:
        document = PMMLBuilder(_schema(p), pipeline).buildString()
    except Exception as exc:
        raise ConversionError(f"JPMML-SparkML cannot convert this pipeline: {_java_message(exc)}") from exc
    with tempfile.TemporaryDirectory(prefix="onnxgate-spark-") as tmp:
        pmml_path = Path(tmp) / "pipeline.pmml"
        pmml_path.write_text(str(document))
        conversion = convert_pmml(pmml_path)
    spark_labels = _spark_labels(p, pipeline)
    if p.classification:
        if spark_labels is None:
            raise ConversionError("the classifier's classes could not be read from the pipeline")
        if sorted(spark_labels) != sorted(conversion.labels or []):
            raise ConversionError(
                f"the PMML classes {conversion.labels} are not the pipeline's labels {spark_labels}: cannot align them"
            )
    categories = _categories(p, pipeline)
    reference = _SparkReference(spark, pipeline, p, conversion, spark_labels, categories)
    served = {spec.name for spec in conversion.inputs} | set(conversion.input_columns or [])
    unused = [c for c in p.strings + p.numbers if c not in served]
    conversion.framework = "spark"
    conversion.predict_native = reference.predict
    conversion.notes = [
        f"Spark ML PipelineModel ({' -> '.join(s.short for s in p.stages)}), saved by Spark {p.spark_version}; "
        f"converted through PMML by JPMML-SparkML; parity reference: Spark {spark.version} transform() in local mode",
        *notes,
        # the PMML converter's own note, less its reference scorer (here Spark is the reference, not pypmml)
        *(n.replace("; reference scorer: pypmml", "") for n in conversion.notes),
    ]
    if unused:
        conversion.notes.append(
            f"columns the pipeline reads but its model never uses are not inputs: {', '.join(unused)}"
        )
    conversion.library_versions.update(_versions(spark, p))
    return conversion


def _spark_labels(p: Plan, pipeline: Any) -> list[str] | None:
    """The classes in Spark's index order: the label StringIndexer's labels, else the indices themselves."""
    if not p.classification:
        return None
    if p.label_is_string:
        label_col = str(p.predictor.params.get("labelCol", "label"))
        for stage, model in zip(p.stages, pipeline.stages, strict=True):
            outputs = stage.columns("outputCol", "outputCols")
            if stage.cls == _STRING_INDEXER and label_col in outputs:
                return [str(v) for v in model.labelsArray[outputs.index(label_col)]]
        return None
    classes = int(pipeline.stages[-1].numClasses)
    return [str(i) for i in range(classes)]


def _categories(p: Plan, pipeline: Any) -> dict[str, str]:
    """One category each feature StringIndexer knows, by raw column: what Spark is given for unused columns."""
    known: dict[str, str] = {}
    for stage, model in zip(p.stages, pipeline.stages, strict=True):
        if stage.cls == _STRING_INDEXER:
            for column, labels in zip(stage.columns("inputCol", "inputCols"), model.labelsArray, strict=True):
                if labels:
                    known.setdefault(column, str(labels[0]))
    return known


def _versions(spark: Any, p: Plan) -> dict[str, str]:
    from importlib import metadata

    found = {"pyspark": str(spark.version), "spark_saved_by": p.spark_version}
    with contextlib.suppress(metadata.PackageNotFoundError):
        found["pyspark2pmml"] = metadata.version("pyspark2pmml")
    return found


class _SparkReference:
    """The pipeline's own transform() in the local SparkSession, on rows in the converted model's signature."""

    def __init__(
        self,
        spark: Any,
        pipeline: Any,
        p: Plan,
        conversion: Conversion,
        spark_labels: list[str] | None,
        categories: dict[str, str],
    ) -> None:
        self._spark = spark
        self._pipeline = pipeline
        self._plan = p
        self._tabular = [spec.name for spec in conversion.inputs] == [INPUT]
        self._columns = list(conversion.input_columns or [])
        self._labels = list(conversion.labels or [])
        self._spark_labels = spark_labels or []
        label_spec = next((o for o in conversion.outputs if o.name == LABEL), None)
        self._integer_labels = label_spec is not None and label_spec.datatype == "INT64"
        self._served = {spec.name for spec in conversion.inputs}
        self._categories = categories

    def _column(self, rows: Rows, name: str, n: int) -> np.ndarray:
        if self._tabular and name in self._columns:
            return np.asarray(rows[INPUT])[:, self._columns.index(name)]
        if not self._tabular and name in self._served:
            return np.asarray(rows[name]).reshape(-1)
        # a column the model never uses (JPMML leaves it out of the PMML, so it is no input): Spark's stages
        # still read it, so it gets a value they accept, which cannot change the answer
        if name in self._categories:
            return np.full(n, self._categories[name], dtype=object)
        return np.zeros(n, dtype=np.float32)

    def predict(self, rows: Rows) -> Rows:
        from pyspark.sql.types import DoubleType, LongType, StringType, StructField, StructType

        p = self._plan
        n = len(next(iter(rows.values())))
        data: list[list[Any]] = [[i] for i in range(n)]
        for name in p.strings:
            for record, value in zip(data, self._column(rows, name, n), strict=True):
                record.append(value.decode() if isinstance(value, bytes) else str(value))
        for name in p.numbers:
            # the float32 a client sends, widened: what the served model sees, exactly
            for record, value in zip(data, self._column(rows, name, n).astype(np.float64), strict=True):
                record.append(None if math.isnan(value) else float(value))
        schema = StructType(
            [StructField(_ROW_ID, LongType())]
            + [StructField(c, StringType()) for c in p.strings]
            + [StructField(c, DoubleType()) for c in p.numbers]
        )
        frame = self._spark.createDataFrame(data, schema)
        wanted = ["prediction", "probability"] if p.classification else ["prediction"]
        columns = [_ROW_ID, *(str(p.predictor.params.get(f"{w}Col", w)) for w in wanted)]
        try:
            scored = self._pipeline.transform(frame).select(*columns).collect()
        except Exception as exc:
            raise ConversionError(f"Spark's transform() failed on the sample rows: {_java_message(exc)}") from exc
        scored = sorted(scored, key=lambda r: int(r[0]))
        if len(scored) != n:
            raise ConversionError(
                f"Spark's transform() returned {len(scored)} of {n} sample rows (a stage with handleInvalid='skip' "
                "dropped rows with unseen values); use sample rows with the categories seen in training"
            )
        if not p.classification:
            return {PREDICTION: np.array([float(r[1]) for r in scored], dtype=np.float32)}
        order = [self._spark_labels.index(label) for label in self._labels]
        probabilities = np.array([r[2].toArray() for r in scored], dtype=np.float64)[:, order]
        names = [self._spark_labels[int(r[1])] for r in scored]
        labels = (
            np.array([int(float(v)) for v in names], dtype=np.int64)
            if self._integer_labels
            else np.array(names, dtype=object)
        )
        return {LABEL: labels, PROBABILITIES: probabilities.astype(np.float32)}

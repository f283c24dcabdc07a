"""`onnxgate dataset export --engine spark`, and the same job for spark-submit on a cluster:

    spark-submit --master yarn "$(python -c 'import onnxgate.server.spark_export as m; print(m.__file__)')" \\
        --predlog-dir s3://bucket/predlog --model iris [--version 3] [--since 2026-01-01] --out s3://bucket/iris

(With the pip-installed PySpark as the local Spark: `export SPARK_HOME="$(python -c 'import pyspark, os;
print(os.path.dirname(pyspark.__file__))')" PYSPARK_PYTHON="$(which python)"` first, or its
spark-submit looks for Spark with the system python3; checked with `--master 'local[2]'`.)

It writes exactly the rows and columns of the DuckDB path (server/logquery.py; the columns are listed in
docs/reference/log-table.md), as a directory of Parquet part files ordered by (predicted_at, prediction_id), from
the same layout:
- the driver lists the files with LogFiles and checks the rolled segments' Parquet footers (an
  unreadable file is skipped and named, as by the other engines);
- rolled prediction segments are read by Spark (`spark.read.parquet`, mergeSchema: the schemas of
  successive segments are additive), with the model chosen by the files and version/since pushed down;
- the open `.arrows` segments (the last minutes of each replica) and the feedback (the small table; rows
  older than its `content` column get their digest from feedback_order.row_content) are read on the
  driver by pyarrow and handed to Spark as Arrow;
- feedback order, duplicates and the join run as Spark SQL window functions: the very SQL text the DuckDB
  engine runs (logquery.FEEDBACK_SQL, LATEST_SQL, MATCH_SQL); the predictions whose truth needs the
  sequential rule (logquery.SEQUENTIAL_SQL: a feedback id resent after a correction) are decided on the
  driver by feedback_order.FeedbackIndex;
- the columns are shaped by the rules of logquery.shape, as Spark column expressions.
Executors need no Python packages beyond PySpark's: every expression runs in the JVM. The driver needs
onnxgate installed. Object stores need the cluster's Hadoop connectors (s3a://, gs://, abfs://).
One difference: a tensor column that no exported row has a value for is written as nulls of its list
type (Spark cannot write Parquet's null type); the other engines write a null-typed column.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from datetime import datetime
from functools import reduce
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
from pyspark import SparkConf
from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from onnxgate.server import logquery
from onnxgate.server.dataset import parse_since
from onnxgate.server.feedback import SCHEMA as FEEDBACK_SCHEMA
from onnxgate.server.feedback_order import FeedbackIndex
from onnxgate.server.logfiles import LogFiles, Segment
from onnxgate.server.predlog import INPUT_PREFIX, OUTPUT_PREFIX, PREDICTIONS, SHAPE_SUFFIX
from onnxgate.server.segments import SkipList

DEFAULT_MASTER = "local[2]"
# pyarrow's scheme -> Hadoop's, for Spark's readers
_HADOOP_SCHEME = {"s3": "s3a", "gs": "gs", "gcs": "gs", "abfs": "abfs", "abfss": "abfss", "hdfs": "hdfs"}


def session(master: str | None = None) -> SparkSession:
    """The active session (spark-submit's), or one on `master` (default local[2]) for the CLI."""
    builder = SparkSession.builder.appName("onnxgate-dataset-export")
    if master is not None or not SparkConf().contains("spark.master"):
        # one machine: a small driver, and few shuffle partitions for a few cores (not Spark's 200)
        builder = (
            builder.master(master or DEFAULT_MASTER)
            .config("spark.driver.memory", "1g")
            .config("spark.sql.shuffle.partitions", "8")
        )
    return (
        builder.config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
        .config("spark.sql.session.timeZone", "UTC")
        # microsecond timestamps with UTC semantics, as the other engines write (not INT96)
        .config("spark.sql.parquet.outputTimestampType", "TIMESTAMP_MICROS")
        .getOrCreate()
    )


def export(
    location: str,
    model: str,
    out: str,
    *,
    version: str | None = None,
    since: datetime | None = None,
    master: str | None = None,
    skipped: SkipList | None = None,
    spark: SparkSession | None = None,
) -> int:
    """Write the labelled rows of `model` as Parquet part files under `out` (replaced); returns the count."""
    if str(out).lower().endswith(".csv"):
        raise SystemExit("onnxgate dataset: --engine spark writes Parquet (a directory); use duckdb for CSV")
    skipped = {} if skipped is None else skipped
    spark = spark or session(master)
    log = LogFiles.at(location)
    joined = _joined(spark, log, model, version, since, skipped).cache()
    try:
        n = joined.count()
        table = _shape(joined, n)
        target = out if "://" in str(out) else str(Path(out).absolute())
        table.orderBy("predicted_at", "prediction_id").write.mode("overwrite").parquet(target)
    finally:
        joined.unpersist()
    return n


def _uri(log: LogFiles, segment: Segment) -> str:
    if log.local:
        return "file://" + segment.path
    scheme = log.uri.partition("://")[0]
    return f"{_HADOOP_SCHEME.get(scheme, scheme)}://{segment.path}"


def _joined(
    spark: SparkSession, log: LogFiles, model: str, version: str | None, since: datetime | None, skipped: SkipList
) -> DataFrame:
    segments = log.segments(PREDICTIONS, [model], skipped)
    position = {s.key: i for i, s in enumerate(segments)}
    parts: list[DataFrame] = []
    rolled = logquery.readable_parquet(log, [s for s in segments if s.rolled], skipped)
    if rolled:
        files = spark.createDataFrame(
            [(s.replica, s.seq, position[s.key]) for s, _ in rolled], "_replica string, _seq long, _file long"
        )
        path = F.col("_metadata.file_path")
        parquet = (
            spark.read.option("mergeSchema", "true")
            .parquet(*[_uri(log, s) for s, _ in rolled])
            .withColumn("_row", F.col("_metadata.row_index"))
            # the segment's place in the listing, from its path: <replica>/<model>/predictions-<seq>.parquet
            .withColumn("_replica", F.regexp_extract(path, r"([^/]+)/[^/]+/[^/]+$", 1))
            .withColumn("_seq", F.regexp_extract(path, r"-(\d+)\.parquet$", 1).cast("long"))
        )
        parts.append(parquet.join(F.broadcast(files), ["_replica", "_seq"]).drop("_replica", "_seq"))
    for segment in (s for s in segments if not s.rolled):
        table = log.read(segment, skipped)
        if table is None or not table.num_rows:
            continue
        table = table.append_column("_file", pa.array([position[segment.key]] * table.num_rows, pa.int64()))
        parts.append(spark.createDataFrame(table.append_column("_row", pa.array(range(table.num_rows), pa.int64()))))
    if not parts:
        parts.append(
            spark.createDataFrame([], "id string, model string, version string, ts timestamp, _file long, _row long")
        )
    predictions = reduce(lambda a, b: a.unionByName(b, allowMissingColumns=True), parts)
    if version is not None:
        predictions = predictions.where(F.col("version") == version)
    if since is not None:
        predictions = predictions.where(F.col("ts") >= F.lit(since))
    predictions.createOrReplaceTempView("predictions")

    feedback = logquery.feedback_table(log, skipped)
    spark.createDataFrame(feedback).createOrReplaceTempView("feedback")
    spark.sql(logquery.FEEDBACK_SQL).cache().createOrReplaceTempView("marked")
    sequential = [r[0] for r in spark.sql(logquery.SEQUENTIAL_SQL).collect()]
    spark.createDataFrame([(pid,) for pid in sequential], "prediction_id string").createOrReplaceTempView("sequential")
    mine = pc.is_in(feedback["prediction_id"], pa.array(sequential, pa.string()))
    index = FeedbackIndex.of(feedback.filter(mine).to_pylist() if sequential else [])
    by_rule = pa.Table.from_pylist(list(index.latest.values()), schema=FEEDBACK_SCHEMA).select(logquery.LATEST_COLUMNS)
    cols = ", ".join(logquery.LATEST_COLUMNS)
    spark.createDataFrame(by_rule).createOrReplaceTempView("latest_sequential")
    spark.sql(
        f"SELECT {cols} FROM ({logquery.LATEST_SQL}) UNION ALL SELECT {cols} FROM latest_sequential"
    ).createOrReplaceTempView("latest")
    joined = spark.sql(logquery.MATCH_SQL)
    extra = [c for c in joined.columns if c.endswith(SHAPE_SUFFIX) or c in ("replica", "_file", "_row", "_rank")]
    return joined.drop(*extra)


def _named(name: str) -> Callable[[Column], Column]:
    # a one-argument lambda: PySpark passes (element, index) to a function of two
    return lambda t: t["name"] == F.lit(name)


def _col(name: str) -> Column:
    return F.col(f"`{name}`")


def _numeric(t: T.DataType) -> bool:
    return isinstance(
        t, T.BooleanType | T.ByteType | T.ShortType | T.IntegerType | T.LongType | T.FloatType | T.DoubleType
    )


def _scalar(t: T.DataType) -> T.DataType:
    """logquery.scalar_type in Spark's types."""
    if isinstance(t, T.FloatType | T.DoubleType):
        return T.DoubleType()
    if isinstance(t, T.ByteType | T.ShortType | T.IntegerType | T.LongType):
        return T.LongType()
    return t


def _shape(joined: DataFrame, n: int) -> DataFrame:
    """logquery.shape as Spark expressions: statistics of each tensor column in one aggregation, then the
    plan (expand / list / nulls) per column."""
    types = {f.name: f.dataType for f in joined.schema.fields}
    tensors = (
        sorted(c for c in types if c.startswith((INPUT_PREFIX, OUTPUT_PREFIX)) and not c.endswith(SHAPE_SUFFIX))
        if n
        else []
    )
    outputs = [c for c in tensors if c.startswith(OUTPUT_PREFIX)]
    truth_names = (
        sorted(r[0] for r in joined.select(F.explode("_fb_tensors.name")).distinct().collect() if r[0] is not None)
        if n
        else []
    )
    lists: dict[str, Column] = {c: _col(c) for c in tensors}
    for name in truth_names:
        first = F.get(F.filter("_fb_tensors", _named(name)), 0)
        lists[f"truth:{name}"] = first["values"]
    element = {k: types[k].elementType if k in types else T.DoubleType() for k in lists}  # type: ignore[attr-defined]

    aggs: list[Column] = []
    for i, values in enumerate(lists.values()):
        size = F.when(values.isNotNull(), F.size(values))
        aggs += [
            F.count(values).alias(f"n{i}"),
            F.min(size).alias(f"lo{i}"),
            F.max(size).alias(f"hi{i}"),
            F.sum(size).alias(f"e{i}"),
            F.max(F.when(F.exists(values, lambda e: e.isNull()), 1).otherwise(0)).alias(f"z{i}"),
        ]
    if outputs:
        candidates = [
            F.when(_col(c).isNotNull(), F.struct(F.size(_col(c)).alias("l"), F.lit(c).alias("n"))) for c in outputs
        ]
        aggs.append(F.collect_set(F.array_min(F.array(*candidates))["n"]).alias("primaries"))
    stats = joined.agg(*aggs).first() if aggs else None
    plans: dict[str, logquery.Plan] = {}
    for i, key in enumerate(lists):
        assert stats is not None
        numeric = not stats[f"e{i}"] or (_numeric(element[key]) and not stats[f"z{i}"])
        plans[key] = logquery.plan(stats[f"n{i}"], stats[f"lo{i}"], stats[f"hi{i}"], numeric)
    primaries = stats["primaries"] if stats is not None and outputs else []
    primary = primaries[0] if len(primaries) == 1 else None

    selected: list[Column] = [
        F.col("id").alias("prediction_id"),
        F.col("model"),
        F.col("version"),
        F.col("ts").alias("predicted_at"),
    ]

    def expand(name: str, key: str) -> None:
        kind, _ = plan = plans[key]
        scalar = _scalar(element[key])
        if kind == "expand":
            for i, column in enumerate(logquery.expanded_names(name, plan)):
                selected.append(F.get(lists[key], i).cast(scalar).alias(column))
        else:  # "list", and "null": nulls of the list type (Spark writes no null-typed column)
            selected.append(lists[key].cast(T.ArrayType(scalar)).alias(name))

    for c in (c for c in tensors if c.startswith(INPUT_PREFIX)):
        expand(c[len(INPUT_PREFIX) :], c)
    if primary is not None:
        expand("prediction", primary)
    for c in (c for c in outputs if c != primary):
        expand("output_" + c[len(OUTPUT_PREFIX) :], c)
    selected += [F.col("_fb_label").alias("truth_label"), F.col("_fb_value").cast("double").alias("truth_value")]
    for name in truth_names:
        expand(f"truth_{name}", f"truth:{name}")
    selected += [
        F.col("_fb_reward").cast("double").alias("reward"),
        F.col("_fb_feedback_id").alias("feedback_id"),
        F.col("_fb_ts").alias("feedback_at"),
    ]
    return joined.select(*selected)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="onnxgate's labelled rows of one model, as Parquet (Spark)")
    parser.add_argument(
        "--predlog-dir", required=True, help="the prediction log: a directory, or s3://, gs://, abfs://"
    )
    parser.add_argument("--model", required=True)
    parser.add_argument("--version")
    parser.add_argument("--since", type=parse_since, help="ISO-8601, or epoch seconds")
    parser.add_argument("--out", required=True, help="output directory (Parquet part files; replaced)")
    parser.add_argument("--master", help="default: spark-submit's, else local[2]")
    args = parser.parse_args(argv)
    skipped: SkipList = {}
    n = export(
        args.predlog_dir,
        args.model,
        args.out,
        version=args.version,
        since=args.since,
        master=args.master,
        skipped=skipped,
    )
    for path, why in sorted(skipped.items()):
        print(f"onnxgate dataset: skipped unreadable file {path} ({why})", file=sys.stderr)
    print(f"wrote {n} rows to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

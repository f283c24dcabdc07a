"""The Spark job (server/spark_export.py, PySpark local[2]) exports exactly the DuckDB engine's rows, columns
and types from the same log: open and rolled segments, corrections, duplicates across replicas, a resent
feedback id, reused ids, version and since, corrupt files. Needs the spark extra (.ci/deps/spark.sh)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from onnxgate.server import logquery
from onnxgate.server.logfiles import LogFiles
from tests.predlog.test_engines import _library_log

pytest.importorskip("pyspark", reason="the spark extra: .ci/deps/spark.sh")
from onnxgate.server import spark_export  # after the skip: it imports pyspark

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def spark() -> Iterator[object]:
    session = spark_export.session("local[2]")
    yield session
    session.stop()


def _types(schema: pa.Schema) -> list[tuple[str, str]]:
    return [(f.name, str(f.type)) for f in schema]


def test_spark_exports_the_duckdb_rows(spark: object, tmp_path: Path) -> None:
    log_dir = tmp_path / "log"
    log_dir.mkdir()
    now, logs = _library_log(log_dir)
    cases: list[tuple[str, dict[str, object]]] = [
        ("iris", {}),  # open .arrows segments
        ("reg", {}),
        ("close", {}),  # then rolled to Parquet
        ("iris", {"version": "2"}),
        ("iris", {"since": datetime.fromtimestamp(now - 60, UTC)}),
    ]
    for i, (model, kw) in enumerate(cases):
        if model == "close":
            for log in logs:
                log.close()
            model = "iris"
        skipped: dict[Path, str] = {}
        out = tmp_path / f"out{i}"
        n = spark_export.export(str(log_dir), model, str(out), spark=spark, skipped=skipped, **kw)  # type: ignore[arg-type]
        expected = logquery.export_table(LogFiles.at(log_dir), model, **kw)  # type: ignore[arg-type]
        got = pq.read_table(out)
        assert n == expected.num_rows > 0 and len(skipped) == (2 if model == "iris" else 1)  # corrupt files
        assert _types(got.schema) == _types(expected.schema), (model, kw)
        assert got.to_pylist() == expected.to_pylist(), (model, kw)

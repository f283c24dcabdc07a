"""The table contract (docs/reference/log-table.md): the columns and types the files really have, the schema
version in rolled segments, and the DuckDB and pandas examples users copy, run as written against a
log written by the real PredictionLog and FeedbackStore."""

from __future__ import annotations

import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from onnxgate.server import logquery
from onnxgate.server.feedback import FeedbackStore, make_record
from onnxgate.server.logfiles import LogFiles
from onnxgate.server.predlog import PredictionLog
from tests.predlog.helpers import record_iris, settings

DOC = Path(__file__).resolve().parents[2] / "docs" / "reference" / "log-table.md"
UTC_US = pa.timestamp("us", tz="UTC")


def _examples() -> dict[str, str]:
    found = re.findall(r"<!-- example: (\w+) -->\n```python\n(.*?)```", DOC.read_text(), re.S)
    return dict(found)


@pytest.fixture
def log_dir(tmp_path: Path) -> Path:
    """Two replicas, two versions, a correction, feedback naming another model, rolled to Parquet."""
    s1, s2 = settings(tmp_path, "r1"), settings(tmp_path, "r2")
    log1, log2 = PredictionLog(s1), PredictionLog(s2)
    for i in range(10):
        record_iris(log1 if i % 2 else log2, f"p{i}", [i, 0, 0, 1], i % 3, version="1" if i < 5 else "2")
    fb1, fb2 = FeedbackStore(s1), FeedbackStore(s2)
    for i in range(8):
        (fb1 if i % 2 else fb2).submit(make_record(f"p{i}", label=str(i % 3 if i % 4 else 2))).result(5)
    fb1.submit(make_record("p1", label="0")).result(5)  # a correction: now wrong
    fb2.submit(make_record("p4", label="1")).result(5)  # a correction: now right
    fb1.submit(make_record("p9", label="0", model="other")).result(5)  # another model's: not joined
    for closable in (log1, log2, fb1, fb2):
        closable.close()
    return tmp_path


def test_files_have_the_documented_columns_and_schema_version(log_dir: Path) -> None:
    [segment, *_] = sorted(log_dir.glob("r1/iris/predictions-*.parquet"))
    schema = pq.read_schema(segment)
    assert [(f.name, f.type) for f in schema][:5] == [
        ("id", pa.string()), ("model", pa.string()), ("version", pa.string()), ("ts", UTC_US), ("replica", pa.string())
    ]  # fmt: skip
    assert schema.field("input.x").type == pa.large_list(pa.float32())
    assert schema.field("input.x.shape").type == pa.list_(pa.int64())
    assert schema.field("output.label").type == pa.large_list(pa.int64())
    for path in [segment, *log_dir.glob("r*/feedback-*.parquet")]:
        assert pq.read_metadata(path).metadata[b"onnxgate.log_schema_version"] == b"1", path
    feedback = pq.read_schema(next(log_dir.glob("r1/feedback-*.parquet")))
    assert [f.name for f in feedback] == [
        "prediction_id", "feedback_id", "model", "version", "ts", "replica", "label", "value", "tensors", "reward",
        "sent_at", "content",
    ]  # fmt: skip
    assert feedback.field("ts").type == UTC_US and feedback.field("sent_at").type == UTC_US


@pytest.mark.parametrize("engine", ["duckdb", "pandas"])
def test_the_documented_queries_run_and_agree_with_the_export(log_dir: Path, engine: str) -> None:
    code = _examples()[engine]
    assert 'LOG = "/var/lib/onnxgate/predlog"' in code
    scope: dict[str, object] = {}
    exec(code.replace('LOG = "/var/lib/onnxgate/predlog"', f"LOG = {str(log_dir)!r}"), scope)
    accuracy = scope["accuracy"]
    got = {str(r["version"]): (int(r["labelled"]), float(r["accuracy"])) for r in accuracy.to_dict("records")}  # type: ignore[attr-defined]
    export = logquery.export_table(LogFiles.at(log_dir), "iris").to_pylist()
    expected: dict[str, tuple[int, float]] = {}
    for version in sorted({r["version"] for r in export}):
        rows = [r for r in export if r["version"] == version]
        expected[version] = (len(rows), sum(str(r["prediction"]) == r["truth_label"] for r in rows) / len(rows))
    assert expected == {"1": (5, pytest.approx(0.6)), "2": (3, 1.0)}
    assert got == {version: (n, pytest.approx(share)) for version, (n, share) in expected.items()}

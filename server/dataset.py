"""`onnxgate dataset export`: the labelled rows of one model — predictions joined with their feedback.

One row per prediction with feedback, from every replica's log:

    prediction_id, model, version, predicted_at,
    <features>                 each numeric input: one column per element when every row has the same
                               element count (`x` for one element, `x_0..x_{n-1}` otherwise); else a list
    prediction                 the primary output (see server/join.py), likewise expanded
    output_<name>...           the other outputs
    truth_label, truth_value,  the latest feedback of the prediction (duplicates removed)
    truth_<tensor>..., reward, feedback_id, feedback_at

A model whose versions record their source's column names (converted from a DataFrame, PMML, R, ...)
has its features named by them (`amount`, `merchant`) instead of `input_0..` (`name_features`; read from
the log's columns.json files, so a log in an object store keeps the generic names).

Rows are ordered by (predicted_at, prediction_id). Written as Parquet, or as CSV when the file name
ends in .csv (list columns as JSON text there).

Engines (`--engine`): `duckdb` (the default; server/logquery.py: DuckDB scans the segments, bounded by
`--memory-limit`), `arrow` (this module's pure-pyarrow path: the log in memory as Python rows; the
reference the others are tested against), `spark` (server/spark_export.py; `pip install onnxgate[spark]`).
`--predlog-dir` is a directory or an object-store URI (s3://, gs://, abfs://; duckdb and spark engines).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
import pyarrow.parquet as pq

from onnxgate.server import logquery
from onnxgate.server.feedback import read_feedback
from onnxgate.server.feedback_order import FeedbackIndex, Row
from onnxgate.server.join import Joined, dedupe_feedback, join, primary_output, read_predictions
from onnxgate.server.logfiles import LogFiles
from onnxgate.server.predlog import COLUMNS_FILE, INPUT_PREFIX, OUTPUT_PREFIX, SHAPE_SUFFIX, read_columns_file
from onnxgate.server.segments import SkipList


def joined_rows(
    log_dir: Path,
    model: str,
    *,
    version: str | None = None,
    since: datetime | None = None,
    skipped: SkipList | None = None,
) -> Joined:
    predictions = read_predictions(log_dir, [model], skipped=skipped)
    if predictions is not None and version is not None:
        predictions = predictions.filter(pc.equal(predictions["version"], version))
    if predictions is not None and since is not None:
        since_ts = pa.scalar(since, predictions["ts"].type)
        predictions = predictions.filter(pc.greater_equal(predictions["ts"], since_ts))
    # Everything not matched is pending/unknown; the export only uses the matched rows.
    return join(predictions, dedupe_feedback(read_feedback(log_dir, skipped)), unknown_after_s=float("inf"))


def build_table(joined: Joined) -> pa.Table:
    rows = sorted(joined.rows, key=lambda r: (r[0]["ts"], r[0]["id"]))  # the export's order, every engine
    columns: dict[str, list[Any]] = {
        "prediction_id": [p["id"] for p, _ in rows],
        "model": [p["model"] for p, _ in rows],
        "version": [p["version"] for p, _ in rows],
        "predicted_at": [p["ts"] for p, _ in rows],
    }
    tensor_columns = sorted(
        {k for p, _ in rows for k in p if k.startswith((INPUT_PREFIX, OUTPUT_PREFIX)) and not k.endswith(SHAPE_SUFFIX)}
    )
    primary = {name for p, _ in rows if (name := primary_output(p)) is not None}
    primary_name = OUTPUT_PREFIX + primary.pop() if len(primary) == 1 else None
    for name in (n for n in tensor_columns if n.startswith(INPUT_PREFIX)):
        _expand(columns, name[len(INPUT_PREFIX) :], [p.get(name) for p, _ in rows])
    if primary_name is not None:
        _expand(columns, "prediction", [p.get(primary_name) for p, _ in rows])
    for name in (n for n in tensor_columns if n.startswith(OUTPUT_PREFIX) and n != primary_name):
        _expand(columns, "output_" + name[len(OUTPUT_PREFIX) :], [p.get(name) for p, _ in rows])
    columns["truth_label"] = [f["label"] for _, f in rows]
    columns["truth_value"] = [f["value"] for _, f in rows]
    for tensor in sorted({t["name"] for _, f in rows for t in f["tensors"] or ()}):
        _expand(columns, f"truth_{tensor}", [_tensor_values(f, tensor) for _, f in rows])
    columns["reward"] = [f["reward"] for _, f in rows]
    columns["feedback_id"] = [f["feedback_id"] for _, f in rows]
    columns["feedback_at"] = [f["ts"] for _, f in rows]
    return pa.table({k: pa.array(v, _TYPES.get(k)) for k, v in columns.items()})


_UTC_US = pa.timestamp("us", tz="UTC")
_TYPES = {
    "prediction_id": pa.string(),
    "model": pa.string(),
    "version": pa.string(),
    "predicted_at": _UTC_US,
    "truth_label": pa.string(),
    "truth_value": pa.float64(),
    "reward": pa.float64(),
    "feedback_id": pa.string(),
    "feedback_at": _UTC_US,
}


def _tensor_values(feedback: Row, name: str) -> list[float] | None:
    for t in feedback["tensors"] or ():
        if t["name"] == name:
            return list(t["values"])
    return None


def _expand(columns: dict[str, list[Any]], name: str, values: list[list[Any] | None]) -> None:
    """Numeric tensors of one element count across rows become one column per element."""
    lengths = {len(v) for v in values if v is not None}
    numeric = all(isinstance(x, int | float) for v in values if v is not None for x in v)
    if len(lengths) == 1 and numeric:
        n = lengths.pop()
        if n == 1:
            columns[name] = [None if v is None else v[0] for v in values]
            return
        for i in range(n):
            columns[f"{name}_{i}"] = [None if v is None else v[i] for v in values]
        return
    columns[name] = values


def export(
    log_dir: str | Path,
    model: str,
    out: Path,
    *,
    version: str | None = None,
    since: datetime | None = None,
    engine: str = "duckdb",
    memory_limit: str = logquery.DEFAULT_MEMORY_LIMIT,
    threads: int = logquery.DEFAULT_THREADS,
    spark_master: str | None = None,
) -> int:
    """Write the labelled rows of `model` to `out` (.parquet or .csv; a directory of Parquet part files
    with the spark engine); returns the row count. Unreadable log files are skipped, each named on
    stderr."""
    skipped: SkipList = {}
    if engine == "spark":
        n = _spark().export(
            str(log_dir), model, str(out), version=version, since=since, master=spark_master, skipped=skipped
        )
        _warn(skipped)
        return int(n)
    if engine == "arrow":
        table = build_table(joined_rows(Path(log_dir), model, version=version, since=since, skipped=skipped))
    else:
        log = LogFiles.at(log_dir)
        table = logquery.export_table(
            log, model, version=version, since=since, skipped=skipped, memory_limit=memory_limit, threads=threads
        )
    _warn(skipped)
    if not str(log_dir).startswith(("s3://", "gs://", "abfs://", "abfss://")):
        table = name_features(table, Path(log_dir), model)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix.lower() == ".csv":
        pcsv.write_csv(_csv_safe(table), out)
    else:
        pq.write_table(table, out)
    return int(table.num_rows)


def recorded_columns(log_dir: Path, model: str) -> dict[str, dict[str, list[str]]]:
    """version -> {input: [element names]} from every replica's `<model>/columns.json` (server/predlog.py)."""
    found: dict[str, dict[str, list[str]]] = {}
    if not log_dir.is_dir():
        return found
    for replica in sorted(p for p in log_dir.iterdir() if p.is_dir()):
        for version, columns in read_columns_file(replica / model / COLUMNS_FILE).items():
            if isinstance(columns, dict):
                found.setdefault(str(version), {}).update(
                    {str(k): [str(n) for n in v] for k, v in columns.items() if isinstance(v, list)}
                )
    return found


def name_features(table: pa.Table, log_dir: Path, model: str) -> pa.Table:
    """The export's feature columns named by the source's columns where the model's versions record them:
    `input_0..input_3` become `v, w, s, t`. An input keeps its generic names when the versions in the
    export record different names for it, or when a name would repeat another column of the export."""
    if table.num_rows == 0:
        return table
    recorded = recorded_columns(log_dir, model)
    versions = set(table["version"].to_pylist())
    by_input: dict[str, set[tuple[str, ...]]] = {}
    for version in versions:
        for name, columns in recorded.get(str(version), {}).items():
            by_input.setdefault(name, set()).add(tuple(columns))
    present = list(table.column_names)
    renames: dict[str, str] = {}
    for name, choices in sorted(by_input.items()):
        if len(choices) != 1:
            continue
        names = choices.pop()
        generic = [name] if len(names) == 1 else [f"{name}_{i}" for i in range(len(names))]
        if not all(g in present for g in generic) or f"{name}_{len(names)}" in present:
            continue  # not expanded the way the names expect (several rows a prediction, a list column)
        renames.update({g: c for g, c in zip(generic, names, strict=True) if g != c})
    if not renames:
        return table
    final = [renames.get(c, c) for c in present]
    if len(set(final)) != len(final):
        return table  # a column name would repeat (a feature called `version`): keep the generic names
    return table.rename_columns(final)


def arrow_report(
    log_dir: Path, model: str = "", *, unknown_after_s: float, now: float | None = None
) -> logquery.Report:
    """logquery.report computed by the pure-pyarrow path (the reference; FeedbackReport's semantics)."""
    skipped: SkipList = {}
    feedback = read_feedback(log_dir, skipped)
    view = dedupe_feedback(feedback)
    predictions = read_predictions(log_dir, with_inputs=False, skipped=skipped)
    j = join(predictions, view, unknown_after_s=unknown_after_s, now=now)
    n_predictions = j.predictions
    if model:
        mine = read_predictions(log_dir, [model], with_inputs=False)
        n_predictions = 0 if mine is None else len(pc.unique(mine["id"]))

    def of_model(ids: list[str]) -> list[str]:
        return [i for i in ids if not model or view.latest[i]["model"] in ("", model)]

    pending, unknown = of_model(j.pending), of_model(j.unknown)
    distinct = view.distinct
    if model:  # the messages of the ids this report counts (the dedupe rule works within one id)
        mine = {p["id"] for p, _ in j.rows if p["model"] == model} | set(pending) | set(unknown)
        distinct = FeedbackIndex.of([r for r in feedback.to_pylist() if r["prediction_id"] in mine]).distinct
    return logquery.Report(
        predictions=n_predictions,
        feedback=distinct,
        duplicates=view.duplicates,
        joined=sum(1 for p, _ in j.rows if not model or p["model"] == model),
        pending=len(pending),
        unknown=len(unknown),
        pending_ids=pending,
        unknown_ids=unknown,
        reused_ids=j.reused,
        unreadable={str(path): why for path, why in skipped.items()},
    )


def _warn(skipped: SkipList) -> None:
    for path, why in sorted(skipped.items()):
        print(f"onnxgate dataset: skipped unreadable file {path} ({why})", file=sys.stderr)


def _spark() -> Any:
    """server/spark_export.py, or SystemExit with the one line that says what to install."""
    if importlib.util.find_spec("pyspark") is None:
        raise SystemExit("onnxgate dataset: --engine spark needs PySpark: pip install 'onnxgate[spark]'")
    return importlib.import_module("onnxgate.server.spark_export")


def _csv_safe(table: pa.Table) -> pa.Table:
    for i, f in enumerate(table.schema):
        if pa.types.is_list(f.type) or pa.types.is_large_list(f.type):
            text = [None if v is None else json.dumps(v, default=_json_default) for v in table.column(i).to_pylist()]
            table = table.set_column(i, f.name, pa.array(text, pa.string()))
        elif pa.types.is_binary(f.type):
            table = table.set_column(i, f.name, table.column(i).cast(pa.string()))
    return table


def _json_default(x: object) -> object:
    return x.decode(errors="replace") if isinstance(x, bytes) else str(x)


def parse_since(text: str) -> datetime:
    """An ISO-8601 time (naive means UTC) or seconds since the epoch."""
    try:
        return datetime.fromtimestamp(float(text), UTC)
    except ValueError:
        t = datetime.fromisoformat(text)
        return t if t.tzinfo else t.replace(tzinfo=UTC)


# -- `onnxgate dataset ...` (wired by server/cli.py) ------------------------------------------------------
def configure_parser(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="dataset_command", required=True)
    exp = sub.add_parser("export", help="write a model's predictions joined with their feedback (Parquet or CSV)")
    exp.add_argument("--model", required=True, help="model name")
    exp.add_argument("--version", help="only predictions of this version")
    exp.add_argument("--since", type=parse_since, help="only predictions at or after (ISO-8601, or epoch seconds)")
    exp.add_argument("--out", type=Path, required=True, help="output file: .parquet, or .csv (spark: a directory)")
    exp.add_argument("--engine", choices=("duckdb", "arrow", "spark"), default="duckdb", help="default: duckdb")
    exp.add_argument("--spark-master", help="Spark master URL (default: local[2], or spark-submit's)")
    rep = sub.add_parser("report", help="counts of the join; feedback whose prediction was never found")
    rep.add_argument("--unknown-after-s", type=float, default=300.0, help="grace period before 'unknown'")
    rep.add_argument("--model", default="", help="one model's share (predictions, joined, pending, unknown)")
    rep.add_argument("--engine", choices=("duckdb", "arrow"), default="duckdb", help="default: duckdb")
    for p in (exp, rep):
        p.add_argument(
            "--predlog-dir",
            default=os.environ.get("ONNXGATE_PREDLOG_DIR"),
            help="the prediction log: a directory, or s3://, gs://, abfs:// (default: $ONNXGATE_PREDLOG_DIR)",
        )
        p.add_argument(
            "--memory-limit", default=logquery.DEFAULT_MEMORY_LIMIT, help="DuckDB's memory_limit (it spills past it)"
        )
        p.add_argument("--threads", type=int, default=logquery.DEFAULT_THREADS, help="DuckDB's threads")


def run(args: argparse.Namespace) -> int:
    location = args.predlog_dir
    remote = location is not None and "://" in str(location)
    if location is None or (not remote and not Path(location).is_dir()):
        print(
            f"onnxgate dataset: no prediction log at {location}: set --predlog-dir (or ONNXGATE_PREDLOG_DIR)",
            file=sys.stderr,
        )
        return 2
    if remote and args.engine == "arrow":
        print("onnxgate dataset: --engine arrow reads local directories only; use duckdb or spark", file=sys.stderr)
        return 2
    if args.dataset_command == "export":
        n = export(
            location,
            args.model,
            args.out,
            version=args.version,
            since=args.since,
            engine=args.engine,
            memory_limit=args.memory_limit,
            threads=args.threads,
            spark_master=args.spark_master,
        )
        print(f"wrote {n} rows to {args.out}")
        return 0
    if args.engine == "arrow":
        summary = arrow_report(Path(location), args.model, unknown_after_s=args.unknown_after_s)
    else:
        summary = logquery.report(
            LogFiles.at(location),
            args.model,
            unknown_after_s=args.unknown_after_s,
            memory_limit=args.memory_limit,
            threads=args.threads,
        )
    print(json.dumps(summary.as_json(), indent=2))
    return 0

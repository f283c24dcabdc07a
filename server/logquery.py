"""Exports and reports of the prediction log computed by an embedded DuckDB: the default engine of
`onnxgate dataset export|report`, and what the gateway's FeedbackReport answers from.

    log = LogFiles.at("/var/lib/onnxgate/predlog")          # or s3://..., gs://..., abfs://...
    table = export_table(log, "iris", version="3", since=datetime(2026, 1, 1, tzinfo=UTC))
    summary = report(log, unknown_after_s=300)

They compute exactly what the pure-pyarrow path of server/dataset.py (`--engine arrow`, the reference
the tests compare against) computes, without holding the log in Python:
- rolled Parquet segments are scanned by DuckDB (local files with `read_parquet`, object stores through
  a pyarrow dataset); the model is chosen by the files listed, the version and `since` by a WHERE that
  DuckDB pushes into the scan; open `.arrows` segments (the last minutes) are read by LogFiles and
  registered as Arrow tables;
- feedback is read by LogFiles (it is the small table), rows written before the `content` column get
  their digest computed in Python (feedback_order.row_content), then DuckDB orders and dedupes it by the
  rule of server/feedback_order.py with window functions (FEEDBACK_SQL, shared with the Spark job);
- the export's columns (features expanded, the primary output, truth tensors) are shaped from the
  joined rows with Arrow compute (`shape`), by the same rules as dataset.build_table.
A file that cannot be read is skipped and reported (a Parquet footer that does not parse, or a scan that
fails naming the file), never fatal.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from onnxgate.server.feedback import SCHEMA as FEEDBACK_SCHEMA
from onnxgate.server.feedback import conform
from onnxgate.server.feedback_order import FeedbackIndex, row_content
from onnxgate.server.logfiles import LogFiles, Segment
from onnxgate.server.predlog import INPUT_PREFIX, OUTPUT_PREFIX, PREDICTIONS, SHAPE_SUFFIX
from onnxgate.server.segments import SkipList

FEEDBACK = "feedback"
DEFAULT_MEMORY_LIMIT = "1GB"
DEFAULT_THREADS = 2
UTC_US = pa.timestamp("us", tz="UTC")

# The columns of an export in order (dataset.build_table): the fixed ones, with the tensors' columns
# (features, prediction, output_<name>, truth_<tensor>) between predicted_at and truth_label.
FIXED_TYPES = {
    "prediction_id": pa.string(),
    "model": pa.string(),
    "version": pa.string(),
    "predicted_at": UTC_US,
    "truth_label": pa.string(),
    "truth_value": pa.float64(),
    "reward": pa.float64(),
    "feedback_id": pa.string(),
    "feedback_at": UTC_US,
}

# -- the rule of server/feedback_order.py in SQL (DuckDB and Spark SQL both run this text) ----------------
# Input `feedback`: the feedback columns, `content` filled in, `_ord` the row's position in the listing
# (replica, seq, row): the last key, as Python's stable sort keeps that order among equal order keys.
# `_idn`: the row's rank among rows of the same (prediction id, feedback id); a later one with a
# feedback id is a duplicate (rule 1). Of the rest, a row whose content equals the previous remaining
# row's is a duplicate (rule 2): that previous row is either kept or itself equal to the kept one
# before it, so comparing with it is comparing with the truth in force. `_kept`: neither.
FEEDBACK_ORDER = "coalesce(sent_at, ts), ts, coalesce(replica, ''), feedback_id, _ord"
FEEDBACK_SQL = f"""
WITH ordered AS (
    SELECT *,
        row_number() OVER (PARTITION BY prediction_id ORDER BY {FEEDBACK_ORDER}) AS _pos,
        row_number() OVER (PARTITION BY prediction_id, feedback_id ORDER BY {FEEDBACK_ORDER}) AS _idn,
        count(*) OVER (PARTITION BY prediction_id, feedback_id) AS _same_id
    FROM feedback
), by_content AS (
    SELECT prediction_id, _pos,
        lag(content) OVER (PARTITION BY prediction_id ORDER BY _pos) IS DISTINCT FROM content AS _kept
    FROM ordered WHERE NOT (feedback_id <> '' AND _idn > 1)
)
SELECT o.*, coalesce(c._kept, false) AS _kept
FROM ordered o LEFT JOIN by_content c ON o.prediction_id = c.prediction_id AND o._pos = c._pos
"""
# Rule 1 in Python counts only *accepted* messages' ids: a feedback id whose first message was a
# content duplicate and that comes again later is judged afresh there. The window rule above would drop
# it; such predictions (rare: a client resending one feedback id after a correction) are "sequential"
# and decided in Python by feedback_order.FeedbackIndex itself, so the result is exactly the rule.
SEQUENTIAL_SQL = """
SELECT DISTINCT prediction_id FROM marked
WHERE feedback_id <> '' AND _same_id > 1 AND _idn = 1 AND NOT _kept
"""
# The truth of each prediction: the last kept row (predictions not sequential).
LATEST_SQL = """
SELECT * FROM (
    SELECT *, row_number() OVER (PARTITION BY prediction_id ORDER BY _pos DESC) AS _last
    FROM marked WHERE _kept AND prediction_id NOT IN (SELECT prediction_id FROM sequential)
) WHERE _last = 1
"""
LATEST_COLUMNS = ["prediction_id", "feedback_id", "model", "version", "ts", "label", "value", "tensors", "reward"]
# Predictions joined with their truth: inner join by id, the feedback's model and version must match
# when given, and of a reused id the latest prediction (ties: the later file, the later row).
MATCH_SQL = """
SELECT * FROM (
    SELECT p.*,
        f.label AS _fb_label, f.value AS _fb_value, f.tensors AS _fb_tensors, f.reward AS _fb_reward,
        f.feedback_id AS _fb_feedback_id, f.ts AS _fb_ts,
        row_number() OVER (PARTITION BY p.id ORDER BY p.ts DESC, p._file DESC, p._row DESC) AS _rank
    FROM predictions p JOIN latest f ON p.id = f.prediction_id
    WHERE (coalesce(f.model, '') = '' OR f.model = p.model)
      AND (coalesce(f.version, '') = '' OR f.version = p.version)
) WHERE _rank = 1
"""


@dataclass
class Report:
    """What `onnxgate dataset report` prints and FeedbackReport answers (one model's share when given)."""

    predictions: int  # distinct prediction ids (of the model)
    feedback: int  # distinct feedback messages (of the model: joined to its predictions, or pending as below)
    duplicates: int
    joined: int  # predictions (of the model) with feedback
    pending: int  # feedback (of the model, or of no model) waiting for its prediction
    unknown: int  # ... and waited longer than unknown_after_s
    pending_ids: list[str]  # sorted, at most max_ids
    unknown_ids: list[str]
    reused_ids: int  # prediction ids more than one logged prediction carries, all models
    unreadable: dict[str, str] = field(default_factory=dict)  # path -> why

    def as_json(self) -> dict[str, Any]:
        """The JSON `onnxgate dataset report` prints (its keys predate this engine)."""
        return {
            "predictions": self.predictions,
            "feedback": self.feedback,
            "duplicates": self.duplicates,
            "joined": self.joined,
            "pending": self.pending_ids,
            "unknown": self.unknown_ids,
            "reused_prediction_ids": self.reused_ids,
            "unreadable_files": dict(sorted(self.unreadable.items())),
        }


@contextmanager
def connect(memory_limit: str = DEFAULT_MEMORY_LIMIT, threads: int = DEFAULT_THREADS) -> Iterator[Any]:
    """An in-memory DuckDB bounded by `memory_limit` that spills to a private temporary directory (not
    the working directory), timestamps in UTC."""
    spill = tempfile.mkdtemp(prefix="onnxgate-duckdb-")
    con = duckdb.connect(":memory:", config={"memory_limit": memory_limit, "threads": threads, "temp_directory": spill})
    try:
        con.execute("SET TimeZone = 'UTC'")
        yield con
    finally:
        con.close()
        shutil.rmtree(spill, ignore_errors=True)


def export_table(
    log: LogFiles,
    model: str,
    *,
    version: str | None = None,
    since: datetime | None = None,
    skipped: SkipList | None = None,
    memory_limit: str = DEFAULT_MEMORY_LIMIT,
    threads: int = DEFAULT_THREADS,
) -> pa.Table:
    """The labelled rows of `model` (dataset.py's columns), ordered by (predicted_at, prediction_id)."""
    skipped = {} if skipped is None else skipped
    with connect(memory_limit, threads) as con:
        feedback_truth(con, log, skipped)
        # literals, not parameters: a view cannot hold parameters; DuckDB pushes both into the scan
        where = []
        if version is not None:
            where.append(f"version = {_literal(version)}")
        if since is not None:
            where.append(f"ts >= TIMESTAMPTZ {_literal(since.isoformat())}")
        with_predictions(con, log, [model], skipped, where=" AND ".join(where))
        shape_cols = [c for c in _columns(con, "predictions") if c.endswith(SHAPE_SUFFIX) or c == "replica"]
        joined = con.sql(
            f"SELECT * EXCLUDE (_file, _row, _rank{''.join(', ' + _quote(c) for c in shape_cols)}) "
            f"FROM ({MATCH_SQL}) ORDER BY ts, id"
        ).to_arrow_table()
    return shape(joined)


def report(
    log: LogFiles,
    model: str = "",
    *,
    unknown_after_s: float,
    now: float | None = None,
    max_ids: int | None = None,
    memory_limit: str = DEFAULT_MEMORY_LIMIT,
    threads: int = DEFAULT_THREADS,
) -> Report:
    """Counts of the join over every replica's files, exact (FeedbackReport's semantics: with a model,
    its predictions, its joined rows, the pending/unknown feedback naming it or no model, and the distinct
    feedback messages of those prediction ids; duplicates, reused ids and unreadable files are the whole
    log's)."""
    now = time.time() if now is None else now
    skipped: SkipList = {}
    with connect(memory_limit, threads) as con:
        distinct, duplicates = feedback_truth(con, log, skipped)
        with_predictions(con, log, None, skipped, columns=["id", "model", "version", "ts"])
        con.execute(f"CREATE TEMP TABLE matched AS SELECT id, model FROM ({MATCH_SQL})")
        model_clause = "WHERE model = ?" if model else ""
        args = [model] if model else []
        [(predictions,)] = con.execute(f"SELECT count(DISTINCT id) FROM predictions {model_clause}", args).fetchall()
        [(reused,)] = con.execute(
            "SELECT count(*) FROM (SELECT id FROM predictions GROUP BY id HAVING count(*) > 1)"
        ).fetchall()
        [(joined,)] = con.execute(f"SELECT count(*) FROM matched {model_clause}", args).fetchall()
        waiting = con.sql(
            "SELECT prediction_id, ts, coalesce(model, '') AS model FROM latest "
            "WHERE prediction_id NOT IN (SELECT id FROM matched) ORDER BY prediction_id"
        ).to_arrow_table()
        if model:
            distinct = _distinct_of_model(con, model)
    pending: list[str] = []
    unknown: list[str] = []
    for pid, ts, fb_model in zip(*(waiting[c].to_pylist() for c in ("prediction_id", "ts", "model")), strict=True):
        if not model or fb_model in ("", model):  # as join(): the stamp's float seconds against `now`
            (unknown if now - ts.timestamp() >= unknown_after_s else pending).append(pid)
    return Report(
        predictions=int(predictions),
        feedback=distinct,
        duplicates=duplicates,
        joined=int(joined),
        pending=len(pending),
        unknown=len(unknown),
        pending_ids=pending[:max_ids],
        unknown_ids=unknown[:max_ids],
        reused_ids=int(reused),
        unreadable={str(p): why for p, why in skipped.items()},
    )


def _distinct_of_model(con: Any, model: str) -> int:
    """The distinct feedback messages of the prediction ids a model's report counts: those joined to its
    predictions, and those waiting that name it or no model. The rule that dedupes messages works within
    one prediction id, so a subset of ids is counted exactly as the whole log is."""
    con.execute(
        "CREATE TEMP TABLE mine AS SELECT id AS prediction_id FROM matched WHERE model = ? "
        "UNION SELECT prediction_id FROM latest WHERE prediction_id NOT IN (SELECT id FROM matched) "
        "AND coalesce(model, '') IN ('', ?)",
        [model, model],
    )
    [(kept,)] = con.execute(
        "SELECT count(*) FROM marked WHERE _kept AND prediction_id IN (SELECT prediction_id FROM mine) "
        "AND prediction_id NOT IN (SELECT prediction_id FROM sequential)"
    ).fetchall()
    rows = con.sql(
        "SELECT * FROM sequential_rows WHERE prediction_id IN (SELECT prediction_id FROM mine)"
    ).to_arrow_table()
    return int(kept) + FeedbackIndex.of(rows.to_pylist()).distinct


# -- inputs ------------------------------------------------------------------------------------------------
def feedback_table(log: LogFiles, skipped: SkipList) -> pa.Table:
    """Every replica's feedback in today's schema, `content` filled in (computed for rows written before
    the column existed), and `_ord`: the row's position in (replica, seq, row) order."""
    tables = []
    for segment in log.segments(FEEDBACK, skipped=skipped):
        table = log.read(segment, skipped)
        if table is not None and table.num_rows:
            tables.append(conform(table))
    table = pa.concat_tables(tables) if tables else FEEDBACK_SCHEMA.empty_table()
    content = table["content"]
    missing = pc.fill_null(pc.equal(content, ""), True)
    if pc.any(missing).as_py():
        rows = table.filter(missing).to_pylist()
        computed = iter([row_content(r) for r in rows])
        filled = [next(computed) if m else c for c, m in zip(content.to_pylist(), missing.to_pylist(), strict=True)]
        table = table.set_column(table.schema.get_field_index("content"), "content", pa.array(filled, pa.string()))
    return table.append_column("_ord", pa.array(np.arange(table.num_rows, dtype=np.int64)))


def feedback_truth(con: Any, log: LogFiles, skipped: SkipList) -> tuple[int, int]:
    """Creates `latest` (each prediction's truth) in `con`; returns (distinct, duplicates)."""
    feedback = feedback_table(log, skipped)
    con.register("feedback", feedback)
    con.execute(f"CREATE TEMP TABLE marked AS {FEEDBACK_SQL}")
    con.execute(f"CREATE TEMP TABLE sequential AS {SEQUENTIAL_SQL}")
    [(kept, total)] = con.execute(
        "SELECT count(*) FILTER (WHERE _kept), count(*) FROM marked "
        "WHERE prediction_id NOT IN (SELECT prediction_id FROM sequential)"
    ).fetchall()
    rows = con.sql(
        "SELECT * EXCLUDE (_ord) FROM feedback WHERE prediction_id IN (SELECT prediction_id FROM sequential) "
        "ORDER BY _ord"
    ).to_arrow_table()
    con.register("sequential_rows", rows)  # the report of one model counts its ids' messages again
    index = FeedbackIndex.of(rows.to_pylist())
    by_rule = pa.Table.from_pylist(list(index.latest.values()), schema=FEEDBACK_SCHEMA).select(LATEST_COLUMNS)
    con.register("latest_sequential", by_rule)
    cols = ", ".join(LATEST_COLUMNS)
    con.execute(
        f"CREATE TEMP TABLE latest AS SELECT {cols} FROM ({LATEST_SQL}) UNION ALL SELECT {cols} FROM latest_sequential"
    )
    con.unregister("feedback")
    return int(kept) + index.distinct, int(total) - int(kept) + index.duplicates


def readable_parquet(log: LogFiles, segments: list[Segment], skipped: SkipList) -> list[tuple[Segment, pa.Schema]]:
    """The rolled segments whose footer parses and that hold rows (an empty one adds no columns to the
    reference path either); the others are skipped, and named in `skipped`."""
    out = []
    for segment in segments:
        try:
            with log.fs.open_input_file(segment.path) as f:
                meta = pq.ParquetFile(f).metadata
        except FileNotFoundError:
            continue  # removed by retention since the listing
        except (pa.ArrowException, OSError) as error:
            skipped[Path(segment.path)] = f"{type(error).__name__}: {error}"
            continue
        if meta.num_rows:
            out.append((segment, meta.schema.to_arrow_schema()))
    return out


def with_predictions(
    con: Any,
    log: LogFiles,
    models: list[str] | None,
    skipped: SkipList,
    *,
    columns: list[str] | None = None,
    where: str = "",
) -> None:
    """Creates the view `predictions` in `con`: every replica's predictions of `models` (all when None),
    the union of their columns, plus `_file` (the segment's position in the listing) and `_row` (the
    row's in its segment), the reference path's order, for ties between predictions of a reused id."""
    segments = log.segments(PREDICTIONS, models, skipped)
    position = {s.key: i for i, s in enumerate(segments)}
    rolled = readable_parquet(log, [s for s in segments if s.rolled], skipped)
    parts: list[str] = []
    if rolled:
        files = pa.table(
            {
                "_path": [s.path for s, _ in rolled],
                "_file": pa.array([position[s.key] for s, _ in rolled], pa.int64()),
            }
        )
        con.register("rolled_files", files)
        if log.local:
            paths = ", ".join(_literal(s.path) for s, _ in rolled)
            con.execute(
                "CREATE TEMP VIEW rolled AS SELECT r.* EXCLUDE (filename, file_row_number), f._file, "
                "r.file_row_number AS _row "
                f"FROM read_parquet([{paths}], union_by_name = true, filename = true, file_row_number = true) r "
                "JOIN rolled_files f ON r.filename = f._path"
            )
        else:
            # Object stores: DuckDB's httpfs is not at hand; pyarrow reads the files and DuckDB scans the
            # dataset (projections and filters pushed into it). Row positions are not known there: ties
            # between predictions of a reused id with the same µs stamp go by file only.
            schema = pa.unify_schemas([s for _, s in rolled], promote_options="permissive")
            dataset = ds.dataset([s.path for s, _ in rolled], schema=schema, format="parquet", filesystem=log.fs)
            con.register("rolled_dataset", dataset)
            con.execute("CREATE TEMP VIEW rolled AS SELECT *, 0 AS _file, 0::BIGINT AS _row FROM rolled_dataset")
        parts.append("SELECT * FROM rolled")
    for segment in (s for s in segments if not s.rolled):
        table = log.read(segment, skipped)
        if table is None or not table.num_rows:
            continue
        if columns is not None and not where:  # DuckDB cannot register every column type (FP16 tensors)
            table = table.select([c for c in columns if c in table.column_names])
        name = f"open_{len(parts)}"
        table = table.append_column("_file", pa.array(np.full(table.num_rows, position[segment.key], np.int64)))
        con.register(name, table.append_column("_row", pa.array(np.arange(table.num_rows, dtype=np.int64))))
        parts.append(f"SELECT * FROM {name}")
    if not parts:
        empty = pa.table(
            {
                "id": pa.array([], pa.string()),
                "model": pa.array([], pa.string()),
                "version": pa.array([], pa.string()),
                "ts": pa.array([], UTC_US),
                "_file": pa.array([], pa.int64()),
                "_row": pa.array([], pa.int64()),
            }
        )
        con.register("no_predictions", empty)
        parts.append("SELECT * FROM no_predictions")
    union = " UNION ALL BY NAME ".join(f"({p})" for p in parts)
    select = "*" if columns is None else ", ".join([*(_quote(c) for c in columns), "_file", "_row"])
    con.execute(f"CREATE TEMP VIEW predictions AS SELECT {select} FROM ({union}) {'WHERE ' + where if where else ''}")


def _columns(con: Any, relation: str) -> list[str]:
    return [str(c) for c in con.sql(f"SELECT * FROM {relation} LIMIT 0").columns]


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


# -- the export's columns ----------------------------------------------------------------------------------
# One plan for a tensor column, from statistics of its values (dataset._expand's rule): "expand" into
# `width` columns when every non-null value has `width` elements, all numeric (no null element); "null"
# when no row has a value (a column of nulls); else "list", one list column.
Plan = tuple[Literal["expand", "list", "null"], int]


def plan(nonnull: int, min_len: int | None, max_len: int | None, numeric: bool) -> Plan:
    if nonnull == 0:
        return ("null", 0)
    if min_len == max_len and numeric and min_len is not None:
        return ("expand", min_len)
    return ("list", 0)


def expanded_names(name: str, p: Plan) -> list[str]:
    """The columns a plan makes: `name` for one element, `name_0..` for more, none for zero."""
    kind, width = p
    if kind != "expand":
        return [name]
    return [name] if width == 1 else [f"{name}_{i}" for i in range(width)]


def scalar_type(t: pa.DataType) -> pa.DataType:
    """A tensor element's type in the export: what Python's float/int/bool make it (dataset.build_table
    builds columns from Python values), strings and bytes as they are."""
    if pa.types.is_floating(t):
        return pa.float64()
    if pa.types.is_integer(t):
        return pa.int64()
    if pa.types.is_large_string(t):
        return pa.string()
    if pa.types.is_large_binary(t):
        return pa.binary()
    return t


def is_numeric(t: pa.DataType) -> bool:
    return bool(pa.types.is_floating(t) or pa.types.is_integer(t) or pa.types.is_boolean(t))


def shape(joined: pa.Table) -> pa.Table:
    """The export's table from joined rows: the prediction's columns (`id, model, version, ts`, then
    `input.<name>` / `output.<name>` lists) and the truth's (`_fb_label, _fb_value, _fb_tensors,
    _fb_reward, _fb_feedback_id, _fb_ts`), rows in the export's order."""
    n = joined.num_rows
    out: dict[str, pa.Array | pa.ChunkedArray] = {
        "prediction_id": joined["id"],
        "model": joined["model"],
        "version": joined["version"],
        "predicted_at": joined["ts"],
    }
    tensors = (
        sorted(
            c
            for c in joined.column_names
            if c.startswith((INPUT_PREFIX, OUTPUT_PREFIX)) and not c.endswith(SHAPE_SUFFIX)
        )
        if n
        else []
    )
    outputs = [c for c in tensors if c.startswith(OUTPUT_PREFIX)]
    primary = _primary(joined, outputs)
    for column in (c for c in tensors if c.startswith(INPUT_PREFIX)):
        _expand(out, column[len(INPUT_PREFIX) :], joined[column])
    if primary is not None:
        _expand(out, "prediction", joined[primary])
    for column in (c for c in outputs if c != primary):
        _expand(out, "output_" + column[len(OUTPUT_PREFIX) :], joined[column])
    out["truth_label"] = joined["_fb_label"]
    out["truth_value"] = joined["_fb_value"]
    truths = joined["_fb_tensors"].combine_chunks() if n else pa.array([], FEEDBACK_SCHEMA.field("tensors").type)
    flat = pc.list_flatten(truths)
    names = flat.field("name")
    for name in sorted(n for n in pc.unique(names).to_pylist() if n is not None):
        _expand(out, f"truth_{name}", _first_named(truths, flat, names, name))
    out["reward"] = joined["_fb_reward"]
    out["feedback_id"] = joined["_fb_feedback_id"]
    out["feedback_at"] = joined["_fb_ts"]
    return pa.table({k: v.cast(FIXED_TYPES[k]) if k in FIXED_TYPES else v for k, v in out.items()})


def _primary(joined: pa.Table, outputs: list[str]) -> str | None:
    """join.primary_output for every row (the output with the fewest elements, then by name); the
    column when all rows agree, else None (each output keeps its own column)."""
    if not outputs:
        return None
    best_len = pa.nulls(joined.num_rows, pa.int64())
    best = pa.nulls(joined.num_rows, pa.string())
    for column in sorted(outputs, key=lambda c: c[len(OUTPUT_PREFIX) :]):
        length = pc.list_value_length(joined[column]).cast(pa.int64())
        better = pc.and_kleene(pc.is_valid(length), pc.or_kleene(pc.is_null(best_len), pc.less(length, best_len)))
        better = pc.fill_null(better, False)
        best_len = pc.if_else(better, length, best_len)
        best = pc.if_else(better, pa.scalar(column), best)
    chosen = pc.unique(pc.drop_null(best)).to_pylist()
    return str(chosen[0]) if len(chosen) == 1 else None


def list_stats(values: pa.Array | pa.ChunkedArray) -> Plan:
    lengths = pc.drop_null(pc.list_value_length(values))
    elements = pc.list_flatten(values)
    minmax = pc.min_max(lengths).as_py() if len(lengths) else {"min": None, "max": None}
    numeric = len(elements) == 0 or (is_numeric(elements.type) and elements.null_count == 0)
    return plan(len(lengths), minmax["min"], minmax["max"], numeric)


def _expand(out: dict[str, pa.Array | pa.ChunkedArray], name: str, values: pa.Array | pa.ChunkedArray) -> None:
    p = list_stats(values)
    if p[0] == "null":
        out[name] = pa.nulls(len(values))
        return
    element = scalar_type(values.type.value_type)
    if p[0] == "list":
        out[name] = values.cast(pa.list_(element))
        return
    for i, column in enumerate(expanded_names(name, p)):
        out[column] = pc.list_element(values, i).cast(element)


def _first_named(truths: pa.Array, flat: pa.Array, names: pa.Array, name: str) -> pa.Array:
    """Per row, the values of its first truth tensor called `name` (null when it has none)."""
    parents = pc.list_parent_indices(truths).to_numpy()
    hits = np.flatnonzero(pc.fill_null(pc.equal(names, name), False).to_numpy(zero_copy_only=False))
    rows, first = np.unique(parents[hits], return_index=True)
    pick = np.full(len(truths), -1, np.int64)
    pick[rows] = hits[first]
    indices = pa.array(pick, mask=pick < 0)
    return pc.take(flat.field("values"), indices)

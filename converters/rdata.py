"""R models saved with `saveRDS` -> ONNX: randomForest (classification, regression), lm and glm.

The RDS file is read directly with PyPI `rdata`; R is not needed to convert. Two things make
plain `saveRDS(glm)` files unreadable by `rdata` as it ships: the family's byte-compiled closures
carry serialization codes `rdata` does not know (UNBOUNDVALUE 252, BASENAMESPACE 250), and its
converter cannot turn closures into Python. The reader here skips those codes while parsing and
drops closures, environments and promises before converting: a model needs none of them.

Reference for the parity check: R's own `predict()` run by `Rscript` on the sample rows
(`type="prob"` for forests, `type="response"` for glm), so parity needs `r-base-core` (and
`r-cran-randomforest` for forests). Without R, `predict_native` raises a ConversionError.
"""

from __future__ import annotations

import math
import re
import shutil
import subprocess
import tempfile
import threading
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper

from onnxgate.converters.base import (
    LABEL,
    PREDICTION,
    PROBABILITIES,
    Conversion,
    ConversionError,
    MissingDependency,
    Rows,
    Task,
    TensorSpec,
)
from onnxgate.converters.pmml_onnx import GraphBuilder, Leaf, Split, Tree, float32_threshold

INPUT = "input"
_SKIPPED_CODES = (250, 252)  # BASENAMESPACE_SXP, UNBOUNDVALUE_SXP: no payload follows them
_PARSER_LOCK = threading.Lock()


@dataclass(frozen=True)
class Variable:
    name: str
    levels: list[str] | None  # factor levels; None for numeric
    low: float = -3.0
    high: float = 3.0


def convert_rds(path: Path) -> Conversion:
    obj = read_rds(path)
    classes = _r_class(obj)
    if "randomForest" in classes:
        return _forest(path, obj)
    if "lm" in classes or "glm" in classes:
        return _linear(path, obj, "glm" in classes)
    raise ConversionError(
        f"{path}: R objects of class {classes or ['<none>']} are not supported (randomForest, lm and glm are)"
    )


# ---------------------------------------------------------------- reading


def read_rds(path: Path) -> dict[str, Any]:
    try:
        import rdata
        from rdata.parser import _parser as rparser
    except ImportError as exc:
        raise MissingDependency("rdata", "r") from exc
    try:
        with _tolerant_parser(rparser):
            parsed = rdata.parser.parse_file(path)
        _drop_code(parsed.object, rparser)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "missing constructor for R class ..." is expected here
            converted = rdata.conversion.convert(parsed)
    except (OSError, ValueError, EOFError, AssertionError, NotImplementedError, KeyError, IndexError) as exc:
        raise ConversionError(f"{path} is not a readable RDS file: {type(exc).__name__}: {exc}") from exc
    if not isinstance(converted, dict):
        raise ConversionError(f"{path} holds an R {type(converted).__name__}, not a model object")
    return converted


@contextmanager
def _tolerant_parser(rparser: Any) -> Iterator[None]:
    """Temporarily teach rdata's parser to skip the payload-free codes found inside closures."""
    original = rparser.Parser.parse_R_object

    def parse(self: Any, reference_list: Any = None, bytecode_rep_list: Any = None, info_int: Any = None) -> Any:
        if info_int is None and hasattr(self, "file"):
            start = self.file.tell()
            code = self.parse_int()
            if code & 0xFF in _SKIPPED_CODES:
                return rparser.RObject(info=rparser.parse_r_object_info(254), value=None, attributes=None)
            self.file.seek(start)
        return original(self, reference_list, bytecode_rep_list, info_int)

    with _PARSER_LOCK:
        rparser.Parser.parse_R_object = parse
        try:
            yield
        finally:
            rparser.Parser.parse_R_object = original


def _drop_code(obj: Any, rparser: Any) -> None:
    """Replace closures, environments and the like inside lists with NULL, in place."""
    kinds = rparser.RObjectType
    code = {
        kinds.CLO,
        kinds.ENV,
        kinds.BCODE,
        kinds.PROM,
        kinds.SPECIAL,
        kinds.BUILTIN,
        kinds.REF,
        kinds.EXTPTR,
        kinds.WEAKREF,
    }
    stack = [obj]
    while stack:
        node = stack.pop()
        if node.info.type in (kinds.VEC, kinds.EXPR) and isinstance(node.value, list):
            for i, item in enumerate(node.value):
                if item.info.type in code:
                    node.value[i] = rparser.RObject(info=rparser.parse_r_object_info(254), value=None, attributes=None)
                else:
                    stack.append(item)


def _r_class(obj: dict[str, Any]) -> list[str]:
    if "forest" in obj and "ntree" in obj:
        return ["randomForest"]
    if "coefficients" in obj and "family" in obj:
        return ["glm"]
    if "coefficients" in obj and "qr" in obj:
        return ["lm"]
    return []


def _array(value: Any) -> np.ndarray:
    return np.asarray(getattr(value, "values", value))


def _names(value: Any) -> list[str]:
    """Names of a named R vector as rdata returns it (an xarray coordinate)."""
    coords = getattr(value, "coords", None)
    if coords is None or not coords:
        return []
    return [str(v) for v in next(iter(coords.values())).values]


# ---------------------------------------------------------------- randomForest


def _forest(path: Path, obj: dict[str, Any]) -> Conversion:
    forest = obj["forest"]
    kind = str(_array(obj["type"]).ravel()[0])
    if kind not in ("classification", "regression"):
        raise ConversionError(f"randomForest of type {kind!r} is not supported (classification, regression are)")
    variables = _forest_variables(obj)
    classes = [str(c) for c in _array(obj["classes"]).ravel()] if kind == "classification" else []
    trees = _forest_trees(forest, variables, classes)
    g = GraphBuilder()
    tabular = all(v.levels is None for v in variables)
    inputs, columns = _inputs(g, variables, tabular)
    features = INPUT if tabular else columns[0] if len(columns) == 1 else g.op("Concat", columns, axis=1)
    width = len(classes) or 1
    out = g.tree_ensemble(features, trees, width, None, {f"v{i}": i for i in range(len(variables))})
    if kind == "regression":
        outputs = _regression_outputs(g, out)
    else:
        # R's label: the class with the most votes relative to its cutoff (all equal by default)
        cutoff = _array(forest["cutoff"]).astype(np.float64).ravel()
        outputs = _class_outputs(g, out, classes, g.op("Div", [out, g.const(cutoff)]))
    model = g.model(inputs, outputs, name="r_randomForest")
    reference = _RReference(path, variables, tabular, "forest", classes)
    return _conversion(
        model,
        variables,
        tabular,
        kind,
        classes,
        reference,
        f"randomForest ({kind}, {int(_array(obj['ntree']).ravel()[0])} trees)",
    )


def _forest_variables(obj: dict[str, Any]) -> list[Variable]:
    forest = obj["forest"]
    xlevels = forest["xlevels"]
    ncat = _array(forest["ncat"]).astype(int).ravel()
    if isinstance(xlevels, dict):
        names = [str(k) for k in xlevels]
        levels_of = [xlevels[k] for k in xlevels]
    else:  # x/y interface: xlevels is unnamed; the importance matrix names the columns
        names = _names(obj["importance"]) if "importance" in obj else []
        levels_of = list(xlevels) if isinstance(xlevels, list) else [0] * len(ncat)
    if len(names) != len(ncat):
        raise ConversionError("randomForest object does not name its predictors (xlevels/importance)")
    thresholds = _thresholds_by_variable(forest, len(names))
    out = []
    for i, name in enumerate(names):
        if ncat[i] > 1:
            levels = [str(v) for v in np.asarray(levels_of[i]).ravel()]
            out.append(Variable(name, levels))
        else:
            cuts = thresholds[i]
            low, high = (min(cuts), max(cuts)) if cuts else (-3.0, 3.0)
            margin = max(high - low, 1.0) * 0.25
            out.append(Variable(name, None, low - margin, high + margin))
    return out


def _thresholds_by_variable(forest: dict[str, Any], n_vars: int) -> list[list[float]]:
    status = _array(forest["nodestatus"])
    bestvar = _array(forest["bestvar"]).astype(int)
    split = _array(forest["xbestsplit"]).astype(np.float64)
    out: list[list[float]] = [[] for _ in range(n_vars)]
    internal = (status != -1) & (bestvar > 0)
    for var, value in zip(bestvar[internal], split[internal], strict=True):
        out[var - 1].append(float(value))
    return out


def _forest_trees(forest: dict[str, Any], variables: list[Variable], classes: list[str]) -> list[Tree]:
    status = _array(forest["nodestatus"]).astype(int)
    bestvar = _array(forest["bestvar"]).astype(int)
    split = _array(forest["xbestsplit"]).astype(np.float64)
    pred = _array(forest["nodepred"])
    if "treemap" in forest:  # classification forests keep both daughters in one array
        treemap = _array(forest["treemap"]).astype(int)
        left, right = treemap[:, 0, :], treemap[:, 1, :]
    else:
        left = _array(forest["leftDaughter"]).astype(int)
        right = _array(forest["rightDaughter"]).astype(int)
    ntree = status.shape[1]
    weight = 1.0 / ntree  # classification: each vote counts 1/ntree, i.e. type="prob"; regression: mean

    def build(t: int, node: int) -> Tree:  # node is 0-based
        if status[node, t] == -1:
            if classes:
                winner = int(pred[node, t]) - 1
                return Leaf(tuple(weight if k == winner else 0.0 for k in range(len(classes))))
            return Leaf((float(pred[node, t]) * weight,))
        var = bestvar[node, t] - 1
        go_left, go_right = build(t, left[node, t] - 1), build(t, right[node, t] - 1)
        column = f"v{var}"
        levels = variables[var].levels
        if levels is None:
            threshold = float32_threshold("BRANCH_LEQ", float(split[node, t]))
            return Split(column, "BRANCH_LEQ", threshold, False, go_left, go_right)
        # factor split: bit k of xbestsplit set = level k+1 goes left
        mask = int(split[node, t])
        chain: Tree = go_right
        for k in reversed([k for k in range(len(levels)) if mask >> k & 1]):
            chain = Split(column, "BRANCH_EQ", float(k), False, go_left, chain)
        return chain

    return [build(t, 0) for t in range(ntree)]


# ---------------------------------------------------------------- lm / glm


# a plain column reference; anything else (log(x), I(x^2), x:z) is a computed term
_SYNTACTIC = re.compile(r"^[A-Za-z.][A-Za-z0-9._]*$")
_FAMILIES = {("gaussian", "identity"), ("binomial", "logit"), ("poisson", "log")}


def _linear(path: Path, obj: dict[str, Any], is_glm: bool) -> Conversion:
    coefficients = obj["coefficients"]
    names = _names(coefficients)
    beta = np.nan_to_num(_array(coefficients).astype(np.float64).ravel())  # aliased (NA) terms contribute 0
    family, link = ("gaussian", "identity")
    if is_glm:
        fam = obj["family"]
        family, link = str(_array(fam["family"]).ravel()[0]), str(_array(fam["link"]).ravel()[0])
    if (family, link) not in _FAMILIES:
        raise ConversionError(
            f"glm family {family}({link}) is not supported (gaussian identity, binomial logit, poisson log are)"
        )
    frame = obj.get("model")
    factors = _factor_levels(obj)
    intercept = 0.0
    predictors: list[str] = []
    weights: list[float] = []
    # factor -> coefficient per level, in level order; the reference level (the first) adds 0
    by_level = {f: [0.0] * len(levels) for f, levels in factors.items()}
    level_terms = {f"{f}{level}": (f, k) for f, levels in factors.items() for k, level in enumerate(levels) if k > 0}
    for name, b in zip(names, beta, strict=True):
        if name == "(Intercept)":
            intercept = float(b)
        elif ":" in name:
            raise ConversionError(
                f"lm/glm term {name!r} is an interaction: interactions (x:z, x*z) are not supported;"
                " refit with main effects, or compute the product as a column before fitting"
            )
        elif name in level_terms:
            factor, k = level_terms[name]
            by_level[factor][k] = float(b)
        elif frame is not None and _SYNTACTIC.match(name) and name in getattr(frame, "columns", []):
            predictors.append(name)
            weights.append(float(b))
        else:
            raise ConversionError(
                f"lm/glm term {name!r} is not a plain numeric column or factor level of the model frame "
                "(transformed terms such as log(x) or I(x^2) are not supported)"
            )
    if not predictors and not factors:
        raise ConversionError("lm/glm without predictors has nothing to serve")
    assert frame is not None
    numeric = [Variable(p, None, float(np.min(frame[p])), float(np.max(frame[p]))) for p in predictors]
    variables = numeric + [Variable(f, levels) for f, levels in factors.items()]
    tabular = not factors
    g = GraphBuilder()
    if tabular:
        inputs, _ = _inputs(g, variables, tabular=True)
        eta = g.op("Add", [g.op("MatMul", [INPUT, g.const(np.array(weights).reshape(-1, 1))]), g.const(intercept)])
    else:
        inputs, eta = _factor_terms(g, numeric, weights, factors, by_level, intercept)
    classes: list[str] = []
    if family == "binomial":
        classes = _binomial_classes(frame)
        p = g.op("Sigmoid", [eta])
        probs = g.op("Concat", [g.op("Sub", [g.const(1.0), p]), p], axis=1)
        outputs = _class_outputs(g, probs, classes, probs)
        kind = "classification"
    else:
        outputs = _regression_outputs(g, g.op("Exp", [eta]) if link == "log" else eta)
        kind = "regression"
    model = g.model(inputs, outputs, name=f"r_{'glm' if is_glm else 'lm'}")
    reference = _RReference(path, variables, tabular, "glm" if is_glm else "lm", classes)
    label = f"glm {family}({link})" if is_glm else "lm"
    conversion = _conversion(model, variables, tabular, kind, classes, reference, label)
    if factors:
        conversion.notes.append(
            f"factors {', '.join(factors)}: BYTES inputs of their levels (treatment contrasts); a level the"
            " model was not fitted with answers NaN, where R's predict() stops with 'factor has new levels'"
        )
    return conversion


def _factor_levels(obj: dict[str, Any]) -> dict[str, list[str]]:
    """The factor predictors of an lm/glm and their levels (xlevels), checked to be treatment-coded columns."""
    xlevels = obj.get("xlevels") or {}
    contrasts = obj.get("contrasts") or {}
    out: dict[str, list[str]] = {}
    for name, levels in xlevels.items():
        factor = str(name)
        if not _SYNTACTIC.match(factor):
            raise ConversionError(
                f"lm/glm factor {factor!r} is computed in the formula: make the column a factor in the data"
                " frame before fitting (d$x <- factor(d$x)), so clients can send its levels by column name"
            )
        coding = contrasts.get(name, "contr.treatment")
        coding_text = str(np.asarray(coding).ravel()[0]) if np.asarray(coding).size == 1 else "a contrast matrix"
        if coding_text != "contr.treatment":
            raise ConversionError(
                f"lm/glm factor {factor!r} is coded with {coding_text}: only treatment contrasts (R's default for"
                f" unordered factors) are supported; refit with contrasts = list({factor} = 'contr.treatment')"
            )
        out[factor] = [str(v) for v in np.asarray(levels).ravel()]
    return out


def _factor_terms(
    g: GraphBuilder,
    numeric: list[Variable],
    weights: list[float],
    factors: dict[str, list[str]],
    by_level: dict[str, list[float]],
    intercept: float,
) -> tuple[list[onnx.ValueInfoProto], str]:
    """One input per column (factors as BYTES) and the linear predictor eta [N, 1].

    A factor's treatment-coded columns times their coefficients is one lookup: level -> its
    coefficient (0 for the reference level), NaN for a level the model never saw.
    """
    inputs = [helper.make_tensor_value_info(v.name, TensorProto.FLOAT, [None, 1]) for v in numeric]
    terms = [g.op("Mul", [v.name, g.const(w)]) for v, w in zip(numeric, weights, strict=True)]
    for factor, levels in factors.items():
        inputs.append(helper.make_tensor_value_info(factor, TensorProto.STRING, [None, 1]))
        terms.append(
            g.op(
                "LabelEncoder",
                [factor],
                hint="level_coefficient",
                domain="ai.onnx.ml",
                keys_strings=levels,
                values_floats=by_level[factor],
                default_float=math.nan,
            )
        )
    eta = g.const(intercept)
    for term in terms:
        eta = g.op("Add", [eta, term])
    return inputs, eta


def _binomial_classes(frame: Any) -> list[str]:
    response = frame[frame.columns[0]]
    categories = getattr(response, "cat", None)
    if categories is not None:  # factor response: the first level is "failure"
        return [str(c) for c in categories.categories]
    values = sorted({float(v) for v in np.asarray(response)})
    if values != [0.0, 1.0]:
        raise ConversionError("binomial glm response must be 0/1 or a two-level factor (proportions are not)")
    return ["0", "1"]


# ---------------------------------------------------------------- graph pieces


def _inputs(g: GraphBuilder, variables: list[Variable], tabular: bool) -> tuple[list[onnx.ValueInfoProto], list[str]]:
    if tabular:
        info = [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, [None, len(variables)])]
        return info, [g.column(INPUT, i) for i in range(len(variables))]
    infos, columns = [], []
    for v in variables:
        if v.levels is None:
            infos.append(helper.make_tensor_value_info(v.name, TensorProto.FLOAT, [None, 1]))
            columns.append(v.name)
        else:
            infos.append(helper.make_tensor_value_info(v.name, TensorProto.STRING, [None, 1]))
            columns.append(
                g.op(
                    "LabelEncoder",
                    [v.name],
                    hint="level",
                    domain="ai.onnx.ml",
                    keys_strings=v.levels,
                    values_floats=[float(i) for i in range(len(v.levels))],
                    default_float=math.nan,
                )
            )
    return infos, columns


def _regression_outputs(g: GraphBuilder, values: str) -> list[onnx.ValueInfoProto]:
    g.identity(g.flatten_col(values), PREDICTION)
    return [helper.make_tensor_value_info(PREDICTION, TensorProto.FLOAT, [None])]


def _integer_labels(classes: list[str]) -> bool:
    return all(c.lstrip("-").isdigit() for c in classes)


def _class_outputs(g: GraphBuilder, probs: str, classes: list[str], scores: str) -> list[onnx.ValueInfoProto]:
    g.identity(probs, PROBABILITIES)
    winner = g.op("ArgMax", [scores], axis=1, keepdims=0)
    integer = _integer_labels(classes)
    table = (
        g.const([int(c) for c in classes], dtype=np.int64)
        if integer
        else g.const(np.array(classes, dtype=object), dtype=object)
    )
    g.identity(g.op("Gather", [table, winner], axis=0), LABEL)
    return [
        helper.make_tensor_value_info(LABEL, TensorProto.INT64 if integer else TensorProto.STRING, [None]),
        helper.make_tensor_value_info(PROBABILITIES, TensorProto.FLOAT, [None, len(classes)]),
    ]


def _conversion(
    model: onnx.ModelProto,
    variables: list[Variable],
    tabular: bool,
    kind: str,
    classes: list[str],
    reference: _RReference,
    label: str,
) -> Conversion:
    specs_in = (
        [TensorSpec(INPUT, "FP32", (-1, len(variables)))]
        if tabular
        else [TensorSpec(v.name, "BYTES" if v.levels else "FP32", (-1, 1)) for v in variables]
    )
    task: Task = "classification" if kind == "classification" else "regression"
    specs_out = (
        [TensorSpec(PREDICTION, "FP32", (-1,))]
        if task == "regression"
        else [
            TensorSpec(LABEL, "INT64" if _integer_labels(classes) else "BYTES", (-1,)),
            TensorSpec(PROBABILITIES, "FP32", (-1, len(classes))),
        ]
    )
    return Conversion(
        model=model,
        inputs=specs_in,
        outputs=specs_out,
        task=task,
        framework="rdata",
        predict_native=reference.predict,
        labels=classes or None,
        make_sample=_sampler(variables, tabular),
        library_versions={"onnx": onnx.__version__, **_rdata_version()},
        notes=[f"R {label}; reference: R's predict() through Rscript"],
        input_columns=[v.name for v in variables] if tabular else None,
        column_inputs=not tabular,
        categories={v.name: list(v.levels) for v in variables if v.levels},
    )


def _rdata_version() -> dict[str, str]:
    try:
        from importlib.metadata import version

        return {"rdata": version("rdata")}
    except Exception:  # metadata is informative only
        return {}


def _sampler(variables: list[Variable], tabular: bool) -> Callable[[int, np.random.Generator], Rows]:
    def sample(n: int, rng: np.random.Generator) -> Rows:
        cols: dict[str, np.ndarray] = {}
        for v in variables:
            if v.levels is not None:
                cols[v.name] = np.array(rng.choice(v.levels, size=n), dtype=object)
            else:
                cols[v.name] = rng.uniform(v.low, v.high, size=n).astype(np.float32)
        if tabular:
            return {INPUT: np.stack([cols[v.name] for v in variables], axis=1).astype(np.float32)}
        return {name: col.reshape(-1, 1) for name, col in cols.items()}

    return sample


# ---------------------------------------------------------------- reference: R itself


_R_SCRIPT = r"""
args <- commandArgs(trailingOnly = TRUE)
kind <- args[3]
if (kind == "forest") suppressPackageStartupMessages(library(randomForest))
m <- readRDS(args[1])
d <- read.csv(args[2], colClasses = "character", check.names = FALSE)
for (v in names(d)) {
  lv <- if (kind == "forest") m$forest$xlevels[[v]] else m$xlevels[[v]]
  d[[v]] <- if (is.character(lv)) factor(d[[v]], levels = lv) else as.numeric(d[[v]])
}
if (kind == "forest" && is.null(m$terms)) d <- as.matrix(d)
p <- if (kind == "forest" && m$type == "classification") predict(m, d, type = "prob") else
  predict(m, d, type = "response")
cells <- apply(as.matrix(p), 1, function(r) paste(sprintf("%.17g", r), collapse = "\t"))
if (kind == "forest" && m$type == "classification")  # R's own label: votes over cutoff, random ties
  cells <- paste(cells, as.character(predict(m, d, type = "response")), sep = "\t")
writeLines(cells)
"""


def _number(cell: str) -> float:
    return math.nan if cell == "NA" else float(cell)


class _RReference:
    def __init__(self, path: Path, variables: list[Variable], tabular: bool, kind: str, classes: list[str]) -> None:
        self._path = path
        self._variables = variables
        self._tabular = tabular
        self._kind = kind
        self._classes = classes

    def predict(self, rows: Rows) -> Rows:
        rscript = shutil.which("Rscript")
        if rscript is None:
            raise ConversionError(
                "the parity check of R models runs R's own predict(): install R "
                "(Debian: r-base-core, r-cran-randomforest)"
            )
        with tempfile.TemporaryDirectory() as tmp:
            data = Path(tmp) / "rows.csv"
            data.write_text(self._csv(rows))
            script = Path(tmp) / "predict.R"
            script.write_text(_R_SCRIPT)
            done = subprocess.run(
                [rscript, "--vanilla", str(script), str(self._path), str(data), self._kind],
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )
        if done.returncode != 0:
            raise ConversionError(f"R failed to predict with {self._path}: {done.stderr.strip()[-2000:]}")
        lines = [line.split("\t") for line in done.stdout.splitlines() if line]
        if not self._classes:  # NA: a factor level the model never saw (the served model answers NaN)
            return {PREDICTION: np.array([_number(r[0]) for r in lines], dtype=np.float32)}
        if self._kind == "forest":
            probs = np.array([[float(x) for x in r[:-1]] for r in lines], dtype=np.float64)
            names = [r[-1] for r in lines]
        else:  # binomial glm: R gives P(second class); the label is the likelier class
            p = np.array([_number(r[0]) for r in lines], dtype=np.float64)
            probs = np.stack([1 - p, p], axis=1)
            names = [self._classes[i] for i in np.argmax(probs, axis=1)]
        labels: np.ndarray = (
            np.array([int(n) for n in names], dtype=np.int64)
            if _integer_labels(self._classes)
            else np.array(names, dtype=object)
        )
        return {LABEL: labels, PROBABILITIES: probs.astype(np.float32)}

    def _csv(self, rows: Rows) -> str:
        columns: list[list[str]] = []
        for i, v in enumerate(self._variables):
            col = rows[INPUT][:, i] if self._tabular else np.asarray(rows[v.name]).reshape(-1)
            if v.levels is not None:
                columns.append(['"' + (x.decode() if isinstance(x, bytes) else str(x)) + '"' for x in col])
            else:  # repr of the float32 value as a double: R reads exactly the served value
                columns.append([repr(float(x)) for x in col])
        header = ",".join(f'"{v.name}"' for v in self._variables)
        return "\n".join([header, *(",".join(r) for r in zip(*columns, strict=True))]) + "\n"


# the name `converters.CONVERTERS` looks up (`convert_<module>`)
convert_rdata = convert_rds

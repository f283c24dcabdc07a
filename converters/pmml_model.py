"""PMML documents compiled into ONNX: fields, transformations, RegressionModel, TreeModel, MiningModel.

Every field becomes one float32 column [N, 1] inside the graph: numeric fields carry their value,
string fields the index of their category (LabelEncoder; unknown categories become NaN, which the
trees treat as missing). Trees are compiled into binary `Split`/`Leaf` trees that follow PMML's
three-valued predicate logic and the model's missingValueStrategy/noTrueChildStrategy, and then
emitted as one TreeEnsembleRegressor per ensemble.
"""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from onnxgate.converters.base import ConversionError
from onnxgate.converters.pmml_onnx import GraphBuilder, Leaf, Split, Tree, float32_threshold

MODEL_TAGS = ("RegressionModel", "TreeModel", "MiningModel")
OTHER_MODEL_TAGS = (
    "AnomalyDetectionModel",
    "AssociationModel",
    "BayesianNetworkModel",
    "BaselineModel",
    "ClusteringModel",
    "GaussianProcessModel",
    "GeneralRegressionModel",
    "NaiveBayesModel",
    "NearestNeighborModel",
    "NeuralNetwork",
    "RuleSetModel",
    "SequenceModel",
    "Scorecard",
    "SupportVectorMachineModel",
    "TextModel",
    "TimeSeriesModel",
)
PREDICATE_TAGS = ("SimplePredicate", "SimpleSetPredicate", "CompoundPredicate", "True", "False")
NUMERIC_TYPES = ("double", "float", "integer", "boolean")


def local(tag: str) -> str:
    """Tag without its namespace: PMML 3.x-4.4 documents differ only in the namespace URI."""
    return tag.rsplit("}", 1)[-1]


def children(elem: ET.Element, tag: str) -> list[ET.Element]:
    return [c for c in elem if local(c.tag) == tag]


def child(elem: ET.Element, tag: str) -> ET.Element | None:
    found = children(elem, tag)
    return found[0] if found else None


def fnum(elem: ET.Element, attr: str, default: float | None = None) -> float:
    raw = elem.get(attr)
    if raw is None:
        if default is None:
            raise ConversionError(f"PMML <{local(elem.tag)}> lacks the attribute {attr!r}")
        return default
    try:
        return float(raw)
    except ValueError as exc:
        raise ConversionError(f"PMML <{local(elem.tag)} {attr}={raw!r}> is not a number") from exc


@dataclass(frozen=True)
class DataField:
    name: str
    optype: str
    data_type: str
    values: list[str]  # valid categories in document order
    intervals: list[tuple[float, float]]

    @property
    def is_string(self) -> bool:
        return self.data_type not in NUMERIC_TYPES


@dataclass(frozen=True)
class Field:
    """A field as the graph sees it: a float32 [N, 1] column."""

    column: str
    categories: list[str] | None = None  # string fields: the column holds the category index


@dataclass
class Result:
    """What one model computes: a value [N] (regression) or probabilities [N, C] (classification)."""

    value: str | None = None
    probabilities: str | None = None
    classes: list[str] = field(default_factory=list)


@dataclass
class Context:
    g: GraphBuilder
    fields: dict[str, Field]
    dictionary: dict[str, DataField]
    # thresholds seen per field: the sample generator uses them when the dictionary has no range
    thresholds: dict[str, list[float]] = field(default_factory=dict)

    def with_fields(self, fields: dict[str, Field]) -> Context:
        return replace(self, fields=fields)

    def get(self, name: str, where: str) -> Field:
        if name not in self.fields:
            raise ConversionError(f"PMML {where} refers to the field {name!r}, which is not defined before it")
        return self.fields[name]


# ---------------------------------------------------------------- transformations


_BINARY = {"+": "Add", "-": "Sub", "*": "Mul", "/": "Div", "pow": "Pow", "min": "Min", "max": "Max"}
_UNARY = {"exp": "Exp", "ln": "Log", "sqrt": "Sqrt", "abs": "Abs", "floor": "Floor", "ceil": "Ceil", "round": "Round"}


def expression(ctx: Context, elem: ET.Element) -> Field:
    """Compile a DerivedField/OutputField expression into a column."""
    tag = local(elem.tag)
    g = ctx.g
    if tag == "FieldRef":
        return ctx.get(elem.get("field", ""), "<FieldRef>")
    if tag == "Constant":
        value = _constant(elem)
        return Field(g.op("Expand", [g.const([[value]]), _shape_like(ctx)], hint="const"))
    if tag == "Apply":
        function = elem.get("function", "")
        args = [expression(ctx, a) for a in elem if local(a.tag) != "Extension"]
        if any(a.categories is not None for a in args):
            raise ConversionError(f"PMML <Apply function={function!r}> on a string field is not supported")
        cols = [a.column for a in args]
        if function in _BINARY and len(cols) >= 2:
            out = cols[0]
            for other in cols[1:]:
                out = g.op(_BINARY[function], [out, other])
            return Field(out)
        if function in _UNARY and len(cols) == 1:
            return Field(g.op(_UNARY[function], cols))
        if function == "log10" and len(cols) == 1:
            return Field(g.op("Div", [g.op("Log", cols), g.const(math.log(10.0))]))
        raise ConversionError(f"PMML <Apply function={function!r}> with {len(cols)} arguments is not supported")
    raise ConversionError(f"PMML expression <{tag}> is not supported (FieldRef, Constant and arithmetic Apply are)")


def _constant(elem: ET.Element) -> float:
    try:
        return float((elem.text or "").strip())
    except ValueError as exc:
        raise ConversionError(f"PMML <Constant>{elem.text}</Constant> is not numeric") from exc


def _shape_like(ctx: Context) -> str:
    """[N, 1] shape of the batch, taken from any field column."""
    any_column = next(iter(ctx.fields.values())).column
    return ctx.g.op("Shape", [any_column])


def apply_transformations(ctx: Context, container: ET.Element | None) -> Context:
    if container is None:
        return ctx
    fields = dict(ctx.fields)
    scoped = ctx.with_fields(fields)
    for derived in children(container, "DerivedField"):
        exprs = [e for e in derived if local(e.tag) not in ("Extension", "Value")]
        if len(exprs) != 1:
            raise ConversionError(f"PMML <DerivedField name={derived.get('name')!r}> has no expression")
        fields[derived.get("name", "")] = expression(scoped, exprs[0])
    return scoped


# ---------------------------------------------------------------- predicates -> splits


def compile_predicate(ctx: Context, pred: ET.Element, t: Tree, f: Tree, u: Tree) -> Tree:
    """A tree that reaches `t` when `pred` is TRUE, `f` when FALSE and `u` when UNKNOWN (missing input)."""
    tag = local(pred.tag)
    if tag == "True":
        return t
    if tag == "False":
        return f
    if tag == "SimplePredicate":
        return _simple(ctx, pred, t, f, u)
    if tag == "SimpleSetPredicate":
        return _set(ctx, pred, t, f, u)
    if tag == "CompoundPredicate":
        return _compound(ctx, pred, t, f, u)
    raise ConversionError(f"PMML predicate <{tag}> is not supported")


_OPS = {
    "lessThan": "BRANCH_LT",
    "lessOrEqual": "BRANCH_LEQ",
    "greaterThan": "BRANCH_GT",
    "greaterOrEqual": "BRANCH_GTE",
    "equal": "BRANCH_EQ",
    "notEqual": "BRANCH_NEQ",
}


def _present(column: str, present: Tree, missing: Tree) -> Tree:
    # x <= +inf holds for every number and fails only for NaN, the graph's missing value
    return Split(column, "BRANCH_LEQ", math.inf, False, present, missing)


def _single(column: str, mode: str, threshold: float, t: Tree, f: Tree, u: Tree) -> Tree:
    """One comparison; a missing value goes to `u`, directly when `u` is one of the branches."""
    if u is f or u == f:
        return Split(column, mode, threshold, False, t, f)
    if u is t or u == t:
        return Split(column, mode, threshold, True, t, f)
    return _present(column, Split(column, mode, threshold, False, t, f), u)


def _category_index(fld: Field, value: str) -> float:
    assert fld.categories is not None
    if value in fld.categories:
        return float(fld.categories.index(value))
    return math.nan  # a category the field never takes: equality never holds


def _simple(ctx: Context, pred: ET.Element, t: Tree, f: Tree, u: Tree) -> Tree:
    name = pred.get("field", "")
    op = pred.get("operator", "")
    fld = ctx.get(name, "<SimplePredicate>")
    if op == "isMissing":
        return _present(fld.column, f, t)
    if op == "isNotMissing":
        return _present(fld.column, t, f)
    if op not in _OPS:
        raise ConversionError(f"PMML <SimplePredicate operator={op!r}> is not supported")
    raw = pred.get("value")
    if raw is None:
        raise ConversionError(f"PMML <SimplePredicate field={name!r} operator={op!r}> has no value")
    mode = _OPS[op]
    if fld.categories is not None:
        if mode not in ("BRANCH_EQ", "BRANCH_NEQ"):
            raise ConversionError(f"PMML <SimplePredicate operator={op!r}> on the string field {name!r}")
        index = _category_index(fld, raw)
        if math.isnan(index):  # never equal: the predicate is constant unless the value is missing
            return _present(fld.column, f if mode == "BRANCH_EQ" else t, u)
        return _single(fld.column, mode, index, t, f, u)
    try:
        value = float(raw)
    except ValueError as exc:
        raise ConversionError(f"PMML <SimplePredicate field={name!r} value={raw!r}> is not numeric") from exc
    ctx.thresholds.setdefault(name, []).append(value)
    # compared in double, as pypmml (the reference) does even for dataType="float" fields
    return _single(fld.column, mode, float32_threshold(mode, value), t, f, u)


def _array_values(elem: ET.Element) -> list[str]:
    array = child(elem, "Array")
    if array is None:
        raise ConversionError("PMML <SimpleSetPredicate> has no <Array>")
    text = array.text or ""
    values: list[str] = []
    # tokens are space separated; double quotes protect values that contain spaces
    token, quoted, have = [], False, False
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == '"':
            quoted, have = not quoted, True
        elif ch == "\\" and quoted and i + 1 < len(text):
            i += 1
            token.append(text[i])
        elif ch.isspace() and not quoted:
            if have or token:
                values.append("".join(token))
            token, have = [], False
        else:
            token.append(ch)
            have = True
        i += 1
    if have or token:
        values.append("".join(token))
    return values


def _set(ctx: Context, pred: ET.Element, t: Tree, f: Tree, u: Tree) -> Tree:
    name = pred.get("field", "")
    fld = ctx.get(name, "<SimpleSetPredicate>")
    is_in = pred.get("booleanOperator", "isIn") == "isIn"
    values = _array_values(pred)
    if fld.categories is not None:
        points = [_category_index(fld, v) for v in values]
    else:
        try:
            points = [float(v) for v in values]
        except ValueError as exc:
            raise ConversionError(f"PMML <SimpleSetPredicate field={name!r}> has non-numeric values") from exc
    points = [p for p in points if not math.isnan(p)]
    inside, outside = (t, f) if is_in else (f, t)
    chain: Tree = outside
    for point in reversed(points):  # a chain of equality tests, one per member
        chain = Split(fld.column, "BRANCH_EQ", point, False, inside, chain)
    return _present(fld.column, chain, u)


def _compound(ctx: Context, pred: ET.Element, t: Tree, f: Tree, u: Tree) -> Tree:
    op = pred.get("booleanOperator", "")
    parts = [p for p in pred if local(p.tag) in PREDICATE_TAGS]
    if not parts:
        raise ConversionError("PMML <CompoundPredicate> has no predicates")
    if op == "and":
        return _and(ctx, parts, t, f, u)
    if op == "or":
        return _or(ctx, parts, t, f, u)
    if op == "surrogate":
        return _surrogate(ctx, parts, t, f, u)
    raise ConversionError(f"PMML <CompoundPredicate booleanOperator={op!r}> is not supported")


def _and(ctx: Context, parts: list[ET.Element], t: Tree, f: Tree, u: Tree) -> Tree:
    if len(parts) == 1:
        return compile_predicate(ctx, parts[0], t, f, u)
    rest = parts[1:]
    # FALSE wins; TRUE defers to the rest; UNKNOWN stays unknown unless the rest is FALSE
    return compile_predicate(ctx, parts[0], _and(ctx, rest, t, f, u), f, _and(ctx, rest, u, f, u))


def _or(ctx: Context, parts: list[ET.Element], t: Tree, f: Tree, u: Tree) -> Tree:
    if len(parts) == 1:
        return compile_predicate(ctx, parts[0], t, f, u)
    rest = parts[1:]
    return compile_predicate(ctx, parts[0], t, _or(ctx, rest, t, f, u), _or(ctx, rest, t, u, u))


def _surrogate(ctx: Context, parts: list[ET.Element], t: Tree, f: Tree, u: Tree) -> Tree:
    if len(parts) == 1:
        return compile_predicate(ctx, parts[0], t, f, u)
    return compile_predicate(ctx, parts[0], t, f, _surrogate(ctx, parts[1:], t, f, u))


# ---------------------------------------------------------------- TreeModel -> Tree


LeafValue = Callable[[ET.Element], tuple[float, ...]]


def predicate_of(node: ET.Element) -> ET.Element:
    for c in node:
        if local(c.tag) in PREDICATE_TAGS:
            return c
    raise ConversionError(f"PMML <Node id={node.get('id')!r}> has no predicate")


def compile_tree(ctx: Context, model: ET.Element, leaf_value: LeafValue, width: int) -> Tree:
    missing = model.get("missingValueStrategy", "none")
    no_true = model.get("noTrueChildStrategy", "returnNullPrediction")
    if missing not in ("none", "lastPrediction", "nullPrediction", "defaultChild"):
        raise ConversionError(f"PMML <TreeModel missingValueStrategy={missing!r}> is not supported")
    if model.get("splitCharacteristic", "multiSplit") not in ("binarySplit", "multiSplit"):
        raise ConversionError("PMML <TreeModel splitCharacteristic> must be binarySplit or multiSplit")
    null = Leaf(tuple([math.nan] * width))
    root = child(model, "Node")
    if root is None:
        raise ConversionError("PMML <TreeModel> has no <Node>")

    def score(node: ET.Element) -> Tree:
        return (
            Leaf(leaf_value(node))
            if node.get("score") is not None or child(node, "ScoreDistribution") is not None
            else null
        )

    def build(node: ET.Element) -> Tree:
        if child(node, "EmbeddedModel") is not None:
            raise ConversionError("PMML <Node> with <EmbeddedModel> is not supported")
        kids = children(node, "Node")
        if not kids:
            return score(node)
        last = score(node)
        if missing == "defaultChild":
            default_id = node.get("defaultChild")
            default = next((k for k in kids if k.get("id") == default_id), None)
            if default is None:
                raise ConversionError(f"PMML <Node id={node.get('id')!r}> names no valid defaultChild")
            on_unknown: Tree | None = build(default)
        else:
            on_unknown = {"lastPrediction": last, "nullPrediction": null}.get(missing)
        otherwise = last if no_true == "returnLastPrediction" else null
        result: Tree = otherwise
        for kid in reversed(kids):  # "first TRUE child wins" as a chain of binary splits
            unknown = result if on_unknown is None else on_unknown  # strategy none: UNKNOWN is FALSE
            result = compile_predicate(ctx, predicate_of(kid), build(kid), result, unknown)
        # the root's own predicate is evaluated too (it is almost always <True/>)
        return result

    tree = build(root)
    return compile_predicate(ctx, predicate_of(root), tree, null, null)


def distribution(classes: list[str]) -> LeafValue:
    """Class probabilities of a node: ScoreDistribution probabilities or record counts, else its score."""

    def value(node: ET.Element) -> tuple[float, ...]:
        out = [0.0] * len(classes)
        dists = children(node, "ScoreDistribution")
        if dists:
            counts = {d.get("value", ""): d for d in dists}
            total = sum(fnum(d, "recordCount", 0.0) for d in dists)
            for label, d in counts.items():
                if label not in classes:
                    raise ConversionError(f"PMML <ScoreDistribution value={label!r}> is not a class of the target")
                if d.get("probability") is not None:
                    out[classes.index(label)] = fnum(d, "probability")
                elif total > 0:
                    out[classes.index(label)] = fnum(d, "recordCount") / total
            return tuple(out)
        return vote(classes)(node)

    return value


def vote(classes: list[str]) -> LeafValue:
    def value(node: ET.Element) -> tuple[float, ...]:
        label = node.get("score", "")
        if label not in classes:
            raise ConversionError(f"PMML <Node score={label!r}> is not a class of the target")
        return tuple(1.0 if c == label else 0.0 for c in classes)

    return value


def regression_leaf(node: ET.Element) -> tuple[float, ...]:
    return (fnum(node, "score"),)

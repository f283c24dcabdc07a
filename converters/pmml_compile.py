"""PMML models (RegressionModel, TreeModel, MiningModel) compiled into ONNX subgraphs."""

from __future__ import annotations

import contextlib
import math
import xml.etree.ElementTree as ET
from dataclasses import dataclass

import numpy as np

from onnxgate.converters.base import ConversionError
from onnxgate.converters.pmml_model import (
    MODEL_TAGS,
    OTHER_MODEL_TAGS,
    Context,
    Field,
    LeafValue,
    Result,
    apply_transformations,
    child,
    children,
    compile_tree,
    distribution,
    expression,
    fnum,
    local,
    regression_leaf,
    vote,
)
from onnxgate.converters.pmml_onnx import GraphBuilder, Tree, scale_tree, tree_features


def model_elements(parent: ET.Element) -> list[ET.Element]:
    return [c for c in parent if local(c.tag) in MODEL_TAGS or local(c.tag) in OTHER_MODEL_TAGS]


def target_name(model: ET.Element) -> str | None:
    schema = child(model, "MiningSchema")
    if schema is None:
        return None
    for mf in children(schema, "MiningField"):
        if mf.get("usageType") in ("target", "predicted"):
            return mf.get("name")
    return None


def compile_model(ctx: Context, model: ET.Element, classes: list[str]) -> tuple[Result, dict[str, Field]]:
    """One model's result, and the fields its <Output> defines (for later segments of a model chain)."""
    tag = local(model.tag)
    if tag not in MODEL_TAGS:
        raise ConversionError(f"PMML <{tag}> is not supported; RegressionModel, TreeModel and MiningModel are")
    if model.get("isScorable", "true") == "false":
        raise ConversionError(f"PMML <{tag}> is marked isScorable=false")
    function = model.get("functionName", "")
    if function not in ("regression", "classification"):
        raise ConversionError(f"PMML <{tag} functionName={function!r}> is not supported")
    ctx = apply_transformations(ctx, child(model, "LocalTransformations"))
    if tag == "RegressionModel":
        result = regression_model(ctx, model, function, classes)
    elif tag == "TreeModel":
        result = tree_model(ctx, model, function, classes)
    else:
        result = mining_model(ctx, model, function, classes)
    result = apply_targets(ctx, model, result)
    return result, output_fields(ctx, model, result)


# ---------------------------------------------------------------- Targets and Output


def apply_targets(ctx: Context, model: ET.Element, result: Result) -> Result:
    targets = child(model, "Targets")
    if targets is None:
        return result
    g = ctx.g
    for target in children(targets, "Target"):
        rescaled = any(target.get(a) is not None for a in ("rescaleFactor", "rescaleConstant", "min", "max"))
        if result.value is None:
            if rescaled:
                raise ConversionError("PMML <Target> rescaling on a classification model is not supported")
            continue
        if target.get("castInteger") is not None:
            raise ConversionError("PMML <Target castInteger> is not supported")
        value = result.value
        if target.get("min") is not None or target.get("max") is not None:
            low = fnum(target, "min", -math.inf)
            high = fnum(target, "max", math.inf)
            value = g.op("Clip", [value, g.const(low), g.const(high)])
        value = g.op("Mul", [value, g.const(fnum(target, "rescaleFactor", 1.0))])
        value = g.op("Add", [value, g.const(fnum(target, "rescaleConstant", 0.0))])
        result = Result(value=value)
    return result


def output_fields(ctx: Context, model: ET.Element, result: Result) -> dict[str, Field]:
    """Fields a model's <Output> defines; features this converter cannot compute are left undefined,
    so a later reference to one fails with a clear message instead of a wrong value."""
    output = child(model, "Output")
    defined: dict[str, Field] = {}
    if output is None:
        return defined
    g = ctx.g
    scoped = ctx.with_fields(dict(ctx.fields))
    for of in children(output, "OutputField"):
        name = of.get("name", "")
        feature = of.get("feature", "predictedValue")
        column: str | None = None
        if feature == "predictedValue" and result.value is not None:
            column = g.op("Unsqueeze", [result.value, g.const([1], dtype=np.int64)])
        elif feature == "probability" and result.probabilities is not None:
            label = of.get("value")
            if label in result.classes:
                column = g.column(result.probabilities, result.classes.index(label))
        elif feature == "transformedValue":
            exprs = [e for e in of if local(e.tag) not in ("Extension", "Decisions", "Value")]
            if len(exprs) == 1:
                # e.g. JPMML-SparkML's MapValues from a label back to Spark's index: left undefined, per above
                with contextlib.suppress(ConversionError):
                    column = expression(scoped, exprs[0]).column
        if column is not None:
            defined[name] = Field(column)
            scoped.fields[name] = defined[name]
    return defined


# ---------------------------------------------------------------- RegressionModel


@dataclass
class _Terms:
    columns: list[str]
    keys: list[tuple[str, ...]]

    def index(self, key: tuple[str, ...], make: str) -> int:
        if key not in self.keys:
            self.keys.append(key)
            self.columns.append(make)
        return self.keys.index(key)


def regression_model(ctx: Context, model: ET.Element, function: str, classes: list[str]) -> Result:
    g = ctx.g
    tables = children(model, "RegressionTable")
    if not tables:
        raise ConversionError("PMML <RegressionModel> has no <RegressionTable>")
    terms = _Terms([], [])
    coefficients: list[dict[int, float]] = []
    for table in tables:
        row: dict[int, float] = {}
        for pred in table:
            tag = local(pred.tag)
            if tag == "Extension":
                continue
            key, column = _term(ctx, pred)
            idx = terms.index(key, column)
            row[idx] = row.get(idx, 0.0) + fnum(pred, "coefficient")
        coefficients.append(row)
    intercepts = [fnum(t, "intercept", 0.0) for t in tables]
    k = len(tables)
    if terms.columns:
        weights = np.zeros((len(terms.columns), k), dtype=np.float32)
        for j, row in enumerate(coefficients):
            for i, c in row.items():
                weights[i, j] = c
        matrix = terms.columns[0] if len(terms.columns) == 1 else g.op("Concat", terms.columns, axis=1)
        raw = g.op("Add", [g.op("MatMul", [matrix, g.const(weights)]), g.const(np.array(intercepts))])
    else:  # an intercept-only model still needs one row per input row
        zeros = g.op("Mul", [next(iter(ctx.fields.values())).column, g.const(0.0)])
        raw = g.op(
            "Add", [g.op("Where", [g.op("IsNaN", [zeros]), g.const(0.0), zeros]), g.const(np.array([intercepts]))]
        )
    method = model.get("normalizationMethod", "none")
    if function == "regression":
        if k != 1:
            raise ConversionError("PMML regression <RegressionModel> must have exactly one <RegressionTable>")
        return Result(value=g.flatten_col(_regression_norm(g, raw, method)))
    return _classification_norm(ctx, model, tables, raw, method, classes)


def _term(ctx: Context, pred: ET.Element) -> tuple[tuple[str, ...], str]:
    g = ctx.g
    tag = local(pred.tag)
    if tag == "NumericPredictor":
        name = pred.get("name", "")
        fld = ctx.get(name, "<NumericPredictor>")
        exponent = fnum(pred, "exponent", 1.0)
        column = fld.column if exponent == 1.0 else g.op("Pow", [fld.column, g.const(exponent)])
        return ("num", name, str(exponent)), column
    if tag == "CategoricalPredictor":
        name, value = pred.get("name", ""), pred.get("value", "")
        fld = ctx.get(name, "<CategoricalPredictor>")
        point = (
            float(fld.categories.index(value))
            if fld.categories is not None and value in fld.categories
            else (math.nan if fld.categories is not None else float(value))
        )
        hit = g.op("Cast", [g.op("Equal", [fld.column, g.const(point)])], to=1)
        return ("cat", name, value), hit
    if tag == "PredictorTerm":
        refs = [r.get("field", "") for r in children(pred, "FieldRef")]
        if not refs:
            raise ConversionError("PMML <PredictorTerm> has no <FieldRef>")
        column = ctx.get(refs[0], "<PredictorTerm>").column
        for ref in refs[1:]:
            column = g.op("Mul", [column, ctx.get(ref, "<PredictorTerm>").column])
        return ("term", *refs), column
    raise ConversionError(f"PMML <{tag}> inside <RegressionTable> is not supported")


def _regression_norm(g: GraphBuilder, raw: str, method: str) -> str:
    if method == "none":
        return raw
    if method == "logit":
        return g.op("Sigmoid", [raw])
    if method == "exp":
        return g.op("Exp", [raw])
    if method == "softplus":
        return g.op("Softplus", [raw])
    raise ConversionError(f"PMML regression <RegressionModel normalizationMethod={method!r}> is not supported")


def _classification_norm(
    ctx: Context, model: ET.Element, tables: list[ET.Element], raw: str, method: str, classes: list[str]
) -> Result:
    g = ctx.g
    order = [t.get("targetCategory", "") for t in tables]
    if not classes:
        classes = list(order)
    if sorted(order) != sorted(classes):
        raise ConversionError(f"PMML <RegressionTable> categories {order} differ from the target's {classes}")
    k = len(tables)
    if method == "softmax":
        probs = g.op("Softmax", [raw], axis=1)
    elif method == "simplemax":
        probs = g.op("Div", [raw, g.op("ReduceSum", [raw, g.const([1], dtype=np.int64)], keepdims=1)])
    elif method in ("logit", "none") and k >= 2:
        # PMML: the first k-1 tables give probabilities, the last category gets what is left
        head = g.op(
            "Slice", [raw, g.const([0], dtype=np.int64), g.const([k - 1], dtype=np.int64), g.const([1], dtype=np.int64)]
        )
        if method == "logit":
            head = g.op("Sigmoid", [head])
        rest = g.op("Sub", [g.const(1.0), g.op("ReduceSum", [head, g.const([1], dtype=np.int64)], keepdims=1)])
        probs = g.op("Concat", [head, rest], axis=1)
    else:
        raise ConversionError(
            f"PMML classification <RegressionModel normalizationMethod={method!r}> "
            "is not supported (softmax, simplemax, logit and none are)"
        )
    permutation = [order.index(c) for c in classes]
    probs = g.op("Gather", [probs, g.const(permutation, dtype=np.int64)], axis=1)
    return Result(probabilities=probs, classes=list(classes))


# ---------------------------------------------------------------- TreeModel and MiningModel


def tree_model(ctx: Context, model: ET.Element, function: str, classes: list[str]) -> Result:
    if function == "regression":
        return _ensemble(ctx, [compile_tree(ctx, model, regression_leaf, 1)], 1, [0.0], classes=[])
    if not classes:
        raise ConversionError("PMML classification <TreeModel> needs the target's categories in <DataDictionary>")
    tree = compile_tree(ctx, model, distribution(classes), len(classes))
    return _ensemble(ctx, [tree], len(classes), [0.0] * len(classes), classes)


def _ensemble(ctx: Context, trees: list[Tree], width: int, base: list[float], classes: list[str]) -> Result:
    g = ctx.g
    used: dict[str, None] = {}
    for tree in trees:
        tree_features(tree, used)
    columns = list(used) or [next(iter(ctx.fields.values())).column]
    features = columns[0] if len(columns) == 1 else g.op("Concat", columns, axis=1)
    out = g.tree_ensemble(features, trees, width, base, {c: i for i, c in enumerate(columns)})
    if classes:
        return Result(probabilities=out, classes=classes)
    return Result(value=g.flatten_col(out))


_WEIGHTED = {
    "sum": False,
    "average": False,
    "weightedAverage": True,
    "majorityVote": False,
    "weightedMajorityVote": True,
    "weightedSum": True,
}


def mining_model(ctx: Context, model: ET.Element, function: str, classes: list[str]) -> Result:
    segmentation = child(model, "Segmentation")
    if segmentation is None:
        raise ConversionError("PMML <MiningModel> has no <Segmentation>")
    method = segmentation.get("multipleModelMethod", "")
    segments = children(segmentation, "Segment")
    if not segments:
        raise ConversionError("PMML <Segmentation> has no <Segment>")
    parts: list[tuple[ET.Element, float]] = []
    for seg in segments:
        pred = next(
            (
                p
                for p in seg
                if local(p.tag) in ("True", "False", "SimplePredicate", "CompoundPredicate", "SimpleSetPredicate")
            ),
            None,
        )
        if pred is None or local(pred.tag) != "True":
            raise ConversionError("PMML <Segment> predicates other than <True/> are not supported")
        inner = model_elements(seg)
        if len(inner) != 1:
            raise ConversionError("PMML <Segment> must hold exactly one model")
        parts.append((inner[0], fnum(seg, "weight", 1.0)))
    if method == "modelChain":
        return _chain(ctx, parts, classes)
    if method not in _WEIGHTED:
        raise ConversionError(
            f"PMML <Segmentation multipleModelMethod={method!r}> is not supported "
            "(sum, weightedSum, average, weightedAverage, majorityVote, weightedMajorityVote, "
            "modelChain are)"
        )
    voting = method in ("majorityVote", "weightedMajorityVote")
    if function == "regression" and voting:
        raise ConversionError(f"PMML <Segmentation multipleModelMethod={method!r}> on a regression model")
    if function == "classification" and method in ("sum", "weightedSum"):
        raise ConversionError(f"PMML <Segmentation multipleModelMethod={method!r}> on a classification model")
    weights = [w if _WEIGHTED[method] else 1.0 for _, w in parts]
    if method in ("average", "weightedAverage", "majorityVote", "weightedMajorityVote"):
        total = sum(weights)
        weights = [w / total for w in weights]
    return _combine(ctx, parts, weights, function, classes, voting)


def _chain(ctx: Context, parts: list[tuple[ET.Element, float]], classes: list[str]) -> Result:
    fields = dict(ctx.fields)
    result: Result | None = None
    for inner, _ in parts:
        result, defined = compile_model(ctx.with_fields(fields), inner, classes)
        fields.update(defined)
    assert result is not None
    return result


def _foldable(inner: ET.Element) -> bool:
    """A TreeModel whose leaves can go straight into the shared ensemble."""
    return (
        local(inner.tag) == "TreeModel"
        and child(inner, "Targets") is None
        and child(inner, "LocalTransformations") is None
    )


def _combine(
    ctx: Context,
    parts: list[tuple[ET.Element, float]],
    weights: list[float],
    function: str,
    classes: list[str],
    voting: bool,
) -> Result:
    g = ctx.g
    width = 1 if function == "regression" else len(classes)
    if function == "classification" and not classes:
        raise ConversionError("PMML classification <MiningModel> needs the target's categories in <DataDictionary>")
    leaf: LeafValue = (
        regression_leaf if function == "regression" else (vote(classes) if voting else distribution(classes))
    )
    trees: list[Tree] = []
    others: list[str] = []
    for (inner, _), weight in zip(parts, weights, strict=True):
        if _foldable(inner) and inner.get("functionName") == function:
            trees.append(scale_tree(compile_tree(ctx, inner, leaf, width), weight))
            continue
        result, _ = compile_model(ctx, inner, classes)
        if function == "regression":
            assert result.value is not None
            others.append(g.op("Mul", [result.value, g.const(weight)]))
        else:
            assert result.probabilities is not None
            probs = result.probabilities
            if voting:  # a vote is the one-hot of the segment's winning class
                winner = g.op("ArgMax", [probs], axis=1, keepdims=0)
                probs = g.op("OneHot", [winner, g.const(len(classes), dtype=np.int64), g.const([0.0, 1.0])], axis=-1)
            others.append(g.op("Mul", [probs, g.const(weight)]))
    total: str | None = None
    if trees:
        folded = _ensemble(ctx, trees, width, [0.0] * width, classes if function == "classification" else [])
        total = folded.value if function == "regression" else folded.probabilities
    for other in others:
        total = other if total is None else g.op("Add", [total, other])
    assert total is not None
    if function == "regression":
        return Result(value=total)
    return Result(probabilities=total, classes=list(classes))

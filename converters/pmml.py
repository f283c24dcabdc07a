"""PMML -> ONNX: the project's own converter for RegressionModel, TreeModel and MiningModel.

PMML is written by R (pmml, r2pmml), Java (JPMML, e.g. through sklearn2pmml), Spark, KNIME and SAS.
The reference scorer for the parity check is PyPI `pypmml` (a Java PMML evaluator): it scores the
same document, with the top-level <Output> rewritten so that it reports the predicted label and
every class probability under names this module chooses.

Signature: all-numeric inputs become one FP32 `input` [-1, F] in MiningSchema order; as soon as
one active field is a string, every field is its own [-1, 1] tensor named like the field (BYTES
for strings). Missing numeric values are NaN; an unknown or empty category counts as missing.
"""

from __future__ import annotations

import json
import math
import xml.etree.ElementTree as ET
from collections.abc import Callable
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
from onnxgate.converters.pmml_compile import compile_model, model_elements, target_name
from onnxgate.converters.pmml_model import (
    MODEL_TAGS,
    Context,
    DataField,
    Field,
    apply_transformations,
    child,
    children,
    local,
)
from onnxgate.converters.pmml_onnx import GraphBuilder

INPUT = "input"
_LABEL_OUT, _PROB_OUT, _VALUE_OUT = "onnxgate_label", "onnxgate_probability_", "onnxgate_value"


@dataclass(frozen=True)
class InputField:
    name: str
    data: DataField
    replacement: str | None  # MiningField missingValueReplacement


def convert_pmml(path: Path) -> Conversion:
    root = _parse(path)
    dictionary = _data_dictionary(root)
    model = _top_model(root)
    function = model.get("functionName", "")
    fields = _active_fields(model, dictionary)
    if not fields:
        raise ConversionError("PMML <MiningSchema> has no active fields")
    g = GraphBuilder()
    tabular = all(not f.data.is_string for f in fields)
    inputs, columns = _inputs(g, fields, tabular)
    ctx = Context(g, columns, dictionary)
    ctx = apply_transformations(ctx, child(root, "TransformationDictionary"))
    target = target_name(model)
    classes = list(dictionary[target].values) if target in dictionary and function == "classification" else []
    result, _ = compile_model(ctx, model, classes)
    integer_labels = _integer_labels(dictionary.get(target or ""), result.classes)
    outputs = _outputs(g, result.value, result.probabilities, result.classes, integer_labels)
    onnx_model = g.model(inputs, outputs, name=f"pmml_{local(model.tag)}")
    task: Task = "regression" if result.value is not None else "classification"
    specs_in = (
        [TensorSpec(INPUT, "FP32", (-1, len(fields)))]
        if tabular
        else [TensorSpec(f.name, "BYTES" if f.data.is_string else "FP32", (-1, 1)) for f in fields]
    )
    specs_out = (
        [TensorSpec(PREDICTION, "FP32", (-1,))]
        if task == "regression"
        else [
            TensorSpec(LABEL, "INT64" if integer_labels else "BYTES", (-1,)),
            TensorSpec(PROBABILITIES, "FP32", (-1, len(result.classes))),
        ]
    )
    scorer = _Reference(root, model, fields, tabular, result.classes, integer_labels)
    return Conversion(
        model=onnx_model,
        inputs=specs_in,
        outputs=specs_out,
        task=task,
        framework="pmml",
        predict_native=scorer.predict,
        labels=list(result.classes) if task == "classification" else None,
        make_sample=_sampler(fields, tabular, ctx.thresholds),
        library_versions=_versions(root),
        notes=[f"PMML {root.get('version', '?')} {local(model.tag)} ({function}); reference scorer: pypmml"],
        input_columns=[f.name for f in fields] if tabular else None,
        column_inputs=not tabular,
        categories={f.name: list(f.data.values) for f in fields if f.data.is_string},
    )


# ---------------------------------------------------------------- document


def _parse(path: Path) -> ET.Element:
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as exc:
        raise ConversionError(f"{path} is not a well-formed PMML (XML) document: {exc}") from exc
    except OSError as exc:
        raise ConversionError(f"cannot read {path}: {exc}") from exc
    if local(root.tag) != "PMML":
        raise ConversionError(f"{path} is XML but not PMML (root element <{local(root.tag)}>)")
    return root


def _data_dictionary(root: ET.Element) -> dict[str, DataField]:
    dd = child(root, "DataDictionary")
    if dd is None:
        raise ConversionError("PMML document has no <DataDictionary>")
    out: dict[str, DataField] = {}
    for df in children(dd, "DataField"):
        values = [v.get("value", "") for v in children(df, "Value") if v.get("property", "valid") == "valid"]
        intervals = []
        for iv in children(df, "Interval"):
            intervals.append((float(iv.get("leftMargin", "-inf")), float(iv.get("rightMargin", "inf"))))
        name = df.get("name", "")
        out[name] = DataField(name, df.get("optype", "continuous"), df.get("dataType", "double"), values, intervals)
    return out


def _top_model(root: ET.Element) -> ET.Element:
    models = model_elements(root)
    if not models:
        raise ConversionError("PMML document holds no model element")
    model = models[0]
    if local(model.tag) not in MODEL_TAGS:
        raise ConversionError(
            f"PMML <{local(model.tag)}> is not supported; RegressionModel, TreeModel and MiningModel are"
        )
    if model.get("functionName") not in ("regression", "classification"):
        raise ConversionError(
            f"PMML <{local(model.tag)} functionName={model.get('functionName')!r}> is not "
            "supported (regression and classification are)"
        )
    return model


def _active_fields(model: ET.Element, dictionary: dict[str, DataField]) -> list[InputField]:
    schema = child(model, "MiningSchema")
    if schema is None:
        raise ConversionError(f"PMML <{local(model.tag)}> has no <MiningSchema>")
    fields = []
    for mf in children(schema, "MiningField"):
        if mf.get("usageType", "active") != "active":
            continue
        name = mf.get("name", "")
        if name not in dictionary:
            raise ConversionError(f"PMML <MiningField name={name!r}> is not in the <DataDictionary>")
        data = dictionary[name]
        if data.is_string and not data.values:
            raise ConversionError(f"PMML string field {name!r} lists no <Value> categories")
        fields.append(InputField(name, data, mf.get("missingValueReplacement")))
    return fields


def _versions(root: ET.Element) -> dict[str, str]:
    out = {"pmml": root.get("version", "?"), "onnx": onnx.__version__}
    header = child(root, "Header")
    app = child(header, "Application") if header is not None else None
    if app is not None:
        out["pmml_application"] = f"{app.get('name', '?')} {app.get('version', '')}".strip()
    return out


# ---------------------------------------------------------------- inputs and outputs


def _inputs(
    g: GraphBuilder, fields: list[InputField], tabular: bool
) -> tuple[list[onnx.ValueInfoProto], dict[str, Field]]:
    columns: dict[str, Field] = {}
    if tabular:
        infos = [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, [None, len(fields)])]
        for i, f in enumerate(fields):
            columns[f.name] = _replaced(g, f, Field(g.column(INPUT, i)))
        return infos, columns
    infos = []
    for f in fields:
        if f.data.is_string:
            infos.append(helper.make_tensor_value_info(f.name, TensorProto.STRING, [None, 1]))
            index = g.op(
                "LabelEncoder",
                [f.name],
                hint="cat",
                domain="ai.onnx.ml",
                keys_strings=list(f.data.values),
                values_floats=[float(i) for i in range(len(f.data.values))],
                default_float=math.nan,
            )
            columns[f.name] = _replaced(g, f, Field(index, categories=list(f.data.values)))
        else:
            infos.append(helper.make_tensor_value_info(f.name, TensorProto.FLOAT, [None, 1]))
            columns[f.name] = _replaced(g, f, Field(f.name))
    return infos, columns


def _replaced(g: GraphBuilder, f: InputField, fld: Field) -> Field:
    """MiningField missingValueReplacement: NaN (missing, or an unknown category) becomes the replacement."""
    if f.replacement is None:
        return fld
    if fld.categories is not None:
        if f.replacement not in fld.categories:
            raise ConversionError(f"PMML missingValueReplacement {f.replacement!r} is not a category of {f.name!r}")
        value = float(fld.categories.index(f.replacement))
    else:
        value = float(f.replacement)
    column = g.op("Where", [g.op("IsNaN", [fld.column]), g.const(value), fld.column], hint="filled")
    return Field(column, fld.categories)


def _integer_labels(target: DataField | None, classes: list[str]) -> bool:
    if target is None or target.data_type != "integer":
        return False
    try:
        return all(float(c) == int(float(c)) for c in classes)
    except ValueError:
        return False


def _outputs(
    g: GraphBuilder, value: str | None, probabilities: str | None, classes: list[str], integer_labels: bool
) -> list[onnx.ValueInfoProto]:
    if value is not None:
        g.identity(g.op("Cast", [value], to=TensorProto.FLOAT), PREDICTION)
        return [helper.make_tensor_value_info(PREDICTION, TensorProto.FLOAT, [None])]
    assert probabilities is not None
    g.identity(g.op("Cast", [probabilities], to=TensorProto.FLOAT), PROBABILITIES)
    winner = g.op("ArgMax", [PROBABILITIES], axis=1, keepdims=0)
    if integer_labels:
        table = g.const([int(float(c)) for c in classes], dtype=np.int64)
    else:
        table = g.const(np.array(classes, dtype=object), dtype=object)
    g.identity(g.op("Gather", [table, winner], axis=0), LABEL)
    label_type = TensorProto.INT64 if integer_labels else TensorProto.STRING
    return [
        helper.make_tensor_value_info(LABEL, label_type, [None]),
        helper.make_tensor_value_info(PROBABILITIES, TensorProto.FLOAT, [None, len(classes)]),
    ]


# ---------------------------------------------------------------- sample rows


def _sampler(
    fields: list[InputField], tabular: bool, thresholds: dict[str, list[float]]
) -> Callable[[int, np.random.Generator], Rows]:
    def sample(n: int, rng: np.random.Generator) -> Rows:
        cols = {f.name: _sample_field(f, n, rng, thresholds.get(f.name, [])) for f in fields}
        if tabular:
            return {INPUT: np.stack([cols[f.name] for f in fields], axis=1).astype(np.float32)}
        return {name: col.reshape(-1, 1) for name, col in cols.items()}

    return sample


def _sample_field(f: InputField, n: int, rng: np.random.Generator, cuts: list[float]) -> np.ndarray:
    if f.data.is_string:
        picked = np.array(rng.choice(f.data.values, size=n), dtype=object)
        if f.replacement is not None:  # the model defines what a missing category means: exercise it
            picked[rng.random(n) < 0.1] = ""
        return picked
    if f.data.values:  # numeric categories
        return rng.choice(np.array([float(v) for v in f.data.values], dtype=np.float32), size=n)
    finite = [iv for iv in f.data.intervals if math.isfinite(iv[0]) and math.isfinite(iv[1])]
    if finite:
        low, high = min(iv[0] for iv in finite), max(iv[1] for iv in finite)
    elif cuts:  # the split points tell where the model is sensitive; cover them with some margin
        low, high = min(cuts), max(cuts)
        margin = max(high - low, 1.0) * 0.25
        low, high = low - margin, high + margin
    else:
        low, high = -3.0, 3.0
    values = rng.uniform(low, high, size=n).astype(np.float32)
    if f.data.data_type == "integer":
        values = np.round(values)
    if cuts:  # some rows exactly on a split point check the comparison semantics at the boundary
        on_cut = rng.random(n) < 0.1
        values[on_cut] = np.float32(rng.choice(cuts, size=int(on_cut.sum())))
    if f.replacement is not None:  # the model defines what a missing value means: exercise it
        values[rng.random(n) < 0.1] = np.nan
    return values.astype(np.float32)


# ---------------------------------------------------------------- reference scorer


class _Reference:
    """pypmml scoring the original document, with an <Output> that names label and probabilities."""

    def __init__(
        self,
        root: ET.Element,
        model: ET.Element,
        fields: list[InputField],
        tabular: bool,
        classes: list[str],
        integer_labels: bool,
    ) -> None:
        self._document = _with_reference_output(root, model, classes)
        self._fields = fields
        self._tabular = tabular
        self._classes = classes
        self._integer_labels = integer_labels
        self._scorer: Any = None
        segmentation = child(model, "Segmentation")
        self._weighted_vote = (
            segmentation is not None and segmentation.get("multipleModelMethod") == "weightedMajorityVote"
        )

    def predict(self, rows: Rows) -> Rows:
        if self._scorer is None:
            try:
                from pypmml import Model
            except ImportError as exc:
                raise MissingDependency("pypmml", "pmml") from exc
            self._scorer = Model.fromString(self._document)
        # JSON written here, not by pandas: DataFrame.to_json keeps only 10 significant digits, which moves
        # rows that sit next to a split point to the other side
        request = json.dumps({"columns": [f.name for f in self._fields], "data": self._records(rows)})
        reply = json.loads(self._scorer.predict(request))
        scored = {name: [row[i] for row in reply["data"]] for i, name in enumerate(reply["columns"])}
        if not self._classes:
            return {PREDICTION: _floats(scored[_VALUE_OUT])}
        probs = np.stack([_floats(scored[f"{_PROB_OUT}{i}"]) for i in range(len(self._classes))], axis=1)
        # pmml4s leaves out classes a leaf's ScoreDistribution does not list: their probability is 0,
        # whereas a row with no probabilities at all is a null prediction and stays NaN
        scored_rows = ~np.all(np.isnan(probs), axis=1)
        probs[scored_rows] = np.nan_to_num(probs[scored_rows], nan=0.0)
        if self._weighted_vote:
            # pmml4s reports weighted vote totals divided by the number of segments (rows can sum to more
            # than 1); the converted model reports vote shares, so the reference is brought to shares
            probs = probs / np.sum(probs, axis=1, keepdims=True)
        raw = scored[_LABEL_OUT]
        if self._integer_labels:
            labels = np.array([int(float(v)) if v is not None else -1 for v in raw], dtype=np.int64)
        else:
            labels = np.array(["" if v is None else str(v) for v in raw], dtype=object)
        return {LABEL: labels, PROBABILITIES: probs}

    def _records(self, rows: Rows) -> list[list[Any]]:
        columns: list[list[Any]] = []
        for i, f in enumerate(self._fields):
            col = rows[INPUT][:, i] if self._tabular else np.asarray(rows[f.name]).reshape(-1)
            if f.data.is_string:
                columns.append([v.decode() if isinstance(v, bytes) else v for v in col])
            else:
                columns.append([None if math.isnan(v) else float(v) for v in col.astype(np.float64)])
        return [list(r) for r in zip(*columns, strict=True)]


def _floats(column: Any) -> np.ndarray:
    return np.array([math.nan if v is None else float(v) for v in column], dtype=np.float32)


def _with_reference_output(root: ET.Element, model: ET.Element, classes: list[str]) -> str:
    """The document with the top model's <Output> replaced by one that lists what parity compares."""
    namespace = root.tag[1:].split("}", 1)[0] if root.tag.startswith("{") else ""
    tag = (lambda t: f"{{{namespace}}}{t}") if namespace else (lambda t: t)
    if namespace:
        ET.register_namespace("", namespace)
    copy = ET.fromstring(ET.tostring(root))
    top = next(c for c in copy if local(c.tag) == local(model.tag))
    for old in children(top, "Output"):
        top.remove(old)
    output = ET.Element(tag("Output"))
    if classes:
        ET.SubElement(
            output,
            tag("OutputField"),
            name=_LABEL_OUT,
            feature="predictedValue",
            optype="categorical",
            dataType="string",
        )
        for i, c in enumerate(classes):
            ET.SubElement(
                output,
                tag("OutputField"),
                name=f"{_PROB_OUT}{i}",
                feature="probability",
                value=c,
                optype="continuous",
                dataType="double",
            )
    else:
        ET.SubElement(
            output,
            tag("OutputField"),
            name=_VALUE_OUT,
            feature="predictedValue",
            optype="continuous",
            dataType="double",
        )
    position = [local(c.tag) for c in top].index("MiningSchema") + 1
    top.insert(position, output)
    return ET.tostring(copy, encoding="unicode")

"""The parity check: the original model and onnxruntime on the same rows, compared output by output.

Labels must agree on every row except exact ties (the two best native probabilities closer than the
tolerance, where either answer is right). Probabilities are compared with an absolute tolerance;
other values (regressions, tensors) with the larger of the absolute and a relative tolerance, so a
house-price regression in float32 is not held to 1e-5 on values near 10^6.

A converter that takes rows as given (Conversion.native_takes_given) is compared as it is served: the
original model on the sample file's numbers (float64), onnxruntime on them cast to float32. A tree
ensemble may then disagree where a value rounds to float32 onto a split threshold (x > t in float64,
float32(x) == float32(t)): such a row is counted as a float32 boundary row, with examples, and does
not refuse the model - but only when moving the value one float32 step off the threshold makes
onnxruntime answer as the original model did. Every other difference still refuses.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from onnxgate.converters import graph, sample
from onnxgate.converters.base import LABEL, PROBABILITIES, Conversion, ConversionError, Rows, TensorSpec

MAX_EXAMPLES = 5
# values of one row found on a threshold that are nudged together (3 ** 4 = 81 variants of the row)
MAX_BOUNDARY_VALUES = 4


@dataclass(frozen=True)
class Tolerance:
    atol: float = 1e-5
    rtol: float = 1e-3  # values and regressions only; probabilities use atol alone


@dataclass
class OutputParity:
    name: str
    kind: str  # "label", "probabilities" or "values"
    passed: bool
    max_abs_diff: float | None = None
    max_rel_diff: float | None = None
    label_agreement: float | None = None
    mismatched_rows: int = 0
    ties: int = 0
    # where they differ: row index, position in the row, native value, onnxruntime value
    examples: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class ParityReport:
    passed: bool
    rows: int
    sample: str  # "user file NAME" or "generated"
    tolerance: Tolerance
    outputs: list[OutputParity]
    problems: list[str]
    # rows whose answer differs only because a value rounds to float32 onto a split threshold: left
    # out of the comparisons above; examples name the row, the input, the position, the value as
    # given and the float32 threshold it lands on
    float32_boundary_rows: int = 0
    float32_boundary_examples: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        lines = [
            f"parity {'passed' if self.passed else 'FAILED'} on {self.rows} rows ({self.sample});"
            f" atol {self.tolerance.atol:g}, rtol {self.tolerance.rtol:g} (values)"
        ]
        for out in self.outputs:
            if out.kind == "label":
                line = f"  {out.name}: label agreement {out.label_agreement:.4%} ({out.ties} exact ties excused)"
            else:
                line = f"  {out.name}: max abs diff {out.max_abs_diff:.3g}, max rel diff {out.max_rel_diff:.3g}"
            if out.mismatched_rows:
                line += f", {out.mismatched_rows} rows over tolerance"
            lines.append(line)
            lines.extend(
                f"    row {e['row']}{'' if e.get('index') is None else ' [' + str(e['index']) + ']'}:"
                f" native {e['native']!r} vs onnx {e['onnx']!r}"
                for e in out.examples
            )
        if self.float32_boundary_rows:
            lines.append(
                f"  {self.float32_boundary_rows} rows left out: their value rounds to float32 onto a split"
                " threshold, so the float32 model answers the other branch (one float32 step away it agrees)"
            )
            lines.extend(
                f"    row {e['row']} {e['input']}[{e['index']}]: {e['value']!r} -> float32 {e['float32']!r} = threshold"
                for e in self.float32_boundary_examples
            )
        lines.extend(f"  problem: {p}" for p in self.problems)
        return "\n".join(lines)


def run_onnx(conversion: Conversion, rows: Rows) -> Rows:
    import onnxruntime as ort

    try:
        session = ort.InferenceSession(conversion.model.SerializeToString(), providers=["CPUExecutionProvider"])
        names = [o.name for o in session.get_outputs()]
        results = session.run(names, rows)
    except Exception as error:  # onnxruntime raises its own untyped errors (Fail, InvalidArgument, ...)
        raise ConversionError(f"onnxruntime cannot run the converted model: {error}") from error
    return {name: np.asarray(value) for name, value in zip(names, results, strict=True)}


def signature_problems(conversion: Conversion) -> list[str]:
    """Differences between the declared signature and the graph the gateway will load."""
    problems = []
    declared = {s.name: s for s in conversion.inputs + conversion.outputs}
    actual = {s.name: s for s in graph.graph_inputs(conversion.model) + graph.graph_outputs(conversion.model)}
    for name, spec in declared.items():
        got = actual.get(name)
        if got is None:
            problems.append(f"declared tensor {name!r} is not an input or output of the graph")
        elif got.datatype != spec.datatype:
            problems.append(f"{name!r} is declared {spec.datatype} but the graph has {got.datatype}")
        elif len(got.shape) != len(spec.shape):
            problems.append(f"{name!r} is declared with shape {list(spec.shape)} but the graph has {list(got.shape)}")
    inputs = {s.name for s in conversion.inputs}
    problems.extend(
        f"graph input {s.name!r} is not declared" for s in graph.graph_inputs(conversion.model) if s.name not in inputs
    )
    return problems


def _kind(spec: TensorSpec | None, name: str) -> str:
    if name == LABEL or (spec is not None and spec.datatype in ("BYTES", "INT64", "INT32") and name != PROBABILITIES):
        return "label"
    return "probabilities" if name == PROBABILITIES else "values"


def _ties(native: Rows, tolerance: Tolerance) -> np.ndarray | None:
    probabilities = native.get(PROBABILITIES)
    if probabilities is None or probabilities.ndim != 2 or probabilities.shape[1] < 2:
        return None
    top2 = np.sort(probabilities, axis=1)[:, -2:]
    return np.asarray((top2[:, 1] - top2[:, 0]) <= 2 * tolerance.atol)


def _compare_labels(name: str, native: np.ndarray, onnx: np.ndarray, ties: np.ndarray | None) -> OutputParity:
    def text(values: np.ndarray) -> np.ndarray:
        return np.array([v.decode() if isinstance(v, bytes) else str(v) for v in values.reshape(-1)], dtype=object)

    a, b = text(native), text(onnx)
    differ = a != b
    excused = differ & ties if ties is not None and ties.shape == differ.shape else np.zeros_like(differ)
    wrong = differ & ~excused
    rows = np.flatnonzero(wrong)
    return OutputParity(
        name=name,
        kind="label",
        passed=not rows.size,
        label_agreement=float(1.0 - wrong.mean()) if wrong.size else 1.0,
        mismatched_rows=int(rows.size),
        ties=int(excused.sum()),
        examples=[{"row": int(r), "index": None, "native": a[r], "onnx": b[r]} for r in rows[:MAX_EXAMPLES]],
    )


def _compare_values(name: str, kind: str, native: np.ndarray, onnx: np.ndarray, tolerance: Tolerance) -> OutputParity:
    a = native.astype(np.float64).reshape(len(native), -1)
    b = onnx.astype(np.float64).reshape(len(onnx), -1)
    both_nan = np.isnan(a) & np.isnan(b)
    diff = np.where(both_nan, 0.0, np.abs(a - b))
    diff = np.where(np.isnan(diff), np.inf, diff)  # NaN on one side only is a difference
    # relative to max(|native|, 1): near zero a relative difference says nothing, the absolute one does
    rel = diff / np.maximum(np.abs(np.nan_to_num(a)), 1.0)  # NaN on both sides is no difference
    allowed = np.full_like(a, tolerance.atol)
    if kind == "values":
        allowed = np.maximum(allowed, tolerance.rtol * np.abs(a))
    over = diff > allowed
    bad_rows = np.flatnonzero(over.any(axis=1))
    examples = []
    for r in bad_rows[:MAX_EXAMPLES]:
        i = int(np.argmax(diff[r] - allowed[r]))
        examples.append({"row": int(r), "index": i, "native": float(a[r, i]), "onnx": float(b[r, i])})
    return OutputParity(
        name=name,
        kind=kind,
        passed=not bad_rows.size,
        max_abs_diff=float(diff.max()) if diff.size else 0.0,
        max_rel_diff=float(rel.max()) if rel.size else 0.0,
        mismatched_rows=int(bad_rows.size),
        examples=examples,
    )


def _wrong_rows(kind: str, native: np.ndarray, onnx: np.ndarray, tolerance: Tolerance) -> np.ndarray:
    """Per row of `onnx` (len(native) == 1 broadcasts one native row): whether it is over tolerance."""
    if kind == "label":
        text = [v.decode() if isinstance(v, bytes) else str(v) for v in native.reshape(-1)]
        got = [v.decode() if isinstance(v, bytes) else str(v) for v in onnx.reshape(-1)]
        return np.array([g != text[0 if len(text) == 1 else i] for i, g in enumerate(got)], dtype=bool)
    a = native.astype(np.float64).reshape(len(native), -1)
    b = onnx.astype(np.float64).reshape(len(onnx), -1)
    diff = np.where(np.isnan(a) & np.isnan(b), 0.0, np.abs(a - b))
    diff = np.where(np.isnan(diff), np.inf, diff)
    allowed = np.full_like(a, tolerance.atol)
    if kind == "values":
        allowed = np.maximum(allowed, tolerance.rtol * np.abs(a))
    return np.asarray((diff > allowed).any(axis=1))


def _float32_boundary(
    conversion: Conversion,
    rows: Rows,
    given: Rows,
    native: Rows,
    kinds: dict[str, str],
    candidates: np.ndarray,
    tolerance: Tolerance,
) -> dict[int, list[dict[str, Any]]]:
    """The rows among `candidates` that differ only because a value sits on a float32 split threshold.

    A row qualifies when some of its float32 values equal a threshold of a tree ensemble reading that
    column, and moving them one float32 step up or down (every combination) makes onnxruntime answer
    as the original model did on the row as given. Returns row -> the values on thresholds.
    """
    thresholds = {
        spec.name: sample.tree_thresholds(conversion.model, spec.name)
        for spec in conversion.inputs
        if spec.datatype == "FP32" and len(spec.shape) == 2
    }
    variants: list[Rows] = []
    owners: list[int] = []
    found: dict[int, list[dict[str, Any]]] = {}
    for r in candidates.tolist():
        hits = [
            (name, f, float(rows[name][r, f]), float(given[name][r, f]))
            for name, by_feature in thresholds.items()
            for f, cuts in by_feature.items()
            if f < rows[name].shape[1] and np.isin(rows[name][r, f], cuts)
        ]
        if not hits or len(hits) > MAX_BOUNDARY_VALUES:
            continue
        found[r] = [{"row": r, "input": n, "index": f, "value": g, "float32": v} for n, f, v, g in hits]
        for steps in itertools.product((0, 1, -1), repeat=len(hits)):
            if not any(steps):
                continue
            variant = {name: values[r : r + 1].copy() for name, values in rows.items()}
            for (name, f, value, _), step in zip(hits, steps, strict=True):
                toward = np.float32(np.inf if step > 0 else -np.inf)
                variant[name][0, f] = np.nextafter(np.float32(value), toward) if step else value
            variants.append(variant)
            owners.append(r)
    if not variants:
        return {}
    batch = {name: np.concatenate([v[name] for v in variants]) for name in rows}
    got = run_onnx(conversion, batch)
    owner = np.array(owners)
    agreeing: set[int] = set()
    for r in found:
        mine = owner == r
        ok = np.ones(int(mine.sum()), dtype=bool)
        for name, kind in kinds.items():
            ok &= ~_wrong_rows(kind, np.asarray(native[name])[r : r + 1], np.asarray(got[name])[mine], tolerance)
        if ok.any():
            agreeing.add(r)
    return {r: hits for r, hits in found.items() if r in agreeing}


def check(
    conversion: Conversion,
    rows: Rows,
    sample: str,
    tolerance: Tolerance | None = None,
    given: Rows | None = None,
) -> ParityReport:
    """Compare the original model with onnxruntime on `rows`; never raises for a mere difference.

    `given`: the same rows as the sample file gives them (numbers not cast to float32); the original
    model runs on them when the conversion takes rows as given (Conversion.native_takes_given).
    """
    tolerance = tolerance or Tolerance()
    problems = signature_problems(conversion)
    n = len(next(iter(rows.values())))
    as_given = given is not None and conversion.native_takes_given
    try:
        native = conversion.predict_native(given if as_given and given is not None else rows)
    except ConversionError:
        raise
    except Exception as error:  # whatever the original library raises, the user needs to see it
        raise ConversionError(
            f"the original model failed on the sample rows: {type(error).__name__}: {error}"
        ) from error
    onnx = run_onnx(conversion, rows)
    specs = {s.name: s for s in conversion.outputs}
    compared: dict[str, tuple[str, np.ndarray, np.ndarray]] = {}
    for name, expected in native.items():
        got = onnx.get(name)
        if got is None:
            problems.append(f"output {name!r} of the original model is missing from the ONNX graph")
            continue
        expected, got = np.asarray(expected), np.asarray(got)
        if expected.size != got.size or len(expected) != len(got):
            problems.append(f"output {name!r}: native shape {list(expected.shape)}, onnx shape {list(got.shape)}")
            continue
        compared[name] = (_kind(specs.get(name), name), expected, got)
    boundary: dict[int, list[dict[str, Any]]] = {}
    if as_given and given is not None and compared:
        wrong = np.zeros(n, dtype=bool)
        for kind, expected, got in compared.values():
            wrong |= _wrong_rows(kind, expected, got, tolerance)
        if wrong.any():
            kinds = {name: kind for name, (kind, _, _) in compared.items()}
            boundary = _float32_boundary(conversion, rows, given, native, kinds, np.flatnonzero(wrong), tolerance)
    # the comparison leaves the float32 boundary rows out; example rows keep their numbers in the sample
    keep = np.array([r for r in range(n) if r not in boundary], dtype=np.int64)
    ties = _ties({k: np.asarray(v)[keep] for k, v in native.items()}, tolerance)
    outputs: list[OutputParity] = []
    for name, (kind, expected, got) in compared.items():
        if kind == "label":
            result = _compare_labels(name, expected[keep], got[keep], ties)
        else:
            result = _compare_values(name, kind, expected[keep], got[keep], tolerance)
        for example in result.examples:
            example["row"] = int(keep[example["row"]])
        outputs.append(result)
    if not outputs:
        problems.append("no output was compared")
    passed = not problems and all(o.passed for o in outputs)
    examples = [hit for r in sorted(boundary)[:MAX_EXAMPLES] for hit in boundary[r][:1]]
    return ParityReport(passed, n, sample, tolerance, outputs, problems, len(boundary), examples)

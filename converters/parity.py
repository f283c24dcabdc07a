"""The parity check: the original model and onnxruntime on the same rows, compared output by output.

Labels must agree on every row except exact ties (the two best native probabilities closer than the
tolerance, where either answer is right). Probabilities are compared with an absolute tolerance;
other values (regressions, tensors) with the larger of the absolute and a relative tolerance, so a
house-price regression in float32 is not held to 1e-5 on values near 10^6.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from onnxgate.converters import graph
from onnxgate.converters.base import LABEL, PROBABILITIES, Conversion, ConversionError, Rows, TensorSpec

MAX_EXAMPLES = 5


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
    rel = diff / np.maximum(np.abs(a), 1.0)
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


def check(conversion: Conversion, rows: Rows, sample: str, tolerance: Tolerance | None = None) -> ParityReport:
    """Compare the original model with onnxruntime on `rows`; never raises for a mere difference."""
    tolerance = tolerance or Tolerance()
    problems = signature_problems(conversion)
    n = len(next(iter(rows.values())))
    try:
        native = conversion.predict_native(rows)
    except ConversionError:
        raise
    except Exception as error:  # whatever the original library raises, the user needs to see it
        raise ConversionError(
            f"the original model failed on the sample rows: {type(error).__name__}: {error}"
        ) from error
    onnx = run_onnx(conversion, rows)
    specs = {s.name: s for s in conversion.outputs}
    ties = _ties(native, tolerance)
    outputs: list[OutputParity] = []
    for name, expected in native.items():
        got = onnx.get(name)
        if got is None:
            problems.append(f"output {name!r} of the original model is missing from the ONNX graph")
            continue
        expected, got = np.asarray(expected), np.asarray(got)
        if expected.size != got.size or len(expected) != len(got):
            problems.append(f"output {name!r}: native shape {list(expected.shape)}, onnx shape {list(got.shape)}")
            continue
        kind = _kind(specs.get(name), name)
        if kind == "label":
            outputs.append(_compare_labels(name, expected, got, ties))
        else:
            outputs.append(_compare_values(name, kind, expected, got, tolerance))
    if not outputs:
        problems.append("no output was compared")
    passed = not problems and all(o.passed for o in outputs)
    return ParityReport(passed, n, sample, tolerance, outputs, problems)

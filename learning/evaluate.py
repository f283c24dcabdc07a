"""Champion and challenger scored as they would be served: onnxruntime on their ONNX files.

The decision between two versions is made on what the gateway would answer, not on the native
models: a challenger whose conversion loses accuracy is judged with that loss. The comparison is
paired (both models on the same held-out rows) and goes through learning/stats.py.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnxruntime as ort

from onnxgate.learning.stats import PairedTest, mcnemar_exact, paired_bootstrap

CLASSIFICATION = "classification"
REGRESSION = "regression"


def predict(model: Path | bytes, inputs: Mapping[str, np.ndarray]) -> np.ndarray:
    """The primary answer of a version (its model.onnx, or a challenger's serialized graph): `label`
    for classifiers, `prediction` for regressors."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1  # an offline job beside a serving gateway: leave it the cores
    source = model if isinstance(model, bytes) else str(model)
    session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    output = next((n for n in ("label", "prediction") if n in names), names[0])
    wanted = {i.name for i in session.get_inputs()}
    result = np.asarray(session.run([output], {k: v for k, v in inputs.items() if k in wanted})[0])
    return result.reshape(len(result), -1)[:, 0] if result.ndim > 1 else result


def same_label(predicted: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Element-wise equality of class labels that may come as numbers, strings or bytes on either side."""
    p = _normal(predicted)
    t = _normal(truth)
    if p.dtype.kind in "fiub" and t.dtype.kind in "fiub":
        return np.asarray(p.astype(np.float64) == t.astype(np.float64))
    return np.asarray(p.astype(str) == t.astype(str))


def _normal(values: np.ndarray) -> np.ndarray:
    array = np.asarray(values)
    if array.dtype == object:
        decoded = np.array([v.decode() if isinstance(v, bytes) else v for v in array], dtype=object)
        try:
            return decoded.astype(np.float64)
        except (TypeError, ValueError):
            return decoded.astype(str)
    if array.dtype.kind in "US":
        try:
            return array.astype(np.float64)
        except ValueError:
            return array.astype(str)
    return array


def compare(task: str, champion: np.ndarray, challenger: np.ndarray, truth: np.ndarray, *, seed: int = 0) -> PairedTest:
    """The paired test of two versions' answers on the same rows: McNemar's exact test on right/wrong
    for classifiers, a paired bootstrap of the squared error for regressors."""
    if task == CLASSIFICATION:
        return mcnemar_exact(same_label(champion, truth), same_label(challenger, truth))
    y = np.asarray(truth, dtype=np.float64)
    champion_loss = (np.asarray(champion, dtype=np.float64) - y) ** 2
    challenger_loss = (np.asarray(challenger, dtype=np.float64) - y) ** 2
    return paired_bootstrap(champion_loss, challenger_loss, seed=seed)

"""ONNX graph builder and decision-tree emitter for the PMML converter (the R converter reuses it).

Trees are kept as immutable Python objects (`Leaf`, `Split`) whose leaves carry one value per
output target. They are emitted as one legacy `ai.onnx.ml` TreeEnsembleRegressor (opset 3) with
`n_targets` outputs and SUM aggregation: classifiers get their class probabilities or votes as
targets, and the label is taken afterwards with ArgMax. That sidesteps onnxruntime's two-class
TreeEnsembleClassifier quirk and lets every ensemble method (sum, average, weighted average,
vote) fold into leaf weights. Subtrees may be shared between parents in Python; emission
duplicates them because an ONNX tree node has exactly one parent.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ONNX_OPSET = 17
ML_OPSET = 3


@dataclass(frozen=True)
class Leaf:
    values: tuple[float, ...]


@dataclass(frozen=True)
class Split:
    feature: str  # field name; mapped to a column when the ensemble is emitted
    mode: str  # BRANCH_LEQ, BRANCH_LT, BRANCH_GTE, BRANCH_GT, BRANCH_EQ, BRANCH_NEQ
    threshold: float
    missing_true: bool  # where a NaN (missing) value goes
    true: Tree
    false: Tree


Tree = Leaf | Split


def scale_tree(tree: Tree, factor: float) -> Tree:
    if isinstance(tree, Leaf):
        return Leaf(tuple(v * factor for v in tree.values))
    return Split(
        tree.feature,
        tree.mode,
        tree.threshold,
        tree.missing_true,
        scale_tree(tree.true, factor),
        scale_tree(tree.false, factor),
    )


def tree_features(tree: Tree, into: dict[str, None]) -> None:
    """Collect feature names in first-use order (a dict keeps order and uniqueness)."""
    stack: list[Tree] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, Split):
            into.setdefault(node.feature, None)
            stack.extend((node.false, node.true))


def float32_threshold(mode: str, threshold: float) -> float:
    """A float32 threshold that decides exactly as the double one does for float32 inputs.

    The served input is FP32 while PMML and R compare in double. For float32 x: x <= t iff
    x <= (largest float32 <= t), and x < t iff x < (smallest float32 >= t); GT/GTE mirror them.
    Rounding to nearest instead would flip rows that land between t and its nearest float32.
    """
    if math.isinf(threshold) or math.isnan(threshold):
        return threshold
    nearest = np.float32(threshold)
    if float(nearest) == threshold:
        return float(nearest)
    below = nearest if float(nearest) < threshold else np.nextafter(nearest, np.float32(-np.inf))
    above = nearest if float(nearest) > threshold else np.nextafter(nearest, np.float32(np.inf))
    if mode in ("BRANCH_LEQ", "BRANCH_GT"):
        return float(below)
    if mode in ("BRANCH_LT", "BRANCH_GTE"):
        return float(above)
    return float(nearest)  # EQ/NEQ on a value no float32 equals: the closest one is the best try


class GraphBuilder:
    """Accumulates nodes and initializers; every helper returns the name of its output."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._count = 0

    def fresh(self, hint: str) -> str:
        self._count += 1
        return f"{hint}_{self._count}"

    def const(self, value: Any, hint: str = "c", dtype: Any = np.float32) -> str:
        array = np.asarray(value, dtype=dtype)
        name = self.fresh(hint)
        if array.dtype == object:
            encoded: list[Any] = [str(v).encode() for v in array.ravel()]
            tensor = helper.make_tensor(name, TensorProto.STRING, array.shape, encoded)
        else:
            tensor = numpy_helper.from_array(array, name)
        self.initializers.append(tensor)
        return name

    def op(self, op_type: str, inputs: Sequence[str], hint: str | None = None, domain: str = "", **attrs: Any) -> str:
        out = self.fresh(hint or op_type.lower())
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], domain=domain, **attrs))
        return out

    def identity(self, source: str, name: str) -> None:
        self.nodes.append(helper.make_node("Identity", [source], [name]))

    def column(self, matrix: str, index: int) -> str:
        """[N, F] -> [N, 1] column `index`."""
        return self.op("Gather", [matrix, self.const([index], dtype=np.int64)], hint="col", axis=1)

    def flatten_col(self, column: str) -> str:
        """[N, 1] -> [N]."""
        return self.op("Reshape", [column, self.const([-1], dtype=np.int64)], hint="flat")

    def tree_ensemble(
        self,
        features: str,
        trees: Sequence[Tree],
        n_targets: int,
        base: Sequence[float] | None,
        feature_index: dict[str, int],
    ) -> str:
        """Emit the trees as one TreeEnsembleRegressor over `features` ([N, F]); returns [N, n_targets]."""
        attrs: dict[str, list[Any]] = {
            k: []
            for k in (
                "nodes_treeids",
                "nodes_nodeids",
                "nodes_featureids",
                "nodes_modes",
                "nodes_values",
                "nodes_truenodeids",
                "nodes_falsenodeids",
                "nodes_missing_value_tracks_true",
                "target_treeids",
                "target_nodeids",
                "target_ids",
                "target_weights",
            )
        }
        for tree_id, tree in enumerate(trees):
            _emit_tree(tree, tree_id, n_targets, feature_index, attrs)
        return self.op(
            "TreeEnsembleRegressor",
            [features],
            hint="trees",
            domain="ai.onnx.ml",
            n_targets=n_targets,
            aggregate_function="SUM",
            post_transform="NONE",
            base_values=list(base) if base is not None else [0.0] * n_targets,
            **attrs,
        )

    def model(
        self, inputs: list[onnx.ValueInfoProto], outputs: list[onnx.ValueInfoProto], name: str
    ) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, name, inputs, outputs, self.initializers)
        model = helper.make_model(
            graph,
            opset_imports=[helper.make_opsetid("", ONNX_OPSET), helper.make_opsetid("ai.onnx.ml", ML_OPSET)],
            producer_name="onnxgate",
        )
        model.ir_version = 8  # opset 17 needs IR 8; older runtimes refuse newer IR versions
        onnx.checker.check_model(model)
        return model


def _emit_tree(
    tree: Tree, tree_id: int, n_targets: int, feature_index: dict[str, int], attrs: dict[str, list[Any]]
) -> None:
    """Append one tree's nodes in pre-order; node ids are positions within the tree."""
    # (node, id) pairs; children ids are allocated when their parent is written
    stack: list[tuple[Tree, int]] = [(tree, 0)]
    next_id = 1
    rows: dict[int, tuple[Tree, int, int]] = {}
    while stack:
        node, node_id = stack.pop()
        if isinstance(node, Split):
            true_id, false_id = next_id, next_id + 1
            next_id += 2
            rows[node_id] = (node, true_id, false_id)
            stack.append((node.false, false_id))
            stack.append((node.true, true_id))
        else:
            rows[node_id] = (node, 0, 0)
    for node_id in sorted(rows):
        node, true_id, false_id = rows[node_id]
        attrs["nodes_treeids"].append(tree_id)
        attrs["nodes_nodeids"].append(node_id)
        attrs["nodes_truenodeids"].append(true_id)
        attrs["nodes_falsenodeids"].append(false_id)
        if isinstance(node, Split):
            attrs["nodes_featureids"].append(feature_index[node.feature])
            attrs["nodes_modes"].append(node.mode)
            attrs["nodes_values"].append(node.threshold)
            attrs["nodes_missing_value_tracks_true"].append(int(node.missing_true))
        else:
            if len(node.values) != n_targets:
                raise ValueError(f"leaf has {len(node.values)} values, ensemble has {n_targets} targets")
            attrs["nodes_featureids"].append(0)
            attrs["nodes_modes"].append("LEAF")
            attrs["nodes_values"].append(0.0)
            attrs["nodes_missing_value_tracks_true"].append(0)
            for target, weight in enumerate(node.values):
                if weight != 0.0:  # zero weights add nothing; skipping them keeps big forests small
                    attrs["target_treeids"].append(tree_id)
                    attrs["target_nodeids"].append(node_id)
                    attrs["target_ids"].append(target)
                    attrs["target_weights"].append(weight)

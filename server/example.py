"""The embedded example repository, trained from data sets that ship inside scikit-learn.

    iris         classifier (iris flowers): version 1 logistic regression, version 2 random forest
    diabetes     regressor (disease progression from 10 measurements)
    petal_width  regressor with a string input: species name + three measurements -> petal width

Outputs follow the converters' names (`label`, `probabilities`, `prediction`), and each version
carries a version-level config.pbtxt with its signature and class labels, as `onnxgate convert` writes,
and the names of its input columns (parameter `columns`, server/columns.py): iris takes `sepal_length`,
`sepal_width`, `petal_length`, `petal_width` by name as well as its `input` tensor.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnx
from google.protobuf import text_format

from onnxgate.server.pb import model_config_pb2 as mc

log = logging.getLogger(__name__)

MODELS = ("iris", "diabetes", "petal_width")
IRIS_COLUMNS = ["sepal_length", "sepal_width", "petal_length", "petal_width"]


def ensure_example_repository(root: Path) -> Path:
    """Build the example repository at `root` unless it is already there (built aside, then renamed)."""
    if all((root / name).is_dir() for name in MODELS):
        return root
    log.info("building the example model repository in %s", root)
    root.parent.mkdir(parents=True, exist_ok=True)
    staged = Path(tempfile.mkdtemp(prefix=".example-", dir=root.parent))
    try:
        _build(staged)
        if root.exists():
            shutil.rmtree(root)
        staged.rename(root)
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    return root


def _build(root: Path) -> None:
    import pandas as pd
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType, StringTensorType
    from sklearn.compose import ColumnTransformer
    from sklearn.datasets import load_diabetes, load_iris
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.linear_model import LogisticRegression, Ridge
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    iris = load_iris()
    x = iris.data.astype(np.float32)
    labels = [str(n) for n in iris.target_names]
    float_in = [("input", FloatTensorType([None, 4]))]
    for version, clf in ((1, make_pipeline(StandardScaler(), LogisticRegression(max_iter=500))),
                         (2, RandomForestClassifier(n_estimators=20, max_depth=5, random_state=0))):  # fmt: skip
        clf.fit(x, iris.target)
        model = convert_sklearn(clf, initial_types=float_in, options={id(clf): {"zipmap": False}}, target_opset=17)
        _write(root / "iris" / str(version), model, labels, "classification", _matrix_columns(IRIS_COLUMNS))
    # serve both versions: clients address one by number, "" gets the latest
    policy = mc.ModelConfig(name="iris", version_policy=mc.ModelVersionPolicy(all=mc.ModelVersionPolicy.All()))
    (root / "iris" / "config.pbtxt").write_text(text_format.MessageToString(policy))

    diabetes = load_diabetes()
    reg = Ridge(alpha=0.1).fit(diabetes.data.astype(np.float32), diabetes.target)
    model = convert_sklearn(reg, initial_types=[("input", FloatTensorType([None, 10]))], target_opset=17)
    names = [str(n) for n in diabetes.feature_names]  # age, sex, bmi, bp, s1..s6
    _write(root / "diabetes" / "1", _rename_output(model, "prediction"), None, "regression", _matrix_columns(names))

    frame = pd.DataFrame(iris.data[:, :3], columns=["sepal_length", "sepal_width", "petal_length"]).astype(np.float32)
    frame.insert(0, "species", [labels[t] for t in iris.target])
    pipe = make_pipeline(
        ColumnTransformer([("species", OneHotEncoder(handle_unknown="ignore"), ["species"])], remainder="passthrough"),
        Ridge(alpha=0.1),
    ).fit(frame, iris.data[:, 3])
    types = [("species", StringTensorType([None, 1]))] + [(c, FloatTensorType([None, 1])) for c in frame.columns[1:]]
    model = convert_sklearn(pipe, initial_types=types, target_opset=17)
    columns = [
        {"name": "species", "datatype": "BYTES", "input": "species", "index": 0, "categories": labels},
        *({"name": c, "datatype": "FP32", "input": c, "index": 0} for c in frame.columns[1:]),
    ]
    _write(root / "petal_width" / "1", _rename_output(model, "prediction"), None, "regression", columns)


def _matrix_columns(names: list[str]) -> list[dict[str, object]]:
    """The columns of one FP32 matrix input `input`, in order (what `onnxgate convert` records)."""
    return [{"name": n, "datatype": "FP32", "input": "input", "index": i} for i, n in enumerate(names)]


def _rename_output(model: onnx.ModelProto, name: str) -> onnx.ModelProto:
    old = model.graph.output[0].name
    for node in model.graph.node:
        node.output[:] = [name if o == old else o for o in node.output]
    model.graph.output[0].name = name
    return model


def _write(
    version_dir: Path, model: onnx.ModelProto, labels: list[str] | None, task: str, columns: list[dict[str, object]]
) -> None:
    version_dir.mkdir(parents=True)
    onnx.checker.check_model(model)
    (version_dir / "model.onnx").write_bytes(model.SerializeToString())
    config = mc.ModelConfig(name=version_dir.parent.name, platform="onnxruntime_onnx", backend="onnxruntime")
    config.parameters["task"].string_value = task
    config.parameters["source"].string_value = "onnxgate example (scikit-learn)"
    config.parameters["columns"].string_value = json.dumps(columns, separators=(",", ":"))
    if labels:
        (version_dir / "labels.txt").write_text("\n".join(labels) + "\n")
        config.output.add(name="probabilities", label_filename="labels.txt")
        # datatypes and dims are left out: the gateway completes a partial signature from the graph
        config.output.add(name="label")
        config.input.add(name="input")
    config.max_batch_size = 256
    config.dynamic_batching.max_queue_delay_microseconds = 500
    (version_dir / "config.pbtxt").write_text(text_format.MessageToString(config))

"""What is refused, and how: broken conversions, corrupt files, unsupported models, missing packages."""

from __future__ import annotations

import json
import pickle
import sys
from pathlib import Path

import joblib
import numpy as np
import onnx
import pytest
import xgboost
from sklearn.linear_model import LinearRegression
from sklearn.preprocessing import StandardScaler

from onnxgate import converters
from onnxgate.converters import ConversionError, MissingDependency, convert, detect_framework, parity
from onnxgate.converters.base import Conversion, ConvertOptions
from tests.converters.helpers import numeric_versions, published, run_cli

RNG = np.random.default_rng(5)
X = RNG.normal(size=(300, 4)).astype(np.float32)


@pytest.fixture
def xgb_model(tmp_path: Path) -> Path:
    booster = xgboost.train(
        {"objective": "multi:softprob", "num_class": 3, "max_depth": 3},
        xgboost.DMatrix(X, label=np.digitize(X[:, 0], [-0.5, 0.5])),
        num_boost_round=10,
    )
    booster.save_model(tmp_path / "model.json")
    return tmp_path / "model.json"


def _corrupt_leaf_weights(conversion: Conversion) -> Conversion:
    """A converter bug, simulated: every leaf of class 1 weighs more than it should."""
    for node in conversion.model.graph.node:
        if node.op_type == "TreeEnsembleClassifier":
            for attr in node.attribute:
                if attr.name == "class_ids":
                    ids = list(attr.ints)
                if attr.name == "class_weights":
                    weights = attr.floats
            for i, class_id in enumerate(ids):
                if class_id == 1:
                    weights[i] += 0.5
    return conversion


def test_broken_conversion_is_refused_with_a_readable_report(
    tmp_path: Path, xgb_model: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    real = converters.CONVERTERS["xgboost"]

    def broken(source: str, options: ConvertOptions) -> Conversion:
        return _corrupt_leaf_weights(real(source, options))

    monkeypatch.setitem(converters.CONVERTERS, "xgboost", broken)
    repo = tmp_path / "repo"
    (repo / "risk" / "1").mkdir(parents=True)  # an earlier version stays the served one
    report_file = tmp_path / "report.json"

    assert run_cli(xgb_model, repo, "risk", "--report", str(report_file)) == 1
    assert sorted(p.name for p in (repo / "risk").iterdir()) == ["1"]  # nothing published, nothing left aside
    report = json.loads(report_file.read_text())
    assert report["status"] == "refused"
    probabilities = next(o for o in report["parity"]["outputs"] if o["name"] == "probabilities")
    assert not probabilities["passed"] and probabilities["max_abs_diff"] > 1e-3
    assert probabilities["mismatched_rows"] > 0 and probabilities["examples"]
    example = probabilities["examples"][0]
    assert {"row", "index", "native", "onnx"} <= set(example)
    stderr = capsys.readouterr().err
    assert "parity FAILED" in stderr and "refused" in stderr
    assert f"row {example['row']} [{example['index']}]: native" in stderr


def test_label_disagreement_is_reported_and_ties_are_excused() -> None:
    def fake(labels: list[int], probabilities: list[list[float]]) -> Conversion:
        from onnx import TensorProto, helper

        graph = helper.make_graph(
            [
                helper.make_node("ArgMax", ["input"], ["label"], axis=1, keepdims=0),
                helper.make_node("Identity", ["input"], ["probabilities"]),
            ],
            "g",
            [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 2])],
            [
                helper.make_tensor_value_info("label", TensorProto.INT64, ["batch"]),
                helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", 2]),
            ],
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        return Conversion(
            model=model,
            inputs=converters.graph.graph_inputs(model),
            outputs=converters.graph.graph_outputs(model),
            task="classification",
            framework="test",
            predict_native=lambda rows: {"label": np.array(labels), "probabilities": np.array(probabilities)},
        )

    rows = {"input": np.array([[0.2, 0.8], [0.5, 0.5], [0.9, 0.1]], dtype=np.float32)}
    # row 1 is an exact tie: native says 1, onnxruntime's ArgMax says 0 - excused
    ok = parity.check(fake([1, 1, 0], [[0.2, 0.8], [0.5, 0.5], [0.9, 0.1]]), rows, "test")
    assert ok.passed and ok.outputs[0].ties == 1
    # row 2 disagrees without a tie - refused, and the report names the row
    bad = parity.check(fake([1, 0, 1], [[0.2, 0.8], [0.5, 0.5], [0.9, 0.1]]), rows, "test")
    assert not bad.passed
    label = bad.outputs[0]
    assert label.mismatched_rows == 1 and label.examples[0]["row"] == 2
    assert "row 2: native '1' vs onnx '0'" in bad.summary()


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("model.json", b'{"learner": {"broken', "not a readable XGBoost model"),
        ("model.ubj", b"\x00\x01garbage", "not an XGBoost JSON or UBJSON model"),
        ("model.cbm", b"CBM1 but then nothing useful", "not a readable CatBoost model"),
        ("model.onnx", b"this is not protobuf", "not a readable ONNX model"),
        ("model.pkl", b"\x80\x04garbage", "not a readable pickle/joblib file"),
        ("model.pt", b"PK\x03\x04 not a zip", "neither a TorchScript file nor a saved module"),
        ("model.txt", b"tree\nversion=v4\nnonsense", "LightGBM"),
        ("model.bin", b"\x01\x02\x03", "cannot tell which framework"),
        ("empty.onnx", b"", "is empty"),
    ],
)
def test_corrupt_files_give_clear_errors(tmp_path: Path, name: str, content: bytes, message: str) -> None:
    (tmp_path / name).write_bytes(content)
    with pytest.raises(ConversionError, match=message):
        convert(tmp_path / name)
    assert run_cli(tmp_path / name, tmp_path / "repo", "m") == 2
    assert numeric_versions(tmp_path / "repo" / "m") == []


def test_unsupported_model_types(tmp_path: Path) -> None:
    joblib.dump(StandardScaler().fit(X), tmp_path / "scaler.joblib")  # a transformer alone predicts nothing
    with pytest.raises(ConversionError, match="only scikit-learn classifiers, regressors, clusterers"):
        convert(tmp_path / "scaler.joblib")
    (tmp_path / "dict.pkl").write_bytes(pickle.dumps({"weights": [1, 2]}))
    with pytest.raises(ConversionError, match="holds a dict, not a scikit-learn estimator"):
        convert(tmp_path / "dict.pkl")
    ranker = xgboost.train({"objective": "rank:pairwise"}, xgboost.DMatrix(X, label=X[:, 0] > 0, group=[300]), 2)
    ranker.save_model(tmp_path / "ranker.json")
    with pytest.raises(ConversionError, match="objective 'rank:pairwise' is not supported"):
        convert(tmp_path / "ranker.json")
    with pytest.raises(ConversionError, match="unknown framework 'keras'"):
        convert(tmp_path / "ranker.json", framework="keras")


def test_missing_optional_dependency_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "model.cbm").write_bytes(b"CBM1")
    monkeypatch.setitem(sys.modules, "catboost", None)  # `import catboost` now raises ImportError
    with pytest.raises(MissingDependency, match=r"'catboost'.*pip install 'onnxgate\[converters\]'"):
        convert(tmp_path / "model.cbm")


def test_framework_detection_by_suffix_and_contents(tmp_path: Path, xgb_model: Path) -> None:
    no_suffix = tmp_path / "exported"
    no_suffix.write_bytes(xgb_model.read_bytes())
    assert detect_framework(str(no_suffix)) == "xgboost"
    (tmp_path / "lgb").write_text("tree\nversion=v4\nnum_class=1\n")
    assert detect_framework(str(tmp_path / "lgb")) == "lightgbm"
    (tmp_path / "m").write_bytes(b"CBM1....")
    assert detect_framework(str(tmp_path / "m")) == "catboost"
    (tmp_path / "p").write_text('<?xml version="1.0"?>\n<PMML version="4.4">')
    assert detect_framework(str(tmp_path / "p")) == "pmml"
    joblib.dump(LinearRegression(), tmp_path / "lr")
    assert detect_framework(str(tmp_path / "lr")) == "sklearn"
    assert detect_framework("package.module:model") == "torch"
    with pytest.raises(ConversionError, match="does not exist"):
        detect_framework(str(tmp_path / "missing.onnx"))


def test_versions_are_numbered_after_the_highest_and_staging_is_hidden(tmp_path: Path, xgb_model: Path) -> None:
    repo = tmp_path / "repo"
    (repo / "risk" / "7").mkdir(parents=True)
    (repo / "risk" / "notes").mkdir()
    assert run_cli(xgb_model, repo, "risk") == 0
    assert run_cli(xgb_model, repo, "risk") == 0
    assert numeric_versions(repo / "risk") == [7, 8, 9]
    version = published(repo, "risk")
    assert version.name == "9"
    onnx.checker.check_model(onnx.load(version / "model.onnx"))


def test_publish_takes_the_next_number_when_one_appears_meanwhile(
    tmp_path: Path, xgb_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from onnxgate.converters import publish

    repo = tmp_path / "repo"
    real_next = publish.next_version
    calls: list[int] = []

    def racing(model_dir: Path) -> int:
        number = real_next(model_dir)
        if not calls:  # another publisher claims this number between our check and our rename
            (model_dir / str(number)).mkdir()
            (model_dir / str(number) / "model.onnx").write_bytes(b"theirs")
        calls.append(number)
        return number

    monkeypatch.setattr(publish, "next_version", racing)
    assert run_cli(xgb_model, repo, "risk") == 0
    assert numeric_versions(repo / "risk") == [1, 2]
    assert (repo / "risk" / "1" / "model.onnx").read_bytes() == b"theirs"
    assert json.loads((repo / "risk" / "2" / "report.json").read_text())["version"] == 2


def test_registry_reports_a_converter_that_is_not_installed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "model.xyz").write_bytes(b"anything")
    monkeypatch.setitem(converters.CONVERTERS, "future", converters._lazy("no_such_converter_module"))
    with pytest.raises(ConversionError, match="has no no_such_converter_module converter"):
        convert(tmp_path / "model.xyz", framework="future")

"""`onnxgate convert --sample FILE`: a table's columns reach the model's inputs by name when they have names.

Training data usually holds more columns than a model reads (an id, the target, features a PMML writer
dropped from its DataDictionary), in an order of its own; positional matching is only for files whose
columns have no names.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import pandas as pd
import pytest
from sklearn.linear_model import LinearRegression

from onnxgate.converters import convert, convert_to_repository, sample
from onnxgate.converters.base import ConversionError
from onnxgate.converters.pmml import convert_pmml
from tests.converters.helpers import check_published, published, run_cli
from tests.converters.serving import served

RNG = np.random.default_rng(7)

# What JPMML writes for a model that reads 3 of the training frame's columns: the DataDictionary has
# those and the target (4 fields), not the row id, and the MiningSchema orders them a, b, c.
LINEAR_PMML = """<?xml version="1.0" encoding="UTF-8"?>
<PMML xmlns="http://www.dmg.org/PMML-4_4" version="4.4">
  <Header description="hand-written: y = 0.5 + 2a - 3b + 0.25c"/>
  <DataDictionary numberOfFields="4">
    <DataField name="y" optype="continuous" dataType="double"/>
    <DataField name="a" optype="continuous" dataType="double"/>
    <DataField name="b" optype="continuous" dataType="double"/>
    <DataField name="c" optype="continuous" dataType="double"/>
  </DataDictionary>
  <RegressionModel functionName="regression">
    <MiningSchema>
      <MiningField name="y" usageType="target"/>
      <MiningField name="a"/>
      <MiningField name="b"/>
      <MiningField name="c"/>
    </MiningSchema>
    <RegressionTable intercept="0.5">
      <NumericPredictor name="a" coefficient="2.0"/>
      <NumericPredictor name="b" coefficient="-3.0"/>
      <NumericPredictor name="c" coefficient="0.25"/>
    </RegressionTable>
  </RegressionModel>
</PMML>
"""


def _training_frame(n: int) -> pd.DataFrame:
    """Five columns in an order of their own: an id the model never reads, its three inputs, the target."""
    features = RNG.normal(size=(n, 3))
    frame = pd.DataFrame({"id": np.arange(1000, 1000 + n), "c": features[:, 2], "a": features[:, 0]})
    frame["b"] = features[:, 1]
    frame["y"] = 0.5 + 2 * frame["a"] - 3 * frame["b"] + 0.25 * frame["c"]
    return frame


@pytest.fixture
def pmml_model(tmp_path: Path) -> Path:
    path = tmp_path / "linear.pmml"
    path.write_text(LINEAR_PMML)
    return path


def test_pmml_takes_its_columns_by_name_from_a_wider_csv(pmml_model: Path, tmp_path: Path) -> None:
    frame = _training_frame(40)
    frame.to_csv(tmp_path / "train.csv", index=False)

    assert run_cli(pmml_model, tmp_path / "repo", "linear", "--sample", str(tmp_path / "train.csv")) == 0
    report = check_published(published(tmp_path / "repo", "linear"), "pmml", "regression")
    assert report["parity"]["rows"] == 40 and "train.csv" in report["parity"]["sample"]
    assert report["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 3]}]
    # the parity check compares two models on the same rows, whatever they are: check they are a, b, c
    conversion = convert_pmml(pmml_model)
    rows = sample.read_file(tmp_path / "train.csv", conversion.inputs, conversion.input_columns)
    np.testing.assert_array_equal(rows["input"], frame[["a", "b", "c"]].to_numpy(np.float32))


def test_parquet_sample_is_matched_by_name_too(pmml_model: Path, tmp_path: Path) -> None:
    _training_frame(25).to_parquet(tmp_path / "train.parquet", index=False)
    outcome = convert_to_repository(pmml_model, tmp_path / "repo", "linear", sample_path=tmp_path / "train.parquet")
    assert outcome.published is not None and outcome.parity.rows == 25


def test_missing_column_is_named(pmml_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _training_frame(10).drop(columns=["b"]).to_csv(tmp_path / "no_b.csv", index=False)

    assert run_cli(pmml_model, tmp_path / "repo", "linear", "--sample", str(tmp_path / "no_b.csv")) == 2
    assert (
        "sample file 'no_b.csv' lacks columns the model reads: ['b'] (the file has ['id', 'c', 'a', 'y']);"
        " name them as the model does, or give a file without a header to match columns by position"
    ) in capsys.readouterr().err
    assert not (tmp_path / "repo" / "linear").exists()


def test_columns_without_names_are_positional(pmml_model: Path, tmp_path: Path) -> None:
    frame = _training_frame(30)[["a", "b", "c"]]
    # no header at all: the first line is a row
    frame.to_csv(tmp_path / "headerless.csv", index=False, header=False)
    outcome = convert_to_repository(pmml_model, tmp_path / "r1", "linear", sample_path=tmp_path / "headerless.csv")
    assert outcome.published is not None and outcome.parity.rows == 30
    # pandas' header for a frame made from an array ("0,1,2") names no feature: positional as well
    pd.DataFrame(frame.to_numpy()).to_csv(tmp_path / "numbered.csv", index=False)
    outcome = convert_to_repository(pmml_model, tmp_path / "r2", "linear", sample_path=tmp_path / "numbered.csv")
    assert outcome.published is not None and outcome.parity.rows == 30

    # by position the count must fit: the id and target columns cannot be told apart from features
    _training_frame(5).to_csv(tmp_path / "wide.csv", index=False, header=False)
    with pytest.raises(ConversionError, match=r"'wide.csv' has 5 columns, matched by position \(the file names no"):
        convert_to_repository(pmml_model, tmp_path / "r3", "linear", sample_path=tmp_path / "wide.csv")


def test_sklearn_fitted_on_a_frame_takes_its_columns_by_name(tmp_path: Path) -> None:
    frame = _training_frame(60)
    model = LinearRegression().fit(frame[["a", "b", "c"]], frame["y"])
    joblib.dump(model, tmp_path / "linear.joblib")
    frame.to_csv(tmp_path / "train.csv", index=False)  # id, c, a, b, y: a different order, two extra columns

    assert (
        run_cli(tmp_path / "linear.joblib", tmp_path / "repo", "linear", "--sample", str(tmp_path / "train.csv")) == 0
    )
    report = check_published(published(tmp_path / "repo", "linear"), "sklearn", "regression")
    assert report["parity"]["rows"] == 60


def _two_input_graph(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """An ONNX model made elsewhere: score = a @ wa + b @ wb, with `a` [-1, 3] and `b` [-1, 2]."""
    from onnx import TensorProto, helper, numpy_helper

    wa, wb = np.array([[1.0], [-2.0], [0.5]], np.float32), np.array([[3.0], [0.25]], np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["a", "wa"], ["pa"]),
            helper.make_node("MatMul", ["b", "wb"], ["pb"]),
            helper.make_node("Add", ["pa", "pb"], ["score"]),
        ],
        "two_inputs",
        [
            helper.make_tensor_value_info("a", TensorProto.FLOAT, ["batch", 3]),
            helper.make_tensor_value_info("b", TensorProto.FLOAT, ["batch", 2]),
        ],
        [helper.make_tensor_value_info("score", TensorProto.FLOAT, ["batch", 1])],
        [numpy_helper.from_array(wa, "wa"), numpy_helper.from_array(wb, "wb")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path.write_bytes(model.SerializeToString())
    return wa, wb


def test_several_wide_inputs_take_indexed_columns(tmp_path: Path, start_gateway: Callable[..., Any]) -> None:
    """Columns `a[0]`, `a[1]`, `a[2]`, `b[0]`, `b[1]` feed inputs a [-1, 3] and b [-1, 2], in any order."""
    wa, wb = _two_input_graph(tmp_path / "two.onnx")
    a, b = RNG.normal(size=(30, 3)), RNG.normal(size=(30, 2))
    frame = pd.DataFrame({"id": np.arange(30), "b[1]": b[:, 1], "a[0]": a[:, 0], "b[0]": b[:, 0]})
    frame["a[2]"], frame["a[1]"] = a[:, 2], a[:, 1]
    frame.to_csv(tmp_path / "rows.csv", index=False)

    conversion = convert(tmp_path / "two.onnx")
    rows = sample.read_file(tmp_path / "rows.csv", conversion.inputs)
    np.testing.assert_array_equal(rows["a"], a.astype(np.float32))
    np.testing.assert_array_equal(rows["b"], b.astype(np.float32))

    assert run_cli(tmp_path / "two.onnx", tmp_path / "repo", "two", "--sample", str(tmp_path / "rows.csv")) == 0
    report = check_published(published(tmp_path / "repo", "two"), "onnx", "other")
    assert report["parity"]["rows"] == 30
    feeds = {"a": a.astype(np.float32), "b": b.astype(np.float32)}
    answer = served(start_gateway, tmp_path / "repo", "two", feeds, ["score"])["score"]
    np.testing.assert_allclose(answer, feeds["a"] @ wa + feeds["b"] @ wb, rtol=1e-6)

    frame.drop(columns=["b[1]"]).to_csv(tmp_path / "short.csv", index=False)
    with pytest.raises(ConversionError, match=r"lacks columns the model reads: \['b\[1\]'\]"):
        sample.read_file(tmp_path / "short.csv", conversion.inputs)

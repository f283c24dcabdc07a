"""PMML -> ONNX: fixtures written by JPMML (sklearn2pmml, Java), parity against pypmml (Java)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from onnxgate.converters.base import Conversion, ConversionError
from onnxgate.converters.pmml import convert_pmml
from tests.converters.helpers import check_published, published, run_cli

ROOT = Path(__file__).resolve().parents[2]
PMML_PYTHON = ROOT / ".venv-pmml" / "bin" / "python"
FIXTURES = [
    "tree_classifier", "tree_regressor", "forest_classifier", "forest_regressor", "gbm_regressor", "gbm_binary",
    "gbm_multiclass", "logistic_binary", "logistic_multiclass", "linear_regressor", "vote_classifier",
    "vote_regressor", "shop_tree", "shop_logistic", "shop_forest",
]  # fmt: skip


def _toolchain_missing() -> str | None:
    if shutil.which("java") is None:
        return "no Java runtime (run .ci/deps/converters-r-java.sh)"
    if not PMML_PYTHON.exists():
        return "no .venv-pmml with sklearn2pmml (run .ci/deps/converters-r-java.sh)"
    try:
        import pypmml  # noqa: F401
    except ImportError:
        return "pypmml is not installed (pip install '.[pmml]')"
    return None


@pytest.fixture(scope="session")
def pmml_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    reason = _toolchain_missing()
    if reason:
        pytest.fail(f"{reason}: the test command installs it (.ci/setup)")
    out = tmp_path_factory.mktemp("pmml")
    script = ROOT / "tests" / "converters" / "fixtures" / "make_pmml.py"
    done = subprocess.run([str(PMML_PYTHON), str(script), str(out)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def assert_parity(conversion: Conversion, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """onnxruntime against the reference scorer at the project's tolerances; returns the ONNX outputs."""
    session = ort.InferenceSession(conversion.model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    got = dict(zip(names, session.run(names, rows), strict=True))
    ref = conversion.predict_native(rows)
    if conversion.task == "regression":
        b = ref["prediction"].astype(np.float64)
        diff = np.abs(got["prediction"] - b) / np.maximum(1.0, np.abs(b))
        assert float(np.max(diff)) <= 1e-3 and float(np.max(np.abs(got["prediction"] - b))) <= max(
            1e-5, 1e-3 * np.max(np.abs(b))
        )
        if float(np.max(np.abs(b))) <= 10:  # small values: the absolute tolerance applies
            np.testing.assert_allclose(got["prediction"], b, atol=1e-5, rtol=0)
        return got
    np.testing.assert_allclose(got["probabilities"], ref["probabilities"], atol=1e-5, rtol=0)
    top2 = np.sort(ref["probabilities"], axis=1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 1e-6  # exact ties may be broken either way
    assert clear.mean() > 0.5
    assert [str(v) for v in got["label"][clear]] == [str(v) for v in ref["label"][clear]]
    return got


@pytest.mark.parametrize("name", FIXTURES)
def test_jpmml_models_match_pypmml(pmml_dir: Path, name: str) -> None:
    conversion = convert_pmml(pmml_dir / f"{name}.pmml")
    assert conversion.make_sample is not None
    rows = conversion.make_sample(300, np.random.default_rng(1))
    assert_parity(conversion, rows)
    outputs = {o.name: (o.datatype, o.shape) for o in conversion.outputs}
    if conversion.task == "classification":
        assert conversion.labels and outputs["probabilities"] == ("FP32", (-1, len(conversion.labels)))
        assert outputs["label"][1] == (-1,)
    else:
        assert outputs == {"prediction": ("FP32", (-1,))}
    assert all(spec.shape[0] == -1 for spec in conversion.inputs)


def test_signatures(pmml_dir: Path) -> None:
    iris = convert_pmml(pmml_dir / "gbm_multiclass.pmml")
    assert [(i.name, i.datatype) for i in iris.inputs] == [("input", "FP32")]
    assert iris.labels == ["0", "1", "2"] and iris.outputs[0].datatype == "INT64"
    shop = convert_pmml(pmml_dir / "shop_forest.pmml")
    assert {i.name: i.datatype for i in shop.inputs} == {
        "color": "BYTES",
        "size": "BYTES",
        "price": "FP32",
        "age": "FP32",
    }
    assert shop.labels == ["buy", "skip"] and shop.outputs[0].datatype == "BYTES"


def test_missing_values_use_mining_field_replacement(pmml_dir: Path) -> None:
    conversion = convert_pmml(pmml_dir / "shop_tree.pmml")
    rows = conversion.make_sample(40, np.random.default_rng(3))
    rows["age"][:20] = np.nan
    got = assert_parity(conversion, rows)
    filled = {k: v.copy() for k, v in rows.items()}
    filled["age"][:20] = 40.0  # the document's missingValueReplacement
    again = assert_parity(conversion, filled)
    np.testing.assert_array_equal(got["probabilities"], again["probabilities"])


HAND_WRITTEN = """<?xml version="1.0"?>
<PMML xmlns="http://www.dmg.org/PMML-4_3" version="4.3"><Header/>
 <DataDictionary>
  <DataField name="y" optype="categorical" dataType="string"><Value value="a"/><Value value="b"/><Value value="c"/></DataField>
  <DataField name="x" optype="continuous" dataType="double"><Interval closure="closedClosed" leftMargin="0" rightMargin="10"/></DataField>
  <DataField name="z" optype="continuous" dataType="double"><Interval closure="closedClosed" leftMargin="-5" rightMargin="5"/></DataField>
  <DataField name="k" optype="categorical" dataType="string"><Value value="p"/><Value value="q"/><Value value="r s"/></DataField>
 </DataDictionary>
 <TreeModel functionName="classification" missingValueStrategy="defaultChild" noTrueChildStrategy="returnLastPrediction">
  <MiningSchema><MiningField name="y" usageType="target"/><MiningField name="x"/><MiningField name="z"/><MiningField name="k"/></MiningSchema>
  <Node id="0" score="a" defaultChild="2"><True/>
   <ScoreDistribution value="a" recordCount="5"/><ScoreDistribution value="b" recordCount="3"/><ScoreDistribution value="c" recordCount="2"/>
   <Node id="1" score="b"><CompoundPredicate booleanOperator="and">
      <SimplePredicate field="x" operator="greaterThan" value="2.5"/>
      <SimpleSetPredicate field="k" booleanOperator="isIn"><Array type="string" n="2">p "r s"</Array></SimpleSetPredicate>
     </CompoundPredicate>
    <ScoreDistribution value="a" recordCount="1"/><ScoreDistribution value="b" recordCount="6"/><ScoreDistribution value="c" recordCount="1"/>
   </Node>
   <Node id="2" score="c" defaultChild="3"><CompoundPredicate booleanOperator="or">
      <SimplePredicate field="z" operator="lessOrEqual" value="-1.25"/>
      <SimplePredicate field="k" operator="equal" value="q"/>
     </CompoundPredicate>
    <ScoreDistribution value="a" recordCount="1"/><ScoreDistribution value="b" recordCount="1"/><ScoreDistribution value="c" recordCount="4"/>
    <Node id="3" score="a"><SimplePredicate field="x" operator="lessThan" value="7.3"/>
     <ScoreDistribution value="a" recordCount="3"/><ScoreDistribution value="c" recordCount="1"/>
    </Node>
    <Node id="4" score="b"><SimplePredicate field="x" operator="greaterOrEqual" value="7.3"/>
     <ScoreDistribution value="b" recordCount="2"/><ScoreDistribution value="c" recordCount="2"/>
    </Node>
   </Node>
  </Node>
 </TreeModel>
</PMML>
"""


def test_hand_written_predicates_and_default_child(tmp_path: Path) -> None:
    """Compound, set and categorical predicates and defaultChild routing of missing values, against pypmml."""
    if _toolchain_missing():
        pytest.fail(f"{_toolchain_missing()}: the test command installs it (.ci/setup)")
    path = tmp_path / "tree.pmml"
    path.write_text(HAND_WRITTEN)
    conversion = convert_pmml(path)
    assert [i.name for i in conversion.inputs] == ["x", "z", "k"]
    assert conversion.make_sample is not None
    rows = conversion.make_sample(300, np.random.default_rng(5))
    assert_parity(conversion, rows)
    rows["x"][::7] = np.nan  # UNKNOWN predicates follow defaultChild
    rows["z"][::5] = np.nan
    assert_parity(conversion, rows)


def test_clear_errors(tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt.pmml"
    corrupt.write_text("<PMML><DataDictionary>")
    with pytest.raises(ConversionError, match="not a well-formed PMML"):
        convert_pmml(corrupt)
    network = tmp_path / "nn.pmml"
    network.write_text(HAND_WRITTEN.replace("<TreeModel", "<NeuralNetwork").replace("</TreeModel>", "</NeuralNetwork>"))
    with pytest.raises(ConversionError, match="NeuralNetwork"):
        convert_pmml(network)
    xor = tmp_path / "xor.pmml"
    xor.write_text(HAND_WRITTEN.replace('booleanOperator="and"', 'booleanOperator="xor"'))
    with pytest.raises(ConversionError, match="xor"):
        convert_pmml(xor)
    not_pmml = tmp_path / "other.xml"
    not_pmml.write_text("<html/>")
    with pytest.raises(ConversionError, match="not PMML"):
        convert_pmml(not_pmml)


def test_published_and_served_through_the_gateway(pmml_dir: Path, tmp_path: Path, start_gateway) -> None:  # type: ignore[no-untyped-def]
    """`onnxgate convert` publishes the JPMML random forest (string inputs); the gateway serves it like pypmml."""
    import tritonclient.grpc as triton

    repo = tmp_path / "repo"
    assert run_cli(pmml_dir / "shop_forest.pmml", repo, "shop") == 0
    version = published(repo, "shop")
    check_published(version, "pmml", "classification")

    conversion = convert_pmml(pmml_dir / "shop_forest.pmml")
    assert conversion.make_sample is not None
    rows = conversion.make_sample(64, np.random.default_rng(11))
    native = conversion.predict_native(rows)
    handle = start_gateway(repo)
    client = triton.InferenceServerClient(handle.address)
    inputs = []
    for spec in conversion.inputs:
        tensor = triton.InferInput(spec.name, list(rows[spec.name].shape), spec.datatype)
        tensor.set_data_from_numpy(rows[spec.name])
        inputs.append(tensor)
    result = client.infer("shop", inputs)
    np.testing.assert_allclose(result.as_numpy("probabilities"), native["probabilities"], atol=1e-5, rtol=0)
    labels = [v.decode() if isinstance(v, bytes) else str(v) for v in result.as_numpy("label")]
    assert labels == [str(v) for v in native["label"]]

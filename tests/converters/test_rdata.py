"""R saveRDS models -> ONNX: fixtures trained by real R (Rscript), parity against R's own predict()."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from onnxgate.converters.base import ConversionError
from onnxgate.converters.rdata import convert_rds
from tests.converters.helpers import check_published, published, run_cli
from tests.converters.test_pmml import assert_parity

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ["rf_classifier", "rf_regressor", "rf_matrix", "rf_factor", "lm", "glm_gaussian", "glm_binomial"]


def _toolchain_missing() -> str | None:
    if shutil.which("Rscript") is None:
        return "R is not installed (run .ci/deps/converters-r-java.sh)"
    try:
        import rdata  # noqa: F401
    except ImportError:
        return "rdata is not installed (pip install '.[r]')"
    return None


@pytest.fixture(scope="session")
def rds_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    reason = _toolchain_missing()
    if reason:
        pytest.fail(f"{reason}: the test command installs it (.ci/setup)")
    out = tmp_path_factory.mktemp("rds")
    script = ROOT / "tests" / "converters" / "fixtures" / "make_r.R"
    done = subprocess.run(["Rscript", "--vanilla", str(script), str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


@pytest.mark.parametrize("name", FIXTURES)
def test_r_models_match_r_predict(rds_dir: Path, name: str) -> None:
    conversion = convert_rds(rds_dir / f"{name}.rds")
    assert conversion.make_sample is not None
    rows = conversion.make_sample(300, np.random.default_rng(2))
    assert_parity(conversion, rows)
    assert all(spec.shape[0] == -1 for spec in conversion.inputs)


def test_signatures(rds_dir: Path) -> None:
    iris = convert_rds(rds_dir / "rf_classifier.rds")
    assert [(i.name, i.datatype, i.shape) for i in iris.inputs] == [("input", "FP32", (-1, 4))]
    assert iris.labels == ["setosa", "versicolor", "virginica"]
    assert [(o.name, o.datatype) for o in iris.outputs] == [("label", "BYTES"), ("probabilities", "FP32")]
    warp = convert_rds(rds_dir / "rf_factor.rds")
    assert {i.name: i.datatype for i in warp.inputs} == {"wool": "BYTES", "tension": "BYTES"}
    glm = convert_rds(rds_dir / "glm_binomial.rds")  # saved whole, family closures included
    assert glm.labels == ["0", "1"] and glm.outputs[0].datatype == "INT64"
    lm = convert_rds(rds_dir / "lm.rds")
    assert lm.task == "regression" and lm.inputs[0].shape == (-1, 3)


def test_clear_errors(rds_dir: Path, tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt.rds"
    corrupt.write_bytes(b"\x1f\x8b\x08\x00garbage")
    with pytest.raises(ConversionError, match="not a readable RDS"):
        convert_rds(corrupt)
    frame = tmp_path / "frame.rds"
    subprocess.run(["Rscript", "-e", f"saveRDS(list(a = 1, b = 'x'), '{frame}')"], check=True, timeout=60)
    with pytest.raises(ConversionError, match="not supported"):
        convert_rds(frame)
    poly = tmp_path / "poly.rds"
    subprocess.run(
        ["Rscript", "-e", f"saveRDS(lm(mpg ~ log(wt) + hp, data = mtcars), '{poly}')"], check=True, timeout=60
    )
    with pytest.raises(ConversionError, match="log\\(wt\\)"):
        convert_rds(poly)


def test_published_and_served_through_the_gateway(rds_dir: Path, tmp_path: Path, start_gateway) -> None:  # type: ignore[no-untyped-def]
    """`onnxgate convert` publishes the R forest; the gateway answers as R's predict() does."""
    import tritonclient.grpc as triton

    repo = tmp_path / "repo"
    assert run_cli(rds_dir / "rf_regressor.rds", repo, "mpg") == 0
    check_published(published(repo, "mpg"), "rdata", "regression")

    conversion = convert_rds(rds_dir / "rf_regressor.rds")
    assert conversion.make_sample is not None
    rows = conversion.make_sample(50, np.random.default_rng(4))
    native = conversion.predict_native(rows)
    client = triton.InferenceServerClient(start_gateway(repo).address)
    tensor = triton.InferInput("input", list(rows["input"].shape), "FP32")
    tensor.set_data_from_numpy(rows["input"])
    served = client.infer("mpg", [tensor]).as_numpy("prediction")
    np.testing.assert_allclose(served, native["prediction"], rtol=1e-5, atol=1e-4)

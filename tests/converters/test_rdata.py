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
from tests.converters.serving import served, text
from tests.converters.test_pmml import assert_parity

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = [
    "rf_classifier",
    "rf_regressor",
    "rf_matrix",
    "rf_factor",
    "lm",
    "glm_gaussian",
    "glm_binomial",
    "lm_factor",
    "glm_factor",
    "glm_factor_poisson",
]


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


def test_factor_predictors_served_as_strings(rds_dir: Path, tmp_path: Path, start_gateway) -> None:  # type: ignore[no-untyped-def]
    """A binomial glm with a factor (infert's education: "0-5yrs", "6-11yrs", "12+ yrs") converted with R's
    own data as the sample, served with the factor as BYTES, answering as R's predict(); an unseen level
    answers NaN (R's predict() returns NA for it)."""
    import pandas as pd

    repo = tmp_path / "repo"
    sample_file = rds_dir / "infert.csv"  # more columns than the model reads, by name
    assert run_cli(rds_dir / "glm_factor.rds", repo, "infert", "--sample", str(sample_file)) == 0
    rep = check_published(published(repo, "infert"), "rdata", "classification")
    assert rep["parity"]["rows"] == 248
    assert {i["name"]: i["datatype"] for i in rep["inputs"]} == {"age": "FP32", "parity": "FP32", "education": "BYTES"}
    assert any("a level the model was not fitted with answers NaN" in note for note in rep["notes"])

    frame = pd.read_csv(sample_file).iloc[::10]
    feeds = {
        "age": frame[["age"]].to_numpy(np.float32),
        "parity": frame[["parity"]].to_numpy(np.float32),
        "education": frame[["education"]].to_numpy(dtype=object),
    }
    answers = served(start_gateway, repo, "infert", feeds, ["label", "probabilities"])
    reference = convert_rds(rds_dir / "glm_factor.rds").predict_native(feeds)  # Rscript: predict(m, d)
    np.testing.assert_allclose(answers["probabilities"], reference["probabilities"], atol=1e-5)
    assert text(answers["label"]) == [str(v) for v in reference["label"]]
    assert len(set(frame["education"])) == 3


def test_unseen_factor_level_answers_nan_like_r(rds_dir: Path, tmp_path: Path, start_gateway) -> None:  # type: ignore[no-untyped-def]
    repo = tmp_path / "repo"
    assert run_cli(rds_dir / "lm_factor.rds", repo, "mpg") == 0
    check_published(published(repo, "mpg"), "rdata", "regression")
    feeds = {
        "wt": np.array([[2.5], [3.0], [3.5]], dtype=np.float32),
        "cyl": np.array([["4"], ["12"], ["8"]], dtype=object),  # no car had 12 cylinders
        "gear": np.array([["3"], ["4"], ["5"]], dtype=object),
    }
    answer = served(start_gateway, repo, "mpg", feeds, ["prediction"])["prediction"]
    reference = convert_rds(rds_dir / "lm_factor.rds").predict_native(feeds)["prediction"]
    assert np.isnan(answer[1]) and np.isnan(reference[1])
    np.testing.assert_allclose(answer[[0, 2]], reference[[0, 2]], rtol=1e-5)


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("lm_interaction", r"term 'wt:cyl6' is an interaction"),
        ("lm_inline_factor", r"factor 'factor\(am\)' is computed in the formula"),
        ("lm_sum_contrasts", r"factor 'cyl' is coded with contr.sum.*contrasts = list\(cyl = 'contr.treatment'\)"),
    ],
)
def test_factor_terms_that_are_refused(rds_dir: Path, tmp_path: Path, name: str, message: str) -> None:
    with pytest.raises(ConversionError, match=message):
        convert_rds(rds_dir / f"{name}.rds")
    assert run_cli(rds_dir / f"{name}.rds", tmp_path / "repo", "m") == 2

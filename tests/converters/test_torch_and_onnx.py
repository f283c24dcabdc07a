"""PyTorch (TorchScript file, module:attr) and ONNX files made elsewhere."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from skl2onnx import convert_sklearn
from skl2onnx.common.data_types import FloatTensorType
from sklearn.linear_model import LogisticRegression

from tests.converters.helpers import check_published, config, published, run_cli, run_onnx

MODULE_SOURCE = textwrap.dedent(
    """
    import torch

    class Scorer(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(3)
            self.hidden = torch.nn.Linear(7, 12)
            self.out = torch.nn.Linear(12, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(torch.tanh(self.hidden(x))) * 50.0

    scorer = Scorer().eval()
    """
)


@pytest.fixture
def scorer_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> torch.nn.Module:
    (tmp_path / "my_scorers.py").write_text(MODULE_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    import my_scorers  # type: ignore[import-not-found]  # written just above

    module: torch.nn.Module = my_scorers.scorer
    return module


def _check_torch_version(version: Path, module: torch.nn.Module) -> None:
    check_published(version, "torch", "other")
    cfg = config(version)
    assert [(i.name, list(i.dims)) for i in cfg.input] == [("input", [-1, 7])]
    assert [(o.name, list(o.dims)) for o in cfg.output] == [("output", [-1, 2])]
    for batch in (1, 33):  # the batch axis is dynamic
        rows = np.random.default_rng(batch).normal(size=(batch, 7)).astype(np.float32)
        with torch.no_grad():
            expected = module(torch.from_numpy(rows)).numpy()
        np.testing.assert_allclose(run_onnx(version, {"input": rows})["output"], expected, atol=1e-4, rtol=1e-5)


def test_torchscript_file(tmp_path: Path, scorer_module: torch.nn.Module) -> None:
    torch.jit.script(scorer_module).save(str(tmp_path / "scorer.pt"))  # type: ignore[no-untyped-call]
    assert run_cli(tmp_path / "scorer.pt", tmp_path / "repo", "scorer") == 0
    _check_torch_version(published(tmp_path / "repo", "scorer"), scorer_module)


def test_module_reference(tmp_path: Path, scorer_module: torch.nn.Module) -> None:
    # no --framework: `module:attr` that is not a file means a PyTorch module
    assert run_cli("my_scorers:scorer", tmp_path / "repo", "scorer") == 0
    _check_torch_version(published(tmp_path / "repo", "scorer"), scorer_module)
    # a module class is built with its defaults; --input-shape is honoured
    assert run_cli("my_scorers:Scorer", tmp_path / "repo", "scorer", "--input-shape", "7") == 0
    assert sorted(p.name for p in (tmp_path / "repo" / "scorer").iterdir()) == ["1", "2"]


def test_plain_onnx_file_with_zipmap(tmp_path: Path) -> None:
    x = np.random.default_rng(0).normal(size=(200, 3))
    model = LogisticRegression().fit(x, np.digitize(x[:, 0], [-0.4, 0.4]))
    # made "elsewhere": skl2onnx with its defaults, ZipMap included
    graph = convert_sklearn(model, initial_types=[("features", FloatTensorType([None, 3]))])
    assert any(n.op_type == "ZipMap" for n in graph.graph.node)
    onnx.save(graph, tmp_path / "external.onnx")

    assert run_cli(tmp_path / "external.onnx", tmp_path / "repo", "external") == 0
    version = published(tmp_path / "repo", "external")
    rep = check_published(version, "onnx", "other")
    assert any("ReferenceEvaluator" in note for note in rep["notes"])
    assert any("ZipMap removed" in note for note in rep["notes"])
    cfg = config(version)
    assert [(o.name, list(o.dims)) for o in cfg.output] == [("output_label", [-1]), ("output_probability", [-1, 3])]
    rows = np.random.default_rng(1).normal(size=(40, 3)).astype(np.float32)
    got = run_onnx(version, {"features": rows})
    np.testing.assert_allclose(got["output_probability"], model.predict_proba(rows), atol=1e-5)
    assert (got["output_label"] == model.predict(rows)).all()


def test_npy_sample_for_an_onnx_file(tmp_path: Path) -> None:
    x = np.random.default_rng(0).normal(size=(50, 3))
    graph = convert_sklearn(
        LogisticRegression().fit(x, (x[:, 0] > 0).astype(int)),
        initial_types=[("features", FloatTensorType([None, 3]))],
        options={"zipmap": False},
    )
    onnx.save(graph, tmp_path / "m.onnx")
    np.save(tmp_path / "rows.npy", x[:11].astype(np.float32))
    assert run_cli(tmp_path / "m.onnx", tmp_path / "repo", "m", "--sample", str(tmp_path / "rows.npy")) == 0
    rep = check_published(published(tmp_path / "repo", "m"), "onnx", "other")
    assert rep["parity"]["rows"] == 11

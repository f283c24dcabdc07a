"""PyTorch (TorchScript file, module:attr) and ONNX files made elsewhere."""

from __future__ import annotations

import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pandas as pd
import pytest
import torch
from skl2onnx import convert_sklearn
from skl2onnx.common.data_types import FloatTensorType
from sklearn.linear_model import LogisticRegression

from tests.converters.helpers import check_published, config, published, run_cli, run_onnx
from tests.converters.serving import served

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


class _Flat(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(5)
        self.layer = torch.nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.layer(x))


class _Cnn(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(6)
        self.conv = torch.nn.Conv2d(1, 2, 3)
        self.pool = torch.nn.AdaptiveAvgPool2d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled: torch.Tensor = self.pool(self.conv(x))
        return pooled.flatten(1)


def test_torchscript_takes_its_row_width_from_a_csv_sample(tmp_path: Path, start_gateway: Callable[..., Any]) -> None:
    flat = _Flat().eval()
    torch.jit.script(flat).save(str(tmp_path / "flat.pt"))  # type: ignore[no-untyped-call]
    rows = np.random.default_rng(8).normal(size=(20, 5))
    pd.DataFrame(rows, columns=list("abcde")).to_csv(tmp_path / "rows.csv", index=False)

    assert run_cli(tmp_path / "flat.pt", tmp_path / "repo", "flat", "--sample", str(tmp_path / "rows.csv")) == 0
    version = published(tmp_path / "repo", "flat")
    rep = check_published(version, "torch", "other")
    assert rep["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 5]}] and rep["parity"]["rows"] == 20
    x = rows.astype(np.float32)
    answer = served(start_gateway, tmp_path / "repo", "flat", {"input": x}, ["output"])["output"]
    with torch.no_grad():
        np.testing.assert_allclose(answer, flat(torch.from_numpy(x)).numpy(), atol=1e-5)


def test_torchscript_cnn_with_a_csv_sample_needs_input_shape(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cnn = _Cnn().eval()
    torch.jit.script(cnn).save(str(tmp_path / "cnn.pt"))  # type: ignore[no-untyped-call]
    pixels = np.random.default_rng(9).normal(size=(12, 64))
    pd.DataFrame(pixels).to_csv(tmp_path / "images.csv", index=False)

    assert run_cli(tmp_path / "cnn.pt", tmp_path / "repo", "cnn", "--sample", str(tmp_path / "images.csv")) == 2
    err = capsys.readouterr().err
    assert "--input-shape" in err and "rows of shape [64]" in err and "images.csv" in err
    assert "Traceback" not in err
    assert not (tmp_path / "repo" / "cnn").exists()

    # with the row shape the same file's 64 columns are 1x8x8 images, row-major
    args = ("--sample", str(tmp_path / "images.csv"), "--input-shape", "1,8,8")
    assert run_cli(tmp_path / "cnn.pt", tmp_path / "repo", "cnn", *args) == 0
    version = published(tmp_path / "repo", "cnn")
    assert check_published(version, "torch", "other")["parity"]["rows"] == 12
    images = pixels.reshape(-1, 1, 8, 8).astype(np.float32)
    with torch.no_grad():
        np.testing.assert_allclose(
            run_onnx(version, {"input": images})["output"], cnn(torch.from_numpy(images)).numpy(), atol=1e-5
        )

"""Shared steps of the converter tests: run the real CLI entry, read back what it published."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from google.protobuf import text_format

from onnxgate.converters import cli
from onnxgate.server.pb import model_config_pb2


def run_cli(source: str | Path, repository: Path, name: str, *extra: str) -> int:
    """`onnxgate convert SOURCE --model-repository REPO --model NAME ...` through configure_parser/run."""
    parser = argparse.ArgumentParser()
    cli.configure_parser(parser)
    args = parser.parse_args([str(source), "--model-repository", str(repository), "--model", name, "--quiet", *extra])
    return cli.run(args)


def numeric_versions(model_dir: Path) -> list[int]:
    return sorted(int(p.name) for p in model_dir.iterdir() if p.name.isdigit()) if model_dir.is_dir() else []


def published(repository: Path, name: str) -> Path:
    """The newest version directory, after checking it is complete and nothing was left aside."""
    model_dir = repository / name
    assert not [p.name for p in model_dir.iterdir() if p.name.startswith(".")], "staging directory left behind"
    version = model_dir / str(numeric_versions(model_dir)[-1])
    for file in ("model.onnx", "config.pbtxt", "report.json"):
        assert (version / file).is_file(), f"{file} missing from {version}"
    return version


def config(version: Path) -> model_config_pb2.ModelConfig:
    return text_format.Parse((version / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())


def report(version: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((version / "report.json").read_text())
    return data


def check_published(version: Path, framework: str, task: str) -> dict[str, Any]:
    """Config and report agree with each other and say the parity check passed within tolerance."""
    cfg, rep = config(version), report(version)
    assert cfg.name == version.parent.name
    assert cfg.platform == "onnxruntime_onnx" and cfg.backend == "onnxruntime" and cfg.max_batch_size == 0
    assert cfg.parameters["framework"].string_value == framework
    assert cfg.parameters["task"].string_value == task
    assert json.loads(cfg.parameters["conversion_report"].string_value) == rep
    assert rep["status"] == "published" and rep["version"] == int(version.name)
    assert rep["parity"]["passed"] and rep["parity"]["rows"] > 0
    assert rep["source_hash"].startswith("sha256:") or framework == "torch"
    assert rep["opsets"] and "onnxruntime" in rep["library_versions"]
    for out in rep["parity"]["outputs"]:
        if out["kind"] == "label":
            assert out["label_agreement"] == 1.0 or out["ties"] > 0
        elif out["kind"] == "probabilities":
            assert out["max_abs_diff"] <= 1e-5
        else:
            assert out["max_rel_diff"] <= 1e-3
    for spec in cfg.input:
        assert spec.dims[0] == -1, "batch dimension must be free"
    if task == "classification":
        labels = (version / "labels.txt").read_text().splitlines()
        assert labels == rep["labels"]
        outputs = {o.name: o for o in cfg.output}
        assert set(outputs) == {"label", "probabilities"}
        assert list(outputs["probabilities"].dims) == [-1, len(labels)]
        assert outputs["probabilities"].data_type == model_config_pb2.TYPE_FP32
        assert outputs["label"].label_filename == "labels.txt"
    elif task == "regression":
        assert [o.name for o in cfg.output] == ["prediction"]
    return rep


def run_onnx(version: Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(str(version / "model.onnx"), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds), strict=True))


def assert_classifier_matches(outputs: dict[str, np.ndarray], labels: np.ndarray, probabilities: np.ndarray) -> None:
    np.testing.assert_allclose(outputs["probabilities"], probabilities, atol=1e-5, rtol=0)
    assert [str(v) for v in outputs["label"]] == [str(v) for v in np.asarray(labels).reshape(-1)]

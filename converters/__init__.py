"""Models from every training ecosystem become validated ONNX versions of a model repository.

    convert(source, framework)        native file -> Conversion (converters.base)
    convert_and_check(...)            convert -> parity check, nothing written
    convert_to_repository(...)        convert -> parity check -> publish the next version (or refuse)

`CONVERTERS` maps each framework name to one function `(source, ConvertOptions) -> Conversion`;
converter modules are imported only when used, so heavy libraries (torch, catboost, ...) load only
for the models that need them.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import platform
import sys
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from onnxgate.converters import graph, parity, publish, sample
from onnxgate.converters.base import (
    Conversion,
    ConversionError,
    Converter,
    ConvertOptions,
    MissingDependency,
    Rows,
    feature_columns,
)

__all__ = [
    "ALIASES",
    "CONVERTERS",
    "Attached",
    "Checked",
    "ConversionError",
    "ConvertOptions",
    "MissingDependency",
    "Outcome",
    "convert",
    "convert_and_check",
    "convert_to_repository",
    "detect_framework",
    "resolve_framework",
]


def _lazy(module: str, *plain_names: str) -> Converter:
    """Import `converters.<module>` on first use and call its converter.

    A module exposes `convert(source, options)`, or - when it needs no options, like the PMML and R
    converters - a function of the path alone: `convert_<module>` or one of `plain_names`.
    """

    def run(source: str, options: ConvertOptions) -> Conversion:
        try:
            loaded = importlib.import_module(f"onnxgate.converters.{module}")
        except ModuleNotFoundError as error:
            if error.name == f"onnxgate.converters.{module}":
                raise ConversionError(f"this installation of onnxgate has no {module} converter") from error
            raise MissingDependency(error.name or module, "converters") from error
        if hasattr(loaded, "convert"):
            converter: Converter = loaded.convert
            return converter(source, options)
        for name in (f"convert_{module}", *plain_names):
            if hasattr(loaded, name):
                plain: Callable[[Path], Conversion] = getattr(loaded, name)
                return plain(Path(source))
        raise ConversionError(f"converters.{module} exposes no converter function")

    run.__name__ = f"convert_{module}"
    return run


CONVERTERS: dict[str, Converter] = {
    "sklearn": _lazy("sklearn"),
    "xgboost": _lazy("xgboost"),
    "lightgbm": _lazy("lightgbm"),
    "catboost": _lazy("catboost"),
    "torch": _lazy("torch"),
    "onnx": _lazy("onnxfile"),
    "pmml": _lazy("pmml"),
    "rdata": _lazy("rdata", "convert_rds"),
    "spark": _lazy("spark"),
}

ALIASES = {
    "scikit-learn": "sklearn",
    "pytorch": "torch",
    "torchscript": "torch",
    "r": "rdata",
    "rds": "rdata",
    "lgbm": "lightgbm",
    "xgb": "xgboost",
    "sparkml": "spark",
    "spark-ml": "spark",
    "pyspark": "spark",
}

_SUFFIXES = {
    ".pkl": "sklearn",
    ".pickle": "sklearn",
    ".joblib": "sklearn",
    ".ubj": "xgboost",
    ".cbm": "catboost",
    ".onnx": "onnx",
    ".pt": "torch",
    ".pth": "torch",
    ".torchscript": "torch",
    ".pmml": "pmml",
    ".rds": "rdata",
    ".rdata": "rdata",
    ".rda": "rdata",
}


def _sniff(path: Path) -> str | None:
    """The framework a file's first bytes reveal, for suffixes that do not say (.json, .txt, .model, ...)."""
    with open(path, "rb") as handle:
        head = handle.read(4096)
    text = head.lstrip()
    if head.startswith(b"CBM1"):
        return "catboost"
    if text.startswith(b"tree\n") and b"version=" in head:
        return "lightgbm"
    if (text.startswith(b"{") and b'"learner"' in head) or head.startswith(b"binf"):
        return "xgboost"  # JSON, or the legacy binary format (refused with advice by the converter)
    if text.startswith(b"<") and b"<PMML" in head:
        return "pmml"
    if head.startswith((b"RDX2", b"RDX3", b"X\n", b"\x1f\x8b")):
        return "rdata"  # R's serialisation (saveRDS writes it gzip-compressed by default)
    if head.startswith(b"PK") and zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            if any(n.endswith(("/constants.pkl", "/data.pkl")) for n in archive.namelist()):
                return "torch"
    if head[:1] == b"\x80":
        return "sklearn"  # a pickle (protocol 2+)
    return None


def _is_spark_pipeline(path: Path) -> bool:
    """What `PipelineModel.write().save()` writes: stages/, and metadata/part-* whose JSON names a Spark ML class."""
    parts = sorted((path / "metadata").glob("part-*")) if (path / "stages").is_dir() else []
    if not parts:
        return False
    with open(parts[0], "rb") as handle:
        head = handle.read(4096)
    return head.lstrip().startswith(b"{") and b'"class":"org.apache.spark.ml.' in head


def detect_framework(source: str) -> str:
    """The framework of `source`, from its suffix or its contents; `module:attr` is a PyTorch module."""
    path = Path(source)
    if not path.exists():
        if ":" in source and not source.startswith(("/", ".")):
            return "torch"
        raise ConversionError(f"{source!r} does not exist")
    if path.is_dir():
        if _is_spark_pipeline(path):
            return "spark"
        raise ConversionError(
            f"{source!r} is a directory; give the model file itself (directories are read only as a Spark ML "
            "PipelineModel: metadata/ and stages/)"
        )
    by_suffix = _SUFFIXES.get(path.suffix.lower())
    if by_suffix is not None:
        return by_suffix
    sniffed = _sniff(path)
    if sniffed is None:
        raise ConversionError(
            f"cannot tell which framework wrote {path.name!r}; pass --framework (one of {', '.join(CONVERTERS)})"
        )
    return sniffed


def resolve_framework(name: str) -> str:
    """The CONVERTERS key of a framework name or alias (`--framework`)."""
    key = ALIASES.get(name.lower(), name.lower())
    if key not in CONVERTERS:
        raise ConversionError(f"unknown framework {name!r}; supported: {', '.join(CONVERTERS)}")
    return key


def convert(source: str | Path, framework: str | None = None, options: ConvertOptions | None = None) -> Conversion:
    """Convert one native model to ONNX with its serving signature (no parity check, nothing written)."""
    source = str(source)
    key = resolve_framework(framework) if framework else detect_framework(source)
    if Path(source).is_file() and Path(source).stat().st_size == 0:
        raise ConversionError(f"{source!r} is empty")
    return CONVERTERS[key](source, options or ConvertOptions())


def source_hash(source: str) -> str:
    """sha256 of the source file (or, for `module:attr`, of the module's file when there is one).

    A directory (a Spark PipelineModel) hashes its files' relative paths and bytes in path order, leaving
    out Hadoop's .crc checksum files.
    """
    path = Path(source)
    if path.is_dir():
        digest = hashlib.sha256()
        for part in sorted(p for p in path.rglob("*") if p.is_file() and not p.name.endswith(".crc")):
            digest.update(str(part.relative_to(path)).encode() + b"\0")
            digest.update(part.read_bytes())
        return f"sha256:{digest.hexdigest()}"
    if not path.is_file():
        module = sys.modules.get(source.split(":", 1)[0])
        file = getattr(module, "__file__", None)
        if not file:
            return ""
        path = Path(file)
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return f"sha256:{digest.hexdigest()}"


def _versions(conversion: Conversion) -> dict[str, str]:
    found = {"python": platform.python_version()}
    for package in ("onnxgate", "numpy", "onnx", "onnxruntime"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    found.update(conversion.library_versions)
    return found


@dataclass
class Outcome:
    """What `convert_to_repository` did: the report always, the version directory when published."""

    published: Path | None
    report: dict[str, Any]
    parity: parity.ParityReport


def _report(source: str, conversion: Conversion, check: parity.ParityReport) -> dict[str, Any]:
    return {
        "status": "published" if check.passed else "refused",
        "source": Path(source).name if Path(source).exists() else source,
        "source_hash": source_hash(source),
        "framework": conversion.framework,
        "task": conversion.task,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "inputs": publish.signature(conversion.inputs),
        "columns": feature_columns(conversion),
        "outputs": publish.signature(conversion.outputs),
        "labels": conversion.labels,
        "opsets": graph.opsets(conversion.model),
        "library_versions": _versions(conversion),
        "parity": check.to_dict(),
        "notes": conversion.notes,
    }


Progress = Callable[[str], None]


@dataclass
class Attached:
    """What a caller publishes with a conversion (the learning loop's training record, `learning/training.py`).

    `files`: paths inside the version directory -> bytes, or a file or directory to copy; `sample`:
    rows for the parity check when no sample file is given (the training data); `report`: entries
    added to the conversion report.
    """

    files: dict[str, bytes | Path] = field(default_factory=dict)
    sample: Rows | None = None
    sample_origin: str = ""
    report: dict[str, Any] = field(default_factory=dict)


@dataclass
class Checked:
    """A conversion that went through the parity check, ready to publish when `parity.passed`."""

    conversion: Conversion
    report: dict[str, Any]
    parity: parity.ParityReport
    files: dict[str, bytes | Path]


def convert_and_check(
    source: str | Path,
    framework: str | None = None,
    *,
    sample_path: str | Path | None = None,
    rows: int = sample.DEFAULT_ROWS,
    tolerance: parity.Tolerance | None = None,
    input_shape: tuple[int, ...] | None = None,
    seed: int = 0,
    progress: Progress | None = None,
    attach: Callable[[Conversion], Attached] | None = None,
) -> Checked:
    """Convert and check parity, writing nothing: the first half of `convert_to_repository`.

    `attach` sees the conversion before the parity check (it may refuse it with a ConversionError)
    and returns what is published with it. Parity rows: `sample_path`, else the attached sample,
    else rows generated from the signature.
    """
    say = progress or (lambda _stage: None)
    source = str(source)
    options = ConvertOptions(sample_path=str(sample_path) if sample_path else None, input_shape=input_shape)
    say("convert: loading and converting the model")
    conversion = convert(source, framework, options)
    attached = attach(conversion) if attach is not None else Attached()
    say("parity: running the original model and onnxruntime on sample rows")
    given: Rows | None = None
    if sample_path:
        # read once as the file gives the numbers; onnxruntime gets them cast (parity.check, `given`)
        if conversion.input_columns is None and not conversion.column_inputs:
            # a model that does not name its columns takes a sample's header, matched by position
            conversion.input_columns = sample.header_columns(sample_path, conversion.inputs)
        given = sample.read_file(sample_path, conversion.inputs, conversion.input_columns, cast=False)
        sample_rows = sample.cast_rows(given, conversion.inputs)
        origin = f"user file {Path(sample_path).name}"
    elif attached.sample is not None:
        sample_rows, origin = attached.sample, attached.sample_origin
    else:
        sample_rows = sample.from_signature(conversion, rows, np.random.default_rng(seed))
        origin = f"generated from the model's signature (seed {seed})"
    sample.row_count(sample_rows)
    check = parity.check(conversion, sample_rows, origin, tolerance, given)
    report = _report(source, conversion, check)
    report.update(attached.report)
    return Checked(conversion, report, check, attached.files)


def convert_to_repository(
    source: str | Path,
    repository: str | Path,
    name: str,
    framework: str | None = None,
    *,
    sample_path: str | Path | None = None,
    rows: int = sample.DEFAULT_ROWS,
    tolerance: parity.Tolerance | None = None,
    input_shape: tuple[int, ...] | None = None,
    seed: int = 0,
    progress: Progress | None = None,
    attach: Callable[[Conversion], Attached] | None = None,
) -> Outcome:
    """Convert, check parity, and publish the next version of `name` - or refuse and publish nothing.

    Raises ConversionError when the model cannot be converted at all; a parity failure is not an
    exception but an Outcome with `published` None and the report saying where values differ.
    `attach` adds files to the version (see `Attached`).
    """
    say = progress or (lambda _stage: None)
    checked = convert_and_check(
        source,
        framework,
        sample_path=sample_path,
        rows=rows,
        tolerance=tolerance,
        input_shape=input_shape,
        seed=seed,
        progress=progress,
        attach=attach,
    )
    if not checked.parity.passed:
        return Outcome(None, checked.report, checked.parity)
    say("publish: writing the version directory")
    directory = publish.publish(repository, name, checked.conversion, checked.report, checked.files)
    return Outcome(directory, checked.report, checked.parity)


def report_json(outcome: Outcome) -> str:
    return json.dumps(outcome.report, indent=2, sort_keys=True)

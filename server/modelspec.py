"""What the gateway knows of a model version: its signature, batching and version policy.

Built from the ONNX graph, completed or overridden by Triton's `config.pbtxt` (the ModelConfig
message in protobuf text format) at `<model>/config.pbtxt`, and by an onnxgate version-level
`<model>/<version>/config.pbtxt` (what `onnxgate convert` writes: that version's own signature).
The merged ModelConfig is what the ModelConfig RPC reports, as Triton would.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from google.protobuf import json_format, text_format

from onnxgate.server.errors import InvalidArgument
from onnxgate.server.pb import model_config_pb2 as mc
from onnxgate.server.tensors import BY_CONFIG_ENUM, DATATYPES

log = logging.getLogger(__name__)

CONFIG_FILE = "config.pbtxt"
_FILENAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", re.ASCII)
MODEL_CARD_FILE = "model_card.json"  # written by the learning loop (learning/decisions.py)
PLATFORM = "onnxruntime_onnx"


class ConfigError(Exception):
    """A config file that cannot be used; the message says which file and what is wrong."""


class Unsupported(ConfigError):
    """A model onnxgate does not serve (another platform or backend, a tensor type it cannot carry)."""


@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: str  # Open Inference Protocol datatype
    shape: tuple[int, ...]  # full shape; -1 = any size (the batch dimension included when batching)


@dataclass(frozen=True)
class VersionPolicy:
    kind: str  # "latest", "all" or "specific"
    latest: int = 1
    versions: tuple[int, ...] = ()

    def select(self, available: list[int]) -> list[int]:
        available = sorted(available)
        if self.kind == "all":
            return available
        if self.kind == "specific":
            return [v for v in available if v in self.versions]
        return available[-self.latest :] if self.latest > 0 else []


@dataclass(frozen=True)
class ModelSpec:
    name: str
    max_batch_size: int
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    labels: dict[str, list[str]]  # output name -> class labels (from label_filename)
    config: mc.ModelConfig  # the merged config, as reported by the ModelConfig RPC

    def output(self, name: str) -> TensorSpec | None:
        return next((o for o in self.outputs if o.name == name), None)

    @property
    def dynamic_batching_delay_s(self) -> float | None:
        """The batcher's queue delay, or None when the config asks for no dynamic batching."""
        if self.max_batch_size <= 0 or not self.config.HasField("dynamic_batching"):
            return None
        return self.config.dynamic_batching.max_queue_delay_microseconds / 1e6


def read_config(path: Path) -> mc.ModelConfig:
    """Parse a config.pbtxt; fields of Triton's config that onnxgate does not model are skipped."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read: {e}") from e
    try:
        return text_format.Parse(_colon_before_lists(text), mc.ModelConfig(), allow_unknown_field=True)
    except text_format.ParseError as e:
        raise ConfigError(f"{path}: not a valid ModelConfig in protobuf text format: {e}") from e


_STRING_OR_LIST = re.compile(r"""("(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')|\b([A-Za-z_]\w*)\s*\[""")


def _colon_before_lists(text: str) -> str:
    """`field [ {...} ]` -> `field: [ {...} ]`: the same in text format, but protobuf can skip only the
    second form when `field` is one onnxgate does not model (Triton configs write the first)."""
    return _STRING_OR_LIST.sub(lambda m: m.group(1) or f"{m.group(2)}: [", text)


def config_from_json(text: str) -> mc.ModelConfig:
    """Triton's RepositoryModelLoad `config` parameter: the ModelConfig as JSON."""
    try:
        return json_format.Parse(text, mc.ModelConfig(), ignore_unknown_fields=True)
    except (json_format.ParseError, json.JSONDecodeError) as e:
        raise InvalidArgument(f"load parameter 'config' is not a ModelConfig in JSON: {e}") from e


def version_policy(config: mc.ModelConfig) -> VersionPolicy:
    choice = config.version_policy.WhichOneof("policy_choice")
    if choice == "all":
        return VersionPolicy("all")
    if choice == "specific":
        return VersionPolicy("specific", versions=tuple(config.version_policy.specific.versions))
    if choice == "latest":
        return VersionPolicy("latest", latest=max(1, config.version_policy.latest.num_versions))
    return VersionPolicy("latest", latest=1)


def _onnx_shape(shape: list[object]) -> tuple[int, ...]:
    # onnxruntime reports symbolic or unknown dimensions as strings or None
    return tuple(d if isinstance(d, int) and d >= 0 else -1 for d in shape)


def build_spec(
    name: str,
    model_config: mc.ModelConfig | None,
    version_config: mc.ModelConfig | None,
    onnx_inputs: list[TensorSpec],
    onnx_outputs: list[TensorSpec],
    version_dir: Path,
    default_max_batch_size: int,
) -> ModelSpec:
    """Merge model-level config, version-level config and the ONNX graph into one spec.

    Raises ConfigError when a config contradicts the graph (a name it lacks, another datatype,
    an incompatible shape): serving it would fail every request, so the version fails to load.
    """
    config = mc.ModelConfig()
    if model_config is not None:
        config.CopyFrom(model_config)
    if version_config is not None:
        if version_config.input or version_config.output or version_config.max_batch_size:
            # a version's own signature replaces the model-level one whole: its dims only make sense
            # with its own max_batch_size
            del config.input[:]
            del config.output[:]
            config.input.extend(version_config.input)
            config.output.extend(version_config.output)
            config.max_batch_size = version_config.max_batch_size
        if version_config.HasField("dynamic_batching"):
            config.dynamic_batching.CopyFrom(version_config.dynamic_batching)
        for key, value in version_config.parameters.items():
            config.parameters[key].CopyFrom(value)
    card = version_dir / MODEL_CARD_FILE
    if card.is_file():  # a version the learning loop published: its lineage, in ModelConfig's parameters
        config.parameters["model_card"].string_value = card.read_text(encoding="utf-8", errors="replace")
    config.name = name
    if config.platform and config.platform != PLATFORM:
        raise Unsupported(f"model {name!r}: platform {config.platform!r} is not served; onnxgate serves {PLATFORM!r}")
    if config.backend and config.backend != "onnxruntime":
        raise Unsupported(f"model {name!r}: backend {config.backend!r} is not served; onnxgate serves 'onnxruntime'")
    config.platform = PLATFORM
    config.backend = "onnxruntime"

    batchable = all(t.shape and t.shape[0] == -1 for t in (*onnx_inputs, *onnx_outputs))
    if not config.input and not config.output and config.max_batch_size == 0:
        # as Triton's auto-complete does: a graph batchable on every tensor gets the default batch size
        config.max_batch_size = default_max_batch_size if batchable else 0
    if config.max_batch_size < 0:
        raise ConfigError(f"model {name!r}: max_batch_size {config.max_batch_size} is negative")
    if config.max_batch_size > 0 and not batchable:
        raise ConfigError(
            f"model {name!r}: max_batch_size {config.max_batch_size} needs a variable first dimension on every "
            "input and output of the ONNX graph; set max_batch_size 0 and give full dims"
        )
    inputs = _merge(name, "input", config.input, onnx_inputs, config.max_batch_size, mc.ModelInput)
    outputs = _merge(name, "output", config.output, onnx_outputs, config.max_batch_size, mc.ModelOutput)
    labels = {}
    for out in config.output:
        if out.label_filename:
            labels[out.name] = _read_labels(version_dir, out.label_filename, name)
    return ModelSpec(name, config.max_batch_size, inputs, outputs, labels, config)


def _merge(
    model: str,
    kind: str,
    declared: object,
    actual: list[TensorSpec],
    max_batch_size: int,
    message: type[mc.ModelInput] | type[mc.ModelOutput],
) -> tuple[TensorSpec, ...]:
    entries = list(declared)  # type: ignore[call-overload]
    by_name = {t.name: t for t in actual}
    if not entries:
        # nothing declared: report what the graph says, in Triton's form (dims without the batch dim)
        for t in actual:
            dims = t.shape[1:] if max_batch_size > 0 else t.shape
            entries.append(message(name=t.name, data_type=DATATYPES[t.datatype].config_enum, dims=dims))  # type: ignore[arg-type]
        declared.extend(entries)  # type: ignore[attr-defined]
    specs = []
    for entry in entries:
        graph = by_name.get(entry.name)
        if graph is None:
            raise ConfigError(
                f"model {model!r}: config {kind} {entry.name!r} is not in the ONNX graph ({', '.join(by_name)})"
            )
        dtype = BY_CONFIG_ENUM.get(entry.data_type)
        if entry.data_type == mc.TYPE_INVALID:
            entry.data_type = DATATYPES[graph.datatype].config_enum
        elif dtype is None or dtype.name != graph.datatype:
            raise ConfigError(
                f"model {model!r}: config {kind} {entry.name!r} has data_type {mc.DataType.Name(entry.data_type)}, "
                f"the ONNX graph has {graph.datatype}"
            )
        if not entry.dims:
            entry.dims.extend(graph.shape[1:] if max_batch_size > 0 else graph.shape)
        shape = ((-1,) if max_batch_size > 0 else ()) + tuple(entry.dims)
        if len(shape) != len(graph.shape) or any(
            g not in (-1, s) and s != -1 for g, s in zip(graph.shape, shape, strict=True)
        ):
            raise ConfigError(
                f"model {model!r}: config {kind} {entry.name!r} has shape {list(shape)} (max_batch_size "
                f"{max_batch_size}), the ONNX graph has {list(graph.shape)}"
            )
        # the more specific of the two: a config may pin a dimension the graph leaves open
        merged = tuple(s if s != -1 else g for g, s in zip(graph.shape, shape, strict=True))
        if max_batch_size > 0:
            merged = (-1, *merged[1:])
        specs.append(TensorSpec(entry.name, graph.datatype, merged))
    return tuple(specs)


def check_filename(model: str, field: str, filename: str) -> None:
    """A file a config names (default_model_filename, label_filename) is one portable name in the
    model's directories: never a path, so an uploaded config cannot read /etc/passwd as labels."""
    if _FILENAME.fullmatch(filename) is None or len(filename) > 255:
        raise ConfigError(
            f"model {model!r}: {field} {filename[:300]!r} is not a file name in the model directory (letters,"
            " digits, '_', '.', '-', not starting with '.' or '-'; no '/')"
        )


def _read_labels(version_dir: Path, filename: str, model: str) -> list[str]:
    check_filename(model, "label_filename", filename)
    for path in (version_dir / filename, version_dir.parent / filename):
        if path.is_file():
            return [line.strip() for line in path.read_text().splitlines() if line.strip()]
    raise ConfigError(f"model {model!r}: label_filename {filename!r} not found in {version_dir} or its model directory")


def onnx_signature(items: list[object]) -> list[TensorSpec]:
    """TensorSpecs of onnxruntime's NodeArg list."""
    specs = []
    for arg in items:
        dtype = next((d for d in DATATYPES.values() if d.onnx == arg.type), None)  # type: ignore[attr-defined]
        if dtype is None:
            raise Unsupported(f"tensor {arg.name!r} has type {arg.type}, which onnxgate cannot serve")  # type: ignore[attr-defined]
        specs.append(TensorSpec(arg.name, dtype.name, _onnx_shape(arg.shape)))  # type: ignore[attr-defined]
    return specs

"""PyTorch modules: a TorchScript file, a whole pickled module (torch.save), or `module:attr`.

Exported with a dynamic batch axis on every input and output. The row shape comes from
--input-shape, else from the --sample file, else from the first Linear layer's in_features.
The TorchScript (legacy) exporter is tried first: it handles scripted modules, needs no onnxscript
and writes weights inside the one model.onnx; the dynamo exporter is the fallback for modules it
cannot trace.

`module:attr` imports Python code and `torch.load` unpickles it: convert only sources you trust.
"""

from __future__ import annotations

import importlib
import io
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from onnxgate.converters import graph, sample
from onnxgate.converters.base import Conversion, ConversionError, ConvertOptions, Rows, TensorSpec, require

OPSET = 17


def _torch() -> Any:
    return require("torch")


def _from_reference(reference: str) -> Any:
    module_name, _, attr = reference.partition(":")
    if str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))  # `module:attr` names a module of the user's project
    try:
        found: Any = importlib.import_module(module_name)
    except ImportError as error:
        raise ConversionError(f"cannot import {module_name!r} for {reference!r}: {error}") from error
    for part in attr.split("."):
        if not hasattr(found, part):
            raise ConversionError(f"{module_name!r} has no attribute {attr!r}")
        found = getattr(found, part)
    torch = _torch()
    if isinstance(found, type) or (callable(found) and not isinstance(found, torch.nn.Module)):
        found = found()  # a module class or a factory function: build it with its defaults
    return found


def _from_file(path: Path) -> Any:
    torch = _torch()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # TorchScript files are what we are given
            return torch.jit.load(str(path), map_location="cpu")
    except (RuntimeError, ValueError) as script_error:
        try:
            loaded = torch.load(str(path), map_location="cpu", weights_only=False)
        except Exception as error:  # torch.load raises pickle, zip and runtime errors alike
            raise ConversionError(
                f"{path.name} is neither a TorchScript file nor a saved module: {script_error}"
            ) from error
    if isinstance(loaded, dict):
        raise ConversionError(
            f"{path.name} holds a state dict (weights only): give the module as module:attr, loading the weights there"
        )
    return loaded


def load(source: str) -> Any:
    torch = _torch()
    path = Path(source)
    module = _from_file(path) if path.is_file() else _from_reference(source)
    if not isinstance(module, torch.nn.Module | torch.jit.ScriptModule):
        raise ConversionError(f"{source!r} is a {type(module).__name__}, not a torch.nn.Module")
    return module.eval()


def _row_shape(module: Any, options: ConvertOptions) -> tuple[int, ...]:
    if options.input_shape:
        return tuple(options.input_shape)
    if options.sample_path:
        if Path(options.sample_path).suffix.lower() == ".npy":  # an array keeps its row shape (images too)
            return tuple(int(d) for d in np.load(options.sample_path, mmap_mode="r").shape[1:])
        # a table gives flat rows: its width is the row shape of a model that reads vectors
        rows = sample.read_file(options.sample_path, [TensorSpec("input", "FP32", (-1, -1))])
        return tuple(int(d) for d in rows["input"].shape[1:]) if rows["input"].ndim > 1 else ()
    for _, layer in module.named_modules():
        kind = getattr(layer, "original_name", type(layer).__name__)
        if kind == "Linear":
            return (int(layer.weight.shape[1]),)
    raise ConversionError("cannot tell this module's input shape: pass --input-shape (one row, e.g. 3,32,32)")


def _export(module: Any, example: Any, output_names: list[str]) -> onnx.ModelProto:
    torch = _torch()
    axes = {name: {0: graph.BATCH} for name in ["input", *output_names]}
    errors = []
    for dynamo in (False, True):
        buffer = io.BytesIO()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the exporters warn about their own deprecations
                if dynamo:
                    program = torch.onnx.export(
                        module,
                        (example,),
                        input_names=["input"],
                        output_names=output_names,
                        dynamic_shapes=({0: torch.export.Dim("batch")},),
                        opset_version=OPSET,
                        dynamo=True,
                    )
                    return onnx.load_from_string(program.model_proto.SerializeToString())
                torch.onnx.export(
                    module,
                    (example,),
                    buffer,
                    input_names=["input"],
                    output_names=output_names,
                    dynamic_axes=axes,
                    opset_version=OPSET,
                    dynamo=False,
                )
                return onnx.load_from_string(buffer.getvalue())
        except Exception as error:  # each exporter fails in its own ways; the user sees both reasons
            errors.append(f"{'dynamo' if dynamo else 'torchscript'} exporter: {type(error).__name__}: {error}")
    raise ConversionError("torch.onnx.export failed:\n  " + "\n  ".join(errors))


def convert(source: str, options: ConvertOptions) -> Conversion:
    torch = _torch()
    module = load(source)
    row_shape = _row_shape(module, options)
    example = torch.zeros((2, *row_shape), dtype=torch.float32)
    with torch.no_grad():
        try:
            result = module(example)
        except Exception as error:  # the module's own code fails: the shape is probably wrong
            if not options.input_shape and options.sample_path:
                # TorchScript errors carry the script's own traceback; its last line says what failed
                reason = ([line for line in str(error).splitlines() if line.strip()] or [type(error).__name__])[-1]
                raise ConversionError(
                    f"the module fails on rows of shape {list(row_shape)} taken from the sample file"
                    f" {Path(options.sample_path).name!r} ({reason.strip()[:300]}):"
                    " a table gives flat rows; a model that reads more dimensions (an image, a sequence) needs"
                    " --input-shape with one row's shape, e.g. --input-shape 3,32,32 (the file's columns are"
                    " then read in that shape, row-major)"
                ) from error
            raise ConversionError(
                f"the module fails on an input of shape {list(example.shape)}: {error}; pass --input-shape"
                " with one row's shape (e.g. 3,32,32)"
            ) from error
    output_names = [f"output{i}" for i in range(len(result))] if isinstance(result, tuple | list) else ["output"]
    model = _export(module, example, output_names)
    graph.set_batch_dims(model)
    graph.check(model)

    def predict_native(rows: Rows) -> Rows:
        with torch.no_grad():
            out = module(torch.from_numpy(np.ascontiguousarray(rows["input"])))
        values = out if isinstance(out, tuple | list) else [out]
        return {name: v.detach().numpy() for name, v in zip(output_names, values, strict=True)}

    return Conversion(
        model=model,
        inputs=[TensorSpec("input", "FP32", (-1, *row_shape))],
        outputs=graph.graph_outputs(model),
        task="other",
        framework="torch",
        predict_native=predict_native,
        library_versions={"torch": torch.__version__},
        notes=[f"module {type(module).__name__}, exported at opset {OPSET} with a dynamic batch axis"],
    )

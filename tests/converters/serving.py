"""Ask a real gateway for a converted model's answers through tritonclient, as a client would."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient

_DATATYPES = {np.dtype(np.float32): "FP32", np.dtype(np.float64): "FP64", np.dtype(np.int64): "INT64"}


def served(
    start_gateway: Callable[..., Any], repository: Path, model: str, feeds: dict[str, np.ndarray], outputs: list[str]
) -> dict[str, np.ndarray]:
    """Start a gateway on `repository` and return `outputs` of `model` for `feeds` (object arrays: BYTES)."""
    handle = start_gateway(repository)
    client = grpcclient.InferenceServerClient(handle.address)
    try:
        assert client.is_model_ready(model)  # the newest version
        tensors = []
        for name, values in feeds.items():
            datatype = "BYTES" if values.dtype == object else _DATATYPES[values.dtype]
            tensor = grpcclient.InferInput(name, list(values.shape), datatype)
            tensor.set_data_from_numpy(values)
            tensors.append(tensor)
        result = client.infer(model, tensors, outputs=[grpcclient.InferRequestedOutput(n) for n in outputs])
        answers: dict[str, np.ndarray] = {}
        for name in outputs:
            array = result.as_numpy(name)
            assert array is not None, f"the gateway did not answer {name!r}"
            answers[name] = array
        return answers
    finally:
        client.close()


def text(values: np.ndarray) -> list[str]:
    """Labels as text, whether the gateway answered BYTES or numbers."""
    return [v.decode() if isinstance(v, bytes) else str(v) for v in np.asarray(values).reshape(-1)]

"""Triton (nvidia-pytriton 0.7.0's bundled server, Python backend) serving bench/peers.py's sklearn models.

Runs inside .venv-pytriton (numpy<2) with LD_LIBRARY_PATH set to the Python installation's lib
directory. Each model is bound with an infer function that calls the sklearn model's predict_proba
(the same joblib pickle MLServer loads) and answers `label` (INT64) and `probabilities` (FP32), like
onnxgate. Batching is on (max_batch_size 256, pytriton's default dynamic batcher, no queue delay).
Prints `pytriton: ready` on stderr once every model is bound and serving.

    python bench/peers_triton.py --models DIR --grpc-port P --http-port P --metrics-port P
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import joblib
import numpy as np
from pytriton.decorators import batch
from pytriton.model_config import ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig


def infer_function(clf):  # type: ignore[no-untyped-def]
    @batch
    def infer(input):  # type: ignore[no-untyped-def]
        # C-contiguous: pytriton's shared-memory copy rejects other layouts (MLPClassifier's predict_proba)
        proba = np.ascontiguousarray(clf.predict_proba(input), dtype=np.float32)
        return {"label": proba.argmax(axis=1).astype(np.int64).reshape(-1, 1), "probabilities": proba}

    return infer


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", required=True, type=Path, help="directory of NAME.joblib files")
    ap.add_argument("--grpc-port", type=int, required=True)
    ap.add_argument("--http-port", type=int, required=True)
    ap.add_argument("--metrics-port", type=int, required=True)
    ap.add_argument("--features", type=int, default=20)
    args = ap.parse_args()
    config = TritonConfig(grpc_port=args.grpc_port, http_port=args.http_port, metrics_port=args.metrics_port)
    with Triton(config=config) as triton:
        for path in sorted(args.models.glob("*.joblib")):
            triton.bind(
                model_name=path.stem,
                infer_func=infer_function(joblib.load(path)),
                inputs=[Tensor(name="input", dtype=np.float32, shape=(args.features,))],
                outputs=[
                    Tensor(name="label", dtype=np.int64, shape=(1,)),
                    Tensor(name="probabilities", dtype=np.float32, shape=(-1,)),
                ],
                config=ModelConfig(max_batch_size=256),
                strict=False,
            )
        print("pytriton: ready", file=sys.stderr, flush=True)
        triton.serve()


if __name__ == "__main__":
    main()

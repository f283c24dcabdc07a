#!/usr/bin/env bash
# Creates the peers' venvs for bench/peers.py (benchmarks only; not used by the test suite or CI).
#   .venv-mlserver: mlserver 1.7.1 + mlserver-sklearn 1.7.1 (unpinned, pip backtracks to 1.4) and
#                   uvloop 0.21.0 (0.23 breaks its worker start-up)
#   .venv-pytriton: nvidia-pytriton 0.7.0 (bundles Triton server 2.51, Python backend only), numpy<2
# scikit-learn is pinned to the main venv's version in both so the joblib pickles load unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
SKL=$(.venv/bin/python -c 'import sklearn; print(sklearn.__version__)')
if [ ! -x .venv-mlserver/bin/python ]; then
  "$PY" -m venv .venv-mlserver
fi
.venv-mlserver/bin/pip install -q mlserver==1.7.1 mlserver-sklearn==1.7.1 uvloop==0.21.0 "scikit-learn==$SKL"
if [ ! -x .venv-pytriton/bin/python ]; then
  "$PY" -m venv .venv-pytriton
fi
.venv-pytriton/bin/pip install -q nvidia-pytriton==0.7.0 "numpy<2" "scikit-learn==$SKL" joblib
echo "peers ready: .venv-mlserver .venv-pytriton"

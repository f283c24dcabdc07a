#!/usr/bin/env bash
# System and Python packages for the Python-ecosystem converter tests (tests/converters).
# Idempotent and quiet: skips what is already installed. Run as root; VENV defaults to .venv.
set -euo pipefail
cd "$(dirname "$0")/../.."
VENV="${VENV:-.venv}"

# Debian's xgboost command-line tool (C++, 1.7) trains a fixture model from a .conf + libsvm file
if ! command -v xgboost >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq --no-install-recommends xgboost >/dev/null
fi

# the converters extra: onnxmltools, xgboost-cpu, lightgbm, catboost, torch (CPU wheel on disk), ...
if ! "$VENV/bin/python" -c 'import onnxmltools, xgboost, lightgbm, catboost, torch, pandas, joblib' 2>/dev/null; then
    "$VENV/bin/pip" install -q -e '.[dev,converters]'
fi

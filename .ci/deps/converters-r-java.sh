#!/usr/bin/env bash
# Toolchains for the PMML and R converter tests: R (Debian r-base-core, r-cran-randomforest) trains
# and saves fixture models and is the parity reference for them; Java runs JPMML (PyPI sklearn2pmml,
# which writes the PMML fixtures) and pypmml (the PMML reference scorer).
# Idempotent and quiet: installs only what is missing. Run as root; VENV defaults to .venv.
# sklearn2pmml refuses scikit-learn 1.9.1, so it gets its own environment (PMML_VENV, .venv-pmml)
# with scikit-learn 1.9.0; the test suite finds it there.
set -euo pipefail
cd "$(dirname "$0")/../.."
VENV="${VENV:-.venv}"
PMML_VENV="${PMML_VENV:-.venv-pmml}"

missing=()
command -v Rscript >/dev/null 2>&1 || missing+=(r-base-core)
[ -d /usr/lib/R/site-library/randomForest ] || missing+=(r-cran-randomforest)
command -v java >/dev/null 2>&1 || missing+=(default-jre-headless)
if [ "${#missing[@]}" -gt 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# the pmml and r extras: pypmml (reference scorer) and rdata (reads RDS)
if ! "$VENV/bin/python" -c 'import pypmml, rdata' 2>/dev/null; then
    "$VENV/bin/pip" install -q -e '.[pmml,r]'
fi

if [ ! -x "$PMML_VENV/bin/python" ]; then
    python3 -m venv "$PMML_VENV"
fi
if ! "$PMML_VENV/bin/python" -c 'import sklearn2pmml, pandas' 2>/dev/null; then
    "$PMML_VENV/bin/pip" install -q 'scikit-learn==1.9.0' 'sklearn2pmml==0.133.*' 'pandas>=2'
fi

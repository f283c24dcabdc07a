#!/usr/bin/env bash
# Triton's perf_analyzer, the load tool Triton users already have, to test interop with it:
# the binary inside the tritonclient 2.41 wheel (newer ones need glibc 2.38), which needs Debian's
# libb64 and libcudart from PyPI's nvidia-cuda-runtime-cu12 (no GPU is used). Kept in .venv-pa.
set -euo pipefail
cd "$(dirname "$0")/../.."
PA_VENV=.venv-pa
if [ -x "$PA_VENV/bin/perf_analyzer" ]; then
    exit 0
fi
if ! ldconfig -p | grep -q libb64.so.0d; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq --no-install-recommends libb64-0d >/dev/null
fi
python3 -m venv "$PA_VENV"
"$PA_VENV/bin/pip" install -q nvidia-cuda-runtime-cu12
tmp=$(mktemp -d)
"$PA_VENV/bin/pip" download -q --no-deps -d "$tmp" tritonclient==2.41.0
python3 -m zipfile -e "$tmp"/tritonclient-2.41.0-*.whl "$tmp/x"
install -m 0755 "$tmp/x/tritonclient-2.41.0.data/data/bin/perf_analyzer" "$PA_VENV/bin/perf_analyzer.bin"
cuda=$("$PA_VENV/bin/python" -c 'import nvidia.cuda_runtime as m, os; print(os.path.join(list(m.__path__)[0], "lib"))')
printf '#!/bin/sh\nLD_LIBRARY_PATH="%s${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" exec "%s" "$@"\n' "$cuda" "$(pwd)/$PA_VENV/bin/perf_analyzer.bin" > "$PA_VENV/bin/perf_analyzer"
chmod +x "$PA_VENV/bin/perf_analyzer"
rm -rf "$tmp"

#!/usr/bin/env bash
# The Node.js client the tests drive (@grpc/grpc-js, @grpc/proto-loader), pinned by package-lock.json.
# Idempotent: reinstalls only when the lock file is newer than the last install.
set -euo pipefail
cd "$(dirname "$0")/../../tests/node"
if ! command -v node >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq --no-install-recommends nodejs npm >/dev/null
fi
if [ ! -f node_modules/.installed ] || [ package-lock.json -nt node_modules/.installed ]; then
    npm ci --no-audit --no-fund --loglevel=error >/dev/null
    touch node_modules/.installed
fi

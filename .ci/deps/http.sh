#!/usr/bin/env bash
# The HTTP/REST edge's client tools: curl runs the README's commands as written (tests/rest/
# test_readme_curl.py). Idempotent and quiet: installs only what is missing. Run as root.
set -euo pipefail

if ! command -v curl >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq --no-install-recommends curl ca-certificates >/dev/null
fi

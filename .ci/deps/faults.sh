#!/usr/bin/env bash
# Fault injection for the prediction-log tests (tests/predlog/test_e2e_faults.py, test_e2e_promises.py,
# test_segments.py): util-linux's prlimit (a file size limit: writes fail as on a full disk), Debian's
# faketime (a process clock shifted), strace (which fsyncs a process makes).
# Idempotent and quiet: installs only what is missing. Run as root.
set -euo pipefail

missing=()
command -v prlimit >/dev/null 2>&1 || missing+=(util-linux)
command -v faketime >/dev/null 2>&1 || missing+=(faketime)
command -v strace >/dev/null 2>&1 || missing+=(strace)
if [ "${#missing[@]}" -gt 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

#!/usr/bin/env bash
# A real Prometheus for the metrics test (tests/core/test_prometheus.py): Debian's `prometheus` package
# for its two binaries, `prometheus` (scrapes a live gateway, answers PromQL) and `promtool` (checks the
# exposition text). The package's postinst would start a system service; a policy-rc.d that refuses
# (exit 101) keeps it stopped, so nothing listens on 9090 after this script.
# Idempotent and quiet: installs only what is missing. Run as root.
set -euo pipefail

if ! command -v prometheus >/dev/null 2>&1 || ! command -v promtool >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    policy=/usr/sbin/policy-rc.d
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy"
        chmod +x "$policy"
        trap 'rm -f "$policy"' EXIT
    fi
    apt-get update -qq >/dev/null
    apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi

#!/usr/bin/env bash
# PySpark for the Spark export engine (tests/predlog/test_spark_export.py, bench/log_scale.py) and the Spark ML
# converter (tests/converters/test_spark.py): the spark extra (pyspark, a ~490 MB wheel, and pyspark2pmml with
# the JPMML-SparkML jars) into $VENV, and a Java runtime (Debian's default-jre-headless, as
# .ci/deps/converters-r-java.sh installs it) of version 17 or later, which Spark 4 needs.
# Idempotent and quiet: installs only what is missing. Run as root; VENV defaults to .venv.
set -euo pipefail
cd "$(dirname "$0")/../.."
VENV="${VENV:-.venv}"

if ! command -v java >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq --no-install-recommends default-jre-headless >/dev/null
fi
major="$(java -version 2>&1 | sed -n 's/.*version "\([0-9]*\).*/\1/p' | head -n1)"
if [ -z "$major" ] || [ "$major" -lt 17 ]; then
    echo "spark.sh: Spark 4 needs Java 17 or later; found: $(java -version 2>&1 | head -n1)" >&2
    exit 1
fi

if ! "$VENV/bin/python" -c 'import pyspark, pyspark2pmml' 2>/dev/null; then
    "$VENV/bin/pip" install -q -e '.[spark]'
fi

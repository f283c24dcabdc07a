"""Write ../prometheusrule.yaml from onnxgate-rules.yaml: the same groups, as the Prometheus Operator's
PrometheusRule. Run after editing the rules: `python k8s/base/alerts/sync.py` (tests/core/test_k8s.py
fails while the two differ). The rules are copied as text, comments included, indented under `spec:`."""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent
RULES = HERE / "onnxgate-rules.yaml"
TARGET = HERE.parent / "prometheusrule.yaml"

HEADER = """\
# GENERATED from alerts/onnxgate-rules.yaml by alerts/sync.py: edit that file, then run
# `python k8s/base/alerts/sync.py`. The alert rules for the Prometheus Operator (a PrometheusRule; the
# monitoring.coreos.com CRDs must be installed); promtool checks and unit-tests the same rules there.
apiVersion: monitoring.coreos.com/v1
kind: PrometheusRule
metadata:
  name: onnxgate
spec:
"""


def render() -> str:
    lines = RULES.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("groups:"))  # after the file's header
    return HEADER + "".join(f"  {line}\n" if line else "\n" for line in lines[start:])


if __name__ == "__main__":
    TARGET.write_text(render())
    print(f"wrote {TARGET}")

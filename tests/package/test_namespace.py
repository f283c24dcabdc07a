"""One import namespace: every module imports as onnxgate.*, beside a user's own top-level `server`,
`converters` and `learning` modules (names any project may have)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

_CHECK = """
import importlib, pkgutil
import server, converters, learning
import onnxgate

names = [m.name for m in pkgutil.walk_packages(onnxgate.__path__, "onnxgate.") if not m.name.endswith("__main__")]
skipped = []
for name in names:
    try:
        importlib.import_module(name)
    except ImportError as e:
        if e.name and e.name.split(".")[0] in ("server", "converters", "learning"):
            raise  # an onnxgate module reached for a top-level name: the user's module answered
        skipped.append((name, e.name))  # an optional extra that is not installed (e.g. pyspark)
assert server.WHO == converters.WHO == learning.WHO == "the user's", "onnxgate replaced the user's modules"
assert len(names) > 40, names
print(len(names), "modules;", "not installed:", sorted({n for _, n in skipped}))
"""


def test_onnxgate_imports_beside_unrelated_top_level_modules(tmp_path: Path) -> None:
    for name in ("server", "converters", "learning"):
        (tmp_path / f"{name}.py").write_text('WHO = "the user\'s"\n')
    done = subprocess.run(
        [sys.executable, "-c", _CHECK], cwd=tmp_path, env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"},
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "modules;" in done.stdout

"""The wheel stands alone: built by `python -m build`, installed into a clean virtual environment outside
the repository, it serves, answers its own client, converts a model and carries its .proto files.

Every child process runs the environment's own executables with the working directory in tmp_path and
no PYTHONPATH, so nothing can be imported from the repository by accident.
"""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import pytest

from onnxgate import __version__

REPO = Path(__file__).resolve().parents[2]
READY_LINE = re.compile(r"onnxgate: serving gRPC on (\S+) metrics on (\S+)")

CLIENT_SCRIPT = """
import json, sys
import numpy as np
from onnxgate.client import Client

with Client(sys.argv[1]) as client:
    result = client.infer("iris", {"input": np.array([[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]], np.float32)})
    feedback = client.send_feedback(result.id, label="0")
print(json.dumps({"label": result["label"].tolist(), "id": result.id, "feedback": feedback.status}))
"""

TRAIN_SCRIPT = """
import joblib
from sklearn.datasets import load_wine
from sklearn.tree import DecisionTreeClassifier

x, y = load_wine(return_X_y=True)
joblib.dump(DecisionTreeClassifier(max_depth=4, random_state=0).fit(x, y), "wine.joblib")
"""


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`python -m build`: the sdist, and the wheel built from that sdist (as an index would get them)."""
    out = tmp_path_factory.mktemp("dist")
    run = subprocess.run(
        [sys.executable, "-m", "build", "--outdir", str(out), str(REPO)], capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def venv(dist: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtual environment (no system site-packages) with only the wheel and its dependencies."""
    root = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", str(root)], check=True, timeout=120, env=_clean_env())
    wheel = next(dist.glob("onnxgate-*.whl"))
    install = subprocess.run(
        [str(root / "bin" / "python"), "-m", "pip", "install", "--quiet", str(wheel)],
        capture_output=True, text=True, timeout=600, cwd=root, env=_clean_env(),
    )  # fmt: skip
    assert install.returncode == 0, install.stderr[-3000:]
    return root


def _clean_env() -> dict[str, str]:
    """The environment without anything that points into the repository or its virtual environment."""
    drop = {"PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME", "PYTHONSAFEPATH"}
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("ONNXGATE_")}
    venv_bin = str(Path(sys.prefix) / "bin")
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if p != venv_bin)
    return env


def _run(venv: Path, cwd: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """One of the environment's executables (bin/NAME), in `cwd`, outside the repository."""
    command = [str(venv / "bin" / args[0]), *args[1:]]
    run = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=cwd, env=_clean_env())
    assert run.returncode == 0, f"{command} exited {run.returncode}:\n{run.stdout[-2000:]}\n{run.stderr[-3000:]}"
    return run


def test_sdist_and_wheel_hold_the_typed_package_and_protos(dist: Path) -> None:
    assert [p.name for p in dist.glob("*.tar.gz")] == [f"onnxgate-{__version__}.tar.gz"]
    with zipfile.ZipFile(next(dist.glob("onnxgate-*.whl"))) as wheel:
        names = set(wheel.namelist())
    protos = {f"onnxgate/proto/{p.name}" for p in (REPO / "proto").glob("*.proto")}
    stubs = {f"onnxgate/server/pb/{p.name}" for p in (REPO / "server" / "pb").glob("*.pyi")}
    assert len(protos) == 3 and len(stubs) == 3
    assert protos | stubs | {"onnxgate/py.typed", "onnxgate/client.py", "onnxgate/converters/cli.py"} <= names
    assert not [n for n in names if n.startswith(("tests/", "bench/", "server/", "converters/"))]


def test_installed_wheel_serves_and_converts(venv: Path, tmp_path: Path) -> None:
    python = venv / "bin" / "python"
    # the package imported is the installed one, and its .proto files are inside it
    where = _run(
        venv, tmp_path, "python", "-c", "import onnxgate, pathlib; print(pathlib.Path(onnxgate.__file__).parent)"
    )
    package = Path(where.stdout.strip())
    assert package.is_relative_to(venv) and not package.resolve().is_relative_to(REPO), package
    assert sorted(p.name for p in (package / "proto").glob("*.proto")) == sorted(
        p.name for p in (REPO / "proto").glob("*.proto")
    )
    assert _run(venv, tmp_path, "onnxgate", "--version").stdout == f"onnxgate {__version__}\n"

    _serve_and_call(venv, python, tmp_path)

    _run(venv, tmp_path, "python", "-c", TRAIN_SCRIPT)
    converted = _run(
        venv, tmp_path, "onnxgate", "convert", "wine.joblib", "--model-repository", "models", "--model", "wine"
    )
    assert converted.stdout.strip() == str(Path("models") / "wine" / "1")
    report = json.loads((tmp_path / "models" / "wine" / "1" / "report.json").read_text())
    assert report["status"] == "published" and report["framework"] == "sklearn"
    assert (tmp_path / "models" / "wine" / "1" / "model.onnx").is_file()


def _serve_and_call(venv: Path, python: Path, tmp_path: Path) -> None:
    """`onnxgate serve --example` from the environment, called by the environment's client, then stopped."""
    example = tmp_path / "example"
    process = subprocess.Popen(
        [str(venv / "bin" / "onnxgate"), "serve", "--example", "--grpc-port", "0", "--metrics-port", "0", "--http-port", "0",
         "--model-repository", str(example)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=tmp_path, env=_clean_env(),
    )  # fmt: skip
    lines: queue.Queue[str | None] = queue.Queue()

    def drain() -> None:  # read on a thread: a wait for the ready line can time out, and the pipe never fills
        assert process.stderr is not None
        for line in process.stderr:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=drain, daemon=True).start()
    try:
        address = _ready_address(lines)
        called = subprocess.run(
            [str(python), "-c", CLIENT_SCRIPT, address],
            capture_output=True, text=True, timeout=60, cwd=tmp_path, env=_clean_env(),
        )  # fmt: skip
        assert called.returncode == 0, called.stderr[-3000:]
        answer = json.loads(called.stdout)
        # the feedback is on disk either way; "pending" until the prediction's own record is written
        assert answer["label"] == [0, 2] and answer["id"] and answer["feedback"] in ("accepted", "pending"), answer
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
    # the example's prediction log sits beside its repository, inside tmp_path
    assert any((tmp_path / "predlog").rglob("*")), "the example server logged no prediction"


def _ready_address(lines: queue.Queue[str | None], timeout: float = 120) -> str:
    seen: list[str] = []
    while True:
        try:
            line = lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no ready line within {timeout}s:\n{''.join(seen)}") from None
        if line is None:
            raise AssertionError(f"onnxgate serve exited before serving:\n{''.join(seen)}")
        seen.append(line)
        match = READY_LINE.search(line)
        if match:
            return match.group(1)

"""A publish killed at any moment leaves only complete versions, and the hidden directory it was writing
is removed by the next publish (or the next `onnxgate learn` pass): real files, a real onnxruntime load,
a real SIGKILL at seeded random offsets of a few milliseconds into a publishing process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from google.protobuf import text_format
from onnx import TensorProto, helper

from onnxgate.converters import publish
from onnxgate.converters.base import Conversion, TensorSpec
from onnxgate.server.pb import model_config_pb2

EXTRA_BYTES = 4 << 20  # a file beside the model big enough that writing it takes milliseconds


def _conversion() -> Conversion:
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "identity",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 2])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return Conversion(
        model, [TensorSpec("x", "FP32", (-1, 2))], [TensorSpec("y", "FP32", (-1, 2))], "regression", "onnx",
        lambda rows: rows,
    )  # fmt: skip


# A clean, single-threaded process that forks a publisher on each line it reads, says the child's pid,
# and reaps it once killed (a zombie's pid still answers kill(pid, 0): it would look like a live writer).
_WORKER = """
import os, sys
from pathlib import Path
from tests.converters.test_publish_kill import EXTRA_BYTES, _conversion
from onnxgate.converters import publish

repository, conversion, extra = Path(sys.argv[1]), _conversion(), {"blob.bin": b"b" * EXTRA_BYTES}
for line in sys.stdin:
    pid = os.fork()
    if pid == 0:
        while True:
            publish.publish(repository, "m", conversion, {"status": "published"}, extra)
    print(pid, flush=True)
    sys.stdin.readline()  # killed
    os.waitpid(pid, 0)
    print("reaped", flush=True)
"""


def _complete(version: Path) -> None:
    for file in (publish.MODEL_FILE, publish.CONFIG_FILE, publish.REPORT_FILE, "blob.bin"):
        assert (version / file).is_file(), f"{file} missing from {version}"
    assert (version / "blob.bin").stat().st_size == EXTRA_BYTES
    report = json.loads((version / publish.REPORT_FILE).read_text())
    assert report["version"] == int(version.name)
    config = text_format.Parse((version / publish.CONFIG_FILE).read_text(), model_config_pb2.ModelConfig())
    assert config.name == "m" and json.loads(config.parameters["conversion_report"].string_value) == report
    session = ort.InferenceSession(str(version / publish.MODEL_FILE), providers=["CPUExecutionProvider"])
    x = np.arange(4, dtype=np.float32).reshape(2, 2)
    assert np.array_equal(session.run(None, {"x": x})[0], x)


def test_a_publish_killed_at_random_moments_leaves_only_complete_versions_and_the_next_publish_cleans_up(
    tmp_path: Path,
) -> None:
    repository = tmp_path / "repo"
    rng = np.random.default_rng(11)
    root = Path(__file__).resolve().parents[2]
    worker = subprocess.Popen(
        [sys.executable, "-c", _WORKER, str(repository)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=root,
    )  # fmt: skip
    assert worker.stdin is not None and worker.stdout is not None
    try:
        for _ in range(40):
            worker.stdin.write("go\n")
            worker.stdin.flush()
            pid = int(worker.stdout.readline())
            time.sleep(float(rng.uniform(0.0, 0.04)))  # into the first publish, or a later one
            os.kill(pid, signal.SIGKILL)
            worker.stdin.write("killed\n")
            worker.stdin.flush()
            assert worker.stdout.readline().strip() == "reaped"
    finally:
        worker.kill()
        worker.wait(10)
    model_dir = repository / "m"
    left = [p.name for p in model_dir.iterdir() if p.name.startswith(publish.STAGING_PREFIX)]
    assert left, "no publish was killed while it wrote: the offsets miss the window"
    numbered = publish.versions(model_dir)
    assert sorted(p.name for p in model_dir.iterdir() if not p.name.startswith(".")) == sorted(map(str, numbered))
    for version in numbered:
        _complete(model_dir / str(version))
    # the next publish removes what the killed ones left, and is complete itself
    new = publish.publish(repository, "m", _conversion(), {"status": "published"}, {"blob.bin": b"b" * EXTRA_BYTES})
    assert [p.name for p in model_dir.iterdir() if p.name.startswith(".")] == []
    _complete(new)
    assert int(new.name) == (numbered[-1] + 1 if numbered else 1)


def test_only_a_dead_writers_hidden_directory_is_removed(tmp_path: Path) -> None:
    model_dir = tmp_path / "m"
    model_dir.mkdir()
    host = publish._host()
    worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait(30)
    try:
        names = {
            "live": f".tmp-{worker.pid}-aa-{host}",  # a running writer on this host
            "dead": f".tmp-{dead.pid}-bb-{host}",  # its writer exited (and was reaped)
            "mine": f".tmp-{os.getpid()}-cc-{host}",  # this pid, but not being written by this process
            "elsewhere": f".tmp-{worker.pid}-dd-otherhost",  # another host's, recent: cannot ask it
            "elsewhere-old": f".tmp-{worker.pid}-ee-otherhost",
            "legacy": ".tmp-0123abcd",  # a name without a pid, recent
            "legacy-old": ".tmp-4567ef",
        }
        for name in names.values():
            (model_dir / name).mkdir()
            (model_dir / name / "model.onnx").write_bytes(b"partial")
        old = time.time() - publish.STALE_S - 60
        for key in ("elsewhere-old", "legacy-old"):
            os.utime(model_dir / names[key], (old, old))
        removed = publish.remove_leftovers(model_dir)
        assert sorted(removed) == sorted(names[k] for k in ("dead", "mine", "elsewhere-old", "legacy-old"))
        kept = {p.name for p in model_dir.iterdir()}
        assert kept == {names[k] for k in ("live", "elsewhere", "legacy")}
    finally:
        worker.kill()
        worker.wait(10)

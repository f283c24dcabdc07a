"""Uploads and files (#10 item 5): Triton's RepositoryModelLoad upload, over gRPC and REST, against a real
explicit-mode gateway. Every `file:` path that could leave the model directory or is not portable is
refused with INVALID_ARGUMENT (HTTP 400) before anything is written; nothing is written through a
symlink; an upload over max_upload_bytes is RESOURCE_EXHAUSTED (HTTP 413); a config cannot name a file
outside its model directory (label_filename, default_model_filename); the serving code never unpickles."""

from __future__ import annotations

import base64
import json
import re
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest

from onnxgate.server import repository as repository_module
from onnxgate.server.errors import InvalidArgument
from onnxgate.server.pb import grpc_service_pb2 as pb
from onnxgate.server.repository import _write_confined, upload_path
from tests.models import identity, write_version

CONFIG = json.dumps({"max_batch_size": 8})
MODEL = identity("FP32").SerializeToString()

# (file: key, what the message says)
BAD_KEYS = [
    ("/etc/evil", "absolute paths are refused"),
    ("/1/model.onnx", "absolute paths are refused"),
    ("../evil", "'..' are refused"),
    ("1/../../evil", "'..' are refused"),
    ("1/./model.onnx", "'..' are refused"),
    ("..", "'..' are refused"),
    ("1\\model.onnx", "backslashes are refused"),
    ("..\\..\\evil", "backslashes are refused"),
    ("1/model\x00.onnx", "NUL character"),
    ("1//model.onnx", "empty path component"),
    ("1/", "empty path component"),
    ("", "empty path component"),
    ("01/model.onnx", "is not a positive integer"),
    ("0/model.onnx", "is not a positive integer"),
    ("-1/model.onnx", "is not a positive integer"),
    ("x/model.onnx", "is not a positive integer"),
    ("\u0661/model.onnx", "is not a positive integer"),  # an Arabic-Indic digit: \d and str.isdigit take it
    ("99999999999999999999/model.onnx", "is not a positive integer"),
    ("1/m\u00f6del.onnx", "not a portable file name"),
    ("1/model onnx", "not a portable file name"),
    ("1/.hidden", "not a portable file name"),
    ("1/-rf", "not a portable file name"),
    ("1/model.onnx\n", "not a portable file name"),
    ("1/" + "a" * 256, "not a portable file name"),
    ("1/a/b/c/d/e/f/g/h", "more than 8 path components"),
]


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def _grpc_load(stub, name: str, parameters: dict[str, str | bytes]) -> tuple[grpc.StatusCode, str]:  # type: ignore[no-untyped-def]
    request = pb.RepositoryModelLoadRequest(model_name=name)
    for key, value in parameters.items():
        if isinstance(value, bytes):
            request.parameters[key].bytes_param = value
        else:
            request.parameters[key].string_param = value
    try:
        stub.RepositoryModelLoad(request)
    except grpc.RpcError as e:
        return e.code(), e.details() or ""
    return grpc.StatusCode.OK, ""


def _rest_load(port: int, name: str, parameters: dict[str, str | bytes]) -> tuple[int, str]:
    body = {
        "parameters": {k: base64.b64encode(v).decode() if isinstance(v, bytes) else v for k, v in parameters.items()}
    }
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v2/repository/models/{name}/load",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, ""
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())["error"]


@pytest.fixture
def explicit(start_gateway, tmp_path: Path):  # type: ignore[no-untyped-def]
    repo = tmp_path / "repo"
    write_version(repo, "served", 1, identity("FP32"))
    handle = start_gateway(repo, model_control_mode="explicit", load_model=("served",), max_upload_bytes=64 * 1024)
    return handle, repo


@pytest.mark.parametrize("protocol", ["grpc", "rest"])
def test_every_path_leaving_the_model_directory_or_not_portable_is_refused(explicit, protocol: str) -> None:  # type: ignore[no-untyped-def]
    handle, repo = explicit
    before = _tree(repo.parent)
    stub = handle.stub()
    for key, message in BAD_KEYS:
        if protocol == "rest" and "\n" in key:
            continue  # a JSON key may hold it, but the check is the same code as gRPC's
        parameters: dict[str, str | bytes] = {"config": CONFIG, "file:1/model.onnx": MODEL, f"file:{key}": b"x"}
        if protocol == "grpc":
            code, details = _grpc_load(stub, "evil", parameters)
            assert code == grpc.StatusCode.INVALID_ARGUMENT, (key, code, details)
        else:
            status, details = _rest_load(handle.gateway.http_port, "evil", parameters)
            assert status == 400, (key, status, details)
        assert message in details and "file:" in details, (key, details)
    # nothing was written anywhere: no model directory, no staging directory, nothing outside
    assert _tree(repo.parent) == before
    assert not (repo / "evil").exists()


def test_a_valid_upload_with_nested_and_top_level_files_serves(explicit) -> None:  # type: ignore[no-untyped-def]
    handle, repo = explicit
    labels = b"a\nb\nc\n"
    config = json.dumps({"max_batch_size": 8, "output": [{"name": "y", "label_filename": "labels.txt"}]})
    parameters = {
        "config": config,
        "file:1/model.onnx": MODEL,
        "file:1/extra/notes.txt": b"n",
        "file:labels.txt": labels,
    }
    assert _grpc_load(handle.stub(), "good", parameters) == (grpc.StatusCode.OK, "")
    assert (repo / "good" / "labels.txt").read_bytes() == labels
    assert (repo / "good" / "1" / "extra" / "notes.txt").read_bytes() == b"n"
    assert not [p for p in repo.iterdir() if p.name.startswith(".")]  # the staging directory is gone


@pytest.mark.parametrize("protocol", ["grpc", "rest"])
def test_duplicate_and_conflicting_paths_are_refused(explicit, protocol: str) -> None:  # type: ignore[no-untyped-def]
    handle, repo = explicit
    cases: list[dict[str, str | bytes]] = [
        {"config": CONFIG, "file:1/model.onnx": MODEL, "file:config.pbtxt": b"max_batch_size: 1"},
        {"config": CONFIG, "file:1/model.onnx": MODEL, "file:1/a": b"1", "file:1/a/b": b"2"},
    ]
    for parameters in cases:
        if protocol == "grpc":
            code, details = _grpc_load(handle.stub(), "dup", parameters)
            assert code == grpc.StatusCode.INVALID_ARGUMENT, details
        else:
            status, details = _rest_load(handle.gateway.http_port, "dup", parameters)
            assert status == 400, details
        assert "given twice" in details or "not a directory" in details, details
    assert not (repo / "dup").exists() and not [p for p in repo.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("protocol", ["grpc", "rest"])
def test_an_upload_over_the_limit_is_refused_before_anything_is_written(explicit, protocol: str) -> None:  # type: ignore[no-untyped-def]
    handle, repo = explicit
    big: dict[str, str | bytes] = {"config": CONFIG, "file:1/model.onnx": MODEL, "file:1/weights.bin": bytes(64 * 1024)}
    many: dict[str, str | bytes] = {"config": CONFIG, **{f"file:1/f{i}": b"" for i in range(1025)}}
    for parameters, message in ((big, "max_upload_bytes"), (many, "over the limit of 1024 files")):
        if protocol == "grpc":
            code, details = _grpc_load(handle.stub(), "big", parameters)
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, details
        else:
            status, details = _rest_load(handle.gateway.http_port, "big", parameters)
            assert status == 413, details
        assert message in details, details
    assert not (repo / "big").exists()
    # under the limit it loads
    assert _grpc_load(handle.stub(), "big", {"config": CONFIG, "file:1/model.onnx": MODEL})[0] == grpc.StatusCode.OK


@pytest.mark.parametrize("name", ["evil\n", "../evil", "/etc", ".upload-1-x", "-rf", "a" * 256, "m\u00f6del"])
def test_model_names_that_are_not_portable_directory_names_are_refused(explicit, name: str) -> None:  # type: ignore[no-untyped-def]
    handle, repo = explicit
    code, details = _grpc_load(handle.stub(), name, {"config": CONFIG, "file:1/model.onnx": MODEL})
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "not a valid directory name" in details
    assert {p.name for p in repo.iterdir()} == {"served"}


def test_a_config_cannot_name_a_file_outside_its_model_directory(explicit, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    handle, _repo = explicit
    secret = tmp_path / "secret.txt"
    secret.write_text("root:x:0:0\n")
    stub = handle.stub()
    # labels are answered to clients (classification): a label_filename outside would leak the file
    for label_filename in ("../../secret.txt", str(secret), "../labels.txt"):
        config = json.dumps({"max_batch_size": 8, "output": [{"name": "y", "label_filename": label_filename}]})
        code, details = _grpc_load(stub, "leak", {"config": config, "file:1/model.onnx": MODEL})
        assert code == grpc.StatusCode.UNAVAILABLE, details
        assert "label_filename" in details and "is not a file name in the model directory" in details
    for model_file in ("/dev/zero", "../served/1/model.onnx", "1/model.onnx"):
        config = json.dumps({"max_batch_size": 8, "default_model_filename": model_file})
        code, details = _grpc_load(stub, "leak2", {"config": config, "file:1/model.onnx": MODEL})
        assert code == grpc.StatusCode.UNAVAILABLE, details
        assert "default_model_filename" in details and "is not a file name in the model directory" in details
    index = {(m.name, m.state) for m in stub.RepositoryIndex(pb.RepositoryIndexRequest()).models}
    assert ("leak", "UNAVAILABLE") in index and ("served", "READY") in index


def test_a_config_only_load_replaces_a_config_symlink_and_never_writes_through_it(  # type: ignore[no-untyped-def]
    explicit, tmp_path: Path
) -> None:
    handle, repo = explicit
    outside = tmp_path / "outside.pbtxt"
    outside.write_text("max_batch_size: 8\n")
    (repo / "served" / "config.pbtxt").symlink_to(outside)
    assert _grpc_load(handle.stub(), "served", {"config": json.dumps({"max_batch_size": 4})}) == (
        grpc.StatusCode.OK,
        "",
    )
    assert outside.read_text() == "max_batch_size: 8\n"
    written = repo / "served" / "config.pbtxt"
    assert not written.is_symlink() and "max_batch_size: 4" in written.read_text()


def test_the_writer_never_follows_a_symlink(tmp_path: Path) -> None:
    staged = tmp_path / "staged"
    (staged / "2").mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    (staged / "out").symlink_to(outside)  # a link leaving the directory
    (staged / "1").symlink_to(staged / "2")  # a link staying inside: still not followed
    (staged / "f").symlink_to(outside / "file")
    for parts in (("out", "model.onnx"), ("1", "model.onnx"), ("f",)):
        with pytest.raises(InvalidArgument):
            _write_confined(staged, parts, b"x", "file:" + "/".join(parts))
    assert list(outside.iterdir()) == [] and list((staged / "2").iterdir()) == []


def test_upload_path_accepts_what_triton_clients_send() -> None:
    assert upload_path("1/model.onnx") == ("1", "model.onnx")
    assert upload_path("config.pbtxt") == ("config.pbtxt",)
    assert upload_path("12/sub/weights.bin") == ("12", "sub", "weights.bin")
    assert upload_path(f"{2**63 - 1}/model.onnx")[0] == str(2**63 - 1)


FORBIDDEN = re.compile(
    r"\b(?:c?pickle|cloudpickle|dill|joblib|shelve|marshal)\b|torch\.load|allow_pickle\s*=\s*True|yaml\.(?:unsafe_)?load\("
)


def test_the_serving_code_never_unpickles() -> None:
    """The server package never imports an unpickler nor loads a pickle: nothing it receives or reads
    from the log can run code. (converters/ read user pickles, offline, run by the user on their files.)"""
    server_dir = Path(repository_module.__file__).parent
    sources = sorted(server_dir.rglob("*.py"))
    assert len(sources) > 20
    found = [
        f"{path.name}:{n}: {line.strip()}"
        for path in sources
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if FORBIDDEN.search(line) and not line.lstrip().startswith("#")
    ]
    assert found == []

"""The HTTP/REST edge's answers to everything a client can get wrong, with raw HTTP clients (http.client,
and raw sockets where http.client would not send it) against a real server: the status, a JSON body
{"error": "..."} whose message says what to fix, never a 500, and a server that answers a correct
request correctly afterwards. Then the drain over HTTP: requests in flight finish, new ones get 503.
"""

from __future__ import annotations

import asyncio
import copy
import gzip
import http.client
import json
import random
import re
import socket
import struct
import threading
import time
import urllib.request
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from onnxgate.server.app import Gateway
from onnxgate.server.config import load_settings
from tests.conftest import GatewayHandle
from tests.models import add_mul, chained_matmul, identity, write_version

LIMIT = 1 << 20  # the gateway's max_message_bytes: the body limit too
VALID = {"inputs": [{"name": "x", "shape": [2, 3], "datatype": "FP32", "data": [1, 2, 3, 4, 5, 6]}]}
JSON_HEADERS = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("rest-errors")
    for name, datatype in (("fp32", "FP32"), ("int32", "INT32"), ("uint8", "UINT8"), ("text", "BYTES")):
        write_version(repo, name, 1, identity(datatype))
    write_version(repo, "flags", 1, identity("BOOL"))
    write_version(repo, "add_mul", 1, add_mul())
    return repo


@pytest.fixture(scope="module")
def gateway(repo: Path) -> Iterator[GatewayHandle]:
    """One in-process gateway for the module (as conftest's start_gateway, module-scoped), 1 MiB bodies."""
    flags = {"model_repository": repo, "grpc_port": 0, "metrics_port": 0, "http_port": 0, "max_message_bytes": LIMIT}
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    gw = Gateway(load_settings(env={}, flags=flags), repo)
    asyncio.run_coroutine_threadsafe(gw.start(), loop).result(120)
    handle = GatewayHandle(gw, loop, thread)
    yield handle
    handle.stop()


@pytest.fixture
def port(gateway: GatewayHandle) -> Iterator[int]:
    """The module gateway's HTTP port; after each test, it still answers a correct request correctly."""
    yield gateway.gateway.http_port
    assert_serves(gateway.gateway.http_port)


# -- clients -----------------------------------------------------------------------------------


def send(
    port: int, method: str, path: str, body: bytes | str = b"", headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    """One request on a fresh connection: (status, lower-case headers, body)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request(method, path, body=body.encode() if isinstance(body, str) else body, headers=headers or {})
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def infer(port: int, body: bytes | str | dict[str, Any], model: str = "fp32", **headers: str) -> tuple[int, bytes]:
    data = json.dumps(body) if isinstance(body, dict) else body
    status, _, answer = send(port, "POST", f"/v2/models/{model}/infer", data, {**JSON_HEADERS, **_headers(headers)})
    return status, answer


def _headers(kw: dict[str, str]) -> dict[str, str]:
    return {k.replace("_", "-"): v for k, v in kw.items()}


def raw_exchange(port: int, data: bytes, timeout: float = 10) -> tuple[bytes, bool]:
    """Send `data` over a raw socket and read one answer: (the answer, whether the server then closed
    the connection). Nothing more is sent: a body the headers announce never comes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        return _read_answer(sock, timeout)


def _read_answer(sock: socket.socket, timeout: float) -> tuple[bytes, bool]:
    """Read until the answer is complete, and on to the end of the connection when it says it closes."""
    answer = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            break
        except ConnectionResetError:  # the server closed with our unread bytes in its buffer
            return answer, True
        if not chunk:
            return answer, True
        answer += chunk
        head, sep, body = answer.partition(b"\r\n\r\n")
        length = re.search(rb"(?im)^content-length:\s*(\d+)", head)
        closing = re.search(rb"(?im)^connection:\s*close", head)
        if sep and length is not None and len(body) >= int(length.group(1)) and closing is None:
            break
    return answer, False


def parse_raw(answer: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    assert lines[0].startswith("HTTP/1.1 "), answer[:200]
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, body


def assert_error(status: int, body: bytes, expected: int, *fragments: str) -> str:
    """The status, a JSON object with only 'error', and a message holding every fragment."""
    assert status == expected, (status, body[:500])
    doc = json.loads(body)
    assert isinstance(doc, dict) and list(doc) == ["error"] and isinstance(doc["error"], str), doc
    message: str = doc["error"]
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    return message


def assert_serves(port: int) -> None:
    status, body = infer(port, VALID)
    assert status == 200, body
    (output,) = [o for o in json.loads(body)["outputs"] if o["name"] == "y"]
    assert output == {"name": "y", "datatype": "FP32", "shape": [2, 3], "data": [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]}


def binary_body(header: dict[str, Any], *tensors: bytes) -> tuple[bytes, str]:
    """Triton's binary tensor data extension: (body, Inference-Header-Content-Length)."""
    head = json.dumps(header).encode()
    return head + b"".join(tensors), str(len(head))


def binary_input(name: str, datatype: str, shape: list[int], size: int) -> dict[str, Any]:
    return {"name": name, "datatype": datatype, "shape": shape, "parameters": {"binary_data_size": size}}


def fp32_input(data: Any, shape: list[int] | None = None, datatype: str = "FP32", name: str = "x") -> dict[str, Any]:
    return {"name": name, "shape": [2, 3] if shape is None else shape, "datatype": datatype, "data": data}


def bytes_elements(*items: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(x)) + x for x in items)


def one_binary(datatype: str, shape: list[int], data: bytes) -> tuple[bytes, str]:
    """A binary-extension body with one input x whose binary_data_size is the length of `data`."""
    return binary_body(_binary(binary_input("x", datatype, shape, len(data))), data)


SIX = np.arange(6, dtype=np.float32).tobytes()  # 24 bytes: FP32 [2, 3]


# -- JSON bodies -------------------------------------------------------------------------------

JSON_CASES: list[tuple[str, str, bytes | dict[str, Any], str]] = [
    ("malformed JSON", "fp32", b'{"inputs": [{"name": "x",', "the request body is not valid JSON"),
    ("not JSON at all", "fp32", b"x=1&y=2", "the request body is not valid JSON"),
    ("not UTF-8", "fp32", b'{"inputs": "\xff\xfe"}', "not valid JSON"),
    ("empty body", "fp32", b"", "the request body is not valid JSON"),
    ("a list, not an object", "fp32", b"[1, 2, 3]", "must be a JSON object with 'inputs'"),
    ("a string, not an object", "fp32", b'"inputs"', "must be a JSON object with 'inputs'"),
    ("deep nesting of lists", "fp32", b"[" * 100_000, "nests too deeply"),
    ("deep nesting of objects", "fp32", b'{"a":' * 100_000, "nests too deeply"),
    ("deep nesting in data", "fp32", {"inputs": [fp32_input(json.loads("[" * 900 + "1" + "]" * 900))]}, "has 1 elements"),
    ("no inputs", "fp32", {}, "'inputs' must be a non-empty list"),
    ("empty inputs", "fp32", {"inputs": []}, "'inputs' must be a non-empty list"),
    ("inputs an object", "fp32", {"inputs": {"x": [1]}}, "'inputs' must be a non-empty list"),
    ("input not an object", "fp32", {"inputs": [[1, 2]]}, "inputs[0] must be an object"),
    ("input without a name", "fp32", {"inputs": [{"shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}]}, "inputs[0] has no 'name'"),
    ("input without datatype", "fp32", {"inputs": [{"name": "x", "shape": [1, 3], "data": [1, 2, 3]}]}, "has no 'datatype'"),
    ("input without data", "fp32", {"inputs": [{"name": "x", "shape": [1, 3], "datatype": "FP32"}]}, "has no 'data' (nor a binary_data_size"),
    ("name not a string", "fp32", {"inputs": [fp32_input([1] * 6, name=7)]}, "'name' must be a string"),  # type: ignore[arg-type]
    ("shape not a list", "fp32", {"inputs": [fp32_input([1] * 6, shape=6)]}, "'shape' must be a list of integers"),  # type: ignore[arg-type]
    ("shape of floats", "fp32", {"inputs": [fp32_input([1] * 6, shape=[2.0, 3])]}, "'shape' must be a list of integers"),  # type: ignore[list-item]
    ("shape of bools", "fp32", {"inputs": [fp32_input([1] * 6, shape=[True, 3])]}, "'shape' must be a list of integers"),
    ("negative dimension", "fp32", {"inputs": [fp32_input([1] * 6, shape=[-2, -3])]}, "negative dimension"),
    ("unknown datatype", "fp32", {"inputs": [fp32_input([1] * 6, datatype="FLOAT32")]}, "unknown datatype 'FLOAT32'; expected one of"),
    ("datatype not the model's", "fp32", {"inputs": [fp32_input([1] * 6, datatype="FP64")]}, "datatype FP64 sent, model 'fp32' expects FP32"),
    ("unknown input", "fp32", {"inputs": [fp32_input([1] * 6, name="z")]}, "unknown input(s) 'z'"),
    ("shape not the model's", "fp32", {"inputs": [fp32_input([1] * 6, shape=[3, 2])]}, "the model expects [-1, 3]"),
    ("too few elements", "fp32", {"inputs": [fp32_input([1, 2, 3, 4, 5])]}, "'data' has 5 elements, shape [2, 3] needs 6"),
    ("too many elements", "fp32", {"inputs": [fp32_input([[1, 2, 3], [4, 5, 6], [7, 8, 9]])]}, "'data' has 9 elements"),
    ("ragged rows", "fp32", {"inputs": [fp32_input([[1, 2, 3, 4], [5, 6]])]}, "FP32 data must be numbers"),
    ("strings for FP32", "fp32", {"inputs": [fp32_input(["1", "2", "3", "4", "5", "6"])]}, "FP32 data must be numbers"),
    ("null for FP32", "fp32", {"inputs": [fp32_input([1, 2, 3, 4, 5, None])]}, "FP32 data must be numbers"),
    ("objects for FP32", "fp32", {"inputs": [fp32_input([{}, 2, 3, 4, 5, 6])]}, "FP32 data must be numbers"),
    ("floats for INT32", "int32", {"inputs": [fp32_input([1.5, 2, 3, 4, 5, 6], datatype="INT32")]}, "INT32 data must be integers"),
    ("bools for INT32", "int32", {"inputs": [fp32_input([True] * 6, datatype="INT32")]}, "INT32 data must be integers"),
    ("INT32 out of range", "int32", {"inputs": [fp32_input([2**31, 0, 0, 0, 0, 0], datatype="INT32")]}, "does not fit INT32"),
    ("past 64 bits", "int32", {"inputs": [fp32_input([2**70, 0, 0, 0, 0, 0], datatype="INT32")]}, "does not fit INT32"),
    ("UINT8 over 255", "uint8", {"inputs": [fp32_input([256, 0, 0, 0, 0, 0], datatype="UINT8")]}, "does not fit UINT8 (0..255)"),
    ("UINT8 negative", "uint8", {"inputs": [fp32_input([-1, 0, 0, 0, 0, 0], datatype="UINT8")]}, "does not fit UINT8 (0..255)"),
    ("ints for BOOL", "flags", {"inputs": [fp32_input([0, 1, 0, 1, 0, 1], datatype="BOOL")]}, "BOOL data must be true or false"),
    ("numbers for BYTES", "text", {"inputs": [fp32_input([1, 2, 3, 4, 5, 6], datatype="BYTES")]}, "BYTES data must be strings"),
    ("lone surrogate in BYTES", "text", b'{"inputs": [{"name": "x", "shape": [1, 3], "datatype": "BYTES", "data": ["\\ud800", "a", "b"]}]}', "lone UTF-16 surrogate"),
    ("classification of BYTES", "text", {"inputs": [fp32_input(["a", "b", "c"], [1, 3], "BYTES")], "outputs": [{"name": "y", "parameters": {"classification": 2}}]}, "classification ranks numbers, but this output holds BYTES"),
    ("duplicate inputs", "add_mul", {"inputs": [fp32_input([0] * 4, [1, 4], name="a")] * 2}, "input 'a' appears twice"),
    ("duplicate outputs", "fp32", {**VALID, "outputs": [{"name": "y"}, {"name": "y"}]}, "output 'y' requested twice"),
    ("unknown output", "fp32", {**VALID, "outputs": [{"name": "nope"}]}, "has no output 'nope'; its outputs are y, y2"),
    ("outputs not a list", "fp32", {**VALID, "outputs": {"name": "y"}}, "'outputs' must be a list"),
    ("output without a name", "fp32", {**VALID, "outputs": [{}]}, "outputs[0] has no 'name'"),
    ("classification 0", "fp32", {**VALID, "outputs": [{"name": "y", "parameters": {"classification": 0}}]}, "must be >= 1"),
    ("binary_data not a bool", "fp32", {**VALID, "outputs": [{"name": "y", "parameters": {"binary_data": "yes"}}]}, "'binary_data' must be true or false"),
    ("id not a string", "fp32", {**VALID, "id": 5}, "'id' must be a string"),
    ("parameters not an object", "fp32", {**VALID, "parameters": []}, "'parameters' must be an object"),
    ("shared memory", "fp32", {"inputs": [{**VALID["inputs"][0], "parameters": {"shared_memory_region": "r"}}]}, "shared memory is not supported"),
    # a shape is the client's claim: checked against the data before anything is allocated from it
    ("huge shape, little data", "fp32", {"inputs": [fp32_input([1] * 6, shape=[2**40, 2**40])]}, "shape [1099511627776, 1099511627776] has more elements than any tensor can hold"),
    ("huge BYTES shape, little data", "text", {"inputs": [fp32_input(["a"] * 6, shape=[2**40, 2**40], datatype="BYTES")]}, "has more elements than any tensor can hold"),
    ("large shape, little data", "fp32", {"inputs": [fp32_input([1] * 6, shape=[2**20, 2**20])]}, "'data' has 6 elements, shape [1048576, 1048576] needs 1099511627776"),
    ("large BYTES shape, little data", "text", {"inputs": [fp32_input(["a"] * 6, shape=[2**20, 2**20], datatype="BYTES")]}, "'data' has 6 elements"),
    ("shape past 64 bits", "fp32", {"inputs": [fp32_input([1] * 6, shape=[2**70, 2**70])]}, "more elements than any tensor can hold"),
    ("no elements, huge shape", "fp32", {"inputs": [fp32_input([], shape=[0, 2**70])]}, "shape [0, 1180591620717411303424] has more elements than any tensor can hold"),
    ("too many dimensions", "fp32", {"inputs": [fp32_input([1], shape=[1] * 100)]}, "shape has 100 dimensions; at most 32 are supported"),
]  # fmt: skip


@pytest.mark.parametrize(("model", "body", "message"), [c[1:] for c in JSON_CASES], ids=[c[0] for c in JSON_CASES])
def test_bad_json_request_is_400_saying_what_to_fix(
    port: int, model: str, body: bytes | dict[str, Any], message: str
) -> None:
    status, answer = infer(port, body, model)
    assert_error(status, answer, 400, message)


# -- binary tensor data ------------------------------------------------------------------------


def _binary(*inputs: dict[str, Any], outputs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {"inputs": list(inputs), **({} if outputs is None else {"outputs": outputs})}


BINARY_CASES: list[tuple[str, str, bytes, str, str]] = [
    # (id, model, body, Inference-Header-Content-Length, message)
    ("header length past the body", "fp32", b'{"inputs": []}', "400", "Inference-Header-Content-Length is 400, but the body has 14 bytes"),
    ("header length negative", "fp32", b'{"inputs": []}', "-1", "Inference-Header-Content-Length must be a byte count, got b'-1'"),
    ("header length not a number", "fp32", b'{"inputs": []}', "twelve", "must be a byte count"),
    ("header length a float", "fp32", b'{"inputs": []}', "14.0", "must be a byte count"),
    ("header length cuts the JSON", "fp32", binary_body(_binary(binary_input("x", "FP32", [2, 3], 24)), SIX)[0], "20", "the JSON header is not valid JSON"),
    ("header length 0", "fp32", b'{"inputs": []}', "0", "the JSON header is not valid JSON"),
    ("too few bytes", "fp32", *binary_body(_binary(binary_input("x", "FP32", [2, 3], 20)), SIX[:20]), "raw contents are 20 bytes, but shape [2, 3] of FP32 needs 24"),
    ("too many bytes", "fp32", *binary_body(_binary(binary_input("x", "FP32", [2, 3], 28)), SIX + b"\0" * 4), "raw contents are 28 bytes, but shape [2, 3] of FP32 needs 24"),
    ("size past the body", "fp32", *binary_body(_binary(binary_input("x", "FP32", [2, 3], 24)), SIX[:16]), "binary_data_size 24 at offset 0 runs past the 16 bytes of binary data"),
    ("bytes left over", "fp32", *binary_body(_binary(binary_input("x", "FP32", [2, 3], 24)), SIX + b"extra!"), "6 bytes of binary data follow the inputs' binary_data_size total of 24"),
    ("binary data nobody claims", "fp32", *binary_body(VALID, b"stray"), "5 bytes of binary data follow"),
    ("size negative", "fp32", *binary_body(_binary(binary_input("x", "FP32", [2, 3], -24)), SIX), "binary_data_size -24"),
    ("size a string", "fp32", *binary_body(_binary(binary_input("x", "FP32", [2, 3], "24")), SIX), "'binary_data_size' must be a non-negative integer"),  # type: ignore[arg-type]
    ("size a bool", "fp32", *binary_body(_binary(binary_input("x", "FP32", [2, 3], True)), SIX), "'binary_data_size' must be a non-negative integer"),
    ("size with data", "fp32", *binary_body(_binary({**binary_input("x", "FP32", [2, 3], 24), "data": [1] * 6}), SIX), "has both 'data' and binary_data_size: send one"),
    ("huge shape, 24 bytes", "fp32", *one_binary("FP32", [2**40, 2**40], SIX), "shape [1099511627776, 1099511627776] has more elements than any tensor can hold"),
    ("large shape, 24 bytes", "fp32", *one_binary("FP32", [2**20, 2**20], SIX), "raw contents are 24 bytes, but shape [1048576, 1048576] of FP32 needs 4398046511104"),
    ("large BYTES shape", "text", *one_binary("BYTES", [2**20, 2**20], SIX), "24 bytes of raw BYTES contents cannot hold 1099511627776 elements"),
    ("no elements, huge binary shape", "fp32", *one_binary("FP32", [0, 2**70], b""), "has more elements than any tensor can hold"),
    ("no elements, huge BYTES shape", "text", *one_binary("BYTES", [0, 2**62], b""), "has more elements than any tensor can hold"),
    ("too many binary dimensions", "fp32", *one_binary("FP32", [1] * 40, SIX[:4]), "shape has 40 dimensions"),
    ("BYTES length past the end", "text", *one_binary("BYTES", [1, 3], bytes_elements(b"a", b"b") + struct.pack("<I", 99) + b"ccc"), "BYTES element 2 declares 99 bytes but only 3 remain"),
    ("BYTES length 4 GiB", "text", *one_binary("BYTES", [1, 3], bytes_elements(b"a", b"b") + b"\xff\xff\xff\xff" + b"cc"), "BYTES element 2 declares 4294967295 bytes but only 2 remain"),
    ("BYTES prefix cut short", "text", *one_binary("BYTES", [1, 3], bytes_elements(b"abcdef") + b"\1\0\0"), "raw BYTES contents end after 1 of 3 elements"),
    ("BYTES too short for the shape", "text", *one_binary("BYTES", [2, 3], bytes_elements(b"a", b"b", b"c")), "15 bytes of raw BYTES contents cannot hold 6 elements"),
    ("BYTES bytes left over", "text", *one_binary("BYTES", [1, 3], bytes_elements(b"a", b"b", b"c") + b"\0" * 4), "4 bytes left over after 3 BYTES elements"),
    ("BOOL byte 2", "flags", *one_binary("BOOL", [1, 3], b"\0\1\2"), "BOOL elements must be bytes 0 or 1"),
    ("duplicate binary inputs", "add_mul", *binary_body(_binary(*[binary_input("a", "FP32", [1, 4], 16)] * 2), b"\0" * 32), "input 'a' appears twice"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("model", "body", "header_length", "message"), [c[1:] for c in BINARY_CASES], ids=[c[0] for c in BINARY_CASES]
)
def test_bad_binary_request_is_400_saying_what_to_fix(port: int, model: str, body: bytes, header_length: str, message: str) -> None:  # fmt: skip
    status, _, answer = send(
        port,
        "POST",
        f"/v2/models/{model}/infer",
        body,
        {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": header_length},
    )
    assert_error(status, answer, 400, message)


def test_classification_of_bool_and_unsigned_outputs(port: int) -> None:
    """Ranked by value: BOOL cannot be negated, and a negated unsigned 0 would wrap to the top."""
    top = {"outputs": [{"name": "y", "parameters": {"classification": 2}}]}
    status, answer = infer(port, {"inputs": [fp32_input([0, 5, 3], [1, 3], "UINT8")], **top}, "uint8")
    assert status == 200, answer
    assert json.loads(answer)["outputs"][0]["data"] == ["5.000000:1", "3.000000:2"]
    status, answer = infer(port, {"inputs": [fp32_input([False, True, False], [1, 3], "BOOL")], **top}, "flags")
    assert status == 200, answer
    assert json.loads(answer)["outputs"][0]["data"] == ["1.000000:1", "0.000000:0"]


def test_binary_request_with_bytes_and_json_outputs_works(port: int) -> None:
    """The well-formed counterparts of the cases above, on the same models."""
    body, length = one_binary("BYTES", [1, 3], bytes_elements(b"a", b"bc", b"d"))
    status, answer = infer(port, body, "text", Inference_Header_Content_Length=length)
    assert status == 200, answer
    assert json.loads(answer)["outputs"][0]["data"] == ["a", "bc", "d"]
    body, length = binary_body(_binary(binary_input("x", "FP32", [2, 3], 24), outputs=[{"name": "y2"}]), SIX)
    status, answer = infer(port, body, Inference_Header_Content_Length=length)
    assert status == 200, answer
    assert json.loads(answer)["outputs"] == [
        {"name": "y2", "datatype": "FP32", "shape": [2, 3], "data": [0, 1, 2, 3, 4, 5]}
    ]


# -- paths, methods, names, versions ----------------------------------------------------------

LONG = "m" * 5000
PATH_CASES: list[tuple[str, str, str, int, str]] = [
    ("unknown model", "POST", "/v2/models/nope/infer", 404, "unknown model 'nope'; models served: add_mul, flags, fp32"),
    ("unknown model metadata", "GET", "/v2/models/nope", 404, "unknown model 'nope'"),
    ("unknown model ready", "GET", "/v2/models/nope/ready", 404, "unknown model 'nope'"),
    ("unknown model config", "GET", "/v2/models/nope/config", 404, "unknown model 'nope'"),
    ("version not a number", "POST", "/v2/models/fp32/versions/latest/infer", 400, "model version 'latest' is not an integer"),
    ("version not a number, metadata", "GET", "/v2/models/fp32/versions/1.0", 400, "not an integer"),
    ("version not served", "POST", "/v2/models/fp32/versions/9/infer", 404, "model 'fp32' has no version 9 being served; served versions: 1"),
    ("versions without a number", "GET", "/v2/models/fp32/versions", 404, "needs the version number"),
    ("unknown path", "GET", "/v2/nothing/here", 404, "no such path /v2/nothing/here"),
    ("unknown action", "POST", "/v2/models/fp32/predict", 404, "no such path /v2/models/fp32/predict"),
    ("too deep", "POST", "/v2/models/fp32/infer/more", 404, "no such path"),
    ("not /v2", "GET", "/v1/models/fp32", 404, "paths start with /v2"),
    ("root", "GET", "/", 404, "paths start with /v2"),
    ("empty model name", "GET", "/v2/models/", 404, "no such path"),
    ("unknown repository path", "POST", "/v2/repository/models/fp32/reload", 404, "index, models/NAME/load"),
    ("GET infer", "GET", "/v2/models/fp32/infer", 405, "GET is not allowed here: use POST"),
    ("PUT infer", "PUT", "/v2/models/fp32/infer", 405, "use POST"),
    ("POST health", "POST", "/v2/health/live", 405, "POST is not allowed here: use GET"),
    ("DELETE model", "DELETE", "/v2/models/fp32", 405, "use GET"),
    ("PATCH metadata", "PATCH", "/v2", 405, "use GET"),
    ("GET repository index", "GET", "/v2/repository/index", 405, "use POST"),
    ("non-UTF-8 name", "GET", "/v2/models/%ff%fe", 400, "not valid UTF-8 after percent-decoding"),
    ("non-UTF-8 infer", "POST", "/v2/models/%c3%28/infer", 400, "not valid UTF-8"),
    ("dot-dot", "GET", "/v2/models/../ready", 404, "unknown model '..'"),
    ("encoded dot-dot", "POST", "/v2/models/%2e%2e/infer", 404, "unknown model '..'"),
    ("encoded slash", "POST", "/v2/models/..%2F..%2Fetc/infer", 404, "unknown model '../../etc'"),
    ("absolute path name", "GET", "/v2/models/%2Fetc", 404, "unknown model '/etc'"),
    ("NUL in name", "POST", "/v2/models/fp32%00/infer", 404, "unknown model 'fp32\\x00'"),
    ("5000-character name", "POST", f"/v2/models/{LONG}/infer", 404, f"unknown model '{LONG}'"),
    ("4000-digit version", "GET", f"/v2/models/fp32/versions/{'9' * 4000}", 400, "model version '999"),
    ("5000-digit version", "GET", f"/v2/models/fp32/versions/{'9' * 5000}", 400, "model version '999"),
    ("load with a bad name", "POST", "/v2/repository/models/..%2Fx/load", 400, "model name '../x' is not a valid directory name"),
    ("feedback without a log", "POST", "/v2/models/fp32/feedback", 501, "feedback is off: start the gateway with --predlog-dir"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("method", "path", "expected", "message"), [c[1:] for c in PATH_CASES], ids=[c[0] for c in PATH_CASES]
)
def test_bad_path_method_name_or_version(port: int, method: str, path: str, expected: int, message: str) -> None:
    body = json.dumps(VALID) if method in ("POST", "PUT", "PATCH") else b""
    status, _, answer = send(port, method, path, body, JSON_HEADERS)
    assert_error(status, answer, expected, message)


def test_raw_non_ascii_path_is_a_client_error(port: int) -> None:
    """Bytes past ASCII, unencoded, in the request line: a 4xx (from the HTTP parser or from us), never a 500."""
    answer, _ = raw_exchange(port, b"GET /v2/models/\xff\xfe/ready HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    status, _, _ = parse_raw(answer)
    assert 400 <= status < 500, answer[:300]


@pytest.mark.parametrize(
    "name", ["..", "../fp32", "/etc", "fp32\x00", LONG], ids=["dotdot", "dotdot-slash", "absolute", "nul", "long"]
)
def test_model_load_refuses_bad_names_in_explicit_mode(start_gateway, repo: Path, name: str) -> None:  # type: ignore[no-untyped-def]
    handle = start_gateway(repo, model_control_mode="explicit", load_model=("fp32",))
    port = handle.gateway.http_port
    quoted = "".join(c if c.isalnum() else f"%{ord(c):02X}" for c in name)
    status, _, answer = send(port, "POST", f"/v2/repository/models/{quoted}/load", b"{}", JSON_HEADERS)
    assert_error(status, answer, 400, "is not a valid directory name")
    for path in (f"/v2/models/{quoted}", f"/v2/models/{quoted}/ready"):
        status, _, answer = send(port, "GET", path)
        assert status in (400, 404), (path, status, answer[:300])
        assert_error(status, answer, status, "model")
    assert_serves(port)


# -- content types and encodings ---------------------------------------------------------------


@pytest.mark.parametrize(
    "content_type", ["application/x-www-form-urlencoded", "multipart/form-data; boundary=xyz", "text/html", "image/png"]
)
def test_wrong_content_type_is_415(port: int, content_type: str) -> None:
    status, _, answer = send(port, "POST", "/v2/models/fp32/infer", json.dumps(VALID), {"Content-Type": content_type})
    assert_error(
        status, answer, 415, f"Content-Type {content_type.split(';')[0]!r} is not accepted", "application/json"
    )


@pytest.mark.parametrize(
    "content_type", [None, "application/json", "application/json; charset=utf-8", "text/plain", "APPLICATION/JSON"]
)
def test_accepted_content_types(port: int, content_type: str | None) -> None:
    headers = {} if content_type is None else {"Content-Type": content_type}
    status, _, answer = send(port, "POST", "/v2/models/fp32/infer", json.dumps(VALID), headers)
    assert status == 200, answer


@pytest.mark.parametrize("encoding", ["br", "compress", "zstd", "gzip, br"])
def test_unsupported_content_encoding_is_415(port: int, encoding: str) -> None:
    status, answer = infer(port, json.dumps(VALID), Content_Encoding=encoding)
    assert_error(status, answer, 415, f"Content-Encoding {encoding!r} is not supported; use gzip, deflate or none")


def test_gzip_and_deflate_bodies_work(port: int) -> None:
    for encoding, data in (
        ("gzip", gzip.compress(json.dumps(VALID).encode())),
        ("deflate", zlib.compress(json.dumps(VALID).encode())),
    ):
        status, answer = infer(port, data, Content_Encoding=encoding)
        assert status == 200, (encoding, answer)
        assert json.loads(answer)["outputs"][0]["data"] == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    # with the binary extension: the header length counts the inflated body
    body, length = binary_body(_binary(binary_input("x", "FP32", [2, 3], 24)), SIX)
    status, answer = infer(port, gzip.compress(body), Content_Encoding="GZIP", Inference_Header_Content_Length=length)
    assert status == 200, answer


def test_bad_compressed_bodies(port: int) -> None:
    status, answer = infer(port, b"this is not gzip", Content_Encoding="gzip")
    assert_error(status, answer, 400, "the body is not valid gzip data")
    status, answer = infer(port, gzip.compress(json.dumps(VALID).encode())[:-12], Content_Encoding="gzip")
    assert_error(status, answer, 400, "the gzip body ends early")
    status, answer = infer(port, b"", Content_Encoding="deflate")
    assert_error(status, answer, 400, "the deflate body ends early")


def test_gzip_bomb_is_413(port: int) -> None:
    bomb = gzip.compress(b"[" + b" " * (64 * LIMIT) + b"]", 9)  # 64 MiB of JSON in ~64 KiB
    assert len(bomb) < LIMIT // 4
    status, answer = infer(port, bomb, Content_Encoding="gzip")
    assert_error(status, answer, 413, f"over the limit of {LIMIT}", "--max-message-bytes")
    deflate_bomb = zlib.compress(b"\0" * (8 * LIMIT), 9)
    status, answer = infer(port, deflate_bomb, Content_Encoding="deflate")
    assert_error(status, answer, 413, f"over the limit of {LIMIT}")


# -- body size ---------------------------------------------------------------------------------


def test_declared_content_length_over_the_limit_is_413_before_the_body(port: int) -> None:
    head = (
        f"POST /v2/models/fp32/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {LIMIT + 1}\r\n\r\n"
    ).encode()
    t0 = time.monotonic()
    answer, closed = raw_exchange(port, head)  # the body never comes: the answer must not wait for it
    assert time.monotonic() - t0 < 10
    assert closed  # and the connection ends: what the client sends next is not read as a request
    status, headers, body = parse_raw(answer)
    assert_error(
        status, body, 413, f"request body of {LIMIT + 1} bytes is over the limit of {LIMIT}", "send fewer rows"
    )
    assert headers.get("connection") == "close"
    # a terabyte, the same; with Expect: 100-continue the client learns it before sending anything
    terabyte = head.replace(str(LIMIT + 1).encode(), b"%d" % 10**12).replace(
        b"\r\n\r\n", b"\r\nExpect: 100-continue\r\n\r\n"
    )
    status, _, body = parse_raw(raw_exchange(port, terabyte)[0])
    assert_error(status, body, 413, f"request body of {10**12} bytes is over the limit")
    # past 64 bits, httptools refuses the header itself (uvicorn's plain-text 400): still no 500, no wait
    status, _, body = parse_raw(raw_exchange(port, head.replace(str(LIMIT + 1).encode(), b"9" * 30))[0])
    assert status in (400, 413), body


def test_body_at_the_limit_is_read_one_byte_more_is_not(port: int) -> None:
    padded = json.dumps(VALID).encode()
    padded += b" " * (LIMIT - len(padded))  # whitespace after the JSON: exactly the limit
    status, answer = infer(port, padded)
    assert status == 200, answer[:300]
    # one byte more: refused from the header, with the body unread (a client that sends it all before
    # reading may see the connection reset instead: nothing lingers to read what it sends after)
    head = (
        f"POST /v2/models/fp32/infer HTTP/1.1\r\nHost: x\r\nContent-Length: {LIMIT + 1}\r\nExpect: 100-continue\r\n\r\n"
    ).encode()
    answer, closed = raw_exchange(port, head)
    status, headers, body = parse_raw(answer)
    assert_error(status, body, 413, f"request body of {LIMIT + 1} bytes is over the limit of {LIMIT}")
    assert headers.get("connection") == "close" and closed


def test_chunked_body_growing_past_the_limit_is_413(port: int) -> None:
    head = b"POST /v2/models/fp32/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    chunk = b" " * 65536
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(head)
        try:
            for _ in range(LIMIT // len(chunk) + 4):  # 4 chunks past the limit, then the end
                sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            sock.sendall(b"0\r\n\r\n")
        except OSError:  # the server answered and closed while we were still sending
            pass
        answer, closed = _read_answer(sock, 10)
    status, headers, body = parse_raw(answer)
    assert_error(status, body, 413, f"over the limit of {LIMIT}")
    assert headers.get("connection") == "close" and closed


def test_chunked_body_under_the_limit_works(port: int) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        data = json.dumps(VALID).encode()
        conn.request(
            "POST",
            "/v2/models/fp32/infer",
            body=iter([data[:10], data[10:]]),
            headers=JSON_HEADERS,
            encode_chunked=True,
        )
        response = conn.getresponse()
        assert response.status == 200
        assert json.loads(response.read())["outputs"][0]["data"] == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    finally:
        conn.close()


def test_huge_shapes_allocate_nothing(spawn_gateway, repo: Path) -> None:  # type: ignore[no-untyped-def]
    """A shape is the client's claim: refused from the bytes and elements sent, before any allocation, so
    the server's resident memory does not grow (a 1 GiB tensor from a 16 KiB request would show)."""
    gw = spawn_gateway("--model-repository", str(repo), "--inference-threads", "1")
    port = gw.http_port
    assert_serves(port)

    def rss_kib() -> int:
        status = Path(f"/proc/{gw.process.pid}/status").read_text()
        match = re.search(r"VmRSS:\s+(\d+) kB", status)
        assert match is not None
        return int(match.group(1))

    before = rss_kib()
    for shape in ([2**40, 2**40], [2**14, 2**14], [2**28], [1, 2**30], [2**20, 2**20]):
        huge = "more elements than any tensor can hold" if shape[0] == 2**40 else ""
        # JSON data, numbers and strings
        status, answer = infer(port, {"inputs": [fp32_input([1.0] * 6, shape=shape)]})
        assert_error(status, answer, 400, huge or "'data' has 6 elements")
        status, answer = infer(port, {"inputs": [fp32_input(["s"] * 6, shape=shape, datatype="BYTES")]}, "text")
        assert_error(status, answer, 400, huge or "'data' has 6 elements")
        # binary data, fixed-size and BYTES
        body, length = one_binary("FP32", shape, SIX)
        status, answer = infer(port, body, Inference_Header_Content_Length=length)
        assert_error(status, answer, 400, huge or "raw contents are 24 bytes")
        body, length = one_binary("BYTES", shape, SIX)
        status, answer = infer(port, body, "text", Inference_Header_Content_Length=length)
        assert_error(status, answer, 400, huge or "24 bytes of raw BYTES contents cannot hold")
    after = rss_kib()
    assert after - before < 64 * 1024, (before, after)  # KiB: well under any tensor those shapes claim
    assert_serves(port)
    assert gw.terminate() == 0


# -- nothing a client sends is a 500 -----------------------------------------------------------

BASE_REQUEST: dict[str, Any] = {
    "id": "req-1",
    "parameters": {"binary_data_output": False},
    "inputs": [
        {"name": "a", "shape": [2, 4], "datatype": "FP32", "data": [[1, 2, 3, 4], [5, 6, 7, 8]]},
        {"name": "b", "shape": [2, 4], "datatype": "FP32", "data": [0.5] * 8},
    ],
    "outputs": [
        {"name": "sum", "parameters": {"binary_data": False}},
        {"name": "scaled", "parameters": {"classification": 2}},
    ],
}
ODD_VALUES: list[Any] = [
    None, True, False, 0, -1, 1.5, 2**70, -(2**70), 1e308, "", "FP32", "BYTES", "INT8", "a", [], {}, [[]], [None],
    [1, "a"], [2**40, 2**40], [0, 2**70], [1] * 70, [-1], [[1, 2], [3]], {"binary_data_size": 8},
    {"binary_data_size": -1}, {"shared_memory_region": "x"}, {"classification": 0}, {"classification": 2**70},
    json.loads("[" * 100 + "]" * 100),
]  # fmt: skip


def _paths(doc: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield prefix
    if len(prefix) > 6:  # not into the deep lists of ODD_VALUES
        return
    if isinstance(doc, dict):
        for key, value in doc.items():
            yield from _paths(value, (*prefix, key))
    elif isinstance(doc, list):
        for i, value in enumerate(doc):
            yield from _paths(value, (*prefix, i))


def mutate(rng: random.Random) -> tuple[bytes, dict[str, str]]:
    """A randomly broken variant of BASE_REQUEST: JSON edits (delete, replace, duplicate) or byte edits
    (truncate, flip, insert), sometimes as a binary-extension body with a random header length."""
    doc = copy.deepcopy(BASE_REQUEST)
    headers = dict(JSON_HEADERS)
    for _ in range(rng.randint(1, 3)):
        paths = [p for p in _paths(doc) if p]
        if not paths:
            break
        path = rng.choice(paths)
        parent = doc
        for key in path[:-1]:
            parent = parent[key]
        action = rng.random()
        if action < 0.3:
            del parent[path[-1]]
        elif action < 0.8:
            parent[path[-1]] = copy.deepcopy(rng.choice(ODD_VALUES))
        elif isinstance(parent, list):
            parent.append(copy.deepcopy(parent[path[-1]]))
        else:
            parent[path[-1]] = [parent[path[-1]]]
    body = json.dumps(doc).encode()
    if rng.random() < 0.1:
        headers["Content-Type"] = rng.choice(["text/plain", "application/x-www-form-urlencoded", "", "json", "a/b; x"])
    kind = rng.random()
    if kind < 0.4:  # byte-level damage
        b = bytearray(body)
        for _ in range(rng.randint(1, 4)):
            what, at = rng.random(), rng.randrange(len(b) + 1)
            if what < 0.3:
                del b[at:]
            elif what < 0.7 and at < len(b):
                b[at] = rng.randrange(256)
            else:
                b[at:at] = bytes([rng.randrange(256)])
            if not b:
                break
        body = bytes(b)
    elif kind < 0.6:  # binary extension: some bytes after the header, a header length near the truth
        tail = rng.randbytes(rng.choice([0, 4, 8, 16, 32, 33]))
        length = len(body) + rng.choice([0, 0, -1, 1, -len(body), len(tail) + 1, 2**64])
        headers["Inference-Header-Content-Length"] = rng.choice([str(length), str(len(body)), " 5", "0x10", ""])
        body += tail
    elif kind < 0.7:  # compressed, sometimes cut short
        headers["Content-Encoding"] = rng.choice(["gzip", "deflate", "identity", "br"])
        packed = gzip.compress(body) if headers["Content-Encoding"] == "gzip" else zlib.compress(body)
        body = packed[: rng.choice([len(packed), len(packed), rng.randrange(len(packed) + 1)])]
    return body, headers


def test_no_request_body_is_a_500(port: int) -> None:
    rng = random.Random(20240515)
    statuses: dict[int, int] = {}
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        for i in range(400):
            body, headers = mutate(rng)
            conn.request("POST", "/v2/models/add_mul/infer", body=body, headers=headers)
            response = conn.getresponse()
            answer = response.read()
            statuses[response.status] = statuses.get(response.status, 0) + 1
            assert response.status < 500, (i, body[:300], headers, answer[:500])
            if response.status != 200:
                assert_error(response.status, answer, response.status)
            if response.getheader("connection", "").lower() == "close":
                conn.close()
    finally:
        conn.close()
    assert sum(n for status, n in statuses.items() if 400 <= status < 500) > 300, statuses  # mostly broken, as meant
    status, answer = infer(port, BASE_REQUEST, "add_mul")
    assert status == 200, answer
    outputs = {o["name"]: o for o in json.loads(answer)["outputs"]}
    assert outputs["sum"]["data"] == [1.5, 2.5, 3.5, 4.5, 5.5, 6.5, 7.5, 8.5]


# -- draining ----------------------------------------------------------------------------------


def test_draining_answers_503_to_new_work(gateway: GatewayHandle, port: int) -> None:
    async def set_draining(value: bool) -> None:
        gateway.gateway.state.draining = value

    gateway.call(set_draining(True))
    try:
        status, headers, answer = send(port, "GET", "/v2/health/ready")
        assert_error(status, answer, 503, "not ready (starting or shutting down)")
        assert headers.get("connection") == "close"  # clients reconnect, to another replica
        status, answer = infer(port, VALID)
        assert_error(status, answer, 503, "server is shutting down; retry on another replica")
        status, _, answer = send(port, "GET", "/v2/models/fp32/ready")
        assert_error(status, answer, 503, "shutting down")
        assert send(port, "GET", "/v2/health/live")[0] == 200  # alive, only not ready
    finally:
        gateway.call(set_draining(False))
    assert send(port, "GET", "/v2/health/ready")[0] == 200


def test_sigterm_drains_http_requests_in_flight(spawn_gateway, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """SIGTERM with three HTTP requests in flight (one inference thread: one runs, two queue): all three
    are answered in full, then the process exits 0. The model takes ~0.3 s a request on a fast core
    (matmul_square(800) takes 5 ms there: three requests would never be in flight together)."""
    size = 1024
    write_version(tmp_path, "slow", 1, chained_matmul(size, 30))
    gw = spawn_gateway(
        "--model-repository", str(tmp_path), "--inference-threads", "1", "--shutdown-grace-s", "120"
    )  # fmt: skip
    x = np.ones((size, size), np.float32)
    body, length = binary_body(
        {"inputs": [binary_input("x", "FP32", [size, size], x.nbytes)], "outputs": [{"name": "y", "parameters": {"binary_data": True}}]},
        x.tobytes(),
    )  # fmt: skip
    results: list[object] = []

    def slow_request() -> None:
        try:
            status, headers, answer = send(
                gw.http_port,
                "POST",
                "/v2/models/slow/infer",
                body,
                {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": length},
            )
            assert status == 200, answer[:300]
            json_length = int(headers["inference-header-content-length"])
            y = np.frombuffer(answer[json_length:], np.float32).reshape(size, size)
            results.append(float(y[0, 0]) if bool((y == y[0, 0]).all()) else y)
        except Exception as e:
            results.append(e)

    def inflight() -> float:
        text = urllib.request.urlopen(f"http://127.0.0.1:{gw.metrics_port}/metrics", timeout=10).read().decode()
        match = re.search(r"^onnxgate_inflight_requests (\S+)$", text, re.M)
        assert match is not None
        return float(match.group(1))

    threads = [threading.Thread(target=slow_request) for _ in range(3)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    while (n := inflight()) < 3 and not results and time.monotonic() < deadline:
        time.sleep(0.005)
    assert n == 3 and not results, (n, results)  # all three in flight, none answered yet
    assert gw.terminate(timeout=60) == 0
    for t in threads:
        t.join(30)
    assert results == [1.0, 1.0, 1.0]  # every accepted request finished before exit

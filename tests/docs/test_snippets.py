"""The documentation's code, run: every fenced block of README.md, CONTRIBUTING.md and docs/**/*.md, one test
per block.

Blocks in bash/sh/shell/console run through `bash -euo pipefail`, python through this interpreter, js
through `node`, go through `go run` (when a Go toolchain is installed), each in a fresh working directory
that looks like a checkout (every top-level entry of the repository linked into it, so `.venv/bin/onnxgate`,
`proto/` and `tests/node` resolve) and with HOME set to a directory of its own, where a real
`onnxgate serve --example` is already running: `~/.cache/onnxgate/example-repository` and
`~/.cache/onnxgate/predlog` are that server's. The server listens on free ports; the blocks' `:8000`,
`:8001` and `:8002` (HTTP, gRPC, metrics) are rewritten to them.

A block that cannot run here says so in an HTML comment right above its fence, which readers never see:

    <!-- not-run: needs a Kubernetes cluster -->      not run; the reason is required
    <!-- file: onnxgate.toml -->                      data: written to that name in the working
                                                      directory of the later blocks of the same page
                                                      (TOML, JSON and YAML are parsed as a check)
    <!-- requires: xgboost, cmd:Rscript -->           skipped when a module or a command is missing
    <!-- expect: REGEX -->                            the block's output must match (re.search)
    <!-- timeout: 300 -->                             seconds (default 120)

Any other block (text, toml, yaml, sql, promql, ...) without `not-run` or `file` fails
`test_every_block_is_run_or_marked`, and so does an indented (4-space) code block: write it fenced. The
counts of blocks run and not run are printed at the end of the session (`doc blocks: ...`).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").rglob("*.md"))]

SHELL = {"bash", "sh", "shell", "console"}
PYTHON = {"python", "py", "python3"}
NODE = {"js", "javascript", "mjs", "node"}
GO = {"go"}
RUNNABLE = SHELL | PYTHON | NODE | GO
DATA_CHECKS = {"toml", "json", "yaml", "yml"}

FENCE = re.compile(r"^(?P<indent> {0,3})(?P<fence>`{3,}|~{3,})\s*(?P<info>[^`\s]*)[^`]*$")
MARKER = re.compile(r"^<!--\s*(?P<key>[\w-]+)\s*(?::\s*(?P<value>.*?))?\s*-->$")
PORTS = re.compile(r"\b(localhost|127\.0\.0\.1|0\.0\.0\.0|\[::1\]):(8000|8001|8002)\b")
READY_LINE = re.compile(r"onnxgate: serving gRPC on (\S+):(\d+) metrics on (\S+) http on (\S+)")
LIST_ITEM = re.compile(r"^\s*([-*+]|\d+[.)])\s")


@dataclass(frozen=True)
class Block:
    page: Path
    line: int  # of the opening fence, 1-based
    lang: str
    code: str
    markers: dict[str, str] = field(default_factory=dict)

    @property
    def id(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"

    @property
    def runnable(self) -> bool:
        return self.lang in RUNNABLE and "not-run" not in self.markers and "file" not in self.markers


def parse(page: Path) -> list[Block]:
    """The fenced blocks of one page, with the marker comments on the lines right above each fence."""
    lines = page.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        fence, lang = opening.group("fence"), opening.group("info").lower()
        markers: dict[str, str] = {}
        j = i - 1
        while j >= 0 and (marker := MARKER.match(lines[j].strip())):
            markers.setdefault(marker.group("key"), marker.group("value") or "")
            j -= 1
        body: list[str] = []
        k = i + 1
        closing = re.compile(rf" {{0,3}}{re.escape(fence[0])}{{{len(fence)},}}\s*")
        while k < len(lines) and not closing.fullmatch(lines[k]):
            body.append(lines[k])
            k += 1
        indent = len(opening.group("indent"))
        code = "\n".join(line[indent:] if line[:indent].isspace() else line for line in body) + "\n"
        blocks.append(Block(page, i + 1, lang, code, markers))
        i = k + 1
    return blocks


def indented_blocks(page: Path) -> list[int]:
    """Lines that open an indented (4-space) code block outside fences and lists."""
    found = []
    in_fence = False
    previous: list[str] = []
    for n, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1):
        if FENCE.match(line):
            in_fence = not in_fence
        elif not in_fence and line.startswith("    ") and line.strip() and previous and not previous[-1].strip():
            context = next((p for p in reversed(previous) if p.strip()), "")
            in_list = bool(LIST_ITEM.match(context)) or context.startswith((" ", "|", "<!--"))
            if not in_list:
                found.append(n)
        previous.append(line)
    return found


BLOCKS = [block for page in PAGES for block in parse(page)]
RUN = [block for block in BLOCKS if block.runnable]


def counts() -> dict[str, int]:
    return {
        "run": len(RUN),
        "not run": sum("not-run" in b.markers for b in BLOCKS),
        "data files": sum("file" in b.markers and "not-run" not in b.markers for b in BLOCKS),
    }


def summary() -> str:
    c = counts()
    return (
        f"doc blocks: {c['run']} run, {c['not run']} marked not runnable, {c['data files']} data files"
        f" ({len(BLOCKS)} fenced blocks in {len(PAGES)} pages)"
    )


@dataclass
class Server:
    home: Path
    grpc: int
    http: int
    metrics: int
    process: subprocess.Popen[str]
    log: list[str]


@pytest.fixture(scope="module")
def server(example_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """`onnxgate serve --example`, as a user starts it, with its own HOME (the example copied in, not rebuilt)."""
    home = tmp_path_factory.mktemp("home")
    shutil.copytree(example_repository, home / ".cache" / "onnxgate" / "example-repository")
    command = [sys.executable, "-m", "onnxgate", "serve", "--example"]
    command += ["--grpc-port", "0", "--http-port", "0", "--metrics-port", "0", "--predlog-flush-ms", "20"]
    process = subprocess.Popen(
        command,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**_env(home), "ONNXGATE_DRAIN_DELAY_S": "0"},
    )
    assert process.stderr is not None
    log: list[str] = []
    for line in process.stderr:
        log.append(line)
        ready = READY_LINE.search(line)
        if ready:
            break
    else:
        process.wait(30)
        pytest.fail(f"onnxgate serve --example exited with {process.returncode}:\n{''.join(log)}")
    threading.Thread(target=lambda: log.extend(process.stderr or []), daemon=True).start()
    yield Server(home, int(ready.group(2)), int(ready.group(4)), int(ready.group(3)), process, log)
    process.terminate()
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()


def _env(home: Path) -> dict[str, str]:
    venv_bin = str(Path(sys.executable).parent)
    keep = {k: v for k, v in os.environ.items() if not k.startswith("ONNXGATE_")}
    return {
        **keep,
        "HOME": str(home),
        "PATH": f"{venv_bin}{os.pathsep}{keep.get('PATH', '')}",
        "VIRTUAL_ENV": str(Path(sys.executable).parent.parent),
        "NODE_PATH": str(ROOT / "tests" / "node" / "node_modules"),
        "PYTHONUNBUFFERED": "1",
    }


def _checkout(workdir: Path) -> None:
    """Make `workdir` look like a checkout: every top-level entry of the repository linked in."""
    for entry in ROOT.iterdir():
        if entry.name not in (".git",) and not (workdir / entry.name).exists():
            (workdir / entry.name).symlink_to(entry)


def _rewrite(code: str, server: Server) -> str:
    ports = {"8000": server.http, "8001": server.grpc, "8002": server.metrics}
    return PORTS.sub(lambda m: f"{m.group(1)}:{ports[m.group(2)]}", code)


def _requirements(block: Block) -> None:
    for need in filter(None, (s.strip() for s in block.markers.get("requires", "").split(","))):
        if need.startswith("cmd:"):
            if shutil.which(need[4:]) is None:
                pytest.skip(f"{need[4:]} is not installed")
        else:
            pytest.importorskip(need, reason=f"{need} is not installed (its extra: docs/getting-started.md, Install)")


def _data_files(block: Block, workdir: Path) -> None:
    """The `file:` blocks above `block` on its page, written into the working directory."""
    for data in BLOCKS:
        if data.page == block.page and data.line < block.line and "file" in data.markers:
            target = workdir / data.markers["file"]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(data.code)


def _command(block: Block, workdir: Path) -> list[str]:
    if block.lang in SHELL:
        script = workdir / "snippet.sh"
        script.write_text(block.code)
        return ["bash", "-euo", "pipefail", str(script)]
    if block.lang in PYTHON:
        script = workdir / "snippet.py"
        script.write_text(block.code)
        return [sys.executable, str(script)]
    if block.lang in NODE:
        node = shutil.which("node")
        if node is None:
            pytest.skip("Node.js is not installed (bash .ci/setup installs it)")
        module = re.search(r"^\s*import\s|\bawait\b", block.code, re.M) and "require(" not in block.code
        script = workdir / ("snippet.mjs" if module else "snippet.js")
        script.write_text(block.code)
        return [node, str(script)]
    go = shutil.which("go")
    if go is None:
        pytest.skip("no Go toolchain installed")
    script = workdir / "main.go"
    script.write_text(block.code)
    return [go, "run", str(script)]


@pytest.mark.parametrize("block", RUN, ids=[b.id for b in RUN])
def test_block_runs(block: Block, server: Server, tmp_path: Path) -> None:
    _requirements(block)
    workdir = tmp_path / "work"
    workdir.mkdir()
    _data_files(block, workdir)
    _checkout(workdir)
    block = Block(block.page, block.line, block.lang, _rewrite(block.code, server), block.markers)
    command = _command(block, workdir)
    timeout = float(block.markers.get("timeout", "120"))
    # its own process group: whatever the block starts (a server, a background job) ends with it, also
    # when it runs past its time (a block that started a server left it holding 8000-8002 for later tests)
    with subprocess.Popen(
        command, cwd=workdir, env=_env(server.home), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    ) as process:  # fmt: skip
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            stdout, stderr = process.communicate()
            pytest.fail(f"{block.id} ran past {timeout:.0f} s:\n{block.code}\nstdout: {stdout!r}\nstderr: {stderr!r}")
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
    run = subprocess.CompletedProcess(command, process.returncode, stdout, stderr)
    output = run.stdout + run.stderr
    assert run.returncode == 0, f"{block.id} exited {run.returncode}:\n{block.code}\n--- output:\n{output}"
    if "expect" in block.markers:
        assert re.search(block.markers["expect"], output), (
            f"{block.id}: no match for {block.markers['expect']!r}:\n{output}"
        )
    assert server.process.poll() is None, f"the server exited while {block.id} ran:\n{''.join(server.log[-30:])}"


DATA = [b for b in BLOCKS if "file" in b.markers and b.lang in DATA_CHECKS]


@pytest.mark.parametrize("block", DATA, ids=[b.id for b in DATA])
def test_data_file_parses(block: Block) -> None:
    if block.lang == "toml":
        tomllib.loads(block.code)
    elif block.lang == "json":
        json.loads(block.code)
    else:
        yaml = pytest.importorskip("yaml")
        list(yaml.safe_load_all(block.code))


def test_every_block_is_run_or_marked() -> None:
    unmarked = [
        f"{b.id} ({b.lang or 'no language'})"
        for b in BLOCKS
        if not b.runnable and "not-run" not in b.markers and "file" not in b.markers
    ]
    assert not unmarked, (
        "blocks neither runnable nor marked <!-- not-run: reason --> or <!-- file: name -->:\n" + "\n".join(unmarked)
    )
    reasonless = [b.id for b in BLOCKS if "not-run" in b.markers and not b.markers["not-run"]]
    assert not reasonless, f"<!-- not-run --> needs a reason: {reasonless}"
    indented = [f"{p.relative_to(ROOT)}:{n}" for p in PAGES for n in indented_blocks(p)]
    assert not indented, f"indented code blocks (write them fenced, with a language): {indented}"
    print(summary())


def test_the_parser_finds_blocks_markers_and_indented_code(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "# t\n\n<!-- not-run: needs a cluster -->\n```bash\nkubectl get pods\n```\n\ntext\n\n"
        "<!-- file: a.toml -->\n<!-- requires: xgboost -->\n~~~toml\nx = 1\n~~~\n\n- item\n\n    continued\n\n"
        "para\n\n    indented code\n\n````python\n```\nprint(1)\n````\n"
    )
    found = parse(page)
    assert [(b.line, b.lang) for b in found] == [(4, "bash"), (12, "toml"), (24, "python")]
    assert found[0].markers == {"not-run": "needs a cluster"} and not found[0].runnable
    assert found[1].markers == {"file": "a.toml", "requires": "xgboost"} and found[1].code == "x = 1\n"
    assert found[2].code == "```\nprint(1)\n" and found[2].runnable
    assert indented_blocks(page) == [22]

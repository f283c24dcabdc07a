"""Every `onnxgate` command's --help, and the names the commands share (old ones kept with a deprecation line)."""

from __future__ import annotations

import argparse
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from onnxgate.server.cli import DEPRECATED_FLAGS, SUBCOMMANDS, main


def _commands() -> list[list[str]]:
    """Every command line that has its own --help: the top level, each subcommand and their subcommands."""
    found: list[list[str]] = [[], ["serve"]]
    for name, (module, _) in SUBCOMMANDS.items():
        found.append([name])
        parser = argparse.ArgumentParser()
        importlib.import_module(module).configure_parser(parser)
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                found += [[name, nested] for nested in action.choices]
    return found


@pytest.mark.parametrize("command", _commands(), ids=lambda c: " ".join(c) or "onnxgate")
def test_every_help_prints_and_exits_0(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main([*command, "--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: onnxgate"), out
    # the one name of each thing: no subcommand offers the replaced flag names or a positional model name
    for renamed in DEPRECATED_FLAGS.values():
        for old in renamed:
            assert f"{old} " not in out
    if command and command[-1] in ("retrain", "evaluate", "show"):
        assert "--model MODEL" in out and "positional_model" not in out


def test_serve_help_as_a_user_types_it() -> None:
    """The first thing a new user types, in a process of its own (every setting's help goes through argparse's
    %-formatting there: a bare % in one of them crashed it)."""
    run = subprocess.run(
        [sys.executable, "-m", "onnxgate", "serve", "--help"], capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stderr
    assert "--event-loop" in run.stdout and "~10% more" in run.stdout and run.stderr == ""


def test_old_flag_names_still_work_with_a_deprecation_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    log = tmp_path / "log"
    log.mkdir()
    assert main(["dataset", "report", "--log-dir", str(log)]) == 0
    err = capsys.readouterr().err
    assert "onnxgate dataset: --log-dir is deprecated and goes in the next release; use --predlog-dir" in err
    assert main(["dataset", "report", f"--log-dir={log}"]) == 0  # the --flag=value spelling too
    assert "use --predlog-dir" in capsys.readouterr().err
    assert main(["dataset", "report", "--predlog-dir", str(log)]) == 0
    assert capsys.readouterr().err == ""


def test_positional_model_name_still_works_with_a_deprecation_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # evaluate on an empty log: the command runs with the name it was given, and says there is nothing to read
    args = ["--candidate", "2", "--predlog-dir", str(tmp_path)]
    assert main(["evaluate", "nope", *args]) == 2
    old = capsys.readouterr().err
    assert "onnxgate evaluate: the model name as a positional argument is deprecated" in old and "--model NAME" in old
    assert main(["evaluate", "--model", "nope", *args]) == 2
    new = capsys.readouterr().err
    assert "deprecated" not in new and new == old.split("\n", 1)[1]  # the same answer, less the deprecation
    with pytest.raises(SystemExit) as done:
        main(["evaluate", *args])
    assert done.value.code == 2
    assert "the following arguments are required: --model" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["evaluate", "a", "--model", "b", *args])
    assert "two model names: 'a' and --model 'b'" in capsys.readouterr().err

"""The generated reference pages (docs/reference/settings.md, cli.md) are what the code gives today."""

from __future__ import annotations

import pytest

from onnxgate.server import docgen
from onnxgate.server.config import FIELDS, env_name


@pytest.mark.parametrize("page", [docgen.SETTINGS_PAGE, docgen.CLI_PAGE], ids=str)
def test_generated_page_is_up_to_date(page) -> None:  # type: ignore[no-untyped-def]
    committed = (docgen.ROOT / page).read_text(encoding="utf-8")
    assert committed == docgen.pages()[page], f"{page} is stale: run python -m onnxgate.server.docgen"


def test_every_setting_and_command_is_on_its_page() -> None:
    settings = docgen.settings_page()
    for name in FIELDS:
        assert f"`{name}`" in settings and f"`{env_name(name)}`" in settings
    cli = docgen.cli_page()
    from onnxgate.server.cli import SUBCOMMANDS

    for command in ["serve", *SUBCOMMANDS]:
        assert f"## onnxgate {command}\n" in cli
    assert "--model-repository" in cli and "--predlog-dir" in cli


def test_check_mode_reports_a_stale_page(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    assert docgen.main(["--check", "--root", str(tmp_path)]) == 1
    assert "stale" in capsys.readouterr().err
    assert docgen.main(["--root", str(tmp_path)]) == 0
    assert docgen.main(["--check", "--root", str(tmp_path)]) == 0

"""The doc-test collector's count of blocks run and not run, at the end of the session."""

from __future__ import annotations

import pytest


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    from tests.docs.test_snippets import summary

    terminalreporter.write_line(summary())

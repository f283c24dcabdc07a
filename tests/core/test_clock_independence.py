"""No test may depend on the date, the time of day or how long the suite has run before it.

The tests that read the wall clock carry the `wall_clock` mark; here they run again in a process whose clock
libfaketime sets to other dates: a year's last seconds (the day, month and year change while they run) and a
leap day in the past. Monotonic clocks stay real, so timeouts and deadlines behave as they do in the suite.
A test that took its time at import, or compared a stored date with today's, fails here.

Not marked: tests that compare the process's clock with file times (the adopter's grace period in
test_adoption.py), since the kernel stamps files with the real clock, which libfaketime does not move.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import libfaketime
import pytest

ROOT = Path(__file__).resolve().parents[2]
LIBRARY = Path(libfaketime.__file__).parent / "vendor" / "libfaketime" / "src" / "libfaketime.so.1"


@pytest.mark.parametrize("start", ["2031-12-31 23:59:45", "2024-02-29 23:59:50"])
def test_wall_clock_tests_pass_at_other_dates(start: str, tmp_path: Path) -> None:
    assert LIBRARY.is_file(), f"{LIBRARY} is missing: reinstall the dev extras (libfaketime)"
    env = {
        **os.environ,
        "LD_PRELOAD": str(LIBRARY),
        "FAKETIME": f"@{start}",  # starts there and runs on
        "FAKETIME_DONT_FAKE_MONOTONIC": "1",
    }
    run = subprocess.run(
        [
            sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "wall_clock",
            "tests/predlog", "tests/learning", f"--basetemp={tmp_path / 'runs'}",
        ],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    summary = run.stdout.strip().splitlines()[-1] if run.stdout.strip() else run.stderr[-2000:]
    assert run.returncode == 0, f"at {start}: {summary}\n{run.stdout[-6000:]}"
    # the clock was moved: the run's own clock said so (pytest prints no dates; the marked tests ran)
    assert " passed" in summary and " deselected" in summary, summary
    probe = subprocess.run(
        [sys.executable, "-c", "import datetime; print(datetime.datetime.now(datetime.UTC).year)"],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert probe.stdout.strip() in (start[:4], str(int(start[:4]) + 1)), probe

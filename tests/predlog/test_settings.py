"""The predlog_* settings: flat entries in the gateway's settings become per-model policies."""

from __future__ import annotations

from pathlib import Path

import pytest

from onnxgate.server.config import SettingsError, load_settings
from onnxgate.server.predlog import ModelLogPolicy


def _settings(tmp_path: Path, **flags: object):  # type: ignore[no-untyped-def]
    return load_settings(env={}, flags={"model_repository": tmp_path, **flags})


def test_off_by_default(tmp_path: Path) -> None:
    assert _settings(tmp_path).predlog() is None


def test_per_model_policies(tmp_path: Path) -> None:
    s = _settings(
        tmp_path,
        predlog_dir=tmp_path / "log",
        predlog_replica_id="pod-0",
        predlog_sample_rate="*=0.5,iris=1",
        predlog_log="credit=outputs",
        predlog_exclude_inputs="*:email,iris:name",
        predlog_flush_ms="50",
    ).predlog()
    assert s is not None and s.replica_dir == tmp_path / "log" / "pod-0" and s.flush_ms == 50.0
    assert s.policy("iris") == ModelLogPolicy(1.0, True, True, frozenset({"email", "name"}))
    assert s.policy("credit") == ModelLogPolicy(0.5, False, True, frozenset({"email"}))
    assert s.policy("other") == ModelLogPolicy(0.5, True, True, frozenset({"email"}))


def test_env_variables(tmp_path: Path) -> None:
    env = {"ONNXGATE_PREDLOG_DIR": str(tmp_path / "log"), "ONNXGATE_PREDLOG_SAMPLE_RATE": "m=0.1"}
    s = load_settings(env=env, flags={"model_repository": tmp_path}).predlog()
    assert s is not None and s.policy("m").sample_rate == 0.1 and s.replica_id  # a generated replica id


@pytest.mark.parametrize(
    "flags, message",
    [
        ({"predlog_sample_rate": "iris"}, "expected NAME=VALUE"),
        ({"predlog_sample_rate": "iris=2"}, "sample_rate must be within"),
        ({"predlog_sample_rate": "iris=x"}, "not a number"),
        ({"predlog_log": "iris=everything"}, "inputs, outputs or both"),
        ({"predlog_exclude_inputs": "iris"}, "expected NAME:VALUE"),
        ({"predlog_replica_id": "a/b"}, "replica_id"),
        ({"predlog_flush_records": "0"}, "flush_records"),
    ],
)
def test_bad_entries_are_settings_errors(tmp_path: Path, flags: dict[str, object], message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        _settings(tmp_path, predlog_dir=tmp_path / "log", **flags)

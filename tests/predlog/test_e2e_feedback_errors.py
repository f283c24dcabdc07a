"""Feedback errors through the real server, and the `dataset report` command."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from onnxgate.server.cli import main as cli
from onnxgate.server.feedback import read_feedback
from onnxgate.server.pb import feedback_pb2 as fpb
from tests.conftest import GatewayHandle
from tests.predlog.e2e_helpers import Clients, argmax_repository, features


def test_stream_with_a_bad_message_keeps_the_good_prefix(
    start_gateway: Callable[..., GatewayHandle], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log_dir = tmp_path / "log"
    gw = start_gateway(argmax_repository(tmp_path / "repo"), predlog_dir=log_dir, predlog_unknown_after_s=0)
    c = Clients(gw.address)
    c.infer("p0", features(0))
    messages = [
        fpb.FeedbackRequest(prediction_id="p0", label="0"),
        fpb.FeedbackRequest(prediction_id="x", value=1.0),
        fpb.FeedbackRequest(prediction_id="", label="1"),
    ]
    with pytest.raises(grpc.RpcError) as err:
        c.feedback.StreamFeedback(iter(messages), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "message 2" in str(err.value.details())
    assert sorted(read_feedback(log_dir)["prediction_id"].to_pylist()) == ["p0", "x"]
    with pytest.raises(grpc.RpcError) as err:
        c.feedback.SendFeedback(fpb.FeedbackRequest(prediction_id="p0"), timeout=10)  # neither truth nor reward
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    c.close()
    gw.stop()
    assert cli(["dataset", "report", "--predlog-dir", str(log_dir), "--unknown-after-s", "0"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["predictions"], report["joined"], report["unknown"]) == (1, 1, ["x"])
    assert cli(["dataset", "report", "--predlog-dir", str(tmp_path / "missing")]) == 2

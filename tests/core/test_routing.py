"""Routing configs: each mistake refused with its reason, in the config parser and through a real load."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from onnxgate.server.modelspec import ConfigError
from onnxgate.server.pb import grpc_service_pb2 as pb
from onnxgate.server.pb import model_config_pb2 as mc
from onnxgate.server.routing import RoutingConfig, check_versions, routing_config
from tests.conftest import GatewayHandle
from tests.models import write_version
from tests.predlog.e2e_helpers import argmax_model


def config(**params: str) -> mc.ModelConfig:
    out = mc.ModelConfig()
    for key, value in params.items():
        out.parameters[key.replace("_", ".", 1) if key != "routing" else key].string_value = value
    return out


def test_routing_parameters_parse() -> None:
    assert routing_config("m", None) == RoutingConfig()
    assert routing_config("m", config(routing_weights="1:3,2:1", routing="split")).weights == ((1, 0.75), (2, 0.25))
    shadow = routing_config("m", config(routing="shadow", routing_shadow="2", **{"routing_shadow_rate": "0.5"}))
    assert (shadow.kind, shadow.shadow, shadow.shadow_rate) == ("shadow", 2, 0.5)
    assert routing_config("m", config(routing="bandit", routing_seed="4")).seed == 4
    assert not routing_config("m", config(routing="bandit")).promote  # opt-in
    assert routing_config("m", config(routing="bandit", routing_promote="true")).promote
    assert routing_config("m", config(routing="shadow", routing_shadow="2", routing_promote="true")).promote
    assert not routing_config("m", config(routing="split", routing_weights="1:1", routing_promote="false")).promote


@pytest.mark.parametrize(
    ("params", "reason"),
    [
        ({"routing": "canary"}, "expected one of latest, split, shadow, bandit"),
        ({"routing": "split"}, "'routing.weights' is missing"),
        ({"routing": "split", "routing_weights": "1:x"}, "expected VERSION:WEIGHT"),
        ({"routing": "split", "routing_weights": "1:0,2:0"}, "sum to 0"),
        ({"routing": "shadow"}, "must name the shadow version"),
        ({"routing": "latest", "routing_shadow": "2"}, "only read with routing 'shadow'"),
        ({"routing": "bandit", "routing_bandit_floor": "0.7"}, "within [0.0, 0.5]"),
        ({"routing": "bandit", "routing_wat": "1"}, "not a routing parameter"),
        ({"routing": "bandit", "routing_promote": "yes"}, "expected 'true' or 'false'"),
        ({"routing": "latest", "routing_promote": "true"}, "needs routing 'split', 'bandit' or 'shadow'"),
    ],
)
def test_bad_routing_parameters_are_refused_with_the_reason(params: dict[str, str], reason: str) -> None:
    with pytest.raises(ConfigError, match="model 'm': ") as err:
        routing_config("m", config(**params))
    assert reason in str(err.value)


def test_routing_must_name_served_versions() -> None:
    with pytest.raises(ConfigError, match=r"names version\(s\) 3, which are not served \(served: 1, 2"):
        check_versions("m", routing_config("m", config(routing="split", routing_weights="1:1,3:1")), [1, 2])


def test_explicit_load_with_a_bad_routing_fails_with_the_reason_and_keeps_serving(
    start_gateway: Callable[..., GatewayHandle], tmp_path: Path
) -> None:
    repo = tmp_path / "repo"
    write_version(repo, "argmax", 1, argmax_model())
    gw = start_gateway(repo, model_control_mode="explicit", load_model=["argmax"])
    stub = gw.stub()
    (repo / "argmax" / "config.pbtxt").write_text('parameters { key: "routing" value { string_value: "nope" } }\n')
    with pytest.raises(grpc.RpcError) as err:
        stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="argmax"), timeout=10)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "'routing' is 'nope'" in str(err.value.details())
    assert stub.ModelReady(pb.ModelReadyRequest(name="argmax"), timeout=10).ready

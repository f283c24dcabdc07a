"""Live experiments through a real server and real feedback: split, shadow and bandit routing with the
route and propensity logged; routing changed by a config reload without a failed request; promotion of a
better canary or shadow on live evidence (not of a shadow no better), and rollback (traffic moved) of a
promoted version that degrades."""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnx
import pyarrow as pa
import pytest

from onnxgate.server.join import read_predictions
from onnxgate.server.pb import grpc_service_pb2 as pb
from tests.conftest import GatewayHandle
from tests.models import write_version
from tests.predlog.e2e_helpers import Clients, argmax_model, features, label_of
from tests.predlog.helpers import wait_for


def argmin_model() -> onnx.ModelProto:
    """The argmax model's signature, answering argmin: always a wrong label on `features` rows."""
    model = argmax_model()
    model.graph.node[0].op_type = "ArgMin"
    return model


def routing(kind: str, **params: str) -> str:
    entries = {"routing": kind, **{f"routing.{k}": v for k, v in params.items()}}
    return "".join(f'parameters {{ key: "{k}" value {{ string_value: "{v}" }} }}\n' for k, v in entries.items())


def repository(root: Path, config: str, bad_v2: bool = False) -> Path:
    policy = "version_policy { all { } }\n"
    write_version(root, "argmax", 1, argmax_model(), config=policy + config)
    write_version(root, "argmax", 2, argmin_model() if bad_v2 else argmax_model())
    return root


def scrape(gw: GatewayHandle) -> str:
    with urllib.request.urlopen(gw.metrics_url, timeout=10) as r:
        return str(r.read().decode())


def logged(gw: GatewayHandle, log_dir: Path) -> list[dict[str, object]]:
    assert gw.gateway.predlog is not None and gw.gateway.predlog.flush()
    table = read_predictions(log_dir, ["argmax"])
    assert isinstance(table, pa.Table)
    return sorted(table.to_pylist(), key=lambda r: int(str(r["id"])[1:]))


def test_split_sends_the_configured_shares_and_logs_propensities(
    start_gateway: Callable[..., GatewayHandle], tmp_path: Path
) -> None:
    log_dir = tmp_path / "log"
    repo = repository(tmp_path / "repo", routing("split", weights="1:0.8,2:0.2", seed="7"))
    gw = start_gateway(repo, predlog_dir=log_dir, predlog_flush_ms=50)
    c = Clients(gw.address)
    n = 500
    versions = Counter(c.infer(f"p{i}", features(i)).model_version for i in range(n))
    # binomial(500, 0.2): sd ~ 8.9; four of them either side
    assert abs(versions["2"] - 0.2 * n) < 4 * (n * 0.2 * 0.8) ** 0.5, versions
    request = pb.ModelInferRequest(
        model_name="argmax",
        model_version="2",
        id=f"p{n}",
        inputs=[pb.ModelInferRequest.InferInputTensor(name="x", datatype="FP32", shape=[1, 4])],
        raw_input_contents=[features(0).reshape(1, 4).astype("<f4").tobytes()],
    )
    assert c.infer_stub.ModelInfer(request, timeout=10).model_version == "2"
    rows = logged(gw, log_dir)
    assert len(rows) == n + 1
    for row in rows[:n]:
        assert row["route"] == "split"
        assert row["propensity"] == pytest.approx(0.8 if row["version"] == "1" else 0.2)
        assert row["shadow_version"] is None if "shadow_version" in row else True
    assert (rows[n]["route"], rows[n]["propensity"], rows[n]["version"]) == ("explicit", 1.0, "2")
    text = scrape(gw)
    assert f'onnxgate_route_requests_total{{model="argmax",route="split",version="2"}} {versions["2"]}.0' in text
    assert 'onnxgate_route_traffic_share{model="argmax",version="1"} 0.8' in text
    c.close()


def test_shadow_never_changes_a_response_and_is_logged_in_the_same_row(
    start_gateway: Callable[..., GatewayHandle], tmp_path: Path
) -> None:
    log_dir = tmp_path / "log"

    def repo(root: Path, config: str) -> Path:
        # the champion, version 2 (the latest), answers right; the shadow, version 1, answers wrong
        write_version(root, "argmax", 1, argmin_model(), config=config)
        write_version(root, "argmax", 2, argmax_model())
        return root

    all_versions = "version_policy { all { } }\n"
    shadowed = start_gateway(
        repo(tmp_path / "repo", all_versions + routing("shadow", shadow="1", seed="1")),
        predlog_dir=log_dir,
        predlog_flush_ms=50,
    )
    plain = start_gateway(repo(tmp_path / "plain", all_versions))
    a, b = Clients(shadowed.address), Clients(plain.address)
    n = 60
    for i in range(n):
        got, want = a.infer(f"p{i}", features(i)), b.infer(f"p{i}", features(i))
        assert got.model_version == want.model_version == "2" and label_of(got) == i % 4
        assert list(got.raw_output_contents) == list(want.raw_output_contents)
        assert [(o.name, list(o.shape)) for o in got.outputs] == [(o.name, list(o.shape)) for o in want.outputs]
    router = shadowed.gateway.repository.served("argmax").router
    assert router is not None
    assert wait_for(lambda: sum(router.stats.shadow_runs.values()) + router.stats.shadow_dropped == n, 10)
    rows = logged(shadowed, log_dir)
    assert len(rows) == n  # one row per request: the shadow's outputs are in the champion's row
    ran = [r for r in rows if r["shadow_version"] == "1"]
    assert len(ran) == router.stats.shadow_runs["1"] > n // 2  # an idle server drops few, if any
    for r in ran:
        i = int(str(r["id"])[1:])
        assert (r["version"], r["route"], r["propensity"]) == ("2", "latest", 1.0)
        assert r["output.label"] == [i % 4] != r["shadow.output.label"]
        assert r["shadow.output.label.shape"] == [1] and r["shadow.output.scores.shape"] == [1, 4]
    text = scrape(shadowed)
    assert f'onnxgate_shadow_runs_total{{model="argmax",version="1"}} {len(ran)}.0' in text
    assert 'onnxgate_shadow_disagreement_ratio{model="argmax",version="1"} 1.0' in text
    a.close()
    b.close()


def test_bandit_sends_most_traffic_to_the_good_version_and_keeps_the_floor(
    start_gateway: Callable[..., GatewayHandle], tmp_path: Path
) -> None:
    log_dir = tmp_path / "log"
    repo = repository(tmp_path / "repo", routing("bandit", bandit_floor="0.05", seed="3"), bad_v2=True)
    gw = start_gateway(repo, predlog_dir=log_dir, predlog_flush_ms=50, predlog_join_interval_s=0.2)
    predlog, joiner = gw.gateway.predlog, gw.gateway.joiner
    router = gw.gateway.repository.served("argmax").router
    assert predlog is not None and joiner is not None and router is not None
    assert router.shares() == {"1": 0.5, "2": 0.5}  # no evidence yet
    c = Clients(gw.address)
    sent = 0
    for _ in range(15):  # at most 300 feedbacks
        answers = {f"p{i}": c.infer(f"p{i}", features(i)) for i in range(sent, sent + 20)}
        assert predlog.flush()
        for pid, answer in answers.items():
            assert answer.model_version in ("1", "2")
            c.send(pid, str(int(pid[1:]) % 4))  # the truth: only version 1 answers it
        sent += 20
        joiner.run_once()  # what the joiner's thread does every 0.2 s, without waiting for it
        shares = router.shares()
        assert min(shares.values()) >= 0.05 - 1e-9
        if shares["1"] >= 0.9:
            break
    assert router.shares()["1"] >= 0.9, (sent, router.shares())
    after = Counter(c.infer(f"q{i}", features(i)).model_version for i in range(200))
    assert after["1"] >= 0.9 * 200 and router.shares()["2"] >= 0.05 - 1e-9, after
    text = scrape(gw)
    assert 'onnxgate_bandit_posterior_mean{model="argmax",version="2"} 0.0' in text
    rows = logged(gw, log_dir)
    assert {r["route"] for r in rows} == {"bandit"}
    assert all(0.05 - 1e-9 <= float(str(r["propensity"])) <= 0.95 + 1e-9 for r in rows)
    c.close()


def test_routing_changes_on_reload_without_a_failed_request(
    start_gateway: Callable[..., GatewayHandle], tmp_path: Path
) -> None:
    repo = repository(tmp_path / "repo", "")
    gw = start_gateway(repo, model_control_mode="poll", poll_interval_s=0.1)
    c = Clients(gw.address)
    assert c.infer("a", features(0)).model_version == "2"  # latest
    failures: list[Exception] = []
    versions: list[str] = []
    stop = threading.Event()

    def load() -> None:
        i = 0
        while not stop.is_set():
            try:
                versions.append(c.infer(f"x{i}", features(i)).model_version)
            except grpc.RpcError as e:
                failures.append(e)
            i += 1

    thread = threading.Thread(target=load)
    thread.start()
    try:
        config = repo / "argmax" / "config.pbtxt"
        config.write_text("version_policy { all { } }\n" + routing("split", weights="1:1,2:0"))
        assert wait_for(lambda: versions[-20:] == ["1"] * 20 if len(versions) > 20 else False, 10)
        # a bad routing config: the model keeps serving with the routing it had, the index says why
        config.write_text("version_policy { all { } }\n" + routing("split", weights="1:1,7:1"))
        entries = lambda: [e.reason for e in gw.gateway.repository.index()]  # noqa: E731
        assert wait_for(lambda: any("version(s) 7" in r for r in entries()), 10), entries()
        mark = len(versions)
        time.sleep(0.3)
        assert set(versions[mark:]) == {"1"}
    finally:
        stop.set()
        thread.join(10)
    assert failures == [] and len(versions) > 50
    c.close()


def test_a_degraded_promoted_version_is_rolled_back_on_live_evidence(
    start_gateway: Callable[..., GatewayHandle], tmp_path: Path
) -> None:
    repo = tmp_path / "repo"
    write_version(repo, "argmax", 1, argmax_model(), config="version_policy { all { } }\n")
    log_dir = tmp_path / "log"
    gw = start_gateway(repo, predlog_dir=log_dir, predlog_flush_ms=50, model_control_mode="poll", poll_interval_s=0.1)
    predlog, joiner = gw.gateway.predlog, gw.gateway.joiner
    assert predlog is not None and joiner is not None
    c = Clients(gw.address)

    def traffic(prefix: str, n: int) -> Counter[str]:
        answers = {f"{prefix}{i}": c.infer(f"{prefix}{i}", features(i)) for i in range(n)}
        assert predlog.flush()
        for pid in answers:
            c.send(pid, str(int(pid.lstrip("abc")) % 4))
        joiner.run_once()
        return Counter(a.model_version for a in answers.values())

    assert traffic("a", 40) == {"1": 40}
    write_version(repo, "argmax", 2, argmin_model())  # the promotion: a new latest that answers wrong
    assert wait_for(lambda: c.infer("probe", features(0)).model_version == "2", 10)
    assert traffic("b", 40) == {"2": 40}  # 40 wrong against 40 right: rolled back in this round
    assert traffic("c", 20) == {"1": 20}
    decisions = [json.loads(line) for line in (repo / "argmax" / "decisions.jsonl").read_text().splitlines()]
    assert [(d["outcome"], d["version"], d["champion"]) for d in decisions] == [("rolled back", "2", "1")]
    assert "significantly worse" in decisions[0]["reason"] and decisions[0]["test"]["p_value_worse"] < 0.05
    text = scrape(gw)
    assert 'onnxgate_rollbacks_total{model="argmax"} 1.0' in text
    assert 'onnxgate_rollback_info{from="2",model="argmax",reason="live accuracy of version 2' in text
    # the pin lasts across polls (the config did not change)
    time.sleep(0.3)
    assert c.infer("d", features(1)).model_version == "1"
    c.close()


def explicit(c: Clients, pid: str, x: np.ndarray, version: str) -> pb.ModelInferResponse:
    tensor = pb.ModelInferRequest.InferInputTensor(name="x", datatype="FP32", shape=[1, 4])
    request = pb.ModelInferRequest(
        model_name="argmax",
        model_version=version,
        id=pid,
        inputs=[tensor],
        raw_input_contents=[x.reshape(1, 4).astype("<f4").tobytes()],
    )
    return c.infer_stub.ModelInfer(request, timeout=10)


def decisions(repo: Path) -> list[dict[str, Any]]:
    path = repo / "argmax" / "decisions.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_a_better_canary_is_promoted_on_live_evidence(
    start_gateway: Callable[..., GatewayHandle], tmp_path: Path
) -> None:
    log_dir = tmp_path / "log"
    # the champion (split tie: the older, version 1) answers wrong; the canary, version 2, right
    policy = "version_policy { all { } }\n"
    repo = tmp_path / "repo"
    write_version(
        repo, "argmax", 1, argmin_model(), config=policy + routing("split", weights="1:1,2:1", promote="true", seed="5")
    )
    write_version(repo, "argmax", 2, argmax_model())
    gw = start_gateway(repo, predlog_dir=log_dir, predlog_flush_ms=50)
    predlog, joiner = gw.gateway.predlog, gw.gateway.joiner
    router = gw.gateway.repository.served("argmax").router
    assert predlog is not None and joiner is not None and router is not None and router.config.promote
    c = Clients(gw.address)
    assert 'onnxgate_live_promotions_total{model="argmax"} 0.0' in scrape(gw)
    sent = 0
    while router.pinned is None and sent < 400:
        answers = {f"p{i}": c.infer(f"p{i}", features(i)) for i in range(sent, sent + 20)}
        assert predlog.flush()
        for pid in answers:
            c.send(pid, str(int(pid[1:]) % 4))
        sent += 20
        joiner.run_once()
    assert router.pinned == 2 and 60 <= sent <= 200, (sent, router.pinned)  # 30 labelled each, roughly
    [decision] = decisions(repo)
    assert (decision["outcome"], decision["version"], decision["champion"], decision["trigger"]) == (
        "promoted",
        "2",
        "1",
        "live evidence",
    )
    assert decision["test"]["p_value_better"] < 0.05 and decision["test"]["challenger"] == 1.0
    assert decision["test"]["champion"] == 0.0 and min(decision["test"]["n"].values()) >= 30
    assert "significantly better" in decision["reason"]
    assert 'onnxgate_live_promotions_total{model="argmax"} 1.0' in scrape(gw)
    assert router.shares() == {"2": 1.0} and router.watch == (2, 1)
    after = [c.infer(f"q{i}", features(i)) for i in range(40)]
    assert {a.model_version for a in after} == {"2"}
    rows = [r for r in logged(gw, log_dir) if str(r["id"]).startswith("q")]
    assert len(rows) == 40 and {(r["route"], r["propensity"]) for r in rows} == {("pinned", 1.0)}
    c.close()


def test_a_promoted_then_degraded_version_under_split_is_rolled_back_and_traffic_moves(
    start_gateway: Callable[..., GatewayHandle], tmp_path: Path
) -> None:
    log_dir = tmp_path / "log"
    policy = "version_policy { all { } }\n"
    repo = tmp_path / "repo"
    write_version(
        repo, "argmax", 1, argmax_model(), config=policy + routing("split", weights="1:1,2:1", promote="true", seed="9")
    )
    write_version(repo, "argmax", 2, argmin_model())
    gw = start_gateway(repo, predlog_dir=log_dir, predlog_flush_ms=50)
    predlog, joiner = gw.gateway.predlog, gw.gateway.joiner
    router = gw.gateway.repository.served("argmax").router
    assert predlog is not None and joiner is not None and router is not None
    c = Clients(gw.address)
    argmin = lambda i: int(np.argmin(features(i)))  # noqa: E731
    sent = 0
    # first the world agrees with version 2 (argmin): it is promoted
    while router.pinned is None and sent < 400:
        answers = {f"p{i}": c.infer(f"p{i}", features(i)) for i in range(sent, sent + 20)}
        assert predlog.flush()
        for pid in answers:
            c.send(pid, str(argmin(int(pid[1:]))))
        sent += 20
        joiner.run_once()
    assert router.pinned == 2 and [d["outcome"] for d in decisions(repo)] == ["promoted"]
    # then it changes its mind (argmax is right): version 2, pinned, degrades; version 1 still answers
    # the requests that name it
    rounds = 0
    while router.pinned == 2 and rounds < 10:
        answers = {f"a{rounds}_{i}": c.infer(f"a{rounds}_{i}", features(i)) for i in range(20)}
        assert {a.model_version for a in answers.values()} == {"2"}
        answers |= {f"b{rounds}_{i}": explicit(c, f"b{rounds}_{i}", features(i), "1") for i in range(20)}
        assert predlog.flush()
        for pid in answers:
            c.send(pid, str(int(pid.split("_")[1]) % 4))
        rounds += 1
        joiner.run_once()
    assert router.pinned == 1 and router.watch is None, rounds
    made = decisions(repo)
    assert [(d["outcome"], d["version"], d["champion"]) for d in made] == [
        ("promoted", "2", "1"),
        ("rolled back", "2", "1"),
    ]
    assert made[1]["test"]["p_value_worse"] < 0.05 and made[1]["trigger"] == "live evidence"
    text = scrape(gw)
    assert 'onnxgate_rollbacks_total{model="argmax"} 1.0' in text
    assert 'onnxgate_live_promotions_total{model="argmax"} 1.0' in text
    # traffic moved: the split collapses to the version the rollback returned to, and it is not promoted again
    after = [c.infer(f"z{i}", features(i)) for i in range(40)]
    assert {a.model_version for a in after} == {"1"} and router.shares() == {"1": 1.0}
    joiner.run_once()
    assert router.pinned == 1 and len(decisions(repo)) == 2
    rows = [r for r in logged(gw, log_dir) if str(r["id"]).startswith("z")]
    assert {(r["version"], r["route"], r["propensity"]) for r in rows} == {("1", "pinned", 1.0)}
    c.close()


def shadow_rounds(gw: GatewayHandle, c: Clients, prefix: str, rounds: int, stop: Callable[[], bool]) -> int:
    """Rounds of 20 requests naming no version, each shadowed (or dropped) before the log is flushed, then
    labelled (argmax is right) and joined; until `stop()` or `rounds` rounds. Returns the requests sent."""
    predlog, joiner = gw.gateway.predlog, gw.gateway.joiner
    router = gw.gateway.repository.served("argmax").router
    assert predlog is not None and joiner is not None and router is not None
    sent = 0
    for _ in range(rounds):
        if stop():
            break
        answers = {f"{prefix}{i}": c.infer(f"{prefix}{i}", features(i)) for i in range(sent, sent + 20)}
        sent += 20
        assert wait_for(lambda n=sent: sum(router.stats.shadow_runs.values()) + router.stats.shadow_dropped >= n, 10)
        assert predlog.flush()
        for pid in answers:
            c.send(pid, str(int(pid[len(prefix) :]) % 4))
        joiner.run_once()
    return sent


def test_a_better_shadow_is_promoted_on_paired_live_evidence(
    start_gateway: Callable[..., GatewayHandle], tmp_path: Path
) -> None:
    log_dir = tmp_path / "log"
    # the champion, version 2 (the latest), answers wrong; the shadow, version 1, right on the same requests
    policy = "version_policy { all { } }\n"
    repo = tmp_path / "repo"
    write_version(
        repo, "argmax", 1, argmax_model(), config=policy + routing("shadow", shadow="1", promote="true", seed="3")
    )
    write_version(repo, "argmax", 2, argmin_model())
    gw = start_gateway(repo, predlog_dir=log_dir, predlog_flush_ms=50)
    router = gw.gateway.repository.served("argmax").router
    assert router is not None and router.config.promote and router.shadow is not None
    c = Clients(gw.address)
    assert 'onnxgate_live_promotions_total{model="argmax"} 0.0' in scrape(gw)
    sent = shadow_rounds(gw, c, "p", 20, lambda: router.pinned is not None)
    assert router.pinned == 1 and 40 <= sent <= 120, (sent, router.pinned)  # 30 paired, and a few dropped
    [decision] = decisions(repo)
    assert (decision["outcome"], decision["version"], decision["champion"], decision["trigger"]) == (
        "promoted",
        "1",
        "2",
        "live evidence",
    )
    test = decision["test"]
    assert test["test"] == "mcnemar_exact" and test["n"] >= 30 and test["b"] == 0 and test["c"] == test["n"]
    assert (
        test["p_value_better"] == pytest.approx(0.5 ** test["n"], rel=1e-9)
        and test["alpha"] == 0.05
        and test["min_rows"] == 30
    )
    assert (test["challenger"], test["champion"]) == (1.0, 0.0)
    assert "significantly better" in decision["reason"] and "McNemar" in decision["reason"]
    assert 'onnxgate_live_promotions_total{model="argmax"} 1.0' in scrape(gw)
    # the shadow answers every request naming no version, and shadows no more
    assert router.shares() == {"1": 1.0} and router.shadow is None and router.watch == (1, 2)
    runs = sum(router.stats.shadow_runs.values()) + router.stats.shadow_dropped
    after = [c.infer(f"q{i}", features(i)) for i in range(40)]
    assert {a.model_version for a in after} == {"1"} and {label_of(a) for a in after} == {0, 1, 2, 3}
    rows = [r for r in logged(gw, log_dir) if str(r["id"]).startswith("q")]
    assert len(rows) == 40 and {(r["version"], r["route"], r["shadow_version"]) for r in rows} == {
        ("1", "pinned", None)
    }
    assert sum(router.stats.shadow_runs.values()) + router.stats.shadow_dropped == runs
    c.close()


def test_a_shadow_no_better_than_the_champion_is_not_promoted(
    start_gateway: Callable[..., GatewayHandle], tmp_path: Path
) -> None:
    log_dir = tmp_path / "log"
    # the same model twice: every pair agrees (b = c = 0)
    repo = repository(tmp_path / "repo", routing("shadow", shadow="1", promote="true", seed="4"))
    gw = start_gateway(repo, predlog_dir=log_dir, predlog_flush_ms=50)
    router, joiner = gw.gateway.repository.served("argmax").router, gw.gateway.joiner
    assert router is not None and joiner is not None
    c = Clients(gw.address)
    sent = shadow_rounds(gw, c, "p", 5, lambda: False)
    assert sent == 100 and router.pinned is None and router.shadow is not None and decisions(repo) == []
    assert joiner.snapshot is not None
    pairs = joiner.snapshot.shadow_pairs[("argmax", "1")]
    assert pairs.n == router.stats.shadow_runs["1"] >= 30 and (pairs.b, pairs.c) == (0, 0) and pairs.both == pairs.n
    assert 'onnxgate_live_promotions_total{model="argmax"} 0.0' in scrape(gw)
    assert {c.infer(f"q{i}", features(i)).model_version for i in range(10)} == {"2"}
    c.close()


@pytest.mark.parametrize(("b", "c"), [(0, 5), (3, 10), (10, 3), (0, 0), (2000, 2100)])
def test_the_shadow_mcnemar_tail_is_scipys_exact_binomial(b: int, c: int) -> None:
    from scipy.stats import binomtest

    from onnxgate.server.experiments import mcnemar_better

    expected = binomtest(c, b + c, 0.5, alternative="greater").pvalue if b + c else 1.0
    assert mcnemar_better(b, c) == pytest.approx(expected, rel=1e-9)

"""Off-policy evaluation from the prediction log (onnxgate.learning.offpolicy, `onnxgate evaluate`).

The logs are synthetic, written as the gateway writes them (rolled Parquet segments with `route`,
`propensity`, `shadow_version`, `shadow.output.*`; feedback segments), from a seeded stream where every
request's answer by *each* version is known: the candidate's true accuracy on the same stream is then
computed, not assumed, and the estimates are checked against it.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from onnxgate.learning.offpolicy import OffPolicyError, evaluate, ips, load_rows
from onnxgate.server.cli import main
from onnxgate.server.feedback import SCHEMA as FEEDBACK_SCHEMA
from onnxgate.server.logfiles import LogFiles

pytestmark = pytest.mark.wall_clock

NOW = datetime(2026, 3, 1, tzinfo=UTC)
CLASSES = 3


def _stream(n: int, seed: int, accuracy: dict[str, float]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Labels and, per version, its answer to every request (right with the version's accuracy)."""
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, CLASSES, n)
    answers = {}
    for version, acc in accuracy.items():
        wrong = (truth + rng.integers(1, CLASSES, n)) % CLASSES
        answers[version] = np.where(rng.random(n) < acc, truth, wrong)
    return truth, answers


def _write_log(
    log_dir: Path,
    truth: np.ndarray,
    served: list[str],
    answers: dict[str, np.ndarray],
    *,
    route: str | None = "split",
    propensity: list[float] | None = None,
    shadow: str | None = None,
) -> None:
    n = len(truth)
    ids = [f"p{i}" for i in range(n)]
    columns: dict[str, pa.Array | list[object]] = {
        "id": ids,
        "model": ["m"] * n,
        "version": served,
        "ts": pa.array([NOW + timedelta(milliseconds=i) for i in range(n)], pa.timestamp("us", tz="UTC")),
        "replica": ["r0"] * n,
        "input.input": pa.array([[float(t), 1.0] for t in truth], pa.large_list(pa.float32())),
        "input.input.shape": pa.array([[1, 2]] * n, pa.list_(pa.int64())),
        "output.label": pa.array([[int(answers[v][i])] for i, v in enumerate(served)], pa.large_list(pa.int64())),
        "output.label.shape": pa.array([[1]] * n, pa.list_(pa.int64())),
        "output.probabilities": pa.array([[0.2, 0.3, 0.5]] * n, pa.large_list(pa.float32())),
        "output.probabilities.shape": pa.array([[1, 3]] * n, pa.list_(pa.int64())),
    }
    if route is not None:
        columns["route"] = [route] * n
        columns["propensity"] = pa.array(propensity, pa.float64())
    if shadow is not None:
        columns["shadow_version"] = [shadow] * n
        columns["shadow.output.label"] = pa.array([[int(a)] for a in answers[shadow]], pa.large_list(pa.int64()))
        columns["shadow.output.label.shape"] = pa.array([[1]] * n, pa.list_(pa.int64()))
    path = log_dir / "r0" / "m" / "predictions-00000001.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path)
    feedback = {
        "prediction_id": ids,
        "feedback_id": [f"f{i}" for i in range(n)],
        "model": ["m"] * n,
        "version": [""] * n,
        "ts": pa.array([NOW + timedelta(seconds=60, milliseconds=i) for i in range(n)], pa.timestamp("us", tz="UTC")),
        "replica": ["r0"] * n,
        "label": [str(int(t)) for t in truth],
    }
    table = pa.table(
        {f.name: feedback.get(f.name, pa.nulls(n, f.type)) for f in FEEDBACK_SCHEMA}, schema=FEEDBACK_SCHEMA
    )
    pq.write_table(table, log_dir / "r0" / "feedback-00000001.parquet")


def _split_log(log_dir: Path, *, n: int = 3000, seed: int = 7, shadow: bool = False) -> dict[str, float]:
    """A 70/30 split between version 1 (90% right) and 2 (60% right); returns each version's true accuracy
    on the whole stream."""
    truth, answers = _stream(n, seed, {"1": 0.9, "2": 0.6})
    rng = np.random.default_rng(seed + 1)
    served = np.where(rng.random(n) < 0.7, "1", "2")
    propensity = [0.7 if v == "1" else 0.3 for v in served]
    # with `shadow`, version 2 scores every request in shadow (its answer is the same as when it serves)
    _write_log(log_dir, truth, served.tolist(), answers, propensity=propensity, shadow="2" if shadow else None)
    return {v: float((a == truth).mean()) for v, a in answers.items()}


@pytest.mark.parametrize("candidate", ["1", "2"])
def test_ips_and_snips_cover_the_candidates_true_accuracy(tmp_path: Path, candidate: str) -> None:
    true = _split_log(tmp_path)
    assert abs(true["1"] - 0.9) < 0.02 and abs(true["2"] - 0.6) < 0.03  # the stream is what it says
    report = evaluate(LogFiles.at(tmp_path), "m", candidate, seed=3)
    assert report.metric == "accuracy" and report.labelled == 3000
    by = {(e.estimator, e.version): e for e in report.estimates}
    for name in ("ips", "snips"):
        e = by[(name, candidate)]
        assert e.value is not None and e.interval is not None
        low, high = e.interval
        assert low <= true[candidate] <= high, (name, e, true)
        assert high - low < 0.12  # informative, not vacuous (IPS of a 30% arm: about 0.09 wide at n=3000)
        assert e.n == 3000
        share = 0.7 if candidate == "1" else 0.3
        assert e.ess is not None and abs(e.ess - share * 3000) < 100  # ESS ~ rows V answered (constant weights)
    # the two candidates are told apart: intervals do not overlap
    other = "2" if candidate == "1" else "1"
    other_ips = evaluate(LogFiles.at(tmp_path), "m", other, seed=3).estimates
    mine = by[("ips", candidate)].interval
    theirs = next(e for e in other_ips if e.estimator == "ips").interval
    assert mine is not None and theirs is not None and (mine[1] < theirs[0] or theirs[1] < mine[0])
    # observed per served version, side by side
    assert {k[1] for k in by if k[0] == "observed"} == {"1", "2"}


def test_the_bootstrap_is_seeded(tmp_path: Path) -> None:
    _split_log(tmp_path, n=500)
    a = evaluate(LogFiles.at(tmp_path), "m", "2", seed=11).as_json()
    b = evaluate(LogFiles.at(tmp_path), "m", "2", seed=11).as_json()
    c = evaluate(LogFiles.at(tmp_path), "m", "2", seed=12).as_json()
    assert a == b
    assert a != c


def test_shadow_outputs_give_the_exact_accuracy(tmp_path: Path) -> None:
    true = _split_log(tmp_path, shadow=True)
    report = evaluate(LogFiles.at(tmp_path), "m", "2")
    exact = next(e for e in report.estimates if e.estimator == "shadow")
    assert exact.n == 3000 and exact.value == pytest.approx(true["2"], abs=1e-12)
    assert exact.interval is not None and exact.interval[0] < true["2"] < exact.interval[1]
    # a candidate that never shadowed: no exact estimate, said so
    none = next(e for e in evaluate(LogFiles.at(tmp_path), "m", "1").estimates if e.estimator == "shadow")
    assert none.value is None and "no shadow outputs of version 1" in none.note


def test_logs_without_propensities_are_refused_for_ips(tmp_path: Path) -> None:
    truth, answers = _stream(200, 0, {"1": 0.9})
    _write_log(tmp_path, truth, ["1"] * 200, answers, route=None)
    rows, metric, _ = load_rows(LogFiles.at(tmp_path), "m")
    with pytest.raises(OffPolicyError, match=r"200 of 200 labelled rows have no propensity"):
        ips(rows, metric, "1")
    report = evaluate(LogFiles.at(tmp_path), "m", "1")
    refused = [e for e in report.estimates if e.estimator in ("ips", "snips")]
    assert len(refused) == 2 and all(e.value is None and "no propensity" in e.note for e in refused)
    observed = next(e for e in report.estimates if e.estimator == "observed")
    assert observed.value == pytest.approx(float((answers["1"] == truth).mean()))


def test_explicit_requests_are_not_weighed(tmp_path: Path) -> None:
    truth, answers = _stream(100, 1, {"1": 0.9})
    _write_log(tmp_path, truth, ["1"] * 100, answers, route="explicit", propensity=[1.0] * 100)
    rows, metric, _ = load_rows(LogFiles.at(tmp_path), "m")
    with pytest.raises(OffPolicyError, match="named its version"):
        ips(rows, metric, "1")


def test_replay_scores_the_candidates_onnx_file_on_logged_inputs(tmp_path: Path) -> None:
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType
    from sklearn.tree import DecisionTreeClassifier

    # the logged input's first feature is the truth: a tree on it is always right
    x = np.array([[c, 1.0] for c in range(CLASSES)] * 10, dtype=np.float32)
    tree = DecisionTreeClassifier(random_state=0).fit(x, x[:, 0].astype(int))
    onnx = convert_sklearn(
        tree, initial_types=[("input", FloatTensorType([None, 2]))], options={id(tree): {"zipmap": False}}
    )
    (tmp_path / "repo" / "m" / "3").mkdir(parents=True)
    (tmp_path / "repo" / "m" / "3" / "model.onnx").write_bytes(onnx.SerializeToString())
    _split_log(tmp_path / "log", n=300)
    report = evaluate(LogFiles.at(tmp_path / "log"), "m", "3", repository=tmp_path / "repo")
    replayed = next(e for e in report.estimates if e.estimator == "replay")
    assert replayed.value == 1.0 and replayed.n == 300 and "300 rows scored by onnxruntime" in replayed.note
    # version 3 never answered: IPS has nothing to weigh, and says so
    est = next(e for e in report.estimates if e.estimator == "ips")
    assert est.value == 0.0 and "answered none" in est.note


def test_the_command_prints_a_table_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _split_log(tmp_path, n=400)
    assert (
        main(["evaluate", "--model", "m", "--candidate", "2", "--predlog-dir", str(tmp_path), "--resamples", "200"])
        == 0
    )
    out = capsys.readouterr().out
    assert "estimator" in out and "snips" in out and "observed" in out
    assert main(["evaluate", "--model", "m", "--candidate", "2", "--predlog-dir", str(tmp_path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["candidate"] == "2" and {e["estimator"] for e in data["estimates"]} >= {"observed", "ips", "snips"}
    assert main(["evaluate", "--model", "nope", "--candidate", "2", "--predlog-dir", str(tmp_path)]) == 2
    assert "no labelled predictions of 'nope'" in capsys.readouterr().err

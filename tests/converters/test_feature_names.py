"""Feature names travel with the model: converters record the source's columns, clients call by name.

A PMML tree trained on u, v, w, s, t that uses only v, w, s, t (one input [-1, 4]) and a LightGBM model with
a pandas category column are converted, published, served by a real gateway with the prediction log on,
and called by column names over REST (JSON object rows, per-column tensors), gRPC (per-column tensors
through tritonclient) and onnxgate.client with a DataFrame: every answer equals the tensor form's. Bad
column input is a 400 / INVALID_ARGUMENT that names the columns; `dataset export` names the features.
"""

from __future__ import annotations

import asyncio
import csv
import json
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import lightgbm as lgb
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import tritonclient.grpc as grpcclient

from onnxgate.client import AsyncClient, Client, OnnxgateError
from onnxgate.converters import convert_to_repository
from onnxgate.server.cli import main as cli
from tests.conftest import GatewayHandle
from tests.converters.helpers import check_published, config, report
from tests.predlog.helpers import wait_for

RNG = np.random.default_rng(11)
MERCHANTS = ["food", "travel", "tools"]

# a regression tree over v, w, s, t; u is in the data dictionary (the training data) but not used
PMML = """<?xml version="1.0" encoding="UTF-8"?>
<PMML xmlns="http://www.dmg.org/PMML-4_4" version="4.4">
  <Header description="tree on v, w, s, t of u, v, w, s, t"/>
  <DataDictionary numberOfFields="6">
    <DataField name="u" optype="continuous" dataType="double"/>
    <DataField name="v" optype="continuous" dataType="double"/>
    <DataField name="w" optype="continuous" dataType="double"/>
    <DataField name="s" optype="continuous" dataType="double"/>
    <DataField name="t" optype="continuous" dataType="double"/>
    <DataField name="y" optype="continuous" dataType="double"/>
  </DataDictionary>
  <TreeModel functionName="regression" splitCharacteristic="binarySplit">
    <MiningSchema>
      <MiningField name="y" usageType="predicted"/>
      <MiningField name="v"/>
      <MiningField name="w"/>
      <MiningField name="s"/>
      <MiningField name="t"/>
    </MiningSchema>
    <Node score="0">
      <True/>
      <Node score="0">
        <SimplePredicate field="v" operator="lessThan" value="0.25"/>
        <Node score="1.5"><SimplePredicate field="w" operator="lessThan" value="-0.5"/></Node>
        <Node score="2.5"><SimplePredicate field="w" operator="greaterOrEqual" value="-0.5"/></Node>
      </Node>
      <Node score="0">
        <SimplePredicate field="v" operator="greaterOrEqual" value="0.25"/>
        <Node score="10.0"><SimplePredicate field="s" operator="lessThan" value="0.75"/></Node>
        <Node score="0">
          <SimplePredicate field="s" operator="greaterOrEqual" value="0.75"/>
          <Node score="20.0"><SimplePredicate field="t" operator="lessThan" value="0.0"/></Node>
          <Node score="30.0"><SimplePredicate field="t" operator="greaterOrEqual" value="0.0"/></Node>
        </Node>
      </Node>
    </Node>
  </TreeModel>
</PMML>
"""


def _pmml_rows(n: int) -> pd.DataFrame:
    # values a little away from the thresholds: float32 and float64 compare them alike
    return pd.DataFrame({c: np.round(RNG.normal(size=n), 3) + 0.0001 for c in ("v", "w", "s", "t")})


def _spend_frame(n: int) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "amount": RNG.gamma(2.0, 30.0, n),
            "merchant": pd.Categorical(RNG.choice(MERCHANTS, n), categories=MERCHANTS),
            "age": RNG.normal(40, 12, n),
        }
    )


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("names")
    (root / "tree.pmml").write_text(PMML)
    repo = root / "repo"
    outcome = convert_to_repository(root / "tree.pmml", repo, "tree")
    assert outcome.published is not None, outcome.report["parity"]

    frame = _spend_frame(600)
    target = ((frame["merchant"] == "travel") | (frame["amount"] > 80)).astype(int)
    params = {"objective": "binary", "verbose": -1, "num_leaves": 8, "min_data_per_group": 5, "cat_smooth": 1}
    booster = lgb.train(params, lgb.Dataset(frame, target), num_boost_round=12)
    booster.save_model(root / "spend.txt")
    outcome = convert_to_repository(root / "spend.txt", repo, "spend")
    assert outcome.published is not None, outcome.report["parity"]
    return repo


def test_the_published_versions_record_their_columns(repository: Path) -> None:
    tree, spend = repository / "tree" / "1", repository / "spend" / "1"
    check_published(tree, "pmml", "regression")
    check_published(spend, "lightgbm", "classification")
    expected_tree = [{"name": c, "datatype": "FP32", "input": "input", "index": i} for i, c in enumerate("vwst")]
    assert json.loads(config(tree).parameters["columns"].string_value) == expected_tree
    assert report(tree)["columns"] == expected_tree
    assert report(tree)["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 4]}]
    expected_spend = [
        {"name": "amount", "datatype": "FP32", "input": "amount", "index": 0},
        {"name": "merchant", "datatype": "BYTES", "input": "merchant", "index": 0, "categories": MERCHANTS},
        {"name": "age", "datatype": "FP32", "input": "age", "index": 0},
    ]
    assert json.loads(config(spend).parameters["columns"].string_value) == expected_spend
    assert report(spend)["columns"] == expected_spend


def _http(handle: GatewayHandle, method: str, path: str, body: object | None = None) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{handle.gateway.http_port}{path}",
        data=data,
        method=method,
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status, json.loads(answer.read() or b"null")
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def _outputs(doc: dict[str, Any]) -> dict[str, list[Any]]:
    return {o["name"]: o["data"] for o in doc["outputs"]}


def _tensor(name: str, values: np.ndarray) -> grpcclient.InferInput:
    datatype = {"f": "FP32" if values.dtype == np.float32 else "FP64", "O": "BYTES", "i": "INT64"}[values.dtype.kind]
    tensor = grpcclient.InferInput(name, list(values.shape), datatype)
    tensor.set_data_from_numpy(values)
    return tensor


def _grpc(handle: GatewayHandle, model: str, tensors: list[grpcclient.InferInput], request_id: str = "") -> Any:
    client = grpcclient.InferenceServerClient(handle.address)
    try:
        return client.infer(model, tensors, request_id=request_id)
    finally:
        client.close()


def test_called_by_column_names_on_every_edge(
    repository: Path, start_gateway: Callable[..., GatewayHandle], tmp_path: Path
) -> None:
    log_dir = tmp_path / "log"
    gw = start_gateway(repository, predlog_dir=log_dir, predlog_flush_ms=50)

    # the PMML tree: its metadata and config name the four columns
    status, meta = _http(gw, "GET", "/v2/models/tree")
    assert status == 200 and [c["name"] for c in meta["parameters"]["columns"]] == ["v", "w", "s", "t"]
    status, cfg = _http(gw, "GET", "/v2/models/tree/config")
    assert status == 200 and json.loads(cfg["parameters"]["columns"]["string_value"])[3]["name"] == "t"

    rows = _pmml_rows(12)
    matrix = rows[["v", "w", "s", "t"]].to_numpy(np.float32)
    expected = _grpc(gw, "tree", [_tensor("input", matrix)], "tree-0").as_numpy("prediction")
    assert sorted(set(expected.tolist())) != [expected[0]]  # more than one leaf reached

    # REST: rows as JSON objects (in another key order, with u, which the model does not use, left out)
    body = {"id": "tree-1", "rows": [{k: r[k] for k in ("t", "s", "w", "v")} for r in rows.to_dict("records")]}
    status, doc = _http(gw, "POST", "/v2/models/tree/infer", body)
    assert status == 200, doc
    np.testing.assert_array_equal(np.asarray(_outputs(doc)["prediction"], np.float32), expected)
    # REST: one tensor per column, shape [n] and [n, 1]
    columns = [
        {"name": c, "datatype": "FP64", "shape": [12] if i % 2 else [12, 1], "data": rows[c].tolist()}
        for i, c in enumerate(["s", "v", "w", "t"])
    ]
    status, doc = _http(gw, "POST", "/v2/models/tree/infer", {"id": "tree-2", "inputs": columns})
    assert status == 200, doc
    np.testing.assert_array_equal(np.asarray(_outputs(doc)["prediction"], np.float32), expected)
    # gRPC: one tensor per column (tritonclient)
    tensors = [_tensor(c, rows[c].to_numpy()) for c in ("v", "w", "s", "t")]
    np.testing.assert_array_equal(_grpc(gw, "tree", tensors, "tree-3").as_numpy("prediction"), expected)
    # onnxgate.client: a DataFrame (the extra column u is refused: the model does not take it)
    with Client(gw.address) as client:
        np.testing.assert_array_equal(client.infer("tree", rows, id="tree-4")["prediction"], expected)
        with pytest.raises(OnnxgateError) as error:
            client.infer("tree", rows.assign(u=1.0))
        assert error.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "unknown column(s) 'u'" in error.value.message and "takes the columns v (number)" in str(error.value)
        as_dict = {c: rows[c].to_numpy() for c in rows.columns}
        np.testing.assert_array_equal(client.infer("tree", as_dict, id="tree-5")["prediction"], expected)
        # one row per prediction, with feedback: what `dataset export` reads
        for i in range(6):
            one = rows.iloc[[i]]
            if i % 3 == 0:
                client.infer("tree", one, id=f"one-{i}")
            elif i % 3 == 1:
                assert (
                    _http(gw, "POST", "/v2/models/tree/infer", {"id": f"one-{i}", "rows": one.to_dict("records")})[0]
                    == 200
                )
            else:
                _grpc(gw, "tree", [_tensor(c, one[c].to_numpy()) for c in "vwst"], f"one-{i}")
            client.send_feedback(f"one-{i}", value=float(expected[i]))

    # the LightGBM model with a category column
    frame = _spend_frame(20)
    feeds = {
        "amount": frame[["amount"]].to_numpy(np.float32),
        "merchant": frame[["merchant"]].astype(str).to_numpy(dtype=object),
        "age": frame[["age"]].to_numpy(np.float32),
    }
    spend = _grpc(gw, "spend", [_tensor(k, v) for k, v in feeds.items()], "spend-0").as_numpy("probabilities")
    body = {"id": "spend-1", "rows": frame.astype({"merchant": str}).to_dict("records")}
    status, doc = _http(gw, "POST", "/v2/models/spend/infer", body)
    assert status == 200, doc
    np.testing.assert_allclose(np.asarray(_outputs(doc)["probabilities"]).reshape(-1, 2), spend, atol=1e-6)
    tensors = [_tensor("amount", frame["amount"].to_numpy()), _tensor("age", frame["age"].to_numpy())]
    tensors.append(_tensor("merchant", frame["merchant"].astype(str).to_numpy(dtype=object)))
    np.testing.assert_allclose(_grpc(gw, "spend", tensors, "spend-2").as_numpy("probabilities"), spend, atol=1e-6)

    async def async_call() -> np.ndarray:
        async with AsyncClient(gw.address) as client:
            return (await client.infer("spend", frame, id="spend-3"))["probabilities"]

    np.testing.assert_allclose(asyncio.run(async_call()), spend, atol=1e-6)
    with Client(gw.address) as client:
        for i in range(4):
            client.infer("spend", frame.iloc[[i]], id=f"one-spend-{i}")
            client.send_feedback(f"one-spend-{i}", label="1")

    # mistakes a client can make: each a 400 that says what to fix
    bad = [
        ({"rows": [{"v": 1.0, "w": 2.0, "s": 3.0}]}, "missing column(s) 't'"),
        ({"rows": [{"v": 1.0, "w": 2.0, "s": 3.0, "t": 4.0, "x": 0}]}, "unknown column(s) 'x'"),
        ({"rows": [{"v": "high", "w": 2.0, "s": 3.0, "t": 4.0}]}, "column 'v' takes a number"),
        ({"rows": [1, 2]}, "rows[0] must be a JSON object"),
        ({"rows": [{"v": 10**400, "w": 2.0, "s": 3.0, "t": 4.0}]}, "column 'v': 1000000"),
        ({"rows": []}, "'rows' must be a non-empty list"),
        ({"rows": [{"v": 1}], "inputs": []}, "both 'inputs' and 'rows'"),
        (
            {"inputs": [{"name": "v", "datatype": "BYTES", "shape": [1], "data": ["a"]}]},
            "missing column(s) 'w', 's', 't'",
        ),
    ]
    for body, message in bad:
        status, doc = _http(gw, "POST", "/v2/models/tree/infer", body)
        assert status == 400 and message in doc["error"], (body, doc)
    wrong_type = [
        {"name": c, "datatype": "BYTES" if c == "w" else "FP32", "shape": [1], "data": ["x" if c == "w" else 1.0]}
        for c in "vwst"
    ]
    status, doc = _http(gw, "POST", "/v2/models/tree/infer", {"inputs": wrong_type})
    assert status == 400 and "column 'w' takes numbers (FP32), got BYTES" in doc["error"], doc
    status, doc = _http(gw, "POST", "/v2/models/spend/infer", {"rows": [{"amount": 1, "merchant": 3, "age": 2}]})
    assert status == 400 and "column 'merchant' takes text" in doc["error"], doc
    ragged = [
        _tensor("v", np.zeros(2)),
        _tensor("w", np.zeros(3)),
        _tensor("s", np.zeros(2)),
        _tensor("t", np.zeros(2)),
    ]
    with pytest.raises(Exception, match="disagree on the row count") as raised:
        _grpc(gw, "tree", ragged)
    assert "INVALID_ARGUMENT" in str(raised.value)

    predlog = gw.gateway.predlog
    assert predlog is not None and predlog.flush()
    assert wait_for(lambda: predlog.written >= 20, 10)
    gw.stop()

    out = tmp_path / "tree.parquet"
    assert cli(["dataset", "export", "--predlog-dir", str(log_dir), "--model", "tree", "--out", str(out)]) == 0
    exported = pq.read_table(out)
    assert [c for c in exported.column_names if c in "vwst" or c.startswith("input")] == ["v", "w", "s", "t"]
    assert exported.num_rows == 6
    got = sorted(exported.to_pylist(), key=lambda r: r["prediction_id"])
    np.testing.assert_allclose([[r[c] for c in "vwst"] for r in got], matrix[:6], rtol=1e-6)
    assert [r["prediction"] for r in got] == pytest.approx(expected[:6].tolist())
    out = tmp_path / "spend.csv"
    assert cli(["dataset", "export", "--predlog-dir", str(log_dir), "--model", "spend", "--out", str(out)]) == 0
    header = next(csv.reader(out.read_text().splitlines()))
    assert {"amount", "merchant", "age"} <= set(header)
    # the arrow engine names them too
    out = tmp_path / "tree-arrow.parquet"
    args = ["dataset", "export", "--predlog-dir", str(log_dir), "--model", "tree", "--out", str(out)]
    assert cli([*args, "--engine", "arrow"]) == 0
    assert {"v", "w", "s", "t"} <= set(pq.read_table(out).column_names)


def test_the_example_models_take_their_columns_by_name(
    example_repository: Path, start_gateway: Callable[..., GatewayHandle]
) -> None:
    gw = start_gateway(example_repository)
    flowers = pd.DataFrame(
        [[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3], [5.9, 3.0, 4.2, 1.5]],
        columns=["sepal_length", "sepal_width", "petal_length", "petal_width"],
    )
    with Client(gw.address) as client:
        by_tensor = client.infer("iris", {"input": flowers.to_numpy(np.float32)})  # existing clients: unchanged
        by_name = client.infer("iris", flowers)
        np.testing.assert_array_equal(by_name["label"], by_tensor["label"])
        np.testing.assert_allclose(by_name["probabilities"], by_tensor["probabilities"], atol=1e-7)
        assert by_name["label"].tolist() == [0, 2, 1]
    status, doc = _http(gw, "POST", "/v2/models/iris/infer", {"rows": flowers.to_dict("records")})
    assert status == 200 and _outputs(doc)["label"] == [0, 2, 1], doc
    status, doc = _http(
        gw, "POST", "/v2/models/iris/infer", {"rows": [{"sepal_length": 5.1, "sepal_width": 3.5, "petal_length": 1.4}]}
    )
    assert (status, doc["error"]) == (
        400,
        "rows[0]: missing column(s) 'petal_width'; model 'iris' takes the columns sepal_length (number),"
        " sepal_width (number), petal_length (number), petal_width (number)",
    )
    status, meta = _http(gw, "GET", "/v2/models/diabetes")
    assert [c["name"] for c in meta["parameters"]["columns"]][:4] == ["age", "sex", "bmi", "bp"]
    row = {"species": "virginica", "sepal_length": 6.7, "sepal_width": 3.0, "petal_length": 5.2}
    status, doc = _http(gw, "POST", "/v2/models/petal_width/infer", {"rows": [row]})
    assert status == 200 and 1.5 < _outputs(doc)["prediction"][0] < 2.6, doc


def test_a_sample_header_names_the_columns_and_a_bad_record_fails_the_load(
    tmp_path: Path, start_gateway: Callable[..., GatewayHandle]
) -> None:
    import joblib
    from sklearn.linear_model import LinearRegression

    x = RNG.normal(size=(50, 3))
    joblib.dump(LinearRegression().fit(x, x @ [1.0, 2.0, 3.0]), tmp_path / "lin.joblib")  # no feature names
    pd.DataFrame(x, columns=["height", "weight", "width"]).to_csv(tmp_path / "sample.csv", index=False)
    outcome = convert_to_repository(
        tmp_path / "lin.joblib", tmp_path / "repo", "lin", sample_path=tmp_path / "sample.csv"
    )
    assert outcome.published is not None
    assert [c["name"] for c in report(outcome.published)["columns"]] == ["height", "weight", "width"]
    assert report(outcome.published)["inputs"][0]["shape"] == [-1, 3]

    # a columns parameter that does not fit the inputs: the version does not load, and says why
    broken = tmp_path / "repo" / "lin" / "2"
    import shutil

    shutil.copytree(outcome.published, broken)
    text = (broken / "config.pbtxt").read_text().replace('\\"index\\":2', '\\"index\\":7')
    (broken / "config.pbtxt").write_text(text)
    plain = convert_to_repository(tmp_path / "lin.joblib", tmp_path / "repo", "plain")  # no names anywhere
    assert plain.published is not None and report(plain.published)["columns"] is None
    assert "columns" not in config(plain.published).parameters
    gw = start_gateway(tmp_path / "repo")
    status, doc = _http(gw, "POST", "/v2/models/plain/infer", {"rows": [{"a": 1.0}]})
    assert status == 400 and "records no column names, so it cannot take 'rows'" in doc["error"], doc
    assert "input FP32 [-1, 3]" in doc["error"]
    with Client(gw.address) as client, pytest.raises(OnnxgateError) as error:
        client.infer("lin", {"height": [1.0], "weight": [0.0], "width": [0.0]})
    assert error.value.code == grpc.StatusCode.UNAVAILABLE
    assert "config parameter 'columns': column 'width' at index 7 of input 'input' [-1, 3]" in error.value.message

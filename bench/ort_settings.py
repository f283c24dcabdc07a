"""onnxruntime session settings, in-process (no server), for the gateway's defaults (issue #8 item 3).

Three models built here: a scikit-learn RandomForest (100 trees, 20 features, skl2onnx, zipmap off), an
MLP (20 -> 256 -> 256 -> 2, Gemm/Relu built with onnx.helper) and a large MLP (512 -> 2048 -> 2048 ->
2048 -> 10, >= 10 ms per 256-row batch on one thread). At batch 1 and 256 each setting is timed for
--seconds, the settings interleaved, --repeats rounds; medians of rows/s and p50 latency, and ratios
against the gateway's default (intra_op 1, inter_op 1, sequential, ORT_ENABLE_ALL, one caller), as one
JSON line on stdout (a readable table on stderr).

Settings: intra_op_num_threads 1 | 2 (2 also with spinning off), graph_optimization_level
BASIC | EXTENDED | ALL, and concurrent callers 1 | 2 threads calling run() on one session.

    .venv/bin/python bench/ort_settings.py --seconds 0.4 --repeats 3
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import threading
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

LEVELS = {
    "BASIC": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "EXTENDED": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "ALL": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
# (name, intra_op threads, spinning, optimisation level, concurrent callers)
SETTINGS = [
    ("intra1_ALL", 1, True, "ALL", 1),  # the gateway's default
    ("intra1_BASIC", 1, True, "BASIC", 1),
    ("intra1_EXTENDED", 1, True, "EXTENDED", 1),
    ("intra2_ALL", 2, True, "ALL", 1),
    ("intra2_nospin_ALL", 2, False, "ALL", 1),
    ("intra2_BASIC", 2, True, "BASIC", 1),
    ("intra1_ALL_2callers", 1, True, "ALL", 2),
    ("intra2_ALL_2callers", 2, True, "ALL", 2),
]
BASELINE = "intra1_ALL"


def random_forest() -> tuple[bytes, int]:
    from skl2onnx import to_onnx
    from sklearn.datasets import make_classification
    from sklearn.ensemble import RandomForestClassifier

    x, y = make_classification(n_samples=2000, n_features=20, n_informative=10, random_state=0)
    x = x.astype(np.float32)
    clf = RandomForestClassifier(n_estimators=100, max_depth=12, random_state=0, n_jobs=1).fit(x, y)
    model = to_onnx(clf, x[:1], options={id(clf): {"zipmap": False}}, target_opset=17)
    return model.SerializeToString(), 20


def mlp(widths: list[int]) -> tuple[bytes, int]:
    rng = np.random.default_rng(0)
    nodes, inits = [], []
    h = "x"
    for i, (a, b) in enumerate(itertools.pairwise(widths)):
        w = numpy_helper.from_array((rng.standard_normal((a, b)) / np.sqrt(a)).astype(np.float32), f"w{i}")
        bias = numpy_helper.from_array(np.zeros(b, np.float32), f"b{i}")
        inits += [w, bias]
        last = i == len(widths) - 2
        nodes.append(helper.make_node("MatMul", [h, f"w{i}"], [f"m{i}"]))
        nodes.append(helper.make_node("Add", [f"m{i}", f"b{i}"], ["y" if last else f"a{i}"]))
        if not last:
            nodes.append(helper.make_node("Relu", [f"a{i}"], [f"h{i}"]))
            h = f"h{i}"
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", widths[0]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", widths[-1]])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString(), widths[0]


def session(model: bytes, intra: int, spin: bool, level: str) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = intra
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = LEVELS[level]
    options.log_severity_level = 3
    if not spin:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def measure(sess: ort.InferenceSession, feed: dict, callers: int, seconds: float) -> tuple[float, float]:
    """(rows/s over all callers, p50 latency ms of one run)."""
    rows = next(iter(feed.values())).shape[0]
    name = sess.get_outputs()[0].name
    for _ in range(3):
        sess.run([name], feed)
    latencies: list[list[float]] = [[] for _ in range(callers)]
    start = threading.Barrier(callers + 1)
    stop = time.perf_counter() + seconds  # reset below, once all callers are ready

    def call(i: int) -> None:
        out = latencies[i]
        start.wait()
        while True:
            t0 = time.perf_counter()
            if t0 >= stop:
                return
            sess.run([name], feed)
            out.append(time.perf_counter() - t0)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(callers)]
    for t in threads:
        t.start()
    t_begin = time.perf_counter()
    stop = t_begin + seconds
    start.wait()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t_begin
    runs = sum(len(lat) for lat in latencies)
    all_lat = [x for lat in latencies for x in lat]
    return runs * rows / elapsed, statistics.median(all_lat) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=0.4, help="per setting and round")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--batches", default="1,256")
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]

    models = {
        "rf100x20": random_forest(),
        "mlp256x256": mlp([20, 256, 256, 2]),
        "mlp2048x3": mlp([512, 2048, 2048, 2048, 10]),
    }
    rng = np.random.default_rng(1)
    sessions = {
        (m, s[0]): session(models[m][0], s[1], s[2], s[3]) for m in models for s in SETTINGS
    }  # one per setting: the 2-caller settings share nothing with the 1-caller ones
    raw: dict[tuple[str, int, str], list[tuple[float, float]]] = {}
    for _ in range(args.repeats):
        for m, (_, width) in models.items():
            for batch in batches:
                x = rng.standard_normal((batch, width)).astype(np.float32)
                for name, _intra, _spin, _level, callers in SETTINGS:
                    sess = sessions[(m, name)]
                    feed = {sess.get_inputs()[0].name: x}
                    raw.setdefault((m, batch, name), []).append(measure(sess, feed, callers, args.seconds))
    results = []
    for (m, batch, name), values in raw.items():
        rps = statistics.median(v[0] for v in values)
        p50 = statistics.median(v[1] for v in values)
        base = statistics.median(v[0] for v in raw[(m, batch, BASELINE)])
        results.append(
            {"model": m, "batch": batch, "setting": name, "rows_per_s": round(rps, 1), "p50_ms": round(p50, 4),
             "vs_default": round(rps / base, 3)}
        )  # fmt: skip
        print(
            f"{m:11} b={batch:<4} {name:22} {rps:12.0f} rows/s  p50 {p50:9.4f} ms  x{rps / base:.2f}", file=sys.stderr
        )
    info = {"onnxruntime": ort.__version__, "cpus": __import__("os").cpu_count(), "seconds": args.seconds,
            "repeats": args.repeats}  # fmt: skip
    print(json.dumps({"bench": "ort_settings", **info, "results": results}))


if __name__ == "__main__":
    main()

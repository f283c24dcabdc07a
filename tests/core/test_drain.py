"""SIGTERM under load (server/drain.py): a real `onnxgate serve`, clients calling it in loops over gRPC
(generated stubs, tritonclient, a ModelStreamInfer stream) and HTTP (http.client), a fast model and a
slow one. Every request that reached the server ends OK or UNAVAILABLE (HTTP 200 or 503), never
CANCELLED; requests in flight at SIGTERM finish; health turns NOT_SERVING at once; the process exits 0
within the grace; the prediction log holds exactly the requests answered OK.

A client that gets no answer at all (connection refused once the listener closed; an HTTP connection
reset or closed before any byte of an answer) is counted apart: the log shows the server never ran it.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import queue
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.utils import InferenceServerException

from onnxgate.server.drain import QUIET_S
from onnxgate.server.join import read_predictions
from onnxgate.server.pb import grpc_service_pb2 as pb
from onnxgate.server.pb import grpc_service_pb2_grpc as pb_grpc
from tests.conftest import GatewayHandle, SpawnedGateway
from tests.models import add_mul, chained_matmul, write_version

SLOW_SIZE, SLOW_STEPS = 512, 120  # ~0.15 s a request on a fast core, seconds on a slow one: the grace covers it
GRACE_S = 60.0
SLOW_X = np.ones((SLOW_SIZE, SLOW_SIZE), np.float32)
Stream = tuple["queue.Queue[pb.ModelInferRequest | None]", Iterator[pb.ModelStreamInferResponse]]
NO_ANSWER = {"refused", "reset"}  # HTTP: the connection failed before any byte of an answer came back


@dataclass
class Outcome:
    client: str  # grpc, triton, stream, http
    model: str
    rid: str
    start: float  # time.monotonic() the request was sent
    end: float
    status: str  # a gRPC status name; HTTP: the status code, "refused" or "reset"
    detail: str = ""


@dataclass
class Load:
    """Client threads calling a gateway in loops until stopped; every outcome recorded."""

    gw: SpawnedGateway
    seed: int = 0
    outcomes: list[Outcome] = field(default_factory=list)
    health: list[tuple[float, str]] = field(default_factory=list)  # (time, SERVING | NOT_SERVING | error)
    stop: threading.Event = field(default_factory=threading.Event)
    leave_on_not_serving: bool = False  # clients stop once health says NOT_SERVING, as a balancer would
    threads: list[threading.Thread] = field(default_factory=list)
    busy_since: dict[str, float] = field(default_factory=dict)  # client -> start of its request out now

    def start(self, grpc_fast: int = 2, http_fast: int = 2, grpc_slow: int = 1, http_slow: int = 1) -> None:
        clients: list[tuple[str, Callable[[str, random.Random], None]]] = [("health", self._health)]
        clients += [(f"grpc-fast-{i}", self._grpc("add_mul")) for i in range(grpc_fast)]
        clients += [(f"grpc-slow-{i}", self._grpc("slow")) for i in range(grpc_slow)]
        clients += [("triton-fast", self._triton), ("stream-fast", self._stream)]
        clients += [(f"http-fast-{i}", self._http("add_mul")) for i in range(http_fast)]
        clients += [(f"http-slow-{i}", self._http("slow")) for i in range(http_slow)]
        for i, (name, run) in enumerate(clients):
            rng = random.Random(self.seed * 1000 + i)
            thread = threading.Thread(target=self._guard, args=(run, name, rng), name=name, daemon=True)
            self.threads.append(thread)
            thread.start()

    def finish(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(30)
        assert not any(t.is_alive() for t in self.threads)

    @property
    def going(self) -> bool:
        if self.stop.is_set():
            return False
        return not (self.leave_on_not_serving and any(s == "NOT_SERVING" for _, s in self.health))

    def _guard(self, run: Callable[[str, random.Random], None], name: str, rng: random.Random) -> None:
        """A client that fails in an unforeseen way leaves an outcome the test's checks refuse."""
        try:
            run(name, rng)
        except Exception as e:
            now = time.monotonic()
            self.outcomes.append(Outcome(name, "", "", now, now, f"client error {type(e).__name__}", str(e)))

    def _record(self, outcome: Outcome, backoff: random.Random) -> None:
        self.outcomes.append(outcome)
        if outcome.status not in ("OK", "200"):
            time.sleep(backoff.uniform(0.005, 0.02))  # a retry policy's backoff, short: the worst case

    def _health(self, name: str, rng: random.Random) -> None:
        with grpc.insecure_channel(self.gw.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while not self.stop.is_set():
                try:
                    answer = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
                    status = health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)
                except grpc.RpcError as e:
                    status = e.code().name
                self.health.append((time.monotonic(), status))
                time.sleep(0.005)

    def _grpc(self, model: str) -> Callable[[str, random.Random], None]:
        def run(name: str, rng: random.Random) -> None:
            with grpc.insecure_channel(self.gw.address) as channel:
                stub = pb_grpc.GRPCInferenceServiceStub(channel)
                for i in _count(self):
                    rid = f"{name}-{i}"
                    request = _infer_request(model, rid, rng)
                    start = self.busy_since[name] = time.monotonic()
                    try:
                        stub.ModelInfer(request, timeout=GRACE_S)
                        status, detail = "OK", ""
                    except grpc.RpcError as e:
                        status, detail = e.code().name, e.details() or ""
                    del self.busy_since[name]
                    self._record(Outcome("grpc", model, rid, start, time.monotonic(), status, detail), rng)

        return run

    def _triton(self, name: str, rng: random.Random) -> None:
        client = tc.InferenceServerClient(self.gw.address)
        try:
            for i in _count(self):
                rid = f"{name}-{i}"
                inputs = []
                for n in ("a", "b"):
                    x = tc.InferInput(n, [1, 4], "FP32")
                    x.set_data_from_numpy(np.array([[rng.random() for _ in range(4)]], np.float32))
                    inputs.append(x)
                start = time.monotonic()
                try:
                    client.infer("add_mul", inputs, request_id=rid, client_timeout=GRACE_S)
                    status, detail = "OK", ""
                except InferenceServerException as e:
                    status, detail = (e.status() or "").removeprefix("StatusCode."), e.message() or ""
                self._record(Outcome("triton", "add_mul", rid, start, time.monotonic(), status, detail), rng)
        finally:
            client.close()

    def _stream(self, name: str, rng: random.Random) -> None:
        """One request at a time on a ModelStreamInfer stream; a stream that ends is opened again."""
        i = 0
        with grpc.insecure_channel(self.gw.address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            while self.going:
                requests: queue.Queue[pb.ModelInferRequest | None] = queue.Queue()
                responses = stub.ModelStreamInfer(iter(requests.get, None), timeout=GRACE_S)
                try:
                    while self.going:
                        rid = f"{name}-{i}"
                        i += 1
                        start = time.monotonic()
                        requests.put(_infer_request("add_mul", rid, rng))
                        try:
                            answer = next(responses)
                        except grpc.RpcError as e:
                            outcome = Outcome("stream", "add_mul", rid, start, time.monotonic(), e.code().name)
                            self._record(outcome, rng)
                            break
                        status = "OK" if not answer.error_message else f"error_message: {answer.error_message}"
                        if answer.infer_response.id != rid:
                            status = f"answer to {answer.infer_response.id}"
                        self._record(Outcome("stream", "add_mul", rid, start, time.monotonic(), status), rng)
                finally:
                    requests.put(None)
                    responses.cancel()

    def _http(self, model: str) -> Callable[[str, random.Random], None]:
        def run(name: str, rng: random.Random) -> None:
            conn: http.client.HTTPConnection | None = None
            for i in _count(self):
                rid = f"{name}-{i}"
                body, headers = _http_body(model, rid, rng)
                start = self.busy_since[name] = time.monotonic()
                status, detail = "reset", ""
                try:
                    if conn is None:
                        conn = http.client.HTTPConnection("127.0.0.1", self.gw.http_port, timeout=GRACE_S)
                        try:
                            conn.connect()
                        except ConnectionRefusedError:
                            conn, status = None, "refused"
                    if conn is not None:
                        conn.request("POST", f"/v2/models/{model}/infer", body, headers)
                        response = conn.getresponse()
                        answer = response.read()
                        status, detail = str(response.status), answer[:200].decode(errors="replace")
                        if response.will_close:
                            conn.close()
                            conn = None
                except (ConnectionError, http.client.RemoteDisconnected) as e:  # no byte of an answer
                    detail = f"{type(e).__name__}: {e}"
                    if conn is not None:
                        conn.close()
                        conn = None
                del self.busy_since[name]
                self._record(Outcome("http", model, rid, start, time.monotonic(), status, detail), rng)
            if conn is not None:
                conn.close()

        return run


def _count(load: Load) -> Iterator[int]:
    i = 0
    while load.going:
        yield i
        i += 1


def _infer_request(model: str, rid: str, rng: random.Random) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model, id=rid)
    if model == "slow":
        request.inputs.add(name="x", datatype="FP32", shape=[SLOW_SIZE, SLOW_SIZE])
        request.raw_input_contents.append(SLOW_X.tobytes())
        return request
    for n in ("a", "b"):
        request.inputs.add(name=n, datatype="FP32", shape=[1, 4])
        request.raw_input_contents.append(np.array([rng.random() for _ in range(4)], np.float32).tobytes())
    return request


def _http_body(model: str, rid: str, rng: random.Random) -> tuple[bytes, dict[str, str]]:
    if model == "slow":
        head = json.dumps(
            {
                "id": rid,
                "inputs": [
                    {
                        "name": "x",
                        "datatype": "FP32",
                        "shape": [SLOW_SIZE, SLOW_SIZE],
                        "parameters": {"binary_data_size": SLOW_X.nbytes},
                    }
                ],
                "outputs": [{"name": "y", "parameters": {"binary_data": True}}],
            }
        ).encode()
        return head + SLOW_X.tobytes(), {
            "Content-Type": "application/octet-stream",
            "Inference-Header-Content-Length": str(len(head)),
        }
    inputs = [
        {"name": n, "datatype": "FP32", "shape": [1, 4], "data": [rng.random() for _ in range(4)]} for n in ("a", "b")
    ]
    return json.dumps({"id": rid, "inputs": inputs}).encode(), {"Content-Type": "application/json"}


@pytest.fixture
def repository(tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    write_version(repo, "add_mul", 1, add_mul())
    write_version(repo, "slow", 1, chained_matmul(SLOW_SIZE, SLOW_STEPS))
    return repo


def _serve(spawn: Callable[..., SpawnedGateway], repo: Path, log_dir: Path, drain_delay_s: float) -> SpawnedGateway:
    return spawn(
        "--model-repository", str(repo), "--predlog-dir", str(log_dir), "--predlog-flush-ms", "50",
        "--shutdown-grace-s", str(GRACE_S), "--drain-delay-s", str(drain_delay_s),
    )  # fmt: skip


def _sigterm_when_slow_requests_in_flight(load: Load) -> float:
    """Wait until every slow client has had answers and has a request out for 50 ms (it reached the
    server); SIGTERM then."""
    deadline = time.monotonic() + 60
    slow = [t.name for t in load.threads if "slow" in t.name]
    while time.monotonic() < deadline:
        done = Counter(o.rid.rsplit("-", 1)[0] for o in list(load.outcomes) if o.status in ("OK", "200"))
        now = time.monotonic()
        if all(done[name] >= 2 and now - load.busy_since.get(name, now) > 0.05 for name in slow):
            break
        time.sleep(0.002)
    else:
        raise AssertionError(f"the slow clients never got going: {Counter(o.status for o in load.outcomes)}")
    sent_at = time.monotonic()
    load.gw.process.send_signal(15)
    return sent_at


def _logged_ids(log_dir: Path) -> set[str]:
    table = read_predictions(log_dir, with_inputs=False)
    return set() if table is None else set(table["id"].to_pylist())


def test_sigterm_under_load_answers_ok_or_unavailable_only(spawn_gateway, repository: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Clients that never stop calling (a short retry backoff): the drain phase runs its full delay."""
    log_dir = tmp_path / "log"
    gw = _serve(spawn_gateway, repository, log_dir, drain_delay_s=2.0)
    load = Load(gw, seed=1)
    load.start()
    sigterm = _sigterm_when_slow_requests_in_flight(load)
    code = gw.process.wait(GRACE_S + 30)
    exited = time.monotonic() - sigterm
    time.sleep(0.3)  # the clients meet the closed ports too
    load.finish()
    outcomes = load.outcomes

    by_status = Counter((o.client, o.status) for o in outcomes)
    assert code == 0, by_status
    assert exited < GRACE_S + 10, exited
    # nothing but an answer or UNAVAILABLE, on every client; no CANCELLED anywhere
    allowed = {"OK", "UNAVAILABLE", "200", "503", *NO_ANSWER}
    assert {o.status for o in outcomes} <= allowed, by_status
    # requests in flight at SIGTERM finished: a slow one sent before it and answered after it, on both
    # protocols; and none sent well before SIGTERM (so it had surely arrived) ended without its answer
    for client in ("grpc", "http"):
        finished = [o for o in outcomes if o.model == "slow" and o.client == client and o.start < sigterm < o.end]
        assert any(o.status in ("OK", "200") for o in finished), finished
    cut = [o for o in outcomes if o.start < sigterm - 0.5 and o.status not in ("OK", "200")]
    assert not cut, cut
    # after SIGTERM only refusals (or nothing at all, once the ports closed)
    late = [o for o in outcomes if o.start > sigterm + 0.5]
    assert late and not [o for o in late if o.status in ("OK", "200")], late[:5]
    assert by_status["grpc", "UNAVAILABLE"] and by_status["http", "503"] and by_status["stream", "UNAVAILABLE"]
    # health: SERVING until the signal, NOT_SERVING soon after it
    not_serving = [t for t, s in load.health if s == "NOT_SERVING"]
    assert not_serving and not_serving[0] - sigterm < 2.0, load.health[-5:]
    assert all(s == "SERVING" for t, s in load.health if t < sigterm)
    # the log holds every request answered OK, and nothing the clients did not get an answer for
    answered = {o.rid for o in outcomes if o.status in ("OK", "200")}
    assert _logged_ids(log_dir) == answered
    print(f"\nexit {exited:.2f}s after SIGTERM; health NOT_SERVING after {not_serving[0] - sigterm:.3f}s; {by_status}")


def test_sigterm_drain_ends_early_once_the_clients_left(spawn_gateway, repository: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Clients that leave when health says NOT_SERVING (as a balancer does): the drain phase ends about
    QUIET_S after the last request, long before its 30 s delay; requests in flight still finish."""
    log_dir = tmp_path / "log"
    gw = _serve(spawn_gateway, repository, log_dir, drain_delay_s=30.0)
    load = Load(gw, seed=2, leave_on_not_serving=True)
    load.start(grpc_fast=1, http_fast=1)
    sigterm = _sigterm_when_slow_requests_in_flight(load)
    code = gw.process.wait(GRACE_S + 30)
    exited = time.monotonic() - sigterm
    load.finish()
    by_status = Counter((o.client, o.status) for o in load.outcomes)
    assert code == 0, by_status
    assert QUIET_S < exited < 20, exited  # the quiet period, not the 30 s delay (generous for a slow machine)
    assert {o.status for o in load.outcomes} <= {"OK", "UNAVAILABLE", "200", "503"}, by_status
    answered = {o.rid for o in load.outcomes if o.status in ("OK", "200")}
    assert _logged_ids(log_dir) == answered
    print(f"\nexit {exited:.2f}s after SIGTERM; {by_status}")


def _open_streams(handle: GatewayHandle, n: int, rng: random.Random) -> list[Stream]:
    """`n` ModelStreamInfer streams, each answered once."""
    stub = handle.stub()
    streams = []
    for i in range(n):
        requests: queue.Queue[pb.ModelInferRequest | None] = queue.Queue()
        responses = stub.ModelStreamInfer(iter(requests.get, None), timeout=60)
        requests.put(_infer_request("add_mul", f"s{i}-0", rng))
        assert next(responses).infer_response.id == f"s{i}-0"
        streams.append((requests, responses))
    return streams


def _assert_unavailable(responses: Iterator[pb.ModelStreamInferResponse]) -> None:
    with pytest.raises(grpc.RpcError) as error:
        next(responses)
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE, error.value
    assert "shutting down" in (error.value.details() or "")


def test_streams_end_unavailable(start_gateway, repository: Path) -> None:  # type: ignore[no-untyped-def]
    """In process: a stream's request during the drain phase ends that stream UNAVAILABLE at once; an idle
    stream ends UNAVAILABLE when the phase is over; the stop takes the phase, not the grace."""
    handle = start_gateway(repository)
    streams = _open_streams(handle, 2, random.Random(3))
    start = time.monotonic()
    stopped = asyncio.run_coroutine_threadsafe(handle.gateway.stop(60.0, drain_s=2.0), handle.loop)
    time.sleep(0.1)
    streams[0][0].put(_infer_request("add_mul", "s0-1", random.Random(4)))  # during the drain phase
    _assert_unavailable(streams[0][1])
    assert time.monotonic() - start < 1.5  # at once, not at the end of the phase
    assert handle.gateway.answers.counts["grpc", "ModelStreamInfer", "UNAVAILABLE"] == 1  # its answer, counted
    _assert_unavailable(streams[1][1])  # stream 1 sent nothing: ended when the phase is over
    assert time.monotonic() - start >= 2.0
    stopped.result(30)
    assert time.monotonic() - start < 20  # not the 60 s grace
    for requests, _ in streams:
        requests.put(None)


def test_a_busy_stream_gets_its_answer_then_unavailable(start_gateway, repository: Path) -> None:  # type: ignore[no-untyped-def]
    """In process: the drain closes while a stream's request runs: its answer comes, then UNAVAILABLE."""
    handle = start_gateway(repository)
    rng = random.Random(5)
    [(requests, responses)] = _open_streams(handle, 1, rng)
    requests.put(_infer_request("slow", "s0-slow", rng))
    deadline = time.monotonic() + 30
    while handle.gateway.state.inflight == 0 and time.monotonic() < deadline:  # running now
        time.sleep(0.001)
    stopped = asyncio.run_coroutine_threadsafe(handle.gateway.stop(60.0, drain_s=0), handle.loop)
    assert next(responses).infer_response.id == "s0-slow"
    _assert_unavailable(responses)
    stopped.result(30)
    requests.put(None)

"""The HTTP gateway: a real ``celery warmpool serve`` process, a real node, real HTTP."""

from __future__ import annotations

import os
import signal
import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
import redis

from celery_warmpool.ops.processes import WorkerProcess
from tests.conftest import REDIS_BACKEND, wait_until
from tests.flower_page import free_port
from tests.http_gateway import GatewayProcess, events
from tests.integration_app import CounterAgent, Increment, Spell

pytestmark = pytest.mark.integration

TOKEN = "t0ken-for-the-tests"
MAX_BODY = 4096
PROBLEM = "application/problem+json"
SPECS = [
    {"name": "counter", "agent": "tests.integration_app:CounterAgent", "size": 2},
    {"name": "single", "agent": "tests.integration_app:CounterAgent", "size": 1},
    {"name": "speller", "agent": "tests.integration_app:SpellingAgent", "size": 2},
]
INCREMENT = {"type": "counter.increment", "data": {"by": 2}}


@pytest.fixture
def gateway() -> Iterator[Callable[..., GatewayProcess]]:
    """Start gateways on the broker of a given environment; stop them after the test."""
    started: list[GatewayProcess] = []

    def start(env: dict[str, str], **options: Any) -> GatewayProcess:
        process = GatewayProcess("tests.integration_app", env, **options)
        started.append(process)
        # Every response the tests see must be one the document describes.
        return process.start().checked()

    yield start
    for process in started:
        process.stop()
    # The check ran: the test's gateways answered documented routes.
    assert any(process.contract is not None and process.contract.seen for process in started)


@pytest.fixture
def served(start_worker, gateway) -> tuple[WorkerProcess, GatewayProcess]:
    """A threads node hosting SPECS, and a gateway with a token and a 4 KiB body limit."""
    worker = start_worker(SPECS, pool="threads", concurrency=6)
    return worker, gateway(worker.env, token=TOKEN, args=("--max-body", str(MAX_BODY)))


@pytest.fixture
def store() -> redis.Redis:
    return redis.Redis.from_url(REDIS_BACKEND, decode_responses=True)


def problem(response: httpx.Response, status: int, kind: str) -> dict[str, Any]:
    """The problem body of ``response``, checked to be one of ``kind`` with ``status``."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM
    body: dict[str, Any] = response.json()
    assert body["status"] == status
    assert body["type"] == (f"urn:celery-warmpool:error:{kind}" if kind != "about:blank"
                            else kind)
    assert "Traceback" not in response.text
    return body


def test_call_cast_pools_status_and_openapi_answer_over_http(served, client):
    worker, gateway = served
    app, _ = client(SPECS)
    with gateway.client() as http:
        call = http.post("/pools/counter/call", json=INCREMENT, params={"timeout": 5})
        cast = http.post("/pools/counter/cast", json=INCREMENT)
        pools = http.get("/pools")
        document = http.get("/openapi.json")

        assert call.status_code == 200
        reply = call.json()
        assert (reply["pool"], reply["node"], reply["signal_type"], reply["action"],
                reply["result"], reply["state"]["count"]) == (
            "counter", worker.hostname, "counter.increment", "increment", {"count": 2}, 2)
        assert cast.status_code == 202
        [cast_reply] = app.AsyncResult(cast.json()["id"]).get(timeout=10)
        assert cast_reply["action"] == "increment"

        assert pools.status_code == 200
        listed = {pool["name"]: pool for pool in pools.json()["pools"]}
        assert sorted(listed) == ["counter", "single", "speller"]
        assert worker.hostname in [node["node"] for node in listed["counter"]["nodes"]]
        assert listed["counter"]["options"]["size"] == 2
        assert listed["counter"]["queue"] == "warmpool.counter"
        streams = {signal["type"]: signal["streams"]
                   for signal in listed["speller"]["signals"]}
        assert sorted(streams) == sorted([*CounterAgent.signal_routes, "words.spell"])
        assert (streams["words.spell"], streams["counter.increment"]) == (True, False)

        status = http.get("/pools/counter/status").json()
        assert (status["pool"], status["state"], status["size"], status["available"],
                status["checked_out"], status["counters"]["calls"]) == (
            "counter", "ready", 2, 2, 0, 2)
        assert {process["node"] for process in status["processes"]} == {worker.hostname}

    schemas = document.json()["components"]["schemas"]
    # Unknown keys of data are refused, as the agent refuses them.
    assert schemas["counter.counter.increment.Params"] == {
        **Increment.Params.model_json_schema(), "additionalProperties": False}
    assert schemas["speller.words.spell.Params"] == {
        **Spell.Params.model_json_schema(), "additionalProperties": False}
    signal_schema = schemas["counter.counter.increment.Signal"]
    assert signal_schema["properties"]["type"]["const"] == "counter.increment"
    assert signal_schema["properties"]["data"]["anyOf"] == [
        {"$ref": "#/components/schemas/counter.counter.increment.Params"}, {"type": "null"}]
    assert signal_schema["additionalProperties"] is False
    paths = document.json()["paths"]
    assert {"/pools/counter/call", "/pools/counter/cast", "/pools/counter/stream",
            "/pools/counter/status", "/pools", "/healthz"} <= set(paths)
    body = paths["/pools/speller/call"]["post"]["requestBody"]["content"]["application/json"]
    assert {"$ref": "#/components/schemas/speller.words.spell.Signal"} in body["schema"][
        "oneOf"]


def test_the_token_is_needed_everywhere_but_healthz(served):
    _, gateway = served
    with gateway.client(token=False) as anonymous, gateway.client() as http:
        for method, path in (("GET", "/pools"), ("GET", "/pools/counter/status"),
                             ("POST", "/pools/counter/call"), ("GET", "/openapi.json"),
                             ("GET", "/"), ("GET", "/docs")):
            refused = anonymous.request(method, path, json=INCREMENT)
            body = problem(refused, 401, "about:blank")
            assert refused.headers["www-authenticate"] == 'Bearer realm="warmpool"'
            assert body["title"] == "Unauthorized"
        wrong = anonymous.get("/pools", headers={"Authorization": "Bearer not-the-token"})
        problem(wrong, 401, "about:blank")
        # A token in the query is taken on the pages a browser opens, not on the API.
        assert anonymous.get("/pools", params={"token": TOKEN}).status_code == 401
        assert anonymous.get("/", params={"token": TOKEN}).status_code == 200
        assert anonymous.get("/openapi.json", params={"token": TOKEN}).status_code == 200

        assert anonymous.get("/healthz").json() == {"broker": "ok", "result_store": "ok"}
        assert http.get("/pools").status_code == 200
        assert http.post("/pools/counter/call", json=INCREMENT).status_code == 200


def test_a_body_over_the_limit_is_refused_with_413(served):
    _, gateway = served
    with gateway.client() as http:
        padded = {**INCREMENT, "subject": "x" * MAX_BODY}
        declared = http.post("/pools/counter/call", json=padded)
        body = problem(declared, 413, "about:blank")
        assert body["max_body"] == MAX_BODY

        def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it arrives
            yield b'{"type": "counter.increment", "subject": "'
            for _ in range(MAX_BODY // 512 + 1):
                yield b"y" * 512
            yield b'"}'

        streamed = http.post("/pools/counter/call", content=chunks(),
                             headers={"Content-Type": "application/json"})
        assert "content-length" not in streamed.request.headers
        assert problem(streamed, 413, "about:blank")["max_body"] == MAX_BODY

        under = {**INCREMENT, "subject": "x" * (MAX_BODY - 200)}
        assert http.post("/pools/counter/call", json=under).status_code == 200


def test_every_error_is_a_problem_with_its_status(served):
    _, gateway = served
    with gateway.client() as http:
        unknown_pool = problem(http.post("/pools/nope/call", json=INCREMENT), 404,
                               "UnknownPool")
        assert (unknown_pool["title"], unknown_pool["pool"]) == ("Unknown pool", "nope")

        invalid = problem(http.post("/pools/counter/call", json={
            "type": "counter.increment", "data": {"by": "many"}}), 422, "InvalidSignal")
        assert invalid["signal_type"] == "counter.increment"
        assert [(error["loc"], error["type"]) for error in invalid["errors"]] == [
            (["by"], "int_parsing")]
        not_a_signal = problem(http.post("/pools/counter/call", json={"data": 1}), 422,
                               "InvalidSignal")
        assert [error["loc"] for error in not_a_signal["errors"]] == [["type"]]
        not_json = problem(http.post("/pools/counter/call", content=b"{nope"), 422,
                           "InvalidSignal")
        assert not_json["detail"].startswith("the request body is not JSON")

        unknown = problem(http.post("/pools/counter/call", json={"type": "counter.nope"}),
                          422, "UnknownSignal")
        assert unknown["signal_type"] == "counter.nope"

        failed = problem(http.post("/pools/counter/call", json={"type": "counter.fail"}),
                         500, "ActionFailed")
        assert (failed["action"], failed["signal_type"]) == ("fail", "counter.fail")
        assert "the action was asked to fail" in failed["detail"]

        bad_query = problem(http.post("/pools/counter/call", json=INCREMENT,
                                      params={"timeout": "-1"}), 422, "InvalidArgument")
        assert (bad_query["argument"], bad_query["value"], bad_query["allowed"]) == (
            "timeout", "-1.0", "a number of seconds from 0.001 to 86400")

        # A full pool: its one agent busy for 3 s, a caller that waits 0.5 s at most.
        holder = threading.Thread(target=http.post, args=("/pools/single/call",), kwargs={
            "json": {"type": "counter.work", "data": {"seconds": 3}},
            "params": {"call_timeout": 10}})
        holder.start()
        wait_until(lambda: http.get("/pools/single/status").json()["checked_out"] == 1, 10,
                   "the single agent was checked out")
        full = http.post("/pools/single/call", json=INCREMENT,
                         params={"timeout": 0.5, "call_timeout": 1})
        body = problem(full, 503, "CheckoutTimeout")
        assert full.headers["retry-after"] == "1"
        assert (body["pool"], body["size"], body["max_overflow"]) == ("single", 1, 0)
        assert body["waited"] > 0
        holder.join(15)

        overran = problem(http.post("/pools/counter/call", json={
            "type": "counter.work", "data": {"seconds": 3}}, params={"call_timeout": 0.5}),
            504, "CallTimeout")
        assert (overran["signal_type"], overran["timeout"]) == ("counter.work", 0.5)

        missing = problem(http.get("/no/such/route"), 404, "about:blank")
        assert missing["title"] == "Not Found"


def test_a_lost_agent_is_502(start_worker, gateway):
    worker = start_worker(SPECS[:1], pool="prefork", concurrency=2)
    served = gateway(worker.env)
    outcome: dict[str, httpx.Response] = {}
    with served.client() as http:
        def call() -> None:
            outcome["response"] = http.post(
                "/pools/counter/call", json={"type": "counter.work", "data": {"seconds": 5}},
                params={"call_timeout": 10})

        caller = threading.Thread(target=call)
        caller.start()
        busy: list[int] = []

        def one_busy() -> bool:
            status = http.get("/pools/counter/status").json()
            busy[:] = [process["pid"] for process in status["processes"]
                       if process["checked_out"]]
            return len(busy) == 1

        wait_until(one_busy, 10, "a child took the call")
        os.kill(busy[0], signal.SIGKILL)
        caller.join(20)

    lost = problem(outcome["response"], 502, "AgentLost")
    assert (lost["pool"], lost["node"], lost["pid"], lost["signal_type"],
            lost["may_have_run"]) == ("counter", worker.hostname, busy[0], "counter.work",
                                      True)


def test_an_unreachable_broker_is_503_with_its_password_masked(clean_redis, gateway):
    broker = f"redis://warm:s3cret-password@127.0.0.1:{free_port()}/2"
    store = f"redis://warm:s3cret-password@127.0.0.1:{free_port()}/3"
    served = gateway({"WARMPOOL_BROKER_URL": broker, "WARMPOOL_RESULT_BACKEND": store},
                     host="0.0.0.0")
    # Listening on every address without a token is allowed, and warned about.
    assert "without a token" in served.log()
    with served.client() as http:
        down = http.post("/pools/counter/call", json=INCREMENT,
                         params={"timeout": 1, "call_timeout": 1})
        health = http.get("/healthz")

    body = problem(down, 503, "BrokerUnavailable")
    assert body["url"].startswith("redis://warm:**@127.0.0.1:")
    assert "s3cret" not in down.text
    assert body["waited"] > 0
    state = problem(health, 503, "about:blank")
    assert state["broker"] != "ok" and state["result_store"] != "ok"
    assert "s3cret" not in health.text


def test_a_stream_arrives_chunk_by_chunk_then_its_reply(served, store):
    _, gateway = served
    hold, report = f"hold-{uuid.uuid4()}", f"report-{uuid.uuid4()}"
    spell = {"type": "words.spell", "data": {"count": 3, "hold": hold, "report": report}}
    with gateway.client() as http, http.stream("POST", "/pools/speller/stream",
                                               json=spell) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        arriving = events(response)
        assert next(arriving) == ("chunk", "chunk-0")
        # The generator waits for the barrier: the last chunk is not made yet.
        assert store.lrange(report, 0, -1) == []
        store.rpush(hold, "go")
        rest = list(arriving)

    assert rest[:2] == [("chunk", "chunk-1"), ("chunk", "chunk-2")]
    (kind, reply), = rest[2:]
    assert (kind, reply["action"], reply["signal_type"], reply["state"]["count"]) == (
        "reply", "spell", "words.spell", 3)
    assert store.lrange(report, 0, -1) == ["3:finished"]


def test_a_stream_that_fails_ends_with_an_error_event(served):
    _, gateway = served
    with gateway.client() as http:
        spell = {"type": "words.spell", "data": {"count": 5, "fail_after": 2}}
        with http.stream("POST", "/pools/speller/stream", json=spell) as response:
            received = list(events(response))
        # Failing before the first chunk: a plain problem with its own status.
        at_once = http.post("/pools/speller/stream", json={
            "type": "words.spell", "data": {"fail_after": 0}})
        unknown = http.post("/pools/speller/stream", json={"type": "words.nope"})

    assert received[:2] == [("chunk", "chunk-0"), ("chunk", "chunk-1")]
    (kind, error), = received[2:]
    assert (kind, error["status"], error["type"], error["action"]) == (
        "error", 500, "urn:celery-warmpool:error:ActionFailed", "spell")
    assert "asked to fail after 2 chunks" in error["detail"]
    assert problem(at_once, 500, "ActionFailed")["action"] == "spell"
    assert problem(unknown, 422, "UnknownSignal")["signal_type"] == "words.nope"


def test_a_client_that_leaves_a_stream_stops_the_generator(served, store):
    _, gateway = served
    hold, report = f"hold-{uuid.uuid4()}", f"report-{uuid.uuid4()}"
    spell = {"type": "words.spell", "data": {"count": 1000, "hold": hold, "report": report}}
    with gateway.client() as http:
        with http.stream("POST", "/pools/speller/stream", json=spell) as response:
            assert next(events(response)) == ("chunk", "chunk-0")
        # The client is gone; let the generator go on and see it stopped.
        store.rpush(hold, "go")
        wait_until(lambda: store.llen(report) == 1, 10,
                   "the generator ended (not after stream_idle_timeout, 30 s)")
        [ended] = store.lrange(report, 0, -1)
        produced, how = ended.split(":")
        assert how == "stopped"
        assert int(produced) < 1000
        # The agent went back to the pool (a stopped stream is no failure) and serves.
        wait_until(lambda: http.get("/pools/speller/status").json()["available"] == 2, 10,
                   "both agents were back in the pool")
        status = http.get("/pools/speller/status").json()
        assert (status["checked_out"], status["counters"]["replacements"]) == (0, 0)
        assert http.post("/pools/speller/call", json=INCREMENT).status_code == 200


def test_a_gateway_serves_only_the_pools_it_is_given(served, gateway):
    worker, _ = served
    only_counter = gateway(worker.env, args=("--pools", "counter"))
    with only_counter.client() as http:
        listed = [pool["name"] for pool in http.get("/pools").json()["pools"]]
        refused = http.post("/pools/speller/call", json=INCREMENT)
        served_call = http.post("/pools/counter/call", json=INCREMENT)
        paths = http.get("/openapi.json").json()["paths"]

    assert listed == ["counter"]
    body = problem(refused, 404, "UnknownPool")
    assert body["detail"] == "this gateway serves no pool 'speller' (it serves: counter)"
    assert served_call.status_code == 200
    assert "/pools/counter/call" in paths and "/pools/speller/call" not in paths

    unknown = GatewayProcess("tests.integration_app", worker.env, args=("--pools", "nope"))
    unknown.launch()
    assert unknown.process is not None and unknown.process.wait(60) == 2  # a usage error
    assert "Invalid value for '--pools': no pool named 'nope' is configured" in unknown.log()
    unknown.stop()

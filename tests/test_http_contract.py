"""The gateway's OpenAPI document is its exact contract, hostile requests included.

The document is valid OpenAPI (checked with openapi-spec-validator), bounds every query
parameter as the server does, says of each signal what ``Signal`` takes, and lists per
route every status the server answers with. Then a hypothesis run of hostile requests
against a real ``celery warmpool serve`` and a real node: any parameter values,
malformed and oversize bodies, wrong types, missing and wrong tokens, every route; no
``500`` but a failed action's, no traceback in the gateway's log, every response one the
document describes.
"""

from __future__ import annotations

import asyncio
import functools
import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator, FormatChecker
from openapi_spec_validator import validate

from celery_warmpool import Signal, WarmPoolError
from celery_warmpool.core.arguments import MAX_SECONDS, MIN_SECONDS
from celery_warmpool.http import create_app
from tests.conftest import REDIS_BACKEND, REDIS_BROKER, wait_until
from tests.http_contract import Contract
from tests.http_gateway import GatewayProcess, events
from tests.integration_app import CounterAgent, make_app

TOKEN = "t0ken-for-the-contract"
MAX_BODY = 4096
SPECS = [
    {"name": "counter", "agent": "tests.integration_app:CounterAgent", "size": 2},
    {"name": "single", "agent": "tests.integration_app:CounterAgent", "size": 1},
    {"name": "speller", "agent": "tests.integration_app:SpellingAgent", "size": 2},
]


@functools.cache
def document(token: str | None = TOKEN) -> dict[str, Any]:
    _, warm = make_app(REDIS_BROKER, REDIS_BACKEND, SPECS)
    return create_app(warm, token=token).openapi()


@pytest.mark.parametrize("token", [TOKEN, None])
def test_the_document_is_valid_openapi_and_exact_about_every_route(token):
    found = document(token)
    validate(found)  # raises on any fault of the document
    operations = [(path, method, operation) for path, item in found["paths"].items()
                  for method, operation in item.items()]
    assert len(operations) == 2 + 4 * len(SPECS)
    for path, _, operation in operations:
        responses = operation["responses"]
        for parameter in operation.get("parameters", []):
            schema = parameter["schema"]
            assert (schema["type"], schema["minimum"], schema["maximum"]) == (
                "number", MIN_SECONDS, MAX_SECONDS), (path, parameter)
        if path == "/healthz":
            assert operation["security"] == []
            assert sorted(responses) == ["200", "413", "503"]
        else:
            assert "security" not in operation  # the document's own: the token
            assert ("401" in responses) == (token is not None), path
        for status, response in responses.items():
            if status >= "400":
                [media] = response["content"]
                assert media == "application/problem+json", (path, status)
    assert found.get("security") == ([{"bearer": []}] if token else None)
    call = found["paths"]["/pools/counter/call"]["post"]["responses"]
    assert sorted(call) == sorted(["200", "413", "422", "429", "500", "502", "503", "504",
                                   *(["401"] if token else [])])
    assert call["429"]["headers"]["Retry-After"]["schema"] == {"type": "integer",
                                                               "minimum": 1}
    cast = found["paths"]["/pools/counter/cast"]["post"]["responses"]
    assert sorted(cast) == sorted(["202", "413", "422", "429", "503",
                                   *(["401"] if token else [])])
    status = found["paths"]["/pools/counter/status"]["get"]["responses"]
    assert sorted(status) == sorted(["200", "404", "413", "422", "503",
                                     *(["401"] if token else [])])
    stream = found["paths"]["/pools/speller/stream"]["post"]["responses"]["200"]["content"]
    events_schema = stream["text/event-stream"]["x-itemSchema"]["oneOf"]
    assert [item["properties"]["event"]["const"] for item in events_schema] == [
        "chunk", "reply", "error"]


#: Each attribute of a signal left out, or given a value the model takes or refuses.
ATTRIBUTES: dict[str, list[Any]] = {
    "id": ["", "a", "6f0c"],
    "source": ["", "/x", "urn:a"],
    "subject": [None, "", "s"],
    "specversion": ["1.0", "0.3", ""],
    "datacontenttype": ["application/json", "application/cloudevents+json", "text/plain",
                        ""],
    "dataschema": [None, "https://example.org/s"],
    # RFC 3339 strings, and text that is no time at all (the model also takes numbers and
    # times without an offset, which the document leaves out: it is stricter there).
    "time": ["2026-01-02T03:04:05Z", "2026-01-02T03:04:05.5+02:00", "yesterday", ""],
    "data": [None, {}, {"by": 3}, {"by": 1, "extra": 1}, [1], "x"],
    "type": ["counter.increment", "counter.nope", ""],
    "unknown": ["x"],
}


@settings(max_examples=300, deadline=None, database=None)
@given(st.fixed_dictionaries({}, optional={
    name: st.sampled_from(values) for name, values in ATTRIBUTES.items()}))
def test_a_signal_the_document_calls_valid_is_one_the_gateway_takes(candidate):
    # And the other way round: what the document refuses, the gateway refuses.
    found = document()
    schema = {"oneOf": found["paths"]["/pools/counter/call"]["post"]["requestBody"][
        "content"]["application/json"]["schema"]["oneOf"], "components": found["components"]}
    in_document = Draft202012Validator(schema, format_checker=FormatChecker()).is_valid(
        candidate)
    try:
        signal = Signal.parse(candidate)
        CounterAgent.route(signal.type).validate_params(signal.data, signal.type)
    except WarmPoolError as exc:
        taken = False
        why = repr(exc)
    else:
        taken, why = True, ""
    assert in_document == taken, (candidate, why)


def test_the_contract_check_fails_on_what_the_document_does_not_describe():
    contract = Contract(document())
    request = httpx.Request("POST", "http://gateway/pools/counter/cast")
    teapot = httpx.Response(418, json={}, request=request)
    with pytest.raises(AssertionError, match="status not in the document"):
        contract.check(teapot)
    wrong_body = httpx.Response(202, json={"no": "id"}, request=request)
    with pytest.raises(AssertionError, match="'id' is a required property"):
        contract.check(wrong_body)
    contract.check(httpx.Response(202, json={"id": "x"}, request=request))
    lost = httpx.Request("GET", "http://gateway/nowhere")
    with pytest.raises(AssertionError, match="not a route"):
        contract.check(httpx.Response(500, json={}, request=lost))


# -- hostile requests ----------------------------------------------------------------------

_KEYS = st.text(max_size=3)  # never a real parameter's name ("hold", "seconds", "path")
_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_KEYS, inner, max_size=3),
    max_leaves=10)
ROUTE_TYPES = sorted([*CounterAgent.signal_routes, "words.spell"])
#: Signals that do something, quickly: none waits on anything outside.
WORKING = st.one_of(
    st.builds(lambda by: {"type": "counter.increment", "data": {"by": by}}, st.integers()),
    st.builds(lambda value: {"type": "counter.echo", "data": {"value": value}}, _JSON),
    st.just({"type": "counter.fail"}),
    st.builds(lambda seconds: {"type": "counter.work", "data": {"seconds": seconds}},
              st.floats(0, 0.05)),
    st.builds(lambda count: {"type": "counter.chunks", "data": {"count": count}},
              st.integers(-1, 3)),
    st.builds(lambda count, fail: {"type": "words.spell", "data": {"count": count,
                                                                   "fail_after": fail}},
              st.integers(0, 3), st.none() | st.integers(0, 2)),
)
SIGNALS = st.one_of(
    WORKING, WORKING,
    st.builds(lambda kind, data: {"type": kind, "data": data},
              st.sampled_from(ROUTE_TYPES) | st.text(max_size=8), _JSON),
    st.dictionaries(_KEYS | st.sampled_from(["type", "id", "source", "time", "data"]), _JSON,
                    max_size=4),
)


def _bytes(document: Any) -> bytes:
    return json.dumps(document).encode()


#: Depths of nesting: around what a signal's data may have (100), what pydantic serializes
#: (255) and what Python's JSON reader takes (about 1,000).
_DEPTHS = st.sampled_from([1, 50, 99, 100, 101, 254, 255, 256, 300, 990, 1000, 5000])
BODIES = st.one_of(
    SIGNALS.map(_bytes), SIGNALS.map(_bytes),
    _JSON.map(_bytes),  # any JSON: arrays, strings, numbers, null
    st.binary(max_size=40),  # not JSON
    _DEPTHS.map(lambda depth: b"[" * depth + b"]" * depth),  # nested deep
    _DEPTHS.map(lambda depth: b'{"a":' * depth + b"1" + b"}" * depth),
    _DEPTHS.map(  # data nested deep: for the model, the broker, the worker, the reply
        lambda depth: b'{"type": "counter.echo", "data": {"value": ' + b"[" * depth
        + b"]" * depth + b"}}"),
    st.sampled_from([b"", b"{", b"NaN", b'{"type": "counter.echo", "data": {"value": NaN}}',
                     b'{"type": "counter.echo", "data": {"value": Infinity}}',
                     b'{"type": "counter.increment", "data": {"by": 1' + b"0" * 5000 + b"}}",
                     b'{"type": "counter.increment", "data": {"by": 1' + b"0" * 4000 + b"}}",
                     b'"{\\"type\\": \\"counter.increment\\"}"', b"\xff\xfe",
                     # A lone surrogate: Python's JSON reader takes it, UTF-8 cannot carry it.
                     b'{"type": "counter.echo", "data": {"value": "\\ud800"}}',
                     b'{"type": "words.spell", "subject": "\\udfff", "data": {"count": 1}}',
                     b'{"type": "counter.\\ud800"}',
                     b'{"type": "counter.echo", "data": {"value": 1e999}}']),
    st.integers(MAX_BODY + 1, 3 * MAX_BODY).map(
        lambda size: _bytes({"type": "counter.increment", "subject": "x" * size})),
)
OVERSIZE = st.integers(MAX_BODY + 1, 3 * MAX_BODY).map(lambda size: b"x" * size)
#: Query values: seconds in range, and out of it, not finite, not numbers at all.
GOOD_SECONDS = st.one_of(st.floats(min_value=MIN_SECONDS, max_value=3).map(repr),
                         st.integers(1, 86400).map(str),
                         st.sampled_from(["0.001", "86400", "86400.0", " 5 ", "1e1"]))
BAD_SECONDS = st.one_of(
    st.floats().filter(lambda value: not MIN_SECONDS <= value <= MAX_SECONDS).map(repr),
    st.integers(max_value=0).map(str), st.integers(min_value=86401).map(str),
    st.text(max_size=6),
    st.sampled_from(["nan", "inf", "-inf", "1e999", "5e-324", "1.3e16", "0", "-0", "",
                     "0x10", "true", "86400.0001", "1" * 400]),
)
_PARAMETERS = st.sampled_from(["timeout", "call_timeout", "x"])
_SERVED = st.sampled_from(["counter", "single", "speller"])
_OTHER_POOLS = st.sampled_from(["nope", "Counter", "counter%2Fcall", "%00", "..", "x" * 300])
#: One part of a request each: as a client that means well sends it, and as one that
#: does not; an example breaks at most one part.
GOOD = {
    "route": st.one_of(
        st.tuples(st.just("POST"), _SERVED, st.sampled_from(["call", "cast", "stream"])),
        st.tuples(st.just("GET"), _SERVED, st.just("status")),
        st.sampled_from([("GET", None, "/pools"), ("GET", None, "/healthz")])),
    "authorization": st.just(f"Bearer {TOKEN}"),
    "body": SIGNALS.map(_bytes),
    "query": st.dictionaries(_PARAMETERS, GOOD_SECONDS, max_size=2),
}
BAD = {
    "route": st.one_of(
        st.tuples(st.just("POST"), _OTHER_POOLS, st.sampled_from(["call", "cast", "stream"])),
        st.tuples(st.just("GET"), _OTHER_POOLS, st.just("status")),
        st.sampled_from([("GET", None, "/openapi.json"), ("GET", None, "/"),
                         ("GET", None, "/docs"), ("GET", "counter", "call"),
                         ("POST", "counter", "status"), ("DELETE", None, "/pools"),
                         ("PUT", None, "/healthz"), ("GET", None, "/no/such/route")])),
    # None, the wrong token, other schemes, nonsense.
    "authorization": st.one_of(
        st.none(), st.sampled_from(["Bearer", "Bearer wrong", f"Basic {TOKEN}",
                                    f"bearer {TOKEN}", f"Bearer {TOKEN}x", "x" * 300]),
        st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126), max_size=20)),
    "body": st.none() | BODIES | OVERSIZE,
    "query": st.dictionaries(_PARAMETERS, BAD_SECONDS, min_size=1, max_size=2),
}


@pytest.fixture
def hostile_gateway(start_worker) -> Iterator[GatewayProcess]:
    worker = start_worker(SPECS, pool="threads", concurrency=6)
    gateway = GatewayProcess("tests.integration_app", worker.env, token=TOKEN,
                             args=("--max-body", str(MAX_BODY)))
    with gateway:
        yield gateway.checked()


@pytest.mark.integration
def test_hostile_requests_get_only_documented_answers_and_no_traceback(hostile_gateway):
    gateway = hostile_gateway
    contract = gateway.contract
    assert contract is not None
    statuses: dict[int, int] = {}
    http = httpx.Client(base_url=gateway.url, timeout=30)

    @settings(max_examples=1000, deadline=None, database=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture,
                                     HealthCheck.too_slow])
    @given(broken=st.sampled_from([None, None, None, *BAD]), chunked=st.booleans(),
           data=st.data())
    def one_request(broken, chunked, data):
        parts = {name: data.draw(BAD[name] if name == broken else GOOD[name], label=name)
                 for name in GOOD}
        route, body = parts["route"], parts["body"]
        query, authorization = parts["query"], parts["authorization"]
        method, pool, what = route
        path = what if pool is None else f"/pools/{pool}/{what}"
        headers = {"Content-Type": "application/json"}
        if authorization is not None:
            headers["Authorization"] = authorization
        content: Any = body
        if body is not None and chunked:
            content = iter([body])  # no Content-Length: counted as it arrives
        request = http.build_request(method, path, params=query, headers=headers,
                                     content=content)
        response = http.send(request, stream=True)
        try:
            if response.headers.get("content-type", "").startswith("text/event-stream"):
                received = list(events(response))
                contract.check(response)
                contract.check_events(request.url.path, received)
                failed = [data for name, data in received if name == "error"]
                assert all(error["status"] != 500 or error["type"].endswith(":ActionFailed")
                           for error in failed), failed
            else:
                response.read()
                contract.check(response)
                assert b"Traceback" not in response.content
                if response.status_code == 500:
                    assert response.json()["type"] == "urn:celery-warmpool:error:ActionFailed"
        finally:
            response.close()
        statuses[response.status_code] = statuses.get(response.status_code, 0) + 1

    one_request()
    http.close()

    log = gateway.log()
    assert "Traceback" not in log, log[-3000:]
    assert "ERROR" not in log, log[-3000:]
    # The run reached every kind of answer: served, refused, failed.
    assert {200, 202, 401, 404, 413, 422} <= set(statuses), statuses
    # And left every pool whole.
    with gateway.client() as checked:
        for pool, size in (("counter", 2), ("single", 1), ("speller", 2)):
            wait_until(lambda pool=pool, size=size: _whole(checked, pool, size), 30,
                       f"pool {pool} was whole again")


def _whole(http: httpx.Client, pool: str, size: int) -> bool:
    status = http.get(f"/pools/{pool}/status").json()
    return (status["checked_out"], status["waiting"], status["available"]) == (0, 0, size)


def test_query_seconds_out_of_range_are_refused_like_the_callers():
    # The server's bounds are the document's: each edge, each side.
    _, warm = make_app(REDIS_BROKER, REDIS_BACKEND, SPECS)
    app = create_app(warm)
    transport = httpx.ASGITransport(app=app)

    async def ask(value: str) -> httpx.Response:
        async with httpx.AsyncClient(transport=transport, base_url="http://g") as client:
            return await client.get("/pools/counter/status", params={"timeout": value})

    for value in ("0.0009", "86400.0001", "nan", "inf", "-1", "five", ""):
        answer = asyncio.run(ask(value))
        body = answer.json()
        assert (answer.status_code, body["type"], body["argument"]) == (
            422, "urn:celery-warmpool:error:InvalidArgument", "timeout"), (value, body)
        assert body["allowed"] == "a number of seconds from 0.001 to 86400"

"""The public calls' arguments: checked before anything is sent, refused with InvalidArgument."""

from __future__ import annotations

import asyncio
import pickle
from collections.abc import Iterator
from fractions import Fraction
from typing import Any

import pytest
import redis

from celery_warmpool import (
    AgentPool,
    InvalidArgument,
    Signal,
    WarmPoolError,
    WorkerFailed,
)
from celery_warmpool.core import arguments
from celery_warmpool.core.arguments import seconds
from tests.conftest import REDIS_BROKER

from .core_agents import CounterAgent

RANGE = "a number of seconds from 0.001 to 86400"
INCREMENT = Signal.new("counter.increment", {"by": 1})


@pytest.mark.parametrize("value, taken", [
    (0.001, 0.001), (1, 1.0), (2.5, 2.5), (86400, 86400.0), (Fraction(1, 4), 0.25)])
def test_seconds_takes_finite_numbers_from_a_millisecond_to_a_day(value, taken):
    assert seconds("timeout", value) == taken
    assert type(seconds("timeout", value)) is float


@pytest.mark.parametrize("value, got", [
    ("5", "str '5'"), (True, "bool True"), (b"1", "bytes b'1'"), ([1], "list [1]"),
    (None, "None"), (float("nan"), "nan"), (float("inf"), "inf"), (-float("inf"), "-inf"),
    (-1, "-1"), (0, "0"), (0.0009, "0.0009"), (5e-324, "5e-324"), (86400.5, "86400.5"),
    (1e300, "1e+300"), (10**400, "1" + "0" * 76 + "..."),
])
def test_seconds_refuses_naming_the_argument_the_value_and_the_range(value, got):
    with pytest.raises(InvalidArgument) as raised:
        seconds("call_timeout", value)
    error = raised.value
    assert str(error) == f"call_timeout must be {RANGE}, got {got}"
    assert (error.argument, error.allowed) == ("call_timeout", RANGE)
    assert error.value == (got.split(" ", 1)[1] if " " in got else got)


def test_none_means_what_each_argument_says():
    assert arguments.call_timeouts(5, None) == (5.0, None)
    assert arguments.cast_timeouts(None, None) == (None, None)
    assert arguments.local_timeouts(None, None) == (None, None)
    assert arguments.checkout_timeout(0) == 0.0  # a local checkout: do not wait
    with pytest.raises(InvalidArgument, match=rf"^timeout must be {RANGE}, got None$"):
        arguments.call_timeouts(None, 5)
    with pytest.raises(InvalidArgument) as raised:
        arguments.cast_timeouts(-1, None)
    assert str(raised.value) == (f"timeout must be {RANGE}, or None (no deadline: it waits "
                                 "for an agent), got -1")


def test_counts_flags_pools_and_signal_lists_are_checked():
    assert arguments.count("concurrency", 3) == 3
    for value, message in ((0, "got 0"), (True, "got bool True"), (2.0, "got float 2.0"),
                           ("4", "got str '4'")):
        with pytest.raises(InvalidArgument) as raised:
            arguments.count("concurrency", value)
        assert str(raised.value) == f"concurrency must be an integer of at least 1, {message}"
    with pytest.raises(InvalidArgument, match=r"^return_exceptions must be True or False, "
                                              r"got str 'no'$"):
        arguments.flag("return_exceptions", "no")
    with pytest.raises(InvalidArgument, match=r"^pool must be a pool's name \(a str\), "
                                              r"got list \['x'\]$"):
        arguments.pool_name(["x"])
    for one in ({"type": "a"}, "text", INCREMENT):
        with pytest.raises(InvalidArgument, match=r"^signals must be an iterable of signals"):
            arguments.signal_list(one)
    assert arguments.signal_list([INCREMENT]) == [INCREMENT]


def test_invalid_argument_is_a_value_error_and_survives_celerys_round_trip():
    error = InvalidArgument("timeout must be x, got 'y'", "timeout", "'y'", "x")
    assert isinstance(error, ValueError) and isinstance(error, WarmPoolError)
    for copy in (type(error)(*error.args), pickle.loads(pickle.dumps(error))):
        assert (str(copy), copy.argument, copy.value, copy.allowed) == (
            "timeout must be x, got 'y'", "timeout", "'y'", "x")


def test_worker_failed_names_the_foreign_error_and_survives_the_round_trip():
    wrapped = WorkerFailed.wrapping(OverflowError("timestamp out of range"), "counter")
    assert str(wrapped) == ("pool 'counter': the worker failed to run the call: "
                            "OverflowError: timestamp out of range")
    assert (wrapped.pool, wrapped.cause) == ("counter", "OverflowError: timestamp out of range")
    copy = type(wrapped)(*wrapped.args)
    assert (str(copy), copy.pool, copy.cause) == (str(wrapped), "counter", wrapped.cause)
    redis_error = WorkerFailed.wrapping(redis.ResponseError("value is not an integer"))
    assert redis_error.cause == "redis.exceptions.ResponseError: value is not an integer"
    own = InvalidArgument("x")
    assert WorkerFailed.wrapping(own) is own  # a contract error goes as it is


@pytest.fixture
def pool() -> Iterator[AgentPool[Any]]:
    with AgentPool(CounterAgent, name="local", size=1) as started:
        yield started


@pytest.mark.parametrize("call, message", [
    (lambda pool: pool.checkout(timeout=-1), f"timeout must be {RANGE.replace('0.001', '0')}"),
    (lambda pool: pool.checkout(timeout="1"), "timeout must be"),
    (lambda pool: pool.checkout(block="no"), "block must be True or False, got str 'no'"),
    (lambda pool: pool.call(INCREMENT, timeout=float("nan")), "timeout must be"),
    (lambda pool: pool.call(INCREMENT, call_timeout=float("inf")), "call_timeout must be"),
    (lambda pool: pool.transaction({"type": "counter.increment"}), "signals must be"),
    (lambda pool: pool.stream(INCREMENT, timeout=1e300), "timeout must be"),
])
def test_a_local_pool_refuses_bad_arguments_before_lending_an_agent(pool, call, message):
    with pytest.raises(InvalidArgument, match=f"^{message}"):
        call(pool)
    status = pool.status()
    assert (status.checked_out, status.available, status.counters.checkouts) == (0, 1, 0)
    assert pool.checkout(timeout=0) is not None  # 0: do not wait; an agent is idle


def table_rows(warm: Any) -> list[tuple[str, Any, str]]:
    """The calls of issue 24's table (and their asyncio twins): what each must say."""
    inc = INCREMENT
    chunks = {"type": "counter.chunks", "data": {"count": 2}}
    rows: list[tuple[str, Any, str]] = [
        ("call(timeout=1e15)", lambda: warm.call("counter", inc, timeout=1e15),
         f"timeout must be {RANGE}, got 1000000000000000.0"),
        ("call(call_timeout=1e300)", lambda: warm.call("counter", inc, call_timeout=1e300),
         f"call_timeout must be {RANGE}, or None (no bound on the work), got 1e+300"),
        ("call(call_timeout=inf)",
         lambda: warm.call("counter", inc, call_timeout=float("inf")),
         f"call_timeout must be {RANGE}, or None (no bound on the work), got inf"),
        ("acall(timeout=1e300)",
         lambda: asyncio.run(warm.acall("counter", inc, timeout=1e300)),
         f"timeout must be {RANGE}, got 1e+300"),
        ("call(timeout='5')", lambda: warm.call("counter", inc, timeout="5"),
         f"timeout must be {RANGE}, got str '5'"),
        ("call(timeout=nan)", lambda: warm.call("counter", inc, timeout=float("nan")),
         f"timeout must be {RANGE}, got nan"),
        ("call(call_timeout=-5)", lambda: warm.call("counter", inc, call_timeout=-5),
         f"call_timeout must be {RANGE}, or None (no bound on the work), got -5"),
        ("call(timeout=-1)", lambda: warm.call("counter", inc, timeout=-1),
         f"timeout must be {RANGE}, got -1"),
        ("stream(timeout=-2)", lambda: warm.stream("counter", chunks, timeout=-2),
         f"timeout must be {RANGE}, got -2"),
        ("astream(call_timeout=0)",
         lambda: warm.astream("counter", chunks, call_timeout=0),
         f"call_timeout must be {RANGE}, or None (no bound on the work), got 0"),
        ("cast(timeout=1e300)", lambda: warm.cast("counter", inc, timeout=1e300),
         f"timeout must be {RANGE}, or None (no deadline: it waits for an agent), "
         "got 1e+300"),
        ("acast(call_timeout=True)",
         lambda: asyncio.run(warm.acast("counter", inc, call_timeout=True)),
         f"call_timeout must be {RANGE}, or None (no bound on the work), got bool True"),
        ("map(concurrency=0)", lambda: warm.map("counter", [inc], concurrency=0),
         "concurrency must be an integer of at least 1, got 0"),
        ("map(timeout=inf)", lambda: warm.map("counter", [inc], timeout=float("inf")),
         f"timeout must be {RANGE}, got inf"),
        ("amap(concurrency=2.5)", lambda: warm.amap("counter", [inc], concurrency=2.5),
         "concurrency must be an integer of at least 1, got float 2.5"),
        ("transaction(timeout=5e-324)",
         lambda: warm.transaction("counter", [inc], timeout=5e-324),
         f"timeout must be {RANGE}, got 5e-324"),
        ("atransaction(signals=one)",
         lambda: asyncio.run(warm.atransaction("counter", inc)),
         "signals must be an iterable of signals (a list, say), got Signal"),
        ("status(timeout=1.3e16)", lambda: warm.status("counter", timeout=1.3e16),
         f"timeout must be {RANGE}, got 1.3e+16"),
        ("astatus(timeout=None)", lambda: asyncio.run(warm.astatus("counter", timeout=None)),
         f"timeout must be {RANGE}, got None"),
        ("nodes(timeout='1')", lambda: warm.nodes("counter", timeout="1"),
         f"timeout must be {RANGE}, got str '1'"),
        ("call(pool=5)", lambda: warm.call(5, inc), "pool must be a pool's name (a str), "
                                                    "got int 5"),
    ]
    return rows


def test_every_row_of_the_table_is_refused_before_anything_is_sent(clean_redis, client):
    # No worker runs: a message sent would stay in the pool's queue.
    _, warm = client([{"name": "counter", "agent": "tests.integration_app:CounterAgent"}])
    seen = []
    for label, call, message in table_rows(warm):
        with pytest.raises(InvalidArgument) as raised:
            call()
        seen.append(label)
        assert str(raised.value).startswith(message), (label, str(raised.value))
    assert len(seen) == 21
    broker = redis.Redis.from_url(REDIS_BROKER)
    assert broker.llen("warmpool.counter") == 0
    assert broker.keys("*") == []

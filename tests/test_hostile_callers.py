"""Whatever a caller passes, only WarmPoolErrors come out, and the pool stays whole.

Against a real threads node: every public call, blocking and asyncio, driven by
hypothesis with timeouts of every kind and signals valid, invalid and of unknown types;
and a worker's own failure (not the action's) reaching the caller as WorkerFailed.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import pytest
import redis
from celery import states
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from celery_warmpool import InvalidArgument, Signal, WarmPoolError, WorkerFailed
from celery_warmpool.core.ids import new_id
from tests.conftest import REDIS_BACKEND, wait_until
from tests.test_worker import counter

pytestmark = pytest.mark.integration

SIZE = 2
_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner,
                                                                max_size=3),
    max_leaves=8)

def _nested(depth: int) -> list[Any]:
    value: list[Any] = []
    for _ in range(depth - 1):
        value = [value]
    return value


#: Seconds a call takes: short ones, a day, a millisecond (in time or not: CheckoutTimeout
#: and CallTimeout are answers too), as floats and ints.
GOOD_SECONDS = st.one_of(st.floats(min_value=0.001, max_value=2.0),
                         st.integers(min_value=1, max_value=86400),
                         st.sampled_from([0.001, 0.01, 86400, 86400.0]))
#: Seconds no call takes: out of range, not finite, tiny, huge, negative, the wrong type.
BAD_SECONDS = st.one_of(
    st.booleans(), st.floats().filter(lambda value: not 0.001 <= value <= 86400),
    st.integers(max_value=0), st.integers(min_value=86401), st.text(max_size=4),
    st.sampled_from([0, 5e-324, 2.2e-308, 1e300, 1.7e308, float("inf"), float("nan"), -0.0,
                     86400.001, 1.3e16, "5", b"1", [1], object()]),
)
VALID_SIGNALS = st.one_of(
    st.builds(lambda by: {"type": "counter.increment", "data": {"by": by}},
              st.integers(-10**6, 10**6)),
    st.builds(lambda value: {"type": "counter.echo", "data": {"value": value}}, _JSON),
    st.just({"type": "counter.fail"}),
    st.builds(lambda seconds: {"type": "counter.work", "data": {"seconds": seconds}},
              st.floats(0, 0.05)),
    st.builds(lambda count: {"type": "counter.chunks", "data": {"count": count}},
              st.integers(0, 3)),
    st.builds(lambda: Signal.new("counter.increment")),
)
INVALID_SIGNALS = st.one_of(
    st.builds(lambda by: {"type": "counter.increment", "data": {"by": by}}, st.text(max_size=3)),
    st.builds(lambda kind: {"type": kind}, st.text(max_size=12)),  # unknown (or empty) types
    st.dictionaries(st.text(max_size=5), _JSON, max_size=3),
    st.none() | st.integers() | st.floats() | st.binary(max_size=4) | st.text(max_size=6)
    | st.lists(st.integers(), max_size=2),
    st.sampled_from([
        {"type": "counter.increment", "data": {"by": 1, "extra": 2}},
        {"type": "counter.increment", "id": ""}, {"type": "counter.increment", "source": ""},
        {"type": "counter.echo", "data": {"value": object()}},
        {"type": "counter.echo", "data": [1, 2]}, {"type": "counter.touch"},
        {"type": "counter.increment", "specversion": "0.3"},
        # Values at the edges of what travels: a lone surrogate, NaN, nesting around the
        # deepest a signal may have (100 levels) and past what pydantic serializes (255).
        {"type": "counter.echo", "data": {"value": "\ud800"}},
        {"type": "counter.echo", "data": {"value": float("nan")}},
        *({"type": "counter.echo", "data": {"value": _nested(depth)}}
          for depth in (98, 99, 100, 300, 2000)),
    ]),
)
SIGNALS = st.one_of(VALID_SIGNALS, INVALID_SIGNALS)
#: Arguments a call takes, and ones it refuses; an example breaks at most one of them.
GOOD = {"pool": st.just("counter"),
        "signals": st.lists(st.one_of(VALID_SIGNALS, VALID_SIGNALS, INVALID_SIGNALS),
                            min_size=1, max_size=3),
        "timeout": GOOD_SECONDS, "call_timeout": st.none() | GOOD_SECONDS,
        "concurrency": st.integers(1, 5), "flag": st.booleans()}
BAD = {"pool": st.one_of(st.just("nope"), st.integers(), st.none(), st.lists(st.text())),
       "signals": st.one_of(st.none(), st.integers(), SIGNALS.filter(
           lambda signal: not isinstance(signal, list))),
       "timeout": st.none() | BAD_SECONDS, "call_timeout": BAD_SECONDS,
       "concurrency": st.one_of(st.integers(max_value=0),
                                st.sampled_from([True, 1.5, "2", None])),
       "flag": st.sampled_from([None, 0, 1, "yes"])}
KINDS = ["call", "acall", "transaction", "atransaction", "cast", "acast", "stream", "astream",
         "map", "amap", "status", "astatus"]


class Caller:
    """Makes one public call of a kind with given arguments and consumes what it gives."""

    def __init__(self, warm: Any) -> None:
        self.warm = warm
        self.casts: list[Any] = []

    def run(self, kind: str, pool: Any, signals: Any, timeout: Any, call_timeout: Any,
            concurrency: Any, flag: Any) -> list[Any]:
        """What came out: replies, chunks, statuses, cast results (errors raise)."""
        warm = self.warm
        one = _first(signals)
        blocking: dict[str, Callable[[], Any]] = {
            "call": lambda: [warm.call(pool, one, timeout=timeout, call_timeout=call_timeout)],
            "transaction": lambda: warm.transaction(pool, signals, timeout=timeout,
                                                    call_timeout=call_timeout),
            "cast": lambda: [self._cast(warm.cast(pool, one, timeout=timeout,
                                                  call_timeout=call_timeout))],
            "stream": lambda: list(warm.stream(pool, one, timeout=timeout,
                                               call_timeout=call_timeout)),
            "map": lambda: list(warm.map(pool, signals, concurrency=concurrency,
                                         timeout=timeout, call_timeout=call_timeout,
                                         return_exceptions=flag)),
            "status": lambda: [warm.status(pool, timeout=timeout)],
        }
        if kind in blocking:
            return blocking[kind]()
        return asyncio.run(self._awaited(kind, pool, signals, timeout, call_timeout,
                                         concurrency, flag))

    async def _awaited(self, kind: str, pool: Any, signals: Any, timeout: Any,
                       call_timeout: Any, concurrency: Any, flag: Any) -> list[Any]:
        warm = self.warm
        one = _first(signals)
        if kind == "acall":
            return [await warm.acall(pool, one, timeout=timeout, call_timeout=call_timeout)]
        if kind == "atransaction":
            return await warm.atransaction(pool, signals, timeout=timeout,
                                           call_timeout=call_timeout)
        if kind == "acast":
            return [self._cast(await warm.acast(pool, one, timeout=timeout,
                                                call_timeout=call_timeout))]
        if kind == "astream":
            return [chunk async for chunk in warm.astream(pool, one, timeout=timeout,
                                                          call_timeout=call_timeout)]
        if kind == "amap":
            return [item async for item in warm.amap(
                pool, signals, concurrency=concurrency, timeout=timeout,
                call_timeout=call_timeout, return_exceptions=flag)]
        assert kind == "astatus"
        return [await warm.astatus(pool, timeout=timeout)]

    def _cast(self, result: Any) -> Any:
        self.casts.append(result)
        return result


def _first(signals: Any) -> Any:
    """The signal of a call of one: the first of a list, or what was given instead."""
    return signals[0] if isinstance(signals, list) and signals else signals


def test_every_public_call_raises_only_warmpool_errors_and_leaves_the_pool_whole(
        start_worker, client):
    worker = start_worker(counter(SIZE), pool="threads", concurrency=4)
    _, warm = client(counter(SIZE))
    caller = Caller(warm)
    outcomes: dict[str, int] = {}

    @settings(max_examples=1500, deadline=None, database=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture,
                                     HealthCheck.too_slow])
    @given(kind=st.sampled_from(KINDS), broken=st.sampled_from([None, None, None, *BAD]),
           data=st.data())
    def one_call(kind, broken, data):
        arguments = {name: data.draw(BAD[name] if name == broken else GOOD[name], label=name)
                     for name in GOOD}
        if kind == "cast" and broken != "timeout":  # None is a cast's own: no deadline
            arguments["timeout"] = data.draw(st.none() | GOOD_SECONDS, label="cast timeout")
        try:
            items = caller.run(kind, **arguments)
        except WarmPoolError as exc:
            outcome = type(exc).__name__
        else:
            # map with return_exceptions yields errors in place of replies.
            for item in items:
                assert not isinstance(item, BaseException) or isinstance(item, WarmPoolError), \
                    repr(item)
            outcome = "ok"
        outcomes[outcome] = outcomes.get(outcome, 0) + 1

    started = time.monotonic()
    one_call()
    elapsed = time.monotonic() - started

    # Casts settle (run, or dead-lettered), then the pool is whole on the node.
    wait_until(lambda: all(result.state in states.READY_STATES for result in caller.casts), 30,
               "every cast ended")

    def whole() -> bool:
        status = warm.status("counter")
        return (status.checked_out, status.waiting, status.available) == (0, 0, SIZE)

    wait_until(whole, 30, f"the pool on {worker.hostname} was whole again")
    status = warm.status("counter")
    counters = status.counters
    # Every agent lent came back, or was given up (replaced) after overrunning its
    # call_timeout; no setup failed.
    assert counters.checkouts == counters.checkins + counters.replacements, counters
    assert (status.size, counters.failures) == (SIZE, 0)
    assert "Traceback" not in worker.log()  # the worker's own code never failed
    # The run tried both sides of the contract, and kept its time.
    assert outcomes.get("ok", 0) > 0 and outcomes.get("InvalidArgument", 0) > 0, outcomes
    assert elapsed < 90, (elapsed, outcomes)


def test_a_worker_failure_reaches_the_caller_as_worker_failed(start_worker, client):
    worker = start_worker(counter(1), pool="threads", concurrency=2)
    _, warm = client(counter(1))
    event = Signal.new("counter.increment").to_wire()
    # A message no caller of this version sends (they check first): a deadline past what
    # a Redis expiry can hold. The worker fails on it in its own code, not the action's.
    sent = warm.handle_task.apply_async(("counter", [event], 1e300, None, False),
                                        queue="warmpool.counter")
    with pytest.raises(WorkerFailed) as raised:
        sent.get(timeout=10)
    error = raised.value
    # Redis' own words (its claim script adds where in the script it failed).
    refused = "redis.exceptions.ResponseError: value is not an integer or out of range"
    assert error.pool == "counter" and error.cause.startswith(refused)
    assert str(error).startswith(f"pool 'counter': the worker failed to run the call: {refused}")
    assert "a call failed in the worker itself" in worker.log()
    # A call_timeout no caller sends is refused before an agent is lent (it would have
    # stranded the agent: the watchdog failed on it after the checkout).
    odd = warm.handle_task.apply_async(("counter", [event], time.time() + 5, "soon", False),
                                       queue="warmpool.counter")
    with pytest.raises(InvalidArgument, match=r"^call_timeout must be a number of seconds"):
        odd.get(timeout=10)
    status = warm.status("counter")
    assert (status.checked_out, status.available) == (0, 1)
    assert warm.call("counter", Signal.new("counter.increment")).result == {"count": 1}


def test_a_foreign_error_from_an_older_worker_is_wrapped_by_the_caller(clean_redis, client):
    _, warm = client(counter(1))
    task_id = new_id()
    # What a worker of an older version stored: the foreign exception itself.
    warm.app.backend.mark_as_failure(task_id, OverflowError("timestamp out of range"))
    stored = redis.Redis.from_url(REDIS_BACKEND).get(warm.client.result_key(task_id))
    with pytest.raises(WorkerFailed) as raised:
        warm.client.read_reply(stored)
    assert raised.value.cause == "OverflowError: timestamp out of range"
    # A contract error comes back as it was raised.
    warm.app.backend.mark_as_failure(task_id, WorkerFailed("as sent", "counter", "X: y"))
    stored = redis.Redis.from_url(REDIS_BACKEND).get(warm.client.result_key(task_id))
    with pytest.raises(WorkerFailed, match=r"^as sent$"):
        warm.client.read_reply(stored)

"""Many models per pool, in one process: the cache of an agent, which agent a call for a
model gets, loads once for concurrent callers, failed loads and their back-off, models
loaded ahead, warm-up, batches of one model, seats and devices.

The cache and the back-off are tested with no threads; the pool with threads held by
events and barriers, never by sleeps.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from celery_warmpool import (
    Agent,
    AgentPool,
    CheckoutTimeout,
    ConfigurationError,
    InvalidArgument,
    ModelLoadFailed,
    PoolSpec,
    PoolStartError,
)
from celery_warmpool.core.arguments import model_id, pool_model
from celery_warmpool.core.models import (
    RETRY_CAP,
    LoadFailures,
    ModelCache,
    device_for,
)

from .conftest import at_once, wait_until
from .core_agents import CounterAgent, FakeClock
from .model_agents import ModelAgent, Recorder


def predict(text: str = "") -> dict[str, Any]:
    return {"type": "model.predict", "data": {"text": text}}


@pytest.fixture
def recorder() -> Iterator[Recorder]:
    recorder = Recorder()
    yield recorder
    recorder.release.set()
    for gate in recorder.gates.values():
        gate.set()


@pytest.fixture
def make_pool(recorder: Recorder) -> Iterator[Callable[..., AgentPool[ModelAgent]]]:
    """A started pool of ModelAgents reporting to ``recorder``; closed after the test."""
    made: list[AgentPool[ModelAgent]] = []

    def make(**options: Any) -> AgentPool[ModelAgent]:
        options.setdefault("size", 1)
        options.setdefault("max_models", 2)
        pool = AgentPool(functools.partial(ModelAgent, recorder=recorder), name="heads",
                         **options)
        made.append(pool)
        return pool.start()

    yield make
    recorder.release.set()
    for gate in recorder.gates.values():
        gate.set()
    for pool in made:
        pool.close()


# -- one agent's cache, no threads ---------------------------------------------------------


def cache_with_log(capacity: int) -> tuple[ModelCache, list[str]]:
    log: list[str] = []

    def load(model: str) -> str:
        log.append(f"load {model}")
        if model == "broken":
            raise OSError("no weights")
        return f"<{model}>"

    def unload(model: str, loaded: str) -> None:
        log.append(f"unload {model}")
        assert loaded == f"<{model}>"

    return ModelCache(capacity, load, unload), log


def test_the_least_recently_used_model_is_unloaded_before_a_new_one_loads() -> None:
    cache, log = cache_with_log(2)

    assert cache.use("a") == "<a>"
    assert cache.use("b") == "<b>"
    assert cache.use("a") == "<a>"  # a hit: a is now the most recently used
    assert cache.use("c") == "<c>"

    assert log == ["load a", "load b", "unload b", "load c"]
    assert cache.held() == ["a", "c"]


def test_a_load_that_fails_adds_nothing_and_what_made_room_stays_unloaded() -> None:
    cache, log = cache_with_log(1)
    cache.use("a")

    with pytest.raises(OSError, match="no weights"):
        cache.load("broken")

    assert log == ["load a", "unload a", "load broken"]
    assert cache.held() == []


def test_clear_unloads_every_model_least_recently_used_first() -> None:
    cache, log = cache_with_log(3)
    for model in ("a", "b", "c", "a"):
        cache.use(model)

    cache.clear()

    assert log[-3:] == ["unload b", "unload c", "unload a"]
    assert len(cache) == 0


def test_an_unload_that_raises_is_logged_and_the_model_dropped(caplog) -> None:
    def unload(model: str, loaded: Any) -> None:
        raise RuntimeError("GPU went away")

    cache = ModelCache(1, lambda model: model, unload)
    cache.use("a")
    cache.use("b")

    assert cache.held() == ["b"]
    assert "unload_model('a') failed" in caplog.text


def test_a_failed_model_backs_off_doubling_up_to_a_cap() -> None:
    clock = FakeClock()
    failures = LoadFailures(clock)

    assert failures.record("m", "OSError: no weights") == 1.0
    assert failures.backing_off("m") == (1, "OSError: no weights", 1.0)
    clock.advance(1.0)
    assert failures.backing_off("m") is None  # its wait is over: try it
    assert failures.record("m", "OSError: still none") == 2.0
    for _ in range(10):
        waited = failures.record("m", "OSError: still none")
    assert waited == RETRY_CAP
    failures.forget("m")
    assert failures.backing_off("m") is None


def test_each_agent_takes_a_device_by_process_index_and_seat() -> None:
    devices = ("cuda:0", "cuda:1")

    assert [device_for(devices, index, 0) for index in range(4)] == [
        "cuda:0", "cuda:1", "cuda:0", "cuda:1"]  # prefork children, one agent each
    assert [device_for(devices, 0, seat) for seat in range(3)] == [
        "cuda:0", "cuda:1", "cuda:0"]  # the agents of one threads process
    assert device_for((), 3, 1) is None


@pytest.mark.parametrize("hook", ["async def", "generator"])
def test_load_model_must_be_a_plain_method(hook: str) -> None:
    with pytest.raises(ConfigurationError, match="load_model must be a plain method"):
        if hook == "async def":
            class Async(Agent[Any]):
                async def load_model(self, model_id: str) -> Any:
                    return model_id
        else:
            class Generating(Agent[Any]):
                def load_model(self, model_id: str) -> Any:
                    yield model_id


# -- model ids and pools -------------------------------------------------------------------


@pytest.mark.parametrize("good", ["a", "tenant-42", "org/model@v2", "x" * 128, "A.b_c:d+e"])
def test_a_model_id_of_the_documented_form_is_taken(good: str) -> None:
    assert model_id(good) == good


@pytest.mark.parametrize("bad", ["", "x" * 129, "-a", "has space", "é", "a\nb", 42, None])
def test_a_model_id_of_another_form_is_refused(bad: Any) -> None:
    with pytest.raises(InvalidArgument) as caught:
        model_id(bad)
    assert caught.value.argument == "model"
    assert "1 to 128 characters" in caught.value.allowed


def test_a_multiplexed_pool_needs_a_model_and_another_pool_refuses_one() -> None:
    with pytest.raises(InvalidArgument, match="pool 'heads' holds many models"):
        pool_model("heads", 3, None)
    with pytest.raises(InvalidArgument, match="pool 'plain' serves no models by id"):
        pool_model("plain", None, "a")
    assert pool_model("heads", 3, "a") == "a"
    assert pool_model("plain", None, None) is None


def test_model_load_failed_survives_being_rebuilt_from_its_args() -> None:
    error = ModelLoadFailed("model 'm' failed", "m", "OSError: no weights", "heads", 2.0)

    again = type(error)(*error.args)

    assert (again.model, again.cause, again.pool, again.retry_in) == (
        "m", "OSError: no weights", "heads", 2.0)
    assert str(again) == "model 'm' failed"


def test_a_multiplexed_pool_of_an_agent_without_load_model_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="does not implement load_model"):
        PoolSpec("plain", CounterAgent, max_models=2)


@pytest.mark.parametrize("options,message", [
    ({"models": ["a"]}, "set max_models too"),
    ({"max_models": 1, "models": ["a", "b"]}, "2 models but max_models=1"),
    ({"max_models": 2, "models": ["a", "a"]}, "listed twice"),
    ({"max_models": 2, "models": ["a b"]}, "is not a model id"),
    ({"warmup": [{"type": "model.nothing"}]}, "invalid warmup: signal 'model.nothing'"),
    ({"devices": ["cuda 0"]}, "is not a device name"),
])
def test_a_spec_with_models_that_cannot_work_is_refused(options: dict[str, Any],
                                                         message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        PoolSpec("heads", ModelAgent, **options)


# -- the pool: which agent, and how often a model loads --------------------------------------


def test_a_model_loads_on_first_use_and_the_next_call_is_a_hit(make_pool, recorder):
    pool = make_pool()

    first = pool.call(predict(), model="tenant-1")
    second = pool.call(predict(), model="tenant-1")

    assert recorder.of("load") == ["tenant-1"]
    assert (first.result["model"], first.result["load"]) == ("tenant-1", 1)
    assert second.result["load"] == 1  # the same loaded object
    counters = pool.status().counters
    assert (counters.model_loads, counters.model_hits, counters.calls) == (1, 1, 2)


def test_the_least_recently_used_model_of_an_agent_goes_first(make_pool, recorder):
    pool = make_pool(max_models=2)

    for model in ("a", "b", "a", "c"):
        pool.call(predict(), model=model)

    assert recorder.of("unload") == ["b"]
    [held] = pool.models.held().values()
    assert [entry.model_id for entry in held] == ["a", "c"]
    assert pool.status().counters.model_evictions == 1


def test_a_cold_model_takes_the_agent_with_room_then_the_coldest(make_pool, recorder):
    pool = make_pool(size=2, max_models=1)

    a = pool.call(predict(), model="a").agent_id
    b = pool.call(predict(), model="b").agent_id
    assert a != b  # b went to the agent with room
    assert pool.call(predict(), model="a").agent_id == a  # a hit, where a is
    c = pool.call(predict(), model="c").agent_id

    assert c == b  # b was used longer ago than a: b goes, a stays
    assert recorder.of("unload") == ["b"]


def test_a_call_without_a_model_to_a_multiplexed_pool_is_refused(make_pool):
    pool = make_pool()

    with pytest.raises(InvalidArgument, match="holds many models"):
        pool.call(predict())
    with pytest.raises(InvalidArgument, match="1 to 128 characters"):
        pool.call(predict(), model="no spaces please")


def test_a_model_for_a_pool_without_max_models_is_refused(recorder):
    with AgentPool(functools.partial(ModelAgent, recorder=recorder), size=1) as pool:
        with pytest.raises(InvalidArgument, match="serves no models by id"):
            pool.call(predict(), model="a")
        with pytest.raises(InvalidArgument, match="serves no models by id"):
            pool.checkout(model="a")


def test_concurrent_first_calls_of_a_cold_model_wait_for_one_load(make_pool, recorder):
    pool = make_pool(size=4, max_models=2)
    gate = recorder.gate("cold")
    callers = threading.Thread(target=lambda: outcomes.extend(
        at_once(lambda _: pool.call(predict(), model="cold", timeout=20), range(4))))
    outcomes: list[Any] = []
    callers.start()

    assert recorder.started["cold"].wait(10)
    wait_until(lambda: pool.models.waiting == 3, 10, "three callers waited for the load")
    gate.set()
    callers.join(20)

    assert recorder.of("load") == ["cold"]
    assert len({reply.agent_id for reply in outcomes}) == 1  # all on the agent that has it
    counters = pool.status().counters
    assert (counters.model_loads, counters.model_hits) == (1, 3)


def test_a_hot_model_spreads_when_its_holder_is_busy_longer_than_a_load(make_pool, recorder):
    pool = make_pool(size=2, max_models=2)
    holder = pool.call(predict(), model="hot").agent_id  # loads in microseconds
    busy = threading.Thread(target=pool.call, args=({"type": "model.hold"},),
                            kwargs={"model": "hot"})
    busy.start()
    assert recorder.holding.wait(10)

    reply = pool.call(predict(), model="hot", timeout=10)  # the holder is still busy

    assert reply.agent_id != holder
    assert recorder.of("load") == ["hot", "hot"]
    recorder.release.set()
    busy.join(10)


def test_loads_of_different_models_run_side_by_side(make_pool, recorder):
    pool = make_pool(size=2, max_models=1)
    recorder.barrier = threading.Barrier(2)  # each load waits for the other to start

    replies = at_once(lambda model: pool.call(predict(), model=model, timeout=20), ["a", "b"])

    assert [reply.result["model"] for reply in replies] == ["a", "b"]
    assert sorted(recorder.of("load")) == ["a", "b"]


def test_a_failing_load_fails_its_calls_and_is_tried_again_after_its_back_off(
        make_pool, recorder):
    pool = make_pool()
    clock = FakeClock()
    pool.models.failures = LoadFailures(clock)
    recorder.failing["flaky"] = 1

    with pytest.raises(ModelLoadFailed) as first:
        pool.call(predict(), model="flaky")
    with pytest.raises(ModelLoadFailed) as second:
        pool.call(predict(), model="flaky")  # backing off: no load tried
    assert recorder.of("load") == ["flaky"]
    clock.advance(1.0)
    reply = pool.call(predict(), model="flaky")

    assert (first.value.model, first.value.cause, first.value.retry_in) == (
        "flaky", "OSError: no weights for flaky", 1.0)
    assert "failed to load 1 time(s) in a row" in str(second.value)
    assert reply.result["model"] == "flaky"
    assert recorder.of("load") == ["flaky", "flaky"]
    counters = pool.status().counters
    assert (counters.model_load_failures, counters.model_loads) == (1, 1)
    assert pool.status().available == 1  # the agent came back each time


def test_callers_waiting_for_a_load_that_fails_fail_with_it(make_pool, recorder):
    pool = make_pool(size=3)
    gate = recorder.gate("doomed")
    recorder.failing["doomed"] = 1
    outcomes: list[Any] = []
    callers = threading.Thread(target=lambda: outcomes.extend(
        at_once(lambda _: pool.call(predict(), model="doomed", timeout=20), range(3))))
    callers.start()
    assert recorder.started["doomed"].wait(10)
    wait_until(lambda: pool.models.waiting == 2, 10, "two callers waited for the load")
    gate.set()
    callers.join(20)

    assert [type(outcome) for outcome in outcomes] == [ModelLoadFailed] * 3
    assert recorder.of("load") == ["doomed"]


def test_a_load_that_ends_past_the_timeout_is_kept_and_its_call_never_runs(
        make_pool, recorder):
    pool = make_pool()
    gate = recorder.gate("slow")
    timer = threading.Timer(0.3, gate.set)
    timer.start()

    with pytest.raises(CheckoutTimeout, match="the call was not run"):
        pool.call(predict(), model="slow", timeout=0.1)

    assert pool.status().counters.calls == 0
    assert pool.call(predict(), model="slow").result["load"] == 1  # loaded for the next
    timer.join()


def test_transactions_and_streams_name_a_model_too(make_pool):
    pool = make_pool()

    replies = pool.transaction([{"type": "model.count"}, {"type": "model.count"}],
                               model="ledger")
    with pool.stream({"type": "model.spell"}, model="abc") as stream:
        chunks = list(stream)

    assert [reply.state["served"] for reply in replies] == [1, 2]
    assert (chunks, stream.reply.result) == (["a", "b", "c"], "abc")


def test_batches_hold_the_signals_of_one_model_only(make_pool, recorder):
    pool = make_pool(size=2, max_models=2)
    models = ["left", "right"] * 6

    replies = at_once(lambda model: pool.call(
        {"type": "model.score", "data": {"text": model}}, model=model, timeout=20), models)

    for model, reply in zip(models, replies, strict=True):
        assert reply.result["model"] == model == reply.result["text"]
    batches = [batch.split(":") for batch in recorder.of("batch")]
    assert sum(int(size) for _, size in batches) == 12
    assert {model for model, _ in batches} == {"left", "right"}
    assert max(int(size) for _, size in batches) > 1


def test_load_and_unload_by_hand(make_pool, recorder):
    pool = make_pool(size=2, max_models=2, warmup=[{"type": "model.warm"}])

    agent = pool.models.load("ahead")
    assert pool.models.load("ahead") == agent  # held already: nothing loads
    assert recorder.of("load") == ["ahead"]
    assert recorder.of("warmup") == ["ahead"]
    assert pool.models.unload("ahead") == 1
    assert recorder.of("unload") == ["ahead"]
    assert all(held == [] for held in pool.models.held().values())


# -- before the pool serves: models loaded ahead, warm-up --------------------------------------


def test_models_listed_in_the_spec_are_loaded_on_every_agent_before_it_serves(
        make_pool, recorder):
    pool = make_pool(size=2, max_models=2, models=["a", "b"])

    assert sorted(recorder.of("load")) == ["a", "a", "b", "b"]
    assert [[entry.model_id for entry in held] for held in pool.models.held().values()] == [
        ["a", "b"], ["a", "b"]]
    pool.call(predict(), model="a")
    counters = pool.status().counters
    assert (counters.model_loads, counters.model_hits) == (4, 1)


def test_warmup_signals_run_for_each_model_after_setup_and_are_not_counted(
        make_pool, recorder):
    pool = make_pool(size=2, max_models=2, models=["a", "b"],
                     warmup=[{"type": "model.warm"}])

    assert sorted(recorder.of("warmup")) == ["a", "a", "b", "b"]
    for agent_id in pool.models.held():
        mine = [(what, model) for what, agent, model in recorder.events if agent == agent_id]
        assert mine == [("load", "a"), ("warmup", "a"), ("load", "b"), ("warmup", "b")]
    status = pool.status()
    assert (status.counters.calls, status.counters.checkouts) == (0, 0)
    assert status.warmup_seconds is not None and status.warmup_seconds >= 0


def test_warmup_signals_of_a_pool_without_models_run_once_per_agent(recorder):
    factory = functools.partial(ModelAgent, recorder=recorder)
    with AgentPool(factory, size=2, warmup=[{"type": "model.warm"}]) as pool:
        assert recorder.of("warmup") == ["-", "-"]
        assert pool.status().counters.calls == 0


@pytest.mark.parametrize("options,error", [
    ({"max_models": 1, "models": ["cursed"], "warmup": [{"type": "model.warm"}]},
     "warm-up signal 'model.warm' for model 'cursed' failed"),
    ({"max_models": 1, "models": ["broken"]}, "model 'broken' failed to load"),
])
def test_a_failing_warm_up_fails_the_agents_start_as_setup_does(recorder, options, error):
    recorder.failing["broken"] = 99
    pool = AgentPool(functools.partial(ModelAgent, recorder=recorder), name="heads", size=1,
                     start_timeout=10, **options)

    with pytest.raises(PoolStartError, match=error):
        pool.start()


# -- seats, devices and closing ----------------------------------------------------------------


def test_agents_take_seats_and_devices_and_a_replacement_takes_the_seat_it_frees(
        make_pool, recorder):
    pool = make_pool(size=3, devices=["gpu:0", "gpu:1"])

    agents = [pool.checkout(model="a") for _ in range(3)]
    assert sorted((agent.seat, agent.device) for agent in agents) == [
        (0, "gpu:0"), (1, "gpu:1"), (2, "gpu:0")]
    broken = next(agent for agent in agents if agent.seat == 1)
    broken.broken = RuntimeError("its GPU fell off the bus")
    for agent in agents:
        pool.checkin(agent)
    wait_until(lambda: pool.status().available == 3, 10, "the broken agent was replaced")

    again = [pool.checkout(model="a") for _ in range(3)]
    [replacement] = [agent for agent in again if agent not in agents]
    assert (replacement.seat, replacement.device) == (1, "gpu:1")
    for agent in again:
        pool.checkin(agent)


def test_closing_unloads_each_agents_models_before_its_teardown(make_pool, recorder):
    pool = make_pool(size=1, max_models=2)
    pool.call(predict(), model="a")
    pool.call(predict(), model="b")

    pool.close()

    assert [(what, model) for what, _, model in recorder.events[-3:]] == [
        ("unload", "a"), ("unload", "b"), ("teardown", "-")]


def test_from_spec_builds_a_multiplexed_pool(recorder):
    spec = PoolSpec("heads", ModelAgent, size=1, max_models=2, models=["a"])
    with AgentPool.from_spec(spec) as pool:
        reply = pool.call(predict(), model="a")
        assert reply.result["held"] == ["a"]
        assert pool.status().counters.model_hits == 1

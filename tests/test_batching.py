"""BatchAction, Result and reply_state in the local pool (no Celery)."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from pydantic import BaseModel

from celery_warmpool import (
    ActionContext,
    ActionFailed,
    Agent,
    AgentPool,
    AgentState,
    BatchAction,
    CheckoutTimeout,
    ConfigurationError,
    PoolSpec,
    Result,
    Signal,
    telemetry,
)
from celery_warmpool.core.batching import Batcher
from tests.conftest import at_once, wait_until
from tests.core_agents import receiving


class Text(BaseModel):
    text: str


class Upper(BatchAction):
    """Upper-cases each text; records every batch it ran; ``bad`` fails alone."""

    name = "upper"
    max_batch_size = 4
    batch_wait_timeout = 0.2
    batches: list[list[str]] = []

    Params = Text

    def run_batch(self, items: list[Any], context: ActionContext) -> list[Any]:
        texts = [item.text for item in items]
        type(self).batches.append(texts)
        return [ValueError("bad text") if text == "bad" else text.upper() for text in texts]


class Slow(Upper):
    """Upper-cases, in batches that wait long for more signals."""

    name = "slow"
    batch_wait_timeout = 30.0
    batches: list[list[str]] = []


class UpperAgent(Agent[AgentState]):
    signal_routes = {"text.upper": Upper, "text.slow": Slow}


def upper(text: str) -> dict[str, Any]:
    return {"type": "text.upper", "data": {"text": text}}


def slow(text: str) -> dict[str, Any]:
    return {"type": "text.slow", "data": {"text": text}}


@pytest.fixture
def pool():
    Upper.batches = []
    pool = AgentPool(UpperAgent, name="upper", size=1).start()
    yield pool
    pool.close()


def call_at_once(pool: AgentPool[Any], texts: list[str], **options: Any) -> list[Any]:
    """Call ``pool`` with each text from its own thread, all at once; outcomes in order."""
    return at_once(lambda text: pool.call(upper(text), **options), texts, within=10)


def test_a_full_batch_runs_at_once_without_waiting_out_its_time(pool):
    started = time.monotonic()
    replies = call_at_once(pool, ["a", "b", "c", "d"])
    assert time.monotonic() - started < 0.2  # full before batch_wait_timeout
    assert [reply.result for reply in replies] == ["A", "B", "C", "D"]
    assert [sorted(batch) for batch in Upper.batches] == [["a", "b", "c", "d"]]


def test_eight_callers_make_two_batches_of_four(pool):
    replies = call_at_once(pool, list("abcdefgh"))
    assert sorted(reply.result for reply in replies) == list("ABCDEFGH")
    assert sorted(len(batch) for batch in Upper.batches) == [4, 4]
    counters = pool.status().counters
    assert (counters.batches, counters.batched, counters.calls) == (2, 8, 8)


def test_a_batch_that_is_not_full_runs_after_batch_wait_timeout(pool):
    started = time.monotonic()
    replies = call_at_once(pool, ["x", "y"])
    waited = time.monotonic() - started
    assert 0.2 <= waited < 0.6
    assert sorted(reply.result for reply in replies) == ["X", "Y"]
    assert [sorted(batch) for batch in Upper.batches] == [["x", "y"]]


def test_an_item_that_fails_fails_alone(pool):
    outcomes = call_at_once(pool, ["ok", "bad", "fine", "good"])
    assert isinstance(outcomes[1], ActionFailed)
    assert "bad text" in str(outcomes[1])
    assert [outcomes[index].result for index in (0, 2, 3)] == ["OK", "FINE", "GOOD"]
    assert pool.status().counters.call_failures == 1


def test_an_item_whose_timeout_passes_while_the_agent_is_busy_never_runs(pool):
    held = pool.checkout()
    outcome: list[Any] = []
    waiter = threading.Thread(target=lambda: outcome.append(
        _outcome(lambda: pool.call(upper("late"), timeout=0.3))))
    waiter.start()
    time.sleep(0.6)  # past its timeout, and past batch_wait_timeout
    pool.checkin(held)
    waiter.join(5)
    assert isinstance(outcome[0], CheckoutTimeout)
    assert Upper.batches == []  # it never ran


def test_a_batch_sends_its_size_to_telemetry(pool):
    with receiving(telemetry.batch_run, sender=None) as batches:
        call_at_once(pool, ["a", "b", "bad"])
    [batch] = batches.calls
    assert (batch["action"], batch["size"], batch["failed"]) == ("upper", 3, 1)


def test_a_batch_action_called_alone_is_a_batch_of_one():
    agent = UpperAgent()
    reply = agent.handle(upper("solo"))
    assert reply.result == "SOLO"
    with pytest.raises(ActionFailed, match="bad text"):
        agent.handle(upper("bad"))


@pytest.mark.parametrize("attribute,value", [("max_batch_size", 0),
                                             ("batch_wait_timeout", -1),
                                             ("max_batch_size", "8")])
def test_batch_limits_are_checked_when_the_action_is_defined(attribute, value):
    with pytest.raises(ConfigurationError, match=attribute):
        type("Broken", (BatchAction,), {attribute: value,
                                         "run_batch": lambda self, items, context: []})


def _outcome(function: Any) -> Any:
    try:
        return function()
    except Exception as exc:
        return exc


# -- each caller's own deadline ----------------------------------------------------------


class Caller(threading.Thread):
    """One caller in a thread of its own: its outcome (reply or any exception, an
    interruption included) and how long it took."""

    def __init__(self, call: Callable[[], Any], name: str) -> None:
        super().__init__(name=name, daemon=True)
        self._call = call
        self.outcome: Any = None
        self.elapsed = -1.0

    def run(self) -> None:
        started = time.monotonic()
        try:
            self.outcome = self._call()
        except BaseException as exc:  # an interrupted leader ends with KeyboardInterrupt
            self.outcome = exc
        self.elapsed = time.monotonic() - started

    def finished(self, within: float = 10.0) -> Any:
        self.join(within)
        assert not self.is_alive(), f"{self.name} is still waiting"
        return self.outcome


def batcher_of(pool: AgentPool[Any], signal: dict[str, Any] | None = None) -> Batcher[Any]:
    batcher = pool.work.batcher_for(Signal.parse(signal or upper("x")))
    assert batcher is not None
    return batcher


def caller(pool: AgentPool[Any], text: str, timeout: float | None,
           kind: Callable[[str], dict[str, Any]] = upper) -> Caller:
    started = Caller(lambda: pool.call(kind(text), timeout=timeout), name=text)
    started.start()
    return started


@pytest.mark.parametrize("short_leads", [True, False], ids=["short-leads", "short-follows"])
def test_a_short_timeout_batched_with_a_long_one_fails_at_its_own_deadline(pool, short_leads):
    held = pool.checkout()  # every agent busy: the batch waits for one
    batcher = batcher_of(pool)
    timeouts = {"short": 0.1, "long": 10.0}
    order = ["short", "long"] if short_leads else ["long", "short"]
    callers = {each.name: each for each in in_turn(
        batcher, lambda name: caller(pool, name, timeouts[name]), *order)}

    short = callers["short"].finished()

    assert isinstance(short, CheckoutTimeout)
    assert 0.1 <= callers["short"].elapsed < 0.6  # its own 0.1 s, not the other's 10 s
    assert callers["long"].is_alive()  # still waiting for an agent, within its own 10 s
    pool.checkin(held)
    assert callers["long"].finished().result == "LONG"
    assert Upper.batches == [["long"]]  # the short one's signal never ran


def in_turn(batcher: Batcher[Any], start: Callable[[str], Caller], *names: str) -> list[Caller]:
    """Start a caller per name, each once the one before joined ``batcher``'s batch."""
    joined = batcher.pending()
    started = []
    for name in names:
        started.append(start(name))
        joined += 1
        wait_until(lambda joined=joined: batcher.pending() == joined, within=5,
                   what=f"{name} joined the batch")
    return started


def test_a_leader_past_its_deadline_hands_the_batch_to_a_follower_in_time(pool):
    held = pool.checkout()
    batcher = batcher_of(pool)
    [leader] = in_turn(batcher, lambda name: caller(pool, name, 0.1), "leader")
    followers = in_turn(batcher, lambda name: caller(pool, name, 10.0), "first", "second")

    assert isinstance(leader.finished(), CheckoutTimeout)
    pool.checkin(held)

    assert [follower.finished().result for follower in followers] == ["FIRST", "SECOND"]
    assert Upper.batches == [["first", "second"]]  # one batch, led by the first follower


def test_a_leader_past_its_deadline_with_no_follower_in_time_fails_them_all(pool):
    held = pool.checkout()
    batcher = batcher_of(pool)
    callers = in_turn(batcher, lambda name: caller(pool, name, 0.3), "a", "b", "c")

    outcomes = [each.finished() for each in callers]

    assert all(isinstance(outcome, CheckoutTimeout) for outcome in outcomes)
    assert all(each.elapsed < 1.0 for each in callers)
    assert batcher.pending() == 0  # the next caller opens a batch of its own
    pool.checkin(held)
    assert pool.call(upper("next"), timeout=5).result == "NEXT"
    assert Upper.batches == [["next"]]


class InterruptingLender:
    """A pool, as its batcher sees it, whose blocking checkout in one thread is
    interrupted (as Ctrl-C or a time limit would) once ``ready`` is set."""

    def __init__(self, pool: AgentPool[Any], victim: str) -> None:
        self.pool = pool
        self.victim = victim
        self.ready = threading.Event()
        self.name, self.size, self.max_overflow = pool.name, pool.size, pool.max_overflow
        self.counters, self.agent_class = pool.counters, pool.agent_class
        self.checkin, self.lent = pool.checkin, pool.lent
        self.abandon, self.finish_abandoned = pool.abandon, pool.finish_abandoned

    def checkout(self, block: bool = True, timeout: float | None = None,
                 model: str | None = None) -> Any:
        if block and threading.current_thread().name == self.victim:
            assert self.ready.wait(10)
            raise KeyboardInterrupt
        return self.pool.checkout(block=block, timeout=timeout, model=model)


def test_a_leader_interrupted_while_waiting_for_an_agent_hands_the_batch_on(pool):
    held = pool.checkout()
    lender = InterruptingLender(pool, victim="leader")
    batcher: Batcher[Any] = Batcher(lender, Upper(), pool.work.run_batch_within)

    def join(text: str) -> Caller:
        joined = Caller(lambda: batcher.call(Signal.parse(upper(text)), None), name=text)
        joined.start()
        return joined

    leader, *followers = in_turn(batcher, join, "leader", "first", "second")
    lender.ready.set()

    assert isinstance(leader.finished(), KeyboardInterrupt)
    pool.checkin(held)
    assert [follower.finished().result for follower in followers] == ["FIRST", "SECOND"]
    assert Upper.batches == [["first", "second"]]


def test_a_leader_interrupted_while_waiting_for_its_batch_to_fill_hands_it_on(pool):
    # Ctrl-C reaches the main thread while it leads a batch that is still filling (its
    # wait for more signals, inside the batcher's lock).
    batcher = batcher_of(pool, slow("x"))
    main = threading.main_thread().ident
    assert main is not None and threading.current_thread().ident == main
    followers: list[Caller] = []

    def interrupt_once_joined() -> None:
        wait_until(lambda: batcher.pending() == 1, within=5, what="the leader joined")
        # The first follower leads next: its own deadline ends the batch's wait.
        followers.extend(in_turn(batcher, lambda name: caller(pool, name, 1.0, slow), "first"))
        followers.extend(in_turn(batcher, lambda name: caller(pool, name, 10.0, slow), "second"))
        signal.pthread_kill(main, signal.SIGINT)

    helper = threading.Thread(target=interrupt_once_joined)
    helper.start()
    Slow.batches = []
    with pytest.raises(KeyboardInterrupt):
        pool.call(slow("leader"))  # waits up to its batch_wait_timeout (30 s) for more
    helper.join(10)

    assert [follower.finished().result for follower in followers] == ["FIRST", "SECOND"]
    assert Slow.batches == [["first", "second"]]


class Stop(BaseModel):
    text: str


class Halting(BatchAction):
    """Interrupted as it runs (a KeyboardInterrupt is not an Exception: nothing catches it)."""

    name = "halting"
    max_batch_size = 3
    batch_wait_timeout = 5.0
    Params = Stop

    def run_batch(self, items: list[Any], context: ActionContext) -> list[Any]:
        raise KeyboardInterrupt


class HaltingAgent(Agent[AgentState]):
    signal_routes = {"halt": Halting}


def test_a_leader_interrupted_while_its_batch_runs_fails_every_follower_at_once():
    with AgentPool(HaltingAgent, name="halting", size=1) as pool:
        callers = [Caller(lambda text=text: pool.call({"type": "halt", "data": {"text": text}}),
                          name=text) for text in ("a", "b", "c")]
        for each in callers:
            each.start()

        outcomes = [each.finished() for each in callers]

        assert sum(isinstance(outcome, KeyboardInterrupt) for outcome in outcomes) == 1
        failed = [outcome for outcome in outcomes if isinstance(outcome, ActionFailed)]
        assert len(failed) == 2
        assert all("interrupted while it ran (KeyboardInterrupt)" in str(outcome)
                   for outcome in failed)
        assert (pool.status().available, pool.status().checked_out) == (1, 0)


# -- Result and reply_state -----------------------------------------------------------------


class Counted(AgentState):
    count: int = 0


class Answer(BatchAction):
    name = "answer"

    def run_batch(self, items: list[Any], context: ActionContext) -> list[Any]:
        return [{"count": context.state.count} for _ in items]


class Tell(Answer):
    name = "tell"

    def run_batch(self, items: list[Any], context: ActionContext) -> list[Any]:
        return [object() for _ in items]  # not JSON


class Bump(BaseModel):
    by: int = 1




def _counter_agent() -> type[Agent[Counted]]:
    from celery_warmpool import Action

    class Increment(Action):
        name = "increment"
        Params = Bump

        def run(self, params: Any, context: ActionContext) -> Any:
            count = context.state.count + params.by
            return Result({"was": context.state.count, "now": count},
                          updates={"count": count})

    class Peek(Action):
        name = "peek"

        def run(self, params: Any, context: ActionContext) -> Any:
            return Result(f"count is {context.state.count}")

    class Plain(Action):
        name = "plain"

        def run(self, params: Any, context: ActionContext) -> Any:
            return {"count": context.state.count + 10}

    class Counter(Agent[Counted]):
        signal_routes = {"c.increment": Increment, "c.peek": Peek, "c.plain": Plain,
                         "c.answer": Answer, "c.tell": Tell}

    return Counter


def test_a_result_value_goes_to_the_caller_and_its_updates_into_state():
    agent = _counter_agent()()
    reply = agent.handle({"type": "c.increment", "data": {"by": 2}})
    assert reply.result == {"was": 0, "now": 2}
    assert reply.state == {"count": 2}
    peek = agent.handle({"type": "c.peek"})
    assert peek.result == "count is 2"
    assert agent.state.count == 2  # a value alone stores nothing


def test_a_plain_dict_keeps_its_meaning_state_updates():
    agent = _counter_agent()()
    assert agent.handle({"type": "c.plain"}).result == {"count": 10}
    assert agent.state.count == 10


def test_a_result_json_cannot_carry_fails_the_call_and_changes_nothing():
    agent = _counter_agent()()
    with pytest.raises(ActionFailed, match="JSON cannot carry"):
        agent.handle({"type": "c.tell"})
    assert agent.state.count == 0


def test_reply_state_false_leaves_state_out_of_replies():
    spec = PoolSpec("counter", _counter_agent(), size=1, reply_state=False)
    with AgentPool.from_spec(spec) as pool:
        reply = pool.call({"type": "c.increment"})
        assert reply.state is None
        assert reply.result == {"was": 0, "now": 1}
        assert pool.call({"type": "c.answer"}).state is None


def test_preload_runs_once_per_pool_and_every_agent_shares_it():
    runs: list[int] = []

    class Shared(Agent[AgentState]):
        signal_routes = {"s.where": Where}

        @classmethod
        def preload(cls, options: Any) -> Any:
            runs.append(1)
            return {"model": object(), "options": dict(options)}

    with AgentPool.from_spec(PoolSpec("shared", Shared, size=3,
                                      worker_opts={"device": "cpu"})) as pool:
        agents = [pool.checkout() for _ in range(3)]
        assert len(runs) == 1
        assert len({id(agent.shared) for agent in agents}) == 1
        assert agents[0].shared["options"] == {"device": "cpu"}
        assert {agent.process_index for agent in agents} == {0}


class Where(BatchAction):
    name = "where"

    def run_batch(self, items: list[Any], context: ActionContext) -> list[Any]:
        return [None for _ in items]

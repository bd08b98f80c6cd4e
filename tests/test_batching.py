"""BatchAction, Result and reply_state in the local pool (no Celery)."""

from __future__ import annotations

import threading
import time
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
    telemetry,
)
from tests.conftest import at_once
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


class UpperAgent(Agent[AgentState]):
    signal_routes = {"text.upper": Upper}


def upper(text: str) -> dict[str, Any]:
    return {"type": "text.upper", "data": {"text": text}}


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

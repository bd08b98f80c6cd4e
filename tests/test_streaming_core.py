"""Streaming actions and cancellation in one process: Agent.stream, AgentPool.stream and
run_stream, Stream, Cancellation. No Celery involved.

Threads are coordinated with events; time passes on fake clocks.
"""

from __future__ import annotations

import gc
import logging
import threading
from collections.abc import Generator
from typing import Any, ClassVar

import pytest
from pydantic import BaseModel, Field

from celery_warmpool import (
    Action,
    ActionContext,
    ActionFailed,
    Agent,
    AgentPool,
    AgentReply,
    AgentState,
    BatchAction,
    CallTimeout,
    Cancellation,
    ConfigurationError,
    PoolCounters,
    PoolStatus,
    Result,
    Signal,
    Stream,
    StreamNotFinished,
    WarmPoolError,
    telemetry,
)
from celery_warmpool.core.cancellation import NEVER
from celery_warmpool.core.errors import StreamCancelled

from .core_agents import FakeClock, receiving
from .test_layout import CELERY_FAMILY, top_level_modules_after


class WriterState(AgentState):
    written: int = 0
    words: list[str] = Field(default_factory=list)


class Write(Action):
    """Yields ``count`` words; fails before word ``fail_at`` if given."""

    name = "write"

    class Params(BaseModel):
        count: int = 3
        fail_at: int | None = None

    def run(self, params: Any, context: ActionContext) -> Generator[Any, None, Any]:
        agent = context.agent
        words: list[str] = []
        try:
            for index in range(params.count):
                if index == params.fail_at:
                    raise RuntimeError("out of ink")
                words.append(f"word{index}")
                # Changed in place: must not reach the agent unless the stream succeeds.
                context.state.words.append(f"word{index}")
                yield words[-1]
        finally:
            agent.finally_ran += 1
        return {"written": context.state.written + len(words), "words": context.state.words}


class Summarize(Action):
    """Yields nothing JSON can carry after one good chunk."""

    name = "summarize"

    def run(self, params: Any, context: ActionContext) -> Generator[Any, None, Any]:
        yield {"ok": 1}
        yield {"bad": object()}
        return None


class Tally(Action):
    """Streams, then ends with a Result (a value for the caller, no state change)."""

    name = "tally"

    def run(self, params: Any, context: ActionContext) -> Generator[Any, None, Any]:
        yield 1
        yield 2
        return Result({"total": 3})


class Count(Action):
    """A plain (non-streaming) action."""

    name = "count"

    def run(self, params: Any, context: ActionContext) -> dict[str, Any]:
        return {"written": context.state.written + 1}


class WaitForCancel(Action):
    """Waits until its caller cancels; says whether it saw that."""

    name = "wait_for_cancel"

    def run(self, params: Any, context: ActionContext) -> Result:
        context.agent.started.set()
        return Result({"cancelled": context.cancellation.wait(10)})


class SeeCancel(Action):
    """Reports ``context.cancelled`` as it is when the action runs."""

    name = "see_cancel"

    def run(self, params: Any, context: ActionContext) -> Result:
        return Result({"cancelled": context.cancelled})


class Writer(Agent[WriterState]):
    signal_routes: ClassVar[dict[str, Any]] = {
        "write": Write, "summarize": Summarize, "tally": Tally, "count": Count,
        "wait_for_cancel": WaitForCancel, "see_cancel": SeeCancel,
    }
    teardowns: ClassVar[list[str]] = []

    def setup(self) -> None:
        self.finally_ran = 0
        self.started = threading.Event()

    def teardown(self) -> None:
        Writer.teardowns.append(self.id)


def write(count: int = 3, fail_at: int | None = None) -> Signal:
    return Signal.new("write", {"count": count, "fail_at": fail_at})


@pytest.fixture
def pool() -> Generator[AgentPool[Writer], None, None]:
    with AgentPool(Writer, name="writers", size=1) as started:
        yield started


@pytest.fixture
def agent() -> Writer:
    built = Writer()
    built.setup()
    return built


def only_agent(pool: AgentPool[Writer]) -> Writer:
    with pool.agent(timeout=1) as agent:
        return agent


def counters(pool: AgentPool[Any], *names: str) -> dict[str, int]:
    numbers = pool.status().counters
    return {name: getattr(numbers, name) for name in names}


STREAM_COUNTERS = ("streams_started", "streams_finished", "streams_cancelled", "chunks",
                   "calls", "call_failures")


# -- streaming actions -------------------------------------------------------------------


def test_a_generator_run_makes_an_action_stream() -> None:
    assert (Write.streams, Tally.streams, Count.streams, BatchAction.streams) == (
        True, True, False, False)


def test_agent_stream_yields_chunks_in_order_then_merges_state(agent: Writer) -> None:
    chunks = agent.stream(write(4))
    received = []
    while True:
        try:
            received.append(next(chunks))
        except StopIteration as stop:
            reply = stop.value
            break

    assert received == ["word0", "word1", "word2", "word3"]
    assert isinstance(reply, AgentReply)
    assert reply.result == {"written": 4, "words": ["word0", "word1", "word2", "word3"]}
    assert agent.state.written == 4
    assert agent.finally_ran == 1


def test_agent_stream_validates_before_anything_runs(agent: Writer) -> None:
    with pytest.raises(WarmPoolError, match="count"):
        agent.stream(Signal.new("write", {"count": "many"}))
    assert agent.finally_ran == 0


def test_a_stream_that_fails_after_three_chunks_leaves_state_unchanged(
        pool: AgentPool[Writer]) -> None:
    received = []
    with pool.stream(write(5, fail_at=3)) as stream, pytest.raises(ActionFailed) as failed:
        for chunk in stream:
            received.append(chunk)

    assert received == ["word0", "word1", "word2"]
    assert failed.value.cause == "RuntimeError: out of ink"
    agent = only_agent(pool)
    assert (agent.state.written, agent.state.words, agent.finally_ran) == (0, [], 1)
    assert counters(pool, *STREAM_COUNTERS) == {
        "streams_started": 1, "streams_finished": 0, "streams_cancelled": 0, "chunks": 3,
        "calls": 1, "call_failures": 1}


def test_a_chunk_json_cannot_carry_fails_the_call(agent: Writer) -> None:
    chunks = agent.stream(Signal.new("summarize"))

    assert next(chunks) == {"ok": 1}
    with pytest.raises(ActionFailed, match=r"chunk\[1\]\.bad is a object"):
        next(chunks)


def test_a_stream_may_end_with_a_result(agent: Writer) -> None:
    reply = agent.handle(Signal.new("tally"))

    assert (reply.result, reply.state) == ({"total": 3}, {"written": 0, "words": []})


def test_handle_of_a_streaming_action_returns_its_final_reply(agent: Writer) -> None:
    reply = agent.handle(write(2))

    assert reply.result == {"written": 2, "words": ["word0", "word1"]}
    assert (agent.state.written, agent.finally_ran) == (2, 1)


def test_pool_call_of_a_streaming_action_returns_its_final_reply(
        pool: AgentPool[Writer]) -> None:
    reply = pool.call(write(2))

    assert reply.state == {"written": 2, "words": ["word0", "word1"]}


def test_closing_an_agent_stream_runs_the_actions_finally_and_keeps_state(
        agent: Writer) -> None:
    chunks = agent.stream(write(5))
    assert [next(chunks), next(chunks)] == ["word0", "word1"]

    chunks.close()

    assert (agent.finally_ran, agent.state.written, agent.state.words) == (1, 0, [])


def test_every_chunk_is_told_to_telemetry(agent: Writer) -> None:
    with receiving(telemetry.stream_chunk) as chunks, \
            receiving(telemetry.call_start) as started, \
            receiving(telemetry.call_stop) as stopped:
        agent.handle(write(3))

    assert [(call["index"], call["chunk"], call["sender"]) for call in chunks.calls] == [
        (0, "word0", agent), (1, "word1", agent), (2, "word2", agent)]
    assert (len(started.calls), len(stopped.calls)) == (1, 1)


def test_a_failing_stream_tells_call_exception(agent: Writer) -> None:
    with receiving(telemetry.call_exception) as failed, \
            receiving(telemetry.call_stop) as stopped, pytest.raises(ActionFailed):
        agent.handle(write(3, fail_at=1))

    assert [type(call["exception"]) for call in failed.calls] == [RuntimeError]
    assert stopped.calls == []


@pytest.mark.parametrize("method", ["run", "run_batch"])
def test_a_batch_action_that_streams_is_refused_at_definition(method: str) -> None:
    def generator(self: Any, params: Any, context: Any) -> Generator[Any, None, None]:
        yield 1

    with pytest.raises(ConfigurationError, match="cannot stream") as refused:
        type("Embed", (BatchAction,), {method: generator})

    assert refused.value.field == method


# -- the local pool's streams -------------------------------------------------------------


def test_pool_stream_reads_chunks_then_the_reply(pool: AgentPool[Writer]) -> None:
    with pool.stream(write(3), timeout=1) as stream:
        assert isinstance(stream, Stream)
        assert list(stream) == ["word0", "word1", "word2"]
        assert pool.checked_out == 0  # checked in as soon as the stream ended

    assert stream.reply.state == {"written": 3, "words": ["word0", "word1", "word2"]}
    assert counters(pool, *STREAM_COUNTERS) == {
        "streams_started": 1, "streams_finished": 1, "streams_cancelled": 0, "chunks": 3,
        "calls": 1, "call_failures": 0}


def test_the_reply_is_refused_until_the_stream_ends(pool: AgentPool[Writer]) -> None:
    stream = pool.stream(write(2))
    with pytest.raises(StreamNotFinished, match="read it to its end first"):
        _ = stream.reply
    next(stream)
    stream.close()

    with pytest.raises(StreamNotFinished, match="closed or failed before its end"):
        _ = stream.reply
    assert list(stream) == []


def test_break_and_close_stops_the_generator_and_the_agent_serves_again(
        pool: AgentPool[Writer]) -> None:
    with pool.stream(write(10)) as stream:
        for chunk in stream:
            if chunk == "word1":
                break
        assert pool.checked_out == 1

    agent = only_agent(pool)
    assert (agent.finally_ran, agent.broken, pool.checked_out) == (1, None, 0)
    reply = pool.call(Signal.new("count"))
    assert (reply.agent_id, reply.state) == (agent.id, {"written": 1, "words": []})
    assert counters(pool, "streams_cancelled", "replacements", "chunks") == {
        "streams_cancelled": 1, "replacements": 0, "chunks": 2}


def test_a_stream_dropped_after_break_is_checked_in_by_garbage_collection(
        pool: AgentPool[Writer]) -> None:
    stream = pool.stream(write(10))
    for _chunk in stream:
        break
    del stream
    gc.collect()

    assert pool.checked_out == 0
    assert only_agent(pool).finally_ran == 1


def test_a_stream_closed_twice_is_checked_in_once(pool: AgentPool[Writer]) -> None:
    stream = pool.stream(write(2))
    stream.close()
    stream.close()
    list(stream)

    assert counters(pool, "checkouts", "checkins") == {"checkouts": 1, "checkins": 1}


def test_call_timeout_closes_a_local_stream_and_replaces_its_agent() -> None:
    clock = FakeClock()
    with AgentPool(Writer, name="writers", size=1, clock=clock) as pool:
        first = only_agent(pool)
        received = []
        with pool.stream(write(5), call_timeout=1.0) as stream, \
                pytest.raises(CallTimeout) as timed_out:
            for chunk in stream:
                received.append(chunk)
                clock.advance(0.6)

        assert received == ["word0", "word1"]
        assert timed_out.value.timeout == 1.0
        assert first.finally_ran == 1
        assert first.id in Writer.teardowns
        assert counters(pool, "replacements", "call_failures", "streams_finished") == {
            "replacements": 1, "call_failures": 1, "streams_finished": 0}
        replacement = pool.call(Signal.new("count"), timeout=10)
        assert replacement.agent_id != first.id


def test_the_local_stream_needs_no_celery() -> None:
    loaded = top_level_modules_after(
        "from typing import Any\n"
        "from celery_warmpool.core import Action, Agent, AgentPool, Signal\n"
        "class Count(Action):\n"
        "    def run(self, params: Any, context: Any) -> Any:\n"
        "        yield from range(3)\n"
        "        return None\n"
        "class Counter(Agent[Any]):\n"
        "    signal_routes = {'count': Count}\n"
        "with AgentPool(Counter, size=1) as pool, pool.stream(Signal.new('count')) as s:\n"
        "    assert list(s) == [0, 1, 2], 'chunks'\n")

    assert loaded & CELERY_FAMILY == set()
    assert "celery_warmpool" in loaded


# -- run_stream: the worker's way ----------------------------------------------------------


def test_run_stream_emits_every_chunk_in_order(pool: AgentPool[Writer]) -> None:
    emitted: list[Any] = []
    with pool.agent() as agent:
        reply = pool.work.run_stream(agent, write(3), emitted.append)

    assert emitted == ["word0", "word1", "word2"]
    assert reply.result == {"written": 3, "words": emitted}


def test_a_reader_gone_closes_the_generator_and_the_agent_stays_healthy(
        pool: AgentPool[Writer]) -> None:
    emitted: list[Any] = []

    def emit(chunk: Any) -> None:
        if len(emitted) == 2:
            raise StreamCancelled("nobody reads")
        emitted.append(chunk)

    with pool.agent() as agent, pytest.raises(StreamCancelled):
        pool.work.run_stream(agent, write(10), emit)

    assert emitted == ["word0", "word1"]
    assert (agent.finally_ran, agent.broken, agent.state.written) == (1, None, 0)
    assert only_agent(pool) is agent
    assert counters(pool, *STREAM_COUNTERS, "replacements") == {
        "streams_started": 1, "streams_finished": 0, "streams_cancelled": 1, "chunks": 3,
        "calls": 0, "call_failures": 0, "replacements": 0}


def test_an_emit_that_fails_fails_the_stream_and_closes_the_generator(
        pool: AgentPool[Writer]) -> None:
    def emit(chunk: Any) -> None:
        raise ConnectionError("result store gone")

    with pool.agent() as agent, pytest.raises(ConnectionError):
        pool.work.run_stream(agent, write(3), emit)

    assert (agent.finally_ran, agent.state.written) == (1, 0)
    assert counters(pool, *STREAM_COUNTERS) == {
        "streams_started": 1, "streams_finished": 0, "streams_cancelled": 0, "chunks": 1,
        "calls": 1, "call_failures": 1}


def test_run_stream_stops_when_its_cancellation_is_cancelled(
        pool: AgentPool[Writer]) -> None:
    cancellation = Cancellation()
    emitted: list[Any] = []

    def emit(chunk: Any) -> None:
        emitted.append(chunk)
        if len(emitted) == 2:
            cancellation.cancel()

    with pool.agent() as agent, pytest.raises(StreamCancelled, match="by its caller"):
        pool.work.run_stream(agent, write(10), emit, cancellation)

    assert (emitted, agent.finally_ran) == (["word0", "word1"], 1)


def test_run_stream_of_a_cancelled_call_runs_nothing(pool: AgentPool[Writer]) -> None:
    cancellation = Cancellation()
    cancellation.cancel()

    with pool.agent() as agent, pytest.raises(StreamCancelled, match="before it started"):
        pool.work.run_stream(agent, write(3), [].append, cancellation)

    assert agent.finally_ran == 0
    assert counters(pool, "streams_started", "streams_cancelled") == {
        "streams_started": 1, "streams_cancelled": 1}


def test_run_stream_of_a_plain_action_is_a_call_without_chunks(
        pool: AgentPool[Writer]) -> None:
    emitted: list[Any] = []
    with pool.agent() as agent:
        reply = pool.work.run_stream(agent, Signal.new("count"), emitted.append)

    assert (emitted, reply.result) == ([], {"written": 1})


# -- cancellation -------------------------------------------------------------------------


def test_an_action_sees_a_cancellation_from_another_thread(agent: Writer) -> None:
    cancellation = Cancellation()
    replies: list[AgentReply] = []
    worker = threading.Thread(target=lambda: replies.append(
        agent.handle(Signal.new("wait_for_cancel"), cancellation)))
    worker.start()
    assert agent.started.wait(10)

    cancellation.cancel()
    worker.join(10)

    assert [reply.result for reply in replies] == [{"cancelled": True}]


def test_an_action_sees_a_cancellation_through_its_probe(agent: Writer) -> None:
    reply = agent.handle(Signal.new("see_cancel"), Cancellation(probe=lambda: True))

    assert reply.result == {"cancelled": True}
    assert agent.handle(Signal.new("see_cancel")).result == {"cancelled": False}


def test_a_probe_is_asked_at_most_once_per_interval() -> None:
    clock, answers, asked = FakeClock(), [False, False, True], []

    def probe() -> bool:
        asked.append(clock.now)
        return answers[len(asked) - 1]

    cancellation = Cancellation(probe, probe_interval=0.25, clock=clock)
    seen = [cancellation.cancelled, cancellation.cancelled]
    clock.advance(0.125)
    seen.append(cancellation.cancelled)
    clock.advance(0.125)
    seen.append(cancellation.cancelled)
    clock.advance(0.25)
    seen += [cancellation.cancelled, cancellation.cancelled]

    assert seen == [False, False, False, False, True, True]
    assert asked == [1000.0, 1000.25, 1000.5]


def test_a_failing_probe_is_logged_once_and_means_not_cancelled(
        caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()

    def probe() -> bool:
        raise ConnectionError("redis down")

    cancellation = Cancellation(probe, clock=clock)
    with caplog.at_level(logging.ERROR, logger="celery_warmpool.core.cancellation"):
        seen = [cancellation.cancelled]
        clock.advance(1)
        seen.append(cancellation.cancelled)

    assert seen == [False, False]
    assert [record.exc_info[0] for record in caplog.records
            if record.exc_info is not None] == [ConnectionError]


def test_never_cannot_be_cancelled() -> None:
    with pytest.raises(WarmPoolError, match="own Cancellation"):
        NEVER.cancel()
    assert NEVER.cancelled is False


# -- counters -----------------------------------------------------------------------------


def test_stream_counters_add_up_over_processes() -> None:
    one = PoolCounters(streams_started=3, streams_finished=1, streams_cancelled=1, chunks=9)
    other = PoolCounters(streams_started=2, streams_finished=2, chunks=4)
    parts = [PoolStatus(pool="p", state="ready", size=1, max_overflow=0, available=1,
                        overflow=0, checked_out=0, waiting=0, counters=counts)
             for counts in (one, other)]

    total = PoolStatus.combine("p", parts).counters

    assert (total.streams_started, total.streams_finished, total.streams_cancelled,
            total.chunks) == (5, 3, 1, 13)

"""AgentWork: running work on agents a pool lends. It imports no Celery.

The pool lends agents (checkout, checkin, overflow, replacement); this module is what is
done with a lent agent: a call, a transaction, a batch, a stream, each within its time
bound, each counted in the pool's counters (its status reads them there). It knows the
pool only as a :class:`~.lease.Lender`. The pool's ``call``, ``transaction`` and
``stream`` are its public faces; a worker that checks agents out itself runs its work
with ``pool.work.run_signals``, ``run_batch``, ``run_stream`` and ``overran``.

Python cannot stop a thread, so work that overruns its ``call_timeout`` is abandoned:
the caller gets :class:`CallTimeout`, the agent leaves the pool and a replacement is
built, and the agent is torn down once its work ends. A stream is run in its reader's
thread and stopped between chunks instead: its generator is closed at a ``yield``.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterable, Mapping
from typing import Any, Generic, TypeVar

from .action import BatchAction
from .agent import Agent
from .arguments import pool_model
from .batching import Batcher
from .cancellation import NEVER, Cancellation
from .errors import CallTimeout, StreamCancelled, UnknownSignal, WarmPoolError
from .lease import Lease, Lender
from .reply import AgentReply
from .runner import Overran, TimeboxedRunner
from .signal import Signal
from .stream import Stream, drain

__all__ = ["AgentWork"]

AgentT = TypeVar("AgentT", bound=Agent[Any])
R = TypeVar("R")


class AgentWork(Generic[AgentT]):
    """Runs calls, transactions, batches and streams on the agents ``lender`` lends.

    Arguments:
        lender: lends the agents, replaces those given up, and holds the counters.
        clock: the clock a local stream's ``call_timeout`` is measured on (the pool's).
        max_models: the pool's (its calls then each name a model), or ``None``.

    Every kind of work takes a ``model``: the model id a call is for, which a pool with
    ``max_models`` requires and any other refuses (:class:`InvalidArgument`). An agent
    checked out by its caller holds it (``lender.checkout(model=...)``).
    """

    def __init__(self, lender: Lender[AgentT], clock: Callable[[], float],
                 max_models: int | None = None) -> None:
        self.lender = lender
        self._clock = clock
        self._max_models = max_models
        self._runner = TimeboxedRunner(lender.name)
        self._batchers: dict[int, Batcher[AgentT]] = {}

    # -- calls -------------------------------------------------------------------------

    def call(self, signal: Signal | Mapping[str, Any], *, timeout: float | None = None,
             call_timeout: float | None = None, model: str | None = None) -> AgentReply:
        """Handle one signal on a checked-out agent (see :meth:`.pool.AgentPool.call`)."""
        model = pool_model(self.lender.name, self._max_models, model)
        event = Signal.parse(signal)
        batcher = self.batcher_for(event)
        if batcher is not None:
            return batcher.call(event, timeout, call_timeout, model)
        return self._run(lambda agent: self.run_signals(agent, [event], model=model)[0],
                         event.type, timeout, call_timeout, model)

    def transaction(self, signals: Iterable[Signal | Mapping[str, Any]], *,
                    timeout: float | None = None, call_timeout: float | None = None,
                    model: str | None = None) -> list[AgentReply]:
        """Handle ``signals`` in order on one agent, all or nothing (see the pool's)."""
        model = pool_model(self.lender.name, self._max_models, model)
        events = [Signal.parse(signal) for signal in signals]
        label = ",".join(event.type for event in events)
        return self._run(
            lambda agent: self.run_signals(agent, events, transaction=True, model=model),
            label, timeout, call_timeout, model)

    def run_signals(self, agent: AgentT, events: list[Signal], *, transaction: bool = False,
                    cancellation: Cancellation = NEVER,
                    model: str | None = None) -> list[AgentReply]:
        """Handle ``events`` in order on ``agent`` (checked out by the caller), counted.

        With ``transaction``, a failure puts the agent's state back as it was before the
        first event, then raises. The actions see ``cancellation`` as
        ``context.cancelled``, and ``model`` as ``context.model_id`` and
        ``context.model``.
        """
        model = pool_model(self.lender.name, self._max_models, model)
        before = agent.state
        try:
            return [self._count_call(agent, event, cancellation, model) for event in events]
        except BaseException:
            if transaction:
                agent.state = before
            raise

    def run_batch(self, agent: AgentT, events: list[Signal],
                  model: str | None = None) -> list[AgentReply | WarmPoolError]:
        """Handle ``events`` (routed to one batch action, all for ``model``) as one batch
        on ``agent``, counted.

        ``agent`` is checked out by the caller. Returns one outcome per event, in order.
        """
        outcomes = agent.handle_batch(events, pool_model(self.lender.name, self._max_models,
                                                         model))
        failed = sum(not isinstance(outcome, AgentReply) for outcome in outcomes)
        self.lender.counters.add(calls=len(outcomes), call_failures=failed, batches=1,
                                 batched=len(outcomes))
        return outcomes

    def run_batch_within(self, agent: AgentT, events: list[Signal], label: str,
                         call_timeout: float | None,
                         model: str | None = None) -> list[AgentReply | WarmPoolError]:
        """:meth:`run_batch` within ``call_timeout`` (see :meth:`run_timeboxed`)."""
        return self.run_timeboxed(agent, lambda: self.run_batch(agent, events, model), label,
                                  call_timeout)

    def run_timeboxed(self, agent: AgentT, work: Callable[[], R], label: str,
                      call_timeout: float | None) -> R:
        """Run ``work`` (on ``agent``, checked out by the caller) within ``call_timeout``.

        Raises:
            CallTimeout: it overran; ``agent`` was abandoned (see :meth:`overran`) and must
                not be checked in.
        """
        if call_timeout is None:
            return work()
        try:
            return self._runner.run(work, call_timeout,
                                    on_abandon=lambda: self.lender.finish_abandoned(agent))
        except Overran:
            raise self.overran(agent, label, call_timeout) from None

    def overran(self, agent: AgentT, label: str, call_timeout: float) -> CallTimeout:
        """Give up on ``agent``, whose work on ``label`` outlasted ``call_timeout``.

        The agent leaves the pool at once and a replacement is built; whoever runs the
        overrunning work calls the pool's ``finish_abandoned`` when it ends. Returns the
        error for the caller.
        """
        self.lender.abandon(agent, f"call_timeout={call_timeout}s exceeded")
        return CallTimeout(
            f"pool {self.lender.name!r}: {label} took longer than call_timeout={call_timeout}s; "
            f"agent {agent.id} is being replaced", label, call_timeout)

    def _run(self, work: Callable[[AgentT], R], label: str, timeout: float | None,
             call_timeout: float | None, model: str | None) -> R:
        agent = self.lender.checkout(timeout=timeout, model=model)
        with self.lender.lent(agent) as lease:
            try:
                return self.run_timeboxed(agent, lambda: work(agent), label, call_timeout)
            except CallTimeout:
                lease.abandoned = True
                raise

    def _count_call(self, agent: AgentT, signal: Signal, cancellation: Cancellation,
                    model: str | None) -> AgentReply:
        try:
            # Without a model, as before models: an agent class may override handle().
            reply = (agent.handle(signal, cancellation) if model is None
                     else agent.handle(signal, cancellation, model))
        except Exception:
            self.lender.counters.count_call(failed=True)
            raise
        self.lender.counters.count_call()
        return reply

    def batcher_for(self, event: Signal) -> Batcher[AgentT] | None:
        """The batcher calls of ``event`` join, if its action is a batch action (known
        once the pool built an agent); ``None`` otherwise."""
        agent_class = self.lender.agent_class
        if agent_class is None:
            return None
        try:
            action = agent_class.route(event.type)
        except UnknownSignal:
            return None  # the normal path raises it, with the agent's routes
        if not isinstance(action, BatchAction):
            return None
        # setdefault is atomic: two callers racing for a new action get one batcher.
        batcher = self._batchers.get(id(action))
        if batcher is None:
            batcher = self._batchers.setdefault(
                id(action), Batcher(self.lender, action, self.run_batch_within))
        return batcher

    # -- streams -----------------------------------------------------------------------

    def stream(self, signal: Signal | Mapping[str, Any], *, timeout: float | None = None,
               call_timeout: float | None = None, model: str | None = None) -> Stream:
        """Check an agent out and stream ``signal`` on it (see :meth:`AgentPool.stream`)."""
        model = pool_model(self.lender.name, self._max_models, model)
        event = Signal.parse(signal)
        agent = self.lender.checkout(timeout=timeout, model=model)
        lease = Lease()
        chunks = self._counted_stream(agent, event, NEVER, model)
        if call_timeout is not None:
            chunks = _watched(chunks, self._deadline(agent, event, lease, call_timeout))

        def end() -> None:
            # After the generator is closed: an agent given up is torn down, not lent again.
            if lease.abandoned:
                self.lender.finish_abandoned(agent)
            else:
                self.lender.checkin(agent)

        return Stream(chunks, end)

    def run_stream(self, agent: AgentT, event: Signal, emit: Callable[[Any], None],
                   cancellation: Cancellation = NEVER, model: str | None = None) -> AgentReply:
        """Stream ``event`` on ``agent`` (checked out by the caller, holding ``model``),
        counted.

        ``emit`` gets each chunk in order and may block (the reader is behind). A
        non-streaming action runs as a call with no chunks.

        Raises:
            StreamCancelled: ``emit`` raised it (the reader went away) or ``cancellation``
                was cancelled: the action's generator was closed at its ``yield``, the
                agent is healthy and its state unchanged.
            InvalidSignal, UnknownSignal, ActionFailed: as :meth:`Agent.handle`.
        """
        model = pool_model(self.lender.name, self._max_models, model)
        if cancellation.cancelled:
            self.lender.counters.add(streams_started=1, streams_cancelled=1)
            raise StreamCancelled(f"stream of {event.type!r} cancelled before it started")

        def deliver(chunk: Any) -> None:
            emit(chunk)
            if cancellation.cancelled:
                raise StreamCancelled(f"stream of {event.type!r} cancelled by its caller")

        return drain(_watched(self._counted_stream(agent, event, cancellation, model),
                              deliver))

    def _deadline(self, agent: AgentT, event: Signal, lease: Lease,
                  call_timeout: float) -> Callable[[Any], None]:
        """A check, run as each chunk comes, that a local stream is within its bound."""
        deadline = self._clock() + call_timeout

        def check(chunk: Any) -> None:
            if self._clock() > deadline:
                # The work is stopped at a yield, but the caller was promised the bound:
                # the agent goes as an overrunning one does (torn down once closed).
                lease.abandoned = True
                raise self.overran(agent, event.type, call_timeout)

        return check

    def _counted_stream(self, agent: AgentT, event: Signal, cancellation: Cancellation,
                        model: str | None) -> Generator[Any, None, AgentReply]:
        """``agent.stream(event)``, counted: closing it counts the stream as cancelled."""
        self.lender.counters.add(streams_started=1)
        produced = 0
        try:
            chunks = agent.stream(event, cancellation, model)
            while True:
                try:
                    chunk = next(chunks)
                except StopIteration as stop:
                    reply: AgentReply = stop.value
                    break
                produced += 1
                try:
                    yield chunk
                except BaseException:
                    chunks.close()
                    raise
        except (GeneratorExit, StreamCancelled):
            self.lender.counters.add(chunks=produced, streams_cancelled=1)
            raise
        except BaseException:
            self.lender.counters.add(chunks=produced, calls=1, call_failures=1)
            raise
        self.lender.counters.add(chunks=produced, calls=1, streams_finished=1)
        return reply


def _watched(chunks: Generator[Any, None, AgentReply],
             check: Callable[[Any], None]) -> Generator[Any, None, AgentReply]:
    """``chunks``, each passed to ``check`` before it goes on.

    What ``check`` raises is thrown into ``chunks`` at its ``yield`` (so a counted
    stream records why it ended, and the action's generator is closed there), then
    raised here.
    """
    try:
        while True:
            try:
                chunk = next(chunks)
            except StopIteration as stop:
                reply: AgentReply = stop.value
                return reply
            try:
                check(chunk)
            except BaseException as exc:
                chunks.throw(exc)
                raise  # chunks ended with the error it was thrown (a counted stream does)
            yield chunk
    finally:
        chunks.close()  # closed early: GeneratorExit at the action's yield

"""Batches in a worker: a pool's batch signals are grouped before they reach a process.

A pool whose agent class routes signals to a :class:`BatchAction` has its messages pass
through :class:`PoolBatches` in the worker's main process. A call or cast whose one signal
routes to a batch action waits in that action's buffer; any other message goes on to
Celery's own task handler. A buffer is sent to the execution pool as one job when it
holds ``max_batch_size`` messages, or once ``batch_wait_timeout`` has passed since its first
came and a process is free to run it: while every process of the pool is busy with a
batch, the buffer keeps filling, so that a loaded node runs fewer, fuller batches instead
of queueing small ones. One prefork child (or one thread) runs the whole batch on one
agent, stores every caller's reply or error under that caller's own task id, and only then
are the messages acknowledged.

- A signal whose deadline (the caller's ``timeout``) passes before its batch starts is
  answered with :class:`CheckoutTimeout` and never runs.
- A process that dies mid-batch loses no message: each goes back to the queue (a batch
  action reads state and changes none, so running it again is safe), up to the pool's
  ``max_redeliveries``; past that its caller gets :class:`AgentLost`, and a cast is
  dead-lettered.
- Each message of a batch is marked taken as the batch starts (one round trip for the
  batch, see :mod:`.claims`): a copy of a call or cast another copy of which was taken
  is dropped from the batch.
- In a pool with ``max_models`` a batch holds the signals of one model only: each model
  has its buffer, and its batch runs on an agent holding that model.
- Batched calls are not Celery requests of the worker: ``inspect active`` does not list
  them, and no task events are sent for them.
"""

from __future__ import annotations

import functools
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from billiard.exceptions import WorkerLostError
from celery import states
from celery.app.task import Context
from celery.worker import state as worker_state

from ..core.action import BatchAction
from ..core.batching import BatchWindow
from ..core.errors import (
    AgentLost,
    CallTimeout,
    CheckoutTimeout,
    HandedBack,
    WarmPoolError,
    WorkerFailed,
)
from ..core.signal import Signal
from ..wire.message import CallMessage, kind_of
from ..wire.outages import Outages, retry
from ..wire.scoped import scoped
from .claims import CallClaims
from .errands import Errands
from .watchdog import Watchdog

if TYPE_CHECKING:
    from ..core.spec import PoolSpec
    from .runtime import WorkerRuntime

__all__ = ["PoolBatches", "run_batch_job"]

logger = logging.getLogger(__name__)

#: Seconds the main process tries to store a batched caller's error while the result
#: store is away (its caller waits about as long at most: timeout + call_timeout + 2 s).
ANSWER_WITHIN = 30.0
#: The worker's runtime per app, for the batch jobs run in its processes (set in the main
#: process before the fork, so prefork children have it too).
RUNTIMES: dict[str, WorkerRuntime] = {}


class _Buffer:
    """The messages waiting for one batch action's next batch."""

    def __init__(self, action: BatchAction) -> None:
        self.action = action
        self.window = BatchWindow(action)
        self.messages: list[tuple[Any, dict[str, Any]]] = []
        self.timer: Any = None
        #: Its wait is over, but every process was busy: it goes when one is free.
        self.due = False


class Attempts:
    """How often each batched message was lost with its process, for a while.

    A message delivered again may go to another node and never come back here: an entry
    is forgotten after ``kept`` seconds, and at most ``most`` are kept (the oldest go
    first), so the record does not grow with every message a node ever lost.
    """

    def __init__(self, kept: float = 3600.0, most: int = 10_000) -> None:
        self.kept = kept
        self.most = most
        self._seen: OrderedDict[str, tuple[int, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._seen)

    def count(self, task_id: str) -> int:
        """Count one more loss of ``task_id``; return how many there were."""
        now = time.monotonic()
        lost, _ = self._seen.pop(task_id, (0, now))
        self._seen[task_id] = (lost + 1, now)
        while self._seen:
            oldest, (_, at) = next(iter(self._seen.items()))
            if len(self._seen) <= self.most and at > now - self.kept:
                break
            del self._seen[oldest]
        return lost + 1

    def forget(self, task_id: str) -> None:
        """``task_id`` ended here: forget it."""
        self._seen.pop(task_id, None)


class _Job:
    """A batch handed to the execution pool, until it ends."""

    def __init__(self, messages: list[tuple[Any, dict[str, Any]]]) -> None:
        self.messages = messages
        self.accepted = False
        self.done = False


class PoolBatches:
    """Groups one pool queue's batch messages before they reach a process."""

    def __init__(self, runtime: WorkerRuntime, spec: PoolSpec,
                 capacity: Callable[[], int]) -> None:
        self.runtime = runtime
        self.spec = spec
        #: How many batches of the pool the node runs at once (its processes or agents).
        self.capacity = capacity
        self._buffers: dict[str, _Buffer] = {}
        self._jobs: dict[int, _Job] = {}
        self._attempts = Attempts()  # deliveries of a task id lost with a child
        self._consumer: Any = None
        self._handler: Any = None
        self._channel: Any = None
        RUNTIMES[runtime.app.main or ""] = runtime

    def start(self, consumer: Any, channel: Any, handler: Any) -> None:
        """Take messages from ``channel``; the others go to Celery's ``handler``."""
        self._consumer, self._channel, self._handler = consumer, channel, handler
        self._buffers = {}

    def stop(self, discards_unaccepted: bool) -> None:
        """Stop batching (a reconnection or a shutdown); buffered messages stay unacked.

        The broker takes those back when the channel closes (or they are put back after a
        reconnection); batches the execution pool will never run (prefork drops work not
        yet given to a child) are forgotten the same way.
        """
        for buffer in self._buffers.values():
            if buffer.timer is not None:
                buffer.timer.cancel()
        self._buffers = {}
        if discards_unaccepted:
            self._jobs = {key: job for key, job in self._jobs.items() if job.accepted}

    def held(self) -> list[tuple[Any, Any]]:
        """``(channel, consumer tag)`` of every message buffered or in a running batch."""
        messages = [message for buffer in self._buffers.values()
                    for message, _ in buffer.messages]
        messages += [message for job in self._jobs.values() for message, _ in job.messages]
        return [(message.channel, message.delivery_info.get("consumer_tag"))
                for message in messages]

    def running(self) -> set[tuple[int, Any]]:
        """``(id(channel), delivery tag)`` of the messages a process is working on."""
        return {(id(message.channel), message.delivery_tag) for job in self._jobs.values()
                if job.accepted for message, _ in job.messages}

    # -- taking messages -------------------------------------------------------------------

    def on_message(self, message: Any) -> None:
        """A message of the pool's queue: buffer it for a batch, or hand it to Celery."""
        found = self._batchable(message)
        if found is None:
            self._handler(message)
            return
        action, item = found
        key = f"{action.name} {item['model']}"  # a batch per action and model
        buffer = self._buffers.get(key)
        if buffer is None:
            buffer = self._buffers[key] = _Buffer(action)
        buffer.messages.append((message, item))
        if buffer.window.add():
            self._flush(buffer)
        elif buffer.timer is None and not buffer.due:
            buffer.timer = self._consumer.timer.call_after(
                buffer.window.remaining(), self._when_due, (buffer,))

    def _when_due(self, buffer: _Buffer) -> None:
        """The buffer's wait is over: run it now if a process is free, else when one is."""
        buffer.timer = None
        if len(self._jobs) < self.capacity():
            self._flush(buffer)
        else:
            buffer.due = True

    def _flush_due(self) -> None:
        """A process came free: run the buffers whose wait is over."""
        for buffer in list(self._buffers.values()):
            if buffer.due and buffer.messages and len(self._jobs) < self.capacity():
                self._flush(buffer)

    def _batchable(self, message: Any) -> tuple[BatchAction, dict[str, Any]] | None:
        """The batch action and job item of a one-signal call or cast to one, else None."""
        kind = kind_of(message.headers.get("task"))
        if kind is None:
            return None
        try:
            args, _, _ = message.decode()
            call = CallMessage.from_args(args, kind)
            if call.transaction or call.stream or len(call.signals) != 1:
                return None
            action = self.spec.agent.route(call.signals[0]["type"])
        except Exception:  # anything odd: Celery's handler gives the proper error
            return None
        if not isinstance(action, BatchAction):
            return None
        properties = message.properties or {}
        return action, {
            "id": message.headers["id"], "kind": kind, "pool": self.spec.name,
            "signal": dict(call.signals[0]),
            "deadline": call.deadline, "call_timeout": call.call_timeout,
            "copy": call.copy if kind == "cast" else None, "model": call.model,
            # The message as sent (its reply channel says where the caller waits).
            "args": list(call.to_args()),
            "reply_to": properties.get("reply_to"),
            "correlation_id": properties.get("correlation_id") or message.headers["id"],
            "retries": message.headers.get("retries") or 0}

    # -- running batches ------------------------------------------------------------------

    def _flush(self, buffer: _Buffer) -> None:
        if buffer.timer is not None:
            buffer.timer.cancel()
            buffer.timer = None
        buffer.due = False
        messages, buffer.messages = buffer.messages, []
        logger.debug("pool %r: a batch of %d %r signals, %.1f ms after its first",
                     self.spec.name, len(messages), buffer.action.name,
                     (buffer.window.wait - buffer.window.remaining()) * 1000)
        buffer.window.reset()
        messages = [(message, item) for message, item in messages if self._in_time(message, item)]
        if not messages:
            return
        job = _Job(messages)
        self._jobs[id(job)] = job
        self._consumer.pool.apply_async(
            run_batch_job, args=(self.runtime.app.main or "", self.spec.name,
                                 [item for _, item in messages]),
            accept_callback=lambda *args: setattr(job, "accepted", True),
            callback=lambda outcome: self._consumer.call_soon(self._finished, job, outcome),
            error_callback=lambda info: self._consumer.call_soon(self._lost, job, info))

    def _in_time(self, message: Any, item: dict[str, Any]) -> bool:
        """False (and the caller answered) for a revoked call or one past its deadline."""
        if item["id"] in worker_state.revoked:
            message.ack_log_error(logger, self._consumer.connection_errors)
            return False
        deadline = item["deadline"]
        if deadline is None or time.time() <= deadline:
            return True
        late = time.time() - deadline
        self._answer(item, CheckoutTimeout(
            f"pool {self.spec.name!r}: the call waited {late:.3f}s past its checkout timeout "
            "for its batch; it was not run", self.spec.name, late, self.spec.size,
            self.spec.max_overflow))
        message.ack_log_error(logger, self._consumer.connection_errors)
        return False

    def _finished(self, job: _Job, outcome: Any) -> None:
        """The job ended and stored every reply (event-loop thread): acknowledge."""
        if job.done:
            return
        job.done = True
        self._jobs.pop(id(job), None)
        if isinstance(outcome, BaseException):  # a threads pool hands errors over here
            self._lost(job, outcome)
            return
        if outcome == HANDED_BACK:
            for message, _ in job.messages:
                message.reject_log_error(logger, self._consumer.connection_errors,
                                         requeue=True)
            return
        for message, item in job.messages:
            self._attempts.forget(item["id"])
            message.ack_log_error(logger, self._consumer.connection_errors)
        self._flush_due()

    def _lost(self, job: _Job, info: Any) -> None:
        """The process running the batch died (or the job failed): deliver it again."""
        job.done = True
        self._jobs.pop(id(job), None)
        exc = getattr(getattr(info, "exception", info), "exc", getattr(info, "exception", info))
        for message, item in job.messages:
            if self._attempts.count(item["id"]) <= self.spec.max_redeliveries:
                message.reject_log_error(logger, self._consumer.connection_errors,
                                         requeue=True)
                continue
            self._attempts.forget(item["id"])
            lost = AgentLost(
                f"pool {self.spec.name!r}: the worker process running a batch of "
                f"{item['signal'].get('type')} on {self.runtime.node} died "
                f"{self.spec.max_redeliveries + 1} times ({type(exc).__name__}); the work may "
                "have run", self.spec.name, self.runtime.node, None,
                str(item["signal"].get("type")), True)
            self._answer(item, lost)
            message.ack_log_error(logger, self._consumer.connection_errors)
        if not isinstance(exc, WorkerLostError):
            logger.error("pool %r: a batch job failed: %r", self.spec.name, exc)
        self._flush_due()


    def _answer(self, item: dict[str, Any], error: WarmPoolError) -> None:
        """Store ``error`` as one batched caller's answer, as an errand: this runs on the
        worker's event loop, which must not wait for a result store that is away."""
        Errands.of_this_process().run(
            f"pool {self.spec.name!r}: the answer of {item['id']} ({type(error).__name__})",
            functools.partial(store, self.runtime, item, error),
            outages=Outages.of(self.runtime.app), within=ANSWER_WITHIN)


def store(runtime: WorkerRuntime, item: dict[str, Any], outcome: Any) -> None:
    """Store one batched caller's reply (or error) under its own task id."""
    store_all(runtime, [(item, outcome)])


def store_all(runtime: WorkerRuntime, outcomes: list[tuple[dict[str, Any], Any]]) -> None:
    """Store each batched caller's reply (or error) under its own task id, in one round
    trip where the result store can (Redis), and dead-letter the casts that failed.

    Raises:
        The result store's connection errors.
    """
    backend = scoped(runtime.app).results.backend
    entries = [_entry(item, outcome) for item, outcome in outcomes]
    if hasattr(backend, "store_many"):
        backend.store_many(entries)
    else:
        for task_id, result, state, request in entries:
            backend.store_result(task_id, result, state, request=request)
    for (item, _), (_, result, state, _) in zip(outcomes, entries, strict=True):
        if item["kind"] == "cast" and state == states.FAILURE:
            runtime.dead_letter(item["pool"], item["signal"], result, task_id=item["id"],
                                attempts=item["retries"] + 1, model=item.get("model"),
                                may_have_run=isinstance(result, AgentLost | CallTimeout))


def _entry(item: dict[str, Any], outcome: Any) -> tuple[str, Any, str, Context]:
    """``(task_id, result, state, request)`` of one batched caller's outcome."""
    request = Context(id=item["id"], reply_to=item["reply_to"], args=item.get("args"),
                      correlation_id=item["correlation_id"], retries=item["retries"])
    if isinstance(outcome, BaseException):
        # A batch that failed as a whole may have failed with anything: its callers get
        # a WarmPoolError all the same (the failure itself is logged by run_batch_job).
        return item["id"], WorkerFailed.wrapping(outcome, item["pool"]), states.FAILURE, request
    return item["id"], [outcome.to_wire()], states.SUCCESS, request


def run_batch_job(app: str, pool: str, items: list[dict[str, Any]]) -> int:
    """Run one batch in this process and store every caller's outcome; return how many.

    Never raises (a threads pool would swallow it): a failure of the batch as a whole is
    stored as every caller's error.
    """
    runtime = RUNTIMES[app]
    claims, backend = CallClaims(runtime), scoped(runtime.app).results.backend
    # Copies of work another copy of which was taken are dropped (see .claims).
    taken = claims.claim_all(backend, [
        (item["id"], item["deadline"], item.get("copy")) for item in items])
    mine = [item for item, ours in zip(items, taken, strict=True) if ours]
    try:
        outcomes = _run(runtime, pool, mine)
    except HandedBack:
        claims.release_all(backend, [item["id"] for item in mine])
        return HANDED_BACK  # nothing ran: the messages go back to the broker
    except Exception as exc:
        if not isinstance(exc, WarmPoolError):
            logger.exception("pool %r: a batch failed in the worker itself", pool)
        outcomes = [exc] * len(mine)
    answers = [(item, outcome) for item, outcome in zip(mine, outcomes, strict=True)
               if outcome is not _ANSWERED]
    try:
        # One round trip for every caller's reply; a result store that is away is waited
        # for as long as the callers wait.
        retry(functools.partial(store_all, runtime, answers), Outages.of(runtime.app),
              time.monotonic() + ANSWER_WITHIN)
    except Exception:
        logger.exception("pool %r: could not store the replies of %s", pool,
                         ", ".join(item["id"] for item, _ in answers))
    return len(items)


#: An item whose caller was answered already (its batch overran its call_timeout).
_ANSWERED: Any = object()
#: What a batch job returns when its pool handed it back (the node is draining).
HANDED_BACK = -1


def _run(runtime: WorkerRuntime, pool: str, items: list[dict[str, Any]]) -> list[Any]:
    """The outcome of each item: a reply, an error, or ``_ANSWERED``; in order."""
    agent_pool = runtime.local_pool(pool)
    outcomes: list[Any] = [None] * len(items)
    events: list[tuple[int, Signal]] = []
    for index, item in enumerate(items):
        try:
            events.append((index, Signal.parse(item["signal"])))
        except WarmPoolError as exc:
            outcomes[index] = exc
    deadlines = [items[index]["deadline"] for index, _ in events]
    timeout = None if None in deadlines else max(0.0, max(deadlines) - time.time())
    model = items[0].get("model")  # one model per batch (see PoolBatches.on_message)
    agent = agent_pool.checkout(timeout=timeout, model=model)
    live = _in_time(agent_pool, items, events, outcomes)
    if not live:
        agent_pool.checkin(agent)
        return outcomes
    bounds = [items[index]["call_timeout"] for index, _ in live
              if items[index]["call_timeout"] is not None]
    with agent_pool.lent(agent) as lease:
        results = _watched(runtime, agent_pool, agent, [items[index] for index, _ in live],
                           [event for _, event in live], min(bounds) if bounds else None,
                           model)
        lease.abandoned = results is None
    if results is None:  # it overran: its callers had their CallTimeout at the deadline
        agent_pool.finish_abandoned(agent)
        results = [_ANSWERED] * len(live)
    for (index, _), result in zip(live, results, strict=True):
        outcomes[index] = result
    return outcomes


def _in_time(agent_pool: Any, items: list[dict[str, Any]], events: list[tuple[int, Signal]],
             outcomes: list[Any]) -> list[tuple[int, Signal]]:
    """The events still in time; those past their deadline are answered in ``outcomes``."""
    now = time.time()
    live = []
    for index, event in events:
        deadline = items[index]["deadline"]
        if deadline is not None and deadline < now:
            outcomes[index] = CheckoutTimeout(
                f"pool {agent_pool.name!r}: no agent came free for the batch in time; the "
                "signal was not run", agent_pool.name, now - deadline, agent_pool.size,
                agent_pool.max_overflow)
        else:
            live.append((index, event))
    return live


def _watched(runtime: WorkerRuntime, agent_pool: Any, agent: Any, items: list[dict[str, Any]],
             events: list[Signal], bound: float | None,
             model: str | None) -> list[Any] | None:
    """Run the batch inline, the watchdog answering its callers if it outlasts ``bound``.

    Returns the outcomes, or ``None`` if it overran (the agent is abandoned).
    """
    if bound is None:
        return list(agent_pool.work.run_batch(agent, events, model))
    watchdog = Watchdog.of_this_process()

    def overran() -> None:
        error = agent_pool.work.overran(agent, f"a batch of {len(events)} signals", bound)
        for item in items:
            store(runtime, item, error)

    token = watchdog.watch(bound, overran)
    try:
        outcomes = list(agent_pool.work.run_batch(agent, events, model))
    finally:
        in_time = watchdog.done(token)
    return outcomes if in_time else None

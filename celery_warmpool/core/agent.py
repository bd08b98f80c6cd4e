"""Agents: long-lived, stateful workers that handle signals with actions."""

from __future__ import annotations

import copy
import os
import time
import uuid
from collections.abc import Generator, Mapping, Sequence
from typing import Any, ClassVar, Generic, TypeVar, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic_core import PydanticSerializationError

from . import telemetry
from .action import Action, ActionContext, BatchAction
from .cancellation import NEVER, Cancellation
from .errors import ActionFailed, ConfigurationError, InvalidSignal, WarmPoolError
from .merging import merged, working_state
from .models import ModelCache, check_model_hooks, device_for, model_in_use
from .reply import AgentReply
from .routing import Routes
from .signal import Signal
from .stream import drain
from .validation import describe, json_problem

__all__ = ["Agent", "AgentState", "resource"]

class AgentState(BaseModel):
    """A convenient base for agent state: resource fields may hold any object."""

    model_config = ConfigDict(arbitrary_types_allowed=True)


def resource(default: Any = None) -> Any:
    """Declare a state field that holds a resource (a client, a model).

    Resource fields are kept across :meth:`Agent.reset` and left out of replies and of
    everything else that goes over the wire.
    """
    return Field(default=default, exclude=True)


StateT = TypeVar("StateT", bound=BaseModel)


class Agent(Generic[StateT]):
    """A long-lived worker holding state and expensive resources.

    Subclass it with a ``State`` model and ``signal_routes``::

        class Counter(Agent[CounterState]):
            signal_routes = {"counter.increment": Increment}

    ``State`` is taken from the generic parameter unless set explicitly. Routes map a
    signal type, or a pattern where ``*`` matches one dot-separated segment and ``**``
    any number of them, to an :class:`Action` class or instance; exact types win over
    patterns, and more specific patterns over looser ones.

    Hooks: :meth:`setup` warms the agent up (load the model, open the client),
    :meth:`teardown` releases what it holds, :meth:`reset` restores the initial state,
    :meth:`check_health` tells whether the agent can still serve.
    """

    State: ClassVar[type[BaseModel]] = AgentState
    signal_routes: ClassVar[Mapping[str, type[Action] | Action]] = {}
    _routes: ClassVar[Routes] = Routes("Agent", {})
    _resource_fields: ClassVar[frozenset[str]] = frozenset()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "State" not in cls.__dict__:
            cls.State = _state_from_generic(cls) or cls.State
        if not (isinstance(cls.State, type) and issubclass(cls.State, BaseModel)):
            raise ConfigurationError(
                f"{cls.__qualname__}.State must be a pydantic BaseModel subclass", field="State")
        cls._resource_fields = frozenset(
            name for name, info in cls.State.model_fields.items() if info.exclude is True)
        cls._routes = Routes(cls.__qualname__, cls.signal_routes)
        check_model_hooks(cls)

    def __init__(self, initial_state: Mapping[str, Any] | BaseModel | None = None, *,
                 agent_id: str | None = None, options: Mapping[str, Any] | None = None) -> None:
        """Build an agent (cheaply: warm-up belongs in :meth:`setup`).

        ``initial_state`` and ``options`` are deep-copied: no two agents share them.

        Raises:
            ConfigurationError: ``initial_state`` does not validate against ``State``.
        """
        self.id: str = agent_id or f"{type(self).__name__.lower()}-{uuid.uuid4().hex[:12]}"
        self.options: dict[str, Any] = copy.deepcopy(dict(options or {}))
        if isinstance(initial_state, BaseModel):
            initial_state = initial_state.model_dump()
        self._initial_state: dict[str, Any] = copy.deepcopy(dict(initial_state or {}))
        try:
            self.state: StateT = self.State.model_validate(
                copy.deepcopy(self._initial_state))  # type: ignore[assignment]
        except ValidationError as exc:
            raise ConfigurationError(
                f"initial state of {type(self).__name__} is invalid: {describe(exc)}",
                field="initial_state") from exc
        self.pool_name: str | None = None
        self.node: str | None = None
        #: What :meth:`preload` returned for this agent's pool on this node (shared by
        #: every agent of the pool there), or ``None``.
        self.shared: Any = None
        #: This process's slot among the node's prefork children (0..c-1, reused by a
        #: replacement child); 0 in a process that is not a prefork child.
        self.process_index: int = 0
        #: Whether replies carry the agent's state (its pool's ``reply_state``).
        self.reply_state = True
        # Set to the exception that broke this agent; its pool closes and replaces it.
        self.broken: BaseException | None = None
        self.discard_on: tuple[type[BaseException], ...] = ()
        #: The models it holds, in a multiplexed pool (``max_models``); else ``None``.
        self.models: ModelCache | None = None
        #: Its pool's ``devices``, and its seat among the pool's agents in its process
        #: (0, 1, ...; a replacement takes the seat of the agent it replaces): see device.
        self.devices: tuple[str, ...] = ()
        self.seat = 0
        #: True while it handles its pool's warm-up signals (counted nowhere).
        self.warming = False

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.id} pool={self.pool_name}>"

    # -- hooks -------------------------------------------------------------------------

    @classmethod
    def preload(cls, options: Mapping[str, Any]) -> Any:
        """Load, once per worker node, what every agent of a pool shares; return it.

        Agents see the returned object as ``self.shared`` (in :meth:`setup`, and in
        actions as ``context.agent.shared``). Under prefork it runs in the worker's main
        process before the children fork, which then share its memory, replacement
        children included; elsewhere once in the process. ``options`` are the pool's
        ``worker_opts``. A model that must live on a GPU cannot cross a fork: load it in
        :meth:`setup` (``self.process_index`` picks the device). Default: nothing.
        """
        return None

    def setup(self) -> None:
        """Warm up: load models, open clients. Called once, before the agent serves."""

    def teardown(self) -> None:
        """Release what :meth:`setup` acquired. Called once, when the agent is closed."""

    def reset(self) -> None:
        """Restore the initial state, keeping resource fields (per-request isolation)."""
        fresh = self.State.model_validate(copy.deepcopy(self._initial_state))
        # model_copy, not setattr: a frozen State model must be resettable too.
        kept = {name: getattr(self.state, name) for name in self._resource_fields}
        self.state = fresh.model_copy(update=kept)  # type: ignore[assignment]

    def check_health(self) -> bool:
        """Whether the agent can still serve; a pool replaces an agent that says no."""
        return True

    def load_model(self, model_id: str) -> Any:
        """Load the model ``model_id`` and return it (in a pool with ``max_models``).

        Called in the agent's own thread (a plain method: not async, not a generator)
        when a call for a model the agent does not hold gets this agent, or before it
        serves for each of its pool's ``models``; actions then read the return value as
        ``context.model``. It raises to fail: the calls waiting for it get
        :class:`ModelLoadFailed`, and the model is tried again after a back-off. The
        least recently used model is unloaded before, if the agent holds ``max_models``.
        """
        raise NotImplementedError(
            f"{type(self).__name__} serves a pool with max_models, so it must implement "
            "load_model(model_id)")

    def unload_model(self, model_id: str, model: Any) -> None:
        """Release ``model`` (what :meth:`load_model` returned for ``model_id``): it was
        the least recently used when another needed room, or the agent is closing (before
        :meth:`teardown`). Default: drop it, for the garbage collector; free GPU memory
        here. An error is logged and the model dropped all the same."""

    @property
    def device(self) -> str | None:
        """The device this agent puts its models on: one of its pool's ``devices``, by its
        prefork child's ``process_index`` (the same for a replacement child) and, in a
        threads process, by its seat (see :func:`~.models.device_for`); ``None`` without
        ``devices``. Reading it touches no device: use it in ``setup()`` or
        ``load_model()``, in the process that serves, never in ``preload()``."""
        return device_for(self.devices, self.process_index, self.seat)

    # -- handling signals --------------------------------------------------------------

    @classmethod
    def largest_batch(cls) -> int:
        """The most signals one agent of this class takes at once: its largest batch, or 1."""
        return max((action.max_batch_size for action in cls._routes.actions()
                    if isinstance(action, BatchAction)), default=1)

    @classmethod
    def route(cls, signal_type: str) -> Action:
        """The action that handles ``signal_type`` (see :mod:`~.routing`).

        Raises:
            UnknownSignal: no route matches; the message lists the routes.
        """
        return cls._routes.action_for(signal_type)

    def handle(self, signal: Signal | Mapping[str, Any] | str,
               cancellation: Cancellation = NEVER, model: str | None = None) -> AgentReply:
        """Validate ``signal``, run its action and merge the result into state.

        State changes only if the action succeeds and the merged state validates; on any
        error it is exactly as before. A streaming action is run to its end and its
        chunks are dropped: the reply is its final one. The action reads
        ``cancellation`` as ``context.cancelled``, and ``model`` (a model id, in a
        multiplexed pool; loaded first if the agent does not hold it) as
        ``context.model_id`` and ``context.model``.

        Raises:
            InvalidSignal: the signal or its parameters are invalid.
            UnknownSignal: no route matches the signal's type.
            ActionFailed: the action raised, or its updates do not validate.
        """
        started = time.perf_counter()
        event, action, params = self._prepared(signal)
        return drain(self._streamed(event, action, params, cancellation, started, model))

    def stream(self, signal: Signal | Mapping[str, Any] | str,
               cancellation: Cancellation = NEVER,
               model: str | None = None) -> Generator[Any, None, AgentReply]:
        """Validate ``signal`` now, then run its action as a stream of chunks.

        The generator returned yields each chunk the action yields and returns the final
        :class:`AgentReply` (a non-streaming action yields nothing). State merges only
        when the action ends without error. Closing the generator closes the action's at
        its ``yield`` (its ``finally`` runs) and leaves state unchanged.

        Raises:
            InvalidSignal, UnknownSignal: here, before anything runs.
            ActionFailed: from the iteration, after the chunks already yielded: the action
                raised, yielded a chunk JSON cannot carry, or its updates do not validate.
        """
        started = time.perf_counter()
        event, action, params = self._prepared(signal)
        return self._streamed(event, action, params, cancellation, started, model)

    def handle_batch(self, events: Sequence[Signal],
                     model: str | None = None) -> list[AgentReply | WarmPoolError]:
        """Run the :class:`BatchAction` all of ``events`` route to, on all of them at once.

        Returns one outcome per event, in order: its reply, or the error for that event
        alone (:class:`InvalidSignal` for bad parameters, :class:`ActionFailed` for an
        item the action failed). A batch never changes the agent's state.

        Raises:
            ConfigurationError: the events do not all route to one batch action.
        """
        started = time.perf_counter()
        action = self.route(events[0].type)
        if not isinstance(action, BatchAction) or any(
                self.route(event.type) is not action for event in events):
            raise ConfigurationError(
                f"{type(self).__name__}.handle_batch() needs signals that all route to one "
                "BatchAction", field="signal_routes")
        outcomes: list[AgentReply | WarmPoolError | None] = [None] * len(events)
        valid: list[tuple[int, Any]] = []
        for index, event in enumerate(events):
            try:
                valid.append((index, action.validate_params(event.data, event.type)))
            except InvalidSignal as exc:
                outcomes[index] = exc
        values = self._run_batch(action, events, [params for _, params in valid], model)
        public = self.public_state() if self.reply_state else None
        for (index, _), value in zip(valid, values, strict=True):
            outcomes[index] = self._item_outcome(events[index], action, value, public, started)
        done = [outcome for outcome in outcomes if outcome is not None]
        if telemetry.batch_run.receivers:
            telemetry.batch_run.send(
                self, agent=self, action=action.name, size=len(done),
                failed=sum(not isinstance(outcome, AgentReply) for outcome in done),
                duration=time.perf_counter() - started)
        return done

    def public_state(self) -> dict[str, Any]:
        """The state as JSON-compatible data, resource fields left out."""
        return self.state.model_dump(mode="json")

    def note_failure(self, exc: BaseException) -> None:
        """Mark the agent broken if ``exc`` (or its cause) is one of its ``discard_on``."""
        if not self.discard_on:
            return
        for candidate in (exc, exc.__cause__):
            if isinstance(candidate, self.discard_on):
                self.broken = candidate
                return

    def _prepared(self, signal: Signal | Mapping[str, Any] | str
                  ) -> tuple[Signal, Action, BaseModel]:
        """The parsed signal, its action and its validated parameters."""
        event = Signal.parse(signal)
        action = self.route(event.type)
        return event, action, action.validate_params(event.data, event.type)

    def _streamed(self, event: Signal, action: Action, params: BaseModel,
                  cancellation: Cancellation, started: float,
                  model: str | None) -> Generator[Any, None, AgentReply]:
        """Run ``action``: its chunks, if it streams, then its reply (every call's path)."""
        context = self._context(event, (event,), cancellation, model)
        if telemetry.call_start.receivers:
            telemetry.call_start.send(self, agent=self, event=event, action=action.name)
        try:
            outcome = action.run(params, context)
            if action.streams:
                outcome = yield from self._chunks(outcome, action, event)
            new_state, result, public = self._settled(outcome, action, event)
        except Exception as exc:
            failure = self._failure(event, action, exc, started)
            if failure is exc:
                raise
            raise failure from exc
        self.state = new_state
        return self._replied(event, action, result, public, started)

    def _chunks(self, chunks: Generator[Any, None, Any], action: Action,
                event: Signal) -> Generator[Any, None, Any]:
        """Yield what a streaming action yields, checked; return what it returns.

        Closing this generator closes the action's at its ``yield``.
        """
        index = 0
        try:
            while True:
                try:
                    chunk = next(chunks)
                except StopIteration as stop:
                    return stop.value
                problem = json_problem(chunk, f"chunk[{index}]")
                if problem:
                    raise ActionFailed(
                        f"action {action.name!r} yielded a chunk JSON cannot carry: {problem}",
                        event.type, action.name, problem)
                if telemetry.stream_chunk.receivers:
                    telemetry.stream_chunk.send(self, agent=self, event=event, index=index,
                                                chunk=chunk)
                yield chunk
                index += 1
        finally:
            chunks.close()

    def _settled(self, outcome: Any, action: Action,
                 event: Signal) -> tuple[StateT, Any, dict[str, Any] | None]:
        """The state after ``outcome``, the caller's result, and the public state."""
        new_state, result = merged(self.State, self.state, outcome, action, event)
        # Serialized before the state is committed: a state that cannot go over the
        # wire fails the call and leaves the agent as it was.
        public = new_state.model_dump(mode="json") if self.reply_state else None
        return new_state, result, public  # type: ignore[return-value]

    def _replied(self, event: Signal, action: Action, result: Any,
                 public: dict[str, Any] | None, started: float) -> AgentReply:
        # Built from values made here, all of the right types: not validated again.
        reply = AgentReply.model_construct(
            pool=self.pool_name, agent_id=self.id, node=self.node, pid=os.getpid(),
            signal_id=event.id, signal_type=event.type, action=action.name, result=result,
            state=public, duration=time.perf_counter() - started)
        if telemetry.call_stop.receivers:
            telemetry.call_stop.send(self, agent=self, event=event, action=action.name,
                                     reply=reply, duration=reply.duration)
        return reply

    def _failure(self, event: Signal, action: Action, exc: Exception,
                 started: float) -> ActionFailed:
        """Record a failed call (telemetry, ``discard_on``); the caller's ActionFailed."""
        self.note_failure(exc)
        if telemetry.call_exception.receivers:
            telemetry.call_exception.send(
                self, agent=self, event=event, action=action.name, exception=exc,
                duration=time.perf_counter() - started)
        if isinstance(exc, ActionFailed):
            return exc
        hint = (" (declare fields that hold objects, such as clients or models, with "
                "resource())" if isinstance(exc, PydanticSerializationError) else "")
        failed = ActionFailed(
            f"action {action.name!r} failed on signal {event.type!r}: "
            f"{type(exc).__name__}: {exc}{hint}", event.type, action.name,
            f"{type(exc).__name__}: {exc}")
        failed.__cause__ = exc
        return failed

    def _context(self, event: Signal, events: tuple[Signal, ...], cancellation: Cancellation,
                 model: str | None) -> ActionContext:
        """What the action sees: a working copy of the state, the signals, the model.

        Raises:
            ModelLoadFailed, ConfigurationError: see :func:`~.models.model_in_use`.
        """
        return ActionContext(self, working_state(self.state, self._resource_fields), event,
                             events, cancellation, model, model_in_use(self, model))

    def _run_batch(self, action: BatchAction, events: Sequence[Signal],
                   items: list[Any], model: str | None) -> list[Any]:
        """``run_batch`` on ``items``; if it raises, that error is every item's value."""
        if not items:
            return []
        context = self._context(events[0], tuple(events), NEVER, model)
        try:
            values = action.run_batch(items, context)
        except Exception as exc:
            self.note_failure(exc)
            return [exc] * len(items)
        if not isinstance(values, list) or len(values) != len(items):
            count = len(values) if isinstance(values, list) else type(values).__name__
            problem = ValueError(f"run_batch returned {count} values for {len(items)} items")
            return [problem] * len(items)
        return values

    def _item_outcome(self, event: Signal, action: Action, value: Any,
                      public: dict[str, Any] | None,
                      started: float) -> AgentReply | WarmPoolError:
        if not isinstance(value, BaseException):
            problem = json_problem(value, "result")
            if problem is None:
                return self._replied(event, action, value, public, started)
            value = ValueError(f"a result JSON cannot carry: {problem}")
        if isinstance(value, Exception):
            return self._failure(event, action, value, started)
        return ActionFailed(f"action {action.name!r} returned {value!r} for {event.type!r}",
                            event.type, action.name, repr(value))


def _state_from_generic(cls: type) -> type[BaseModel] | None:
    for base in getattr(cls, "__orig_bases__", ()):
        origin = get_origin(base)
        if isinstance(origin, type) and issubclass(origin, Agent):
            for argument in get_args(base):
                if isinstance(argument, type) and issubclass(argument, BaseModel):
                    return argument
    return None

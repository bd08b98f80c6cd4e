"""Agents: long-lived, stateful workers that handle signals with actions."""

from __future__ import annotations

import copy
import os
import time
import uuid
from collections.abc import Mapping
from typing import Any, ClassVar, Generic, TypeVar, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic_core import PydanticSerializationError

from . import telemetry
from .action import Action, ActionContext
from .errors import ActionFailed, ConfigurationError
from .reply import AgentReply
from .routing import Routes
from .signal import Signal
from .validation import describe

__all__ = ["Agent", "AgentState", "resource"]

# Values an action cannot change in place: no copy needed.
_IMMUTABLE = (int, float, str, bytes, bool, type(None), frozenset)


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
        # Set to the exception that broke this agent; its pool closes and replaces it.
        self.broken: BaseException | None = None
        self.discard_on: tuple[type[BaseException], ...] = ()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.id} pool={self.pool_name}>"

    # -- hooks -------------------------------------------------------------------------

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

    # -- handling signals --------------------------------------------------------------

    @classmethod
    def route(cls, signal_type: str) -> Action:
        """The action that handles ``signal_type`` (see :mod:`~.routing`).

        Raises:
            UnknownSignal: no route matches; the message lists the routes.
        """
        return cls._routes.action_for(signal_type)

    def handle(self, signal: Signal | Mapping[str, Any] | str) -> AgentReply:
        """Validate ``signal``, run its action and merge the result into state.

        State changes only if the action succeeds and the merged state validates; on any
        error it is exactly as before.

        Raises:
            InvalidSignal: the signal or its parameters are invalid.
            UnknownSignal: no route matches the signal's type.
            ActionFailed: the action raised, or its updates do not validate.
        """
        started = time.perf_counter()
        event = Signal.parse(signal)
        action = self.route(event.type)
        params = action.validate_params(event.data, event.type)
        if telemetry.call_start.receivers:
            telemetry.call_start.send(self, agent=self, event=event, action=action.name)
        try:
            updates = action.run(params, ActionContext(self, self._working_state(), event))
            new_state, result = self._merged(updates, action, event)
            # Serialized before the state is committed: a state that cannot go over the
            # wire fails the call and leaves the agent as it was.
            public = new_state.model_dump(mode="json")
        except ActionFailed as exc:
            self._failed(event, action, exc, started)
            raise
        except Exception as exc:
            self._failed(event, action, exc, started)
            hint = (" (declare fields that hold objects, such as clients or models, with "
                    "resource())" if isinstance(exc, PydanticSerializationError) else "")
            raise ActionFailed(
                f"action {action.name!r} failed on signal {event.type!r}: "
                f"{type(exc).__name__}: {exc}{hint}", event.type, action.name,
                f"{type(exc).__name__}: {exc}") from exc
        self.state = new_state
        reply = AgentReply(
            pool=self.pool_name, agent_id=self.id, node=self.node, pid=os.getpid(),
            signal_id=event.id, signal_type=event.type, action=action.name, result=result,
            state=public, duration=time.perf_counter() - started)
        if telemetry.call_stop.receivers:
            telemetry.call_stop.send(self, agent=self, event=event, action=action.name,
                                     reply=reply, duration=reply.duration)
        return reply

    def public_state(self) -> dict[str, Any]:
        """The state as JSON-compatible data, resource fields left out."""
        return self.state.model_dump(mode="json")

    def _working_state(self) -> BaseModel:
        # A private copy of plain fields, so an action that changes state in place cannot
        # change the agent's state when it then fails; resources are shared, not copied.
        working = self.state.model_copy()
        fields = working.__dict__
        for name, value in fields.items():
            if name not in self._resource_fields and not isinstance(value, _IMMUTABLE):
                fields[name] = copy.deepcopy(value)
        return working

    def _merged(self, updates: Any, action: Action,
                event: Signal) -> tuple[StateT, dict[str, Any]]:
        if updates is None:
            updates = {}
        if not isinstance(updates, Mapping):
            raise ActionFailed(
                f"action {action.name!r} returned {type(updates).__name__}, "
                "expected a dict of state updates", event.type, action.name,
                f"returned {type(updates).__name__}")
        unknown = sorted(set(updates) - set(self.State.model_fields))
        if unknown:
            raise ActionFailed(
                f"action {action.name!r} returned updates for unknown state fields "
                f"{unknown} of {self.State.__name__}", event.type, action.name,
                f"unknown state fields: {unknown}")
        merged = {name: getattr(self.state, name) for name in self.State.model_fields}
        merged.update(updates)
        try:
            new_state = self.State.model_validate(merged)
        except ValidationError as exc:
            raise ActionFailed(
                f"action {action.name!r} produced an invalid state: {describe(exc)}", event.type,
                action.name, describe(exc)) from exc
        result = new_state.model_dump(mode="json", include=set(updates))
        return new_state, result  # type: ignore[return-value]

    def note_failure(self, exc: BaseException) -> None:
        """Mark the agent broken if ``exc`` (or its cause) is one of its ``discard_on``."""
        if not self.discard_on:
            return
        for candidate in (exc, exc.__cause__):
            if isinstance(candidate, self.discard_on):
                self.broken = candidate
                return

    def _failed(self, event: Signal, action: Action, exc: BaseException, started: float) -> None:
        self.note_failure(exc)
        if telemetry.call_exception.receivers:
            telemetry.call_exception.send(
                self, agent=self, event=event, action=action.name, exception=exc,
                duration=time.perf_counter() - started)


def _state_from_generic(cls: type) -> type[BaseModel] | None:
    for base in getattr(cls, "__orig_bases__", ()):
        origin = get_origin(base)
        if isinstance(origin, type) and issubclass(origin, Agent):
            for argument in get_args(base):
                if isinstance(argument, type) and issubclass(argument, BaseModel):
                    return argument
    return None

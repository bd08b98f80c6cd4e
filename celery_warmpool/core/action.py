"""Actions: the units of work an agent runs for a signal."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from pydantic import BaseModel, ConfigDict, ValidationError

from .cancellation import NEVER, Cancellation
from .errors import ConfigurationError, InvalidSignal
from .validation import describe, error_details

if TYPE_CHECKING:
    from .models import ModelCache
    from .signal import Signal

__all__ = ["Action", "ActionContext", "AgentView", "BatchAction", "NoParams", "Result"]


class AgentView(Protocol):
    """What an action sees of the agent running it: an :class:`~.agent.Agent` is one.

    Written here rather than naming the agent's class, which routes to actions and so
    imports this module.
    """

    #: The agent's id, unique in its pool.
    id: str
    #: The agent's state (as it stands before the action; see ``ActionContext.state``).
    state: Any
    #: What the agent class's ``preload`` returned for its pool on this node, or ``None``.
    shared: Any
    #: This process's slot among the node's prefork children (0 elsewhere).
    process_index: int

    @property
    def device(self) -> str | None:
        """The device it puts its models on (its pool's ``devices``), or ``None``."""
    #: The agent's own options (its pool's ``worker_opts``, deep-copied).
    options: dict[str, Any]
    #: The models it holds, in a pool with ``max_models`` (else ``None``).
    models: ModelCache | None
    #: The pool and node it serves, once a pool built it.
    pool_name: str | None
    node: str | None


class NoParams(BaseModel):
    """The parameters of an action that takes none."""

    model_config = ConfigDict(extra="forbid")


@dataclass(frozen=True, slots=True)
class ActionContext:
    """What an action sees besides its parameters.

    ``state`` is the agent's state as the action may read it: plain fields are a private
    copy (changing them in place has no effect; return updates instead), resource fields
    (a client, a model) are the agent's own objects.
    """

    agent: AgentView
    state: Any
    event: Signal
    #: Every signal of a batch (see :class:`BatchAction`); ``(event,)`` for one call.
    events: tuple[Signal, ...] = ()
    #: The caller's cancellation (see :mod:`~.cancellation`); ``NEVER`` when it has none.
    cancellation: Cancellation = NEVER
    #: The model the call is for, in a multiplexed pool (``max_models``): its id, and
    #: what the agent's ``load_model`` returned for it. ``None`` in other pools.
    model_id: str | None = None
    model: Any = None

    @property
    def cancelled(self) -> bool:
        """Whether the caller cancelled the call: long work may stop early."""
        return self.cancellation.cancelled


@dataclass(frozen=True, slots=True)
class Result:
    """What an action may return instead of a dict of state updates.

    ``value`` (JSON data) goes to the caller as ``reply.result`` and is not stored;
    ``updates``, if given, are merged into the agent's state as a returned dict is::

        return Result({"embedding": vector})                 # state unchanged
        return Result(hits, updates={"queries": queries + 1})
    """

    value: Any = None
    updates: Mapping[str, Any] | None = None


class Action:
    """One unit of work: validated ``Params`` in, a ``dict`` of state updates out.

    Subclass it, name it, declare ``Params`` (a pydantic model) and implement :meth:`run`::

        class Increment(Action):
            name = "increment"

            class Params(BaseModel):
                by: int = 1

            def run(self, params, context):
                return {"count": context.state.count + params.by}

    Unknown parameter keys are rejected whatever ``Params``'s own configuration says.

    An action whose ``run`` is a generator function streams: each value it yields (JSON)
    is a chunk for the caller as soon as it is produced, and what it returns (a dict of
    state updates, a :class:`Result`, or nothing) ends the call as ``run``'s return value
    does. State merges only when the generator ends without error::

        class Generate(Action):
            def run(self, params, context):
                for word in context.agent.shared.words(params.prompt):
                    if context.cancelled:
                        break
                    yield word
                return {"generated": context.state.generated + 1}
    """

    name: ClassVar[str] = ""
    Params: ClassVar[type[BaseModel]] = NoParams
    _strict_params: ClassVar[type[BaseModel]] = NoParams
    #: Whether ``run`` is a generator function (set when the class is defined).
    streams: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if not cls.name:
            cls.name = cls.__name__
        if not (isinstance(cls.Params, type) and issubclass(cls.Params, BaseModel)):
            raise ConfigurationError(
                f"{cls.__qualname__}.Params must be a pydantic BaseModel subclass, "
                f"got {cls.Params!r}", field="Params")
        cls._strict_params = _forbid_extra(cls.Params)
        cls.streams = inspect.isgeneratorfunction(cls.run)

    def validate_params(self, data: Any, signal_type: str | None = None) -> BaseModel:
        """Validate a signal's ``data`` against ``Params``.

        Raises:
            InvalidSignal: unknown keys, missing or invalid values; the message names them.
        """
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise InvalidSignal(
                f"action {self.name!r} expects an object as signal data, "
                f"got {type(data).__name__}", signal_type)
        try:
            return self._strict_params.model_validate(dict(data))
        except ValidationError as exc:
            raise InvalidSignal(
                f"invalid parameters for action {self.name!r}: {describe(exc)}", signal_type,
                error_details(exc)) from exc

    def run(self, params: Any, context: ActionContext) -> Any:
        """Do the work; return the state updates to merge (an empty dict for none).

        A generator function here makes the action stream (see the class).
        """
        raise NotImplementedError(f"action {self.name!r} must implement {self.required_method}")

    #: What a subclass must implement; checked when an agent class routes to it.
    required_method: ClassVar[str] = "run(params, context)"

    def implemented(self) -> bool:
        """Whether this action's class implements :attr:`required_method`."""
        return type(self).run is not Action.run


def _forbid_extra(model: type[BaseModel]) -> type[BaseModel]:
    if model.model_config.get("extra") == "forbid":
        return model
    strict: type[BaseModel] = type(
        model.__name__, (model,),
        {"model_config": ConfigDict(extra="forbid"), "__module__": model.__module__,
         "__qualname__": model.__qualname__})
    return strict


class BatchAction(Action):
    """An action that handles many signals in one go: a model's forward pass, say.

    Signals routed to it from concurrent callers are grouped into batches of up to
    ``max_batch_size``; a batch runs when it is full, or ``batch_wait_timeout`` seconds
    after its first signal came, whichever is first. Implement :meth:`run_batch`::

        class Embed(BatchAction):
            name = "embed"
            max_batch_size = 32
            batch_wait_timeout = 0.01

            class Params(BaseModel):
                text: str

            def run_batch(self, items, context):
                vectors = context.agent.shared.encode([item.text for item in items])
                return [vector.tolist() for vector in vectors]

    Callers do not change: ``warm.call`` and ``warm.cast`` of a signal routed here are
    batched. A batch reads the agent's state and never changes it, and does not stream.
    """

    #: The most signals in one batch.
    max_batch_size: ClassVar[int] = 16
    #: Seconds a batch waits for more signals after its first one came.
    batch_wait_timeout: ClassVar[float] = 0.005
    required_method: ClassVar[str] = "run_batch(items, context)"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        size, wait = cls.max_batch_size, cls.batch_wait_timeout
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ConfigurationError(
                f"{cls.__qualname__}.max_batch_size must be an int of at least 1, got "
                f"{size!r}", field="max_batch_size")
        if isinstance(wait, bool) or not isinstance(wait, int | float) or wait < 0:
            raise ConfigurationError(
                f"{cls.__qualname__}.batch_wait_timeout must be seconds (0 or more), got "
                f"{wait!r}", field="batch_wait_timeout")
        if cls.streams or inspect.isgeneratorfunction(cls.run_batch):
            raise ConfigurationError(
                f"{cls.__qualname__} is a BatchAction and cannot stream: its run_batch and "
                "run must return, not yield (make a streaming Action instead)",
                field="run" if cls.streams else "run_batch")

    def implemented(self) -> bool:
        """Whether the class implements :meth:`run_batch`."""
        return type(self).run_batch is not BatchAction.run_batch

    def run_batch(self, items: list[Any], context: ActionContext) -> list[Any]:
        """Handle ``items`` (validated ``Params``, in arrival order) at once.

        Return one entry per item, in the same order: a JSON value (that caller's
        ``reply.result``) or an exception instance (that caller alone gets
        :class:`ActionFailed`).
        """
        raise NotImplementedError(f"action {self.name!r} must implement {self.required_method}")

    def run(self, params: Any, context: ActionContext) -> Any:
        """One signal on its own: a batch of one."""
        [value] = self.run_batch([params], context)
        if isinstance(value, BaseException):
            raise value
        return Result(value)

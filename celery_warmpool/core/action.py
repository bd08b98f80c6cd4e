"""Actions: the units of work an agent runs for a signal."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict, ValidationError

from .errors import ConfigurationError, InvalidSignal
from .validation import describe, error_details

if TYPE_CHECKING:
    from .agent import Agent
    from .signal import Signal

__all__ = ["Action", "ActionContext", "NoParams"]


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

    agent: Agent[Any]
    state: Any
    event: Signal


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
    """

    name: ClassVar[str] = ""
    Params: ClassVar[type[BaseModel]] = NoParams
    _strict_params: ClassVar[type[BaseModel]] = NoParams

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if not cls.name:
            cls.name = cls.__name__
        if not (isinstance(cls.Params, type) and issubclass(cls.Params, BaseModel)):
            raise ConfigurationError(
                f"{cls.__qualname__}.Params must be a pydantic BaseModel subclass, "
                f"got {cls.Params!r}", field="Params")
        cls._strict_params = _forbid_extra(cls.Params)

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

    def run(self, params: Any, context: ActionContext) -> Mapping[str, Any]:
        """Do the work; return the state updates to merge (an empty dict for none)."""
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

"""How an action's outcome becomes its agent's next state, and what its caller gets back.

An action sees a working copy of the state (:func:`working_state`: plain fields copied,
resource fields shared) and returns a dict of state updates or a :class:`~.action.Result`.
:func:`merged` checks the updates against the agent's ``State`` model (unknown fields,
invalid values) and builds the next state, leaving the agent's own untouched: the agent
commits it only when the whole call succeeded.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ValidationError

from .action import Action, Result
from .errors import ActionFailed
from .signal import Signal
from .validation import describe, json_problem

__all__ = ["merged", "working_state"]

# Values an action cannot change in place: no copy needed.
_IMMUTABLE = (int, float, str, bytes, bool, type(None), frozenset)


def working_state(state: BaseModel, resource_fields: frozenset[str]) -> BaseModel:
    """A copy of ``state`` an action may read (and change in place to no effect).

    Plain fields are private copies, so an action that changes state in place cannot
    change the agent's state when it then fails; resources are shared, not copied.
    """
    working = state.model_copy()
    fields = working.__dict__
    for name, value in fields.items():
        if name not in resource_fields and not isinstance(value, _IMMUTABLE):
            fields[name] = copy.deepcopy(value)
    return working


def merged(model: type[BaseModel], state: BaseModel, outcome: Any, action: Action,
           event: Signal) -> tuple[BaseModel, Any]:
    """The state after ``outcome`` (a Result, or a dict of updates) to ``state`` (of the
    agent's ``State`` model ``model``), and the result.

    Raises:
        ActionFailed: the outcome is neither, names fields ``State`` does not have, makes
            an invalid state, or is a result JSON cannot carry.
    """
    if isinstance(outcome, Result):
        problem = json_problem(outcome.value, "result")
        if problem:
            raise ActionFailed(
                f"action {action.name!r} returned a result JSON cannot carry: {problem}",
                event.type, action.name, problem)
        updates = _updates(model, outcome.updates, action, event)
        return _with(model, state, updates, action, event), outcome.value
    updates = _updates(model, outcome, action, event)
    new_state = _with(model, state, updates, action, event)
    return new_state, new_state.model_dump(mode="json", include=set(updates))


def _updates(model: type[BaseModel], updates: Any, action: Action,
             event: Signal) -> Mapping[str, Any]:
    if updates is None:
        return {}
    if not isinstance(updates, Mapping):
        raise ActionFailed(
            f"action {action.name!r} returned {type(updates).__name__}, "
            "expected a dict of state updates or a Result", event.type, action.name,
            f"returned {type(updates).__name__}")
    unknown = sorted(set(updates) - set(model.model_fields))
    if unknown:
        raise ActionFailed(
            f"action {action.name!r} returned updates for unknown state fields "
            f"{unknown} of {model.__name__}", event.type, action.name,
            f"unknown state fields: {unknown}")
    return updates


def _with(model: type[BaseModel], state: BaseModel, updates: Mapping[str, Any],
          action: Action, event: Signal) -> BaseModel:
    if not updates:
        return state
    values = {name: getattr(state, name) for name in model.model_fields}
    values.update(updates)
    try:
        return model.model_validate(values)
    except ValidationError as exc:
        raise ActionFailed(
            f"action {action.name!r} produced an invalid state: {describe(exc)}",
            event.type, action.name, describe(exc)) from exc

"""How a pydantic validation error is told to a user: where, and what is wrong there.

Signals, action parameters, agent state and pool specs are all validated by pydantic;
this module is the one place that turns its errors into text and into the plain data
that travels inside :class:`~celery_warmpool.core.errors.InvalidSignal`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

__all__ = ["MAX_DEPTH", "Problem", "describe", "error_details", "json_problem", "problems"]


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong with a validated value: its dotted ``location`` and the ``message``."""

    location: str
    message: str

    def __str__(self) -> str:
        return f"{self.location}: {self.message}"


def error_details(exc: ValidationError) -> list[dict[str, Any]]:
    """The errors as JSON-compatible data (no input values, which may be large or secret)."""
    return [dict(error) for error in
            exc.errors(include_url=False, include_context=False, include_input=False)]


def problems(exc: ValidationError, *, root: str = "<value>") -> list[Problem]:
    """Each error of ``exc``; an error about the whole value is located at ``root``."""
    return [Problem(".".join(str(part) for part in error["loc"]) or root, error["msg"])
            for error in exc.errors(include_url=False)]


def describe(exc: ValidationError, *, root: str = "<value>") -> str:
    """Every error of ``exc`` on one line: ``field: message, other.field: message``."""
    return ", ".join(str(problem) for problem in problems(exc, root=root))


_JSON_SCALARS = (str, int, float, bool, type(None))
#: The deepest nesting of lists and objects a signal's data, a result or a chunk may have.
#: Deeper, the value could not travel: pydantic serializes at most 255 levels of a whole
#: message, and Python's own JSON coders stop near 1,000.
MAX_DEPTH = 100


def json_problem(value: Any, path: str, depth: int = 0) -> str | None:
    """Where ``value`` holds something JSON cannot carry, or ``None`` if it is all JSON.

    ``path`` names ``value`` in the answer: ``"data.vector[3] is a float32"``. Nesting
    deeper than :data:`MAX_DEPTH` is a problem too.
    """
    if isinstance(value, _JSON_SCALARS):
        return None
    if depth >= MAX_DEPTH and isinstance(value, dict | list | tuple):
        shown = path if len(path) <= 60 else f"{path[:57]}..."
        return f"{shown} is nested deeper than {MAX_DEPTH} levels"
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                return f"{path} has a non-string key {key!r}"
            problem = json_problem(item, f"{path}.{key}", depth + 1)
            if problem:
                return problem
        return None
    if isinstance(value, list | tuple):
        for index, item in enumerate(value):
            problem = json_problem(item, f"{path}[{index}]", depth + 1)
            if problem:
                return problem
        return None
    return f"{path} is a {type(value).__name__}"

"""How a pydantic validation error is told to a user: where, and what is wrong there.

Signals, action parameters, agent state and pool specs are all validated by pydantic;
this module is the one place that turns its errors into text and into the plain data
that travels inside :class:`~celery_warmpool.core.errors.InvalidSignal`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

__all__ = ["Problem", "describe", "error_details", "problems"]


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

"""Signals: the CloudEvents 1.0 messages that agents handle."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import InvalidSignal
from .ids import new_id
from .validation import describe, error_details, json_problem

__all__ = ["Signal"]

SPECVERSION = "1.0"
DEFAULT_SOURCE = "/celery_warmpool"
#: Attributes left out of the wire form when they hold these values.
_WIRE_DEFAULTS = {"source": DEFAULT_SOURCE, "specversion": SPECVERSION,
                  "datacontenttype": "application/json"}


def _now() -> datetime:
    return datetime.now(UTC)


class Signal(BaseModel):
    """A CloudEvents 1.0 event: what an agent is asked to handle.

    Build one with :meth:`Signal.new`; send it as JSON with :meth:`to_json`, read it back
    with :meth:`from_json`. Invalid input raises :class:`InvalidSignal` naming the field.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(default_factory=new_id, min_length=1)
    type: str = Field(min_length=1)
    source: str = Field(default="/celery_warmpool", min_length=1)
    specversion: str = SPECVERSION
    time: datetime = Field(default_factory=_now)
    subject: str | None = None
    datacontenttype: str = "application/json"
    dataschema: str | None = None
    data: Any = None

    @field_validator("specversion")
    @classmethod
    def _only_cloudevents_1(cls, value: str) -> str:
        if value != SPECVERSION:
            raise ValueError(f"only CloudEvents specversion {SPECVERSION!r} is supported")
        return value

    @field_validator("datacontenttype")
    @classmethod
    def _json_only(cls, value: str) -> str:
        if value != "application/json" and not value.endswith("+json"):
            raise ValueError("signals carry JSON data only (application/json)")
        return value

    @field_validator("data", mode="before")
    @classmethod
    def _json_data(cls, value: Any) -> Any:
        if isinstance(value, BaseModel):
            return value.model_dump(mode="json")
        problem = json_problem(value, "data")
        if problem:
            raise ValueError(f"signals carry JSON data only: {problem}")
        return value

    @classmethod
    def new(cls, type: str, data: Any = None, *, source: str = "/celery_warmpool",
            **attributes: Any) -> Self:
        """Build a signal of ``type`` carrying ``data``.

        Raises:
            InvalidSignal: a field is missing or invalid; the message names it.
        """
        return cls.parse({"type": type, "data": data, "source": source, **attributes})

    @classmethod
    def parse(cls, value: Any) -> Self:
        """Validate a signal given as a ``Signal``, a mapping or a JSON string.

        Raises:
            InvalidSignal: the value is not a valid signal; the message names the field.
        """
        if isinstance(value, cls):
            return value
        signal_type = value.get("type") if isinstance(value, dict) else None
        try:
            if isinstance(value, str | bytes):
                return cls.model_validate_json(value)
            return cls.model_validate(value)
        except ValidationError as exc:
            raise _invalid(exc, signal_type if isinstance(signal_type, str) else None) from exc

    @classmethod
    def from_json(cls, text: str | bytes) -> Self:
        """Read a signal from its JSON form (see :meth:`parse`)."""
        return cls.parse(text)

    def to_json(self) -> str:
        """The signal as a CloudEvents JSON document."""
        return self.model_dump_json(exclude_none=True)

    def to_wire(self) -> dict[str, Any]:
        """The signal as a JSON-compatible mapping, for a task's arguments.

        Attributes left at their defaults (``specversion``, ``datacontenttype``, the
        default ``source``) are left out: :meth:`parse` restores them, and every call
        carries less.
        """
        # Compared by hand: pydantic's exclude_defaults would make a new id and time for
        # every dump, just to compare them.
        skip = {name for name, default in _WIRE_DEFAULTS.items()
                if getattr(self, name) == default}
        return self.model_dump(mode="json", exclude_none=True, exclude=skip)


def _invalid(exc: ValidationError, signal_type: str | None) -> InvalidSignal:
    return InvalidSignal(f"invalid signal: {describe(exc, root='<signal>')}", signal_type,
                         error_details(exc))

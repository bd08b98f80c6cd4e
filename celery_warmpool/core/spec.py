"""PoolSpec: one pool's configuration, validated before anything is built."""

from __future__ import annotations

import functools
import importlib
import os
import re
from collections.abc import Mapping
from typing import Any, Literal, Optional, Self

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    create_model,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, SettingsConfigDict

from .agent import Agent
from .arguments import MODEL_ID
from .errors import ConfigurationError, InvalidSignal, SignalError
from .signal import Signal
from .validation import problems

__all__ = ["PoolOptions", "PoolSpec", "import_object"]

Strategy = Literal["lifo", "fifo"]
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")


class PoolOptions(BaseModel):
    """How a pool behaves. Invalid values are an error, never silently defaulted."""

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)

    size: int = Field(default=5, ge=1, description="agents built and warm before serving")
    max_overflow: int = Field(default=0, ge=0, description="extra temporary agents")
    strategy: Strategy = Field(default="lifo", description="lifo or fifo checkout order")
    overflow_ttl: float = Field(
        default=0.0, ge=0, description="idle seconds an overflow agent lingers")
    max_uses: int | None = Field(default=None, ge=1, description="recycle after N checkouts")
    max_age: float | None = Field(default=None, gt=0, description="recycle after T seconds")
    health_check_interval: float | None = Field(
        default=None, ge=0, description="check_health() before handing out an agent idle this long")
    reset_on_checkin: bool = Field(default=False, description="call reset() on checkin")
    reply_state: bool = Field(default=True, description="replies carry the agent's state")
    discard_on: tuple[type[BaseException], ...] = Field(
        default=(), description="exception types that mean an agent is broken")
    start_timeout: float = Field(default=60.0, gt=0, description="seconds start() may take")
    monitor_interval: float | None = Field(
        default=None, gt=0, description="warn at most every T seconds while exhausted")
    stream_buffer: int = Field(
        default=256, ge=1, description="chunks a streaming action may run ahead of its reader")
    stream_idle_timeout: float = Field(
        default=30.0, gt=0,
        description="seconds without a read before a stream's work is cancelled")

    max_models: int | None = Field(
        default=None, ge=1,
        description="models one agent keeps loaded, least recently used unloaded first; "
                    "None: the pool's calls name no model")
    models: tuple[str, ...] = Field(
        default=(), description="models each agent loads before it serves (max_models at most)")
    warmup: tuple[Signal, ...] = Field(
        default=(), description="signals each agent handles after setup(), before it serves "
                                "(for each model of models, in a multiplexed pool)")
    devices: tuple[str, ...] = Field(
        default=(), description="devices the agents are placed on (Agent.device), e.g. "
                                "cuda:0, cuda:1")

    @field_validator("models")
    @classmethod
    def _model_ids(cls, value: tuple[str, ...], info: ValidationInfo) -> tuple[str, ...]:
        for model in value:
            if MODEL_ID.fullmatch(model) is None:
                raise ValueError(f"{model!r} is not a model id (1 to 128 characters: a "
                                 "letter or digit, then letters, digits and . _ - : / @ +)")
        if len(set(value)) != len(value):
            raise ValueError(f"a model is listed twice: {list(value)}")
        most = info.data.get("max_models")
        if value and most is None:
            raise ValueError("models are loaded ahead only in a multiplexed pool: set "
                             "max_models too")
        if most is not None and len(value) > most:
            raise ValueError(f"{len(value)} models but max_models={most}: each agent would "
                             "unload what it had just loaded")
        return value

    @field_validator("warmup", mode="before")
    @classmethod
    def _warmup_signals(cls, value: Any) -> Any:
        if not isinstance(value, list | tuple):
            return value  # pydantic's own error: not a sequence
        try:
            return tuple(Signal.parse(item) for item in value)
        except InvalidSignal as exc:
            raise ValueError(f"a warm-up signal is invalid: {exc}") from None

    @field_validator("devices")
    @classmethod
    def _device_names(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for device in value:
            if not device or device != device.strip() or any(c.isspace() for c in device):
                raise ValueError(f"{device!r} is not a device name (such as 'cuda:0')")
        return value

    @field_validator("discard_on", mode="before")
    @classmethod
    def _exception_types(cls, value: Any) -> tuple[type[BaseException], ...]:
        if value is None:
            return ()
        items = value if isinstance(value, list | tuple | set | frozenset) else (value,)
        types: list[type[BaseException]] = []
        for item in items:
            resolved = _imported(item) if isinstance(item, str) else item
            if not (isinstance(resolved, type) and issubclass(resolved, BaseException)):
                raise ValueError(f"{item!r} is not an exception class")
            types.append(resolved)
        return tuple(types)


class PoolSpec(PoolOptions):
    """One named pool: its agent class, start options and :class:`PoolOptions`.

    ``PoolSpec("fast_search", SearchAgent, size=8, max_overflow=4)``. ``agent`` may be a
    class or a ``"module:Class"`` string. ``initial_state`` and ``worker_opts`` are given to
    every agent as its own deep copy. ``queue`` defaults to ``warmpool.<name>``,
    ``dead_letter_queue`` (where casts that cannot succeed go) to ``warmpool.<name>.dead``;
    a cast whose process dies is delivered again up to ``max_redeliveries`` times. With
    ``max_queued``, a call or cast finding that many calls of the pool waiting is refused
    with :class:`PoolBusy` (see ``docs/overload.md``).

    Raises:
        ConfigurationError: an option is unknown or invalid; the message names the pool
            and the field.
    """

    name: str
    agent: type[Agent]  # type: ignore[type-arg]
    initial_state: dict[str, Any] | None = None
    worker_opts: dict[str, Any] | None = None
    queue: str = ""
    dead_letter_queue: str = ""
    max_redeliveries: int = Field(
        default=3, ge=0, description="times a cast whose process died is delivered again")
    max_queued: int | None = Field(
        default=None, ge=1,
        description="calls waiting for an agent (queued in the broker, or reserved on a "
                    "node and not yet running), across nodes, past which a call or cast is "
                    "refused with PoolBusy before it is queued; None: no bound")

    def __init__(self, name: str | None = None, agent: Any = None, /, **options: Any) -> None:
        if name is not None:
            options["name"] = name
        if agent is not None:
            options["agent"] = agent
        pool = options.get("name")
        try:
            super().__init__(**options)
        except ValidationError as exc:
            raise _configuration_error(exc, pool if isinstance(pool, str) else None) from exc

    @field_validator("name")
    @classmethod
    def _valid_name(cls, value: str) -> str:
        if not _NAME.match(value):
            raise ValueError("a pool name starts with a letter and holds letters, digits and _")
        return value

    @field_validator("agent", mode="before")
    @classmethod
    def _agent_class(cls, value: Any) -> Any:
        resolved = _imported(value) if isinstance(value, str) else value
        if not (isinstance(resolved, type) and issubclass(resolved, Agent)):
            raise ValueError(f"{value!r} is not a celery_warmpool.Agent subclass")
        return resolved

    @model_validator(mode="after")
    def _default_queues(self) -> Self:
        if not self.queue:
            object.__setattr__(self, "queue", f"warmpool.{self.name}")
        if not self.dead_letter_queue:
            object.__setattr__(self, "dead_letter_queue", f"warmpool.{self.name}.dead")
        return self

    @model_validator(mode="after")
    def _fits_the_agent(self) -> Self:
        # Raised as they are (not ValueErrors): each is a field's error, though only the
        # whole spec knows the agent class.
        if self.max_models is not None and self.agent.load_model is Agent.load_model:
            raise ConfigurationError(
                f"pool {self.name!r}: invalid max_models: {self.agent.__qualname__} does "
                "not implement load_model(model_id), so it cannot hold models",
                self.name, "max_models")
        for signal in self.warmup:
            try:
                self.agent.route(signal.type).validate_params(signal.data, signal.type)
            except SignalError as exc:
                raise ConfigurationError(
                    f"pool {self.name!r}: invalid warmup: signal {signal.type!r}: {exc}",
                    self.name, "warmup") from None
        return self

    @property
    def options(self) -> PoolOptions:
        """The pool behaviour part of this spec."""
        return PoolOptions(**{name: getattr(self, name) for name in PoolOptions.model_fields})

    @classmethod
    def parse(cls, value: PoolSpec | Mapping[str, Any] | tuple[Any, ...]) -> PoolSpec:
        """Read a spec given as a ``PoolSpec``, a mapping, or ``(name, agent, {options})``."""
        if isinstance(value, PoolSpec):
            return value
        if isinstance(value, Mapping):
            return cls(**dict(value))
        if isinstance(value, tuple) and len(value) in (2, 3):
            options = dict(value[2]) if len(value) == 3 else {}
            return cls(value[0], value[1], **options)
        raise ConfigurationError(
            f"cannot read a pool spec from {value!r}: give a PoolSpec, a mapping, or "
            "(name, agent, {options})", field="pools")

    def with_environment(self, environ: Mapping[str, str] | None = None) -> PoolSpec:
        """This spec with ``WARMPOOL_<NAME>_<OPTION>`` environment overrides applied.

        ``WARMPOOL_FAST_SEARCH_SIZE=16`` sets ``size`` of pool ``fast_search``.
        """
        prefix = f"WARMPOOL_{self.name.upper()}_"
        source = os.environ if environ is None else environ
        given = {key[len(prefix):].lower(): value for key, value in source.items()
                 if key.upper().startswith(prefix)}
        known = {key: value for key, value in given.items()
                 if key in _overridable().model_fields}
        if not known:
            return self
        overrides = _overrides_class(prefix)
        try:
            # Read the process environment through pydantic-settings itself; an explicit
            # mapping (tests, dry runs) is validated by the same model.
            found = overrides() if environ is None else overrides.model_validate(known)
        except ValidationError as exc:
            raise _configuration_error(exc, self.name, prefix=prefix) from exc
        changed = found.model_dump(exclude_unset=True)
        if not changed:
            return self
        merged = {name: getattr(self, name) for name in type(self).model_fields}
        merged.update(changed)
        return PoolSpec(**merged)


#: Options an environment variable cannot set: they name Python objects.
_NOT_FROM_ENVIRONMENT = frozenset({"discard_on"})


@functools.cache
def _overridable() -> type[BaseSettings]:
    """A settings model of every option an environment variable may override.

    Each field is the spec's own (type, bounds, description) made optional, so the
    environment is held to exactly the rules a spec is.
    """
    names = ((set(PoolOptions.model_fields)
              | {"queue", "dead_letter_queue", "max_redeliveries", "max_queued"})
             - _NOT_FROM_ENVIRONMENT)
    fields: dict[str, Any] = {
        name: (Optional[info.annotation],  # noqa: UP045 - built at run time
               FieldInfo.merge_field_infos(info, default=None))
        for name, info in PoolSpec.model_fields.items() if name in names}
    model: type[BaseSettings] = create_model("PoolEnvironment", __base__=BaseSettings,
                                             **fields)
    return model


def _overrides_class(prefix: str) -> type[BaseSettings]:
    # Another pool's variables share the prefix ("fast" and "fast_search"): ignore them.
    config = SettingsConfigDict(extra="ignore", env_prefix=prefix, env_ignore_empty=True)
    return type("PoolEnvironment", (_overridable(),), {"model_config": config})


def import_object(path: str) -> Any:
    """Import ``"package.module:Name"`` (or ``"package.module.Name"``).

    Raises:
        ImportError: the module or the name cannot be found; the message says which.
    """
    module_name, _, attribute = path.partition(":")
    if not attribute:
        module_name, _, attribute = path.rpartition(".")
    if not module_name or not attribute:
        raise ImportError(f"{path!r} is not an import path like 'package.module:Name'")
    module = importlib.import_module(module_name)
    try:
        target = module
        for part in attribute.split("."):
            target = getattr(target, part)
    except AttributeError:
        raise ImportError(f"module {module_name!r} has no attribute {attribute!r}") from None
    return target


def _imported(path: str) -> Any:
    # A ValueError, so that pydantic reports it as the field's error and the spec's
    # ConfigurationError names the pool and the field, as for any other bad value.
    try:
        return import_object(path)
    except ImportError as exc:
        raise ValueError(f"cannot import {path!r}: {exc}") from exc


def _configuration_error(exc: ValidationError, pool: str | None, *,
                         prefix: str = "") -> ConfigurationError:
    first, *others = problems(exc)
    field = first.location if first.location != "<value>" else None
    where = f"pool {pool!r}" if pool else "pool spec"
    shown = f"{prefix}{field.upper()}" if prefix and field else field
    message = f"{where}: invalid {shown}: {first.message}"
    if others:
        message += f" (also invalid: {', '.join(problem.location for problem in others)})"
    return ConfigurationError(message, pool, field)


def validate_options(pool: str, options: Mapping[str, Any]) -> PoolOptions:
    """Validate pool options, raising :class:`ConfigurationError` naming pool and field."""
    try:
        return PoolOptions(**dict(options))
    except ValidationError as exc:
        raise _configuration_error(exc, pool) from exc

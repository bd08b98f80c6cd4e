"""The message of a pool call, as the caller writes it and the worker reads it.

Every call, transaction, stream and cast on a pool travels as an ordinary Celery task
message (so workers, monitors and Flower see an ordinary task) whose task name says what
kind of work it is (:data:`CALL_TASK` or :data:`CAST_TASK`) and whose one positional
argument is a :class:`CallMessage` as JSON data::

    {"pool": "search", "signals": [{...a CloudEvent...}], "deadline": 1765130000.25,
     "call_timeout": 5.0, "model": "tenant-42"}

Fields left at their defaults are left out. The worker reads the message back with
:meth:`CallMessage.from_args`, in one place, whatever part of it reads it (the task, the
batcher, the late-call check, the lost-process handling). Messages written by earlier
versions (the same fields as positional arguments) are read too.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

from ..core.arguments import model_id, seconds

__all__ = ["CALL_TASK", "CAST_TASK", "CallMessage", "WorkKind", "kind_of"]

#: The task that carries a call's, a transaction's or a stream's signals to a pool.
CALL_TASK: Final = "celery_warmpool.handle"
#: The task that carries a cast's signal: the same work, nobody waiting for it.
CAST_TASK: Final = "celery_warmpool.cast"
#: What a pool task carries: signals someone waits for, signals fired and forgotten, or
#: a user's own function run on an agent (``@warm.task``).
WorkKind = Literal["call", "cast", "task"]
_KINDS: Final[Mapping[str, WorkKind]] = {CALL_TASK: "call", CAST_TASK: "cast"}
#: The positional arguments of the earlier form, in order.
_POSITIONAL = ("pool", "signals", "deadline", "call_timeout", "transaction")


def kind_of(task_name: str | None) -> WorkKind | None:
    """``"call"`` or ``"cast"`` for the package's own task names, else ``None``."""
    return _KINDS.get(task_name or "")


@dataclass(frozen=True, slots=True)
class CallMessage:
    """One piece of pool work on its way to a worker.

    Attributes:
        pool: the pool's name.
        signals: the signals as JSON data (CloudEvents), in order.
        deadline: Unix time by which the work must start, else it never runs
            (the caller's ``timeout``); ``None``: no deadline.
        call_timeout: seconds the work may take once started; ``None``: no bound.
        transaction: the signals run all or nothing on one agent.
        stream: the one signal's chunks go to the caller as they come.
        copy: which copy of a cast this is: ``0`` as first sent, ``n`` for the
            ``n``-th copy its caller sent again (see :mod:`.marks`).
        model: the model the signals are for, in a pool with ``max_models``; else
            ``None``.
        reply: the caller's reply channel, where the worker publishes the reply (see
            :mod:`.replies`); ``None``: Celery's own way.
        sent: Unix time the caller sent it (``None``: unknown).
    """

    pool: str
    signals: Sequence[Mapping[str, Any]]
    deadline: float | None = None
    call_timeout: float | None = None
    transaction: bool = False
    stream: bool = False
    copy: int = 0
    model: str | None = None
    reply: str | None = None
    sent: float | None = None

    def to_args(self) -> tuple[dict[str, Any]]:
        """The task's positional arguments: this message as JSON data."""
        data: dict[str, Any] = {"pool": self.pool, "signals": list(self.signals)}
        if self.deadline is not None:
            data["deadline"] = self.deadline
        if self.call_timeout is not None:
            data["call_timeout"] = self.call_timeout
        if self.transaction:
            data["transaction"] = True
        if self.stream:
            data["stream"] = True
        if self.copy:
            data["copy"] = self.copy
        if self.model is not None:
            data["model"] = self.model
        if self.reply is not None:
            data["reply"] = self.reply
        if self.sent is not None:
            data["sent"] = self.sent
        return (data,)

    @classmethod
    def from_args(cls, args: Sequence[Any], kind: WorkKind | None = None) -> CallMessage:
        """Read the message from a task's positional arguments.

        ``kind`` says how to read the sixth argument of the earlier positional form
        (``stream`` for a call, ``copy`` for a cast).

        Raises:
            InvalidArgument: its ``call_timeout`` or ``model`` is not one a caller sends.
            ValueError: the arguments are not a pool call's message.
        """
        if len(args) == 1 and isinstance(args[0], Mapping):
            data = dict(args[0])
        elif len(args) >= 2:
            data = dict(zip(_POSITIONAL, args, strict=False))
            if len(args) > 5:
                data["copy" if kind == "cast" else "stream"] = args[5]
        else:
            raise ValueError(f"not a pool call's message: {args!r}")
        try:
            pool, signals = data["pool"], list(data["signals"])
            deadline = _optional_float(data.get("deadline"))
            sent = _optional_float(data.get("sent"))
            copy = int(data.get("copy") or 0)
        except (KeyError, TypeError, ValueError, OverflowError) as exc:
            raise ValueError(f"not a pool call's message ({exc!r}): {args!r}") from exc
        reply = data.get("reply")
        if (not isinstance(pool, str) or not all(isinstance(s, Mapping) for s in signals)
                or not (reply is None or isinstance(reply, str))):
            raise ValueError(f"not a pool call's message (pool, signals, reply): {args!r}")
        # The same check as the caller's: a message no caller sends is refused here, not
        # by whatever would fail on it later (an agent checked out and never back).
        call_timeout = seconds("call_timeout", data.get("call_timeout"),
                               none="no bound on the work")
        model = data.get("model")
        return cls(pool=pool, signals=signals, deadline=deadline, call_timeout=call_timeout,
                   transaction=bool(data.get("transaction", False)),
                   stream=bool(data.get("stream", False)), copy=copy, reply=reply,
                   sent=sent, model=None if model is None else model_id(model))

    @property
    def label(self) -> str:
        """What the message runs, for logs and errors: its signal types."""
        return ",".join(str(signal.get("type")) for signal in self.signals)

    def argsrepr(self) -> str:
        """What worker logs and monitors show for the message (the signals by type and
        id, not in full)."""
        kinds = ", ".join(f"{signal.get('type')}#{signal.get('id')}" for signal in self.signals)
        model = "" if self.model is None else f", model={self.model!r}"
        return f"({self.pool!r}, [{kinds}]{model})"


def _optional_float(value: Any) -> float | None:
    if value is None:
        return None
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"not a finite number: {value!r}")
    return number

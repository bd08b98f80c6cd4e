"""The arguments of the public calls, checked before anything is sent or waited for.

One place for the blocking and the asyncio callers, the local pool and the HTTP gateway:
each entry point passes its arguments through these functions first, so a bad one is an
:class:`~.errors.InvalidArgument` naming the argument, the value and what is allowed,
never a ``TypeError`` from deep inside, an ``OverflowError`` from the clock or a redis
``ResponseError`` from an expiry the server cannot hold.

Seconds (timeouts and deadlines) are finite numbers (``int`` or ``float``, never
``bool``) from :data:`MIN_SECONDS` to :data:`MAX_SECONDS`: one day, which the clock
(``time_t``), Redis expiries (``EX``/``PX``) and broker message expiries all hold with
room to spare, and past which a deadline is a mistake rather than a wish. What ``None``
means is each argument's own, and said where it is taken:

=========================================  ============================================
argument                                   ``None`` means
=========================================  ============================================
``timeout`` of call, transaction, stream,  refused: a call's wait to start is always
map, status, nodes                         bounded (its message carries that deadline)
``timeout`` of cast                        no deadline: the cast waits for an agent as
                                           long as it takes
``call_timeout`` (every call)              no bound on the work
``timeout`` of a local checkout or call    wait as long as it takes (``0``: do not wait)
=========================================  ============================================
"""

from __future__ import annotations

import numbers
import re
from collections.abc import AsyncIterable, Iterable, Mapping
from typing import Any, overload

from .errors import InvalidArgument
from .signal import Signal

__all__ = [
    "MAX_SECONDS",
    "MIN_SECONDS",
    "call_timeouts",
    "cast_timeouts",
    "checkout_timeout",
    "count",
    "flag",
    "local_timeouts",
    "model_id",
    "pool_model",
    "pool_name",
    "seconds",
    "signal_list",
    "signal_source",
]

#: The longest timeout or deadline any call takes: one day, in seconds.
MAX_SECONDS = 86_400.0
#: The shortest timeout a call over the broker takes: a millisecond, the finest grain of
#: a Redis expiry (``PX``); a shorter one could never be met anyway.
MIN_SECONDS = 0.001
#: A model id: 1 to 128 characters, a letter or digit first, then letters, digits and
#: ``. _ - : / @ +`` (``tenant-42``, ``org/model@v2``): safe in a message, a Redis key, a
#: queue name, an HTTP header and a metrics label alike.
MODEL_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,127}")
_MODEL_ALLOWED = ("a model id (a str of 1 to 128 characters: a letter or digit, then "
                  "letters, digits and . _ - : / @ +)")
#: The longest ``repr`` of a refused value that an error carries.
_REPR_MOST = 80


@overload
def seconds(name: str, value: Any, *, none: None = None, minimum: float = ...) -> float: ...


@overload
def seconds(name: str, value: Any, *, none: str, minimum: float = ...) -> float | None: ...


def seconds(name: str, value: Any, *, none: str | None = None,
            minimum: float = MIN_SECONDS) -> float | None:
    """``value`` as a number of seconds from ``minimum`` to :data:`MAX_SECONDS`.

    Arguments:
        name: the argument's name, for the error.
        none: what ``None`` means for this argument (then ``None`` is returned as it
            is); without it ``None`` is refused.
        minimum: the smallest value taken (``0`` where "do not wait" makes sense).

    Raises:
        InvalidArgument: not a number, or not finite, or out of that range.
    """
    allowed = f"a number of seconds from {minimum:g} to {MAX_SECONDS:g}" + (
        f", or None ({none})" if none else "")
    if value is None:
        if none:
            return None
        raise _invalid(name, value, allowed)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise _invalid(name, value, allowed, kind=True)
    try:
        number = float(value)
    except (OverflowError, ValueError):  # an int past a float's range, say
        raise _invalid(name, value, allowed) from None
    if not minimum <= number <= MAX_SECONDS:  # nan fails every comparison
        raise _invalid(name, value, allowed)
    return number


def count(name: str, value: Any, *, minimum: int = 1) -> int:
    """``value`` as an integer of at least ``minimum`` (a ``bool`` is not one here).

    Raises:
        InvalidArgument: not an integer, or below ``minimum``.
    """
    allowed = f"an integer of at least {minimum}"
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise _invalid(name, value, allowed, kind=True)
    if value < minimum:
        raise _invalid(name, value, allowed)
    return int(value)


def flag(name: str, value: Any) -> bool:
    """``value``, which must be ``True`` or ``False``.

    Raises:
        InvalidArgument: anything else (a string "false" would be true).
    """
    if not isinstance(value, bool):
        raise _invalid(name, value, "True or False", kind=True)
    return value


def pool_name(value: Any) -> str:
    """``value``, which must be a pool's name (a string).

    Raises:
        InvalidArgument: not a string. (A string naming no pool is
            :class:`~.errors.UnknownPool`, where the pools are known.)
    """
    if not isinstance(value, str):
        raise _invalid("pool", value, "a pool's name (a str)", kind=True)
    return value


def model_id(value: Any) -> str:
    """``value``, which must be a model id (see :data:`MODEL_ID`).

    Raises:
        InvalidArgument: not a str, or not of that form.
    """
    if not isinstance(value, str):
        raise _invalid("model", value, _MODEL_ALLOWED, kind=True)
    if MODEL_ID.fullmatch(value) is None:
        raise _invalid("model", value, _MODEL_ALLOWED)
    return value


def pool_model(pool: str, max_models: int | None, value: Any) -> str | None:
    """The checked ``model`` of a call on ``pool``: a model id when the pool is
    multiplexed (``max_models`` set), ``None`` when it is not.

    Raises:
        InvalidArgument: a model id is missing for a multiplexed pool, given to a pool
            that is not one, or not of the form :data:`MODEL_ID` says.
    """
    if max_models is None:
        if value is None:
            return None
        raise _invalid("model", value, f"None: pool {pool!r} serves no models by id "
                       "(its max_models is not set)")
    if value is None:
        raise _invalid("model", value, f"{_MODEL_ALLOWED}: pool {pool!r} holds many "
                       f"models (max_models={max_models}), so each call names one")
    return model_id(value)


def signal_list(value: Any) -> Iterable[Any]:
    """``value``, which must be an iterable of signals (a transaction's), not one signal.

    Raises:
        InvalidArgument: not an iterable, or one signal (a mapping, a string) given
            where a list of them is expected.
    """
    if not isinstance(value, Iterable) or _one_signal(value):
        raise _invalid("signals", value, "an iterable of signals (a list, say)", kind=True)
    return value


def signal_source(value: Any) -> Iterable[Any] | AsyncIterable[Any]:
    """``value``, which must be an iterable or an async iterable of signals (a map's).

    Raises:
        InvalidArgument: neither, or one signal given where many are expected.
    """
    if not isinstance(value, Iterable | AsyncIterable) or _one_signal(value):
        raise _invalid("signals", value, "an iterable or async iterable of signals",
                       kind=True)
    return value


def call_timeouts(timeout: Any, call_timeout: Any) -> tuple[float, float | None]:
    """The checked ``timeout`` and ``call_timeout`` of a call, transaction, stream or map.

    Raises:
        InvalidArgument: see :func:`seconds`; ``timeout`` may not be ``None``.
    """
    return (seconds("timeout", timeout),
            seconds("call_timeout", call_timeout, none="no bound on the work"))


def cast_timeouts(timeout: Any, call_timeout: Any) -> tuple[float | None, float | None]:
    """The checked ``timeout`` and ``call_timeout`` of a cast (both may be ``None``).

    Raises:
        InvalidArgument: see :func:`seconds`.
    """
    return (seconds("timeout", timeout, none="no deadline: it waits for an agent"),
            seconds("call_timeout", call_timeout, none="no bound on the work"))


def checkout_timeout(timeout: Any) -> float | None:
    """The checked ``timeout`` of a local checkout: ``0`` does not wait, ``None`` waits
    as long as it takes.

    Raises:
        InvalidArgument: see :func:`seconds`.
    """
    return seconds("timeout", timeout, none="wait as long as it takes", minimum=0.0)


def local_timeouts(timeout: Any, call_timeout: Any) -> tuple[float | None, float | None]:
    """The checked ``timeout`` (see :func:`checkout_timeout`) and ``call_timeout`` of a
    local pool's call, transaction or stream.

    Raises:
        InvalidArgument: see :func:`seconds`.
    """
    return (checkout_timeout(timeout),
            seconds("call_timeout", call_timeout, none="no bound on the work"))


def _one_signal(value: Any) -> bool:
    # A mapping or a string is one signal (or its JSON), though Python iterates it.
    return isinstance(value, str | bytes | Mapping | Signal)


def _invalid(name: str, value: Any, allowed: str, *, kind: bool = False) -> InvalidArgument:
    shown = _shown(value)
    got = f"{type(value).__name__} {shown}" if kind else shown
    return InvalidArgument(f"{name} must be {allowed}, got {got}", name, shown, allowed)


def _shown(value: Any) -> str:
    try:
        text = repr(value)
    except Exception:  # a repr that fails must not hide the real error
        text = f"<{type(value).__name__}>"
    if len(text) > _REPR_MOST:
        text = text[:_REPR_MOST - 3] + "..."
    return text

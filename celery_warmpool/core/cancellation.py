"""Cancellation: how a running action learns that its caller no longer wants the answer.

A :class:`Cancellation` is handed to :meth:`Agent.handle` or :meth:`Agent.stream` and
reaches the action as ``context.cancellation``; the action reads ``context.cancelled``
to stop long work early. Whoever owns the call cancels it with :meth:`Cancellation.cancel`
(a local caller, from any thread) or through a ``probe``: a worker cannot be told of a
remote caller's cancellation directly, so it gives a probe that checks a cancel mark,
asked at most every ``probe_interval`` seconds however often ``cancelled`` is read.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Final

from .errors import WarmPoolError

__all__ = ["NEVER", "Cancellation"]

logger = logging.getLogger(__name__)

#: Seconds between two asks of a probe, by default.
PROBE_INTERVAL: Final = 0.05


class Cancellation:
    """Whether a call was cancelled; thread-safe.

    Arguments:
        probe: asked whether the call was cancelled elsewhere (a cancel mark in Redis,
            say) when ``cancelled`` is read and not yet set; once it says yes the
            cancellation is set for good. A probe that raises is logged once and taken
            as "not cancelled".
        probe_interval: the fewest seconds between two asks of ``probe``.
        clock: the clock that spaces the probes (tests give their own).
    """

    __slots__ = ("_clock", "_event", "_lock", "_next_probe", "_probe", "_probe_failed",
                 "_probe_interval")

    def __init__(self, probe: Callable[[], bool] | None = None, *,
                 probe_interval: float = PROBE_INTERVAL,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._event = threading.Event()
        self._probe = probe
        self._probe_interval = probe_interval
        self._clock = clock
        self._next_probe = float("-inf")
        self._probe_failed = False
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<Cancellation cancelled={self._event.is_set()}>"

    def cancel(self) -> None:
        """Cancel the call: ``cancelled`` is true from now on. Safe to call twice."""
        self._event.set()

    @property
    def cancelled(self) -> bool:
        """Whether the call was cancelled (asking the probe, if one is due)."""
        if self._event.is_set():
            return True
        if self._probe is None:
            return False
        return self._ask_probe()

    def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for a cancellation; return ``cancelled``.

        An action that pauses between steps waits here instead of sleeping, so that a
        cancellation ends the pause at once (or within ``probe_interval`` via a probe).
        """
        if self._probe is None:
            return self._event.wait(timeout)
        deadline = time.monotonic() + timeout
        while not self.cancelled:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            self._event.wait(min(remaining, self._probe_interval))
        return True

    def _ask_probe(self) -> bool:
        probe = self._probe
        assert probe is not None
        with self._lock:
            now = self._clock()
            if now < self._next_probe:
                return False
            self._next_probe = now + self._probe_interval
        try:
            cancelled = bool(probe())
        except Exception:
            if not self._probe_failed:
                self._probe_failed = True
                logger.exception("cancellation probe %r failed; taken as not cancelled "
                                 "(logged once)", probe)
            return False
        if cancelled:
            self._event.set()
        return cancelled


class _Never(Cancellation):
    """The cancellation of calls given none: never cancelled, and not cancellable."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "<Cancellation NEVER>"

    def cancel(self) -> None:
        """Refuse: ``NEVER`` is shared by every call made without a cancellation.

        Raises:
            WarmPoolError: always; give the call its own :class:`Cancellation` instead.
        """
        raise WarmPoolError("NEVER is shared by every call given no cancellation and "
                            "cannot be cancelled: pass the call its own Cancellation()")


#: The default: a call that nobody can cancel.
NEVER: Final[Cancellation] = _Never()

"""Slot: the record of one live agent in a pool, from its warm-up to its retirement.

A slot knows what the pool needs to decide about its agent: how often it was lent
(``max_uses``), how old it is (``max_age``), since when it has been idle (health checks,
``overflow_ttl``) or lent (how long it was held), whether it is an overflow agent, and,
once it left the pool, why (:attr:`Slot.retired`). The lending policy reads and changes
slots under the pool's lock; nothing here locks or does I/O.
"""

from __future__ import annotations

from typing import Any, Final

__all__ = ["CLOSED", "DISMISSED", "Slot"]

#: What becomes of a slot that left the pool: torn down only (the pool closed), or
#: dismissed without a replacement (overflow, or surplus after a resize). Any other
#: retire reason (``"max_uses=5 reached"``) means: replaced by a fresh base agent.
CLOSED: Final = "closed"
DISMISSED: Final = "dismissed"


class Slot:
    """One live agent and what its pool knows about it."""

    __slots__ = ("agent", "created", "lent_at", "out", "overflow", "retired", "returned",
                 "uses")

    def __init__(self, agent: Any, overflow: bool, now: float) -> None:
        """Record ``agent``, warm at ``now`` (on the pool's clock)."""
        self.agent = agent
        self.overflow = overflow
        #: On the pool's clock: when it was built (``max_age``), when it last came back
        #: (health checks, ``overflow_ttl``).
        self.created = now
        self.returned = now
        #: On ``time.monotonic()``: when it was last lent (how long it was held).
        self.lent_at = 0.0
        self.uses = 0
        #: Whether a caller holds it now.
        self.out = False
        #: Why it left the pool (``CLOSED``, ``DISMISSED`` or why it is replaced), or
        #: ``None`` while it belongs to the pool.
        self.retired: str | None = None

    def __repr__(self) -> str:
        where = "out" if self.out else f"retired: {self.retired}" if self.retired else "idle"
        kind = "overflow" if self.overflow else "base"
        return f"<Slot {self.agent!r} {kind} uses={self.uses} {where}>"

    @property
    def replaced(self) -> bool:
        """Whether it left the pool to be replaced by a fresh base agent."""
        return self.retired is not None and self.retired not in (CLOSED, DISMISSED)

    def worn_out(self, now: float, max_uses: int | None, max_age: float | None) -> str | None:
        """Why it must be recycled (``max_uses`` or ``max_age`` reached), or ``None``."""
        if max_uses is not None and self.uses >= max_uses:
            return f"max_uses={max_uses} reached"
        return self.too_old(now, max_age)

    def too_old(self, now: float, max_age: float | None) -> str | None:
        """Why it must be recycled for its age, or ``None``."""
        if max_age is not None and now - self.created >= max_age:
            return f"max_age={max_age}s reached"
        return None

    def health_check_due(self, now: float, interval: float | None) -> bool:
        """Whether it has been idle ``interval`` seconds or more since it came back."""
        return interval is not None and now - self.returned >= interval

    def broken_reason(self) -> str | None:
        """Why its agent is broken (see ``discard_on``), or ``None``."""
        broken = self.agent.broken
        if broken is None:
            return None
        return f"broken: {type(broken).__name__}: {broken}"

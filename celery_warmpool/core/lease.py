"""Lender: what work done on a lent agent needs of the pool that lent it, and no more.

:class:`~.work.AgentWork` (calls, transactions, batches, streams) and
:class:`~.batching.Batcher` are written against this interface, not against
:class:`~.pool.AgentPool`: they borrow an agent, give it back (or give it up to
overrunning work), and count what they did. So they can be tested with any lender, and
the pool's modules and theirs do not name each other in a circle.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any, Protocol, TypeVar

from .agent import Agent
from .counters import Counters

__all__ = ["Lease", "Lender"]

AgentT = TypeVar("AgentT", bound=Agent[Any])


class Lease:
    """Whether a lent agent was abandoned to overrunning work (and so not checked in)."""

    __slots__ = ("abandoned",)

    def __init__(self) -> None:
        self.abandoned = False


class Lender(Protocol[AgentT]):
    """Lends agents and takes them back; :class:`~.pool.AgentPool` is one."""

    @property
    def name(self) -> str:
        """The pool's name (errors name it)."""

    @property
    def size(self) -> int:
        """Base agents (errors quote it)."""

    @property
    def max_overflow(self) -> int:
        """Overflow agents allowed (errors quote it)."""

    @property
    def counters(self) -> Counters:
        """Where the work done on its agents is counted."""

    @property
    def agent_class(self) -> type[Agent[Any]] | None:
        """The class of its agents, once one was built (routes are read from it)."""

    def checkout(self, block: bool = True, timeout: float | None = None,
                 model: str | None = None) -> AgentT:
        """Lend an agent, holding ``model`` if one is named (see
        :meth:`AgentPool.checkout <.pool.AgentPool.checkout>`)."""

    def checkin(self, agent: AgentT) -> None:
        """Take a lent agent back."""

    def lent(self, agent: AgentT) -> AbstractContextManager[Lease]:
        """Check ``agent`` in when the block ends, unless the lease is abandoned."""

    def abandon(self, agent: AgentT, reason: str) -> None:
        """Give up a lent agent still busy with overrunning work; rebuild its place."""

    def finish_abandoned(self, agent: AgentT) -> None:
        """Tear down an abandoned agent once its overrunning work ended."""

"""AgentReply: what a handled signal returns to its caller."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

__all__ = ["AgentReply"]


class AgentReply(BaseModel):
    """The outcome of one signal handled by one agent.

    ``result`` is what the action returned for the caller: the ``value`` of a
    :class:`~celery_warmpool.core.action.Result`, or the state updates of a returned dict
    (resource fields left out). ``state`` is the agent's public state after the call, or
    ``None`` when its pool leaves state out of replies (``reply_state=False``).
    """

    model_config = ConfigDict(frozen=True)

    pool: str | None = None
    agent_id: str
    node: str | None = None
    pid: int
    signal_id: str
    signal_type: str
    action: str
    result: Any = None
    state: dict[str, Any] | None = None
    duration: float

    def to_wire(self) -> dict[str, Any]:
        """The reply as JSON-compatible data (every field already is), empty fields left
        out: a state the pool does not send, say."""
        return {name: value for name, value in self.__dict__.items() if value is not None}

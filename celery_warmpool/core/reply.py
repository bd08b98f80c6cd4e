"""AgentReply: what a handled signal returns to its caller."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

__all__ = ["AgentReply"]


class AgentReply(BaseModel):
    """The outcome of one signal handled by one agent.

    ``result`` is what the action returned (the state updates, resource fields left out);
    ``state`` is the agent's public state after the call.
    """

    model_config = ConfigDict(frozen=True)

    pool: str | None
    agent_id: str
    node: str | None
    pid: int
    signal_id: str
    signal_type: str
    action: str
    result: dict[str, Any]
    state: dict[str, Any]
    duration: float

    def to_wire(self) -> dict[str, Any]:
        """The reply as JSON-compatible data (every field already is)."""
        return dict(self.__dict__)

"""Warm, bounded, observable pools of long-lived agents, for Celery workers and beyond.

The core (:mod:`celery_warmpool.core`: :class:`Signal`, :class:`Action`, :class:`Agent`,
:class:`AgentPool`) imports no Celery; :class:`WarmPool` puts pools inside Celery workers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .core import (
    Action,
    ActionContext,
    ActionFailed,
    Agent,
    AgentLost,
    AgentPool,
    AgentReply,
    AgentState,
    BatchAction,
    BrokerUnavailable,
    CallTimeout,
    Cancellation,
    CheckoutTimeout,
    ConfigurationError,
    HandedBack,
    InvalidArgument,
    InvalidSignal,
    ModelLoadFailed,
    NoParams,
    NotCheckedOut,
    PoolBusy,
    PoolClosed,
    PoolCounters,
    PoolError,
    PoolExhausted,
    PoolOptions,
    PoolSpec,
    PoolStartError,
    PoolStatus,
    Result,
    Signal,
    SignalError,
    Stream,
    StreamNotFinished,
    UnknownPool,
    UnknownSignal,
    WarmPoolError,
    WorkerFailed,
    resource,
    telemetry,
)

if TYPE_CHECKING:
    from .extension import WarmPool

__version__ = "0.2.0"

__all__ = [
    "Action",
    "ActionContext",
    "ActionFailed",
    "Agent",
    "AgentLost",
    "AgentPool",
    "AgentReply",
    "AgentState",
    "BatchAction",
    "BrokerUnavailable",
    "CallTimeout",
    "Cancellation",
    "CheckoutTimeout",
    "ConfigurationError",
    "HandedBack",
    "InvalidArgument",
    "InvalidSignal",
    "ModelLoadFailed",
    "NoParams",
    "NotCheckedOut",
    "PoolBusy",
    "PoolClosed",
    "PoolCounters",
    "PoolError",
    "PoolExhausted",
    "PoolOptions",
    "PoolSpec",
    "PoolStartError",
    "PoolStatus",
    "Result",
    "Signal",
    "SignalError",
    "Stream",
    "StreamNotFinished",
    "UnknownPool",
    "UnknownSignal",
    "WarmPool",
    "WarmPoolError",
    "WorkerFailed",
    "resource",
    "telemetry",
]


def __getattr__(name: str) -> Any:
    # The Celery side is imported on first use, so the core stays importable without
    # loading a Celery app.
    if name == "WarmPool":
        from .extension import WarmPool

        return WarmPool
    raise AttributeError(f"module 'celery_warmpool' has no attribute {name!r}")

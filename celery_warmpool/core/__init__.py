"""The agent model and the local pool: everything that works without Celery.

Nothing in this package imports celery, kombu or billiard (a test holds it to that):
an :class:`AgentPool` serves threads and greenlets of any program. The Celery side
(:mod:`celery_warmpool.worker`, :mod:`celery_warmpool.client`) builds on it.
"""

from __future__ import annotations

from . import telemetry
from .action import Action, ActionContext, BatchAction, NoParams, Result
from .agent import Agent, AgentState, resource
from .cancellation import Cancellation
from .errors import (
    ActionFailed,
    AgentLost,
    BrokerUnavailable,
    CallTimeout,
    CheckoutTimeout,
    ConfigurationError,
    HandedBack,
    InvalidArgument,
    InvalidSignal,
    ModelLoadFailed,
    NotCheckedOut,
    PoolBusy,
    PoolClosed,
    PoolError,
    PoolExhausted,
    PoolStartError,
    SignalError,
    StreamNotFinished,
    UnknownPool,
    UnknownSignal,
    WarmPoolError,
    WorkerFailed,
)
from .pool import AgentPool
from .reply import AgentReply
from .signal import Signal
from .spec import PoolOptions, PoolSpec
from .status import PoolCounters, PoolStatus
from .stream import Stream

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
    "WarmPoolError",
    "WorkerFailed",
    "resource",
    "telemetry",
]

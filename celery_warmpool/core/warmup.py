"""Warm-up: what a new agent does after ``setup()`` and before it serves its first call.

A model's first inference pays for set-up nobody ran before (allocations, kernels picked
and compiled, caches filled): measured with all-MiniLM-L6-v2, the first call after a
node was ready took three times a steady one. Triton's ``model_warmup`` answers it with
sample requests run before a model is marked ready; ``PoolSpec(warmup=[signal, ...])``
does the same here: each agent handles those signals after ``setup()``, before it is
placed in its pool, so the first caller finds it warm. In a multiplexed pool the agent
first loads each of the pool's ``models`` and handles the signals once per model, with
that model (``context.model``); a model loaded ahead later (``pool.models.load``) is
warmed the same way.

Warm-up replies are dropped and counted nowhere (not in the pool's counters, not in
its call metrics: ``agent.warming`` is true meanwhile); the models loaded are counted as
loads. A warm-up that fails fails the agent's start, as a failing ``setup()`` does: the
pool retries it with back-off and reports the error.
"""

from __future__ import annotations

import time
from typing import Any

from .counters import Counters
from .errors import WarmPoolError
from .models import load_failed
from .signal import Signal

__all__ = ["warm_model", "warm_up"]


def warm_up(agent: Any, models: tuple[str, ...], signals: tuple[Signal, ...],
            counters: Counters) -> float | None:
    """Load ``models`` on a new ``agent`` (an :class:`~.agent.Agent`) and handle
    ``signals`` (per model, in a multiplexed pool); the seconds it took, or ``None`` when
    there was nothing to do.

    Raises:
        ModelLoadFailed: a model's load failed.
        InvalidSignal, UnknownSignal, ActionFailed: a warm-up signal failed (the message
            says it was the warm-up's).
    """
    if not (models if agent.models is not None else signals):
        return None
    started = time.perf_counter()
    if agent.models is None:
        _handle(agent, signals, None)
    for model_id in models:
        try:
            _, evicted = agent.models.load(model_id)
        except Exception as exc:
            raise load_failed(agent.pool_name, model_id, exc,
                              f"on {agent!r} before it served") from exc
        counters.add(model_loads=1, model_evictions=len(evicted))
        _handle(agent, signals, model_id)
    return time.perf_counter() - started


def warm_model(agent: Any, model_id: str, signals: tuple[Signal, ...]) -> None:
    """Handle the warm-up ``signals`` for ``model_id``, which ``agent`` just loaded ahead
    of its calls.

    Raises:
        What :func:`warm_up` raises for a signal.
    """
    _handle(agent, signals, model_id)


def _handle(agent: Any, signals: tuple[Signal, ...], model_id: str | None) -> None:
    """Handle each warm-up signal, its reply dropped."""
    agent.warming = True
    try:
        for signal in signals:
            try:
                agent.handle(signal, model=model_id)
            except WarmPoolError as exc:
                # The same error, saying where it came from (errors take cls(*args)).
                model = f" for model {model_id!r}" if model_id else ""
                raise type(exc)(f"warm-up signal {signal.type!r}{model} failed on "
                                f"{agent!r}: {exc}", *exc.args[1:]) from exc
    finally:
        agent.warming = False

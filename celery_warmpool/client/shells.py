"""The two shells that carry out a call's steps (see :mod:`.protocol`).

:func:`run_blocking` does each step in the calling thread; :func:`run_async` awaits each
on the caller's event loop, publishing on a thread of the publisher's pool so that the
loop never blocks. An error a step raises is thrown into the steps, so the call decides
what it means; a caller that stops waiting (``KeyboardInterrupt``, a cancelled
coroutine) is thrown in the same way, so the call cleans up after itself.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import Executor
from typing import Any, TypeVar

from .protocol import Pause, Publish, Receive, Step, Steps

__all__ = ["run_async", "run_blocking"]

T = TypeVar("T")


def run_blocking(steps: Steps[T]) -> T:
    """Carry ``steps`` out in this thread; return what they return."""
    step = _advance(steps, None)
    while not isinstance(step, _Done):
        try:
            outcome = _do(step)
        except BaseException as exc:  # thrown into the steps, which decide
            step = _advance(steps, None, exc)
        else:
            step = _advance(steps, outcome)
    return step.value  # type: ignore[no-any-return]


async def run_async(steps: Steps[T], executor: Executor) -> T:
    """Carry ``steps`` out on the running event loop; return what they return."""
    step = _advance(steps, None)
    while not isinstance(step, _Done):
        try:
            outcome = await _ado(step, executor)
        except BaseException as exc:  # CancelledError included: the steps clean up
            step = _advance(steps, None, exc)
        else:
            step = _advance(steps, outcome)
    return step.value  # type: ignore[no-any-return]


class _Done:
    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value


def _advance(steps: Steps[Any], outcome: Any, error: BaseException | None = None,
             ) -> Step | _Done:
    """The next step, given the last one's outcome (or error); ``_Done`` at the end."""
    try:
        return steps.send(outcome) if error is None else steps.throw(error)
    except StopIteration as stop:
        return _Done(stop.value)


def _do(step: Step) -> Any:
    if isinstance(step, Receive):
        return step.mailbox.take(step.timeout)
    if isinstance(step, Publish):
        return step.send()
    time.sleep(step.seconds)
    return None


async def _ado(step: Step, executor: Executor) -> Any:
    if isinstance(step, Receive):
        return await step.mailbox.atake(step.timeout)
    if isinstance(step, Publish):
        return await asyncio.get_running_loop().run_in_executor(executor, step.send)
    assert isinstance(step, Pause)
    await asyncio.sleep(step.seconds)
    return None

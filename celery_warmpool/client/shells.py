"""The shells that carry out a call's steps (see :mod:`.protocol`).

The blocking shell does each step in the calling thread; the asyncio shell awaits each on
the caller's event loop, publishing on a thread of the publisher's pool so that the loop
never blocks. Both stop at a :class:`Deliver` step (a stream's chunk for its reader) and
at the end. An error a step raises is thrown into the steps, so the call decides what it
means; a caller that stops waiting (``KeyboardInterrupt``, a cancelled coroutine, a
closed stream) is thrown or closed in the same way, so the call cleans up after itself.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Generator
from concurrent.futures import Executor
from typing import Any, Generic, Self, TypeVar

from ..core.errors import StreamNotFinished
from ..core.reply import AgentReply
from ..core.stream import final_reply
from .protocol import Deliver, Pause, Publish, Receive, Step, Steps

__all__ = ["AsyncStream", "blocking_chunks", "run_async", "run_blocking"]

T = TypeVar("T")


class Done(Generic[T]):
    """The steps ended with ``value``."""

    __slots__ = ("value",)

    def __init__(self, value: T) -> None:
        self.value = value


def run_blocking(steps: Steps[T]) -> T:
    """Carry ``steps`` (which deliver nothing) out in this thread; return their value."""
    outcome = drive(steps, advance(steps, None))
    assert isinstance(outcome, Done), "a call's steps deliver no chunks"
    return outcome.value  # type: ignore[no-any-return]


async def run_async(steps: Steps[T], executor: Executor) -> T:
    """Carry ``steps`` out on the running event loop; return their value."""
    outcome = await adrive(steps, advance(steps, None), executor)
    assert isinstance(outcome, Done), "a call's steps deliver no chunks"
    return outcome.value  # type: ignore[no-any-return]


def blocking_chunks(steps: Steps[T]) -> Generator[Any, None, T]:
    """The chunks ``steps`` deliver, read in this thread; returns their value.

    Closing the generator closes the steps (they clean up: the caller left).
    """
    try:
        outcome = drive(steps, advance(steps, None))
        while isinstance(outcome, Deliver):
            yield outcome.chunk
            outcome = drive(steps, advance(steps, None))
        return outcome.value  # type: ignore[no-any-return]
    finally:
        steps.close()


class AsyncStream:
    """An async iterator of a streaming call's chunks; ``reply`` once it is exhausted.

    ::

        stream = warm.astream("writer", Signal.new("text.write", {"prompt": "pools"}))
        async for word in stream:
            print(word)
        print(stream.reply.duration)

    Leaving early: ``await stream.aclose()`` (or ``async with``): the agent's generator
    stops at its next ``yield``. A cancelled reading task does the same.
    """

    NotFinished = StreamNotFinished

    def __init__(self, steps: Steps[AgentReply], executor: Executor) -> None:
        self._steps = steps
        self._executor = executor
        self._reply: AgentReply | None = None
        self._over = False

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> Any:
        if self._over:
            raise StopAsyncIteration
        try:
            step = advance(self._steps, None)
            outcome = await adrive(self._steps, step, self._executor)
        except BaseException:
            await self.aclose()
            raise
        if isinstance(outcome, Deliver):
            return outcome.chunk
        self._reply = outcome.value
        self._over = True
        raise StopAsyncIteration

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    @property
    def reply(self) -> AgentReply:
        """The call's final reply, once every chunk was read.

        Raises:
            StreamNotFinished: the stream is not exhausted, or was closed or failed.
        """
        return final_reply(self._reply, self._over)

    @property
    def closed(self) -> bool:
        """Whether the stream is over: exhausted, failed or closed."""
        return self._over

    async def aclose(self) -> None:
        """Stop reading: the work stops at its next ``yield``. Safe to call twice."""
        self._over = True
        self._steps.close()


def advance(steps: Steps[Any], outcome: Any, error: BaseException | None = None,
            ) -> Step | Done[Any]:
    """The next step, given the last one's outcome (or error); :class:`Done` at the end."""
    try:
        return steps.send(outcome) if error is None else steps.throw(error)
    except StopIteration as stop:
        return Done(stop.value)


def drive(steps: Steps[Any], step: Step | Done[Any]) -> Deliver | Done[Any]:
    """Do steps in this thread up to the next chunk to deliver, or the end."""
    while not isinstance(step, Deliver | Done):
        try:
            outcome = _do(step)
        except BaseException as exc:  # thrown into the steps, which decide
            step = advance(steps, None, exc)
        else:
            step = advance(steps, outcome)
    return step


async def adrive(steps: Steps[Any], step: Step | Done[Any],
                 executor: Executor) -> Deliver | Done[Any]:
    """Await steps up to the next chunk to deliver, or the end."""
    while not isinstance(step, Deliver | Done):
        try:
            outcome = await _ado(step, executor)
        except BaseException as exc:  # CancelledError included: the steps clean up
            step = advance(steps, None, exc)
        else:
            step = advance(steps, outcome)
    return step


def _do(step: Step) -> Any:
    if isinstance(step, Receive):
        return step.mailbox.take(step.timeout)
    if isinstance(step, Publish):
        return step.send()
    assert isinstance(step, Pause)
    time.sleep(step.seconds)
    return None


async def _ado(step: Step, executor: Executor) -> Any:
    if isinstance(step, Receive):
        return await step.mailbox.atake(step.timeout)
    if isinstance(step, Publish):
        if step.asend is not None:
            return await step.asend()
        return await asyncio.get_running_loop().run_in_executor(executor, step.send)
    assert isinstance(step, Pause)
    await asyncio.sleep(step.seconds)
    return None

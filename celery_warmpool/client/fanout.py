"""Fan-out: one call per signal, many in flight, replies in the order of the signals.

:func:`afan_out` is written once, on asyncio: it reads the signals lazily (so a million of
them need memory for ``concurrency`` at a time), keeps at most ``concurrency`` calls in
flight, and yields each reply in input order. :func:`fan_out` drives the same iterator
from one thread on a private event loop, so ``warm.map`` needs no thread per call.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterable, Iterable, Iterator
from typing import TYPE_CHECKING

from ..core.arguments import call_timeouts, count, flag, model_id, pool_name, signal_source
from ..core.reply import AgentReply

if TYPE_CHECKING:
    from .calls import PoolClient, SignalLike

__all__ = ["afan_out", "fan_out"]


def afan_out(client: PoolClient, pool: str,
             signals: Iterable[SignalLike] | AsyncIterable[SignalLike], *,
             concurrency: int = 64, timeout: float = 5.0, call_timeout: float | None = 5.0,
             return_exceptions: bool = False,
             model: str | None = None) -> AsyncGenerator[AgentReply | Exception]:
    """Call ``pool`` with each of ``signals`` (each for ``model``, in a pool with
    ``max_models``); yield the replies in the signals' order.

    At most ``concurrency`` calls are in flight. The first error is raised where its
    reply would be (and the calls still in flight are cancelled), or, with
    ``return_exceptions``, yielded in its place.

    Raises:
        InvalidArgument: here, before any call: ``concurrency`` is not an integer of at
            least 1, or another argument is out of range or of the wrong type.
        What :meth:`PoolClient.acall` raises, from the iteration.
    """
    pool, (timeout, call_timeout) = pool_name(pool), call_timeouts(timeout, call_timeout)
    return _fan_out(client, pool, signal_source(signals), count("concurrency", concurrency),
                    timeout, call_timeout, flag("return_exceptions", return_exceptions),
                    None if model is None else model_id(model))


async def _fan_out(client: PoolClient, pool: str,
                   signals: Iterable[SignalLike] | AsyncIterable[SignalLike],
                   concurrency: int, timeout: float, call_timeout: float | None,
                   return_exceptions: bool,
                   model: str | None) -> AsyncGenerator[AgentReply | Exception]:
    source = _signals(signals)
    pending: deque[asyncio.Task[AgentReply]] = deque()
    try:
        while True:
            while len(pending) < concurrency:
                signal = await anext(source, None)
                if signal is None:
                    break
                pending.append(asyncio.ensure_future(client.acall(
                    pool, signal, timeout=timeout, call_timeout=call_timeout, model=model)))
            if not pending:
                return
            try:
                reply = await pending.popleft()
            except Exception as exc:
                if not return_exceptions:
                    raise
                yield exc
            else:
                yield reply
    finally:
        for task in pending:
            task.cancel()  # their callers are gone: cancel marks stop the unstarted ones
        with contextlib.suppress(BaseException):
            await asyncio.gather(*pending, return_exceptions=True)
        # Closed here, not by the garbage collector: that would schedule the closing on
        # the loop, which may be gone by then ("Task was destroyed but it is pending").
        await source.aclose()


def fan_out(client: PoolClient, pool: str, signals: Iterable[SignalLike], *,
            concurrency: int = 64, timeout: float = 5.0, call_timeout: float | None = 5.0,
            return_exceptions: bool = False,
            model: str | None = None) -> Iterator[AgentReply | Exception]:
    """:func:`afan_out` from one thread, for code without an event loop.

    Raises:
        InvalidArgument: here, before any call (see :func:`afan_out`).
        RuntimeError: called from a thread that runs an event loop (use ``amap`` there).
    """
    return _driven(afan_out(client, pool, signals, concurrency=concurrency, timeout=timeout,
                            call_timeout=call_timeout, return_exceptions=return_exceptions,
                            model=model))


def _driven(replies: AsyncGenerator[AgentReply | Exception]) -> Iterator[AgentReply | Exception]:
    """The items of ``replies``, read on a private event loop of this thread."""
    loop = asyncio.new_event_loop()
    try:
        while True:
            try:
                reply = loop.run_until_complete(anext(replies))
            except StopAsyncIteration:
                return
            yield reply
    finally:
        _wind_down(loop, replies)


def _wind_down(loop: asyncio.AbstractEventLoop,
               replies: AsyncGenerator[AgentReply | Exception]) -> None:
    """Close a fan-out's loop, however it was left (its end, ``break``, Ctrl-C).

    A ``KeyboardInterrupt`` may leave the loop with a task still waiting for the next
    reply: it is cancelled first (its calls in flight are cancelled with it), so that the
    generator can close and the interrupt goes on as it came.
    """
    pending = asyncio.all_tasks(loop)
    for task in pending:
        task.cancel()
    if pending:
        loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
    loop.run_until_complete(replies.aclose())
    loop.run_until_complete(loop.shutdown_asyncgens())
    loop.close()


async def _signals(signals: Iterable[SignalLike] | AsyncIterable[SignalLike],
                   ) -> AsyncGenerator[SignalLike]:
    if isinstance(signals, AsyncIterable):
        async for signal in signals:
            yield signal
    else:
        for signal in signals:
            yield signal

"""Stream: the reader's side of a streaming call, whatever carries its chunks.

A :class:`Stream` wraps a generator that yields chunks and returns the final
:class:`~celery_warmpool.core.reply.AgentReply` (a local agent's, or one that reads
chunks from a result store), plus what to do once it is over (check an agent in, drop a
subscription). It is that clean-up's one owner: it runs exactly once, when the stream
ends, fails, is closed, or is garbage collected unread.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Generator, Iterator
from typing import Any, Self

from .errors import StreamNotFinished
from .reply import AgentReply

__all__ = ["Stream", "drain"]


class Stream(Iterator[Any]):
    """An iterator of a call's chunks, in order; ``reply`` once it is exhausted.

    ::

        with pool.stream(Signal.new("text.generate", {"prompt": "pools"})) as stream:
            for word in stream:
                print(word, end=" ")
        print(stream.reply.state)

    An error raises from the iteration after the chunks that came before it. Leaving
    early (``break`` then :meth:`close`, the ``with`` block's end, or the stream being
    garbage collected) closes the generator, so the work stops at its next ``yield``.
    """

    NotFinished = StreamNotFinished

    def __init__(self, chunks: Generator[Any, None, AgentReply],
                 on_close: Callable[[], None] | None = None) -> None:
        """Read ``chunks``; call ``on_close`` once when the stream is over, however."""
        self._chunks = chunks
        self._reply: AgentReply | None = None
        self._over = False
        # Holds the generator and on_close, never self: so a stream dropped unread is
        # collected, and the finalizer then closes it.
        self._finalizer = weakref.finalize(self, _close, chunks, on_close)

    def __repr__(self) -> str:
        state = "finished" if self._reply is not None else "over" if self._over else "open"
        return f"<Stream {state}>"

    def __iter__(self) -> Self:
        return self

    def __next__(self) -> Any:
        if self._over:
            raise StopIteration
        try:
            return next(self._chunks)
        except StopIteration as stop:
            self._reply = stop.value
            self._end()
            raise StopIteration from None
        except BaseException:
            self._end()
            raise

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def reply(self) -> AgentReply:
        """The call's final reply, once every chunk was read.

        Raises:
            StreamNotFinished: the stream is not exhausted yet, or it was closed or
                failed before its end.
        """
        return final_reply(self._reply, self._over)

    @property
    def closed(self) -> bool:
        """Whether the stream is over: exhausted, failed or closed."""
        return self._over

    def close(self) -> None:
        """Stop reading: the work stops at its next ``yield``. Safe to call twice."""
        self._end()

    def _end(self) -> None:
        self._over = True
        self._finalizer()  # runs _close once, whoever calls first


def drain(chunks: Generator[Any, None, AgentReply]) -> AgentReply:
    """Run ``chunks`` to its end, dropping the chunks; return its final reply."""
    while True:
        try:
            next(chunks)
        except StopIteration as stop:
            reply: AgentReply = stop.value
            return reply


def final_reply(reply: AgentReply | None, over: bool) -> AgentReply:
    """A stream's final ``reply``, or why there is none (``over``: it was closed early
    or failed; otherwise it is still being read).

    Raises:
        StreamNotFinished: there is no final reply (yet).
    """
    if reply is None:
        why = "it was closed or failed before its end" if over else "read it to its end first"
        raise StreamNotFinished(f"this stream has no final reply: {why}")
    return reply


def _close(chunks: Generator[Any, None, AgentReply],
           on_close: Callable[[], None] | None) -> None:
    try:
        chunks.close()
    finally:
        if on_close is not None:
            on_close()

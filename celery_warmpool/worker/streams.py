"""Where a streaming action's chunks go: a Redis Stream in the result store.

Each chunk of a call's stream is written, straight from the process that produces it, as
one entry of the Redis Stream ``warmpool:stream:<task id>`` (kept for replay: a reader
that subscribed late, or reconnected, reads the entries it missed) and published on the
channel of the same name (so the caller's reply listener gets it at once, in order with
the call's final reply). One pipeline per chunk carries both.

The reader reports how far it has read (``warmpool:stream:<task id>:read``); the sink
reads that back at most every :data:`CHECK_INTERVAL` seconds, and with it the call's
cancel mark:

- a generator ``stream_buffer`` chunks ahead of its reader waits until the reader
  catches up, so a slow reader cannot fill the result store;
- a reader that has not read for ``stream_idle_timeout`` seconds while chunks wait for
  it (a crashed caller) cancels the work, as does a caller that closed the stream (its
  cancel mark): :class:`StreamCancelled` stops the generator at its ``yield``.

Both keys expire on their own after the call's window, and the reader deletes them once
it is done.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

from ..core.errors import BrokerUnavailable, StreamCancelled
from ..wire.marks import cancel_key, read_key, stream_key
from ..wire.outages import REDIS_OUTAGES, Outages, retry

__all__ = ["StreamSink"]

#: What says the result store cannot be reached (it is Redis: streams need it).
STORE_OUTAGES = Outages(REDIS_OUTAGES)
#: Seconds between two reads of the reader's position and the cancel mark.
CHECK_INTERVAL = 0.02
#: Seconds between two looks at the reader's position while the buffer is full: first
#: and longest.
WAIT_FIRST = 0.002
WAIT_MOST = 0.05


class StreamSink:
    """Sends one call's chunks to its reader (see the module); ``emit`` per chunk.

    Arguments:
        client: a (synchronous) Redis client of the result store.
        task_id: the call's task id.
        buffer: the most chunks the generator may run ahead of its reader.
        idle_timeout: seconds without a read, while chunks wait, before giving up.
        expires: seconds the chunks are kept at most.
        stopped: says whether the work was given up on already (its call overran).
    """

    def __init__(self, client: Any, task_id: str, *, buffer: int, idle_timeout: float,
                 expires: float, stopped: Callable[[], bool] = lambda: False,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.client = client
        self.key = stream_key(task_id)
        self.read_key = read_key(task_id)
        self.cancel_key = cancel_key(task_id)
        self.buffer = buffer
        self.idle_timeout = idle_timeout
        self.expires_ms = max(1000, int(expires * 1000))
        self.stopped = stopped
        self._clock = clock
        self.sent = 0
        self.read = 0
        self._read_moved = clock()
        self._next_check = 0.0

    def emit(self, chunk: Any) -> None:
        """Send ``chunk``; wait while the reader is ``buffer`` chunks behind.

        Raises:
            StreamCancelled: the caller closed the stream, stopped reading for
                ``idle_timeout`` seconds, or the work was given up on.
            BrokerUnavailable: the result store was unreachable for ``idle_timeout``.
        """
        if self.stopped():
            raise StreamCancelled("the call was given up on (it overran its call_timeout)")
        self.sent += 1
        payload = json.dumps({"i": self.sent, "c": chunk}, separators=(",", ":"))
        checking = self._clock() >= self._next_check or self.sent - self.read >= self.buffer
        results = self._execute(payload, checking)
        if checking:
            self._checked(results[-2], results[-1])
        while self.sent - self.read >= self.buffer:
            self._wait_for_reader()

    def _execute(self, payload: str, checking: bool) -> list[Any]:
        """Write one chunk (and read the reader's position if ``checking``)."""

        def commands(pipe: Any) -> None:
            # Trimmed to well past what a reader may lag: the buffer bounds the lag.
            pipe.xadd(self.key, {"d": payload}, maxlen=2 * self.buffer + 16, approximate=True)
            pipe.publish(self.key, payload)
            if checking:
                # Also now and then, not only with the first chunk: a reader that left
                # deletes the stream, and a chunk written after that makes it again.
                pipe.pexpire(self.key, self.expires_ms)
                pipe.get(self.read_key).exists(self.cancel_key)

        return self._retrying(commands)

    def _retrying(self, commands: Callable[[Any], None]) -> list[Any]:
        """Run ``commands`` in one pipeline; wait out a result store that is away.

        For ``idle_timeout`` at most. Writing a chunk again is safe: the reader drops a
        chunk whose index it has had.

        Raises:
            BrokerUnavailable: the result store was away for ``idle_timeout``.
        """
        def run() -> list[Any]:
            pipe = self.client.pipeline(transaction=False)
            commands(pipe)
            results: list[Any] = pipe.execute()
            return results

        def given_up(exc: BaseException) -> None:
            if self.stopped():
                raise exc

        try:
            return retry(run, STORE_OUTAGES, time.monotonic() + self.idle_timeout,
                         on_outage=given_up)
        except REDIS_OUTAGES as exc:
            raise BrokerUnavailable(
                f"the result store was unreachable for {self.idle_timeout:g}s "
                f"(stream_idle_timeout) while streaming: {type(exc).__name__}: {exc}",
                None, self.idle_timeout) from exc

    def _checked(self, read: bytes | None, cancelled: int) -> None:
        now = self._clock()
        self._next_check = now + CHECK_INTERVAL
        if cancelled:
            raise StreamCancelled("the caller closed the stream")
        position = int(read or 0)
        if position > self.read:
            self.read, self._read_moved = position, now
        elif self.sent > self.read and now - self._read_moved >= self.idle_timeout:
            raise StreamCancelled(
                f"the reader read nothing for {self.idle_timeout:g}s (stream_idle_timeout) "
                f"while {self.sent - self.read} chunks waited for it")

    def _wait_for_reader(self) -> None:
        delay = WAIT_FIRST
        while self.sent - self.read >= self.buffer:
            time.sleep(delay)
            delay = min(delay * 2, WAIT_MOST)
            if self.stopped():
                raise StreamCancelled("the call was given up on (it overran its "
                                      "call_timeout)")
            read, cancelled = self._retrying(
                lambda pipe: pipe.get(self.read_key).exists(self.cancel_key))
            self._checked(read, cancelled)

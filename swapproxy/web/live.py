# -*- test-case-name: tests.test_logbuffer -*-
"""
Writing an endless response (a log stream, an event stream) to a client that may read slowly.

A `LiveWriter` is the response's streaming producer: when the client's socket buffer is full,
twisted.web pauses it, and from then on what the writer is given waits in a bounded queue of its
own. What does not fit is dropped whole, and once the client catches up it is told how much it
missed. Whoever writes never waits and never makes swapproxy's memory grow.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from twisted.internet.interfaces import IPushProducer
from twisted.web.server import Request
from zope.interface import implementer

#: The most bytes queued for one paused client.
PENDING_LIMIT = 64 * 1024


def dropped_log_marker(count: int) -> bytes:
    """
    The line a log stream gets where ``count`` bytes were left out (llama-swap's words).
    """
    return f"\u2014 {count} bytes dropped \u2014\n".encode()


def dropped_event_marker(count: int) -> bytes:
    """
    The SSE comment an event stream gets where ``count`` bytes of events were left out.
    """
    return f": {count} bytes of events dropped\n\n".encode()


@implementer(IPushProducer)
class LiveWriter:
    """
    Writes pieces of an endless response, queueing at most ``limit`` bytes while the client is slow.

    Each piece is written whole or dropped whole, so a piece that is a complete line or a
    complete SSE event keeps the stream well-formed.

    :param request: the response; the writer registers itself as its streaming producer.
    :param marker: makes what is written where ``n`` bytes were dropped.
    :param limit: the most bytes queued while paused.
    :ivar dropped_total: every byte dropped so far.
    """

    def __init__(self, request: Request, marker: Callable[[int], bytes], limit: int = PENDING_LIMIT) -> None:
        self._request = request
        self._marker = marker
        self.limit = limit
        self._pending: deque[bytes] = deque()
        self._pending_size = 0
        self._dropped = 0
        self.dropped_total = 0
        self.paused = False
        self.closed = False
        request.registerProducer(self, True)

    @property
    def pending(self) -> int:
        """
        How many bytes wait for the client.
        """
        return self._pending_size

    def write(self, data: bytes) -> None:
        """
        Send ``data`` now, or queue it while the client is slow, or drop it if the queue is full.
        """
        if self.closed or not data:
            return
        if self.paused or self._pending or self._dropped:
            if self._pending_size + len(data) > self.limit:
                self._dropped += len(data)
                self.dropped_total += len(data)
            else:
                self._pending.append(data)
                self._pending_size += len(data)
            return
        self._request.write(data)

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        self._flush()

    def stopProducing(self) -> None:
        self._close_queue()

    def _flush(self) -> None:
        # A write can fill the socket buffer again, which pauses us at once: check every time.
        while self._pending and not self.paused and not self.closed:
            data = self._pending.popleft()
            self._pending_size -= len(data)
            self._request.write(data)
        if self._dropped and not self._pending and not self.paused and not self.closed:
            count, self._dropped = self._dropped, 0
            self._request.write(self._marker(count))

    def _close_queue(self) -> None:
        self.closed = True
        self._pending.clear()
        self._pending_size = 0

    def close(self, client_gone: bool) -> None:
        """
        Write nothing more; let go of the response unless the client has left.
        """
        self._close_queue()
        if not client_gone and self._request.producer is self:
            self._request.unregisterProducer()

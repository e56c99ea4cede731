# -*- test-case-name: tests.test_stall -*-
"""
Stalled models: the requests in flight on one model's process, watched for silence.

A model *stalls* when, while at least one of its responses waits for bytes, it sends nothing on
any of its responses for ``streamIdleTimeout`` (`swapproxy.config.HangLimits`) and its process
uses next to no CPU time meanwhile. A streaming request waits for bytes from the moment it is
sent; any other request once its head has arrived (a non-streaming answer is legitimately silent
until it is complete). Bytes on *any* response of the model count: a request that llama-server
keeps in its queue while it streams another answer is not a stall.

Why CPU time too: llama-server sends the head of a streaming answer at once and then nothing at
all, not even a log line, until it has processed the whole prompt (``python -m bench.prefill``),
which on a CPU can take many minutes. A process that prefills burns CPU; a frozen one (SIGSTOP,
a deadlock, a wait on a dead device) burns none.

`StallWatch` uses one timer per model, not per response or chunk: it samples the byte counts of
the responses a few times per timeout (`SAMPLES`), so the relay's hot path pays nothing. A stall
is therefore declared between 1 and 1 + 1/SAMPLES timeouts after the model's last byte, never
earlier.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime

#: Samples of the byte counts per timeout.
SAMPLES = 4
#: CPU seconds per second of silence at or above which a silent model counts as busy (a long
#: prompt being processed), not stalled. A frozen process uses none; llama-server answering
#: our health checks uses well under a thousandth.
BUSY_CPU = 0.05


class Relayed(Protocol):
    """
    What the watch needs of a response body being relayed (`swapproxy.web.relay.BodyRelay`).
    """

    bytes: int

    @property
    def paused(self) -> bool:
        """Whether the client's flow control has paused the model's connection."""

    def abort(self, error: BaseException) -> None:
        """End the relay now, as if the body had broken off with ``error``."""


class Stalled(Exception):
    """
    swapproxy gave up on a response because its model stopped answering.

    :ivar kind: ``stream_idle`` (the model went silent), ``health_check`` (its health check
        stopped answering) or ``response_header`` (no head within ``timeouts.responseHeader``).
    """

    def __init__(self, message: str, kind: str) -> None:
        super().__init__(message)
        self.kind = kind


class Exchange:
    """
    One request in flight on a model, as `StallWatch` sees it; made by `StallWatch.begin`, and
    a context manager that ends it.

    :ivar failure: why swapproxy gave up on it, once it has.
    """

    def __init__(self, watch: StallWatch, stream: bool) -> None:
        self._watch = watch
        self.stream = stream
        self.watched = stream
        self.relay: Relayed | None = None
        self.seen = 0
        self.failure: Stalled | None = None
        self._sending: Deferred[Any] | None = None
        self._head_timer: IDelayedCall | None = None

    def send(self, answer: Deferred[Any], header_timeout: float) -> Deferred[Any]:
        """
        Watch ``answer``, the Deferred of the response head: `fail` cancels it, and so does
        ``header_timeout`` seconds without a head (unless 0).

        :returns: ``answer``.
        """
        self._sending = answer
        if header_timeout > 0:
            self._head_timer = self._watch.clock.callLater(
                header_timeout,
                self.fail,
                Stalled(
                    f"model {self._watch.model_id!r} sent no response head within {header_timeout:g}s "
                    "(timeouts.responseHeader)",
                    "response_header",
                ),
            )
        answer.addBoth(self._answered)
        return answer

    def _answered(self, result: object) -> object:
        self._sending = None
        if self._head_timer is not None and self._head_timer.active():
            self._head_timer.cancel()
        self._head_timer = None
        return result

    def relaying(self, relay: Relayed) -> None:
        """
        The head has arrived and ``relay`` copies the body: from now on the body is watched.
        """
        self.relay = relay
        self._watch._progress(self)

    def end(self) -> None:
        """
        The request is over, however it ended (the end of a ``with`` block on the exchange).
        """
        self._watch.end(self)

    def __enter__(self) -> Exchange:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.end()

    def fail(self, error: Stalled) -> None:
        """
        Give up on this request: cancel the wait for its head, or end its relay.
        """
        if self.failure is not None:
            return
        self.failure = error
        if self._sending is not None:
            self._sending.cancel()
        elif self.relay is not None:
            self.relay.abort(error)


class StallWatch:
    """
    The requests in flight on one model's process, and the one timer that watches them.

    :param model_id: the model, named in messages.
    :param clock: the reactor's time.
    :param timeout: the current ``streamIdleTimeout`` (read at each sample: a reload may change it).
    :param cpu_seconds: the CPU time the model's process has used, or ``None`` when unknown.
    :param stalled: called with what happened when the model stalls (`Upstream.mark_unhealthy`,
        which fails the requests in flight); those still in flight after it are failed here.
    """

    def __init__(
        self,
        model_id: str,
        clock: IReactorTime,
        timeout: Callable[[], float],
        cpu_seconds: Callable[[], float | None],
        stalled: Callable[[str], None],
    ) -> None:
        self.model_id = model_id
        self.clock = clock
        self._timeout = timeout
        self._cpu_seconds = cpu_seconds
        self._stalled = stalled
        self.exchanges: list[Exchange] = []
        self._call: IDelayedCall | None = None
        self._events = 0
        self._seen_events = 0
        #: Since when the model has sent nothing while a response waited.
        self._quiet_since = 0.0
        #: The CPU time its process had used at the first sample of that silence, and when.
        self._cpu_mark: float | None = None
        self._cpu_mark_at = 0.0
        #: The last sample found the model stalled; this one confirms it after a round of I/O.
        self._confirming = False

    def begin(self, stream: bool) -> Exchange:
        """
        A request is being sent to the model.

        :param stream: whether the client asked for a stream: then silence counts from now.
        """
        exchange = Exchange(self, stream)
        if stream and not any(e.watched for e in self.exchanges):
            self._reset()
        self.exchanges.append(exchange)
        self._arm()
        return exchange

    def end(self, exchange: Exchange) -> None:
        """
        ``exchange`` is over (however it ended); calling it again does nothing.
        """
        if exchange not in self.exchanges:
            return
        if exchange.failure is None and exchange.relay is not None and exchange.relay.bytes != exchange.seen:
            self._events += 1
        self.exchanges.remove(exchange)
        # The timer is left to run out when the last request ends: cancelling it and arming a
        # new one for the next request would cost every request a timer.

    def stop(self) -> None:
        """
        Cancel the timer (the model's process has ended).
        """
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

    def fail_all(self, error: Stalled) -> None:
        """
        Give up on every request in flight (the model is being restarted).
        """
        for exchange in list(self.exchanges):
            exchange.fail(error)

    def _progress(self, exchange: Exchange) -> None:
        # A head arrived: the model answers. A body that was not watched is from now on.
        if not exchange.watched:
            if not any(e.watched for e in self.exchanges):
                self._reset()
            exchange.watched = True
        self._events += 1

    def _reset(self) -> None:
        # No CPU reading here: it walks the process tree, too dear for every request; the next
        # sample takes it.
        self._quiet_since = self.clock.seconds()
        self._cpu_mark = None
        self._seen_events = self._events

    def _arm(self, delay: float | None = None) -> None:
        timeout = self._timeout()
        if timeout <= 0 or not self.exchanges:
            return
        if self._call is not None and self._call.active():
            return
        self._call = self.clock.callLater(timeout / SAMPLES if delay is None else delay, self._sample)

    def _sample(self) -> None:
        self._call = None
        timeout = self._timeout()
        if timeout <= 0 or not self.exchanges:
            return
        progressed = self._events != self._seen_events
        self._seen_events = self._events
        watched = False
        for exchange in self.exchanges:
            relay = exchange.relay
            if relay is not None:
                if relay.bytes != exchange.seen:
                    exchange.seen = relay.bytes
                    progressed = True
                elif relay.paused:
                    progressed = True  # the client is slow; the model waits for it
            watched = watched or (exchange.watched and exchange.failure is None)
        now = self.clock.seconds()
        if progressed or not watched:
            self._reset()
        silent = now - self._quiet_since
        cpu = self._cpu_seconds() if silent > 0 else None
        if silent >= timeout:
            if self._cpu_mark is None and cpu is not None:
                # No CPU reading yet in this silence (a busy reactor ran the samples late): take
                # one now and judge at the next sample, never on no measurement at all.
                self._cpu_mark, self._cpu_mark_at = cpu, now
                self._arm(timeout / SAMPLES)
                return
            if self._busy(cpu, now):
                self._reset()  # processing a long prompt, say
            elif not self._confirming:
                # A reactor runs its timers before it reads its sockets: after a pause of its own,
                # the model's bytes may be waiting unread. Look again once they have been read.
                self._confirming = True
                self.clock.callLater(0, self.clock.callLater, 0, self._confirm)
                return
            else:
                self._stall(silent)
                return
        if self._cpu_mark is None and cpu is not None:
            self._cpu_mark, self._cpu_mark_at = cpu, now
        self._arm(min(timeout / SAMPLES, max(0.0, self._quiet_since + timeout - now)))

    def _confirm(self) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._sample()
        self._confirming = False

    def _busy(self, cpu: float | None, now: float) -> bool:
        """
        Whether the model's process used at least `BUSY_CPU` of a core since the first sample
        of its silence.
        """
        if cpu is None or self._cpu_mark is None or now <= self._cpu_mark_at:
            return False
        return cpu - self._cpu_mark >= BUSY_CPU * (now - self._cpu_mark_at)

    def _stall(self, silent: float) -> None:
        waiting = sum(1 for e in self.exchanges if e.watched and e.failure is None)
        what = (
            f"it sent nothing for {round(silent, 1):g}s (streamIdleTimeout) while {waiting} "
            f"response{'s' if waiting != 1 else ''} waited, and its process used no CPU"
        )
        self._stalled(what)
        self.fail_all(Stalled(f"model {self.model_id!r} stopped responding: {what}", "stream_idle"))

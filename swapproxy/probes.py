# -*- test-case-name: tests.test_upstream -*-
"""
The questions an upstream asks its model's health endpoint.

While the model starts, `HealthProbes` asks often (from `FIRST_PROBE_DELAY`, backing off to
`MAX_PROBE_DELAY`), and sooner when the child prints something that may mean it is ready, until
the answer is 200. While the model is ready, it asks every ``healthCheckInterval``, and says the
model is unhealthy once `HEALTH_CHECK_FAILURES` checks in a row have failed.

It keeps the timers and the probe that is out; what the answers mean for the model is the
`swapproxy.upstream.Upstream`'s, told through the callables it is given.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Callable
from typing import Literal

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.error import TimeoutError
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.python.failure import Failure

from swapproxy.config import ModelConfig

#: First delay between health probes, and the most it backs off to.
FIRST_PROBE_DELAY = 0.02
MAX_PROBE_DELAY = 0.25
#: A line the child prints brings the next probe forward, to this long after the previous probe
#: at the soonest: a swap waits about this long for a llama-server that printed "model loaded"
#: just after a probe.
MIN_PROBE_INTERVAL = 0.005
#: Output brings a probe forward at most this many times per window: a child that prints without
#: pause is probed at most 40 times a second on top of the backoff (a probe costs about half a
#: millisecond of CPU), while the few lines a server prints as it becomes ready are each followed
#: by a probe within MIN_PROBE_INTERVAL.
OUTPUT_PROBE_BURST = 4
OUTPUT_PROBE_WINDOW = 0.1
#: While a model is ready: how many health checks in a row must fail for it to be unhealthy,
#: the most a check may take, and how soon a failed check is repeated. A frozen model is found
#: within about healthCheckInterval + 3 x 5 s + 2 x 1 s.
HEALTH_CHECK_FAILURES = 3
READY_CHECK_TIMEOUT = 5.0
READY_CHECK_RETRY = 1.0


def probe_echo(check_endpoint: str) -> re.Pattern[str]:
    """
    What a server's log line about one of our health probes looks like: a GET of the health path
    (``GET /health 127.0.0.1 503``, ``"GET /health HTTP/1.1" 503``, ``GET "/health"``).

    Such a line is no sign that anything changed: it must not bring on another probe (each probe
    would print a line that asks for the next one) nor count as a sign of life.
    """
    path = check_endpoint.split("?", 1)[0]
    return re.compile(r"\bGET\s+[\"']?" + re.escape(path) + r"(?=[\s\"'?]|$)")


def describe_answer(result: int | Failure) -> str:
    """
    A probe's answer in a word: ``ok``, ``refused`` (no connection), ``loading`` (503, what
    llama-server answers while it loads) or ``HTTP <code>``.
    """
    if isinstance(result, Failure):
        return "refused"
    if result == 200:
        return "ok"
    return "loading" if result == 503 else f"HTTP {result}"


def _timed_out(result: object, timeout: float) -> Failure:
    """
    The result of a health check its timeout cut off, however the cancelled probe ended: an HTTP
    client fails with ``ResponseNeverReceived``, not with the ``CancelledError`` that
    ``addTimeout`` would turn into a `defer.TimeoutError` by itself.
    """
    return Failure(defer.TimeoutError(f"no answer within {timeout:g}s"))


class HealthProbes:
    """
    One upstream's health probes: those of a start, or the checks of a ready model.

    :param clock: keeps time.
    :param model: returns the model's current configuration (``checkEndpoint``,
        ``healthCheckInterval``), which a reload may change.
    :param ask: asks the health endpoint once: the HTTP status, or a failure.
    :param answered: called with each answer of a start, in a word (`describe_answer`).
    :param healthy: called once a start's probe answers 200; the probes of that start are over.
    :param unhealthy: called with what happened once the ready model's checks failed
        `HEALTH_CHECK_FAILURES` times in a row.
    """

    def __init__(
        self,
        clock: IReactorTime,
        model: Callable[[], ModelConfig],
        ask: Callable[[], Deferred[int]],
        answered: Callable[[str], None],
        healthy: Callable[[], None],
        unhealthy: Callable[[str], None],
    ) -> None:
        self._clock = clock
        self._model = model
        self._ask = ask
        self._answered = answered
        self._healthy = healthy
        self._unhealthy = unhealthy
        self._mode: Literal["idle", "start", "ready"] = "idle"
        self._call: IDelayedCall | None = None
        #: The probe that is out, if any.
        self._request: Deferred[int] | None = None
        self._delay = FIRST_PROBE_DELAY
        self._last_probe_at = 0.0
        #: Whether the scheduled probe was brought forward by output, and when the last such
        #: probes went out (at most OUTPUT_PROBE_BURST are remembered).
        self._call_hastened = False
        self._hastened_at: deque[float] = deque(maxlen=OUTPUT_PROBE_BURST)
        #: When the child last printed a line that may mean it is ready (not a probe's echo).
        self._hint_at: float | None = None
        self._failed_checks = 0

    # -- a start ------------------------------------------------------------------------------

    def begin_start(self) -> None:
        """
        Probe a starting model until it answers 200.
        """
        self.stop()
        self._mode = "start"
        self._delay = FIRST_PROBE_DELAY
        self._hastened_at.clear()
        self._hint_at = None
        self._schedule(FIRST_PROBE_DELAY)

    def output(self) -> None:
        """
        The starting child printed something that may mean it is ready (llama-server prints
        "model loaded" as it is): probe soon. A probe that is out looks again when it is done.
        """
        if self._mode != "start":
            return
        self._hint_at = self._clock.seconds()
        if self._request is None:
            self._hasten()

    def _schedule(self, delay: float, hastened: bool = False) -> None:
        if self._call is not None and self._call.active():
            if self._call.getTime() <= self._clock.seconds() + delay:
                return
            self._call.cancel()
        self._call = self._clock.callLater(delay, self._probe)
        self._call_hastened = hastened

    def _hasten(self) -> None:
        """
        Probe as soon as MIN_PROBE_INTERVAL has passed since the last probe, unless output
        already brought OUTPUT_PROBE_BURST probes forward within OUTPUT_PROBE_WINDOW.
        """
        at = self._last_probe_at + MIN_PROBE_INTERVAL
        if len(self._hastened_at) == self._hastened_at.maxlen:
            at = max(at, self._hastened_at[0] + OUTPUT_PROBE_WINDOW)
        self._schedule(max(0.0, at - self._clock.seconds()), hastened=True)

    def _probe(self) -> None:
        self._call = None
        if self._mode != "start" or self._request is not None:
            return
        self._last_probe_at = self._clock.seconds()
        if self._call_hastened:
            self._hastened_at.append(self._last_probe_at)
        request = self._request = self._ask()
        request.addBoth(self._probed, request)

    def _probed(self, result: int | Failure, request: Deferred[int]) -> None:
        if request is not self._request:
            return  # abandoned by stop()
        self._request = None
        if self._mode != "start":
            return
        answer = describe_answer(result)
        self._answered(answer)
        if answer == "ok":
            self.stop()
            self._healthy()
            return
        self._delay = min(self._delay * 2, MAX_PROBE_DELAY)
        self._schedule(self._delay)
        if self._hint_at is not None and self._hint_at > self._last_probe_at:
            # The child printed while this probe was out: it may be ready by now.
            self._hasten()

    # -- while ready --------------------------------------------------------------------------

    def watch_ready(self) -> None:
        """
        Check the ready model every ``healthCheckInterval`` (none when it is 0 or the model has
        no ``checkEndpoint``).
        """
        self.stop()
        self._mode = "ready"
        self._failed_checks = 0
        self._schedule_check(self._model().hang_limits.health_check_interval)

    def reconfigured(self) -> None:
        """
        The model's settings changed: a ready model is checked at its new interval.
        """
        if self._mode == "ready":
            self._schedule_check(self._model().hang_limits.health_check_interval)

    def _schedule_check(self, delay: float) -> None:
        model = self._model()
        interval = model.hang_limits.health_check_interval
        if interval <= 0 or model.check_endpoint is None or self._mode != "ready":
            return
        if self._call is None or not self._call.active():
            self._call = self._clock.callLater(min(delay, interval), self._check)

    def _check(self) -> None:
        """
        One health check of the ready model; it may take `READY_CHECK_TIMEOUT` at most.
        """
        self._call = None
        if self._mode != "ready" or self._request is not None:
            return
        timeout = min(READY_CHECK_TIMEOUT, self._model().hang_limits.health_check_interval)
        request = self._request = self._ask()
        request.addTimeout(timeout, self._clock, onTimeoutCancel=_timed_out)
        request.addBoth(self._checked, request, timeout)

    def _checked(self, result: int | Failure, request: Deferred[int], timeout: float) -> None:
        if request is not self._request:
            return  # abandoned by stop()
        self._request = None
        if self._mode != "ready":
            return
        model = self._model()
        if result == 200:
            self._failed_checks = 0
            self._schedule_check(model.hang_limits.health_check_interval)
            return
        self._failed_checks += 1
        if self._failed_checks < HEALTH_CHECK_FAILURES:
            self._schedule_check(READY_CHECK_RETRY)
            return
        if isinstance(result, Failure):
            timed_out = result.check(TimeoutError, defer.TimeoutError)
            answer = f"no answer within {timeout:g}s" if timed_out else result.getErrorMessage()
        else:
            answer = f"HTTP {result}"
        self.stop()
        self._unhealthy(
            f"its health check ({model.check_endpoint}) failed {HEALTH_CHECK_FAILURES} times in a row"
            f" (last: {answer})"
        )

    # -- the end ------------------------------------------------------------------------------

    def stop(self) -> None:
        """
        Ask nothing more: cancel the next probe, and the one that is out (a probe still out when
        a start ends would otherwise keep connecting to a dead port after the model stopped).
        """
        self._mode = "idle"
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        request, self._request = self._request, None
        if request is not None:
            request.cancel()

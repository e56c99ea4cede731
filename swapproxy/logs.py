# -*- test-case-name: tests.test_logs -*-
"""
Where swapproxy's log events go.

Two streams, as in llama-swap: *proxy* events (swapproxy's own messages, filtered by the
configured ``logLevel``) and *upstream* events (each line a child printed, never filtered by
level). ``logToStdout`` (`route_logs`) decides which of them reach Twisted's global log publisher,
so that ``twistd`` writes them wherever it was told to; an event that carries a failure always
does, so that no traceback is ever lost and trial still sees logged failures. Every event of
either source is also offered to the attached `LogSink`\ s (the in-memory history behind
``/logs``), whatever ``logToStdout`` says.

A model's output comes a pipe read at a time, several lines at once (`ModelOutput`): the sinks
get a read's lines in one call, and the global publisher one event per line, only when
``logToStdout`` sends it the models' output.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from time import time
from typing import Protocol

from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    LogEvent,
    LogLevel,
    LogLevelFilterPredicate,
    Logger,
    globalLogPublisher,
)
from zope.interface import implementer

_LEVELS = {
    "debug": LogLevel.debug,
    "info": LogLevel.info,
    "warn": LogLevel.warn,
    "error": LogLevel.error,
}


#: The values of ``logToStdout``: which sources reach the global publisher (twistd's log).
LOG_SOURCES = {"proxy": ("proxy",), "upstream": ("upstream",), "both": ("proxy", "upstream"), "none": ()}


class LogSink(Protocol):
    """
    Something that keeps log events, such as `swapproxy.logbuffer.LogHistory`.
    """

    def log_event(self, source: str, event: LogEvent) -> None:
        """
        Keep one event.

        :param source: ``proxy`` or ``upstream``.
        """

    def log_lines(self, model_id: str, lines: Sequence[str], when: float) -> None:
        """
        Keep lines a model printed (upstream events, each ``[{model}] {line}``), all at ``when``.
        """


class _Routing:
    """
    Where events go: the ``logToStdout`` setting and the attached sinks.

    Until `route_logs` is called everything reaches the global publisher, which is what tests
    and tools that build swapproxy's parts without ``twistd`` expect.
    """

    def __init__(self) -> None:
        self.to_stdout: Callable[[], str] = lambda: "both"
        self.sinks: tuple[LogSink, ...] = ()


_routing = _Routing()
# Errors of a sink are reported straight to the global publisher, never through the routes.
_own_log = Logger(namespace="swapproxy.logs", observer=globalLogPublisher)


@implementer(ILogObserver)
class _Route:
    """
    Offers each event of one source to the sinks, then to the global publisher if it belongs
    there.

    The global publisher is looked up at the time of the event, which keeps tests that patch it
    (``capturedLogs``) working.
    """

    def __init__(self, source: str) -> None:
        self._source = source

    def __call__(self, event: LogEvent) -> None:
        for sink in _routing.sinks:
            try:
                sink.log_event(self._source, event)
            except Exception:
                # A broken sink must never break the code that logged.
                _own_log.failure("log sink {sink!r} failed", sink=sink)
        if self._source in LOG_SOURCES.get(_routing.to_stdout(), ("proxy",)) or "log_failure" in event:
            globalLogPublisher(event)


_level_predicate = LogLevelFilterPredicate(defaultLogLevel=LogLevel.info)
proxy_observer = FilteringLogObserver(_Route("proxy"), [_level_predicate])
upstream_observer = _Route("upstream")


def route_logs(log_to_stdout: str | Callable[[], str]) -> Callable[[], str]:
    """
    Set which sources reach the global publisher (``twistd``'s log).

    :param log_to_stdout: ``proxy``, ``upstream``, ``both`` or ``none``, as ``logToStdout``; or a
        function that returns the current value (read at each event, so that a reloaded config
        takes effect at once).
    :returns: the previous setting, as a function, to restore it later.
    :raises ValueError: for a value that is none of these.
    """
    if isinstance(log_to_stdout, str):
        check_log_to_stdout(log_to_stdout)
        value = log_to_stdout
        log_to_stdout = lambda: value  # noqa: E731
    previous, _routing.to_stdout = _routing.to_stdout, log_to_stdout
    return previous


def check_log_to_stdout(value: str) -> None:
    """
    Check a ``logToStdout`` value.

    :raises ValueError: when ``value`` is not ``proxy``, ``upstream``, ``both`` or ``none``.
    """
    if value not in LOG_SOURCES:
        raise ValueError(f"logToStdout must be one of {', '.join(LOG_SOURCES)}, got {value!r}")


def add_log_sink(sink: LogSink) -> None:
    """
    Offer every proxy and upstream event from now on to ``sink`` as well.
    """
    if sink not in _routing.sinks:
        _routing.sinks += (sink,)


def remove_log_sink(sink: LogSink) -> None:
    """
    Stop offering events to ``sink``; a sink that is not attached is ignored.
    """
    _routing.sinks = tuple(s for s in _routing.sinks if s is not sink)


@contextmanager
def log_sink(sink: LogSink) -> Iterator[LogSink]:
    """
    Offer events to ``sink`` for the duration of a ``with`` block (unless it was attached before).
    """
    attached = sink in _routing.sinks
    add_log_sink(sink)
    try:
        yield sink
    finally:
        if not attached:
            remove_log_sink(sink)


def set_log_level(level: str) -> None:
    """
    Set the lowest level of proxy events that are emitted.

    :param level: one of ``debug``, ``info``, ``warn``, ``error`` (as validated by the config).
    """
    _level_predicate.setLogLevelForNamespace("", _LEVELS.get(level, LogLevel.info))


def proxy_logger(namespace: str) -> Logger:
    """
    A logger for swapproxy's own messages, subject to ``logLevel``.
    """
    return Logger(namespace=namespace, observer=proxy_observer)


def upstream_logger(model_id: str) -> Logger:
    """
    A logger for the output of one model's child process.
    """
    return Logger(namespace="upstream." + model_id, observer=upstream_observer)


class ModelOutput:
    """
    Logs the lines one model's child prints: each is an upstream event of its own, as
    ``upstream_logger(model_id).info("[{model}] {line}", model=..., line=..., stream=...)``
    would make it, but a read's lines go out together.

    The sinks get them in one `LogSink.log_lines` call, and the events themselves are only made
    when ``logToStdout`` sends the models' output to the global publisher: a model that prints
    a dozen lines per request costs a sink call per pipe read, not a log event per line.
    """

    def __init__(self, model_id: str) -> None:
        self.model_id = model_id
        self._logger = upstream_logger(model_id)

    def lines(self, stream: str, lines: Sequence[str]) -> None:
        """
        Log ``lines`` (without their line ends) that the child printed on ``stream``
        (``stdout``, ``stderr``, ``cmdStop``).
        """
        if not lines:
            return
        when = time()
        for sink in _routing.sinks:
            try:
                sink.log_lines(self.model_id, lines, when)
            except Exception:
                _own_log.failure("log sink {sink!r} failed", sink=sink)
        if "upstream" not in LOG_SOURCES.get(_routing.to_stdout(), ("proxy",)):
            return
        logger = self._logger
        for line in lines:
            globalLogPublisher({
                "log_logger": logger,
                "log_level": LogLevel.info,
                "log_namespace": logger.namespace,
                "log_source": None,
                "log_format": "[{model}] {line}",
                "log_time": when,
                "model": self.model_id,
                "line": line,
                "stream": stream,
            })

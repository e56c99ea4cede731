# -*- test-case-name: tests.test_logs -*-
"""
Where swapproxy's log events go.

Two streams, as in llama-swap: *proxy* events (swapproxy's own messages, filtered by the
configured ``logLevel``) and *upstream* events (each line a child printed, never filtered by
level). Both end in Twisted's global log publisher, so ``twistd`` writes them wherever it was
told to, and trial still sees logged failures.
"""

from __future__ import annotations

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


@implementer(ILogObserver)
class _Forward:
    """
    Forwards events to whatever is the global publisher at the time of the event.

    Looking the publisher up late keeps tests that patch it (``capturedLogs``) working.
    """

    def __call__(self, event: LogEvent) -> None:
        globalLogPublisher(event)


_level_predicate = LogLevelFilterPredicate(defaultLogLevel=LogLevel.info)
proxy_observer = FilteringLogObserver(_Forward(), [_level_predicate])
upstream_observer = _Forward()


def set_log_level(level: str) -> None:
    """
    Set the lowest level of proxy events that are emitted.

    :param level: one of ``debug``, ``info``, ``warn``, ``error`` (as validated by the config).
    """
    _level_predicate.setLogLevelForNamespace(None, _LEVELS.get(level, LogLevel.info))


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

# -*- test-case-name: tests.test_logbuffer -*-
"""
The recent log, in memory: what ``GET /logs`` returns and ``/logs/stream...`` follows.

`LogHistory` keeps, as llama-swap does, a *proxy* history (swapproxy's own messages, as
``[LEVEL] text`` lines), an *upstream* history (every line a model printed, as ``[model] line``),
a *combined* one (both, each line tagged so) and one per model (its output and swapproxy's
messages about it). ``logToStdout`` decides what reaches stdout, never what these histories keep.
Each is a `LogStream`: bounded by bytes, dropping its oldest lines first, with subscribers that
are told of each new line as it is written. A subscriber must not block: the web side
(`swapproxy.web.live.LiveWriter`) queues a bounded amount per client and drops the rest.

`LogRouting` is the service that attaches a history to the log routes of `swapproxy.logs` and
applies ``logToStdout`` to twistd's log while swapproxy runs.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Sequence
from datetime import datetime, tzinfo
from typing import Any

from twisted.application.service import Service
from twisted.logger import LogEvent, Logger, formatEvent, globalLogPublisher

from swapproxy.logs import add_log_sink, check_log_to_stdout, remove_log_sink, route_logs

#: How many bytes each history keeps (llama-swap keeps 100 KB per monitor).
DEFAULT_HISTORY_BYTES = 100 * 1024

# Problems are reported past the log routes, which are what called us.
_own_log = Logger(namespace="swapproxy.logbuffer", observer=globalLogPublisher)

Subscriber = Callable[[bytes], None]


class LogStream:
    """
    A byte-bounded history of log text and its live subscribers.

    :param limit: the most bytes the history keeps; the oldest whole writes go first, and a
        single write longer than that keeps only its end.
    """

    def __init__(self, limit: int = DEFAULT_HISTORY_BYTES) -> None:
        self.limit = limit
        self._chunks: deque[bytes] = deque()
        self._size = 0
        self._subscribers: list[Subscriber] = []

    @property
    def size(self) -> int:
        """
        How many bytes the history holds now.
        """
        return self._size

    def write(self, data: bytes) -> None:
        """
        Add ``data`` (normally one or more whole lines) and pass it to every subscriber.

        A subscriber that raises is removed and the failure logged; the writer never sees it.
        """
        if not data:
            return
        kept = data if len(data) <= self.limit else data[-self.limit :]
        self._chunks.append(kept)
        self._size += len(kept)
        while self._size > self.limit:
            self._size -= len(self._chunks.popleft())
        for subscriber in list(self._subscribers):
            try:
                subscriber(data)
            except Exception:
                self.unsubscribe(subscriber)
                _own_log.failure("log subscriber {subscriber!r} failed; removed", subscriber=subscriber)

    def history(self) -> bytes:
        """
        Everything the history holds, oldest first.
        """
        return b"".join(self._chunks)

    def subscribe(self, subscriber: Subscriber) -> Callable[[], None]:
        """
        Call ``subscriber(data)`` with every later write, in order.

        :returns: a function that unsubscribes (calling it twice is harmless).
        """
        self._subscribers.append(subscriber)
        return lambda: self.unsubscribe(subscriber)

    def unsubscribe(self, subscriber: Subscriber) -> None:
        """
        Stop telling ``subscriber``; one that is not subscribed is ignored.
        """
        if subscriber in self._subscribers:
            self._subscribers.remove(subscriber)

    @property
    def subscribers(self) -> int:
        """
        How many subscribers there are.
        """
        return len(self._subscribers)


# -- timestamps ---------------------------------------------------------------------------------


def _day(d: datetime) -> str:
    return f"{d.day:2d}"  # Go's "_2": space-padded


def _zone(d: datetime) -> str:
    return d.strftime("%Z") or d.strftime("%z")


def _offset(d: datetime) -> str:
    offset = d.utcoffset()
    if not offset:
        return "Z"
    text = d.strftime("%z")
    return text[:3] + ":" + text[3:5]


def _fraction(d: datetime) -> str:
    # Go's ".999999999": the fraction without trailing zeros, nothing when it is zero.
    digits = f"{d.microsecond:06d}".rstrip("0")
    return "." + digits if digits else ""


def _stamp(d: datetime) -> str:
    return f"{d:%b} {_day(d)} {d:%H:%M:%S}"


#: llama-swap's ``logTimeFormat`` values: Go's named layouts, matched without regard to case.
TIME_LAYOUTS: dict[str, Callable[[datetime], str]] = {
    "ansic": lambda d: f"{d:%a %b} {_day(d)} {d:%H:%M:%S %Y}",
    "unixdate": lambda d: f"{d:%a %b} {_day(d)} {d:%H:%M:%S} {_zone(d)} {d:%Y}",
    "rubydate": lambda d: f"{d:%a %b %d %H:%M:%S %z %Y}",
    "rfc822": lambda d: f"{d:%d %b %y %H:%M} {_zone(d)}",
    "rfc822z": lambda d: f"{d:%d %b %y %H:%M %z}",
    "rfc850": lambda d: f"{d:%A, %d-%b-%y %H:%M:%S} {_zone(d)}",
    "rfc1123": lambda d: f"{d:%a, %d %b %Y %H:%M:%S} {_zone(d)}",
    "rfc1123z": lambda d: f"{d:%a, %d %b %Y %H:%M:%S %z}",
    "rfc3339": lambda d: f"{d:%Y-%m-%dT%H:%M:%S}{_offset(d)}",
    "rfc3339nano": lambda d: f"{d:%Y-%m-%dT%H:%M:%S}{_fraction(d)}{_offset(d)}",
    "kitchen": lambda d: f"{d.hour % 12 or 12}:{d:%M}{'PM' if d.hour >= 12 else 'AM'}",
    "stamp": _stamp,
    "stampmilli": lambda d: f"{_stamp(d)}.{d.microsecond // 1000:03d}",
    "stampmicro": lambda d: f"{_stamp(d)}.{d.microsecond:06d}",
    "stampnano": lambda d: f"{_stamp(d)}.{d.microsecond:06d}000",
    "datetime": lambda d: f"{d:%Y-%m-%d %H:%M:%S}",
    "dateonly": lambda d: f"{d:%Y-%m-%d}",
    "timeonly": lambda d: f"{d:%H:%M:%S}",
}

# The layouts' Go spelling is accepted too.
_GO_LAYOUTS = {
    "Mon Jan _2 15:04:05 2006": "ansic",
    "Mon Jan _2 15:04:05 MST 2006": "unixdate",
    "Mon Jan 02 15:04:05 -0700 2006": "rubydate",
    "02 Jan 06 15:04 MST": "rfc822",
    "02 Jan 06 15:04 -0700": "rfc822z",
    "Monday, 02-Jan-06 15:04:05 MST": "rfc850",
    "Mon, 02 Jan 2006 15:04:05 MST": "rfc1123",
    "Mon, 02 Jan 2006 15:04:05 -0700": "rfc1123z",
    "2006-01-02T15:04:05Z07:00": "rfc3339",
    "2006-01-02T15:04:05.999999999Z07:00": "rfc3339nano",
    "3:04PM": "kitchen",
    "Jan _2 15:04:05": "stamp",
    "Jan _2 15:04:05.000": "stampmilli",
    "Jan _2 15:04:05.000000": "stampmicro",
    "Jan _2 15:04:05.000000000": "stampnano",
    "2006-01-02 15:04:05": "datetime",
    "2006-01-02": "dateonly",
    "15:04:05": "timeonly",
}


def timestamp_formatter(
    time_format: str, tz: tzinfo | None = None
) -> Callable[[float], str] | None:
    """
    The function that turns a Unix time into the ``logTimeFormat`` text.

    :param time_format: ``""`` (no timestamp), a Go layout name such as ``rfc3339``, ``kitchen``
        or ``stampmilli`` (any case), a Go layout constant, or a ``strftime`` pattern (anything
        with a ``%``).
    :param tz: the time zone; local time by default, as llama-swap.
    :returns: ``None`` for no timestamp. A format without fractions of a second gives the text
        of a second once: the lines of the same second reuse it.
    :raises ValueError: for a format that is none of these.
    """
    text = time_format.strip()
    if not text:
        return None
    name = _GO_LAYOUTS.get(text, text.lower())
    layout = TIME_LAYOUTS.get(name)
    if layout is None and "%" in text:

        def by_pattern(t: float) -> str:
            return _as_datetime(t, tz).strftime(text)

        return by_pattern if "%f" in text else _per_second(by_pattern)
    if layout is None:
        raise ValueError(
            f"logTimeFormat: unknown format {time_format!r}; use one of {', '.join(TIME_LAYOUTS)}, "
            "a strftime pattern, or \"\" for none"
        )
    if name in _FRACTIONS:
        return lambda t: layout(_as_datetime(t, tz))
    return _per_second(lambda t: layout(_as_datetime(t, tz)))


#: The layouts that show fractions of a second.
_FRACTIONS = frozenset({"rfc3339nano", "stampmilli", "stampmicro", "stampnano"})


def _per_second(stamp: Callable[[float], str]) -> Callable[[float], str]:
    """
    ``stamp`` for a format whose text changes once a second at most: the last second's text is
    kept.
    """
    last_second: int | None = None
    last_text = ""

    def stamp_second(t: float) -> str:
        nonlocal last_second, last_text
        second = math.floor(t)
        if second != last_second:
            last_second, last_text = second, stamp(second)
        return last_text

    return stamp_second


def _as_datetime(t: float, tz: tzinfo | None) -> datetime:
    if tz is None:
        return datetime.fromtimestamp(t).astimezone()
    return datetime.fromtimestamp(t, tz)


# -- the histories ------------------------------------------------------------------------------


def _level_name(event: LogEvent) -> str:
    name = getattr(event.get("log_level"), "name", None)
    return name.upper() if isinstance(name, str) else "INFO"


class LogHistory:
    """
    swapproxy's recent log: the proxy, upstream and combined histories, and one per model.

    :param time_format: ``logTimeFormat``, or a function that returns the current one (read at
        each event, so that a reloaded config takes effect at once). An unknown format means no
        timestamps, and one warning.
    :param limit: bytes kept by each history.
    :param tz: the time zone of timestamps (local time by default).
    """

    def __init__(
        self,
        time_format: str | Callable[[], str] = "",
        limit: int = DEFAULT_HISTORY_BYTES,
        tz: tzinfo | None = None,
    ) -> None:
        self.limit = limit
        self.proxy = LogStream(limit)
        self.upstream = LogStream(limit)
        self.combined = LogStream(limit)
        self._models: dict[str, LogStream] = {}
        self._tz = tz
        self._time_format = time_format if callable(time_format) else (lambda: time_format)
        self._format_seen: str | None = None
        self._stamp: Callable[[float], str] | None = None

    def _stamper(self) -> Callable[[float], str] | None:
        time_format = self._time_format()
        if time_format != self._format_seen:
            self._format_seen = time_format
            try:
                self._stamp = timestamp_formatter(time_format, self._tz)
            except ValueError as e:
                self._stamp = None
                # Not through the routes: this is called from inside them.
                _own_log.warn("{problem}; logging without timestamps", problem=str(e))
        return self._stamp

    def model(self, model_id: str) -> LogStream:
        """
        The history of one model (created empty on first use).
        """
        stream = self._models.get(model_id)
        if stream is None:
            stream = self._models[model_id] = LogStream(self.limit)
        return stream

    def stream(self, name: str) -> LogStream | None:
        """
        ``proxy``, ``upstream``, ``combined``; ``None`` for any other name.
        """
        return {"proxy": self.proxy, "upstream": self.upstream, "combined": self.combined}.get(name)

    def _prefix(self, event: LogEvent) -> str:
        when = event.get("log_time")
        return self._prefix_at(when if isinstance(when, (int, float)) else 0.0)

    def _prefix_at(self, when: float) -> str:
        stamp = self._stamper()
        return "" if stamp is None else stamp(when) + " "

    def log_lines(self, model_id: str, lines: Sequence[str], when: float) -> None:
        """
        Keep lines ``model_id`` printed at ``when``; see `swapproxy.logs.LogSink`. Each history
        gets them in one write.
        """
        prefix = self._prefix_at(when)
        text = "".join([f"{prefix}[{model_id}] {line}\n" for line in lines]).encode("utf-8", "replace")
        self.upstream.write(text)
        self.combined.write(text)
        if model_id:
            own = "".join([f"{prefix}{line}\n" for line in lines]).encode("utf-8", "replace")
            self.model(model_id).write(own)

    def log_event(self, source: str, event: LogEvent) -> None:
        """
        Keep one event of ``source`` (``proxy`` or ``upstream``); see `swapproxy.logs.LogSink`.
        """
        prefix = self._prefix(event)
        model = event.get("model")
        if source == "upstream":
            line = event.get("line")
            line = formatEvent(event) if line is None else str(line)
            model_id = str(model) if model is not None else str(event.get("log_namespace", "")).partition(".")[2]
            text = f"{prefix}[{model_id}] {line}\n".encode("utf-8", "replace")
            self.upstream.write(text)
            self.combined.write(text)
            if model_id:
                self.model(model_id).write(f"{prefix}{line}\n".encode("utf-8", "replace"))
            return
        message = formatEvent(event)
        failure = event.get("log_failure")
        if failure is not None:
            try:
                message += "\n" + failure.getTraceback().rstrip("\n")
            except Exception:
                message += f"\n{failure!r}"
        text = f"{prefix}[{_level_name(event)}] {message}\n".encode("utf-8", "replace")
        self.proxy.write(text)
        self.combined.write(text)
        if isinstance(model, str) and model:
            self.model(model).write(text)


class LogRouting(Service):
    """
    While running: ``logToStdout`` decides what reaches ``twistd``'s log (its stdout), and
    ``history`` keeps every proxy and upstream event.

    On stop the previous routing comes back, so a test that starts and stops it leaves nothing
    behind.

    :param history: where events are kept.
    :param log_to_stdout: ``proxy``, ``upstream``, ``both`` or ``none``; or a function that returns
        the current value, such as ``lambda: supervisor.config.log_to_stdout``, so that a config
        reload takes effect.
    """

    def __init__(self, history: LogHistory, log_to_stdout: str | Callable[[], str]) -> None:
        if isinstance(log_to_stdout, str):
            check_log_to_stdout(log_to_stdout)
        self.history = history
        self.log_to_stdout = log_to_stdout
        self._previous: Callable[[], str] | None = None

    def startService(self) -> None:
        super().startService()
        add_log_sink(self.history)
        self._previous = route_logs(self.log_to_stdout)

    def stopService(self) -> Any:
        if self._previous is not None:
            route_logs(self._previous)
            self._previous = None
        remove_log_sink(self.history)
        return super().stopService()

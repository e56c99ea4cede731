"""
Tests for L{swapproxy.logbuffer}, the log routing of L{swapproxy.logs}, L{swapproxy.web.live} and
the C{/logs} endpoints.
"""

from __future__ import annotations

import re
import textwrap
import time
from datetime import timezone
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.logger import LogEvent, LogLevel, formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from swapproxy import __version__, tap
from swapproxy.logbuffer import LogHistory, LogRouting, LogStream, timestamp_formatter
from swapproxy.logs import ModelOutput, proxy_logger, set_log_level, upstream_logger
from swapproxy.requestlog import log_request
from swapproxy.web.live import LiveWriter, dropped_log_marker
from tests.support.harness import TWO_MODELS, Harness, header, routed
from tests.support.live import ConfigFileMixin
from tests.support.rawhttp import RawConnection, follow
from tests.support.reactors import ThreadedMemoryReactor

#: 2023-11-14T22:13:20.25Z
WHEN = 1_700_000_000.25


def capture_global(test: SynchronousTestCase) -> list[LogEvent]:
    """
    The events that reach the global log publisher (twistd's log) for the rest of the test.
    """
    events: list[LogEvent] = []
    globalLogPublisher.addObserver(events.append)
    test.addCleanup(globalLogPublisher.removeObserver, events.append)
    return events


class LogStreamTests(SynchronousTestCase):
    """
    One byte-bounded history and its subscribers.
    """

    def test_bounded_by_bytes(self) -> None:
        """
        The history never holds more than its limit: the oldest lines go first, whole, and the
        newest are all there.
        """
        stream = LogStream(limit=1000)
        lines = [f"line {i:04d} ".encode() + b"x" * 40 + b"\n" for i in range(200)]
        for line in lines:
            stream.write(line)
            self.assertLessEqual(stream.size, 1000)
        history = stream.history()
        self.assertEqual(len(history), stream.size)
        self.assertGreater(len(history), 1000 - len(lines[0]))
        self.assertTrue(history.startswith(b"line "), history[:20])
        self.assertTrue(history.endswith(lines[-1]))
        self.assertEqual(history, b"".join(lines)[-len(history) :])

    def test_one_write_longer_than_the_limit(self) -> None:
        """
        A single write longer than the limit keeps its end.
        """
        stream = LogStream(limit=10)
        stream.write(b"0123456789abcdef")
        self.assertEqual(stream.history(), b"6789abcdef")

    def test_subscribers(self) -> None:
        """
        Subscribers get every later write in order, until they unsubscribe; the history
        before they came is theirs to ask for.
        """
        stream = LogStream()
        stream.write(b"before\n")
        got: list[bytes] = []
        unsubscribe = stream.subscribe(got.append)
        stream.write(b"one\n")
        stream.write(b"two\n")
        unsubscribe()
        unsubscribe()
        stream.write(b"three\n")
        self.assertEqual(got, [b"one\n", b"two\n"])
        self.assertEqual(stream.history(), b"before\none\ntwo\nthree\n")
        self.assertEqual(stream.subscribers, 0)

    def test_broken_subscriber(self) -> None:
        """
        A subscriber that raises is dropped and logged; the writer and the others carry on.
        """
        stream = LogStream()
        got: list[bytes] = []

        def broken(data: bytes) -> None:
            raise RuntimeError("boom")

        stream.subscribe(broken)
        stream.subscribe(got.append)
        stream.write(b"one\n")
        stream.write(b"two\n")
        self.assertEqual(got, [b"one\n", b"two\n"])
        self.assertEqual(stream.subscribers, 1)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)


class TimestampTests(SynchronousTestCase):
    """
    ``logTimeFormat`` accepts llama-swap's Go layout names.
    """

    def stamp(self, time_format: str, when: float = WHEN) -> str:
        formatter = timestamp_formatter(time_format, timezone.utc)
        assert formatter is not None
        return formatter(when)

    def test_layouts(self) -> None:
        cases = {
            "rfc3339": "2023-11-14T22:13:20Z",
            "RFC3339": "2023-11-14T22:13:20Z",
            "rfc3339nano": "2023-11-14T22:13:20.25Z",
            "kitchen": "10:13PM",
            "stamp": "Nov 14 22:13:20",
            "stampmilli": "Nov 14 22:13:20.250",
            "stampmicro": "Nov 14 22:13:20.250000",
            "stampnano": "Nov 14 22:13:20.250000000",
            "ansic": "Tue Nov 14 22:13:20 2023",
            "rfc1123": "Tue, 14 Nov 2023 22:13:20 UTC",
            "rfc1123z": "Tue, 14 Nov 2023 22:13:20 +0000",
            "datetime": "2023-11-14 22:13:20",
            "2006-01-02T15:04:05Z07:00": "2023-11-14T22:13:20Z",
            "%H:%M": "22:13",
        }
        for name, expected in cases.items():
            self.assertEqual(self.stamp(name), expected, name)

    def test_go_day_padding_and_midnight(self) -> None:
        """
        ``_2`` pads the day with a space; the kitchen clock says 12 at midnight.
        """
        self.assertEqual(self.stamp("stamp", 1_704_067_200), "Jan  1 00:00:00")
        self.assertEqual(self.stamp("kitchen", 1_704_067_200), "12:00AM")

    def test_same_second_and_the_next(self) -> None:
        """
        Lines of the same second get the same text, the next second its own, and fractions of a
        second are still shown by the layouts that show them.
        """
        for name in ("datetime", "rfc3339", "%H:%M:%S"):
            formatter = timestamp_formatter(name, timezone.utc)
            assert formatter is not None
            self.assertEqual(formatter(WHEN + 0.5), formatter(WHEN), name)
            self.assertNotEqual(formatter(WHEN + 1), formatter(WHEN), name)
            self.assertEqual(formatter(WHEN - 0.5), self.stamp(name, WHEN - 1), name)
        self.assertEqual(self.stamp("stampmilli", WHEN + 0.5), "Nov 14 22:13:20.750")
        self.assertEqual(self.stamp("%S.%f", WHEN + 0.5), "20.750000")

    def test_none(self) -> None:
        self.assertIsNone(timestamp_formatter(""))
        self.assertIsNone(timestamp_formatter("  "))

    def test_unknown(self) -> None:
        """
        An unknown format is an error that names the valid ones; a history with one logs a
        warning once and writes lines without timestamps.
        """
        with self.assertRaises(ValueError) as raised:
            timestamp_formatter("yesterday")
        self.assertIn("'yesterday'", str(raised.exception))
        self.assertIn("rfc3339", str(raised.exception))
        warnings = capture_global(self)
        history = LogHistory("yesterday")
        for _ in range(3):
            history.log_event("proxy", {"log_format": "hello", "log_level": LogLevel.info, "log_time": WHEN})
        self.assertEqual(history.proxy.history(), b"[INFO] hello\n" * 3)
        self.assertEqual(len([e for e in warnings if "yesterday" in str(e.get("problem"))]), 1)


class LogHistoryTests(SynchronousTestCase):
    """
    How events become lines in the proxy, upstream, combined and per-model histories.
    """

    def test_proxy_lines(self) -> None:
        """
        Proxy messages are ``[LEVEL] text`` lines, with the ``logTimeFormat`` timestamp first;
        one that names a model also goes to that model's history.
        """
        history = LogHistory("rfc3339", tz=timezone.utc)
        history.log_event(
            "proxy",
            {"log_format": "model {model} ready", "model": "qwen", "log_level": LogLevel.info, "log_time": WHEN},
        )
        history.log_event("proxy", {"log_format": "careful", "log_level": LogLevel.warn, "log_time": WHEN})
        lines = b"2023-11-14T22:13:20Z [INFO] model qwen ready\n2023-11-14T22:13:20Z [WARN] careful\n"
        self.assertEqual(history.proxy.history(), lines)
        self.assertEqual(history.combined.history(), lines)
        self.assertEqual(history.model("qwen").history(), b"2023-11-14T22:13:20Z [INFO] model qwen ready\n")
        self.assertEqual(history.upstream.history(), b"")

    def test_failure_has_traceback(self) -> None:
        history = LogHistory()
        try:
            1 / 0
        except ZeroDivisionError:
            failure = Failure()
        history.log_event(
            "proxy", {"log_format": "while doing it", "log_level": LogLevel.critical, "log_failure": failure}
        )
        text = history.proxy.history().decode()
        self.assertTrue(text.startswith("[CRITICAL] while doing it\nTraceback"), text)
        self.assertIn("ZeroDivisionError", text)

    def test_upstream_lines(self) -> None:
        """
        A model's output line is ``[model] line`` in the upstream and combined histories and the
        line alone in the model's own.
        """
        history = LogHistory()
        event = {"log_format": "[{model}] {line}", "model": "llama", "line": "loading 50%", "log_time": WHEN}
        history.log_event("upstream", event)
        self.assertEqual(history.upstream.history(), b"[llama] loading 50%\n")
        self.assertEqual(history.model("llama").history(), b"loading 50%\n")
        self.assertEqual(history.combined.history(), b"[llama] loading 50%\n")
        self.assertEqual(history.proxy.history(), b"")

    def test_time_format_follows_config(self) -> None:
        """
        Given a function, the history reads the format at each event (a reload changes it).
        """
        current = {"format": ""}
        history = LogHistory(lambda: current["format"], tz=timezone.utc)
        event = {"log_format": "x", "log_level": LogLevel.info, "log_time": WHEN}
        history.log_event("proxy", event)
        current["format"] = "kitchen"
        history.log_event("proxy", event)
        self.assertEqual(history.proxy.history(), b"[INFO] x\n10:13PM [INFO] x\n")


class LogRoutingTests(SynchronousTestCase):
    """
    ``logToStdout`` decides what reaches twistd's log; the histories behind ``/logs`` keep
    everything, as llama-swap's do.
    """

    def setUp(self) -> None:
        self.proxy_log = proxy_logger("tests.logbuffer")
        self.model_log = upstream_logger("llama")

    def emit(self) -> None:
        self.proxy_log.info("a proxy message")
        self.model_log.info("[{model}] {line}", model="llama", line="a model line")

    def sources(self, events: list[LogEvent]) -> list[str]:
        found = []
        for event in events:
            if event.get("log_namespace") == "tests.logbuffer":
                found.append("proxy")
            elif event.get("log_namespace") == "upstream.llama":
                found.append("upstream")
        return found

    def check(self, log_to_stdout: str, expected: list[str]) -> None:
        events = capture_global(self)
        history = routed(self, log_to_stdout)
        self.emit()
        self.assertEqual(self.sources(events), expected, log_to_stdout)
        # Whatever the setting, the histories have everything, each line tagged.
        self.assertEqual(history.combined.history(), b"[INFO] a proxy message\n[llama] a model line\n")
        self.assertIn(b"[INFO] a proxy message\n", history.proxy.history())
        self.assertIn(b"[llama] a model line\n", history.upstream.history())
        self.assertEqual(history.model("llama").history(), b"a model line\n")

    def test_proxy(self) -> None:
        self.check("proxy", ["proxy"])

    def test_upstream(self) -> None:
        self.check("upstream", ["upstream"])

    def test_both(self) -> None:
        self.check("both", ["proxy", "upstream"])

    def test_none(self) -> None:
        self.check("none", [])

    def check_output(self, log_to_stdout: str, published: bool) -> None:
        """
        The lines of one read of a model's output are each a line of the histories, and, where
        ``logToStdout`` sends the models' output, each an event of its own with the model id.
        """
        events = capture_global(self)
        history = routed(self, log_to_stdout)
        ModelOutput("llama").lines("stderr", ["slot launch_slot_: processing", "", "slot release: done"])
        self.assertEqual(history.upstream.history(),
                         b"[llama] slot launch_slot_: processing\n[llama] \n[llama] slot release: done\n")
        self.assertEqual(history.combined.history(), history.upstream.history())
        self.assertEqual(history.model("llama").history(), b"slot launch_slot_: processing\n\nslot release: done\n")
        lines = [e for e in events if e.get("log_namespace") == "upstream.llama"]
        if not published:
            self.assertEqual(lines, [])
            return
        self.assertEqual([formatEvent(e) for e in lines],
                         ["[llama] slot launch_slot_: processing", "[llama] ", "[llama] slot release: done"])
        self.assertEqual([e["line"] for e in lines], ["slot launch_slot_: processing", "", "slot release: done"])
        self.assertEqual({(e["model"], e["stream"], e["log_level"]) for e in lines}, {("llama", "stderr", LogLevel.info)})

    def test_model_output_proxy(self) -> None:
        self.check_output("proxy", False)

    def test_model_output_upstream(self) -> None:
        self.check_output("upstream", True)

    def test_model_output_both(self) -> None:
        self.check_output("both", True)

    def test_model_output_none(self) -> None:
        self.check_output("none", False)

    def test_model_output_with_a_broken_sink(self) -> None:
        """
        A sink that raises does not reach the model's output reader.
        """

        class Broken:
            def log_event(self, source: str, event: LogEvent) -> None:
                raise RuntimeError("sink down")

            def log_lines(self, model_id: str, lines: Any, when: float) -> None:
                raise RuntimeError("sink down")

        events = capture_global(self)
        routed(self, "upstream", history=Broken())  # type: ignore[arg-type]
        ModelOutput("llama").lines("stdout", ["still fine"])
        self.assertEqual([e.get("line") for e in events if e.get("log_namespace") == "upstream.llama"], ["still fine"])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_failures_always_reach_the_log(self) -> None:
        """
        Even with ``none``, a logged failure reaches twistd's log: a traceback is never lost.
        """
        events = capture_global(self)
        history = routed(self, "none")
        try:
            raise ValueError("kaput")
        except ValueError:
            self.proxy_log.failure("it broke")
        self.assertEqual([e["log_format"] for e in events if "log_failure" in e], ["it broke"])
        self.assertIn(b"ValueError: kaput", history.proxy.history())
        self.flushLoggedErrors(ValueError)

    def test_log_level_applies_to_the_history(self) -> None:
        """
        Debug messages are kept out of the proxy history at the default level.
        """
        history = routed(self, "proxy")
        self.proxy_log.debug("too chatty")
        self.proxy_log.info("worth keeping")
        self.assertEqual(history.proxy.history(), b"[INFO] worth keeping\n")

    def test_stop_restores(self) -> None:
        """
        After the service stops, events go where they went before and the history gets nothing.
        """
        events = capture_global(self)
        history = LogHistory()
        routing = LogRouting(history, "none")
        routing.startService()
        routing.stopService()
        self.emit()
        self.assertEqual(self.sources(events), ["proxy", "upstream"])
        self.assertEqual(history.proxy.history(), b"")

    def test_setting_follows_config(self) -> None:
        """
        Given a function, the routing reads ``logToStdout`` at each event.
        """
        current = {"value": "none"}
        events = capture_global(self)
        history = LogHistory()
        routing = LogRouting(history, lambda: current["value"])
        routing.startService()
        self.addCleanup(routing.stopService)
        self.emit()
        current["value"] = "upstream"
        self.emit()
        self.assertEqual(self.sources(events), ["upstream"])

    def test_broken_sink(self) -> None:
        """
        A sink that raises does not reach the code that logged.
        """

        class Broken:
            def log_event(self, source: str, event: LogEvent) -> None:
                raise RuntimeError("sink down")

        events = capture_global(self)
        routed(self, "proxy", history=Broken())  # type: ignore[arg-type]
        self.proxy_log.info("still fine")
        self.assertIn("proxy", self.sources(events))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_invalid_setting(self) -> None:
        with self.assertRaises(ValueError):
            LogRouting(LogHistory(), "stderr")


class FakeResponse:
    """
    Just enough of a twisted.web Request for a L{LiveWriter}.
    """

    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.producer: Any = None

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        assert streaming
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.producer = None


class LiveWriterTests(SynchronousTestCase):
    """
    A slow client costs a bounded queue and never holds the writer up.
    """

    def test_writes_through_while_the_client_keeps_up(self) -> None:
        response = FakeResponse()
        writer = LiveWriter(response, dropped_log_marker)  # type: ignore[arg-type]
        self.assertIs(response.producer, writer)
        writer.write(b"a\n")
        writer.write(b"")
        writer.write(b"b\n")
        self.assertEqual(response.written, [b"a\n", b"b\n"])

    def test_paused_queue_bounded_then_marker(self) -> None:
        """
        While paused nothing is written; up to the limit is queued, the rest dropped whole; on
        resume the queue goes out in order, then how many bytes were dropped.
        """
        response = FakeResponse()
        writer = LiveWriter(response, dropped_log_marker, limit=100)  # type: ignore[arg-type]
        writer.pauseProducing()
        lines = [b"%02d-" % i + b"x" * 16 + b"\n" for i in range(20)]  # 20 bytes each
        for line in lines:
            writer.write(line)
            self.assertLessEqual(writer.pending, 100)
        self.assertEqual(response.written, [])
        writer.resumeProducing()
        self.assertEqual(response.written, lines[:5] + ["\u2014 300 bytes dropped \u2014\n".encode()])
        self.assertEqual(writer.dropped_total, 300)
        writer.write(b"later\n")
        self.assertEqual(response.written[-1], b"later\n")

    def test_order_kept_after_resume(self) -> None:
        """
        A write that arrives while the queue still drains waits behind it.
        """
        response = FakeResponse()
        writer = LiveWriter(response, dropped_log_marker)  # type: ignore[arg-type]
        writer.pauseProducing()
        writer.write(b"1\n")
        writer.write(b"2\n")
        # The client fills up again after the first write.
        original = response.write

        def write_then_pause(data: bytes) -> None:
            original(data)
            writer.pauseProducing()

        response.write = write_then_pause  # type: ignore[method-assign]
        writer.resumeProducing()
        writer.write(b"3\n")
        self.assertEqual(response.written, [b"1\n"])
        response.write = original  # type: ignore[method-assign]
        writer.resumeProducing()
        self.assertEqual(response.written, [b"1\n", b"2\n", b"3\n"])

    def test_close(self) -> None:
        response = FakeResponse()
        writer = LiveWriter(response, dropped_log_marker)  # type: ignore[arg-type]
        writer.close(client_gone=False)
        self.assertIsNone(response.producer)
        writer.write(b"ignored\n")
        self.assertEqual(response.written, [])

    def test_stop_producing(self) -> None:
        response = FakeResponse()
        writer = LiveWriter(response, dropped_log_marker)  # type: ignore[arg-type]
        writer.pauseProducing()
        writer.write(b"queued\n")
        writer.stopProducing()
        writer.resumeProducing()
        self.assertEqual(response.written, [])
        self.assertEqual(writer.pending, 0)


class LogEndpointTests(SynchronousTestCase):
    """
    ``GET /logs`` and ``/logs/stream...`` through swapproxy's Resource tree.
    """

    def setUp(self) -> None:
        self.history = routed(self, "proxy")
        self.h = Harness(self, textwrap.dedent(TWO_MODELS), logs=self.history)
        self.log = proxy_logger("tests.logbuffer")
        self.model_log = upstream_logger("llama")

    def follow(self, path: str) -> RawConnection:
        client = follow(self.h.root, path)
        self.addCleanup(client.close)
        return client

    def test_logs_returns_the_combined_history(self) -> None:
        """
        ``/logs`` has swapproxy's messages and the models' output, each tagged, although
        ``logToStdout: proxy`` keeps the models' output off stdout.
        """
        self.log.info("first")
        self.model_log.info("[{model}] {line}", model="llama", line="a model line")
        self.log.warn("second")
        response, body = self.h.call("GET", "/logs")
        self.assertEqual(response.code, 200)
        self.assertEqual(header(response, b"content-type"), [b"text/plain; charset=utf-8"])
        self.assertEqual(body, b"[INFO] first\n[llama] a model line\n[WARN] second\n")

    def test_stream_history_then_live(self) -> None:
        """
        A stream sends the history at once, then each new line as it is logged, with the
        headers that keep proxies and browsers from buffering or sniffing it; a client that
        leaves is forgotten.
        """
        self.log.info("old news")
        client = follow(self.h.root, "/logs/stream")
        status, headers = client.head()
        self.assertEqual(status, 200)
        self.assertEqual(headers.getRawHeaders(b"content-type"), [b"text/plain; charset=utf-8"])
        self.assertEqual(headers.getRawHeaders(b"x-content-type-options"), [b"nosniff"])
        self.assertEqual(headers.getRawHeaders(b"x-accel-buffering"), [b"no"])
        self.assertEqual(client.body(), b"[INFO] old news\n")
        self.log.info("fresh")
        self.assertEqual(client.body(), b"[INFO] old news\n[INFO] fresh\n")
        self.assertEqual(self.history.combined.subscribers, 1)
        client.close()
        self.assertEqual(self.history.combined.subscribers, 0)
        self.log.info("after")
        self.assertNotIn(b"after", client.body())

    def test_no_history(self) -> None:
        """
        With C{?no-history} (any value, or none) only new lines come.
        """
        self.log.info("old news")
        bare = self.follow("/logs/stream/proxy?no-history")
        valued = self.follow("/logs/stream/proxy?x=1&no-history=true")
        self.log.info("fresh")
        self.assertEqual(bare.body(), b"[INFO] fresh\n")
        self.assertEqual(valued.body(), b"[INFO] fresh\n")

    def test_upstream_and_model_streams(self) -> None:
        """
        ``/logs/stream/upstream`` has every model's output; ``/logs/stream/<model>`` (by id or
        alias) only that model's, and swapproxy's messages about it.
        """
        upstream = self.follow("/logs/stream/upstream")
        llama = self.follow("/logs/stream/fast")
        self.model_log.info("[{model}] {line}", model="llama", line="llama speaks")
        upstream_logger("qwen").info("[{model}] {line}", model="qwen", line="qwen speaks")
        self.log.info("model {model} ready", model="llama")
        self.assertEqual(upstream.body(), b"[llama] llama speaks\n[qwen] qwen speaks\n")
        self.assertEqual(llama.body(), b"llama speaks\n[INFO] model llama ready\n")

    def test_unknown_stream(self) -> None:
        response, body = self.h.call("GET", "/logs/stream/nope")
        self.assertEqual(response.code, 404)
        self.assertEqual(header(response, b"content-type"), [b"application/json"])
        self.assertIn(b"/logs/stream/<model>", body)
        response, _ = self.h.call("GET", "/logs/other")
        self.assertEqual(response.code, 404)

    def test_slow_reader_does_not_block(self) -> None:
        """
        A reader whose socket is full does not slow logging down or make swapproxy hold more
        than its queue; when it reads again it gets the queue and is told what it missed, and
        the history still has the newest lines.
        """
        client = self.follow("/logs/stream/proxy?no-history")
        sent_before = len(client.transport.value())
        client.pause()
        line = "x" * 1000
        for i in range(1000):
            self.log.info("{i:04d} {line}", i=i, line=line)
        self.assertEqual(len(client.transport.value()), sent_before)
        self.assertIn(b"[INFO] 0999 ", self.history.proxy.history())
        self.assertGreater(self.history.proxy.size, 100_000 - 1100)
        client.resume()
        received = client.body()
        self.assertTrue(received.startswith(b"[INFO] 0000 "), received[:20])
        self.assertIn(b"[INFO] 0050 ", received)
        self.assertNotIn(b"[INFO] 0999 ", received)
        self.assertLess(len(received), 70_000)
        self.assertTrue(received.endswith(" bytes dropped \u2014\n".encode()), received[-40:])
        self.log.info("caught up")
        self.assertTrue(client.body().endswith(b"[INFO] caught up\n"))


class ServiceTests(ConfigFileMixin, SynchronousTestCase):
    """
    ``twistd swapproxy`` keeps the log and serves it, with the config's ``logToStdout`` and
    ``logTimeFormat``, from its start to its stop.
    """

    def start(self, config: str) -> tuple[MemoryReactorClock, Any]:
        """
        ``twistd swapproxy -c config -l tcp:9001`` built on a memory reactor, and started.
        """
        self.addCleanup(set_log_level, "info")
        options = tap.Options()
        options.parseOptions(["-c", config, "--state-dir", self.mktemp(), "-l", "tcp:9001"])
        reactor = ThreadedMemoryReactor()
        service = tap.makeService(options, reactor)
        service.startService()
        reactor.run_from_threads()  # the activity database is open
        return reactor, service

    def test_make_service_routes_and_serves_logs(self) -> None:
        events = capture_global(self)
        reactor, service = self.start(
            self.write_config(TWO_MODELS + '    logToStdout: upstream\n    logTimeFormat: "%Y"\n'))
        try:
            proxy_logger("tests.logbuffer").info("a proxy line")
            upstream_logger("qwen").info("[{model}] {line}", model="qwen", line="a model line")
            self.assertEqual([e.get("line") for e in events if e.get("log_namespace") == "upstream.qwen"],
                             ["a model line"])
            self.assertNotIn("tests.logbuffer", [e.get("log_namespace") for e in events])
            year = time.strftime("%Y").encode()
            for path, expected in ((b"/logs", year + b" [qwen] a model line\n"), (b"/metrics", b"swapproxy_model_state")):
                response = self.get(reactor, b"GET", path)
                self.assertTrue(response.startswith(b"HTTP/1.1 200 "), response)
                self.assertIn(expected, response)
        finally:
            reactor.stop_service(service)
        # Stopped, the routing is back to what it was: upstream lines and proxy lines both reach
        # the global publisher.
        del events[:]
        proxy_logger("tests.logbuffer").info("after")
        self.assertIn("tests.logbuffer", [e.get("log_namespace") for e in events])

    def get(self, reactor: MemoryReactorClock, method: bytes, path: bytes, body: bytes = b"") -> bytes:
        """
        The raw response to one request to the first ``--listen`` of a service started on ``reactor``.
        """
        _, factory, _, _ = reactor.tcpServers[0]
        protocol = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        transport = StringTransport()
        protocol.makeConnection(transport)
        head = b"%s %s HTTP/1.1\r\nHost: localhost\r\nContent-Length: %d\r\n" % (method, path, len(body))
        protocol.dataReceived(head + b"Content-Type: application/json\r\n\r\n" + body)
        return transport.value()

    def test_start_up_messages_and_requests_are_in_the_log(self) -> None:
        """
        ``/logs`` begins with what was logged while the service was built (the config's
        warnings, the start-up line), and has a line for each model request as it ends.
        """
        config = self.write_config(TWO_MODELS + "    newerFeature: true\n")
        reactor, service = self.start(config)
        self.addCleanup(reactor.stop_service, service)
        self.assertIn(b"HTTP/1.1 404 ", self.get(reactor, b"POST", b"/v1/chat/completions", b'{"model": "nope"}'))
        log = self.get(reactor, b"GET", b"/logs").partition(b"\r\n\r\n")[2].decode()
        lines = [line.partition(" [")[2] for line in log.splitlines()]
        self.assertEqual(lines[0], f"WARN] {config}: unsupported keys ignored: newerFeature")
        self.assertEqual(lines[1], f"INFO] swapproxy {__version__}: 2 models from {config}")
        self.assertIn("INFO] /v1/chat/completions (no model): 404 in 0 ms from 192.168.1.1", lines)

    def test_one_access_line_per_request(self) -> None:
        """
        In twistd's log, a model request has swapproxy's request line and not Twisted's access
        log line as well; a request for any other route has Twisted's access log line.
        """
        events = capture_global(self)
        reactor, service = self.start(self.write_config(TWO_MODELS))
        self.addCleanup(reactor.stop_service, service)
        site = reactor.tcpServers[0][1]
        site.startFactory()  # turns Twisted's access log on, as listening does
        self.addCleanup(site.stopFactory)
        self.get(reactor, b"POST", b"/v1/chat/completions", b'{"model": "nope"}')
        self.get(reactor, b"GET", b"/health")
        lines = [formatEvent(e) for e in events]
        self.assertEqual([line for line in lines if "/v1/chat/completions" in line],
                         ["/v1/chat/completions (no model): 404 in 0 ms from 192.168.1.1"])
        self.assertEqual(len([line for line in lines if '"GET /health HTTP/1.1" 200' in line]), 1, lines)

    def test_timestamps_by_default(self) -> None:
        """
        Without ``logTimeFormat`` each line of ``/logs`` starts with the local date and time;
        ``logTimeFormat: ""`` turns them off.
        """
        for extra, stamped in (("", True), ('    logTimeFormat: ""\n', False)):
            reactor, service = self.start(self.write_config(TWO_MODELS + extra))
            log = self.get(reactor, b"GET", b"/logs").partition(b"\r\n\r\n")[2].decode()
            reactor.stop_service(service)
            first = log.splitlines()[0]
            self.assertEqual(bool(re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \[INFO\] swapproxy ", first)), stamped,
                             first)
            self.assertEqual(first.startswith("[INFO] swapproxy "), not stamped, first)


class RequestLogTests(SynchronousTestCase):
    """
    The line each finished model request adds to the log.
    """

    def test_line_names_model_route_status_and_durations(self) -> None:
        """
        The line says the route, the model, the status, how long the request took and the
        client's address; it is in the model's own log too. A client that hung up first is said
        to have.
        """
        history = routed(self, "proxy")
        log_request({"model": "qwen", "route": "/v1/chat/completions", "status": 200, "duration_ms": 1234,
                     "ttfb_ms": 1200, "client": "10.0.0.7"})
        log_request({"model": "qwen", "route": "/upstream", "status": 499, "duration_ms": 80, "ttfb_ms": None})
        expected = (b"[INFO] /v1/chat/completions qwen: 200 in 1234 ms (first byte after 1200 ms) from 10.0.0.7\n"
                    b"[INFO] /upstream qwen: 499 (the client hung up) in 80 ms\n")
        self.assertEqual(history.combined.history(), expected)
        self.assertEqual(history.model("qwen").history(), expected)

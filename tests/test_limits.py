"""
Tests for L{swapproxy.web.site}: the body, header, time and connection limits, and the
C{limits} section of the config.

Most tests speak raw HTTP to the real Site over an in-memory transport, with a C{Clock}; two talk
to it over loopback sockets, to show that a refused client really reads its answer.
"""

from __future__ import annotations

import json
import textwrap
from typing import Any

import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import ISSLTransport
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import directlyProvides

from swapproxy.config import ConfigError, Limits, parse_config
from swapproxy.web.site import LINGER_SECONDS, SwapproxySite, describe_size
from tests.support.harness import Harness
from tests.support.live import connect_raw
from tests.support.processes import wait_until
from tests.support.rawhttp import RawConnection, RawResponse, parse_responses

CHAT = b'{"model": "llama", "messages": []}'


def post(path: bytes, body: bytes, *headers: bytes) -> bytes:
    lines = [b"POST " + path + b" HTTP/1.1", b"Host: swapproxy.test", *headers]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


class LimitsTestMixin:
    """
    A Harness served by a `SwapproxySite` with the test's limits.
    """

    limits = Limits(max_body_size=1000, max_header_size=2048, request_timeout=30, idle_timeout=300, max_connections=3)

    def setUp(self) -> None:
        self.h = Harness(self)  # type: ignore[arg-type]
        self.site = SwapproxySite(self.h.root, self.limits, self.h.clock)
        self.ports = iter(range(40000, 50000))

    def connect(self) -> RawConnection:
        return self.h.connect(self.site, next(self.ports))

    def assertRefused(self, connection: RawConnection, status: int, *fragments: str) -> RawResponse:
        """
        The connection got exactly one answer, a JSON error with C{status} that says
        C{Connection: close}, and swapproxy is closing it.
        """
        test: SynchronousTestCase = self  # type: ignore[assignment]
        responses = connection.responses()
        test.assertEqual([r.status for r in responses], [status], connection.transport.value())
        response = responses[0]
        test.assertEqual(response.header(b"content-type"), [b"application/json"])
        test.assertEqual(response.header(b"connection"), [b"close"])
        error = response.json()["error"]
        for fragment in fragments:
            test.assertIn(fragment, error["message"])
        test.assertTrue(connection.transport.closing)
        return response


class BodySizeTests(LimitsTestMixin, SynchronousTestCase):
    """
    limits.maxBodySize.
    """

    def test_content_length_over_the_limit(self) -> None:
        """
        A Content-Length over the limit is answered 413 before any of the body is read (no
        "100 Continue"), naming the limit; nothing reaches a model.
        """
        connection = self.connect()
        connection.send(post(b"/v1/chat/completions", b"", b"Content-Length: 1001", b"Expect: 100-continue"))
        self.assertRefused(connection, 413, "1000 bytes", "limits.maxBodySize")
        self.assertNotIn(b"100 Continue", connection.transport.value())
        connection.send(b"x" * 1001)
        self.assertEqual(len(connection.responses()), 1)
        self.assertEqual(self.h.received, [])
        self.assertEqual(self.h.upstreams["llama"].starts, 0)

    def test_content_length_at_the_limit(self) -> None:
        """
        A body of exactly the limit is served.
        """
        body = CHAT[:-1] + b" " * (1000 - len(CHAT)) + b"}"
        connection = self.connect()
        connection.request(b"POST", b"/v1/chat/completions", body)
        self.assertEqual([r.status for r in connection.responses()], [200])
        self.assertEqual(self.h.received[-1].body, body)

    def test_chunked_body_over_the_limit(self) -> None:
        """
        A chunked body is refused as soon as it grows past the limit, before it ends.
        """
        connection = self.connect()
        connection.send(post(b"/v1/chat/completions", b"", b"Transfer-Encoding: chunked"))
        for _ in range(3):
            connection.send(chunk(b"x" * 300))
        self.assertEqual(connection.responses(), [])
        connection.send(chunk(b"x" * 101))
        self.assertRefused(connection, 413, "limits.maxBodySize")
        connection.send(chunk(b"x" * 5000) + b"0\r\n\r\n")
        self.assertEqual(len(connection.responses()), 1)
        self.assertEqual(self.h.received, [])

    def test_chunked_body_under_the_limit(self) -> None:
        """
        A chunked body within the limit reaches the model whole, with a Content-Length.
        """
        connection = self.connect()
        connection.send(post(b"/v1/chat/completions", b"", b"Transfer-Encoding: chunked"))
        connection.send(chunk(CHAT[:10]) + chunk(CHAT[10:]) + b"0\r\n\r\n")
        self.assertEqual([r.status for r in connection.responses()], [200])
        self.assertEqual(self.h.received[-1].body, CHAT)
        self.assertEqual(self.h.received[-1].headers.getRawHeaders(b"content-length"), [b"%d" % len(CHAT)])

    def test_no_limit(self) -> None:
        """
        maxBodySize 0 means no limit.
        """
        self.site = SwapproxySite(self.h.root, Limits(max_body_size=0), self.h.clock)
        body = CHAT[:-1] + b" " * 200_000 + b"}"
        connection = self.connect()
        connection.request(b"POST", b"/v1/chat/completions", body)
        self.assertEqual([r.status for r in connection.responses()], [200])


class HeaderSizeTests(LimitsTestMixin, SynchronousTestCase):
    """
    limits.maxHeaderSize.
    """

    def test_headers_over_the_limit(self) -> None:
        """
        Many headers that add up to more than the limit: 431.
        """
        connection = self.connect()
        headers = [b"X-Filler-%d: %s" % (i, b"v" * 90) for i in range(30)]
        connection.send(post(b"/v1/chat/completions", CHAT, b"Content-Length: %d" % len(CHAT), *headers))
        self.assertRefused(connection, 431, "2 KiB (2048 bytes)", "limits.maxHeaderSize")
        self.assertEqual(self.h.received, [])

    def test_one_long_header(self) -> None:
        """
        One header line longer than the limit, even before its end arrives: 431.
        """
        connection = self.connect()
        connection.send(b"POST /v1/chat/completions HTTP/1.1\r\nX-Long: " + b"v" * 3000)
        self.assertRefused(connection, 431, "limits.maxHeaderSize")

    def test_long_request_line(self) -> None:
        """
        A request line longer than the limit: 414.
        """
        connection = self.connect()
        connection.send(b"GET /v1/models?" + b"q" * 3000)
        self.assertRefused(connection, 414, "request line", "limits.maxHeaderSize")

    def test_headers_within_the_limit(self) -> None:
        """
        Headers just under the limit are fine, and the count starts again for the next request
        on the same connection.
        """
        connection = self.connect()
        headers = [b"X-Filler-%d: %s" % (i, b"v" * 90) for i in range(18)]
        connection.request(b"POST", b"/v1/chat/completions", CHAT, headers)
        connection.request(b"POST", b"/v1/chat/completions", CHAT, headers)
        self.assertEqual([r.status for r in connection.responses()], [200, 200])


class TimeTests(LimitsTestMixin, SynchronousTestCase):
    """
    limits.requestTimeout and limits.idleTimeout.
    """

    def test_slow_headers(self) -> None:
        """
        Headers that trickle in one byte every 5 seconds are cut off at the deadline, although
        each byte resets the idle timer.
        """
        connection = self.connect()
        connection.send(b"POST /v1/chat/completions HTTP/1.1\r\n")
        for _ in range(5):
            self.h.clock.advance(5)
            connection.send(b"X")
        self.assertEqual(connection.responses(), [])
        self.h.clock.advance(5)
        self.assertRefused(connection, 408, "30 seconds", "limits.requestTimeout")

    def test_slow_body(self) -> None:
        """
        A body sent a byte at a time, a byte every 25 seconds, is refused 30 seconds after the
        request began.
        """
        connection = self.connect()
        connection.send(post(b"/v1/chat/completions", b"{", b"Content-Length: %d" % len(CHAT)))
        self.h.clock.advance(25)
        connection.send(b'"')
        self.assertEqual(connection.responses(), [])
        self.h.clock.advance(5)
        self.assertRefused(connection, 408, "limits.requestTimeout")
        self.assertEqual(self.h.received, [])

    def test_refused_connection_is_closed(self) -> None:
        """
        After a refusal the connection is half-closed at once and aborted after the linger time
        if the client keeps it open; what the client sends meanwhile is ignored.
        """
        connection = self.connect()
        connection.send(b"POST /v1/chat/completions HTTP/1.1\r\n")
        self.h.clock.advance(30)
        self.assertTrue(connection.transport.write_closed)
        self.assertFalse(connection.transport.aborted)
        connection.send(b"X-More: x\r\n\r\n" + CHAT)
        self.h.clock.advance(LINGER_SECONDS)
        self.assertTrue(connection.transport.aborted)
        connection.close()
        self.assertEqual(len(connection.responses()), 1)
        self.assertEqual(self.site.connections, set())

    def test_tls_connection_closed_whole(self) -> None:
        """
        Over TLS a refusal closes the whole connection: a half-close would skip the TLS close.
        """
        connection = self.connect()
        directlyProvides(connection.transport, ISSLTransport)
        connection.send(b"POST /v1/chat/completions HTTP/1.1\r\n")
        self.h.clock.advance(30)
        self.assertEqual(connection.responses()[0].status, 408)
        self.assertFalse(connection.transport.write_closed)
        self.assertTrue(connection.transport.disconnecting)

    def test_deadline_counts_from_the_first_byte(self) -> None:
        """
        A keep-alive connection may wait between requests longer than requestTimeout; the
        deadline applies to each request from its own first byte.
        """
        connection = self.connect()
        connection.request(b"POST", b"/v1/chat/completions", CHAT)
        self.h.clock.advance(200)
        connection.request(b"POST", b"/v1/chat/completions", CHAT)
        self.h.clock.advance(29)
        connection.send(b"POST /v1/chat/completions HTTP/1.1\r\n")
        self.h.clock.advance(29)
        connection.send(b"Content-Length: %d\r\n\r\n%s" % (len(CHAT), CHAT))
        self.assertEqual([r.status for r in connection.responses()], [200, 200, 200])
        self.assertFalse(connection.transport.closing)

    def test_slow_answer_is_not_a_slow_request(self) -> None:
        """
        Once a request has arrived, the model may take as long as it needs to answer.
        """
        self.h.upstreams["llama"].auto_ready = False
        connection = self.connect()
        connection.request(b"POST", b"/v1/chat/completions", CHAT)
        self.h.clock.advance(600)
        self.h.upstreams["llama"].become_ready()
        self.h.flush()
        self.assertEqual([r.status for r in connection.responses()], [200])

    def test_idle_connection_closed(self) -> None:
        """
        A connection that sends nothing is closed after idleTimeout, without an answer.
        """
        connection = self.connect()
        self.h.clock.advance(299)
        self.assertFalse(connection.transport.closing)
        self.h.clock.advance(1)
        self.assertTrue(connection.transport.closing)
        self.assertEqual(connection.transport.value(), b"")


class ConnectionCountTests(LimitsTestMixin, SynchronousTestCase):
    """
    limits.maxConnections.
    """

    def test_over_the_limit(self) -> None:
        """
        Beyond the limit a new connection is answered 503 with Retry-After and closed; once a
        connection closes, a new one is served again.
        """
        open_ = [self.connect() for _ in range(3)]
        extra = self.connect()
        response = self.assertRefused(extra, 503, "too many open connections", "limits.maxConnections", "3")
        self.assertEqual(response.header(b"retry-after"), [b"1"])
        extra.send(post(b"/v1/chat/completions", CHAT, b"Content-Length: %d" % len(CHAT)))
        self.assertEqual(self.h.received, [])
        extra.close()
        open_[0].close()
        again = self.connect()
        again.request(b"POST", b"/v1/chat/completions", CHAT)
        self.assertEqual([r.status for r in again.responses()], [200])
        self.assertEqual(len(self.site.connections), 3)

    def test_refusals_are_bounded(self) -> None:
        """
        While as many refusals as the limit are still lingering, a further connection is
        dropped without an answer.
        """
        for _ in range(3):
            self.connect()
        refused = [self.connect() for _ in range(3)]
        self.assertTrue(all(c.responses()[0].status == 503 for c in refused))
        dropped = self.connect()
        self.assertTrue(dropped.transport.aborted)
        self.assertEqual(dropped.transport.value(), b"")
        self.h.clock.advance(LINGER_SECONDS)
        for connection in refused:
            self.assertTrue(connection.transport.aborted)
            connection.close()
        self.assertEqual(self.site.refusals, set())

    def test_connections_counted_until_lost(self) -> None:
        connections = [self.connect() for _ in range(2)]
        self.assertEqual(len(self.site.connections), 2)
        for connection in connections:
            connection.close()
        self.assertEqual(self.site.connections, set())


class MalformedTests(LimitsTestMixin, SynchronousTestCase):
    """
    Requests Twisted cannot parse get a JSON 400 rather than an empty one.
    """

    def test_malformed(self) -> None:
        for data in [
            b"POST /v1/chat/completions HTTP/1.1\r\nNo colon here\r\n\r\n",
            b"POST /v1/chat/completions HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: ten\r\n\r\n",
            b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nx",
            b"POST /v1/chat/completions HTTP/3.0\r\n\r\n",
            b"BAD REQUEST LINE HERE\r\n\r\n",
        ]:
            connection = self.connect()
            connection.send(data)
            self.assertRefused(connection, 400, "malformed HTTP request")
            connection.close()
        self.assertEqual(self.h.received, [])

    def test_control_characters_in_headers(self) -> None:
        """
        A header with a control character other than HTAB is refused, naming the header; obs-text
        (bytes 0x80-0xff, such as UTF-8) and HTAB are fine.
        """
        for value in [b"a\x01b", b"a\x0bb", b"a\x1fb", b"a\x7fb"]:
            connection = self.connect()
            length = b"Content-Length: %d" % len(CHAT)
            connection.send(post(b"/v1/chat/completions", CHAT, b"X-Trace: " + value, length))
            self.assertRefused(connection, 400, "header 'X-Trace' contains the control character")
            connection.close()
        self.assertEqual(self.h.received, [])
        connection = self.connect()
        connection.request(b"POST", b"/v1/chat/completions", CHAT, [b"X-Trace: \xc3\x85\tok"])
        self.assertEqual([r.status for r in connection.responses()], [200])
        self.assertEqual(self.h.received[-1].headers.getRawHeaders(b"x-trace"), [b"\xc3\x85\tok"])

    def test_unparseable_form_content_type(self) -> None:
        """
        A form Content-Type that Twisted's form parser chokes on is a JSON 400, not a crash.
        """
        connection = self.connect()
        body = b"--X\x85Y--\r\n"
        connection.send(post(b"/v1/audio/transcriptions", body, b"Content-Type: multipart/form-data; boundary=X\x85Y",
                             b"Content-Length: %d" % len(body)))
        self.assertRefused(connection, 400, "cannot parse the form body or its Content-Type")


class ConfigTests(SynchronousTestCase):
    """
    The C{limits} section of the config.
    """

    def parse(self, text: str) -> Limits:
        return parse_config(textwrap.dedent(text), "config.yaml", {}).limits

    def test_defaults(self) -> None:
        limits = self.parse("models: {}")
        self.assertEqual(limits, Limits(64 * 1024**2, 16 * 1024, 120.0, 60.0, 512))

    def test_values(self) -> None:
        limits = self.parse("""
            limits:
              maxBodySize: 1.5MiB
              maxHeaderSize: 32 KiB
              requestTimeout: 2.5
              idleTimeout: 0
              maxConnections: 0
        """)
        self.assertEqual(limits, Limits(1536 * 1024, 32 * 1024, 2.5, 0.0, 0))
        self.assertEqual(self.parse("limits: {maxBodySize: 10MB}").max_body_size, 10_000_000)
        self.assertEqual(self.parse("limits: {maxBodySize: 4096}").max_body_size, 4096)
        self.assertEqual(self.parse("limits: {maxBodySize: 0}").max_body_size, 0)

    def test_errors(self) -> None:
        for text, message in [
            ("limits: {maxBodySize: lots}", "config.yaml: limits.maxBodySize: must be 0 (no limit) or a size"),
            ("limits: {maxBodySize: -1}", "limits.maxBodySize: must be 0 (no limit) or a size"),
            ("limits: {maxBodySize: " + "9" * 400 + " GiB}", "limits.maxBodySize: must be 0 (no limit) or a size"),
            ("limits: {maxHeaderSize: 100}", "limits.maxHeaderSize: must be a size of at least 1024 bytes"),
            ("limits: {maxHeaderSize: 0}", "limits.maxHeaderSize: must be a size of at least 1024 bytes, such as"),
            ("limits: {requestTimeout: soon}", "limits.requestTimeout: must be a number of seconds >= 0"),
            ("limits: {maxConnections: -3}", "limits.maxConnections: must be an integer >= 0"),
            ("limits: [1]", "limits: must be a mapping"),
        ]:
            with self.assertRaises(ConfigError) as caught:
                self.parse(text)
            self.assertIn(message, str(caught.exception))

    def test_unknown_key_warned(self) -> None:
        config = parse_config("limits: {maxBodySise: 1}\nmodels: {}", "config.yaml", {})
        self.assertIn("limits.maxBodySise", config.warnings[0])

    @settings(max_examples=200, deadline=None)
    @given(st.dictionaries(
        st.sampled_from(["maxBodySize", "maxHeaderSize", "requestTimeout", "idleTimeout", "maxConnections", "x"]),
        st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=12),
                  st.sampled_from(["64MiB", "1.5 kb", "0", "-1KiB", "1e3", "12 GiB"]), st.lists(st.integers())),
    ))
    def test_any_values_load_or_fail_clearly(self, limits: dict[str, Any]) -> None:
        """
        Whatever the values, the config loads or fails with one line naming the key.
        """
        text = yaml.safe_dump({"limits": limits, "models": {}})
        try:
            parse_config(text, "config.yaml", {})
        except ConfigError as e:
            self.assertNotIn("\n", str(e))
            self.assertRegex(str(e), r"^config\.yaml: limits\.\w+: ")

    def test_describe_size(self) -> None:
        self.assertEqual(describe_size(64 * 1024**2), "64 MiB (67108864 bytes)")
        self.assertEqual(describe_size(1500), "1500 bytes")


# -- over real sockets -------------------------------------------------------------------------


class LoopbackTests(TestCase):
    """
    A real client over loopback reads the answer to a refused request.
    """

    timeout = 30

    def serve(self, limits: Limits) -> int:
        h = Harness(self)
        site = SwapproxySite(h.root, limits, reactor)
        port = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.addCleanup(port.stopListening)

        async def all_closed() -> None:
            await wait_until(lambda: not site.connections and not site.refusals, what="connections to close")

        self.addCleanup(lambda: Deferred.fromCoroutine(all_closed()))
        return int(port.getHost().port)

    async def test_client_sending_too_much_reads_413(self) -> None:
        """
        A client that sends a 4 MiB body regardless reads the 413, not a connection reset.
        """
        port = self.serve(Limits(max_body_size=1024))
        body = b"x" * (4 * 1024**2)
        request = post(b"/v1/chat/completions", body, b"Content-Length: %d" % len(body))
        client = await connect_raw(port, request, testcase=self)
        received = await client.done
        responses, _ = parse_responses(received, [b"POST"], closed=True)
        self.assertEqual([r.status for r in responses], [413])
        self.assertIn("limits.maxBodySize", json.loads(responses[0].body)["error"]["message"])

    async def test_connection_over_the_limit_reads_503(self) -> None:
        """
        With maxConnections 2 and two connections open, a third client reads a 503.
        """
        port = self.serve(Limits(max_connections=2))
        for _ in range(2):
            await connect_raw(port, b"", testcase=self)
        third = await connect_raw(port, b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n", testcase=self)
        responses, _ = parse_responses(await third.done, [b"GET"], closed=True)
        self.assertEqual([r.status for r in responses], [503])

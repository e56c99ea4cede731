"""
Tests for L{swapproxy.web.forward} and L{swapproxy.web.relay}: what reaches the upstream, and how
its answer reaches the client. (The same pipeline behind a loading stream: L{tests.test_loading}.)

Most tests use L{tests.support.harness.Harness} (a treq client, swapproxy's Resource tree, fake
upstreams, all in memory). Tests about the bytes on the client's connection (hop-by-hop headers,
flow control, hanging up) talk to swapproxy's real C{Site} over a C{StringTransport}.
"""

from __future__ import annotations

import gzip
import json
from typing import Any

import treq
from twisted.internet.defer import fail
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import ResponseDone, ResponseFailed, ResponseNeverReceived
from twisted.web.server import NOT_DONE_YET, Request

from swapproxy.upstream import State
from swapproxy.web import forward
from tests.support.harness import (
    ErrorAssertions,
    Harness,
    Received,
    answer_event_stream,
    answer_json,
    answer_later,
    header,
    sample,
)
from tests.support.rawhttp import dechunk

CHAT = b'{"model": "llama", "stream": true, "messages": []}'


class BodyReader(Protocol):
    """
    Reads a response body chunk by chunk; can hang up like a client that goes away.
    """

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.reason: Failure | None = None

    def dataReceived(self, data: bytes) -> None:
        self.chunks.append(data)

    def connectionLost(self, reason: Failure) -> None:
        self.reason = reason

    def hang_up(self) -> None:
        self.transport.stopProducing()


class RequestForwardingTests(SynchronousTestCase):
    """
    What the upstream receives.
    """

    def setUp(self) -> None:
        self.h = Harness(self)

    def test_headers_forwarded(self) -> None:
        """
        End-to-end headers reach the upstream; the client's Host, Accept-Encoding,
        Content-Length and hop-by-hop headers do not; X-Forwarded-For gains the client.
        """
        body = b'{"model": "llama", "messages": []}'
        response, _ = self.h.call(
            "POST",
            "/v1/chat/completions",
            body,
            {
                "Content-Type": "application/json",
                "Authorization": "Bearer sk-local",
                "Accept-Encoding": "br",
                "X-Forwarded-For": "10.0.0.1",
                "Keep-Alive": "timeout=300",
                "Proxy-Authorization": "Basic c2VjcmV0",
                "X-Hop": "only for swapproxy",
                "Connection": "X-Hop",
                "X-Request-Id": "abc-123",
            },
        )
        self.assertEqual(response.code, 200)
        received = self.h.received[-1].headers
        self.assertEqual(received.getRawHeaders(b"authorization"), [b"Bearer sk-local"])
        self.assertEqual(received.getRawHeaders(b"x-request-id"), [b"abc-123"])
        self.assertEqual(received.getRawHeaders(b"content-type"), [b"application/json"])
        self.assertEqual(received.getRawHeaders(b"host"), [b"upstream.test"])
        self.assertEqual(received.getRawHeaders(b"content-length"), [str(len(body)).encode()])
        self.assertNotIn(b"br", b",".join(received.getRawHeaders(b"accept-encoding", [])))
        self.assertEqual(received.getRawHeaders(b"x-forwarded-for"), [b"10.0.0.1, 127.0.0.1"])
        self.assertEqual(received.getRawHeaders(b"x-forwarded-host"), [b"swapproxy.test"])
        for name in [b"keep-alive", b"proxy-authorization", b"x-hop"]:
            self.assertIsNone(received.getRawHeaders(name), name)
        self.assertNotIn(b"X-Hop", b",".join(received.getRawHeaders(b"connection", [])))

    def test_x_forwarded_for_added(self) -> None:
        """
        Without an X-Forwarded-For from the client, the upstream learns the client's address.
        """
        client = self.h.connect()
        client.request(b"POST", b"/v1/chat/completions", b'{"model": "llama"}')
        self.assertEqual(self.h.received[-1].headers.getRawHeaders(b"x-forwarded-for"), [b"192.0.2.7"])

    def test_get_has_no_body(self) -> None:
        """
        A GET through /upstream reaches the upstream without a body or Content-Length.
        """
        self.h.call("GET", "/upstream/llama/slots")
        received = self.h.received[-1]
        self.assertEqual((received.method, received.body), (b"GET", b""))
        self.assertIsNone(received.headers.getRawHeaders(b"content-length"))
        self.assertIsNone(received.headers.getRawHeaders(b"transfer-encoding"))


class ResponseRelayTests(ErrorAssertions, SynchronousTestCase):
    """
    What the client receives of the upstream's answer.
    """

    def setUp(self) -> None:
        self.h = Harness(self)

    def test_status_and_headers(self) -> None:
        """
        The upstream's status, reason and end-to-end headers reach the client; its Server and
        Content-Type replace swapproxy's own.
        """

        def respond(request: Request, received: Received) -> bytes:
            request.setResponseCode(201, b"Made It")
            request.setHeader(b"content-type", b"application/x-ndjson")
            request.setHeader(b"server", b"llama.cpp")
            request.setHeader(b"x-slot-id", b"3")
            request.responseHeaders.setRawHeaders(b"set-cookie", [b"a=1", b"b=2"])
            return b'{"n": 1}\n'

        self.h.server.respond = respond
        response, body = self.h.post_json("/v1/completions", {"model": "llama"})
        self.assertEqual((response.code, response.phrase, body), (201, b"Made It", b'{"n": 1}\n'))
        self.assertEqual(header(response, b"content-type"), [b"application/x-ndjson"])
        self.assertEqual(header(response, b"server"), [b"llama.cpp"])
        self.assertEqual(header(response, b"x-slot-id"), [b"3"])
        self.assertEqual(header(response, b"set-cookie"), [b"a=1", b"b=2"])

    def test_error_status_relayed(self) -> None:
        """
        An upstream error answer reaches the client as it was, not replaced by swapproxy's.
        """

        def respond(request: Request, received: Received) -> bytes:
            request.setResponseCode(400)
            request.setHeader(b"content-type", b"application/json")
            return b'{"error": {"message": "context too long", "code": 400}}'

        self.h.server.respond = respond
        response, body = self.h.post_json("/v1/chat/completions", {"model": "llama"})
        self.assertEqual(response.code, 400)
        self.assertEqual(body, b'{"error": {"message": "context too long", "code": 400}}')

    def test_redirect_not_followed(self) -> None:
        """
        An upstream redirect is relayed to the client, not followed by swapproxy.
        """

        def respond(request: Request, received: Received) -> bytes:
            if received.uri != b"/old":
                return b"followed"
            request.setResponseCode(302)
            request.setHeader(b"location", b"/new")
            return b""

        self.h.server.respond = respond
        response, _ = self.h.call("GET", "/upstream/llama/old")
        self.assertEqual(response.code, 302)
        self.assertEqual(header(response, b"location"), [b"/new"])
        self.assertEqual([r.uri for r in self.h.received], [b"/old"])

    def test_hop_by_hop_response_headers(self) -> None:
        """
        The upstream's connection headers are not relayed: the client's connection carries
        exactly one framing (swapproxy's own) and no Keep-Alive of the upstream's.
        """

        def respond(request: Request, received: Received) -> int:
            request.setHeader(b"content-type", b"application/json")
            request.setHeader(b"keep-alive", b"timeout=5, max=100")
            request.setHeader(b"x-end-to-end", b"yes")
            request.write(b'{"part": 1')
            request.write(b"}")
            request.finish()
            return NOT_DONE_YET

        self.h.server.respond = respond
        client = self.h.connect()
        client.request(b"POST", b"/v1/chat/completions", b'{"model": "llama"}')
        self.assertEqual(client.status_line(), b"HTTP/1.1 200 OK")
        self.assertEqual(client.header(b"x-end-to-end"), [b"yes"])
        self.assertEqual(client.header(b"keep-alive"), [])
        self.assertEqual(client.header(b"transfer-encoding"), [b"chunked"])
        self.assertEqual(client.header(b"content-length"), [])
        chunks, complete = dechunk(client.raw_body())
        self.assertEqual((b"".join(chunks), complete), (b'{"part": 1}', True))

    def test_gzip_answer_decoded_consistently(self) -> None:
        """
        An upstream gzip answer reaches the client with a body that matches its headers: no
        stale Content-Length or Content-Encoding from the compressed form.
        """
        plain = json.dumps({"choices": [{"text": "x" * 2000}]}).encode()
        packed = gzip.compress(plain)

        def respond(request: Request, received: Received) -> bytes:
            request.setHeader(b"content-type", b"application/json")
            request.setHeader(b"content-encoding", b"gzip")
            return packed

        self.h.server.respond = respond
        client = self.h.connect()
        client.request(b"POST", b"/v1/completions", b'{"model": "llama"}')
        encoding = client.header(b"content-encoding")
        length = client.header(b"content-length")
        if length:
            body = client.raw_body()
            self.assertEqual(length, [str(len(body)).encode()])
        else:
            chunks, complete = dechunk(client.raw_body())
            self.assertTrue(complete)
            body = b"".join(chunks)
        self.assertEqual(gzip.decompress(body) if encoding == [b"gzip"] else body, plain)

    def test_upstream_unreachable(self) -> None:
        """
        An upstream that cannot be reached is a 502 JSON error naming the model and the reason.
        """

        class Refusing:
            def request(self, *args: Any, **kwargs: Any) -> Any:
                return fail(ConnectionRefusedError("127.0.0.1:5800"))

        self.h.upstreams["llama"].make_client = Refusing
        self.patch(forward, "process_gone", lambda upstream: False)
        response, body = self.h.post_json("/v1/chat/completions", {"model": "llama"})
        error = self.assertJSONError(response, body, 502, "'llama'", "refused", error_type="server_error")
        self.assertEqual(error["code"], "bad_gateway")
        self.assertEqual(self.h.supervisor.in_flight["llama"], 0)
        self.assertEqual(self.h.upstreams["llama"].starts, 1)

    def test_model_that_hangs_up_without_answering(self) -> None:
        """
        A model that closes the connection without answering (it crashed on the request) is a
        502 saying the answer was cut short, not "Connection was closed cleanly.".
        """

        class HangingUp:
            def request(self, *args: Any, **kwargs: Any) -> Any:
                return fail(ResponseNeverReceived([Failure(ConnectionDone())]))

        self.h.upstreams["llama"].make_client = HangingUp
        self.patch(forward, "process_gone", lambda upstream: False)
        response, body = self.h.post_json("/v1/chat/completions", {"model": "llama"})
        error = self.assertJSONError(response, body, 502, "'llama'", error_type="server_error")
        self.assertEqual(
            error["message"], "model 'llama' did not answer: the connection was closed before the answer was complete"
        )

    def test_model_that_died_unnoticed_is_restarted(self) -> None:
        """
        A model whose process died a moment ago still looks ready; the request that finds its
        port closed waits for it to stop, starts it again and is answered by the new process.
        """
        upstream = self.h.upstreams["llama"]
        working = upstream.make_client

        class Dead:
            def request(self, *args: Any, **kwargs: Any) -> Any:
                upstream.make_client = working
                return fail(ConnectionRefusedError("127.0.0.1:5800"))

        upstream.make_client = Dead
        self.patch(forward, "process_gone", lambda candidate: candidate.client.__class__ is Dead)
        response, body = self.h.post_json("/v1/chat/completions", {"model": "llama"})
        self.assertEqual((response.code, json.loads(body)["served_by"]), (200, "llama"))
        self.assertEqual((upstream.starts, upstream.stops), (2, 1))
        self.assertEqual(len(self.h.received), 1)
        self.assertEqual(self.h.supervisor.in_flight["llama"], 0)

    def test_upstream_gone_before_forwarding(self) -> None:
        """
        A model whose process is gone by the time the request is forwarded is a 502 JSON error.
        """
        self.h.upstreams["llama"].make_client = lambda: None
        response, body = self.h.post_json("/v1/chat/completions", {"model": "llama"})
        self.assertJSONError(response, body, 502, "'llama'", "not running")


class StreamingTests(SynchronousTestCase):
    """
    Streams reach the client as they are produced.
    """

    def setUp(self) -> None:
        self.h = Harness(self)
        self.h.server.respond = answer_event_stream

    def start_stream(self) -> tuple[Received, Any, BodyReader]:
        pending = self.h.request("POST", "/v1/chat/completions", CHAT, {"Content-Type": "application/json"})
        self.assertEqual(len(self.h.received), 1)
        self.assertNoResult(pending)
        upstream = self.h.received[0]
        upstream.request.write(b'data: {"n": 0}\n\n')
        self.h.flush()
        response = self.successResultOf(pending)
        reader = BodyReader()
        response.deliverBody(reader)
        return upstream, response, reader

    def test_events_arrive_one_by_one(self) -> None:
        """
        Each event the upstream writes reaches the client at once, on its own: nothing waits
        for more data or for the end.
        """
        upstream, response, reader = self.start_stream()
        self.assertEqual(response.code, 200)
        self.assertEqual(header(response, b"content-type"), [b"text/event-stream"])
        self.assertEqual(header(response, b"x-accel-buffering"), [b"no"])
        self.assertEqual(reader.chunks, [b'data: {"n": 0}\n\n'])
        for n in range(1, 4):
            event = b'data: {"n": %d}\n\n' % n
            upstream.request.write(event)
            self.h.flush()
            self.assertEqual(len(reader.chunks), n + 1)
            self.assertEqual(reader.chunks[-1], event)
            self.assertIsNone(reader.reason)
        upstream.request.write(b"data: [DONE]\n\n")
        upstream.request.finish()
        self.h.flush()
        self.assertEqual(reader.chunks[-1], b"data: [DONE]\n\n")
        self.assertTrue(reader.reason.check(ResponseDone), reader.reason)
        self.assertEqual(self.h.supervisor.in_flight["llama"], 0)

    def test_non_sse_stream_not_buffered(self) -> None:
        """
        A chunked answer that is not SSE is relayed chunk by chunk too, without the SSE header.
        """
        self.h.server.respond = answer_later
        pending = self.h.request("POST", "/v1/completions", b'{"model": "llama"}')
        upstream = self.h.received[0]
        upstream.request.setHeader(b"content-type", b"application/x-ndjson")
        upstream.request.write(b'{"n": 0}\n')
        self.h.flush()
        response = self.successResultOf(pending)
        self.assertIsNone(header(response, b"x-accel-buffering"))
        reader = BodyReader()
        response.deliverBody(reader)
        upstream.request.write(b'{"n": 1}\n')
        self.h.flush()
        self.assertEqual(reader.chunks, [b'{"n": 0}\n', b'{"n": 1}\n'])

    def test_upstream_dies_mid_event_stream(self) -> None:
        """
        An upstream that dies mid-stream ends the client's stream with an SSE error event and a
        clean end, not a cut connection.
        """
        upstream, response, reader = self.start_stream()
        upstream.request.write(b'data: {"n": 1}\n\n')
        self.h.flush()
        upstream.request.loseConnection()
        self.h.flush()
        self.assertEqual(reader.chunks[:2], [b'data: {"n": 0}\n\n', b'data: {"n": 1}\n\n'])
        error, done, end = b"".join(reader.chunks[2:]).split(b"\n\n")
        self.assertTrue(error.startswith(b"data: "), error)
        payload = json.loads(error[len(b"data: "):])["error"]
        self.assertIn("llama", payload["message"])
        self.assertEqual((payload["type"], payload["code"]), ("server_error", "bad_gateway"))
        self.assertEqual((done, end), (b"data: [DONE]", b""))
        self.assertIsNotNone(reader.reason)
        self.assertTrue(reader.reason.check(ResponseDone), reader.reason)
        self.assertEqual(self.h.supervisor.in_flight["llama"], 0)

    def test_upstream_dies_mid_event_stream_says_the_answer_was_cut(self) -> None:
        """
        The error event of a stream the model broke off says the answer was cut short, not
        Twisted's "Connection was closed cleanly.", which read as if nothing had gone wrong.
        """
        upstream, response, reader = self.start_stream()
        upstream.request.loseConnection()
        self.h.flush()
        error = b"".join(reader.chunks[1:]).split(b"\n\n")[0]
        message = json.loads(error[len(b"data: "):])["error"]["message"]
        self.assertEqual(
            message, "model 'llama' ended the stream early: the connection was closed before the answer was complete"
        )

    def test_upstream_dies_mid_body(self) -> None:
        """
        An upstream that dies in the middle of a plain body cuts the client's connection, so
        the client can tell the body is incomplete.
        """
        self.h.server.respond = answer_later
        pending = self.h.request("POST", "/v1/completions", b'{"model": "llama"}')
        upstream = self.h.received[0]
        upstream.request.setHeader(b"content-type", b"application/json")
        upstream.request.write(b'{"choices": [')
        self.h.flush()
        response = self.successResultOf(pending)
        done = treq.collect(response, lambda data: None)
        upstream.request.loseConnection()
        self.h.flush()
        self.failureResultOf(done, ResponseFailed)
        self.assertEqual(self.h.supervisor.in_flight["llama"], 0)

    def test_client_hangs_up(self) -> None:
        """
        A client that goes away mid-stream stops the upstream transfer and frees the model.
        """
        upstream, response, reader = self.start_stream()
        self.assertEqual(self.h.supervisor.in_flight["llama"], 1)
        self.assertEqual(upstream.finished, [])
        reader.hang_up()
        self.h.flush()
        self.assertEqual(len(upstream.finished), 1)
        self.assertIsInstance(upstream.finished[0], Failure)
        self.assertEqual(self.h.supervisor.in_flight["llama"], 0)
        upstream.request.write(b'data: {"n": 1}\n\n')
        self.h.flush()
        self.assertEqual(reader.chunks, [b'data: {"n": 0}\n\n'])


class FlowControlTests(SynchronousTestCase):
    """
    The client's connection paces the upstream's, over swapproxy's real Site.
    """

    def setUp(self) -> None:
        self.h = Harness(self)
        self.h.server.respond = answer_event_stream
        self.paused: list[Any] = []
        self.resumed: list[Any] = []
        self.patch(iosim.FakeTransport, "pauseProducing", lambda transport: self.paused.append(transport))
        self.patch(iosim.FakeTransport, "resumeProducing", lambda transport: self.resumed.append(transport))
        self.client = self.h.connect()
        self.client.request(b"POST", b"/v1/chat/completions", CHAT, [b"Content-Type: application/json"])
        self.upstream = self.h.received[0]
        self.upstream.request.write(b'data: {"n": 0}\n\n')
        self.h.flush()
        self.assertEqual(self.client.status_line(), b"HTTP/1.1 200 OK")

    def upstream_connection(self, transports: list[Any]) -> list[Any]:
        """
        The transports in C{transports} that are swapproxy's connections to an upstream.
        """
        return [t for t in transports if not t.isServer]

    def test_slow_client_pauses_upstream(self) -> None:
        """
        When the client's socket buffer is full, swapproxy stops reading from the upstream;
        when it drains, reading resumes. Data already on its way is still delivered.
        """
        # twisted.web.client pauses and resumes the connection itself around deliverBody.
        del self.paused[:], self.resumed[:]
        self.client.transport.producer.pauseProducing()
        self.assertEqual(len(self.upstream_connection(self.paused)), 1)
        self.assertEqual(self.upstream_connection(self.resumed), [])

        self.upstream.request.write(b'data: {"n": 1}\n\n')
        self.h.flush()
        self.client.transport.producer.resumeProducing()
        self.assertEqual(self.upstream_connection(self.resumed), self.upstream_connection(self.paused))

        self.upstream.request.finish()
        self.h.flush()
        chunks, complete = dechunk(self.client.raw_body())
        self.assertEqual(chunks, [b'data: {"n": 0}\n\n', b'data: {"n": 1}\n\n'])
        self.assertTrue(complete)

    def test_client_disconnect_stops_upstream(self) -> None:
        """
        A dropped client connection closes the upstream request, and swapproxy writes nothing
        more to the dead connection.
        """
        self.client.hang_up()
        self.assertEqual(len(self.upstream.finished), 1)
        self.assertIsInstance(self.upstream.finished[0], Failure)
        self.assertEqual(self.h.supervisor.in_flight["llama"], 0)
        written = self.client.transport.value()
        self.upstream.request.write(b'data: {"n": 1}\n\n')
        self.h.flush()
        self.assertEqual(self.client.transport.value(), written)


HANG_CONFIG = """
    healthCheckTimeout: 15
    streamIdleTimeout: 60
    groups:
      all:
        swap: false
        members: [llama, qwen, loader]
    models:
      loader:
        cmd: llama-server --port ${PORT}
        sendLoadingState: true
      llama:
        cmd: llama-server --port ${PORT}
      qwen:
        cmd: llama-server --port ${PORT}
        timeouts:
          responseHeader: 5
"""


def error_events(chunks: list[bytes]) -> list[dict[str, Any]]:
    """
    The error objects of the ``data:`` events in a stream, which must end with ``[DONE]``.
    """
    events = b"".join(chunks).split(b"\n\n")
    assert events[-2:] == [b"data: [DONE]", b""], events[-3:]
    return [json.loads(e[len(b"data: "):])["error"] for e in events if b'"error"' in e]


class HungModelTests(ErrorAssertions, SynchronousTestCase):
    """
    A model that stops answering: its requests end properly, the model is marked unhealthy and
    restarted for the requests that wait for it, and other models carry on.
    """

    def setUp(self) -> None:
        self.h = Harness(self, HANG_CONFIG)
        self.h.server.respond = answer_event_stream

    def wait(self, seconds: float) -> None:
        """
        Let ``seconds`` pass on swapproxy's clock, a second at a time.
        """
        for _ in range(int(seconds)):
            self.h.clock.advance(1)
            self.h.flush()

    def stream(self, model: str = "llama") -> tuple[Received, BodyReader]:
        body = json.dumps({"model": model, "stream": True, "messages": []}).encode()
        pending = self.h.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
        upstream = self.h.received[-1]
        upstream.request.write(b'data: {"n": 0}\n\n')
        self.h.flush()
        reader = BodyReader()
        self.successResultOf(pending).deliverBody(reader)
        self.h.flush()
        return upstream, reader

    def test_stalled_stream_ends_with_an_error_event(self) -> None:
        """
        A stream whose model sends nothing for ``streamIdleTimeout`` gets an error event and
        ``[DONE]``, and ends cleanly; the model is marked unhealthy and stopped, and both show
        in ``/running``, ``/v1/models`` and ``/metrics``.
        """
        upstream, reader = self.stream()
        self.wait(59)
        self.assertIsNone(reader.reason)
        self.wait(16)
        self.assertTrue(reader.reason.check(ResponseDone), reader.reason)
        self.assertEqual(reader.chunks[0], b'data: {"n": 0}\n\n')
        [error] = error_events(reader.chunks[1:])
        self.assertEqual(error["code"], "gateway_timeout")
        self.assertIn("model 'llama' stopped responding: it sent nothing for 60s", error["message"])
        self.assertEqual(len(upstream.finished), 1)  # the model's connection was closed
        self.assertEqual(self.h.supervisor.in_flight["llama"], 0)
        llama = self.h.upstreams["llama"]
        self.assertEqual((llama.state, llama.stops), (State.UNHEALTHY, 1))

        running = json.loads(self.h.call("GET", "/running")[1])["running"]
        [entry] = [r for r in running if r["model"] == "llama"]
        self.assertEqual(entry["state"], "unhealthy")
        self.assertIn("sent nothing for 60s", entry["unhealthy"])
        models = json.loads(self.h.call("GET", "/v1/models")[1])["data"]
        self.assertEqual([m["state"] for m in models if m["id"] == "llama"], ["unhealthy"])
        metrics = self.h.call("GET", "/metrics")[1]
        self.assertEqual(sample(metrics, "swapproxy_upstream_timeouts_total", model="llama", kind="stream_idle"), 1)
        self.assertEqual(sample(metrics, "swapproxy_model_unhealthy_total", model="llama", cause="stream_idle"), 1)
        self.assertEqual(sample(metrics, "swapproxy_model_state", model="llama", state="unhealthy"), 1)

    def test_stream_that_never_gets_its_head(self) -> None:
        """
        A streaming request whose model never sends a response head gets a 504 JSON error.
        """
        self.h.server.respond = answer_later
        pending = self.h.request("POST", "/v1/completions", b'{"model": "llama", "stream": true}')
        self.wait(59)
        self.assertNoResult(pending)
        self.wait(16)
        response = self.successResultOf(pending)
        self.assertJSONError(response, self.h.read(response), 504, "'llama' stopped responding")
        self.assertEqual(self.h.upstreams["llama"].state, State.UNHEALTHY)

    def test_long_silence_while_the_process_works(self) -> None:
        """
        A model that sends nothing for many timeouts but burns CPU (a long prompt being
        processed) is not cut, and its answer arrives when it comes.
        """
        upstream, reader = self.stream()
        llama = self.h.upstreams["llama"]
        for _ in range(10):
            llama.cpu_seconds += 60
            self.wait(60)
        upstream.request.write(b'data: {"n": 1}\n\n')
        upstream.request.finish()
        self.h.flush()
        self.assertEqual(reader.chunks, [b'data: {"n": 0}\n\n', b'data: {"n": 1}\n\n'])
        self.assertTrue(reader.reason.check(ResponseDone), reader.reason)
        self.assertEqual(llama.state, State.READY)

    def test_non_streaming_answer_may_take_long(self) -> None:
        """
        A non-streaming request is not cut while its model thinks, however long (without
        ``timeouts.responseHeader``).
        """
        self.h.server.respond = answer_later
        pending = self.h.request("POST", "/v1/completions", b'{"model": "llama"}')
        self.wait(600)
        self.assertNoResult(pending)
        upstream = self.h.received[0]
        upstream.request.write(b'{"done": true}')
        upstream.request.finish()
        self.h.flush()
        response = self.successResultOf(pending)
        self.assertEqual((response.code, self.h.read(response)), (200, b'{"done": true}'))

    def test_response_header_timeout(self) -> None:
        """
        ``timeouts.responseHeader``: no head in time is a 504 for that request, counted; the
        model stays ready.
        """
        self.h.server.respond = answer_later
        pending = self.h.request("POST", "/v1/completions", b'{"model": "qwen"}')
        self.wait(4)
        self.assertNoResult(pending)
        self.wait(1)
        response = self.successResultOf(pending)
        self.assertJSONError(response, self.h.read(response), 504, "'qwen' sent no response head within 5s")
        self.assertEqual(self.h.upstreams["qwen"].state, State.READY)
        metrics = self.h.call("GET", "/metrics")[1]
        self.assertEqual(sample(metrics, "swapproxy_upstream_timeouts_total", model="qwen", kind="response_header"), 1)

    def test_other_models_keep_streaming(self) -> None:
        """
        While one model hangs and is failed, another model's stream flows on undisturbed.
        """
        _, hung = self.stream("llama")
        qwen, flowing = self.stream("qwen")
        for n in range(1, 81):
            qwen.request.write(b'data: {"n": %d}\n\n' % n)
            self.wait(1)
        self.assertIsNotNone(hung.reason)
        self.assertEqual(self.h.upstreams["llama"].state, State.UNHEALTHY)
        self.assertEqual(self.h.upstreams["qwen"].state, State.READY)
        qwen.request.finish()
        self.h.flush()
        self.assertEqual(flowing.chunks, [b'data: {"n": %d}\n\n' % n for n in range(81)])
        self.assertTrue(flowing.reason.check(ResponseDone), flowing.reason)

    def test_requests_that_wait_start_it_again(self) -> None:
        """
        A request that arrives while the hung model is being stopped waits, and is served by
        the model started anew once the old process has gone.
        """
        self.stream()
        self.wait(75)
        llama = self.h.upstreams["llama"]
        self.assertEqual(llama.state, State.UNHEALTHY)
        self.h.server.respond = answer_json
        pending = self.h.request("POST", "/v1/completions", b'{"model": "llama"}')
        self.assertNoResult(pending)
        llama.exited()
        self.h.flush()
        response = self.successResultOf(pending)
        self.assertEqual(response.code, 200)
        self.assertEqual((llama.starts, llama.state), (2, State.READY))

    def test_health_check_fails_every_request_in_flight(self) -> None:
        """
        A model found unhealthy by its health check fails its requests in flight as a stall
        does: a 504 for one still waiting for its head, an error event for a stream.
        """
        _, reader = self.stream()
        self.h.server.respond = answer_later
        pending = self.h.request("POST", "/v1/completions", b'{"model": "llama"}')
        self.h.upstreams["llama"].mark_unhealthy("its health check (/health) failed 3 times in a row", "health_check")
        self.h.flush()
        response = self.successResultOf(pending)
        self.assertJSONError(response, self.h.read(response), 504, "its health check (/health) failed")
        [error] = error_events(reader.chunks[1:])
        self.assertIn("its health check (/health) failed", error["message"])
        self.assertEqual(self.h.supervisor.in_flight["llama"], 0)

    def test_stall_after_the_loading_stream(self) -> None:
        """
        After a loading stream, a model that never answers ends the stream with an error event
        of the route's dialect, not a JSON error.
        """
        self.h.server.respond = answer_later
        loader = self.h.upstreams["loader"]
        loader.auto_ready = False
        body = b'{"model": "loader", "stream": true, "messages": []}'
        pending = self.h.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
        self.wait(1)
        response = self.successResultOf(pending)
        reader = BodyReader()
        response.deliverBody(reader)
        loader.become_ready()
        self.wait(80)
        self.assertEqual(response.code, 200)
        self.assertIn(b"reasoning_content", reader.chunks[0])
        [error] = error_events(reader.chunks)
        self.assertIn("'loader' stopped responding", error["message"])
        self.assertTrue(reader.reason.check(ResponseDone), reader.reason)

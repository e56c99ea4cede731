"""
Tests for L{swapproxy.relayclient}: the bytes a model receives, and what the relay is handed of
its answer, over in-memory connections the test plays the model's side of.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.error import ConnectionDone, ConnectionLost, ConnectionRefusedError
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import ResponseDone, ResponseFailed, ResponseNeverReceived
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH

from swapproxy.relayclient import RelayPool

URL = b"http://127.0.0.1:5800/v1/chat/completions"


class Endpoint:
    """
    Connects at once over a `StringTransport`, or refuses; remembers each connection.
    """

    def __init__(self) -> None:
        self.connections: list[tuple[Any, StringTransport]] = []
        self.refuse = False

    def connect(self, factory: Any) -> Deferred[Any]:
        if self.refuse:
            failed: Deferred[Any] = Deferred()
            failed.errback(ConnectionRefusedError("127.0.0.1:5800"))
            return failed
        protocol = factory.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        self.connections.append((protocol, transport))
        return succeed(protocol)


class Body(Protocol):
    """
    Records what a response body brings, piece by piece, and how it ends.
    """

    def __init__(self) -> None:
        self.pieces: list[bytes] = []
        self.reason: Failure | None = None

    def dataReceived(self, data: bytes) -> None:
        self.pieces.append(data)

    def connectionLost(self, reason: Failure) -> None:
        self.reason = reason


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data)


STREAM_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"


class RelayPoolTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.endpoint = Endpoint()
        self.pool = RelayPool(Clock(), max_idle=2, endpoint=lambda address: self.endpoint)  # type: ignore[arg-type]

    def send(self, body: bytes | None = b'{"model": "m"}', method: bytes = b"POST") -> Deferred[Any]:
        headers = Headers({b"content-type": [b"application/json"], b"x-request-id": [b"7"]})
        return self.pool.relay(method, URL, headers, body)

    def model(self, index: int = -1) -> tuple[Any, StringTransport]:
        return self.endpoint.connections[index]

    def answer(self, data: bytes, index: int = -1) -> None:
        self.model(index)[0].dataReceived(data)

    def streamed(self) -> tuple[Any, Body]:
        """
        A streaming request whose head has arrived; returns the response and its body's record.
        """
        pending = self.send()
        self.answer(STREAM_HEAD)
        response = self.successResultOf(pending)
        body = Body()
        response.deliverBody(body)
        return response, body

    def test_request_bytes(self) -> None:
        """
        One request: its line, Host, the headers as given, Content-Length and the body.
        """
        self.send()
        _, transport = self.model()
        head, _, body = transport.value().partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        self.assertEqual(lines[0], b"POST /v1/chat/completions HTTP/1.1")
        self.assertEqual(sorted(line.lower() for line in lines[1:]),
                         sorted([b"host: 127.0.0.1:5800", b"content-type: application/json", b"x-request-id: 7",
                                 b"content-length: 14"]))
        self.assertEqual(body, b'{"model": "m"}')

    def test_request_without_body_has_no_length(self) -> None:
        self.send(None, b"GET")
        _, transport = self.model()
        self.assertTrue(transport.value().startswith(b"GET /v1/chat/completions HTTP/1.1\r\n"))
        self.assertNotIn(b"content-length", transport.value().lower())
        self.assertTrue(transport.value().endswith(b"\r\n\r\n"))

    def test_response_head(self) -> None:
        """
        Status, reason and end-to-end headers; the connection's own headers are not among them,
        and Content-Length is the length.
        """
        pending = self.send()
        self.answer(b"HTTP/1.1 201 Made It\r\nContent-Type: application/json\r\nContent-Length: 2\r\n"
                    b"Keep-Alive: timeout=5\r\nConnection: keep-alive\r\nSet-Cookie: a=1\r\nSet-Cookie: b=2\r\n\r\n")
        response = self.successResultOf(pending)
        self.assertEqual((response.code, response.phrase, response.length), (201, b"Made It", 2))
        self.assertEqual(sorted(name for name, _ in response.headers.getAllRawHeaders()),
                         [b"Content-Type", b"Set-Cookie"])
        self.assertEqual(response.headers.getRawHeaders(b"set-cookie"), [b"a=1", b"b=2"])

    def test_headers_named_in_connection_are_hop_by_hop(self) -> None:
        """
        A header the model's Connection header names describes that connection only: it is not
        among the end-to-end headers (RFC 9110 section 7.6.1), and the connection stays reusable.
        """
        pending = self.send()
        self.answer(b"HTTP/1.1 200 OK\r\nConnection: X-Upstream-Hop, keep-alive\r\nX-Upstream-Hop: 1\r\n"
                    b"X-End-To-End: yes\r\nContent-Length: 2\r\n\r\n{}")
        response = self.successResultOf(pending)
        self.assertEqual(response.headers.getRawHeaders(b"x-end-to-end"), [b"yes"])
        self.assertIsNone(response.headers.getRawHeaders(b"x-upstream-hop"))
        response.deliverBody(Body())
        self.send()
        self.assertEqual(len(self.endpoint.connections), 1)

    def test_what_one_read_brings_arrives_in_one_piece(self) -> None:
        """
        Chunks that arrived together are handed on together, without their framing; a chunk
        that arrives alone is handed on at once.
        """
        _, body = self.streamed()
        events = [b'data: {"n": %d}\n\n' % n for n in range(4)]
        self.answer(chunk(events[0]) + chunk(events[1]) + chunk(events[2]))
        self.assertEqual(body.pieces, [events[0] + events[1] + events[2]])
        self.answer(chunk(events[3]))
        self.assertEqual(body.pieces[-1], events[3])
        self.assertIsNone(body.reason)
        self.answer(b"0\r\n\r\n")
        self.assertTrue(body.reason.check(ResponseDone))

    def test_chunks_split_anywhere(self) -> None:
        """
        Size lines, payloads and their CRLFs cut across reads at every position decode to the
        same bytes.
        """
        payload = [b"data: one\n\n", b"data: two two\n\n", b"x" * 300]
        wire = b"".join(chunk(p) for p in payload) + b"0\r\nX-Trailer: 1\r\n\r\n"
        for cut in range(1, len(wire)):
            _, body = self.streamed()
            self.answer(wire[:cut])
            self.answer(wire[cut:])
            self.assertEqual(b"".join(body.pieces), b"".join(payload), cut)
            self.assertTrue(body.reason is not None and body.reason.check(ResponseDone), cut)
        self.assertEqual(len(self.endpoint.connections), 1)

    def test_keep_alive_reuses_the_connection(self) -> None:
        for _ in range(3):
            pending = self.send()
            self.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
            body = Body()
            self.successResultOf(pending).deliverBody(body)
            self.assertEqual((body.pieces, body.reason.check(ResponseDone)), ([b"{}"], ResponseDone))
        self.assertEqual(len(self.endpoint.connections), 1)
        self.assertEqual(self.model()[1].value().count(b"POST "), 3)

    def test_connection_close_is_not_reused(self) -> None:
        pending = self.send()
        self.answer(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\n{}")
        self.successResultOf(pending).deliverBody(Body())
        self.assertTrue(self.model()[1].disconnecting)
        self.send()
        self.assertEqual(len(self.endpoint.connections), 2)

    def test_idle_connection_closed_by_the_model_is_replaced(self) -> None:
        """
        The model closed an idle keep-alive connection just as a request went out on it: the
        request goes again on a new connection, and its answer is the new one's.
        """
        pending = self.send()
        self.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
        self.successResultOf(pending).deliverBody(Body())
        pending = self.send()
        old, _ = self.model()
        old.connectionLost(Failure(ConnectionDone("idle timeout")))
        self.assertEqual(len(self.endpoint.connections), 2)
        self.assertIn(b'{"model": "m"}', self.model()[1].value())
        self.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
        self.assertEqual(self.successResultOf(pending).code, 200)

    def test_new_connection_lost_before_the_answer(self) -> None:
        pending = self.send()
        self.model()[0].connectionLost(Failure(ConnectionLost("crashed")))
        failure = self.failureResultOf(pending, ResponseNeverReceived)
        self.assertEqual(len(self.endpoint.connections), 1)
        self.assertIn("crashed", failure.value.reasons[0].getErrorMessage())

    def test_refused(self) -> None:
        self.endpoint.refuse = True
        self.failureResultOf(self.send(), ConnectionRefusedError)

    def test_cut_mid_body(self) -> None:
        _, body = self.streamed()
        self.answer(chunk(b"data: 1\n\n"))
        self.model()[0].connectionLost(Failure(ConnectionLost("crashed")))
        self.assertTrue(body.reason.check(ResponseFailed))
        self.send()
        self.assertEqual(len(self.endpoint.connections), 2)

    def test_body_delimited_by_close(self) -> None:
        pending = self.send()
        self.answer(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nall of")
        response = self.successResultOf(pending)
        self.assertIs(response.length, UNKNOWN_LENGTH)
        body = Body()
        response.deliverBody(body)
        self.answer(b" it")
        self.model()[0].connectionLost(Failure(ConnectionDone()))
        self.assertEqual((b"".join(body.pieces), body.reason.check(ResponseDone)), (b"all of it", ResponseDone))

    def test_no_body_for_head_and_204(self) -> None:
        for method, status in [(b"HEAD", b"200 OK\r\nContent-Length: 99"), (b"POST", b"204 No Content")]:
            pending = self.send(None, method)
            self.answer(b"HTTP/1.1 " + status + b"\r\n\r\n")
            body = Body()
            self.successResultOf(pending).deliverBody(body)
            self.assertEqual((body.pieces, body.reason.check(ResponseDone)), ([], ResponseDone))
        self.assertEqual(len(self.endpoint.connections), 1)

    def test_informational_answer_skipped(self) -> None:
        pending = self.send()
        self.answer(b"HTTP/1.1 100 Continue\r\n\r\n")
        self.assertNoResult(pending)
        self.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        self.assertEqual(self.successResultOf(pending).code, 200)

    def test_garbage_answer(self) -> None:
        pending = self.send()
        self.answer(b"SSH-2.0-OpenSSH\r\n\r\n")
        self.failureResultOf(pending, ResponseNeverReceived)
        self.assertTrue(self.model()[1].disconnecting)

    def test_flow_control(self) -> None:
        """
        The body's transport pauses and resumes reading from the model; stopping it closes the
        connection, which is not reused.
        """
        _, body = self.streamed()
        transport = body.transport
        _, model = self.model()
        transport.pauseProducing()
        self.assertEqual(model.producerState, "paused")
        transport.resumeProducing()
        self.assertEqual(model.producerState, "producing")
        transport.stopProducing()
        self.assertTrue(model.disconnecting)

    def test_paused_connection_resumes_when_reused(self) -> None:
        _, body = self.streamed()
        body.transport.pauseProducing()
        self.answer(b"0\r\n\r\n")
        self.assertEqual(self.model()[1].producerState, "producing")
        self.send()
        self.assertEqual(len(self.endpoint.connections), 1)

    def test_cancel_before_the_answer_closes_the_connection(self) -> None:
        pending = self.send()
        pending.cancel()
        self.failureResultOf(pending, CancelledError)
        self.assertTrue(self.model()[1].disconnecting)
        self.model()[0].connectionLost(Failure(ConnectionDone()))
        self.send()
        self.assertEqual(len(self.endpoint.connections), 2)

    def test_closed_pool_keeps_nothing(self) -> None:
        pending = self.send()
        self.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        self.successResultOf(pending).deliverBody(Body())
        self.pool.closeCachedConnections()
        self.assertTrue(self.model()[1].disconnecting)
        self.failureResultOf(self.send(), ResponseNeverReceived)

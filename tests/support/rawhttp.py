"""
Raw HTTP/1.1 over an in-memory transport: one client connection to swapproxy's real Site
(`RawConnection`), for the tests that read the bytes on the client's connection (framing,
hop-by-hop headers, answers that never end, flow control, hanging up) or send bytes no
well-behaved client would; and parsers for what comes back: whole responses, chunks, SSE events.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import attrs
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import Site


@attrs.frozen
class RawResponse:
    """
    One response as it came over the wire.
    """

    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes

    def header(self, name: bytes) -> list[bytes]:
        return [value for key, value in self.headers if key.lower() == name.lower()]

    def json(self) -> Any:
        return json.loads(self.body)


class Incomplete(Exception):
    """
    The bytes end in the middle of a response.
    """


def read_chunks(data: bytes) -> tuple[list[bytes], bool, bytes]:
    """
    The complete chunks at the start of the chunked body ``data``, whether its last chunk
    (``0``, no trailers: twisted.web sends none) came, and the bytes after the body.
    """
    chunks = []
    while True:
        size_line, separator, rest = data.partition(b"\r\n")
        if not separator:
            return chunks, False, data
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            if not rest.startswith(b"\r\n"):
                return chunks, False, data
            return chunks, True, rest[2:]
        if len(rest) < size + 2:
            return chunks, False, data
        chunks.append(rest[:size])
        data = rest[size + 2:]


def dechunk(body: bytes) -> tuple[list[bytes], bool]:
    """
    The chunks of a chunked body, and whether it ended with its last chunk and nothing after.
    """
    chunks, ended, rest = read_chunks(body)
    return chunks, ended and not rest


def parse_responses(data: bytes, methods: list[bytes], closed: bool = False) -> tuple[list[RawResponse], bytes]:
    """
    The complete responses at the start of ``data``, and the bytes after them.

    :param methods: the method of each request, in order (a HEAD answer has no body).
    :param closed: whether the connection has ended, which ends a body without a length.
    """
    responses: list[RawResponse] = []
    methods = list(methods)
    while data:
        head, sep, rest = data.partition(b"\r\n\r\n")
        if not sep:
            break
        status_line, *lines = head.split(b"\r\n")
        version, status_text, _ = (status_line + b" ").split(b" ", 2)
        assert version in (b"HTTP/1.1", b"HTTP/1.0"), status_line
        status = int(status_text)
        headers = [tuple(v.strip() for v in line.split(b":", 1)) for line in lines]
        response = RawResponse(status, headers, b"")  # type: ignore[arg-type]
        if 100 <= status < 200:
            data = rest
            continue
        method = methods.pop(0) if methods else b"GET"
        lengths = response.header(b"content-length")
        try:
            if method == b"HEAD" or status in (204, 304):
                body = b""
            elif b"chunked" in b"".join(response.header(b"transfer-encoding")).lower():
                chunks, ended, rest = read_chunks(rest)
                if not ended:
                    raise Incomplete()
                body = b"".join(chunks)
            elif lengths:
                length = int(lengths[0])
                if len(rest) < length:
                    raise Incomplete()
                body, rest = rest[:length], rest[length:]
            elif closed:
                body, rest = rest, b""
            else:
                raise Incomplete()
        except Incomplete:
            break
        responses.append(attrs.evolve(response, body=body))
        data = rest
    return responses, data


@attrs.frozen
class Event:
    """
    One SSE event block: its ``event:`` name, its ``data:`` text, its comment lines.
    """

    name: str | None
    data: str | None
    comments: tuple[str, ...]

    def json(self) -> Any:
        assert self.data is not None, self
        return json.loads(self.data)


def parse_events(body: bytes) -> list[Event]:
    """
    The complete SSE event blocks of ``body``; each must be a valid SSE block.
    """
    events = []
    text = body.decode("utf-8")
    *blocks, _rest = text.split("\n\n")
    for block in blocks:
        name = None
        data: list[str] = []
        comments = []
        for line in block.split("\n"):
            if line.startswith(":"):
                comments.append(line[1:].strip())
            elif line.startswith("event: "):
                name = line[len("event: "):]
            elif line.startswith("data: "):
                data.append(line[len("data: "):])
            else:
                raise AssertionError(f"not an SSE line: {line!r} in {body!r}")
        events.append(Event(name, "\n".join(data) if data else None, tuple(comments)))
    return events


class ClientTransport(StringTransport):
    """
    A C{StringTransport} that, like TCP, can half-close (C{loseWriteConnection}).
    """

    write_closed = False
    aborted = False

    def loseWriteConnection(self) -> None:
        self.write_closed = True

    def abortConnection(self) -> None:
        self.aborted = True
        super().abortConnection()

    @property
    def closing(self) -> bool:
        """
        Whether swapproxy has begun to close this connection, in any way.
        """
        return self.write_closed or self.disconnecting or self.aborted


class RawConnection:
    """
    One client connection to ``site``; the test writes bytes and reads what comes back.

    :param flush: called after each thing the client does, to let what it leads to happen (the
        in-memory harness's ``flush``).
    :param client: the client's address and port.
    """

    def __init__(
        self, site: Any, flush: Callable[[], None] = lambda: None, client: tuple[str, int] = ("127.0.0.1", 40000)
    ) -> None:
        self.site = site
        self._flush = flush
        address = IPv4Address("TCP", *client)
        self.transport = ClientTransport(peerAddress=address, hostAddress=IPv4Address("TCP", "127.0.0.1", 8080))
        self.protocol = site.buildProtocol(address)
        self.protocol.makeConnection(self.transport)
        self.methods: list[bytes] = []
        self.lost = False

    # -- what the client sends -----------------------------------------------------------------

    def send(self, data: bytes) -> None:
        """
        The client sends ``data``; swapproxy (and the fake upstreams) do what it leads to.

        A HEAD request sent this way must be noted in `methods` by the caller.
        """
        self.protocol.dataReceived(data)
        self._flush()

    def request(
        self, method: bytes, path: bytes, body: bytes | None = b"", headers: list[bytes] | tuple[bytes, ...] = ()
    ) -> None:
        """
        Send one well-formed request, with a Content-Length unless ``body`` is ``None``.
        """
        lines = [method + b" " + path + b" HTTP/1.1", b"Host: swapproxy.test", *headers]
        if body is not None:
            lines.append(b"Content-Length: %d" % len(body))
        self.methods.append(method)
        self.send(b"\r\n".join(lines) + b"\r\n\r\n" + (body or b""))

    # -- what the client reads -----------------------------------------------------------------

    def value(self) -> bytes:
        """
        Every byte the client has received.
        """
        return self.transport.value()

    def status_line(self) -> bytes:
        return self.value().partition(b"\r\n")[0]

    def head(self) -> tuple[int, Headers]:
        """
        The status and headers of the (first) response; fails when they have not been sent.
        """
        head, separator, _ = self.value().partition(b"\r\n\r\n")
        assert separator, f"no response head yet: {self.value()!r}"
        status_line, *header_lines = head.split(b"\r\n")
        headers = Headers()
        for line in header_lines:
            name, _, value = line.partition(b":")
            headers.addRawHeader(name.strip(), value.strip())
        return int(status_line.split(b" ")[1]), headers

    def header(self, name: bytes) -> list[bytes]:
        """
        The values of header ``name`` of the response (none when it has none).
        """
        return self.head()[1].getRawHeaders(name, [])

    def raw_body(self) -> bytes:
        """
        The bytes after the response head, as they came (chunked framing and all).
        """
        return self.value().partition(b"\r\n\r\n")[2]

    def _body(self) -> tuple[bytes, bool]:
        _, separator, rest = self.value().partition(b"\r\n\r\n")
        if not separator:
            return b"", False
        _, headers = self.head()
        if headers.getRawHeaders(b"transfer-encoding") != [b"chunked"]:
            length = int(headers.getRawHeaders(b"content-length", [b"-1"])[0])
            return rest, len(rest) == length
        chunks, ended, _ = read_chunks(rest)
        return b"".join(chunks), ended

    def body(self) -> bytes:
        """
        The response body so far, chunked encoding removed.
        """
        return self._body()[0]

    @property
    def finished(self) -> bool:
        """
        Whether the whole response body has come.
        """
        return self._body()[1]

    def events(self) -> list[Event]:
        """
        The SSE events of the body so far.
        """
        return parse_events(self.body())

    def responses(self) -> list[RawResponse]:
        """
        Every complete response received so far.
        """
        return parse_responses(self.value(), self.methods, closed=self.transport.closing)[0]

    # -- the connection ------------------------------------------------------------------------

    def pause(self) -> None:
        """
        What the reactor does when the client's socket buffer is full.
        """
        self.transport.producer.pauseProducing()

    def resume(self) -> None:
        self.transport.producer.resumeProducing()

    def close(self) -> None:
        """
        The connection ends (the client closed it, or swapproxy's close went through).
        """
        if not self.lost:
            self.lost = True
            self.protocol.connectionLost(Failure(ConnectionDone("the client hung up")))
            self._flush()

    def hang_up(self) -> None:
        """
        The client's TCP connection drops, as a real transport reports it.
        """
        self.transport.producer.stopProducing()
        self.lost = True
        self.protocol.connectionLost(Failure(ConnectionLost("client went away")))
        self._flush()


def follow(root: Resource, path: str) -> RawConnection:
    """
    ``GET path`` from ``root`` on a connection of its own, for the answers that never end.
    """
    connection = RawConnection(Site(root))
    connection.request(b"GET", path.encode("ascii"), None)
    return connection

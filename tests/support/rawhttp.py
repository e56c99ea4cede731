"""
Raw HTTP/1.1 for the tests that send bytes no well-behaved client would: one client connection to
swapproxy's real Site over an in-memory transport, and a parser for what comes back.
"""

from __future__ import annotations

import json
from typing import Any

import attrs
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from tests.support.harness import Harness


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


def _dechunk(data: bytes) -> tuple[bytes, bytes]:
    body = b""
    while True:
        size_line, sep, rest = data.partition(b"\r\n")
        if not sep:
            raise Incomplete()
        size = int(size_line.split(b";")[0], 16)
        if len(rest) < size + 2:
            raise Incomplete()
        if size == 0:
            # No trailers from twisted.web: the last chunk is "0\r\n\r\n".
            if not rest.startswith(b"\r\n"):
                raise Incomplete()
            return body, rest[2:]
        body += rest[:size]
        data = rest[size + 2:]


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
                body, rest = _dechunk(rest)
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
    One client connection to ``site``; the test writes bytes and reads the responses.
    """

    def __init__(self, site: Any, harness: Harness, port: int = 40000) -> None:
        self.harness = harness
        address = IPv4Address("TCP", "192.0.2.9", port)
        self.transport = ClientTransport(peerAddress=address, hostAddress=IPv4Address("TCP", "127.0.0.1", 8080))
        self.protocol = site.buildProtocol(address)
        self.protocol.makeConnection(self.transport)
        self.methods: list[bytes] = []
        self.lost = False

    def send(self, data: bytes) -> None:
        """
        The client sends ``data``; swapproxy and the fake upstreams do what it leads to.

        A HEAD request sent this way must be noted in `methods` by the caller.
        """
        self.protocol.dataReceived(data)
        self.harness.flush()

    def request(self, method: bytes, path: bytes, body: bytes = b"", headers: list[bytes] | None = None) -> None:
        """
        Send one well-formed request with a Content-Length.
        """
        lines = [method + b" " + path + b" HTTP/1.1", b"Host: swapproxy.test", *(headers or [])]
        lines.append(b"Content-Length: %d" % len(body))
        self.methods.append(method)
        self.protocol.dataReceived(b"\r\n".join(lines) + b"\r\n\r\n" + body)
        self.harness.flush()

    def responses(self) -> list[RawResponse]:
        """
        Every complete response received so far.
        """
        return parse_responses(self.transport.value(), self.methods, closed=self.transport.closing)[0]

    def close(self) -> None:
        """
        The connection ends (the client closed it, or swapproxy's close went through).
        """
        if not self.lost:
            self.lost = True
            self.protocol.connectionLost(Failure(ConnectionDone()))
            self.harness.flush()

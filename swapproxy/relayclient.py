# -*- test-case-name: tests.test_relayclient -*-
"""
The HTTP/1.1 client that carries relayed requests to a model: lean, keep-alive, flow-controlled.

twisted.web's `Agent` spent about half of swapproxy's CPU time per proxied request (request and
response objects, header encoding, a Deferred chain per state, a parser per response) and, for a
chunked answer, called the relay once per chunk: for a stream of one chunk per token, once per
token. `RelayPool` does only what a relay needs:

* the request goes out in one write, its headers as given (the pipeline has already removed the
  hop-by-hop ones), with ``Host`` and ``Content-Length`` set here;
* the response head is parsed once into a `RelayResponse`, which behaves like the `IResponse`
  `Agent` returns (``code``, ``phrase``, ``headers`` without the connection headers, ``length``,
  ``deliverBody``);
* a chunked body is de-chunked per read, not per chunk: what one read brought is handed to the
  body's protocol in one piece, so a relay writes it to its client in one piece, and never waits
  for more to do so;
* the body's protocol gets the connection as its transport, a push producer: a slow client pauses
  the upstream socket, and a client that hangs up closes it;
* a connection whose response ended cleanly goes back to the pool; a reused connection that the
  model closed before any byte of the answer (an idle keep-alive timeout) is replaced and the
  request sent once more.

The same errors as `Agent`'s: `ResponseNeverReceived` before the head, `ResponseFailed` in the
body, `ResponseDone` at its end.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.interfaces import IPushProducer, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from twisted.web.client import HTTPConnectionPool, ResponseDone, ResponseFailed, ResponseNeverReceived
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH
from zope.interface import implementer

from swapproxy.reactors import IClientReactor, IStreamConnection

#: Response headers that describe the connection: kept out of `RelayResponse.headers`, as `Agent`
#: keeps them out of its responses' headers (``Content-Length`` becomes ``length``), and so are
#: the headers a ``Connection`` header names.
CONNECTION_HEADERS = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"trailers", b"transfer-encoding",
     b"upgrade", b"content-length"}
)

#: The most a response head may hold.
MAX_HEAD = 65536

_HEAD, _LENGTH, _CHUNKED, _UNTIL_CLOSE, _DONE = range(5)


class BadResponse(Exception):
    """
    The model's answer is not HTTP/1.1 that swapproxy can read.
    """


class RelayResponse:
    """
    A model's answer: its head, and its body for whoever calls `deliverBody`.

    :ivar code: the status code.
    :ivar phrase: the reason phrase.
    :ivar headers: the end-to-end headers.
    :ivar length: the body's length from ``Content-Length``, or ``UNKNOWN_LENGTH``.
    """

    def __init__(self, connection: RelayConnection, code: int, phrase: bytes, headers: Headers, length: Any) -> None:
        self._connection = connection
        self.code = code
        self.phrase = phrase
        self.headers = headers
        self.length = length

    def deliverBody(self, protocol: Protocol) -> None:
        """
        Give the body to ``protocol`` as it arrives; its transport is the connection (a push
        producer), and its ``connectionLost`` says how the body ended.
        """
        self._connection.deliver(protocol)


@implementer(IPushProducer)
class _BodyTransport:
    """
    What a body's protocol sees as its transport: the connection's reading, to pause and resume,
    and ``stopProducing`` to give up the body (which closes the connection).
    """

    def __init__(self, connection: RelayConnection) -> None:
        self._connection = connection

    @property
    def paused(self) -> bool:
        """
        Whether the body's reading is paused (the client is slower than the model).
        """
        return self._connection._paused

    def pauseProducing(self) -> None:
        self._connection.pause()

    def resumeProducing(self) -> None:
        self._connection.resume()

    def stopProducing(self) -> None:
        self._connection.abandon()


class RelayConnection(Protocol):
    """
    One connection to a model, carrying one request at a time.
    """

    transport: IStreamConnection

    def __init__(self, pool: RelayPool, address: tuple[str, int]) -> None:
        self._pool = pool
        self.address = address
        #: The request in flight, until the first byte of its answer: sent again on a new
        #: connection if this one turns out to have been closed by the model while idle.
        self.unanswered: tuple[bytes, bool] | None = None
        self._state = _DONE
        self._buffer = b""
        self._answer: Deferred[RelayResponse] | None = None
        self._body: Protocol | None = None
        self._pending: list[bytes] = []
        self._remaining = 0
        self._keep_alive = True
        self._paused = False
        self._head_request = False
        self._received = False
        self.reused = False
        self.lost = False

    # -- the pool's side ----------------------------------------------------------------------

    def connectionMade(self) -> None:
        set_no_delay = getattr(self.transport, "setTcpNoDelay", None)
        if set_no_delay is not None:
            set_no_delay(True)

    def send(self, data: bytes, head_request: bool) -> Deferred[RelayResponse]:
        """
        Write one request (all of it, in ``data``); the Deferred fires with the answer's head.
        """
        self._state = _HEAD
        self._buffer = b""
        self._body = None
        self._pending = []
        self._keep_alive = True
        self._head_request = head_request
        self._received = False
        self.unanswered = (data, head_request)
        self._answer = Deferred(self._cancel)
        answer = self._answer
        self.transport.write(data)
        return answer

    def _cancel(self, answer: Deferred[RelayResponse]) -> None:
        self._answer = None
        self._keep_alive = False
        self.transport.abortConnection()

    # -- the body's side ----------------------------------------------------------------------

    def deliver(self, protocol: Protocol) -> None:
        self._body = protocol
        protocol.makeConnection(_BodyTransport(self))
        pending, self._pending = self._pending, []
        for data in pending:
            if self._body is protocol:
                protocol.dataReceived(data)
        if self._state == _DONE and self._body is protocol:
            self._end_body(None)

    def pause(self) -> None:
        if not self._paused and not self.lost:
            self._paused = True
            self.transport.pauseProducing()

    def resume(self) -> None:
        if self._paused and not self.lost:
            self._paused = False
            self.transport.resumeProducing()

    def abandon(self) -> None:
        """
        The body is not wanted any more: close the connection (its protocol hears of it, as
        of any other cut).
        """
        self._keep_alive = False
        if not self.lost:
            self.transport.abortConnection()

    # -- reading ------------------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if not self._received:
            self._received = True
            self.unanswered = None
        state = self._state
        if state == _LENGTH:
            self._length_data(data)
        elif state == _CHUNKED:
            self._chunked_data(data)
        elif state == _UNTIL_CLOSE:
            self._body_data(data)
        elif state == _HEAD:
            self._buffer += data
            self._head_data()
        elif data.strip():
            # Bytes nobody asked for: the connection cannot be trusted with another request.
            self._keep_alive = False
            self.transport.loseConnection()

    def _head_data(self) -> None:
        while True:
            end = self._buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(self._buffer) > MAX_HEAD:
                    self._fail_head(BadResponse(f"response head longer than {MAX_HEAD} bytes"))
                return
            head, self._buffer = self._buffer[:end], self._buffer[end + 4 :]
            try:
                parsed = self._parse_head(head)
            except (ValueError, IndexError, BadResponse) as e:
                self._fail_head(e if isinstance(e, BadResponse) else BadResponse(f"malformed response head: {e}"))
                return
            if parsed is not None:
                break  # else an informational 1xx answer: the real one follows
        response = parsed
        rest, self._buffer = self._buffer, b""
        answer, self._answer = self._answer, None
        if self._state == _DONE:
            self._finish_clean()
        elif rest:
            self.dataReceived(rest)
        if answer is not None:
            answer.callback(response)

    def _parse_head(self, head: bytes) -> RelayResponse | None:
        lines = head.split(b"\r\n")
        version, _, status = lines[0].partition(b" ")
        code_text, _, phrase = status.partition(b" ")
        code = int(code_text)
        if not version.startswith(b"HTTP/1.") or not 100 <= code <= 999:
            raise BadResponse(f"not an HTTP/1.x status line: {lines[0][:100]!r}")
        if 100 <= code < 200 and code != 101:
            return None
        raw: dict[bytes, list[bytes]] = {}
        length: int | None = None
        chunked = False
        named: list[bytes] = []
        for line in lines[1:]:
            name, colon, value = line.partition(b":")
            if not colon:
                raise BadResponse(f"not a header line: {line[:100]!r}")
            key = name.strip().lower()
            value = value.strip()
            if key in CONNECTION_HEADERS:
                if key == b"content-length":
                    length = int(value)
                    if length < 0:
                        raise BadResponse("negative Content-Length")
                elif key == b"transfer-encoding":
                    chunked = value.lower() == b"chunked"
                elif key == b"connection":
                    tokens = [token.strip() for token in value.lower().split(b",")]
                    if b"close" in tokens:
                        self._keep_alive = False
                    named += tokens
                continue
            raw.setdefault(key, []).append(value)
        for key in named:
            # A header the Connection header names is hop-by-hop too (RFC 9110 section 7.6.1).
            raw.pop(key, None)
        if version == b"HTTP/1.0":
            self._keep_alive = False
        headers = Headers(raw)
        if self._head_request or code in (204, 304) or code == 101:
            self._state = _DONE
            return RelayResponse(self, code, phrase, headers, 0 if length is None else length)
        if chunked:
            self._state = _CHUNKED
            self._remaining = -1
            return RelayResponse(self, code, phrase, headers, UNKNOWN_LENGTH)
        if length is not None:
            self._remaining = length
            self._state = _LENGTH if length else _DONE
            return RelayResponse(self, code, phrase, headers, length)
        self._keep_alive = False
        self._state = _UNTIL_CLOSE
        return RelayResponse(self, code, phrase, headers, UNKNOWN_LENGTH)

    def _fail_head(self, error: Exception) -> None:
        self._keep_alive = False
        self._state = _DONE
        answer, self._answer = self._answer, None
        self.transport.abortConnection()
        if answer is not None:
            answer.errback(ResponseNeverReceived([Failure(error)]))

    def _body_data(self, data: bytes) -> None:
        if self._body is not None:
            self._body.dataReceived(data)
        else:
            self._pending.append(data)

    def _length_data(self, data: bytes) -> None:
        remaining = self._remaining
        if len(data) >= remaining:
            extra = data[remaining:]
            data = data[:remaining]
            if extra.strip():
                self._keep_alive = False
            self._remaining = 0
            self._state = _DONE
            if data:
                self._body_data(data)
            self._finish_clean()
            return
        self._remaining = remaining - len(data)
        self._body_data(data)

    def _chunked_data(self, data: bytes) -> None:
        """
        De-chunk what one read brought, and hand it on in one piece.

        ``_remaining`` is the payload left in the current chunk (plus its CRLF), or -1 when a
        size line is due, or -2 when the trailers after the last chunk are being read.
        """
        buffer = self._buffer + data if self._buffer else data
        self._buffer = b""
        pieces = []
        position = 0
        end = len(buffer)
        remaining = self._remaining
        while position < end:
            if remaining > 0:
                # Payload, then the CRLF that closes the chunk (the last two of remaining).
                take = min(remaining, end - position)
                payload = min(take, remaining - 2)
                if payload > 0:
                    pieces.append(buffer[position : position + payload])
                position += take
                remaining -= take
                if remaining == 0:
                    remaining = -1
                continue
            line_end = buffer.find(b"\r\n", position)
            if line_end < 0:
                self._buffer = buffer[position:]
                if len(self._buffer) > 4096:
                    self._body_failed(BadResponse("chunk size line too long"))
                    return
                break
            line = buffer[position:line_end]
            position = line_end + 2
            if remaining == -2:
                if line:
                    continue  # a trailer: dropped
                self._state = _DONE
                if position < end and buffer[position:].strip():
                    self._keep_alive = False
                break
            try:
                size = int(line.split(b";", 1)[0], 16)
            except ValueError:
                self._body_failed(BadResponse(f"bad chunk size line: {line[:40]!r}"))
                return
            remaining = size + 2 if size else -2
        self._remaining = remaining
        if pieces:
            self._body_data(pieces[0] if len(pieces) == 1 else b"".join(pieces))
        if self._state == _DONE:
            self._finish_clean()

    def _finish_clean(self) -> None:
        """
        The body ended as its framing said; once its protocol has it all, the connection may
        serve another request (`deliver` finishes it if no protocol has been given yet).
        """
        if self._body is not None:
            self._end_body(None)

    def _end_body(self, reason: Failure | None) -> None:
        body, self._body = self._body, None
        if reason is None:
            reusable = self._keep_alive and not self.lost
            if reusable:
                if self._paused:
                    self._paused = False
                    self.transport.resumeProducing()
                self._pool._release(self)
            elif not self.lost:
                self.transport.loseConnection()
        if body is not None:
            body.connectionLost(reason or Failure(ResponseDone("response body fully received")))

    def _body_failed(self, error: Exception) -> None:
        self._keep_alive = False
        self._state = _DONE
        self.transport.abortConnection()
        self._end_body(Failure(ResponseFailed([Failure(error)])))

    def connectionLost(self, reason: Failure = Failure(ResponseDone())) -> None:
        self.lost = True
        state, self._state = self._state, _DONE
        answer, self._answer = self._answer, None
        self._pool._lost(self)
        unanswered, self.unanswered = self.unanswered, None
        if answer is not None and self.reused and unanswered is not None:
            self._pool._resend(self.address, unanswered).chainDeferred(answer)
            return
        if answer is not None:
            answer.errback(ResponseNeverReceived([reason]))
            return
        if state == _UNTIL_CLOSE:
            self._end_body(Failure(ResponseDone("response body ended with the connection")))
        elif state in (_LENGTH, _CHUNKED):
            self._end_body(Failure(ResponseFailed([reason])))


class RelayPool(HTTPConnectionPool):
    """
    The connection pool of one model's process: `Agent`'s, for the few requests that go through
    it (health probes), and swapproxy's own keep-alive connections for relayed requests (`relay`).

    :param max_idle: how many idle relay connections to keep (per address).
    :param endpoint: the client endpoint for an address (a TCP endpoint by default).
    """

    def __init__(
        self,
        reactor: IClientReactor,
        max_idle: int = 2,
        endpoint: Callable[[tuple[str, int]], IStreamClientEndpoint] | None = None,
    ) -> None:
        super().__init__(reactor, persistent=True)
        self._reactor = reactor
        self.max_idle = max_idle
        self._idle: dict[tuple[str, int], list[RelayConnection]] = {}
        self._endpoints: dict[tuple[str, int], IStreamClientEndpoint] = {}
        self._make_endpoint = endpoint or self._tcp_endpoint
        self._closed = False

    def relay(self, method: bytes, url: bytes, headers: Headers, body: bytes | None) -> Deferred[RelayResponse]:
        """
        Send a request to ``url`` (``http://host:port/path``) on a pooled connection.

        :param headers: the request headers, without ``Host``, ``Content-Length`` or any
            hop-by-hop header.
        :returns: the answer's head; the body follows through `RelayResponse.deliverBody`.
        """
        address, path = _split_url(url)
        lines = [method, b" ", path, b" HTTP/1.1\r\nHost: ", address[0].encode("ascii"), b":%d\r\n" % address[1]]
        for name, values in headers.getAllRawHeaders():
            for value in values:
                lines += [name, b": ", value, b"\r\n"]
        if body:
            lines.append(b"Content-Length: %d\r\n\r\n" % len(body))
            lines.append(body)
        else:
            lines.append(b"\r\n")
        request = (b"".join(lines), method == b"HEAD")
        if self._closed:
            return _failed(ResponseNeverReceived([Failure(ConnectionError("the model's connections are closed"))]))
        idle = self._idle.get(address)
        while idle:
            connection = idle.pop()
            if not connection.lost:
                connection.reused = True
                return connection.send(*request)
        return self._resend(address, request)

    def _resend(self, address: tuple[str, int], request: tuple[bytes, bool]) -> Deferred[RelayResponse]:
        """
        Send ``request`` on a new connection to ``address``.
        """
        sent: list[Deferred[RelayResponse]] = []

        def cancel(_: Deferred[RelayResponse]) -> None:
            (sent[0] if sent else connecting).cancel()

        result: Deferred[RelayResponse] = Deferred(cancel)
        connecting = self._endpoint(address).connect(_Factory(self, address))

        def connected(connection: RelayConnection) -> None:
            if result.called:
                connection.transport.loseConnection()
                return
            sent.append(connection.send(*request))
            sent[0].chainDeferred(result)

        def failed(reason: Failure) -> None:
            if not result.called:
                result.errback(reason)

        connecting.addCallbacks(connected, failed)
        return result

    def _release(self, connection: RelayConnection) -> None:
        """
        ``connection`` has finished its answer cleanly: keep it for the next request.
        """
        idle = self._idle.setdefault(connection.address, [])
        if self._closed or len(idle) >= self.max_idle:
            connection.transport.loseConnection()
        else:
            idle.append(connection)

    def _lost(self, connection: RelayConnection) -> None:
        idle = self._idle.get(connection.address)
        if idle and connection in idle:
            idle.remove(connection)

    def _endpoint(self, address: tuple[str, int]) -> IStreamClientEndpoint:
        endpoint = self._endpoints.get(address)
        if endpoint is None:
            endpoint = self._endpoints[address] = self._make_endpoint(address)
        return endpoint

    def _tcp_endpoint(self, address: tuple[str, int]) -> IStreamClientEndpoint:
        host, port = address
        if isIPAddress(host):
            return TCP4ClientEndpoint(self._reactor, host, port)
        if isIPv6Address(host):
            return TCP6ClientEndpoint(self._reactor, host, port)
        return HostnameEndpoint(self._reactor, host.encode("idna"), port)

    def closeCachedConnections(self) -> Deferred[None]:
        """
        Close every idle connection, Agent's and swapproxy's; busy ones close when they finish.
        """
        self._closed = True
        for idle in self._idle.values():
            for connection in idle:
                connection.transport.loseConnection()
        self._idle.clear()
        closed: Deferred[None] = super().closeCachedConnections()
        return closed


class _Factory(Factory):
    noisy = False

    def __init__(self, pool: RelayPool, address: tuple[str, int]) -> None:
        self._pool = pool
        self._address = address

    def buildProtocol(self, addr: Any) -> RelayConnection:
        return RelayConnection(self._pool, self._address)


def _split_url(url: bytes) -> tuple[tuple[str, int], bytes]:
    """
    ``http://127.0.0.1:5800/v1/x?y`` as ``(("127.0.0.1", 5800), b"/v1/x?y")``.
    """
    if not url.startswith(b"http://"):
        raise ValueError(f"not an http:// URL: {url[:100]!r}")
    rest = url[7:]
    slash = rest.find(b"/")
    netloc, path = (rest, b"/") if slash < 0 else (rest[:slash], rest[slash:])
    if netloc.startswith(b"["):
        host, _, port = netloc[1:].partition(b"]")
        port = port[1:]
    else:
        host, _, port = netloc.rpartition(b":") if b":" in netloc else (netloc, b"", b"")
    return (host.decode("ascii"), int(port) if port else 80), path


def _failed(error: Exception) -> Deferred[Any]:
    result: Deferred[Any] = Deferred()
    result.errback(error)
    return result

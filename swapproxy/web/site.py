# -*- test-case-name: tests.test_limits -*-
"""
The HTTP server around the Resource tree, and the limits that keep one client from exhausting it.

`SwapproxySite` serves `LimitedChannel` connections carrying `LimitedRequest`s, and enforces the
``limits`` of the configuration (`swapproxy.config.Limits`):

* a request body larger than ``maxBodySize`` is answered 413, from its ``Content-Length`` before
  any of it is read, or as soon as a chunked body grows past the limit;
* a request line or headers larger than ``maxHeaderSize`` are answered 414 or 431;
* a request not received in full within ``requestTimeout`` seconds of its first byte is answered
  408, however steadily it trickles in; ``idleTimeout`` closes a connection silent between requests;
* beyond ``maxConnections`` open connections, a new connection is answered 503.

Each refusal is an OpenAI-style JSON error that names the limit, sent with ``Connection: close``
before the connection is closed. swapproxy then reads and discards what the client still sends for
a moment (`LINGER_SECONDS`), so that the client reads the answer instead of a connection reset.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, cast

from twisted.internet.interfaces import IAddress, IDelayedCall, IReactorTime, ISSLTransport
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.web.http import RESPONSES, HTTPChannel
from twisted.web.resource import IResource
from twisted.web.server import Request, Site

from swapproxy.config import Limits
from swapproxy.logs import proxy_logger
from swapproxy.metrics import IRequestMeter
from swapproxy.reactors import IStreamConnection
from swapproxy.twistedinternals import handling_request, skip_form_parsing, unregister_channel
from swapproxy.web.errors import error_object

log = proxy_logger("swapproxy.web")

#: Seconds a refused connection keeps reading (and discarding) before it is closed.
LINGER_SECONDS = 5.0

#: Bytes a header line may hold: HTAB, visible ASCII, space and obs-text (RFC 9110 section 5.5).
_ALLOWED_IN_HEADER = b"\t" + bytes(range(0x20, 0x7F)) + bytes(range(0x80, 0x100))

#: The request bodies Twisted decodes into ``request.args``.
_FORM_TYPES = frozenset({b"multipart/form-data", b"application/x-www-form-urlencoded"})


def describe_size(size: int) -> str:
    """
    ``67108864`` as ``64 MiB (67108864 bytes)``.
    """
    for unit, scale in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if size >= scale and size % scale == 0:
            return f"{size // scale} {unit} ({size} bytes)"
    return f"{size} bytes"


def error_head(status: int, message: str, extra: tuple[bytes, ...] = ()) -> bytes:
    """
    A whole HTTP/1.1 response, OpenAI-style JSON error body included, that closes the connection.
    """
    body = json.dumps(error_object(status, message)).encode("utf-8")
    lines = [
        b"HTTP/1.1 %d %s" % (status, RESPONSES.get(status, b"Error")),
        b"Content-Type: application/json",
        b"Content-Length: %d" % len(body),
        b"Connection: close",
        *extra,
    ]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def _peer(transport: Any) -> str:
    peer = transport.getPeer() if transport is not None else None
    host = getattr(peer, "host", None)
    return f"{host}:{getattr(peer, 'port', '')}" if host else str(peer)


class _Linger:
    """
    Ends a refused connection: half-close (the answer is flushed, then a FIN), discard what the
    client still sends, and abort after `LINGER_SECONDS` if the client has not closed by then.
    """

    def __init__(self, transport: IStreamConnection, clock: IReactorTime) -> None:
        self._transport = transport
        self._call: IDelayedCall | None = clock.callLater(LINGER_SECONDS, self._abort)
        # Over TLS a half-close would skip the TLS close: close the whole connection instead.
        lose_write = getattr(transport, "loseWriteConnection", None)
        if lose_write is not None and not ISSLTransport.providedBy(transport):
            lose_write()
        else:
            transport.loseConnection()

    def _abort(self) -> None:
        self._call = None
        self._transport.abortConnection()

    def cancel(self) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None


class LimitedRequest(Request):
    """
    A `Request` whose body may not grow past ``limits.maxBodySize``.
    """

    def __init__(self, channel: LimitedChannel, *args: Any, **kwargs: Any) -> None:
        super().__init__(channel, *args, **kwargs)
        self._body_bytes = 0

    def handleContentChunk(self, data: bytes) -> None:
        channel = cast("LimitedChannel | None", self.channel)
        if channel is None or channel.refused:
            return
        self._body_bytes += len(data)
        if channel.body_too_large(self._body_bytes):
            return
        super().handleContentChunk(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        # Twisted parses the Content-Type of every POST with the email package, only to find
        # the form bodies it decodes into request.args; that parse cost a tenth of the CPU time
        # of a proxied JSON request. Form bodies still get it.
        content_type = self.requestHeaders.getRawHeaders(b"content-type", [b""])[0]
        if content_type.split(b";", 1)[0].strip().lower() not in _FORM_TYPES:
            skip_form_parsing(self)
        try:
            super().requestReceived(command, path, version)
        except Exception as e:
            # Rendering catches its own errors: this is Twisted's form parsing (the email
            # package), which raises for some Content-Type values instead of reporting them.
            if self.startedWriting or self.channel is None:
                raise
            cast(LimitedChannel, self.channel).refuse(400, f"cannot parse the form body or its Content-Type: {e}")


class LimitedChannel(HTTPChannel):
    """
    One client connection, with the header, body and time limits of its `SwapproxySite`.

    :ivar refused: whether the connection has been answered with an error and is being closed;
        nothing it sends from then on is read.
    """

    transport: IStreamConnection

    site: SwapproxySite
    refused = False
    _deadline: IDelayedCall | None = None
    _linger: _Linger | None = None
    _head_bytes = 0

    limits: Limits

    def connectionMade(self) -> None:
        # The limits of this connection's whole life, even if a reload changes them meanwhile.
        self.limits = self.site.limits
        self.totalHeadersSize = self.MAX_LENGTH = self.limits.max_header_size
        self.site.connection_opened(self)
        super().connectionMade()
        set_no_delay = getattr(self.transport, "setTcpNoDelay", None)
        if set_no_delay is not None:
            # Small SSE events, and whole answers, must leave at once, not wait for Nagle's
            # algorithm. Once per connection: a system call per request adds up.
            set_no_delay(True)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._cancel_deadline()
        if self._linger is not None:
            self._linger.cancel()
        self.site.connection_closed(self)
        super().connectionLost(reason)

    # -- receiving a request ----------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self.refused:
            return
        timeout = self.limits.request_timeout
        if timeout and self._deadline is None and not handling_request(self):
            # The first byte of a request: all of it must arrive in time.
            self._deadline = self.callLater(timeout, self._too_slow)
        super().dataReceived(data)

    def lineReceived(self, line: bytes) -> None:
        if self.refused:
            return
        first_line = self._head_bytes == 0
        self._head_bytes += len(line) + 2
        if self._head_bytes > self.limits.max_header_size:
            self._headers_too_large(first_line)
            return
        super().lineReceived(line)

    def headerReceived(self, line: bytes) -> bool:
        # Twisted refuses NUL, CR and LF; the other control characters are just as invalid in a
        # field (RFC 9110 section 5.5) and are not passed on to a model.
        bad = line.translate(None, _ALLOWED_IN_HEADER)
        if bad:
            name = line.split(b":", 1)[0].decode("latin-1")
            self.refuse(400, f"header {name!r} contains the control character 0x{bad[0]:02x}")
            return False
        return bool(super().headerReceived(line))

    def lineLengthExceeded(self, line: bytes) -> None:
        self._headers_too_large(self._head_bytes == 0)

    def rawDataReceived(self, data: bytes) -> None:
        if self.refused:
            return
        super().rawDataReceived(data)

    def allHeadersReceived(self) -> None:
        if self.length is not None and self.body_too_large(self.length):
            return
        super().allHeadersReceived()

    def allContentReceived(self) -> None:
        if self.refused:
            return
        self._cancel_deadline()
        self._head_bytes = 0
        super().allContentReceived()

    def _cancel_deadline(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None

    # -- refusing a request -----------------------------------------------------------------

    def body_too_large(self, size: int) -> bool:
        """
        Refuse the request (413) if a body of ``size`` bytes is over the limit.

        :returns: whether it was refused.
        """
        limit = self.limits.max_body_size
        if not limit or size <= limit:
            return False
        self.refuse(413, f"request body is larger than {describe_size(limit)} (limits.maxBodySize);"
                         " send a smaller request or raise the limit in the config")
        return True

    def _headers_too_large(self, request_line: bool) -> None:
        limit = describe_size(self.limits.max_header_size)
        if request_line:
            self.refuse(414, f"request line is longer than {limit} (limits.maxHeaderSize)")
        else:
            self.refuse(431, f"request line and headers are larger than {limit} (limits.maxHeaderSize)")

    def _too_slow(self) -> None:
        self._deadline = None
        self.refuse(408, f"the request did not arrive in full within {self.limits.request_timeout:g}"
                         " seconds of its first byte (limits.requestTimeout)")

    def _respondToBadRequestAndDisconnect(self) -> None:
        # Twisted's answer to a malformed request line, header or chunked body: an empty 400.
        self.refuse(400, "malformed HTTP request: check the request line, the headers and, for a"
                         " chunked body, its chunk sizes")

    def refuse(self, status: int, message: str) -> None:
        """
        Answer ``status`` with a JSON error naming the problem, and close the connection.
        """
        if self.refused:
            return
        self.refused = True
        self._cancel_deadline()
        self.setTimeout(None)
        log.info("refused a request from {peer}: {status} {reason}",
                 peer=_peer(self.transport), status=status, reason=message)
        if any(getattr(request, "startedWriting", False) for request in self.requests):
            # A response is already on its way: the only honest signal left is a cut.
            self.transport.abortConnection()
            return
        unregister_channel(self)
        self.transport.write(error_head(status, message))
        self._linger = _Linger(self.transport, self.site.reactor)


class Refusal(Protocol):
    """
    A connection over ``limits.maxConnections``: answered 503 and closed, its request unread.
    """

    transport: IStreamConnection

    def __init__(self, site: SwapproxySite, limit: int) -> None:
        self._site = site
        self._limit = limit
        self._linger: _Linger | None = None

    def connectionMade(self) -> None:
        log.info("refused a connection from {peer}: {limit} connections are open (limits.maxConnections)",
                 peer=_peer(self.transport), limit=self._limit)
        self.transport.write(error_head(
            503,
            f"too many open connections: the limit is {self._limit} (limits.maxConnections);"
            " try again shortly",
            (b"Retry-After: 1",),
        ))
        self._linger = _Linger(self.transport, self._site.reactor)

    def dataReceived(self, data: bytes) -> None:
        pass

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._linger is not None:
            self._linger.cancel()
        self._site.refusal_closed(self)


class _Drop(Protocol):
    """
    A connection beyond even the refusals being answered: closed at once.
    """

    def connectionMade(self) -> None:
        cast(IStreamConnection, self.transport).abortConnection()


class SwapproxySite(Site):
    """
    swapproxy's HTTP factory: the Resource tree, served with ``limits``.

    :param limits: the limits, or a function that returns the current ones (read for each new
        connection, so that a reloaded configuration applies to the connections opened after it).

    :ivar connections: the open `LimitedChannel` connections.
    :ivar refusals: connections being answered 503, at most ``max_connections`` of them; beyond
        that a new connection is closed without an answer, so that a flood of connections holds
        no more than twice the limit.
    """

    protocol = LimitedChannel  # type: ignore[assignment]
    requestFactory = LimitedRequest
    displayTracebacks = False

    def __init__(self, resource: IResource, limits: Limits | Callable[[], Limits], reactor: IReactorTime) -> None:
        super().__init__(resource, reactor=reactor)
        self._limits = limits if callable(limits) else (lambda: limits)
        self.connections: set[LimitedChannel] = set()
        self.refusals: set[Refusal] = set()

    @property
    def limits(self) -> Limits:
        return self._limits()

    @property
    def timeOut(self) -> float | None:
        # What HTTPFactory.buildProtocol gives each channel as its idle timeout.
        return self.limits.idle_timeout or None

    @timeOut.setter
    def timeOut(self, value: float | None) -> None:
        pass  # HTTPFactory.__init__ sets its default; the limits decide.

    def buildProtocol(self, addr: IAddress | None) -> Any:
        limit = self.limits.max_connections
        if limit and len(self.connections) >= limit:
            if len(self.refusals) >= limit:
                return _Drop()
            refusal = Refusal(self, limit)
            self.refusals.add(refusal)
            return refusal
        return super().buildProtocol(addr)

    def log(self, request: Request) -> None:  # type: ignore[override]
        """
        Twisted's access log line, for the requests that are not model requests: a model
        request has the request line of `swapproxy.requestlog` instead, which says the same and
        more (the model, the time to the first byte).
        """
        if request.getComponent(IRequestMeter) is None:
            super().log(request)

    def connection_opened(self, channel: LimitedChannel) -> None:
        self.connections.add(channel)

    def connection_closed(self, channel: LimitedChannel) -> None:
        self.connections.discard(channel)

    def refusal_closed(self, refusal: Refusal) -> None:
        self.refusals.discard(refusal)

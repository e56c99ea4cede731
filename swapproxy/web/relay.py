# -*- test-case-name: tests.test_relay -*-
"""
Where bytes are copied: the parts of the forward pipeline (`swapproxy.web.forward`) that send a
request to an upstream and relay its answer as it arrives.

The upstream body is relayed with flow control: the upstream connection is registered as the
streaming producer of the client's response, so a slow client pauses the upstream socket instead
of making swapproxy buffer the stream, and a client that hangs up closes the upstream transfer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import psutil
from twisted.internet.defer import Deferred, fail
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH
from twisted.web.server import Request

from swapproxy.reactors import IStreamConnection
from swapproxy.upstream import Upstream
from swapproxy.web.render import ClientState

#: Headers that describe one connection, never forwarded (RFC 9110 section 7.6.1).
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"trailers",
        b"transfer-encoding",
        b"upgrade",
    }
)

#: Request headers swapproxy sets itself.
_NOT_FORWARDED = HOP_BY_HOP | {b"content-length", b"host", b"accept-encoding"}


def _connection_tokens(headers: Headers) -> set[bytes]:
    tokens: set[bytes] = set()
    for value in headers.getRawHeaders(b"connection", []):
        tokens.update(t.strip().lower() for t in value.split(b",") if t.strip())
    return tokens


def forward_headers(request: Request, drop: frozenset[bytes] = frozenset()) -> Headers:
    """
    The client's request headers as they go upstream: hop-by-hop headers removed, the
    ``X-Forwarded-*`` headers added.

    :param drop: more lower-case header names to leave out.
    """
    skip = _NOT_FORWARDED | drop | _connection_tokens(request.requestHeaders)
    headers = Headers()
    for name, values in request.requestHeaders.getAllRawHeaders():
        if name.lower() not in skip:
            headers.setRawHeaders(name, values)
    client = request.getClientAddress()
    host = getattr(client, "host", None)
    if host:
        previous = request.getHeader(b"x-forwarded-for")
        forwarded = (previous.decode("latin-1") + ", " if previous else "") + host
        headers.setRawHeaders(b"x-forwarded-for", [forwarded.encode("latin-1")])
    original_host = request.getHeader(b"host")
    if original_host:
        headers.setRawHeaders(b"x-forwarded-host", [original_host])
    return headers


def is_event_stream(headers: Headers) -> bool:
    """
    Whether a response's ``Content-Type`` is ``text/event-stream``.
    """
    value = headers.getRawHeaders(b"content-type", [b""])[0]
    return value.split(b";")[0].strip().lower() == b"text/event-stream"


class BodyRelay(Protocol):
    """
    Copies an upstream response body into a client response, with flow control.

    :param transform: rewrites each chunk before it is written (the Anthropic splice).
    :param tap: is shown each chunk as it came from upstream (the metrics' token scanner); it
        must be quick and must not raise.
    :ivar done: fires with ``None`` when the body ended cleanly, or with the exception that cut
        it short (a value, not a failure: a Deferred cannot carry a `Failure` as its result).
        Cancelling it closes the upstream connection.
    """

    transport: IStreamConnection

    def __init__(
        self,
        request: Request,
        client: ClientState,
        transform: Callable[[bytes], bytes] | None = None,
        tap: Callable[[bytes], None] | None = None,
    ) -> None:
        self._request = request
        self._client = client
        self._transform = transform
        self._tap = tap
        self.bytes = 0
        self.done: Deferred[BaseException | None] = Deferred(self._stop)

    def _stop(self, _: Deferred[BaseException | None]) -> None:
        if self.transport is not None:
            self.transport.stopProducing()

    @property
    def paused(self) -> bool:
        """
        Whether the client's flow control holds the upstream's body back just now.
        """
        return bool(getattr(self.transport, "paused", False))

    def abort(self, error: BaseException) -> None:
        """
        End the relay now with ``error`` as its `done` result, and close the upstream connection.
        """
        if self.done.called:
            return
        if self.transport is not None:
            self.transport.stopProducing()
        if not self._client.gone and self._request.producer is not None:
            self._request.unregisterProducer()
        self.done.callback(error)

    def connectionMade(self) -> None:
        if not self._client.gone:
            self._request.registerProducer(self.transport, True)

    def dataReceived(self, data: bytes) -> None:
        self.bytes += len(data)
        if self._tap is not None:
            self._tap(data)
        if self._transform is not None:
            data = self._transform(data)
        if data and not self._client.gone:
            self._request.write(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if not self._client.gone and self._request.producer is not None:
            self._request.unregisterProducer()
        if not self.done.called:
            self.done.callback(None if reason.check(ResponseDone, PotentialDataLoss) else reason.value)


def send_upstream(
    upstream: Upstream,
    request: Request,
    path: bytes,
    body: bytes | None,
    headers: Headers,
) -> Deferred[Any]:
    """
    Send a request to an upstream.

    :param path: the path and query to request upstream, starting with ``/``.
    :returns: the Deferred of treq's unbuffered response (cancelling it closes the connection);
        it fails with `ConnectionError` when the model is not running any more.
    """
    client = upstream.client
    if client is None:
        return fail(ConnectionError(f"model {upstream.model.id!r} is not running"))
    sent: Deferred[Any] = client.request(
        request.method.decode("ascii"),
        upstream.url_for(path.decode("latin-1")),
        headers=headers,
        data=body if body else None,
        unbuffered=True,
        allow_redirects=False,
    )
    return sent


def copy_response_head(request: Request, response: Any) -> bool:
    """
    Copy an upstream response's status and headers (minus hop-by-hop) to the client.

    :returns: whether the response is an event stream.
    """
    request.setResponseCode(response.code, response.phrase)
    headers: Headers = response.headers
    # twisted.web.client keeps Content-Length out of the headers; its length is response.length,
    # unknown for a chunked body or one treq decoded. twisted.web then delimits the body itself.
    skip = HOP_BY_HOP | _connection_tokens(headers) | {b"content-length"}
    request.defaultContentType = None
    for name, values in headers.getAllRawHeaders():
        # The CORS policy is swapproxy's (swapproxy.web.cors), not each model's.
        if name.lower() not in skip and not name.lower().startswith(b"access-control-"):
            request.responseHeaders.setRawHeaders(name, values)
    if response.length is not UNKNOWN_LENGTH and request.method != b"HEAD":
        request.setHeader(b"content-length", str(response.length).encode("ascii"))
    streaming = is_event_stream(headers)
    if streaming:
        request.setHeader(b"x-accel-buffering", b"no")
        request.setHeader(b"cache-control", b"no-cache")
    return streaming


class UpstreamGone(Exception):
    """
    The upstream's process died before the request could be sent; nothing was written.
    """


def process_gone(upstream: Upstream) -> bool:
    """
    Whether the upstream's child has exited, even if swapproxy has not reaped it yet.
    """
    if upstream.pid is None:
        return True
    try:
        return bool(psutil.Process(upstream.pid).status() == psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return True


#: What a connection closed by the other side before the answer's end is called: Twisted's own
#: words for it ("Connection was closed cleanly.") describe the TCP close, not the answer, which
#: was cut short (the model crashed, or closed the connection mid-answer).
CLOSED_EARLY = "the connection was closed before the answer was complete"


def describe_error(error: BaseException) -> str:
    """
    What went wrong, in words: the reasons of a `ResponseFailed` (and its kin) or the error itself.
    """
    reasons = getattr(error, "reasons", None)
    if isinstance(error, ConnectionDone) or any(r.check(ConnectionDone) for r in reasons or ()):
        # The other reasons of such a failure are its consequences: the body's decoder left
        # waiting for the rest.
        return CLOSED_EARLY
    if reasons:
        return "; ".join(r.getErrorMessage() for r in reasons)
    return str(error) or error.__class__.__name__

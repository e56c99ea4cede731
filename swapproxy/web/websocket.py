# -*- test-case-name: tests.test_websocket -*-
"""
Websocket upgrades on ``/upstream/<model>/...``: the client's connection is spliced to a new
connection to the model (or peer) once the model has accepted the upgrade (HTTP 101).

From then on bytes are copied both ways as they come, with flow control each way (each side's
connection is the streaming producer of the other's), until either side closes, which closes
the other. swapproxy does not read the websocket frames.

A local model is started for a websocket as for any request, and the websocket counts as a
request in flight (so TTL and swaps wait for it) until it closes; with ``compat.ignoreWebsockets``
it does neither: a model that is not ready is answered 409, and a ready one is not held.
"""

from __future__ import annotations

from typing import Any, cast

from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers
from twisted.web.server import Request

from swapproxy.config import ModelConfig
from swapproxy.logs import proxy_logger
from swapproxy.reactors import IClientReactor, IStreamConnection
from swapproxy.relayclient import MAX_HEAD
from swapproxy.supervisor import Rejected, Supervisor
from swapproxy.twistedinternals import hand_over
from swapproxy.upstream import StartError, State
from swapproxy.web.errors import write_error
from swapproxy.web.render import ClientState

log = proxy_logger("swapproxy.websocket")

#: Seconds to wait for the upstream's answer to the upgrade request.
UPGRADE_TIMEOUT = 30.0


def is_websocket_upgrade(request: Request) -> bool:
    """
    Whether ``request`` asks to upgrade its connection to a websocket.
    """
    upgrade = request.getHeader(b"upgrade") or b""
    tokens = {t.strip().lower() for v in request.requestHeaders.getRawHeaders(b"connection", []) for t in v.split(b",")}
    return upgrade.strip().lower() == b"websocket" and b"upgrade" in tokens


def _split(base: str) -> tuple[str, int, str]:
    """
    ``http://host:port/prefix`` as ``(host, port, "/prefix")``.

    :raises ValueError: for a URL that is not ``http://``.
    """
    if not base.lower().startswith("http://"):
        raise ValueError("websocket upgrades are relayed to http:// servers only")
    rest = base[7:]
    netloc, slash, prefix = rest.partition("/")
    if netloc.startswith("["):
        host, _, port = netloc[1:].partition("]")
        port = port.lstrip(":")
    else:
        host, _, port = netloc.partition(":")
    return host, int(port) if port else 80, ("/" + prefix).rstrip("/") if slash else ""


class _UpstreamSide(Protocol):
    """
    The connection to the model: first its answer's head, then websocket bytes for the client.
    """

    transport: IStreamConnection

    def __init__(self) -> None:
        self.head: Deferred[tuple[int, bytes]] = Deferred(lambda _: self.transport.abortConnection())
        self.closed: Deferred[None] = Deferred()
        self.peer: Any = None
        self._buffer = b""

    def dataReceived(self, data: bytes) -> None:
        if self.peer is not None:
            self.peer.write(data)
            return
        self._buffer += data
        end = self._buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self._buffer) > MAX_HEAD:
                self.transport.abortConnection()
            return
        head, self._buffer = self._buffer[: end + 4], self._buffer[end + 4 :]
        try:
            code = int(head.split(b" ", 2)[1])
        except (IndexError, ValueError):
            code = 0
        if not self.head.called:
            self.head.callback((code, head))

    def splice(self, client_transport: Any) -> None:
        """
        Send what comes from now on to ``client_transport`` (and what came after the head).
        """
        self.peer = client_transport
        if self._buffer:
            client_transport.write(self._buffer)
            self._buffer = b""

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if not self.head.called:
            self.head.errback(ConnectionError("the connection closed before an answer"))
        if self.peer is not None:
            self.peer.loseConnection()
        if not self.closed.called:  # cancelled when the client left first
            self.closed.callback(None)


class _ClientSide(Protocol):
    """
    The client's connection once upgraded: its bytes go to the model. When it closes, the HTTP
    channel it was is told, so that swapproxy's own bookkeeping of the connection ends too.
    """

    transport: IStreamConnection

    def __init__(self, upstream: Any, channel_lost: Any) -> None:
        self._upstream = upstream
        self._channel_lost = channel_lost

    def dataReceived(self, data: bytes) -> None:
        self._upstream.write(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._upstream.loseConnection()
        self._channel_lost(reason)


def _endpoint(reactor: IClientReactor, host: str, port: int, timeout: float) -> IStreamClientEndpoint:
    if isIPAddress(host):
        return TCP4ClientEndpoint(reactor, host, port, timeout=timeout)
    if isIPv6Address(host):
        return TCP6ClientEndpoint(reactor, host, port, timeout=timeout)
    return HostnameEndpoint(reactor, host.encode("idna"), port, timeout=timeout)


async def relay_websocket(
    request: Request,
    client: ClientState,
    reactor: IClientReactor,
    base: str,
    path: bytes,
    headers: Headers,
    source: str,
    connect_timeout: float = 30.0,
) -> None:
    """
    Relay a websocket upgrade to ``base`` + ``path``; returns once the websocket has closed.

    Before the model accepts the upgrade, errors are JSON answers (502); after, the client's
    connection belongs to the websocket.

    :param headers: the client's headers to send (``Connection`` and ``Upgrade`` are added).
    :param source: what is asked, in words, for messages: ``model 'a'``.
    """
    try:
        host, port, prefix = _split(base)
    except ValueError as e:
        write_error(request, 501, f"{source}: {e}")
        return
    upstream = _UpstreamSide()
    try:
        await _endpoint(reactor, host, port, connect_timeout or 3600.0).connect(
            Factory.forProtocol(lambda: upstream))
    except Exception as e:
        write_error(request, 502, f"{source} did not accept the websocket connection: {e}")
        return
    lines = [request.method, b" ", prefix.encode("ascii") + path, b" HTTP/1.1\r\n",
             b"Host: ", f"{host}:{port}".encode("idna"), b"\r\n",
             b"Connection: Upgrade\r\nUpgrade: websocket\r\n"]
    for name, values in headers.getAllRawHeaders():
        for value in values:
            lines += [name, b": ", value, b"\r\n"]
    upstream.transport.write(b"".join(lines) + b"\r\n")
    timer = reactor.callLater(UPGRADE_TIMEOUT, upstream.head.cancel)
    try:
        code, head = await upstream.head
    except Exception as e:
        upstream.transport.abortConnection()
        write_error(request, 502, f"{source} did not answer the websocket upgrade: {e}")
        return
    finally:
        if timer.active():
            timer.cancel()
    if code != 101:
        upstream.transport.abortConnection()
        write_error(request, 502, f"{source} refused the websocket upgrade: HTTP {code}")
        return
    _take_over(request, client, upstream, head)
    await upstream.closed


def _take_over(request: Request, client: ClientState, upstream: _UpstreamSide, head: bytes) -> None:
    """
    Give the client's connection to the websocket: the model's 101 answer, then bytes both ways.
    """
    channel = request.channel
    transport = cast(IStreamConnection, channel.transport)
    # The answer is the model's 101, not swapproxy's: the request must never finish on its own.
    client.gone = True
    channel.setTimeout(None)
    channel_lost = channel.connectionLost
    # Twisted's own websocket support takes a connection over the same way.
    hand_over(channel, _ClientSide(upstream.transport, channel_lost))
    transport.unregisterProducer()
    transport.write(head)
    upstream.splice(transport)
    transport.registerProducer(upstream.transport, True)
    upstream.transport.registerProducer(transport, True)
    transport.resumeProducing()
    log.info("websocket {path} open", path=request.path)


async def websocket_to_model(
    supervisor: Supervisor, reactor: IClientReactor, request: Request, client: ClientState, model: ModelConfig,
    path: bytes, headers: Headers,
) -> None:
    """
    Relay a websocket upgrade to a local model: started and held like any request, unless
    ``compat.ignoreWebsockets`` (then it must be ready already, and is not held).
    """
    source = f"model {model.id!r}"
    if model.ignore_websockets:
        upstream = supervisor.upstreams.get(model.id)
        if upstream is None or upstream.state is not State.READY:
            write_error(request, 409, f"{source} is not loaded, and a websocket does not start it"
                                      " (compat.ignoreWebsockets)")
            return
        await relay_websocket(request, client, reactor, upstream.base_url, path, headers, source,
                              model.timeouts.connect)
        return
    try:
        lease = await supervisor.request(model.id).wait()
    except Rejected as e:
        write_error(request, e.status, str(e), e.error_type, e.code)
        return
    except StartError as e:
        write_error(request, 502, str(e), None, "model_start_failed")
        return
    try:
        await relay_websocket(request, client, reactor, lease.upstream.base_url, path, headers, source,
                              model.timeouts.connect)
    finally:
        lease.release()

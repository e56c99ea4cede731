# -*- test-case-name: tests.test_upstream -*-
"""
The HTTP client swapproxy talks to one model's server with: its own connection pool, no cookie
memory, in-memory request bodies, and a short way for the requests the relay sends
(`swapproxy.relayclient`); treq's way for the rest (health probes).
"""

from __future__ import annotations

from http.cookiejar import CookieJar, DefaultCookiePolicy
from typing import Any

from treq.client import HTTPClient
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint, wrapClientTLS
from twisted.internet.interfaces import IConsumer, IStreamClientEndpoint
from twisted.web.client import URI, Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IAgentEndpointFactory, IBodyProducer
from zope.interface import implementer

from swapproxy.reactors import IClientReactor
from swapproxy.relayclient import RelayPool
from swapproxy.twistedinternals import quiet_pool


@implementer(IBodyProducer)
class BytesProducer:
    """
    A request body that is already in memory, written in one call.

    treq's default producer runs on the global cooperator, which costs a reactor turn per
    request and never runs under a test clock.
    """

    def __init__(self, body: bytes) -> None:
        self._body = body
        self.length = len(body) if body else UNKNOWN_LENGTH

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        consumer.write(self._body)
        return succeed(None)

    def stopProducing(self) -> None:
        pass

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass


def body_producer(data: Any) -> IBodyProducer:
    """
    The producer of a request body: `BytesProducer` for bytes, else ``data`` itself.
    """
    if isinstance(data, bytes):
        return BytesProducer(data)
    return IBodyProducer(data)


@implementer(IAgentEndpointFactory)
class _Endpoints:
    """
    One client endpoint per upstream address, made once: `Agent`'s own factory builds a
    `HostnameEndpoint` (with an IDNA encoding of the host) for every request. An IP address
    gets a plain TCP endpoint, since there is no name to resolve.
    """

    def __init__(self, reactor: IClientReactor) -> None:
        self._reactor = reactor
        self._endpoints: dict[tuple[bytes, bytes, int], IStreamClientEndpoint] = {}
        self._tls = BrowserLikePolicyForHTTPS()

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        key = (uri.scheme, uri.host, uri.port)
        endpoint = self._endpoints.get(key)
        if endpoint is None:
            host = uri.host.decode("ascii")
            if isIPAddress(host):
                endpoint = TCP4ClientEndpoint(self._reactor, host, uri.port)
            elif isIPv6Address(host):
                endpoint = TCP6ClientEndpoint(self._reactor, host, uri.port)
            else:
                endpoint = HostnameEndpoint(self._reactor, uri.host, uri.port)
            if uri.scheme == b"https":
                endpoint = wrapClientTLS(self._tls.creatorForNetloc(uri.host, uri.port), endpoint)
            self._endpoints[key] = endpoint
        return endpoint


class _RelayClient(HTTPClient):
    """
    treq's client, with a short way for the requests the relay sends: unbuffered, no redirects,
    an in-memory body, ``Headers`` and an ``http://`` URL go to the pool's own lean client
    (`swapproxy.relayclient`), without treq's URL parsing, cookie and content-decoding layers or
    `Agent` (together most of swapproxy's CPU time per proxied request). No ``Accept-Encoding``
    is added (the relay drops the client's), so the body arrives as the upstream sent it. Any
    other request (health probes) takes treq's way.
    """

    def __init__(self, agent: Agent, cookiejar: CookieJar, pool: RelayPool) -> None:
        # treq types the jar as its own CookieJar subclass (treq.cookies, treq >= 26); any jar works.
        super().__init__(agent, cookiejar=cookiejar, data_to_body_producer=body_producer)  # type: ignore[arg-type]
        self._relay = pool.relay

    def request(self, method: str, url: Any, **kwargs: Any) -> Deferred[Any]:
        headers = kwargs.get("headers")
        data = kwargs.get("data")
        if (
            kwargs.get("unbuffered") is True
            and kwargs.get("allow_redirects") is False
            and set(kwargs) <= {"headers", "data", "unbuffered", "allow_redirects"}
            and isinstance(headers, Headers)
            and (data is None or isinstance(data, bytes))
            and isinstance(url, str)
            and url.startswith("http://")
            and url.isascii()
        ):
            return self._relay(method.encode("ascii"), url.encode("ascii"), headers, data)
        return super().request(method, url, **kwargs)


def make_http_client(reactor: IClientReactor, max_idle: int) -> tuple[HTTPClient, HTTPConnectionPool]:
    """
    An HTTP client with its own connection pool, no cookie memory and in-memory bodies.

    :param max_idle: how many idle connections the pool keeps.
    """
    pool = RelayPool(reactor, max(2, max_idle))
    pool.maxPersistentPerHost = max(2, max_idle)
    pool.retryAutomatically = False
    quiet_pool(pool)
    # A proxy must never replay one client's upstream cookies to another client.
    no_cookies = CookieJar(DefaultCookiePolicy(allowed_domains=[]))
    agent = Agent.usingEndpointFactory(reactor, _Endpoints(reactor), pool=pool)
    return _RelayClient(agent, no_cookies, pool), pool

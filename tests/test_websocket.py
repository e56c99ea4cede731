"""
Tests for `swapproxy.web.websocket`: websocket upgrades on ``/upstream/<model>/...`` relayed to a
model (the test's echo server on loopback), over real sockets; and ``upstream.ignorePaths``.
"""

from __future__ import annotations

import json
import sys
import textwrap
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from swapproxy.config import parse_config
from swapproxy.testing.local import LOOPBACK, fake_command, free_port_range
from tests.support.live import RunningProxy, TrackingFactory, start_proxy
from tests.support.processes import wait_until

SLEEPER = f"{sys.executable} -c 'import time; time.sleep(120)'"
UPGRADE = (b"GET /upstream/%s HTTP/1.1\r\nHost: swapproxy\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
           b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")


async def metrics_text(proxy: RunningProxy) -> str:
    """
    ``GET /metrics``, as text.
    """
    response = await proxy.client.get(proxy.url + "/metrics")
    return (await response.content()).decode("utf-8")


class EchoServer(Protocol):
    """
    A model's websocket: answers the upgrade with 101 (400 for /refuse), then echoes in upper case;
    answers a plain request with 200.
    """

    heads: list[bytes]
    closed: list[Deferred[None]]

    def connectionMade(self) -> None:
        self.buffer = b""
        self.upgraded = False
        self.lost: Deferred[None] = Deferred()
        self.factory.closed.append(self.lost)

    def dataReceived(self, data: bytes) -> None:
        if self.upgraded:
            self.transport.write(data.upper())
            return
        self.buffer += data
        if b"\r\n\r\n" in self.buffer:
            head, _, rest = self.buffer.partition(b"\r\n\r\n")
            self.factory.heads.append(head)
            if b"upgrade: websocket" not in head.lower():
                self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                return
            if head.startswith(b"GET /refuse"):
                self.transport.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
                return
            self.upgraded = True
            self.transport.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                                 b"Connection: Upgrade\r\n\r\nWELCOME")
            if rest:
                self.transport.write(rest.upper())

    def connectionLost(self, reason: Failure) -> None:
        self.lost.callback(None)


class Client(Protocol):
    def connectionMade(self) -> None:
        self.received = b""
        self.closed = False
        self._waiters: list[Deferred[None]] = []

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def lost(self) -> Deferred[None]:
        """
        Fires once the connection has closed.
        """
        waiter: Deferred[None] = Deferred()
        if self.closed:
            waiter.callback(None)
        else:
            self._waiters.append(waiter)
        return waiter

    def connectionLost(self, reason: Failure) -> None:
        self.closed = True
        for waiter in self._waiters:
            waiter.callback(None)


class WebsocketTests(TestCase):
    timeout = 30

    def serve(self, **model: Any) -> tuple[RunningProxy, Any]:
        echo = Factory.forProtocol(EchoServer)
        echo.heads, echo.closed = [], []
        tracking = TrackingFactory(echo)
        listening = reactor.listenTCP(0, tracking, interface=LOOPBACK)
        self.addCleanup(listening.stopListening)
        self.addCleanup(tracking.close_all)
        echo.close_all = tracking.close_all
        keys = {"cmd": SLEEPER, "checkEndpoint": "none", "proxy": f"http://{LOOPBACK}:{listening.getHost().port}"}
        keys.update(model)
        text = f"startPort: {free_port_range(2)}\nmodels:\n  ws: " + json.dumps(keys) + "\n  other: " + json.dumps({"cmd": fake_command()}) + "\n"
        return start_proxy(self, parse_config(text, "test.yaml", {})), echo

    async def connect(self, proxy: RunningProxy, path: bytes) -> Client:
        client = await TCP4ClientEndpoint(reactor, LOOPBACK, proxy.port).connect(Factory.forProtocol(Client))
        self.addCleanup(lambda: client.transport.abortConnection() or client.lost())
        client.transport.write(UPGRADE % path)
        return client

    async def test_upgrade_relayed_and_held(self) -> None:
        """
        The upgrade starts the model, the model's 101 and then its bytes reach the client, the
        client's reach the model; the websocket counts as in flight until it closes, and then
        the model's connection closes too.
        """
        proxy, echo = self.serve()
        client = await self.connect(proxy, b"ws/socket?x=1")
        await wait_until(lambda: b"WELCOME" in client.received, what="the 101 and the greeting")
        self.assertTrue(client.received.startswith(b"HTTP/1.1 101 Switching Protocols\r\n"))
        head = echo.heads[0]
        self.assertTrue(head.startswith(b"GET /socket?x=1 HTTP/1.1\r\n"), head)
        fields = dict(line.split(b": ", 1) for line in head.split(b"\r\n")[1:])
        fields = {name.lower(): value for name, value in fields.items()}
        self.assertEqual(fields[b"sec-websocket-key"], b"dGhlIHNhbXBsZSBub25jZQ==")
        self.assertEqual((fields[b"upgrade"], fields[b"connection"]), (b"websocket", b"Upgrade"))
        client.transport.write(b"hello")
        await wait_until(lambda: client.received.endswith(b"WELCOMEHELLO"), what="the echo")
        self.assertEqual((await proxy.running())["ws"]["in_flight"], 1)
        client.transport.loseConnection()
        await echo.closed[0]
        await wait_until(lambda: proxy.supervisor.in_flight["ws"] == 0, what="the websocket released")
        # The connection is swapproxy's again for nothing: a new request works as ever.
        listing = await proxy.get_json("/v1/models")
        self.assertIn("ws", {r["id"] for r in listing["data"]})
        # The activity history, the metrics and the request log (one event feeds them all) name
        # the websocket's model.
        rows = (await proxy.get_json("/api/activity"))["data"]
        self.assertEqual([(r["path"], r["model"]) for r in rows], [("/upstream", "ws")])
        counted = [line for line in (await metrics_text(proxy)).splitlines()
                   if line.startswith("swapproxy_requests_total{")]
        self.assertEqual(len(counted), 1, counted)
        self.assertTrue(counted[0].startswith('swapproxy_requests_total{model="ws",route="/upstream",'), counted)

    async def test_model_closes(self) -> None:
        """
        When the model closes the websocket, the client's connection closes too.
        """
        proxy, echo = self.serve()
        client = await self.connect(proxy, b"ws/socket")
        await wait_until(lambda: b"WELCOME" in client.received, what="the 101")
        await echo.close_all()
        await client.lost()
        await wait_until(lambda: proxy.supervisor.in_flight["ws"] == 0, what="the websocket released")

    async def test_refused_upgrade_is_502(self) -> None:
        proxy, echo = self.serve()
        client = await self.connect(proxy, b"ws/refuse")
        await wait_until(lambda: b"HTTP 400" in client.received, what="the answer")
        self.assertTrue(client.received.startswith(b"HTTP/1.1 502 "), client.received)
        self.assertIn(b"model 'ws' refused the websocket upgrade: HTTP 400", client.received)
        self.assertEqual(proxy.supervisor.in_flight["ws"], 0)

    async def test_ignore_websockets(self) -> None:
        """
        With compat.ignoreWebsockets, a websocket does not start the model (409) and does not
        count as in flight.
        """
        proxy, echo = self.serve(compat={"ignoreWebsockets": True})
        client = await self.connect(proxy, b"ws/socket")
        await wait_until(lambda: b"ignoreWebsockets" in client.received, what="the answer")
        self.assertTrue(client.received.startswith(b"HTTP/1.1 409 "), client.received)
        self.assertIn(b"(compat.ignoreWebsockets)", client.received)
        self.assertEqual(echo.heads, [])
        self.assertEqual(proxy.supervisor.upstreams["ws"].state.value, "stopped")
        response = await proxy.client.get(proxy.url + "/upstream/ws/start")  # a plain request starts it
        await response.content()
        client = await self.connect(proxy, b"ws/socket")
        await wait_until(lambda: b"WELCOME" in client.received, what="the 101")
        self.assertEqual(proxy.supervisor.in_flight["ws"], 0)


class IgnorePathsTests(TestCase):
    timeout = 30

    async def test_static_paths_do_not_start_a_model(self) -> None:
        text = f"startPort: {free_port_range(1)}\n" + textwrap.dedent("""
            upstream: {ignorePaths: ['^/ws$', '\\.png$']}
            models:
              m: {cmd: %s}
        """) % json.dumps(fake_command())
        proxy = start_proxy(self, parse_config(text, "test.yaml", {}))
        for path in ("/upstream/m/ws", "/upstream/m/img/logo.png"):
            response = await proxy.client.get(proxy.url + path)
            answer = json.loads(await response.content())
            self.assertEqual(response.code, 409)
            self.assertIn("upstream.ignorePaths", answer["error"]["message"])
        self.assertEqual(proxy.supervisor.upstreams["m"].state.value, "stopped")
        # The activity history, the metrics and the request log name the model of each 409.
        rows = (await proxy.get_json("/api/activity"))["data"]
        self.assertEqual([(r["model"], r["status"]) for r in rows], [("m", 409), ("m", 409)])
        self.assertIn('swapproxy_requests_total{model="m",route="/upstream",status="409"} 2.0',
                      await metrics_text(proxy))
        response = await proxy.client.get(proxy.url + "/upstream/m/health")
        await response.content()
        self.assertEqual(response.code, 200)
        response = await proxy.client.get(proxy.url + "/upstream/m/img/logo.png")
        await response.content()
        self.assertNotEqual(response.code, 409)  # ready now: passed on

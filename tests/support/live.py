"""
swapproxy served by this process on loopback, for the tests that need the real reactor and real
sockets: configs that run ``tests/fake_upstream.py``, log capture, the server (`start_proxy`) and
treq and openai clients of it.

Everything listens on 127.0.0.1 only. Everything started here is stopped by a cleanup registered
on the test case that started it.
"""

from __future__ import annotations

import json
import os
import textwrap
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import yaml
from treq.client import HTTPClient
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.logger import ILogObserver, LogEvent, globalLogPublisher
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool
from zope.interface import implementer

from swapproxy.config import Config
from swapproxy.peers import PeerSet
from swapproxy.supervisor import Supervisor
from swapproxy.testing.local import LOOPBACK, free_port_range
from swapproxy.web.root import build_site
from swapproxy.web.sse import LOADING_TEXT_END, LOADING_TEXT_START

if TYPE_CHECKING:
    import openai


# -- configs ----------------------------------------------------------------------------------


def config_yaml(models: Mapping[str, Mapping[str, Any]], **top: Any) -> str:
    """
    A config document for ``models`` (model id -> model keys), on a fresh free port range.

    :param top: top-level keys; ``startPort`` and ``healthCheckTimeout`` have test defaults.
    """
    document: dict[str, Any] = {
        "healthCheckTimeout": 15,
        "startPort": free_port_range(len(models) + 2),
        "unloadTimeout": 2,
    }
    document.update(top)
    document["models"] = {model_id: dict(keys) for model_id, keys in models.items()}
    return yaml.safe_dump(document, sort_keys=False)


def write_config(testcase: Any, text: str, name: str = "config.yaml") -> str:
    """
    Write a config file (``text``, dedented) into a new temporary directory of the test's;
    returns its path.
    """
    directory = testcase.mktemp()
    os.makedirs(directory)
    path = os.path.abspath(os.path.join(directory, name))
    with open(path, "w", encoding="utf-8") as f:
        f.write(textwrap.dedent(text))
    return path


class ConfigFileMixin:
    """
    For test cases that write config files: `write_config` as a method.
    """

    def write_config(self, text: str, name: str = "config.yaml") -> str:
        return write_config(self, text, name)


# -- log capture ------------------------------------------------------------------------------


@implementer(ILogObserver)
class LogCapture:
    """
    Collects every log event while it is attached to the global log publisher.
    """

    def __init__(self) -> None:
        self.events: list[LogEvent] = []

    def __call__(self, event: LogEvent) -> None:
        self.events.append(event)

    def lines(self, model_id: str) -> list[str]:
        """
        The output lines of ``model_id``'s children, in order.
        """
        namespace = "upstream." + model_id
        return [e["line"] for e in self.events if e.get("log_namespace") == namespace and "line" in e]

    def messages(self, fragment: str) -> list[LogEvent]:
        """
        swapproxy's own events whose format contains ``fragment``.
        """
        return [e for e in self.events if fragment in (e.get("log_format") or "")]


def capture_logs(testcase: TestCase) -> LogCapture:
    """
    Capture the log events of the rest of this test.
    """
    capture = LogCapture()
    globalLogPublisher.addObserver(capture)
    testcase.addCleanup(globalLogPublisher.removeObserver, capture)
    return capture


# -- swapproxy in this process ----------------------------------------------------------------


class _TrackedProtocol(ProtocolWrapper):
    def connectionLost(self, reason: Failure) -> None:
        super().connectionLost(reason)
        self.factory.lost(self)


class TrackingFactory(WrappingFactory):
    """
    A factory wrapper that knows its open connections and can close them all.
    """

    protocol = _TrackedProtocol

    def __init__(self, wrapped: Any) -> None:
        super().__init__(wrapped)
        self._closing: dict[Any, Deferred[None]] = {}

    def lost(self, protocol: Any) -> None:
        waiter = self._closing.pop(protocol, None)
        if waiter is not None:
            waiter.callback(None)

    def close_all(self) -> Deferred[Any]:
        """
        Drop every open connection; fires when they are all closed.
        """
        waits = []
        for protocol in list(self.protocols):
            waiter: Deferred[None] = Deferred()
            self._closing[protocol] = waiter
            waits.append(waiter)
            protocol.transport.abortConnection()
        return DeferredList(waits)


class RunningProxy:
    """
    swapproxy served by this process on a loopback port, and a treq client for it.
    """

    def __init__(self, supervisor: Supervisor, port: int, client: HTTPClient, logs: LogCapture) -> None:
        self.supervisor = supervisor
        self.port = port
        self.url = f"http://{LOOPBACK}:{port}"
        self.client = client
        self.logs = logs

    async def post_json(self, path: str, body: Mapping[str, Any]) -> tuple[int, Any]:
        """
        POST a JSON body; returns the status and the decoded JSON answer.
        """
        response = await self.client.post(
            self.url + path,
            data=json.dumps(body).encode("utf-8"),
            headers={b"content-type": [b"application/json"]},
        )
        content = await response.content()
        return response.code, json.loads(content)

    async def chat(self, model: str, **fields: Any) -> tuple[int, Any]:
        """
        A non-streaming chat completion for ``model``; ``fields`` go into the body.
        """
        return await post_chat(self.client, self.url, model, **fields)

    async def get_json(self, path: str) -> Any:
        response = await self.client.get(self.url + path)
        assert response.code == 200, (path, response.code)
        return json.loads(await response.content())

    async def running(self) -> dict[str, dict[str, Any]]:
        """
        ``GET /running`` as a mapping of model id to its entry.
        """
        listing = await self.get_json("/running")
        return {entry["model"]: entry for entry in listing["running"]}


class LoopbackClient(Protocol):
    """
    A raw client on a real loopback connection: writes ``request`` (bytes a well-behaved client
    might not send), keeps what comes back and, when ``hang_up_at`` is given, drops the
    connection as soon as those bytes have arrived.

    :ivar received: every byte received.
    :ivar hung_up: whether it dropped the connection at ``hang_up_at``.
    :ivar done: fires with ``received`` when the connection has ended.
    """

    def __init__(self, request: bytes, hang_up_at: bytes | None = None) -> None:
        self._request = request
        self._hang_up_at = hang_up_at
        self.received = b""
        self.hung_up = False
        self.done: Deferred[bytes] = Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self._request)

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if self._hang_up_at is not None and not self.hung_up and self._hang_up_at in self.received:
            self.hung_up = True
            self.transport.abortConnection()

    def connectionLost(self, reason: Failure) -> None:
        self.done.callback(self.received)


async def connect_raw(
    port: int, request: bytes, hang_up_at: bytes | None = None, testcase: TestCase | None = None
) -> LoopbackClient:
    """
    A `LoopbackClient` connected to ``port``.

    :param testcase: when given, the connection is dropped when the test ends, if it is still open.
    """
    client = LoopbackClient(request, hang_up_at)
    await connectProtocol(TCP4ClientEndpoint(reactor, LOOPBACK, port), client)
    if testcase is not None:
        testcase.addCleanup(lambda: client.transport.abortConnection() if client.transport.connected else None)
    return client


def make_client(testcase: TestCase) -> tuple[HTTPClient, HTTPConnectionPool]:
    """
    A treq client with a connection pool of its own, closed when the test ends (closing it
    earlier is fine).
    """
    pool = HTTPConnectionPool(reactor, persistent=True)
    testcase.addCleanup(pool.closeCachedConnections)
    return HTTPClient(Agent(reactor, pool=pool)), pool


def start_proxy(testcase: TestCase, config: Config) -> RunningProxy:
    """
    Serve ``config`` with a real `Supervisor` on a loopback port.

    The cleanups close the client pool and every server connection, stop listening, close the
    connections to peers, and stop the supervisor, which waits until every child has exited.
    """
    logs = capture_logs(testcase)
    supervisor = Supervisor(config, reactor)
    supervisor.startService()
    testcase.addCleanup(supervisor.stopService)
    peers = PeerSet(lambda: supervisor.config, reactor)
    peers.startService()
    testcase.addCleanup(peers.stopService)
    factory = TrackingFactory(build_site(supervisor, reactor, peers=peers))
    listening = reactor.listenTCP(0, factory, interface=LOOPBACK)
    testcase.addCleanup(listening.stopListening)
    testcase.addCleanup(factory.close_all)
    client, _ = make_client(testcase)
    return RunningProxy(supervisor, listening.getHost().port, client, logs)


def openai_client(url: str) -> openai.OpenAI:
    """
    An openai SDK client of swapproxy at ``url``: no retries, a 60 s timeout. Use it in a thread.
    """
    import openai

    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)


def visible(text: str) -> str:
    """
    ``text`` without the invisible markers around swapproxy's loading text.
    """
    return text.replace(LOADING_TEXT_START, "").replace(LOADING_TEXT_END, "")


def loading_status(chunk: Any) -> dict[str, Any] | None:
    """
    swapproxy's status object of a loading chunk (as the openai SDK parsed it), or ``None`` for a
    chunk of the model's own.
    """
    status = (chunk.model_extra or {}).get("swapproxy")
    return status if isinstance(status, dict) else None


async def post_chat(client: HTTPClient, base_url: str, model: str, **fields: Any) -> tuple[int, Any]:
    """
    A non-streaming chat completion through ``client``.
    """
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
    body.update(fields)
    response = await client.post(
        base_url + "/v1/chat/completions",
        data=json.dumps(body).encode("utf-8"),
        headers={b"content-type": [b"application/json"]},
    )
    return response.code, json.loads(await response.content())


"""
Differential testing: the same request sent to a real llama-server directly and to swapproxy, and
what a client would notice compared (status, the headers that matter, the shape of the body).

`Differential.both` sends a request through swapproxy first (which may load the model) and then
directly; `shape` reduces a JSON document to its structure (keys, and the type of each value),
which is what a client's parser depends on when the values (ids, timings, tokens) differ;
`cors_allows` and `preflight_allows` say, as the Fetch standard's CORS check does, whether a
browser page of an origin could read an answer or send a request, which is what the
``Access-Control-*`` headers mean, whatever their spelling.

`LlamaServerProcess` runs a llama-server of the test's own (single-model or router mode) on a
loopback port, and kills it and everything it started when the test ends.
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Mapping, Sequence
from typing import Any

import attrs
import psutil
from treq.client import HTTPClient
from twisted.internet import reactor
from twisted.internet.defer import Deferred, succeed
from twisted.internet.protocol import ProcessProtocol, Protocol
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase
from twisted.web.http_headers import Headers

from swapproxy.testing.local import LOOPBACK, free_port
from tests.support.live import make_client
from tests.support.processes import kill_all, survivors, wait_until


@attrs.frozen
class Answer:
    """
    One HTTP answer, read whole.
    """

    status: int
    headers: Headers
    body: bytes

    def header(self, name: str) -> str | None:
        values = self.headers.getRawHeaders(name.encode("ascii"))
        return None if values is None else ", ".join(v.decode("latin-1") for v in values)

    @property
    def media_type(self) -> str | None:
        value = self.header("content-type")
        return None if value is None else value.split(";")[0].strip().lower()

    def json(self) -> Any:
        return json.loads(self.body)

    def events(self) -> list[Any]:
        """
        The ``data:`` payloads of an event-stream body, JSON decoded (``[DONE]`` as a string).
        """
        found = []
        for line in self.body.decode("utf-8").replace("\r\n", "\n").split("\n"):
            if line.startswith("data:"):
                data = line[5:].strip()
                found.append(data if data == "[DONE]" else json.loads(data))
        return found


def shape(value: Any) -> Any:
    """
    The structure of a JSON value: objects keep their keys, arrays the shape of their first
    element, and every scalar becomes the name of its JSON type.
    """
    if isinstance(value, dict):
        return {key: shape(item) for key, item in value.items()}
    if isinstance(value, list):
        return [shape(item) for item in value[:1]]
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    return "null"


def _values(answer: Answer, name: str) -> list[str]:
    return [v.decode("latin-1").strip() for v in answer.headers.getRawHeaders(name.encode("ascii"), [])]


def cors_allows(answer: Answer, origin: str, credentials: bool) -> bool:
    """
    Whether a page of ``origin`` may read ``answer`` (the Fetch standard's CORS check).

    :param credentials: whether the page sent its request with credentials (cookies, HTTP
        authentication), which a ``*`` does not allow.
    """
    allowed = _values(answer, "access-control-allow-origin")
    if len(allowed) != 1:
        return False
    if allowed[0] == "*" and not credentials:
        return True
    if allowed[0] != origin:
        return False
    return not credentials or _values(answer, "access-control-allow-credentials") == ["true"]


def preflight_allows(answer: Answer, origin: str, method: str, headers: Sequence[str], credentials: bool) -> bool:
    """
    Whether a browser, having sent a preflight and got ``answer``, goes on with the request.
    """
    if not 200 <= answer.status < 300 or not cors_allows(answer, origin, credentials):
        return False
    methods = {m.strip().upper() for v in _values(answer, "access-control-allow-methods") for m in v.split(",")}
    if method.upper() not in methods | {"GET", "HEAD", "POST"} and ("*" not in methods or credentials):
        return False
    names = {h.strip().lower() for v in _values(answer, "access-control-allow-headers") for h in v.split(",")}
    for name in (h.lower() for h in headers):
        wildcard = "*" in names and not credentials and name != "authorization"
        if name not in names and not wildcard:
            return False
    return True


class _Collector(Protocol):
    def __init__(self) -> None:
        self.data = bytearray()
        self.done: Deferred[None] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Failure) -> None:
        self.done.callback(None)

    def stop(self) -> Deferred[None]:
        if not self.done.called and self.transport is not None:
            self.transport.stopProducing()
        return self.done


class EventReader:
    """
    An endless event stream, read as it arrives, until `close`.
    """

    def __init__(self, response: Any) -> None:
        self.status = response.code
        self.headers = response.headers
        self._collector = _Collector()
        response.deliverBody(self._collector)

    def answer(self) -> Answer:
        """
        What arrived so far.
        """
        return Answer(self.status, self.headers, bytes(self._collector.data))

    def close(self) -> Deferred[None]:
        return self._collector.stop()


class Differential:
    """
    Sends requests to llama-server directly and to swapproxy, and compares what comes back.

    :param direct: llama-server's base URL.
    :param proxied: swapproxy's base URL.
    """

    def __init__(self, testcase: TestCase, direct: str, proxied: str) -> None:
        self.testcase = testcase
        self.direct = direct
        self.proxied = proxied
        self.client, _ = make_client(testcase)

    async def send(self, url: str, method: str, body: Any = None, headers: Mapping[str, str] | None = None) -> Answer:
        data = json.dumps(body).encode("utf-8") if isinstance(body, (dict, list)) else body
        sent = {k.encode("ascii"): [v.encode("latin-1")] for k, v in (headers or {}).items()}
        if isinstance(body, (dict, list)):
            sent.setdefault(b"content-type", [b"application/json"])
        response = await self.client.request(method, url, data=data, headers=sent, unbuffered=True)
        content = await response.content()
        return Answer(response.code, response.headers, content)

    async def both(
        self,
        method: str,
        path: str,
        body: Any = None,
        headers: Mapping[str, str] | None = None,
        proxied_path: str | None = None,
    ) -> tuple[Answer, Answer]:
        """
        The answers of llama-server and of swapproxy (asked first, so that it may load the model)
        to the same request.

        :param proxied_path: the path to ask swapproxy, when it differs (``/upstream/...``).
        """
        proxied = await self.send(self.proxied + (proxied_path or path), method, body, headers)
        direct = await self.send(self.direct + path, method, body, headers)
        return direct, proxied

    async def events(self, base: str, path: str) -> EventReader:
        response = await self.client.get(base + path, unbuffered=True)
        reader = EventReader(response)
        self.testcase.addCleanup(reader.close)
        return reader

    def assertSame(self, direct: Answer, proxied: Answer, what: str, body_shape: bool = True) -> None:
        """
        Same status, same media type, and (for JSON) the same body shape.
        """
        test: Any = self.testcase
        context = (f"{what}:\ndirect  {direct.status} {direct.body[:300]!r}"
                   f"\nproxied {proxied.status} {proxied.body[:300]!r}")
        test.assertEqual(proxied.status, direct.status, context)
        test.assertEqual(proxied.media_type, direct.media_type, context)
        if body_shape and direct.media_type == "application/json":
            test.assertEqual(shape(proxied.json()), shape(direct.json()), context)


class _Quiet(ProcessProtocol):
    def __init__(self) -> None:
        self.output = bytearray()
        self.ended: Deferred[None] = Deferred()
        self.exited = False

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        self.output = (self.output + data)[-20000:]

    def processEnded(self, reason: Failure) -> None:
        self.exited = True
        self.ended.callback(None)


class LlamaServerProcess:
    """
    A llama-server of the test's own, on a free loopback port; stopped, with everything it
    started, when the test ends.

    :param args: its arguments after ``--host``/``--port``.
    """

    def __init__(self, testcase: TestCase, binary: str, args: Sequence[str]) -> None:
        self.port = free_port()
        self.url = f"http://{LOOPBACK}:{self.port}"
        self._protocol = _Quiet()
        argv = [binary, "--host", LOOPBACK, "--port", str(self.port), *args]
        self._process = reactor.spawnProcess(self._protocol, binary, argv, env=dict(os.environ))
        testcase.addCleanup(self.stop)

    @property
    def output(self) -> str:
        return self._protocol.output.decode("utf-8", "replace")

    async def ready(self, client: HTTPClient) -> None:
        """
        Wait until it answers ``/health`` with 200 (a router does at once).
        """

        async def healthy() -> bool:
            if self._protocol.exited:
                raise AssertionError(f"llama-server exited before it was ready:\n{self.output}")
            try:
                response = await client.get(self.url + "/health", timeout=2)
                await response.content()
            except Exception:
                return False
            return response.code == 200

        await wait_until(healthy, timeout=30, what=f"llama-server on port {self.port}")

    def stop(self) -> Deferred[None]:
        if self._protocol.exited:
            return succeed(None)
        try:
            children = psutil.Process(self._process.pid).children(recursive=True)
        except psutil.Error:
            children = []
        self._process.signalProcess(signal.SIGKILL)

        def reap(_: None) -> None:
            kill_all(children)
            survivors(children)

        return self._protocol.ended.addCallback(reap)

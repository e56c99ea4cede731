"""
swapproxy's routes driven in memory: a treq client, swapproxy's real Resource tree and
`Supervisor`, and an in-memory upstream per model (`MemoryUpstream`) whose "process" starts and
stops when the test says and whose HTTP server is a Resource of the test's (`UpstreamServer`)
that records what it received. Both hops run over `RequestTraversalAgent`, so no socket and no
reactor is involved.
"""

from __future__ import annotations

import base64
import json
import textwrap
from collections import deque
from collections.abc import Callable
from typing import Any

import attrs
import treq
from prometheus_client.parser import text_string_to_metric_families
from treq.client import HTTPClient
from treq.testing import RequestTraversalAgent
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from swapproxy.config import ModelConfig, parse_config
from swapproxy.logbuffer import LogHistory, LogRouting
from swapproxy.stall import Stalled, StallWatch
from swapproxy.supervisor import Supervisor
from swapproxy.testing.upstreams import ScriptedUpstream
from swapproxy.upstream import StartError, State, _body_producer
from swapproxy.web.root import build_root, build_site
from tests.support.rawhttp import RawConnection

SWAPPROXY = "http://swapproxy.test"

CONFIG = """
    healthCheckTimeout: 15
    models:
      llama:
        cmd: llama-server --port ${PORT}
        name: "Llama 3.2 3B"
        description: "small and quick"
        aliases: [gpt-4o-mini, fast]
        metadata:
          context: 8192
          vision: false
      qwen:
        cmd: llama-server --port ${PORT}
        useModelName: Qwen/Qwen2.5-7B-Instruct
        aliases: [smart]
      whisper:
        cmd: whisper-server --port ${PORT}
      whisper-big:
        cmd: whisper-server --port ${PORT}
        useModelName: large-v3
      secret:
        cmd: llama-server --port ${PORT}
        unlisted: true
      org/model:
        cmd: llama-server --port ${PORT}
      org/model/big:
        cmd: llama-server --port ${PORT}
      limited:
        cmd: llama-server --port ${PORT}
        concurrencyLimit: 1
"""


#: Two models, one with an alias.
TWO_MODELS = """
    models:
      llama:
        cmd: llama-server --port ${PORT}
        aliases: [fast]
      qwen:
        cmd: llama-server --port ${PORT}
"""

#: `CONFIG` with two API keys; `KEY` is the second.
KEYS_CONFIG = CONFIG.replace(
    "healthCheckTimeout: 15", 'healthCheckTimeout: 15\n    apiKeys: ["sk-first-key", "sk-second"]'
)
KEY = "sk-second"


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


#: What llama-swap's modelStatus says of a model; swapproxy says it first, and then more.
LLAMA_SWAP_FIELDS = ("id", "name", "description", "state", "unlisted")


# -- the fake upstream side ------------------------------------------------------------------


@attrs.define
class Received:
    """
    One request as an upstream server saw it.
    """

    model: str
    method: bytes
    uri: bytes
    headers: Headers
    body: bytes
    request: Request
    finished: list[Any] = attrs.Factory(list)


def answer_json(request: Request, received: Received) -> bytes:
    """
    The default upstream answer: 200 with a small JSON body naming the server and path.
    """
    request.setHeader(b"content-type", b"application/json")
    return json.dumps({"served_by": received.model, "uri": received.uri.decode()}).encode()


def answer_later(request: Request, received: Received) -> int:
    """
    An upstream answer the test writes itself, through C{received.request}.
    """
    return NOT_DONE_YET


def answer_event_stream(request: Request, received: Received) -> int:
    """
    Start an SSE answer; the test writes the events through C{received.request}.
    """
    request.setHeader(b"content-type", b"text/event-stream")
    return NOT_DONE_YET


#: A chat completion as a model answers it, usage included.
CHAT_ANSWER = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18},
}


def answer_with(payload: dict[str, Any]) -> Any:
    def respond(request: Request, received: Received) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(payload).encode()

    return respond


class UpstreamServer:
    """
    What every fake upstream's HTTP server received, and how it answers.

    :ivar respond: called with the request and its L{Received}; returns what C{render} returns.
    """

    def __init__(self) -> None:
        self.received: list[Received] = []
        self.respond: Callable[[Request, Received], bytes | int] = answer_json

    def resource(self, model_id: str) -> Resource:
        return _ModelServer(self, model_id)


class _ModelServer(Resource):
    isLeaf = True

    def __init__(self, server: UpstreamServer, model_id: str) -> None:
        super().__init__()
        self._server = server
        self._model_id = model_id

    def render(self, request: Request) -> bytes | int:
        received = Received(
            model=self._model_id,
            method=request.method,
            uri=request.uri,
            headers=request.requestHeaders.copy(),
            body=request.content.read(),
            request=request,
        )
        request.notifyFinish().addBoth(received.finished.append)
        self._server.received.append(received)
        return self._server.respond(request, received)


class MemoryUpstream(ScriptedUpstream):
    """
    Stands in for L{swapproxy.upstream.Upstream}: a L{ScriptedUpstream} (its states and
    waiters) whose "process" starts, stops and prints when the test says, and whose HTTP server
    is an in-memory Resource. Unless the test says otherwise, a start is ready at once and a stop
    is over at once.

    :ivar auto_ready: whether a start becomes ready at once; otherwise the test calls
        L{become_ready} or L{fail_start}.
    :ivar start_error: when set, every start fails with it.
    """

    def __init__(
        self,
        model: ModelConfig,
        server: UpstreamServer,
        clock: Clock,
        siblings: dict[str, Any],
        events: list[tuple[str, str]],
    ) -> None:
        super().__init__(model, siblings, events)
        self.clock = clock
        self.output_observers: list[Callable[[Any, bytes], None]] = []
        self.recent_lines: deque[str] = deque(maxlen=50)
        self.agent = RequestTraversalAgent(server.resource(model.id))
        #: What C{client} becomes when the model is ready; tests may replace it.
        self.make_client: Callable[[], Any] = lambda: HTTPClient(self.agent, data_to_body_producer=_body_producer)
        self.auto_ready = True
        self.start_error: StartError | None = None
        #: The CPU seconds its "process" has used, as the stall watch reads them.
        self.cpu_seconds: float | None = 0.0
        self.exchanges = StallWatch(
            model.id,
            clock,
            lambda: self.model.hang_limits.stream_idle_timeout,
            lambda: self.cpu_seconds,
            lambda what: self.mark_unhealthy(what, "stream_idle"),
        )

    @property
    def starts(self) -> int:
        return self.start_count

    @property
    def stops(self) -> int:
        return len(self.stop_graces)

    def url_for(self, path: str) -> str:
        return "http://upstream.test" + path

    def emit(self, text: str) -> None:
        """
        The "process" prints ``text``: output observers see it as it is, line observers line by line.
        """
        for observer in list(self.output_observers):
            observer(self, text.encode())
        for line in text.splitlines():
            self.recent_lines.append(line)
            for line_observer in list(self.line_observers):
                line_observer(self, line)

    def become_ready(self) -> None:
        self.ready_at = self.clock.seconds()
        self.client = self.make_client()
        super().become_ready()

    def fail_start(self, reason: str | StartError = "process exited with exit code 1 while starting") -> StartError:
        self.client = None
        self.pid = None
        return super().fail_start(reason)

    def stop(self, grace: float | None = None) -> Deferred[None]:
        """
        As `ScriptedUpstream.stop`, and the "process" exits at once.
        """
        self.client = None
        stopped = super().stop(grace)
        if self.stopping:
            self.exited()
        return stopped

    def exited(self) -> None:
        """
        The model's "process" has gone: the end of a stop (an unhealthy model's), or a crash.
        """
        self.client = None
        super().exited()

    def crash(self) -> None:
        """
        The process of a ready model dies by itself.
        """
        assert self.state is State.READY, f"{self.model.id} is {self.state.value}, not ready"
        self.exited()

    def _spawn(self) -> None:
        self.started_at = self.clock.seconds()
        super()._spawn()
        if self.start_error is not None:
            self.fail_start(self.start_error)
        elif self.auto_ready:
            self.become_ready()

    def _hung(self, what: str, cause: str) -> None:
        self.exchanges.fail_all(Stalled(f"model {self.model.id!r} stopped responding: {what}", cause))


# -- the client side -------------------------------------------------------------------------


class Harness:
    """
    swapproxy's Resource tree over a real L{Supervisor} with L{MemoryUpstream}s, and a treq client.
    """

    def __init__(self, test: SynchronousTestCase, config_text: str = CONFIG, **tree: Any) -> None:
        self.test = test
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.config = parse_config(textwrap.dedent(config_text), "config.yaml", {})
        self.server = UpstreamServer()
        self.upstreams: dict[str, MemoryUpstream] = {}
        #: ``("start" | "stop" | "unhealthy" | "exited" | "failed", model_id)`` in the order they happened.
        self.events: list[tuple[str, str]] = []

        def factory(model: ModelConfig) -> Any:
            upstream = MemoryUpstream(model, self.server, self.clock, self.upstreams, self.events)
            self.upstreams[model.id] = upstream
            return upstream

        self.supervisor = Supervisor(self.config, self.clock, upstream_factory=factory)
        # tree: build_root's keyword arguments (logs, metrics).
        self.root = build_root(self.supervisor, self.clock, **tree)
        self.agent = RequestTraversalAgent(self.root)
        self.http = HTTPClient(self.agent, data_to_body_producer=_body_producer)

    @property
    def received(self) -> list[Received]:
        return self.server.received

    def connect(self, site: Any = None, port: int = 40000) -> RawConnection:
        """
        A raw client connection, from ``192.0.2.7:port``, to ``site``: by default swapproxy's real
        Site over this harness's supervisor.
        """
        if site is None:
            site = build_site(self.supervisor, self.clock)
        return RawConnection(site, self.flush, ("192.0.2.7", port))

    def flush(self) -> None:
        """
        Move every pending byte between client, swapproxy and the upstreams.
        """
        for _ in range(6):
            self.agent.flush()
            for upstream in self.upstreams.values():
                upstream.agent.flush()
        self.agent.flush()

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, Any] | None = None,
    ) -> Deferred[Any]:
        """
        Send a request to swapproxy; the Deferred fires with treq's unbuffered response.
        """
        d = self.http.request(
            method,
            SWAPPROXY + path,
            data=body,
            headers=headers,
            unbuffered=True,
            allow_redirects=False,
        )
        self.flush()
        return d

    def call(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, Any] | None = None,
    ) -> tuple[Any, bytes]:
        """
        Send a request to swapproxy and read the whole answer.
        """
        response = self.test.successResultOf(self.request(method, path, body, headers))
        return response, self.read(response)

    def read(self, response: Any) -> bytes:
        chunks: list[bytes] = []
        done = treq.collect(response, chunks.append)
        self.flush()
        self.test.successResultOf(done)
        return b"".join(chunks)

    def post_json(self, path: str, payload: Any, headers: dict[str, Any] | None = None) -> tuple[Any, bytes]:
        return self.call("POST", path, json.dumps(payload).encode(), headers or {"Content-Type": "application/json"})


def header(response: Any, name: bytes) -> list[bytes] | None:
    return response.headers.getRawHeaders(name)


def sample(body: bytes, name: str, **labels: str) -> float | None:
    """
    The value of the sample ``name`` whose labels include ``labels`` (None when absent).
    """
    for family in text_string_to_metric_families(body.decode("utf-8")):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    return None


def routed(test: SynchronousTestCase, log_to_stdout: str, history: LogHistory | None = None) -> LogHistory:
    """
    A history attached to the log routes with ``log_to_stdout`` until the test ends.
    """
    history = history if history is not None else LogHistory()
    routing = LogRouting(history, log_to_stdout)
    routing.startService()
    test.addCleanup(routing.stopService)
    return history


class ErrorAssertions:
    """
    Checks for OpenAI-style JSON errors.
    """

    def assertJSONError(
        self, response: Any, body: bytes, status: int, *fragments: str, error_type: str | None = None
    ) -> dict[str, Any]:
        """
        C{response} is a JSON C{{"error": {"message", "type", "code"}}} with C{status}, and the
        message contains every fragment.
        """
        test: Any = self
        test.assertEqual(response.code, status, body)
        test.assertEqual(header(response, b"content-type"), [b"application/json"])
        error = json.loads(body)["error"]
        test.assertEqual(sorted(error), ["code", "message", "type"])
        for fragment in fragments:
            test.assertIn(fragment, error["message"])
        if error_type is not None:
            test.assertEqual(error["type"], error_type)
        return error

"""
Tests for L{swapproxy.web}: the routes a client talks to, driven in memory.

A request goes from a treq client through swapproxy's real Resource tree and L{Supervisor} to
fake upstreams whose "process" starts and stops when the test says, and whose HTTP server is a
Resource of the test's (L{UpstreamServer}) that records what it received. Both hops run over
C{RequestTraversalAgent}, so no socket and no reactor is involved.
"""

from __future__ import annotations

import json
import textwrap
from collections import deque
from collections.abc import Callable
from typing import Any

import attrs
import treq
from treq.client import HTTPClient
from treq.testing import RequestTraversalAgent
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from swapproxy.config import ModelConfig, parse_config
from swapproxy.stall import Stalled, StallWatch
from swapproxy.supervisor import Supervisor
from swapproxy.upstream import StartError, State, _body_producer
from swapproxy.web.root import build_root

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


class FakeUpstream:
    """
    Stands in for L{swapproxy.upstream.Upstream}: the "process" is imaginary, its HTTP server is
    an in-memory Resource.

    :ivar auto_ready: whether a start becomes ready at once; otherwise the test calls
        L{become_ready} or L{fail_start}.
    :ivar start_error: when set, every start fails with it.
    """

    def __init__(self, model: ModelConfig, server: UpstreamServer, clock: Clock) -> None:
        self.model = model
        self.clock = clock
        self.state = State.STOPPED
        self.state_observers: list[Callable[[Any, State, State], None]] = []
        self.line_observers: list[Callable[[Any, str], None]] = []
        self.output_observers: list[Callable[[Any, bytes], None]] = []
        self.pid: int | None = None
        self.started_at: float | None = None
        self.ready_at: float | None = None
        self.healthy_at: float | None = None
        self.start_step: Any = None
        self.reports: dict[str, Callable[[], Any]] = {}
        self.health_status = ""
        self.last_error: StartError | None = None
        self.recent_lines: deque[str] = deque(maxlen=50)
        self.client: Any = None
        self.agent = RequestTraversalAgent(server.resource(model.id))
        #: What C{client} becomes when the model is ready; tests may replace it.
        self.make_client: Callable[[], Any] = lambda: HTTPClient(self.agent, data_to_body_producer=_body_producer)
        self.auto_ready = True
        self.start_error: StartError | None = None
        self.last_error: StartError | None = None
        self.starts = 0
        self.stops = 0
        self._waiters: list[Deferred[None]] = []
        self.unhealthy_reason: str | None = None
        self.hang_observers: list[Callable[[Any, str, str], None]] = []
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
    def running(self) -> bool:
        return self.state in (State.STARTING, State.READY, State.STOPPING, State.UNHEALTHY)

    @property
    def stopping(self) -> bool:
        return self.state in (State.STOPPING, State.UNHEALTHY)

    def mark_unhealthy(self, what: str, cause: str) -> None:
        """
        As `Upstream.mark_unhealthy`: fail the requests in flight, and stop; the "process" exits
        when the test calls L{exited}.
        """
        if self.state is not State.READY:
            return
        self.unhealthy_reason = what
        self.stops += 1
        self._set_state(State.UNHEALTHY)
        self.exchanges.fail_all(Stalled(f"model {self.model.id!r} stopped responding: {what}", cause))
        for observer in list(self.hang_observers):
            observer(self, cause, what)

    def exited(self) -> None:
        """
        The unhealthy model's process has gone.
        """
        self.client = None
        self.pid = None
        self._set_state(State.STOPPED)
        if self._waiters:
            self.starts += 1
            self.pid = 4000 + self.starts
            self.started_at = self.clock.seconds()
            self._set_state(State.STARTING)
            if self.auto_ready:
                self.become_ready()

    def url_for(self, path: str) -> str:
        return "http://upstream.test" + path

    def _set_state(self, new: State) -> None:
        old, self.state = self.state, new
        if old is not new:
            for observer in list(self.state_observers):
                observer(self, old, new)

    def start(self) -> Deferred[None]:
        if self.state is State.READY:
            return succeed(None)
        waiter: Deferred[None] = Deferred(lambda d: self._waiters.remove(d) if d in self._waiters else None)
        self._waiters.append(waiter)
        if self.state in (State.STOPPED, State.FAILED):
            self.starts += 1
            self.pid = 4000 + self.starts
            self.started_at = self.clock.seconds()
            self._set_state(State.STARTING)
            if self.start_error is not None:
                self.fail_start(self.start_error)
            elif self.auto_ready:
                self.become_ready()
        return waiter

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

    def crash(self) -> None:
        """
        The process of a ready model dies by itself.
        """
        self.client = None
        self.pid = None
        self._set_state(State.STOPPED)

    def become_ready(self) -> None:
        self.ready_at = self.clock.seconds()
        self.client = self.make_client()
        self._set_state(State.READY)
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(None)

    def reconfigure(
        self, model: ModelConfig, health_check_timeout: float, health_check_ceiling: float | None = None
    ) -> None:
        self.model = model

    def fail_start(self, error: StartError) -> None:
        self.last_error = error
        self.client = None
        self.pid = None
        self.last_error = error
        self._set_state(State.FAILED)
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.errback(error)

    def stop(self, grace: float | None = None) -> Deferred[None]:
        if self.running:
            self.stops += 1
            self.client = None
            self._set_state(State.STOPPING)
            self.pid = None
            self._set_state(State.STOPPED)
        return succeed(None)


# -- the client side -------------------------------------------------------------------------


class Harness:
    """
    swapproxy's Resource tree over a real L{Supervisor} with L{FakeUpstream}s, and a treq client.
    """

    def __init__(self, test: SynchronousTestCase, config_text: str = CONFIG, **tree: Any) -> None:
        self.test = test
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.config = parse_config(textwrap.dedent(config_text), "config.yaml", {})
        self.server = UpstreamServer()
        self.upstreams: dict[str, FakeUpstream] = {}

        def factory(model: ModelConfig) -> Any:
            upstream = FakeUpstream(model, self.server, self.clock)
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


def multipart(boundary: bytes, fields: list[tuple[bytes, bytes, bytes | None]]) -> bytes:
    """
    A multipart/form-data body: (name, value, filename-or-None) per part.
    """
    out = b""
    for name, value, filename in fields:
        out += b"--" + boundary + b"\r\n"
        disposition = b'Content-Disposition: form-data; name="' + name + b'"'
        if filename is not None:
            disposition += b'; filename="' + filename + b'"'
            out += disposition + b"\r\nContent-Type: application/octet-stream\r\n\r\n"
        else:
            out += disposition + b"\r\n\r\n"
        out += value + b"\r\n"
    return out + b"--" + boundary + b"--\r\n"


# -- the tests -------------------------------------------------------------------------------


class ModelSelectionTests(ErrorAssertions, SynchronousTestCase):
    """
    The inference routes pick the model named in the request body.
    """

    def setUp(self) -> None:
        self.h = Harness(self)

    def test_json_model_reaches_its_upstream(self) -> None:
        """
        A chat completion naming a model starts that model and gets its answer.
        """
        response, body = self.h.post_json("/v1/chat/completions", {"model": "llama", "messages": []})
        self.assertEqual(response.code, 200)
        self.assertEqual(json.loads(body), {"served_by": "llama", "uri": "/v1/chat/completions"})
        self.assertEqual(self.h.upstreams["llama"].starts, 1)
        self.assertEqual([r.model for r in self.h.received], ["llama"])

    def test_model_from_json_whatever_the_content_type(self) -> None:
        """
        The body is read as JSON whether the client says text/plain, form-urlencoded or nothing.
        """
        payload = json.dumps({"model": "llama", "prompt": "a=b&c=d"}).encode()
        for content_type in ["text/plain", "application/x-www-form-urlencoded", None]:
            headers = {"Content-Type": content_type} if content_type else {}
            response, body = self.h.call("POST", "/v1/completions", payload, headers)
            self.assertEqual(response.code, 200, (content_type, body))
            self.assertEqual(self.h.received[-1].model, "llama")
            self.assertEqual(self.h.received[-1].body, payload)
        self.assertEqual(len(self.h.received), 3)

    def test_every_inference_route_is_forwarded_to_the_same_path(self) -> None:
        """
        Each OpenAI, Anthropic and llama.cpp route reaches the same path upstream, query kept.
        """
        routes = [
            "/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/rerank",
            "/v1/reranking", "/rerank", "/v1/audio/speech", "/v1/messages",
            "/v1/messages/count_tokens", "/v1/responses", "/completion", "/infill",
        ]
        for route in routes:
            response, _ = self.h.post_json(route + "?beta=true", {"model": "llama"})
            self.assertEqual(response.code, 200, route)
            self.assertEqual(self.h.received[-1].uri, (route + "?beta=true").encode())

    def test_invalid_json(self) -> None:
        """
        A body that is not JSON is a 400 that says so, and no model starts.
        """
        response, body = self.h.call(
            "POST", "/v1/chat/completions", b'{"model": "llama",', {"Content-Type": "application/json"}
        )
        error = self.assertJSONError(response, body, 400, "not valid JSON", error_type="invalid_request_error")
        self.assertEqual(error["code"], "bad_request")
        self.assertEqual(self.h.upstreams["llama"].starts, 0)
        self.assertEqual(self.h.received, [])

    def test_empty_body(self) -> None:
        """
        An empty body is a 400 saying a JSON object with a model is expected.
        """
        response, body = self.h.call("POST", "/v1/chat/completions", b"", {"Content-Type": "application/json"})
        self.assertJSONError(response, body, 400, "empty", "model")
        self.assertEqual(self.h.received, [])

    def test_body_not_an_object(self) -> None:
        """
        A JSON array or string is a 400 naming what was sent.
        """
        for payload, kind in [([{"model": "llama"}], "list"), ("llama", "str")]:
            response, body = self.h.post_json("/v1/chat/completions", payload)
            self.assertJSONError(response, body, 400, "JSON object", kind)
        self.assertEqual(self.h.received, [])

    def test_missing_model(self) -> None:
        """
        A JSON object without a usable model field is a 400 naming the field.
        """
        for payload in [{"messages": []}, {"model": ""}, {"model": None}, {"model": ["llama"]}]:
            response, body = self.h.post_json("/v1/chat/completions", payload)
            self.assertJSONError(response, body, 400, "'model'")
        self.assertEqual(self.h.received, [])

    def test_unknown_model(self) -> None:
        """
        An unknown model is a 404 naming the models that exist, but not the unlisted ones.
        """
        response, body = self.h.post_json("/v1/chat/completions", {"model": "gpt-5"})
        error = self.assertJSONError(response, body, 404, "'gpt-5'", "llama", "qwen", "org/model/big")
        self.assertEqual(error["code"], "not_found")
        self.assertNotIn("secret", error["message"])
        self.assertEqual(sum(u.starts for u in self.h.upstreams.values()), 0)

    def test_unlisted_model_can_be_used(self) -> None:
        """
        Unlisted models are hidden from lists, not refused.
        """
        response, body = self.h.post_json("/v1/chat/completions", {"model": "secret"})
        self.assertEqual(response.code, 200, body)
        self.assertEqual(self.h.received[-1].model, "secret")

    def test_alias(self) -> None:
        """
        An alias runs its model; without useModelName the body goes upstream byte for byte.
        """
        payload = b'{ "model" : "gpt-4o-mini",\n  "messages": [{"role": "user", "content": "h\\u00e9"}] }'
        response, body = self.h.call(
            "POST", "/v1/chat/completions", payload, {"Content-Type": "application/json"}
        )
        self.assertEqual(response.code, 200, body)
        received = self.h.received[-1]
        self.assertEqual(received.model, "llama")
        self.assertEqual(received.body, payload)
        self.assertEqual(received.headers.getRawHeaders(b"content-length"), [str(len(payload)).encode()])

    def test_use_model_name_rewrites_the_model(self) -> None:
        """
        With useModelName the upstream sees that name in C{model}, the rest of the body intact,
        with a Content-Length that matches the new body.
        """
        messages = [{"role": "user", "content": "héllo ✓"}]
        response, body = self.h.post_json(
            "/v1/chat/completions", {"model": "smart", "messages": messages, "stream": False}
        )
        self.assertEqual(response.code, 200, body)
        received = self.h.received[-1]
        self.assertEqual(received.model, "qwen")
        self.assertEqual(
            json.loads(received.body),
            {"model": "Qwen/Qwen2.5-7B-Instruct", "messages": messages, "stream": False},
        )
        self.assertEqual(received.headers.getRawHeaders(b"content-length"), [str(len(received.body)).encode()])

    def test_swaps_to_the_requested_model(self) -> None:
        """
        Asking for another model stops the one running (the default group runs one at a time).
        """
        self.h.post_json("/v1/chat/completions", {"model": "llama"})
        response, _ = self.h.post_json("/v1/chat/completions", {"model": "qwen"})
        self.assertEqual(response.code, 200)
        self.assertEqual(self.h.upstreams["llama"].state, State.STOPPED)
        self.assertEqual(self.h.upstreams["qwen"].state, State.READY)
        self.assertEqual([r.model for r in self.h.received], ["llama", "qwen"])


class MultipartTests(ErrorAssertions, SynchronousTestCase):
    """
    C{/v1/audio/transcriptions} takes the model from the multipart form field C{model}.
    """

    boundary = b"----swapproxy-test-boundary"
    # Bytes that would break a careless rewrite: CRLFs, a fake header block, non-UTF-8.
    audio = b"RIFF\x00\x01\xff\xfe\r\n\r\nname=\"model\"\r\n" + bytes(range(256)) + b"\r\n--not-the-boundary"

    def setUp(self) -> None:
        self.h = Harness(self)

    def send(self, fields: list[tuple[bytes, bytes, bytes | None]]) -> tuple[Any, bytes, bytes]:
        body = multipart(self.boundary, fields)
        headers = {"Content-Type": "multipart/form-data; boundary=" + self.boundary.decode()}
        response, answer = self.h.call("POST", "/v1/audio/transcriptions", body, headers)
        return response, answer, body

    def test_model_field(self) -> None:
        """
        The form field picks the model; the body arrives unchanged.
        """
        response, answer, body = self.send(
            [(b"file", self.audio, b"clip.wav"), (b"model", b"whisper", None), (b"language", b"en", None)]
        )
        self.assertEqual(response.code, 200, answer)
        received = self.h.received[-1]
        self.assertEqual(received.model, "whisper")
        self.assertEqual(received.body, body)
        self.assertEqual(received.headers.getRawHeaders(b"content-length"), [str(len(body)).encode()])
        self.assertEqual(
            received.headers.getRawHeaders(b"content-type"),
            [b"multipart/form-data; boundary=" + self.boundary],
        )

    def test_use_model_name_rewrites_the_field_only(self) -> None:
        """
        With useModelName the model field is replaced; the file's bytes are intact.
        """
        response, answer, _ = self.send(
            [(b"model", b"whisper-big", None), (b"file", self.audio, b"clip.wav"), (b"language", b"en", None)]
        )
        self.assertEqual(response.code, 200, answer)
        received = self.h.received[-1]
        self.assertEqual(received.model, "whisper-big")
        expected = multipart(
            self.boundary,
            [(b"model", b"large-v3", None), (b"file", self.audio, b"clip.wav"), (b"language", b"en", None)],
        )
        self.assertEqual(received.body, expected)
        self.assertEqual(received.headers.getRawHeaders(b"content-length"), [str(len(expected)).encode()])

    def test_missing_model_field(self) -> None:
        """
        A form without a model field is a 400 naming the field.
        """
        response, answer, _ = self.send([(b"file", self.audio, b"clip.wav")])
        self.assertJSONError(response, answer, 400, "'model'")
        self.assertEqual(self.h.received, [])

    def test_unknown_model_field(self) -> None:
        """
        An unknown model in the form is a 404 naming the models that exist.
        """
        response, answer, _ = self.send([(b"model", b"whisper-tiny", None), (b"file", self.audio, b"a.wav")])
        self.assertJSONError(response, answer, 404, "'whisper-tiny'", "whisper")
        self.assertEqual(self.h.received, [])


class UpstreamPassthroughTests(ErrorAssertions, SynchronousTestCase):
    """
    C{/upstream/<model>/<path>} sends any request to C{<path>} on that model's server.
    """

    def setUp(self) -> None:
        self.h = Harness(self)

    def test_forwards_path_and_query(self) -> None:
        """
        The rest of the path and the query reach the model's server, for any method.
        """
        response, body = self.h.call("GET", "/upstream/llama/props?verbose=1&x=%20y")
        self.assertEqual(response.code, 200, body)
        received = self.h.received[-1]
        self.assertEqual((received.model, received.method, received.uri), ("llama", b"GET", b"/props?verbose=1&x=%20y"))
        response, body = self.h.call("DELETE", "/upstream/fast/slots/0")
        self.assertEqual(response.code, 200, body)
        self.assertEqual((self.h.received[-1].model, self.h.received[-1].method), ("llama", b"DELETE"))
        self.assertEqual(self.h.received[-1].uri, b"/slots/0")

    def test_body_forwarded_unchanged(self) -> None:
        """
        A body sent through /upstream is not parsed or rewritten, even with useModelName.
        """
        payload = b'{"model": "whatever", "x": 1}'
        response, _ = self.h.call("POST", "/upstream/qwen/v1/chat/completions", payload)
        self.assertEqual(response.code, 200)
        self.assertEqual(self.h.received[-1].model, "qwen")
        self.assertEqual(self.h.received[-1].body, payload)

    def test_model_names_with_slashes(self) -> None:
        """
        A model id may contain '/'; the longest configured name wins.
        """
        self.h.call("GET", "/upstream/org/model/health")
        self.assertEqual((self.h.received[-1].model, self.h.received[-1].uri), ("org/model", b"/health"))
        self.h.call("GET", "/upstream/org/model/big/health")
        self.assertEqual((self.h.received[-1].model, self.h.received[-1].uri), ("org/model/big", b"/health"))
        self.h.call("GET", "/upstream/org%2Fmodel%2Fbig/v1/models")
        self.assertEqual((self.h.received[-1].model, self.h.received[-1].uri), ("org/model/big", b"/v1/models"))

    def test_redirect_without_trailing_slash(self) -> None:
        """
        /upstream/<model> redirects to /upstream/<model>/: 301 for GET, 308 (keeps the method
        and body) for others, the query kept; nothing is started.
        """
        response, _ = self.h.call("GET", "/upstream/org/model/big?tab=1")
        self.assertEqual(response.code, 301)
        self.assertEqual(header(response, b"location"), [b"/upstream/org/model/big/?tab=1"])
        response, _ = self.h.call("POST", "/upstream/llama", b"{}")
        self.assertEqual(response.code, 308)
        self.assertEqual(header(response, b"location"), [b"/upstream/llama/"])
        self.assertEqual(self.h.received, [])
        self.assertEqual(sum(u.starts for u in self.h.upstreams.values()), 0)

    def test_trailing_slash_reaches_root(self) -> None:
        """
        /upstream/<model>/ is the root of the model's server.
        """
        response, _ = self.h.call("GET", "/upstream/llama/")
        self.assertEqual(response.code, 200)
        self.assertEqual(self.h.received[-1].uri, b"/")

    def test_dot_segments_rejected(self) -> None:
        """
        '..' and '.', plain or percent-encoded, cannot climb out of the model's path.
        """
        for path in [
            "/upstream/llama/../admin",
            "/upstream/llama/v1/%2e%2e/admin",
            "/upstream/llama/%2E%2E%2Fadmin",
            "/upstream/llama/./props",
            "/upstream/llama/..%5cadmin",
        ]:
            response, body = self.h.call("GET", path)
            self.assertJSONError(response, body, 400, "'..'")
        self.assertEqual(self.h.received, [])

    def test_unknown_model(self) -> None:
        """
        A path that names no model is a JSON 404 saying how the path is built.
        """
        response, body = self.h.call("GET", "/upstream/nope/health")
        self.assertJSONError(response, body, 404, "nope", "/upstream/<model>/<path>")
        response, body = self.h.call("GET", "/upstream/")
        self.assertJSONError(response, body, 404, "/upstream/<model>/<path>")
        self.assertEqual(self.h.received, [])


class RoutingTests(ErrorAssertions, SynchronousTestCase):
    """
    Methods, unknown paths and CORS preflights.
    """

    def setUp(self) -> None:
        self.h = Harness(self)

    def test_get_on_post_route(self) -> None:
        """
        GET on an inference route is a JSON 405 with C{Allow: POST}.
        """
        response, body = self.h.call("GET", "/v1/chat/completions")
        self.assertJSONError(response, body, 405, "GET", "POST")
        self.assertEqual(header(response, b"allow"), [b"POST"])

    def test_unknown_path(self) -> None:
        """
        A path swapproxy does not serve is a JSON 404 naming it.
        """
        for path in [
            "/v2/chat/completions", "/nothing", "/v1", "/api/models",
            "/v1/chat/completions/extra", "/v1/messages/count_tokens/x",
        ]:
            for method in ["GET", "POST"]:
                response, body = self.h.call(method, path, b"{}")
                self.assertJSONError(response, body, 404, path)
        self.assertEqual(self.h.received, [])

    def test_wrong_method_on_api_route(self) -> None:
        """
        A method an API route does not take is a JSON 405 that lists the allowed ones.
        """
        for path in ["/v1/models", "/health", "/running"]:
            response, body = self.h.call("POST", path, b"{}")
            self.assertJSONError(response, body, 405, "POST")
            self.assertIn(b"GET", header(response, b"allow")[0])
        response, body = self.h.call("DELETE", "/unload")
        self.assertJSONError(response, body, 405, "DELETE")
        self.assertEqual(self.h.upstreams["llama"].stops, 0)

    def test_head(self) -> None:
        """
        HEAD works where GET does.
        """
        response, body = self.h.call("HEAD", "/health")
        self.assertEqual((response.code, body), (200, b""))

    def test_trailing_slash_on_inference_route(self) -> None:
        """
        /v1/chat/completions/ is the same route.
        """
        response, _ = self.h.post_json("/v1/chat/completions/", {"model": "llama"})
        self.assertEqual(response.code, 200)

    def test_preflight(self) -> None:
        """
        OPTIONS on any path is a 204 preflight allowing the page's origin (the default policy
        allows any) and the headers asked for, minus any name that is not a valid header token.
        """
        for path in ["/v1/chat/completions", "/upstream/llama/x", "/nothing"]:
            response, body = self.h.call(
                "OPTIONS",
                path,
                headers={
                    "Origin": "https://app.example",
                    "Access-Control-Request-Method": "POST",
                    "Access-Control-Request-Headers": "Content-Type, X-Api-Key, bad header, <script>,,",
                },
            )
            self.assertEqual(response.code, 204, path)
            self.assertEqual(body, b"")
            self.assertEqual(header(response, b"access-control-allow-headers"), [b"Content-Type, X-Api-Key"])
            self.assertEqual(header(response, b"access-control-allow-origin"), [b"https://app.example"])
            self.assertIn(b"POST", header(response, b"access-control-allow-methods")[0])
        self.assertEqual(self.h.received, [])

    def test_preflight_default_headers(self) -> None:
        """
        Without Access-Control-Request-Headers, the usual headers are allowed.
        """
        response, _ = self.h.call("OPTIONS", "/v1/models")
        self.assertEqual(response.code, 204)
        allowed = header(response, b"access-control-allow-headers")[0].lower()
        self.assertIn(b"content-type", allowed)
        self.assertIn(b"authorization", allowed)


class ApiTests(ErrorAssertions, SynchronousTestCase):
    """
    swapproxy's own endpoints.
    """

    def setUp(self) -> None:
        self.h = Harness(self)

    def test_models_list(self) -> None:
        """
        /v1/models lists the listed models in id order, with llama-swap's extra fields.
        """
        response, body = self.h.call("GET", "/v1/models")
        self.assertEqual(response.code, 200)
        self.assertEqual(header(response, b"content-type"), [b"application/json"])
        self.assertIsNone(header(response, b"access-control-allow-origin"))
        listing = json.loads(body)
        self.assertEqual(listing["object"], "list")
        ids = [m["id"] for m in listing["data"]]
        self.assertEqual(ids, ["limited", "llama", "org/model", "org/model/big", "qwen", "whisper", "whisper-big"])
        llama = listing["data"][1]
        self.assertEqual(llama["object"], "model")
        self.assertEqual(llama["created"], 1_700_000_000)
        self.assertIsInstance(llama["owned_by"], str)
        self.assertEqual(llama["name"], "Llama 3.2 3B")
        self.assertEqual(llama["description"], "small and quick")
        self.assertEqual(llama["meta"], {"llamaswap": {"context": 8192, "vision": False}})
        qwen = listing["data"][4]
        self.assertNotIn("name", qwen)
        self.assertNotIn("meta", qwen)

    def test_one_model(self) -> None:
        """
        ``GET /v1/models/<id>`` answers that model's record alone, as OpenAI's retrieve call
        does (an id with ``/`` too); an unknown id is a JSON 404.
        """
        _, body = self.h.call("GET", "/v1/models")
        records = {record["id"]: record for record in json.loads(body)["data"]}
        for model_id in ("llama", "org/model/big"):
            response, body = self.h.call("GET", "/v1/models/" + model_id)
            self.assertEqual((response.code, json.loads(body)), (200, records[model_id]))
        response, body = self.h.call("GET", "/v1/models/org%2Fmodel")
        self.assertEqual((response.code, json.loads(body)["id"]), (200, "org/model"))
        response, body = self.h.call("GET", "/v1/models/nothing")
        self.assertJSONError(response, body, 404, "model 'nothing' not found")
        self.assertEqual(json.loads(body)["error"]["code"], "model_not_found")
        response, body = self.h.call("GET", "/v1/models/")
        self.assertEqual(len(json.loads(body)["data"]), len(records))

    def test_models_list_echoes_origin(self) -> None:
        """
        A browser's Origin is echoed so a web UI on another origin can read the list.
        """
        response, _ = self.h.call("GET", "/v1/models", headers={"Origin": "http://localhost:5173"})
        self.assertEqual(header(response, b"access-control-allow-origin"), [b"http://localhost:5173"])

    def test_health(self) -> None:
        response, body = self.h.call("GET", "/health")
        self.assertEqual((response.code, body), (200, b"OK"))

    def test_running(self) -> None:
        """
        /running lists each model that has a process, with its state.
        """
        response, body = self.h.call("GET", "/running")
        self.assertEqual((response.code, json.loads(body)), (200, {"running": []}))
        self.h.post_json("/v1/chat/completions", {"model": "fast"})
        self.h.clock.advance(5)
        _, body = self.h.call("GET", "/running")
        running = json.loads(body)["running"]
        self.assertEqual([(r["model"], r["state"]) for r in running], [("llama", "ready")])
        self.assertEqual(running[0]["pid"], self.h.upstreams["llama"].pid)
        self.assertEqual(running[0]["uptime"], 5.0)
        self.assertEqual(running[0]["in_flight"], 0)

    def test_running_shows_a_replaced_process_until_it_ends(self) -> None:
        """
        After a reload changed a model's command, /running lists its old process, marked
        replaced, while it finishes its request in flight; then the old process is gone.
        """
        lease = self.successResultOf(self.h.supervisor.request("llama").wait())
        old = self.h.upstreams["llama"]
        old_pid = old.pid
        changed = textwrap.dedent(CONFIG).replace(
            "cmd: llama-server --port ${PORT}\n    name:", "cmd: llama-server -m other.gguf --port ${PORT}\n    name:"
        )
        self.assertNotEqual(changed, textwrap.dedent(CONFIG))
        self.h.supervisor.reload(parse_config(changed, "config.yaml", {}))
        _, body = self.h.call("GET", "/running")
        running = json.loads(body)["running"]
        self.assertEqual([(r["model"], r["state"], r["pid"], r.get("replaced")) for r in running],
                         [("llama", "ready", old_pid, True)])
        lease.release()
        self.assertEqual(old.state, State.STOPPED)
        _, body = self.h.call("GET", "/running")
        self.assertEqual(json.loads(body), {"running": []})

    def test_running_shows_starting(self) -> None:
        """
        A model that is loading shows as starting, with the request waiting on it.
        """
        self.h.upstreams["llama"].auto_ready = False
        pending = self.h.request("POST", "/v1/chat/completions", b'{"model": "llama"}')
        _, body = self.h.call("GET", "/running")
        self.assertEqual([(r["model"], r["state"]) for r in json.loads(body)["running"]], [("llama", "starting")])
        self.assertNoResult(pending)
        self.h.upstreams["llama"].become_ready()
        self.h.flush()
        self.assertEqual(self.successResultOf(pending).code, 200)

    def test_unload_all(self) -> None:
        """
        /unload stops every running model.
        """
        self.h.post_json("/v1/chat/completions", {"model": "llama"})
        response, body = self.h.call("GET", "/unload")
        self.assertEqual((response.code, body), (200, b"OK"))
        self.assertEqual(self.h.upstreams["llama"].state, State.STOPPED)
        _, body = self.h.call("GET", "/running")
        self.assertEqual(json.loads(body), {"running": []})

    def test_api_unload_one_by_alias(self) -> None:
        """
        POST /api/models/unload/<alias> stops that model.
        """
        self.h.post_json("/v1/chat/completions", {"model": "llama"})
        response, body = self.h.call("POST", "/api/models/unload/fast")
        self.assertEqual(response.code, 200, body)
        self.assertEqual(json.loads(body)["unloaded"], "llama")
        self.assertEqual(self.h.upstreams["llama"].state, State.STOPPED)
        self.assertEqual(self.h.upstreams["llama"].stops, 1)

    def test_api_unload_with_slash_in_name(self) -> None:
        self.h.call("GET", "/upstream/org/model/big/health")
        response, body = self.h.call("POST", "/api/models/unload/org/model/big")
        self.assertEqual(response.code, 200, body)
        self.assertEqual(self.h.upstreams["org/model/big"].state, State.STOPPED)

    def test_api_unload_all(self) -> None:
        self.h.post_json("/v1/chat/completions", {"model": "qwen"})
        response, body = self.h.call("POST", "/api/models/unload")
        self.assertEqual(response.code, 200, body)
        self.assertEqual(json.loads(body)["unloaded"], "all")
        self.assertEqual(self.h.upstreams["qwen"].state, State.STOPPED)

    def test_api_unload_unknown(self) -> None:
        """
        Unloading an unknown model is a JSON 404; nothing is stopped.
        """
        self.h.post_json("/v1/chat/completions", {"model": "llama"})
        response, body = self.h.call("POST", "/api/models/unload/nope")
        self.assertJSONError(response, body, 404, "'nope'")
        self.assertEqual(self.h.upstreams["llama"].state, State.READY)

    def test_api_unload_needs_post(self) -> None:
        response, body = self.h.call("GET", "/api/models/unload/llama")
        self.assertJSONError(response, body, 405, "GET")
        self.assertEqual(header(response, b"allow"), [b"POST"])


class ScheduleErrorTests(ErrorAssertions, SynchronousTestCase):
    """
    What a client sees when the model cannot take its request.
    """

    def setUp(self) -> None:
        self.h = Harness(self)

    def test_concurrency_limit(self) -> None:
        """
        Beyond concurrencyLimit a request is a 429 JSON error with Retry-After; once the running
        request ends, the next one is accepted.
        """
        self.h.server.respond = answer_later
        first = self.h.request("POST", "/v1/chat/completions", b'{"model": "limited"}')
        self.assertEqual(len(self.h.received), 1)
        response, body = self.h.call("POST", "/v1/chat/completions", b'{"model": "limited"}')
        error = self.assertJSONError(response, body, 429, "limited", "concurrencyLimit", error_type="rate_limit_error")
        self.assertEqual(error["code"], "concurrency_limit")
        self.assertEqual(header(response, b"retry-after"), [b"1"])
        self.assertEqual(len(self.h.received), 1)

        self.h.received[0].request.write(b"{}")
        self.h.received[0].request.finish()
        self.h.flush()
        self.assertEqual(self.h.read(self.successResultOf(first)), b"{}")
        self.h.server.respond = answer_json
        response, _ = self.h.call("POST", "/v1/chat/completions", b'{"model": "limited"}')
        self.assertEqual(response.code, 200)

    def test_start_failure(self) -> None:
        """
        A model that fails to start is a 502 JSON error carrying the reason and its last output.
        """
        self.h.upstreams["llama"].start_error = StartError(
            "llama", "process exited with exit code 1 while starting", 1, ("error: failed to load model 'x.gguf'",)
        )
        response, body = self.h.post_json("/v1/chat/completions", {"model": "llama"})
        error = self.assertJSONError(
            response, body, 502, "llama", "exit code 1", "failed to load model 'x.gguf'", error_type="server_error"
        )
        self.assertEqual(error["code"], "model_start_failed")
        self.assertEqual(self.h.received, [])

    def test_start_failure_while_waiting(self) -> None:
        """
        Requests waiting on a start that fails all get the 502.
        """
        upstream = self.h.upstreams["llama"]
        upstream.auto_ready = False
        waiting = [self.h.request("POST", "/v1/chat/completions", b'{"model": "llama"}') for _ in range(2)]
        for d in waiting:
            self.assertNoResult(d)
        upstream.fail_start(StartError("llama", "health check timed out after 15s"))
        self.h.flush()
        for d in waiting:
            response = self.successResultOf(d)
            self.assertJSONError(response, self.h.read(response), 502, "timed out after 15s")
        self.assertEqual(upstream.starts, 1)

    def test_client_leaves_while_model_starts(self) -> None:
        """
        A client that gives up while the model loads does not stop the start for the others.
        """
        upstream = self.h.upstreams["llama"]
        upstream.auto_ready = False
        leaving = self.h.request("POST", "/v1/chat/completions", b'{"model": "llama"}')
        staying = self.h.request("POST", "/v1/chat/completions", b'{"model": "llama"}')
        self.assertEqual(self.h.supervisor.queued("llama"), 2)
        leaving.cancel()
        self.failureResultOf(leaving)
        self.h.flush()
        self.assertEqual(self.h.supervisor.queued("llama"), 1)
        self.assertEqual(upstream.state, State.STARTING)
        upstream.become_ready()
        self.h.flush()
        self.assertEqual(self.successResultOf(staying).code, 200)
        self.assertEqual(len(self.h.received), 1)
        self.assertEqual(self.h.supervisor.in_flight["llama"], 0)

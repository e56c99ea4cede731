"""
swapproxy's Site over a `Supervisor` of real `Upstream` objects whose children are fake processes
(`tests.support.reactors.ProcessReactor`: the test prints their llama-server lines and ends
them), on the fake reactor's clock; their health probes answer what the test says, and their HTTP
client is a fake whose responses the test writes (`UpstreamResponse`). For what depends on the
start itself: loading streams, progress, the board.
"""

from __future__ import annotations

import json
import os
import sys
import textwrap
from typing import Any

import attrs
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import LoopingCall
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import ResponseDone
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH

from swapproxy import upstream as upstream_module
from swapproxy.config import parse_config
from swapproxy.progress import LoadHistory
from swapproxy.supervisor import Lease, Supervisor
from swapproxy.upstream import State, Upstream
from swapproxy.web import forward as forward_module
from swapproxy.web.root import build_site
from tests.support.rawhttp import RawConnection
from tests.support.reactors import FakeProcess, ProcessReactor

#: The clock starts at a realistic Unix time, so that ``created`` is checkable.
EPOCH = 1_750_000_000

CHAT = "/v1/chat/completions"
MESSAGES = "/v1/messages"

STAGE_LINES = (
    "main: loading model\n"
    "srv    load_model: loading model '/models/qwen.gguf'\n"
    "llama_model_loader: loaded meta data with 20 key-value pairs and 291 tensors\n"
    "print_info: file format = GGUF V3 (latest)\n"
    "load_tensors: loading model tensors, this can take a while... (mmap = true)\n"
    "load_tensors:   CPU_Mapped model buffer size =  4685.30 MiB\n"
)
FAILURE_LINES = (
    "llama_model_load: error loading model: tensor 'blk.12.ffn_down.weight' data is not within the file bounds\n"
    "main: exiting due to model loading error\n"
    "error: failed to load model '/models/qwen.gguf'\n"
)


def config_text(extra_top: str = "", **models: str) -> str:
    """
    A config with one model per keyword (id -> extra model keys, as YAML lines).
    """
    lines = ["healthCheckTimeout: 120", "startPort: 5800", "sendLoadingState: true"]
    lines += [line for line in textwrap.dedent(extra_top).splitlines() if line.strip()]
    lines.append("models:")
    for model_id, keys in models.items():
        lines.append(f"  {model_id}:")
        lines.append(f"    cmd: {sys.executable} -m llama_server --port ${{PORT}} -m /models/{model_id}.gguf")
        lines += ["    " + line for line in textwrap.dedent(keys).splitlines() if line.strip()]
    return "\n".join(lines) + "\n"


# -- the upstream's HTTP side ------------------------------------------------------------------


class BodyTransport:
    """
    The transport of an upstream response body: the producer the relay registers.
    """

    def __init__(self) -> None:
        self.paused = False
        self.stopped = False

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False

    def stopProducing(self) -> None:
        self.stopped = True


class UpstreamResponse:
    """
    An upstream's answer, as treq's unbuffered response; the test writes its body.
    """

    def __init__(self, code: int, content_type: bytes | None, body: bytes = b"", complete: bool = True) -> None:
        self.code = code
        self.phrase = b"OK" if code == 200 else b"Error"
        self.headers = Headers({b"content-type": [content_type]} if content_type else {})
        self.length = len(body) if complete else UNKNOWN_LENGTH
        self.transport = BodyTransport()
        self.protocol: Any = None
        self._pending = body
        self._complete = complete

    def deliverBody(self, protocol: Any) -> None:
        self.protocol = protocol
        protocol.makeConnection(self.transport)
        if self._pending:
            protocol.dataReceived(self._pending)
        if self._complete:
            protocol.connectionLost(Failure(ResponseDone()))

    def send(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    def end(self, reason: Exception | None = None) -> None:
        self.protocol.connectionLost(Failure(reason or ResponseDone()))


@attrs.define
class UpstreamRequest:
    method: str
    url: str
    headers: Headers
    body: bytes | None
    answer: Deferred[Any]

    def json(self) -> Any:
        assert self.body is not None
        return json.loads(self.body)

    def respond(self, response: UpstreamResponse) -> UpstreamResponse:
        self.answer.callback(response)
        return response

    def stream(self) -> UpstreamResponse:
        """
        Answer 200 ``text/event-stream`` and leave the body open.
        """
        return self.respond(UpstreamResponse(200, b"text/event-stream", complete=False))


class UpstreamClient:
    """
    Stands in for the treq client an `Upstream` makes for its child: records each request.
    """

    def __init__(self, requests: list[UpstreamRequest]) -> None:
        self._requests = requests

    def request(self, method: str, url: str, headers: Headers | None = None, data: bytes | None = None,
                **kwargs: Any) -> Deferred[Any]:
        answer: Deferred[Any] = Deferred()
        self._requests.append(UpstreamRequest(method, url, headers or Headers(), data, answer))
        return answer


class Pool:
    def closeCachedConnections(self) -> Deferred[None]:
        return succeed(None)


# -- the harness -------------------------------------------------------------------------------


class ProcessHarness:
    """
    swapproxy's Site, a Supervisor of real `Upstream` objects with fake children, and a clock.
    """

    def __init__(self, testcase: SynchronousTestCase, config: str, history: LoadHistory | None = None) -> None:
        self.reactor = ProcessReactor().install(testcase)
        self.reactor.advance(EPOCH)
        self.health: dict[str, Any] = {}
        self.upstream_requests: list[UpstreamRequest] = []
        testcase.patch(upstream_module, "make_http_client",
                       lambda reactor, max_idle: (UpstreamClient(self.upstream_requests), Pool()))
        #: Fake processes that died and have not been reaped yet (`crash_unreaped`).
        self.unreaped: set[FakeProcess] = set()
        testcase.patch(forward_module, "process_gone", self._process_gone)
        self.config = parse_config(config, "test.yaml", {})

        def factory(model: Any) -> Upstream:
            return Upstream(model, self.reactor,
                            environ={"PATH": os.environ.get("PATH", os.defpath)}, health_probe=self._probe)

        self.supervisor = Supervisor(self.config, self.reactor, upstream_factory=factory)
        self.site = build_site(self.supervisor, self.reactor, history)

    def post(self, path: str, body: Any, headers: dict[str, str] | None = None, turn: bool = True) -> RawConnection:
        """
        A client POSTs ``body`` (JSON, unless it is bytes) to ``path`` on a connection of its own.

        :param turn: let the reactor take its next turn: a request that starts a model with the
            loading stream spawns it only once its first event is out, on a later turn (the
            harness's supervisor puts it off by 0 s).
        """
        connection = RawConnection(self.site)
        content = body if isinstance(body, bytes) else json.dumps(body).encode("utf-8")
        head = [f"POST {path} HTTP/1.1", "Host: swapproxy.test", "Content-Type: application/json",
                f"Content-Length: {len(content)}"]
        head += [f"{name}: {value}" for name, value in (headers or {}).items()]
        connection.send(("\r\n".join(head) + "\r\n\r\n").encode("ascii") + content)
        if turn:
            self.reactor.advance(0)
        return connection

    def _process_gone(self, upstream: Upstream) -> bool:
        mine = [p for p in self.reactor.spawned if p.pid is not None and p.pid == upstream.pid]
        return not mine or mine[0].ended or mine[0] in self.unreaped

    def crash_unreaped(self, model_id: str) -> FakeProcess:
        """
        The model's child dies, and swapproxy has not heard of it yet: the model still looks
        ready, but nothing answers on its port.
        """
        process = self.process(model_id)
        self.unreaped.add(process)
        return process

    def _probe(self, upstream: Upstream) -> Deferred[int]:
        answer = self.health.get(upstream.model.id, "refused")
        if answer == "refused":
            return fail(ConnectionRefusedError("connection refused"))
        return succeed(int(answer))

    def upstream(self, model_id: str) -> Upstream:
        return self.supervisor.upstreams[model_id]

    def process(self, model_id: str) -> FakeProcess:
        """
        The latest child process of ``model_id``.
        """
        mine = [p for p in self.reactor.spawned if f"/models/{model_id}.gguf" in p.args]
        assert mine, f"{model_id} was never started"
        return mine[-1]

    def prints(self, model_id: str, text: str) -> None:
        """
        The model's child prints ``text`` on stderr.
        """
        self.process(model_id).output(text.encode("utf-8"), fd=2)

    def become_ready(self, model_id: str) -> None:
        """
        The model's health check answers 200; its next probe makes it ready.
        """
        self.health[model_id] = 200
        self.advance(0.25)
        assert self.upstream(model_id).state is State.READY, self.upstream(model_id).state

    def advance(self, seconds: float, step: float = 0.25) -> None:
        """
        Let ``seconds`` pass, a tick at a time.
        """
        steps = round(seconds / step)
        assert abs(steps * step - seconds) < 1e-9, "advance by whole steps"
        for _ in range(steps):
            self.reactor.advance(step)

    def last_request(self) -> UpstreamRequest:
        assert self.upstream_requests, "nothing was sent upstream"
        return self.upstream_requests[-1]

    def tickers(self) -> list[Any]:
        """
        The loading-stream tickers that are scheduled.
        """
        return [call for call in self.reactor.getDelayedCalls() if isinstance(call.func, LoopingCall)]

    def lease(self, model_id: str) -> Lease:
        """
        A request in flight on ``model_id`` (started and made ready if needed).
        """
        leases: list[Lease] = []
        self.supervisor.request(model_id).wait().addCallback(leases.append)
        if not leases:
            self.become_ready(model_id)
        assert leases, f"no lease for {model_id}"
        return leases[0]


def chat_body(model: str = "qwen", stream: bool = True, **extra: Any) -> dict[str, Any]:
    body = {"model": model, "stream": stream, "messages": [{"role": "user", "content": "hi"}]}
    body.update(extra)
    return body


def messages_body(model: str = "qwen", stream: bool = True) -> dict[str, Any]:
    return {"model": model, "stream": stream, "max_tokens": 32, "messages": [{"role": "user", "content": "hi"}]}

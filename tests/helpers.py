"""
Helpers for the tests that run real processes and sockets: free ports, configs that run
``tests/fake_upstream.py``, swapproxy served in-process on loopback, and ``twistd swapproxy`` as a
child process.

Everything listens on 127.0.0.1 only. Everything started here is stopped by a cleanup registered
on the test case that started it.
"""

from __future__ import annotations

import json
import os
import random
import shlex
import signal
import socket
import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import psutil
import yaml
from treq.client import HTTPClient
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.process import ProcessReader
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import deferLater
from twisted.logger import ILogObserver, LogEvent, globalLogPublisher
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool
from zope.interface import implementer

from swapproxy.config import Config
from swapproxy.peers import PeerSet
from swapproxy.supervisor import Supervisor
from swapproxy.web.root import build_site
from swapproxy.web.sse import LOADING_TEXT_END, LOADING_TEXT_START

if TYPE_CHECKING:
    import openai

TESTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS)
FAKE_UPSTREAM = os.path.join(TESTS, "fake_upstream.py")
TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")
LOOPBACK = "127.0.0.1"


# -- ports ------------------------------------------------------------------------------------


def port_is_free(port: int) -> bool:
    """
    Whether nothing listens on ``127.0.0.1:port`` (and we may bind it).
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((LOOPBACK, port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """
    A loopback port that was free a moment ago.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def free_port_range(count: int) -> int:
    """
    The first of ``count`` consecutive free loopback ports, picked at random above 20000 so that
    test runs in parallel rarely meet (and below the usual ephemeral range, so that client sockets
    do not take them).
    """
    rng = random.Random()
    for _ in range(200):
        first = rng.randrange(20000, 32000 - count)
        if all(port_is_free(first + i) for i in range(count)):
            return first
    raise RuntimeError(f"no {count} consecutive free ports found above 20000")


# -- configs ----------------------------------------------------------------------------------


def fake_command(*args: str, quiet: bool = True) -> str:
    """
    A model ``cmd`` that runs the fake upstream on ``${PORT}`` with extra ``args``.
    """
    words = [shlex.quote(sys.executable), shlex.quote(FAKE_UPSTREAM), "--port", "${PORT}"]
    if quiet:
        words.append("--quiet")
    return " ".join(words + [shlex.quote(arg) for arg in args])


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


def write_config(testcase: TestCase, text: str) -> str:
    """
    Write a config file into the test's temporary directory; returns its path.
    """
    directory = testcase.mktemp()
    os.makedirs(directory)
    path = os.path.abspath(os.path.join(directory, "config.yaml"))
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return path


# -- processes --------------------------------------------------------------------------------


def alive(pid: int) -> bool:
    """
    Whether process ``pid`` exists and is not a zombie.
    """
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def survivors(processes: list[psutil.Process], grace: float = 3.0) -> list[psutil.Process]:
    """
    The processes among ``processes`` still alive after at most ``grace`` seconds.

    The grace only covers the kernel finishing a kill that was already sent: a process that
    nobody killed is still alive at the end of it.
    """
    _, still_alive = psutil.wait_procs(processes, timeout=grace)
    return [p for p in still_alive if alive(p.pid)]


def kill_all(processes: list[psutil.Process]) -> None:
    """
    SIGKILL whatever is left of ``processes``.
    """
    for proc in processes:
        try:
            proc.kill()
        except psutil.Error:
            pass


def fake_upstream_descendants(pid: int) -> list[psutil.Process]:
    """
    The descendants of ``pid`` (fake upstreams and anything they started).
    """
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def process_pipes_open() -> bool:
    """
    Whether the reactor still reads the pipes of a child process.
    """
    return any(isinstance(reader, ProcessReader) for reader in reactor.getReaders())


async def wait_until(predicate: Any, timeout: float = 10.0, step: float = 0.05, what: str = "condition") -> None:
    """
    Poll ``predicate`` (a function, maybe async) on the real clock until it is true.

    :raises AssertionError: when it is still false after ``timeout`` seconds.
    """
    deadline = reactor.seconds() + timeout
    while True:
        result = predicate()
        if isinstance(result, Deferred) or hasattr(result, "__await__"):
            result = await result
        if result:
            return
        if reactor.seconds() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        await deferLater(reactor, step)


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


# -- twistd swapproxy as a child process ------------------------------------------------------


class TwistdProcess(ProcessProtocol):
    """
    ``twistd -n swapproxy`` running as our child; collects its output.

    :ivar ended: fires with the exit code (or ``-signal``) when the process has exited.
    """

    def __init__(self) -> None:
        self.output = bytearray()
        self.ended: Deferred[int] = Deferred()
        self.exit_code: int | None = None
        self.pid: int | None = None

    def connectionMade(self) -> None:
        self.pid = self.transport.pid
        self.transport.closeStdin()

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        self.output += data

    def processEnded(self, reason: Failure) -> None:
        code = reason.value.exitCode
        if code is None:
            code = -(reason.value.signal or 0)
        self.exit_code = code
        self.ended.callback(code)

    @property
    def text(self) -> str:
        return self.output.decode("utf-8", "replace")

    def signal(self, signum: int) -> None:
        assert self.pid is not None
        os.kill(self.pid, signum)


def spawn_twistd(
    testcase: TestCase,
    config_path: str,
    port: int,
    cwd: str = REPO,
    state_dir: str | None = None,
    extra_args: tuple[str, ...] = (),
) -> TwistdProcess:
    """
    Run ``twistd -n --pidfile= swapproxy -c CONFIG -l tcp:PORT:interface=127.0.0.1 --state-dir DIR``.

    A cleanup kills it, and every process it left, if the test did not end it.

    :param state_dir: swapproxy's state directory; a fresh one in the test's temporary directory
        by default.
    :param extra_args: more swapproxy options.
    """
    process = TwistdProcess()
    state_dir = state_dir if state_dir is not None else os.path.abspath(testcase.mktemp())
    argv = [TWISTD, "-n", "--pidfile=", "swapproxy", "-c", config_path, "-l", f"tcp:{port}:interface={LOOPBACK}"]
    argv += ["--state-dir", state_dir, *extra_args]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    reactor.spawnProcess(process, TWISTD, argv, env=env, path=cwd)

    def cleanup() -> Deferred[Any]:
        if process.exit_code is not None:
            return succeed(None)
        assert process.pid is not None
        leftovers = fake_upstream_descendants(process.pid)
        os.kill(process.pid, signal.SIGKILL)
        kill_all(leftovers)
        return process.ended

    testcase.addCleanup(cleanup)
    return process


async def wait_for_http(client: HTTPClient, url: str, process: TwistdProcess, timeout: float = 30.0) -> None:
    """
    Wait until ``url`` answers 200, failing early if ``process`` exits.
    """

    async def up() -> bool:
        if process.exit_code is not None:
            raise AssertionError(f"twistd exited with {process.exit_code} before serving:\n{process.text}")
        try:
            response = await client.get(url, timeout=2)
            await response.content()
        except Exception:
            return False
        return response.code == 200

    await wait_until(up, timeout=timeout, what=f"{url} to answer")


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


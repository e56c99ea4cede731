"""
Real child processes: whether they live, killing what is left of them, and ``twistd swapproxy``
as a child of the test (`spawn_twistd`), killed with everything it started when the test ends.
"""

from __future__ import annotations

import os
import signal
from typing import Any

import psutil
from treq.client import HTTPClient
from twisted.internet import reactor
from twisted.internet.defer import Deferred, succeed
from twisted.internet.process import ProcessReader
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import deferLater
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from swapproxy.testing.local import LOOPBACK, REPO, TWISTD


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


def freeze(testcase: TestCase, pid: int) -> None:
    """
    SIGSTOP process ``pid``; when the test ends it gets SIGCONT and SIGKILL if it still exists.
    """

    def thaw_and_kill() -> None:
        for signum in (signal.SIGCONT, signal.SIGKILL):
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                return

    testcase.addCleanup(thaw_and_kill)
    os.kill(pid, signal.SIGSTOP)


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

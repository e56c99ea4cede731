"""
Fake reactors.

`ProcessReactor` is a `MemoryReactorClock` that also "spawns" processes: each spawn is recorded
as a `FakeProcess`, a process transport whose output, exit and received signals the test
controls and inspects (`PausableProcess`: one whose reading can be paused). A real `Upstream` on
it runs no process. `ThreadedMemoryReactor` is a `MemoryReactorClock` that threads can hand calls to.
"""

from __future__ import annotations

import queue
import signal
from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet.error import ProcessDone, ProcessExitedAlready, ProcessTerminated
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from swapproxy import upstream as upstream_module
from swapproxy.testing.local import FAKE_PID_BASE



class FakeProcess:
    """
    The transport of one fake child process.

    :ivar executable: the executable passed to ``spawnProcess``.
    :ivar args: the full argv passed to ``spawnProcess``.
    :ivar env: the environment passed to ``spawnProcess``.
    :ivar signals: the signal numbers the process received, to itself or to its group, in order.
    :ivar signal_times: when (clock seconds) each of ``signals`` arrived.
    """

    def __init__(
        self,
        reactor: ProcessReactor,
        protocol: ProcessProtocol,
        executable: str,
        args: Sequence[str],
        env: dict[str, str] | None,
        pid: int,
    ) -> None:
        self._reactor = reactor
        self.proto = protocol
        self.executable = executable
        self.args = list(args)
        self.env = dict(env or {})
        self.pid: int | None = pid
        self.original_pid = pid
        self.signals: list[int] = []
        self.signal_times: list[float] = []
        self.stdin_closed = False
        self.ended = False

    # -- what the code under test calls -------------------------------------------------------

    def signalProcess(self, signalID: str | int) -> None:
        if self.ended:
            raise ProcessExitedAlready()
        number = {"TERM": signal.SIGTERM, "KILL": signal.SIGKILL, "INT": signal.SIGINT}.get(
            signalID, signalID  # type: ignore[call-overload]
        )
        self._receive(int(number))

    def closeStdin(self) -> None:
        self.stdin_closed = True

    def closeStdout(self) -> None:
        pass

    def closeStderr(self) -> None:
        pass

    def closeChildFD(self, descriptor: int) -> None:
        pass

    def writeToChild(self, childFD: int, data: bytes) -> None:
        pass

    def write(self, data: bytes) -> None:
        pass

    def loseConnection(self) -> None:
        pass

    # -- what the test calls ------------------------------------------------------------------

    def _receive(self, signum: int) -> None:
        self.signals.append(signum)
        self.signal_times.append(self._reactor.seconds())

    def output(self, data: bytes, fd: int = 1) -> None:
        """
        The child writes ``data`` on ``fd`` (1 stdout, 2 stderr).
        """
        assert not self.ended, "a process that has exited prints nothing"
        self.proto.childDataReceived(fd, data)

    def exit(self, code: int | None = 0, signum: int | None = None) -> None:
        """
        The child ends, with exit ``code`` or killed by ``signum``.
        """
        assert not self.ended, "the process has already exited"
        self.ended = True
        self.pid = None
        if signum is None and code == 0:
            reason = Failure(ProcessDone(0))
        else:
            status = (code << 8) if signum is None and code is not None else signum
            reason = Failure(ProcessTerminated(code if signum is None else None, signum, status))
        self.proto.processExited(reason)
        self.proto.processEnded(reason)

    @property
    def command(self) -> list[str]:
        """
        The argv after the session launcher (``setsid``, or the Python shim that calls setsid).
        """
        if self.args and self.args[0].endswith("setsid"):
            return self.args[1:]
        if len(self.args) > 3 and self.args[1] == "-c" and "setsid" in self.args[2]:
            return self.args[3:]
        return self.args


class PausableProcess(FakeProcess):
    """
    A `FakeProcess` whose output reading can be paused, as a real process transport's: what the
    child prints while reading is paused waits in its pipes, and comes when reading resumes.

    :ivar paused: whether reading is paused.
    :ivar pauses: how many times reading was paused.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.paused = False
        self.pauses = 0
        self._held: list[tuple[int, bytes]] = []

    def pauseProducing(self) -> None:
        self.paused = True
        self.pauses += 1

    def resumeProducing(self) -> None:
        self.paused = False
        held, self._held = self._held, []
        for fd, data in held:
            self.proto.childDataReceived(fd, data)

    def output(self, data: bytes, fd: int = 1) -> None:
        if self.paused:
            assert not self.ended, "a process that has exited prints nothing"
            self._held.append((fd, data))
            return
        super().output(data, fd)


class ThreadedMemoryReactor(MemoryReactorClock):
    """
    A `MemoryReactorClock` that threads may hand calls to (``callFromThread``), for services that
    run a thread pool of their own (the activity store). The calls wait until `run_from_threads`.
    """

    def __init__(self) -> None:
        super().__init__()
        self._from_threads: queue.SimpleQueue[tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]] = (
            queue.SimpleQueue()
        )

    def callFromThread(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        self._from_threads.put((f, args, kwargs))

    def run_from_threads(self, timeout: float = 10.0) -> None:
        """
        Wait for one call from a thread (up to ``timeout`` seconds), then run it and any others
        waiting.
        """
        calls = [self._from_threads.get(timeout=timeout)]
        while not self._from_threads.empty():
            calls.append(self._from_threads.get())
        for f, args, kwargs in calls:
            f(*args, **kwargs)

    def stop_service(self, service: Any, timeout: float = 10.0) -> None:
        """
        Stop ``service`` and run the calls its threads hand back until the stop is done (a
        service with a thread pool, such as the activity store, ends its threads only then).
        """
        stopped = service.stopService()
        done: list[object] = []
        stopped.addBoth(done.append)
        while not done:
            self.run_from_threads(timeout)
        if isinstance(done[0], Failure):
            done[0].raiseException()


class ProcessReactor(MemoryReactorClock):
    """
    A `MemoryReactorClock` whose ``spawnProcess`` records `FakeProcess` transports.

    Call `install` from a test first: it routes ``os.killpg`` in `swapproxy.upstream` to the fake
    processes, so that no signal can ever reach a real process group.

    :ivar spawned: every process spawned, in order.
    :ivar spawn_error: raised by the next ``spawnProcess`` when set.
    :ivar process_type: the transport of each process (`PausableProcess` for one whose reading
        can be paused).
    """

    process_type: type[FakeProcess] = FakeProcess

    def __init__(self) -> None:
        super().__init__()
        self.spawned: list[FakeProcess] = []
        self.spawn_error: OSError | None = None
        self.group_signals: list[tuple[int, int]] = []
        self._next_pid = FAKE_PID_BASE

    def install(self, testcase: SynchronousTestCase) -> ProcessReactor:
        testcase.patch(upstream_module.os, "killpg", self.killpg)
        return self

    def spawnProcess(
        self,
        processProtocol: ProcessProtocol,
        executable: str,
        args: Sequence[str] = (),
        env: dict[str, str] | None = None,
        path: str | None = None,
        uid: int | None = None,
        gid: int | None = None,
        usePTY: bool = False,
        childFDs: dict[int, Any] | None = None,
    ) -> FakeProcess:
        if self.spawn_error is not None:
            error, self.spawn_error = self.spawn_error, None
            raise error
        self._next_pid += 1
        process = self.process_type(self, processProtocol, executable, args, env, self._next_pid)
        self.spawned.append(process)
        processProtocol.makeConnection(process)
        return process

    def killpg(self, pgid: int, signum: int) -> None:
        """
        ``os.killpg`` for fake processes: a live process whose pid is ``pgid`` gets the signal.
        """
        self.group_signals.append((pgid, signum))
        for process in self.spawned:
            if process.pid == pgid and not process.ended:
                process._receive(signum)
                return
        raise ProcessLookupError(pgid, "no such process group")

    def children(self) -> list[FakeProcess]:
        """
        The spawned processes that have not exited.
        """
        return [p for p in self.spawned if not p.ended]

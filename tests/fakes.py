"""
Test doubles shared by the upstream and supervisor tests.

`ProcessReactor` is a `MemoryReactorClock` that also "spawns" processes: each spawn is recorded
as a `FakeProcess`, a process transport whose output, exit and received signals the test
controls and inspects. `FakeUpstreams` makes `FakeUpstream` objects for a `Supervisor`: they
record start and stop calls, and the test says when a start succeeds or fails and when a child
has exited.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ProcessDone, ProcessExitedAlready, ProcessTerminated
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from swapproxy import upstream as upstream_module
from swapproxy.config import ModelConfig
from swapproxy.upstream import StartError, State

#: Fake pids start above the largest pid Linux can hand out (2**22), so that a fake pid can never
#: name a real process, even if some code path asks the real OS about it.
FAKE_PID_BASE = 5_000_000


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


class ProcessReactor(MemoryReactorClock):
    """
    A `MemoryReactorClock` whose ``spawnProcess`` records `FakeProcess` transports.

    Call `install` from a test first: it routes ``os.killpg`` in `swapproxy.upstream` to the fake
    processes, so that no signal can ever reach a real process group.

    :ivar spawned: every process spawned, in order.
    :ivar spawn_error: raised by the next ``spawnProcess`` when set.
    """

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
        process = FakeProcess(self, processProtocol, executable, args, env, self._next_pid)
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


class FakeUpstream:
    """
    An `Upstream` stand-in for supervisor tests, with the same state machine and contract.

    The test drives it: `become_ready`, `fail_start`, `exited` (after a stop, or as a crash).

    :ivar start_count: how many times a child was "spawned".
    :ivar stop_graces: the grace period (given, or the model's ``unloadTimeout``) of every `stop`
        call that began a stop.
    :ivar reconfigured: the ``(health_check_timeout, health_check_ceiling)`` of each `reconfigure`.
    :ivar running_at_spawn: for each spawn, the other models that were running at that moment.
    """

    def __init__(self, model: ModelConfig, siblings: dict[str, FakeUpstream], events: list[tuple[str, str]]):
        self.model = model
        self.state = State.STOPPED
        self.state_observers: list[Callable[[Any, State, State], None]] = []
        self.line_observers: list[Callable[[Any, str], None]] = []
        self.pid: int | None = None
        self.started_at: float | None = None
        self.ready_at: float | None = None
        self.client: Any = None
        self.health_status = ""
        self.last_error: StartError | None = None
        self.start_count = 0
        self.stop_graces: list[float | None] = []
        self.running_at_spawn: list[list[str]] = []
        self.reconfigured: list[tuple[float, float | None]] = []
        self._siblings = siblings
        self._events = events
        self._start_waiters: list[Deferred[None]] = []
        self._stop_waiters: list[Deferred[None]] = []

    @property
    def running(self) -> bool:
        return self.state in (State.STARTING, State.READY, State.STOPPING)

    def start(self) -> Deferred[None]:
        if self.state is State.READY:
            return succeed(None)
        waiter: Deferred[None] = Deferred(self._withdraw)
        self._start_waiters.append(waiter)
        if self.state in (State.STOPPED, State.FAILED):
            self._spawn()
        return waiter

    def stop(self, grace: float | None = None) -> Deferred[None]:
        if self.state in (State.STOPPED, State.FAILED):
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._stop_waiters.append(waiter)
        if self.state is State.STOPPING:
            return waiter
        self.stop_graces.append(self.model.unload_timeout if grace is None else grace)
        self._events.append(("stop", self.model.id))
        starting = self.state is State.STARTING
        self._set_state(State.STOPPING)
        if starting:
            self._fail_waiters(StartError(self.model.id, "unloaded while starting"))
        return waiter

    def reconfigure(
        self, model: ModelConfig, health_check_timeout: float, health_check_ceiling: float | None = None
    ) -> None:
        if model.id != self.model.id or upstream_module.needs_restart(self.model, model):
            raise ValueError(f"model {model.id!r}: its new settings need a new process")
        self.model = model
        self.reconfigured.append((health_check_timeout, health_check_ceiling))

    # -- test controls ------------------------------------------------------------------------

    def become_ready(self) -> None:
        assert self.state is State.STARTING, f"{self.model.id} is {self.state.value}, not starting"
        self._set_state(State.READY)
        waiters, self._start_waiters = self._start_waiters, []
        for waiter in waiters:
            waiter.callback(None)

    def fail_start(self, reason: str = "process exited with exit code 1 while starting") -> StartError:
        assert self.state is State.STARTING, f"{self.model.id} is {self.state.value}, not starting"
        error = StartError(self.model.id, reason, exit_code=1)
        self.last_error = error
        self._events.append(("failed", self.model.id))
        self._set_state(State.FAILED)
        self._fail_waiters(error)
        return error

    def exited(self) -> None:
        """
        The child process has exited: the end of a stop, or a crash when it was not stopping.
        """
        assert self.running, f"{self.model.id} has no process"
        self.pid = None
        self._events.append(("exited", self.model.id))
        if self.state is State.STARTING:
            error = StartError(self.model.id, "process exited while starting")
            self._set_state(State.FAILED)
            self._fail_waiters(error)
        else:
            self._set_state(State.STOPPED)
        waiters, self._stop_waiters = self._stop_waiters, []
        for waiter in waiters:
            waiter.callback(None)
        if self._start_waiters and self.state in (State.STOPPED, State.FAILED):
            self._spawn()

    # -- internals ----------------------------------------------------------------------------

    def _withdraw(self, waiter: Deferred[None]) -> None:
        if waiter in self._start_waiters:
            self._start_waiters.remove(waiter)

    def _spawn(self) -> None:
        self.start_count += 1
        self.running_at_spawn.append(sorted(m for m, up in self._siblings.items() if up is not self and up.running))
        self._events.append(("start", self.model.id))
        self.pid = FAKE_PID_BASE + len(self._events)
        self._set_state(State.STARTING)

    def _fail_waiters(self, error: StartError) -> None:
        waiters, self._start_waiters = self._start_waiters, []
        for waiter in waiters:
            waiter.errback(error)

    def _set_state(self, new: State) -> None:
        old, self.state = self.state, new
        if old is not new:
            for observer in list(self.state_observers):
                observer(self, old, new)


class FakeUpstreams:
    """
    An ``upstream_factory`` for `Supervisor` that keeps the `FakeUpstream` of every model.

    :ivar events: ``("start" | "stop" | "exited" | "failed", model_id)`` in the order they happened.
    """

    def __init__(self) -> None:
        self.by_id: dict[str, FakeUpstream] = {}
        self.events: list[tuple[str, str]] = []

    def __call__(self, model: ModelConfig) -> FakeUpstream:
        upstream = FakeUpstream(model, self.by_id, self.events)
        self.by_id[model.id] = upstream
        return upstream

    def __getitem__(self, model_id: str) -> FakeUpstream:
        return self.by_id[model_id]

    def running(self) -> list[str]:
        """
        The models that have a process, sorted.
        """
        return sorted(m for m, up in self.by_id.items() if up.running)

"""
Test doubles shared by the upstream and supervisor tests.

`ProcessReactor` is a `MemoryReactorClock` that also "spawns" processes: each spawn is recorded
as a `FakeProcess`, a process transport whose output, exit and received signals the test
controls and inspects. `FakeUpstreams` makes `FakeUpstream` objects for a `Supervisor`: they
record start and stop calls, and the test says when a start succeeds or fails and when a child
has exited. `FakePeerClient` stands in for a peer's client: the test answers what it sent.
"""

from __future__ import annotations

import os
import queue
import signal
import struct
from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ProcessDone, ProcessExitedAlready, ProcessTerminated
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import ResponseDone

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


class FakeUpstream:
    """
    An `Upstream` stand-in for supervisor tests, with the same state machine and contract.

    The test drives it: `become_ready`, `fail_start`, `exited` (after a stop, or as a crash).

    :ivar start_count: how many times a child was "spawned".
    :ivar stop_graces: the grace period (given, or the model's ``unloadTimeout``) of every `stop`
        call that began a stop.
    :ivar reconfigured: the ``(health_check_timeout, start_ceiling)`` of each `reconfigure`'s model.
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
        self.healthy_at: float | None = None
        self.start_step: Any = None
        self.reports: dict[str, Callable[[], Any]] = {}
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
        self.unhealthy_reason: str | None = None
        self.hang_observers: list[Callable[[Any, str, str], None]] = []

    @property
    def running(self) -> bool:
        return self.state in (State.STARTING, State.READY, State.STOPPING, State.UNHEALTHY)

    @property
    def stopping(self) -> bool:
        return self.state in (State.STOPPING, State.UNHEALTHY)

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
        if self.stopping:
            return waiter
        self.stop_graces.append(self.model.unload_timeout if grace is None else grace)
        self._events.append(("stop", self.model.id))
        starting = self.state is State.STARTING
        self._set_state(State.STOPPING)
        if starting:
            self._fail_waiters(StartError(self.model.id, "unloaded while starting"))
        return waiter

    def reconfigure(self, model: ModelConfig) -> None:
        if model.id != self.model.id or upstream_module.needs_restart(self.model, model):
            raise ValueError(f"model {model.id!r}: its new settings need a new process")
        self.model = model
        self.reconfigured.append((model.health_check_timeout, model.start_ceiling))

    # -- test controls ------------------------------------------------------------------------

    def become_ready(self) -> None:
        assert self.state is State.STARTING, f"{self.model.id} is {self.state.value}, not starting"
        self._set_state(State.READY)
        waiters, self._start_waiters = self._start_waiters, []
        for waiter in waiters:
            waiter.callback(None)

    def hang(self, what: str = "its health check failed") -> None:
        """
        The ready model is found unhealthy, as `Upstream.mark_unhealthy` finds it: it is being
        stopped (the test says when it has `exited`).
        """
        assert self.state is State.READY, f"{self.model.id} is {self.state.value}, not ready"
        self.unhealthy_reason = what
        self.stop_graces.append(self.model.unload_timeout)
        self._events.append(("unhealthy", self.model.id))
        self._set_state(State.UNHEALTHY)
        for observer in list(self.hang_observers):
            observer(self, "health_check", what)

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


class FakePeerResponse:
    """
    A peer's answer: a status, and a body delivered at once to whoever asks for it.
    """

    def __init__(self, code: int, body: bytes) -> None:
        self.code = code
        self.body = body

    def deliverBody(self, protocol: Any) -> None:
        protocol.makeConnection(None)
        protocol.dataReceived(self.body)
        protocol.connectionLost(Failure(ResponseDone()))


class FakePeerClient:
    """
    Stands in for `swapproxy.peers.PeerClient`: records what is sent; the test answers.

    :ivar sent: ``(method, path, headers, answer)`` for each request; fire ``answer`` with a
        `FakePeerResponse` (or fail it).
    """

    def __init__(self, peer: Any, reactor: Any) -> None:
        self.peer = peer
        self.sent: list[tuple[bytes, bytes, Any, Deferred[Any]]] = []
        self.closed = False

    @classmethod
    def factory(cls, made: list[FakePeerClient]) -> Any:
        """
        A ``client_factory`` for `swapproxy.peers.PeerSet` that appends each client to ``made``.
        """

        def make(peer: Any, reactor: Any) -> FakePeerClient:
            client = cls(peer, reactor)
            made.append(client)
            return client

        return make

    def send(self, method: bytes, path: bytes, headers: Any, body: bytes | None) -> Deferred[Any]:
        answer: Deferred[Any] = Deferred()
        self.sent.append((method, path, headers, answer))
        return answer

    def close(self) -> Deferred[None]:
        self.closed = True
        return succeed(None)


def write_slot_file(path: str, tokens: Sequence[int], payload: int = 64) -> int:
    """
    Write a file laid out as llama-server 0.3.36 saves a slot: the ``ggsq`` header with the
    packed token list (LLAMA_TOKEN_NULL, version 1, the count, the tokens, no media), then
    ``payload`` bytes standing for the KV cache.

    :returns: the file's size.
    """
    packed = [-1, 1, len(tokens), *tokens, 0]
    data = struct.pack(f"<III{len(packed)}i", 0x67677371, 3, len(packed), *packed)
    data += bytes((i * 7) % 251 for i in range(payload))
    with open(path, "wb") as f:
        f.write(data)
    return len(data)


class FakeSlotServer:
    """
    llama-server's slot API as `swapproxy.slotcache.SlotCache` uses it (`SlotsAPI`), writing and
    reading real files in ``directory``. Pass ``server.api`` as the cache's ``api``.

    :ivar tokens: the tokens each slot holds (`serve` puts a request's there).
    :ivar calls: ``(action, slot id, filename)`` of every save and restore.
    :ivar hold: when set, saves and restores answer with a Deferred kept in ``held``.
    :ivar unsupported: answer every call as a server without a slot API does (501).
    :ivar refuse: file names whose restore llama-server refuses (400).
    """

    def __init__(self, directory: str, slots: int = 2, build: str = "b1-test", model_path: str = "/models/m.gguf",
                 bytes_per_token: int = 16) -> None:
        self.directory = directory
        self.tokens: dict[int, list[int]] = {i: [] for i in range(slots)}
        #: Slots restored and not used since: like llama-server, ``/slots`` shows no tokens for them.
        self.untouched: set[int] = set()
        self.build = build
        self.model_path = model_path
        self.bytes_per_token = bytes_per_token
        self.calls: list[tuple[str, int, str]] = []
        self.hold = False
        self.held: list[Deferred[Any]] = []
        self.unsupported = False
        self.refuse: set[str] = set()

    def api(self, upstream: Any) -> FakeSlotServer:
        return self

    def _answer(self, value: Any) -> Deferred[Any]:
        from swapproxy.slotcache import SlotsUnsupported

        if self.unsupported:
            return Deferred.fromCoroutine(_raise(SlotsUnsupported("POST /slots answered 501")))
        if self.hold:
            self.held.append(Deferred())
            return self.held[-1]
        return succeed(value)

    def slots_info(self) -> list[dict[str, Any]]:
        return [{"id": i, "n_ctx": 512, **({"n_prompt_tokens": len(t)} if t and i not in self.untouched else {})}
                for i, t in self.tokens.items()]

    def serve(self, slot_id: int, tokens: list[int]) -> None:
        """
        A request was served in ``slot_id``, which now holds ``tokens``.
        """
        self.tokens[slot_id] = list(tokens)
        self.untouched.discard(slot_id)

    def exited(self) -> None:
        """
        The server's process ended: its slots are empty.
        """
        self.tokens = {i: [] for i in self.tokens}
        self.untouched.clear()

    def slots(self) -> Deferred[list[dict[str, Any]]]:
        from swapproxy.slotcache import SlotsUnsupported

        if self.unsupported:
            return Deferred.fromCoroutine(_raise(SlotsUnsupported("GET /slots answered 501")))
        return succeed(self.slots_info())

    def props(self) -> Deferred[dict[str, Any]]:
        return succeed({"build_info": self.build, "model_path": self.model_path, "total_slots": len(self.tokens)})

    def save(self, slot_id: int, filename: str) -> Deferred[dict[str, Any]]:
        self.calls.append(("save", slot_id, filename))
        tokens = self.tokens[slot_id]
        size = write_slot_file(os.path.join(self.directory, filename), tokens, len(tokens) * self.bytes_per_token)
        return self._answer({"id_slot": slot_id, "filename": filename, "n_saved": len(tokens), "n_written": size})

    def restore(self, slot_id: int, filename: str) -> Deferred[dict[str, Any]]:
        from swapproxy.slotcache import SlotsError
        from swapproxy.slotfiles import read_tokens

        self.calls.append(("restore", slot_id, filename))
        if filename in self.refuse:
            return Deferred.fromCoroutine(_raise(SlotsError("POST /slots answered 400: Unable to restore slot")))
        tokens = read_tokens(os.path.join(self.directory, filename))
        answer = self._answer({"id_slot": slot_id, "filename": filename, "n_restored": len(tokens)})
        self.tokens[slot_id] = tokens
        self.untouched.add(slot_id)
        return answer


async def _raise(error: Exception) -> Any:
    raise error

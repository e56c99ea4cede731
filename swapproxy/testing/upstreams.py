"""
`ScriptedUpstreams`: an ``upstream_factory`` for a `Supervisor` whose upstreams are
`ScriptedUpstream` objects, `Upstream` stand-ins with the same states and contract that run no
process: they record each start and stop, and their driver (a test, or ``bench/swapsim.py``)
says when a start succeeds or fails and when a child has exited.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, succeed

from swapproxy import upstream as upstream_module
from swapproxy.config import ModelConfig
from swapproxy.testing.local import FAKE_PID_BASE
from swapproxy.upstream import StartError, State


class ScriptedUpstream:
    """
    An `Upstream` stand-in for supervisor tests, with the same state machine and contract.

    The test drives it: `become_ready`, `fail_start`, `exited` (after a stop, or as a crash).

    :ivar start_count: how many times a child was "spawned".
    :ivar stop_graces: the grace period (given, or the model's ``unloadTimeout``) of every `stop`
        call that began a stop.
    :ivar reconfigured: the ``(health_check_timeout, start_ceiling)`` of each `reconfigure`'s model.
    :ivar running_at_spawn: for each spawn, the other models that were running at that moment.
    """

    def __init__(self, model: ModelConfig, siblings: dict[str, ScriptedUpstream], events: list[tuple[str, str]]):
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

    def mark_unhealthy(self, what: str, cause: str) -> None:
        """
        As `Upstream.mark_unhealthy`: the ready model stopped answering and is being stopped (its
        driver says when it has `exited`). Does nothing unless the model is ready.
        """
        if self.state is not State.READY:
            return
        self.unhealthy_reason = what
        self.stop_graces.append(self.model.unload_timeout)
        self._events.append(("unhealthy", self.model.id))
        self._set_state(State.UNHEALTHY)
        self._hung(what, cause)
        for observer in list(self.hang_observers):
            observer(self, cause, what)

    def hang(self, what: str = "its health check failed") -> None:
        """
        The ready model is found unhealthy by its health check.
        """
        assert self.state is State.READY, f"{self.model.id} is {self.state.value}, not ready"
        self.mark_unhealthy(what, "health_check")

    def fail_start(self, reason: str | StartError = "process exited with exit code 1 while starting") -> StartError:
        """
        The start fails with ``reason`` (an exit code 1 unless it is a whole `StartError`).
        """
        assert self.state is State.STARTING, f"{self.model.id} is {self.state.value}, not starting"
        error = reason if isinstance(reason, StartError) else StartError(self.model.id, reason, exit_code=1)
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

    def _hung(self, what: str, cause: str) -> None:
        """
        What else happens when the model is found unhealthy, before its observers hear of it.
        """

    def _fail_waiters(self, error: StartError) -> None:
        waiters, self._start_waiters = self._start_waiters, []
        for waiter in waiters:
            waiter.errback(error)

    def _set_state(self, new: State) -> None:
        old, self.state = self.state, new
        if old is not new:
            for observer in list(self.state_observers):
                observer(self, old, new)


class ScriptedUpstreams:
    """
    An ``upstream_factory`` for `Supervisor` that keeps the `ScriptedUpstream` of every model.

    :ivar events: ``("start" | "stop" | "exited" | "failed", model_id)`` in the order they happened.
    """

    def __init__(self) -> None:
        self.by_id: dict[str, ScriptedUpstream] = {}
        self.events: list[tuple[str, str]] = []

    def __call__(self, model: ModelConfig) -> ScriptedUpstream:
        upstream = ScriptedUpstream(model, self.by_id, self.events)
        self.by_id[model.id] = upstream
        return upstream

    def __getitem__(self, model_id: str) -> ScriptedUpstream:
        return self.by_id[model_id]

    def running(self) -> list[str]:
        """
        The models that have a process, sorted.
        """
        return sorted(m for m, up in self.by_id.items() if up.running)

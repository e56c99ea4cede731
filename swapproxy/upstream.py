# -*- test-case-name: tests.test_upstream -*-
"""
One upstream: the child process that serves one model, its state and its health.

An `Upstream` starts its model's ``cmd`` as a `swapproxy.child.ChildProcess` (in a session of its
own, so that a stop reaches every process the model started), polls its ``checkEndpoint`` (`swapproxy.probes`) until it
answers 200, and stops it with ``cmdStop`` or SIGTERM to the whole process group, then SIGKILL
after a grace period. Requests that arrive while it starts share the same start; each waiter holds
its own Deferred, so one waiter that gives up never cancels the start for the others. Requests go
to the model through the client of `swapproxy.httpclient`, made for each start.

A ready model that stops answering is *unhealthy*: its requests in flight go silent
(`swapproxy.stall`), or its health check, repeated every ``healthCheckInterval`` while it is
ready, fails `swapproxy.probes.HEALTH_CHECK_FAILURES` times in a row. Its requests in flight are then failed, and
it is stopped like any other (SIGTERM, SIGKILL after ``unloadTimeout``: a frozen process dies only
to SIGKILL); requests that wait for it start it again.
"""

from __future__ import annotations

import enum
import os
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from typing import Any
from urllib.parse import urlsplit

import attrs
from treq.client import HTTPClient
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall
from twisted.python.failure import Failure
from twisted.web.client import HTTPConnectionPool

from swapproxy.child import READY_OUTPUT_INTERVAL, ChildProcess, describe_exit, find_executable, port_in_use
from swapproxy.config import ModelConfig
from swapproxy.httpclient import BytesProducer, make_http_client
from swapproxy.httpclient import body_producer as _body_producer
from swapproxy.logs import ModelOutput, proxy_logger
from swapproxy.probes import HealthProbes, probe_echo
from swapproxy.reactors import IUpstreamReactor
from swapproxy.stall import Stalled, StallWatch

__all__ = [
    "ERROR_TAIL_LINES", "READY_OUTPUT_INTERVAL", "BytesProducer", "StartError", "StartStep", "State", "Upstream",
    "_body_producer", "make_http_client", "needs_restart",
]

#: How many of the child's last output lines a start error quotes.
ERROR_TAIL_LINES = 5


def needs_restart(old: ModelConfig, new: ModelConfig) -> bool:
    """
    Whether a running child of ``old`` cannot serve as ``new``: its command, environment, address
    or health check changed. Everything else (ttl, aliases, filters, ``cmdStop``, ...) can change
    under a running child.
    """
    return (old.cmd, old.env, old.proxy, old.check_endpoint, old.port) != (
        new.cmd,
        new.env,
        new.proxy,
        new.check_endpoint,
        new.port,
    )


class State(enum.Enum):
    """
    The life cycle of an upstream child.
    """

    STOPPED = "stopped"
    STARTING = "starting"
    READY = "ready"
    STOPPING = "stopping"
    FAILED = "failed"
    #: It stopped answering while ready, and is being stopped.
    UNHEALTHY = "unhealthy"


@attrs.frozen
class StartStep:
    """
    What a start hook is doing, between the child's healthy answer and READY, for the loading
    stream.

    :ivar stage: one word for programs (``restoring``).
    :ivar label: the same for people (``restoring 2 cached conversations, 1.1 GB``).
    :ivar fraction: how much of it is done, 0..1, or ``None`` when that cannot be known.
    """

    stage: str
    label: str
    fraction: float | None = None


class StartError(Exception):
    """
    A model could not be made ready.

    :ivar model_id: the model that failed.
    :ivar reason: what went wrong, in plain words.
    :ivar exit_code: the child's exit code, when it exited.
    :ivar last_lines: the last lines the child printed.
    """

    def __init__(
        self,
        model_id: str,
        reason: str,
        exit_code: int | None = None,
        last_lines: tuple[str, ...] = (),
    ) -> None:
        self.model_id = model_id
        self.reason = reason
        self.exit_code = exit_code
        self.last_lines = last_lines
        message = f"model {model_id!r} failed to start: {reason}"
        if last_lines:
            message += "; last output: " + " | ".join(last_lines)
        super().__init__(message)


class Upstream:
    """
    One model's child process: start, health, stop.

    :param model: the model's configuration; its ``health_check_timeout`` and ``start_ceiling``
        bound a start.
    :param reactor: spawns the model's process, keeps time, and connects to the model.
    :param environ: the environment the child inherits (``os.environ`` by default);
        the model's ``env`` entries are added to it.
    :param health_probe: asks the child's health endpoint once and returns the HTTP status
        (or fails when it cannot connect); an HTTP GET of ``checkEndpoint`` by default. With
        that default, a start first makes sure that no other program listens on the loopback
        port ``${PORT}`` gave the model, which would answer the probe and the requests.
    """

    def __init__(
        self,
        model: ModelConfig,
        reactor: IUpstreamReactor,
        environ: Mapping[str, str] | None = None,
        health_probe: Callable[[Upstream], Deferred[int]] | None = None,
    ) -> None:
        self.model = model
        self.log = proxy_logger("swapproxy.upstream")
        self._output_log = ModelOutput(model.id)
        self._reactor = reactor
        self._environ = dict(os.environ if environ is None else environ)
        self.state = State.STOPPED
        self.state_observers: list[Callable[[Upstream, State, State], None]] = []
        self.line_observers: list[Callable[[Upstream, str], None]] = []
        self.output_observers: list[Callable[[Upstream, bytes], None]] = []
        #: Called with ``(upstream, pid, True)`` once a child is spawned and ``(upstream, pid,
        #: False)`` once it has exited and its leftovers were killed.
        self.process_observers: list[Callable[[Upstream, int, bool], None]] = []
        self.pid: int | None = None
        #: The argv the current child runs (its executable resolved), while it runs.
        self.command: tuple[str, ...] | None = None
        self.client: HTTPClient | None = None
        self._pool: HTTPConnectionPool | None = None
        self._child: ChildProcess | None = None
        self._start_waiters: list[Deferred[None]] = []
        self._stop_waiters: list[Deferred[None]] = []
        self._generation = 0
        self._probe_echo = probe_echo(model.check_endpoint or "/health")
        self.probes = HealthProbes(
            reactor,
            lambda: self.model,
            lambda: self._health_probe(self),
            self._health_answered,
            self._became_ready,
            lambda what: self.mark_unhealthy(what, "health_check"),
        )
        self._timeout_call: IDelayedCall | None = None
        self._end_state = State.STOPPED
        self.recent_lines: deque[str] = deque(maxlen=50)
        self.started_at: float | None = None
        self.ready_at: float | None = None
        self.last_output_at: float | None = None
        #: When the current start last showed a sign of life (output, a new health answer).
        self.last_sign_of_life: float | None = None
        self.output_bytes = 0
        #: What the last health probe saw: "", "refused", "loading" (503) or "HTTP <code>".
        self.health_status = ""
        self.last_error: StartError | None = None
        #: Awaited in turn once the child answers its health check, before it is READY, so that the
        #: first request waits for them: each is called with the upstream and returns a Deferred
        #: or a coroutine; it bounds its own time, and its failure is logged, never a failed
        #: start. While one runs, it may say what it does in `start_step`.
        self.start_hooks: list[Callable[[Upstream], Awaitable[None]]] = []
        self.start_step: StartStep | None = None
        #: When the current child first answered its health check.
        self.healthy_at: float | None = None
        #: Awaited in turn before a READY child is stopped on purpose (a swap, a TTL, an unload),
        #: while it can still answer; not when it crashed or was still starting. Each is called
        #: with the upstream, returns a Deferred or a coroutine, and bounds its own time.
        self.stop_hooks: list[Callable[[Upstream], Awaitable[None]]] = []
        #: Each turns the argv about to be spawned into the argv to spawn.
        self.argv_filters: list[Callable[[Upstream, list[str]], list[str]]] = []
        #: Facts that companions report about this model for ``/running``: name -> a function
        #: that returns a JSON value.
        self.reports: dict[str, Callable[[], Any]] = {}
        self._health_probe = health_probe or (lambda upstream: Deferred.fromCoroutine(upstream._http_probe()))
        self._check_port = health_probe is None
        #: Why the model was found unhealthy, while it is.
        self.unhealthy_reason: str | None = None
        #: Called with ``(upstream, cause, what happened)`` when the model is found unhealthy;
        #: ``cause`` is ``stream_idle`` or ``health_check``.
        self.hang_observers: list[Callable[[Upstream, str, str], None]] = []
        #: The requests in flight on this model, watched for silence.
        self.exchanges = StallWatch(
            model.id,
            reactor,
            lambda: self.model.hang_limits.stream_idle_timeout,
            self._cpu_seconds,
            lambda what: self.mark_unhealthy(what, "stream_idle"),
        )

    @property
    def base_url(self) -> str:
        """
        The URL requests are forwarded to, without a trailing slash.
        """
        return self.model.proxy.rstrip("/")

    def url_for(self, path: str) -> str:
        """
        The upstream URL for a request path (which starts with ``/``).
        """
        return self.base_url + path

    # -- public API ---------------------------------------------------------------------------

    def start(self) -> Deferred[None]:
        """
        Make the model ready, starting it if needed.

        :returns: a Deferred of this caller's own that fires when the model is ready, or fails
            with `StartError`. Cancelling it only withdraws this caller.
        """
        if self.state is State.READY:
            return succeed(None)
        waiter: Deferred[None] = Deferred(self._withdraw_start_waiter)
        self._start_waiters.append(waiter)
        if self.state in (State.STOPPED, State.FAILED):
            self._begin_start()
        # STARTING: join it. STOPPING: _child_exited starts again for the waiters.
        return waiter

    def stop(self, grace: float | None = None, *, run_hooks: bool = True) -> Deferred[None]:
        """
        Stop the child: ``cmdStop`` or SIGTERM to its process group, SIGKILL after ``grace``.

        A start in progress is aborted; its waiters get a `StartError`. A ready child is
        STOPPING while the `stop_hooks` run, then signalled.

        :param grace: seconds before SIGKILL; the model's ``unloadTimeout`` by default.
        :param run_hooks: run the `stop_hooks` first (not for a child that no longer answers).
        :returns: a Deferred that fires once the child has exited.
        """
        if self.state in (State.STOPPED, State.FAILED):
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._stop_waiters.append(waiter)
        if self.stopping:
            return waiter
        grace = self.model.unload_timeout if grace is None else grace
        if self.state is State.STARTING:
            # Stop first: whoever hears of the failure sees a model that is already stopping (and
            # cannot join the start that is being aborted).
            self._terminate(grace)
            self._fail_start_waiters(StartError(self.model.id, "unloaded while starting"))
            return waiter
        if run_hooks and self.stop_hooks:
            self._set_state(State.STOPPING)
            generation = self._generation
            hooks = Deferred.fromCoroutine(self._run_hooks(self.stop_hooks, "before stopping"))
            hooks.addCallback(lambda _: self._stop_hooks_done(generation, grace))
            return waiter
        self._terminate(grace)
        return waiter

    def _stop_hooks_done(self, generation: int, grace: float) -> None:
        if generation == self._generation and self._child is not None and self.state is State.STOPPING:
            self._terminate(grace)

    async def _run_hooks(self, hooks: list[Callable[[Upstream], Awaitable[None]]], when: str) -> None:
        for hook in list(hooks):
            try:
                await hook(self)
            except Exception:
                self.log.failure("{when} model {model}", when=when, model=self.model.id)

    def reconfigure(self, model: ModelConfig) -> None:
        """
        Take new settings that do not need a restart (ttl, aliases, ``cmdStop``, ``unloadTimeout``,
        timeouts, ``healthCheckTimeout``...); a running child keeps running, a start in progress
        takes the new limits.

        :param model: the model's new configuration; same id, same ``cmd``, ``proxy``,
            ``checkEndpoint`` and ``env``.
        :raises ValueError: when ``model`` would need a new child.
        """
        if model.id != self.model.id or needs_restart(self.model, model):
            raise ValueError(f"model {model.id!r}: its new settings need a new process")
        self.model = model
        if self._timeout_call is not None:
            self._arm_start_deadline()
        self.probes.reconfigured()

    @property
    def running(self) -> bool:
        """
        Whether a child process exists (starting, ready or stopping).
        """
        return self.state in (State.STARTING, State.READY, State.STOPPING, State.UNHEALTHY)

    @property
    def stopping(self) -> bool:
        """
        Whether its process is being stopped (``stopping``, or ``unhealthy``).
        """
        return self.state in (State.STOPPING, State.UNHEALTHY)

    def mark_unhealthy(self, what: str, cause: str) -> None:
        """
        The ready model stopped answering: fail its requests in flight and stop it (SIGTERM, then
        SIGKILL after ``unloadTimeout``). Requests that wait for it start it again. Does nothing
        unless the model is ready.

        :param what: what happened, for the log and the failed requests.
        :param cause: ``stream_idle`` or ``health_check``.
        """
        if self.state is not State.READY:
            return
        in_flight = len(self.exchanges.exchanges)
        self.unhealthy_reason = what
        self.log.warn(
            "model {model} stopped responding: {what}; failing its {count} request(s) in flight and stopping "
            "it (SIGTERM, then SIGKILL after {grace:g}s); the requests that wait for it will start it again",
            model=self.model.id,
            what=what,
            count=in_flight,
            grace=self.model.unload_timeout,
        )
        # The state first: the supervisor must grant no request to it from now on.
        self._terminate(self.model.unload_timeout, State.UNHEALTHY)
        self.exchanges.fail_all(Stalled(f"model {self.model.id!r} stopped responding: {what}", cause))
        for observer in list(self.hang_observers):
            observer(self, cause, what)

    def _cpu_seconds(self) -> float | None:
        """
        The CPU time the model's process and its descendants have used, if it can be read.
        """
        return self._child.cpu_seconds() if self._child is not None else None

    # -- start --------------------------------------------------------------------------------

    def _withdraw_start_waiter(self, waiter: Deferred[None]) -> None:
        if waiter in self._start_waiters:
            self._start_waiters.remove(waiter)

    def _set_state(self, new: State) -> None:
        old, self.state = self.state, new
        if old is State.READY and new is not State.READY:
            self.probes.stop()  # out of service: no more health checks
        if old is not new:
            self.log.debug("model {model}: {old} -> {new}", model=self.model.id, old=old.value, new=new.value)
            for observer in list(self.state_observers):
                observer(self, old, new)

    def _begin_start(self) -> None:
        argv = list(self.model.cmd)
        for argv_filter in list(self.argv_filters):
            argv = argv_filter(self, argv)
        executable = find_executable(argv[0], self._environ)
        if executable is None:
            self._set_state(State.FAILED)
            self._fail_start_waiters(
                StartError(self.model.id, f"executable {argv[0]!r} not found (cmd: {' '.join(argv)})")
            )
            return
        taken = self._port_taken()
        if taken is not None:
            self._set_state(State.FAILED)
            self._fail_start_waiters(StartError(
                self.model.id,
                f"port {taken} is already in use by another program, which would answer in this model's"
                " place (another llama-swap or swapproxy with the same startPort?); stop it, or set"
                " startPort to a free range"))
            return
        self._generation += 1
        self.last_error = None
        self.unhealthy_reason = None
        self.recent_lines.clear()
        self.health_status = ""
        self.output_bytes = 0
        self.started_at = self._reactor.seconds()
        self.last_sign_of_life = self.started_at
        self.last_output_at = None
        self.ready_at = None
        self.healthy_at = None
        self.start_step = None
        self._end_state = State.STOPPED
        self._set_state(State.STARTING)
        child = ChildProcess(
            self._reactor,
            self.model.id,
            self.log,
            {**self._environ, **dict(self.model.env)},
            self._environ,
            self._child_output,
            self._child_lines,
            self._child_exited,
            lambda: self.state is State.READY,
        )
        try:
            self.pid = child.spawn(executable, argv)
        except OSError as e:
            self._set_state(State.FAILED)
            self._fail_start_waiters(StartError(self.model.id, f"could not spawn {argv[0]!r}: {e}"))
            return
        self._child = child
        self.command = (executable, *argv[1:])
        for process_observer in list(self.process_observers):
            process_observer(self, self.pid, True)
        self.log.info(
            "starting model {model}: pid {pid}, {cmd}", model=self.model.id, pid=self.pid, cmd=" ".join(argv)
        )
        self.client, self._pool = make_http_client(self._reactor, self.model.concurrency_limit)
        if self.model.check_endpoint is None:
            self._became_ready()
            return
        self.probes.begin_start()
        self._arm_start_deadline()

    def _port_taken(self) -> int | None:
        """
        The loopback port that ``${PORT}`` gave the model, if another program listens on it.
        """
        url = urlsplit(self.model.proxy)
        if not self._check_port or self.model.port is None or url.port != self.model.port:
            return None
        host = {"localhost": "127.0.0.1", "127.0.0.1": "127.0.0.1", "::1": "::1"}.get(url.hostname or "")
        if host is None or not port_in_use(host, url.port):
            return None
        return url.port

    async def _http_probe(self) -> int:
        assert self.client is not None and self.model.check_endpoint is not None
        response = await self.client.get(
            self.url_for(self.model.check_endpoint),
            timeout=min(5.0, self.model.health_check_timeout),
            reactor=self._reactor,
            allow_redirects=False,
        )
        await response.content()
        return int(response.code)

    def _health_answered(self, answer: str) -> None:
        previous, self.health_status = self.health_status, answer
        if answer != "ok" and previous and previous != answer:
            # The first answer is where the server starts from; a new one is progress.
            self.last_sign_of_life = self._reactor.seconds()

    def _became_ready(self) -> None:
        self._cancel_timers()
        self.healthy_at = self._reactor.seconds()
        if self.start_hooks:
            generation = self._generation
            hooks = Deferred.fromCoroutine(self._run_hooks(self.start_hooks, "starting"))
            hooks.addCallback(lambda _: self._start_hooks_done(generation))
            return
        self._ready()

    def _start_hooks_done(self, generation: int) -> None:
        if generation == self._generation:
            self.start_step = None
            if self.state is State.STARTING:
                self._ready()

    def _ready(self) -> None:
        self.ready_at = self._reactor.seconds()
        assert self.started_at is not None
        self.log.info(
            "model {model} ready on {url} after {seconds:.2f}s",
            model=self.model.id,
            url=self.base_url,
            seconds=self.ready_at - self.started_at,
        )
        self._set_state(State.READY)
        self.probes.watch_ready()
        waiters, self._start_waiters = self._start_waiters, []
        for waiter in waiters:
            waiter.callback(None)

    def _start_deadlines(self) -> tuple[float, float]:
        """
        When the start stalls (no sign of life for ``healthCheckTimeout``), and its ceiling.
        """
        assert self.started_at is not None and self.last_sign_of_life is not None
        return (
            self.last_sign_of_life + self.model.health_check_timeout,
            self.started_at + self.model.start_ceiling,
        )

    def _arm_start_deadline(self) -> None:
        # One timer at the nearest deadline, moved on when it fires early, rather than one reset
        # per line of output: a chatty loader prints thousands of lines.
        if self._timeout_call is not None and self._timeout_call.active():
            self._timeout_call.cancel()
        delay = max(0.0, min(self._start_deadlines()) - self._reactor.seconds())
        self._timeout_call = self._reactor.callLater(delay, self._start_timed_out)

    def _start_timed_out(self) -> None:
        self._timeout_call = None
        now = self._reactor.seconds()
        stall_at, ceiling_at = self._start_deadlines()
        if now < min(stall_at, ceiling_at):
            self._arm_start_deadline()
            return
        assert self.started_at is not None
        elapsed = now - self.started_at
        if ceiling_at <= now:
            why = f"not healthy within the healthCheckCeiling of {self.model.start_ceiling:g}s"
        else:
            why = f"no output and no new health answer for {self.model.health_check_timeout:g}s (healthCheckTimeout)"
        error = StartError(
            self.model.id,
            f"health check timed out after {elapsed:.0f}s: {why}"
            + (f" (last answer: {self.health_status})" if self.health_status else ""),
            last_lines=self._tail(),
        )
        # Stop first: whoever hears of the failure sees a model that is already stopping.
        self._terminate(self.model.unload_timeout)
        self._record_failure(error)

    def _record_failure(self, error: StartError) -> None:
        self._note_failure(error)
        self._fail_start_waiters(error)

    def _note_failure(self, error: StartError) -> None:
        self.last_error = error
        self._end_state = State.FAILED
        self.log.error("{error}", error=str(error), model=self.model.id)

    def _fail_start_waiters(self, error: StartError) -> None:
        waiters, self._start_waiters = self._start_waiters, []
        for waiter in waiters:
            waiter.errback(error)

    def _cancel_timers(self) -> None:
        if self._timeout_call is not None and self._timeout_call.active():
            self._timeout_call.cancel()
        self._timeout_call = None
        self.probes.stop()

    def _tail(self) -> tuple[str, ...]:
        lines = [line for line in self.recent_lines if line.strip()]
        return tuple(lines[-ERROR_TAIL_LINES:])

    # -- output -------------------------------------------------------------------------------

    def _child_output(self, data: bytes) -> None:
        self.output_bytes += len(data)
        self.last_output_at = self._reactor.seconds()
        if b"\n" not in data:
            # Part of a line, such as llama.cpp's loading dots: the load moves on.
            self.last_sign_of_life = self.last_output_at
        for observer in list(self.output_observers):
            observer(self, data)

    def _child_lines(self, stream: str, lines: list[str]) -> None:
        """
        Whole lines the child printed, those of one read: each is logged and shown to the line
        observers, in order.
        """
        self.recent_lines.extend(lines)
        self._output_log.lines(stream, lines)
        if self.line_observers:
            observers = list(self.line_observers)
            for line in lines:
                for observer in observers:
                    observer(self, line)
        if self.state is not State.STARTING or self.model.check_endpoint is None:
            return
        echo = self._probe_echo.search
        if all(echo(line) for line in lines):
            return  # the server logging our own probes: nothing new
        # A child that prints is doing something; it may just have become ready.
        self.last_sign_of_life = self._reactor.seconds()
        self.probes.output()

    # -- stop ---------------------------------------------------------------------------------

    def _terminate(self, grace: float, state: State = State.STOPPING) -> None:
        self._cancel_timers()
        self._set_state(state)
        if self._child is not None:
            self._child.stop(grace, self.model.cmd_stop, hung=state is State.UNHEALTHY)

    def _child_exited(self, reason: Failure) -> None:
        """
        The child has exited and its leftovers were killed.
        """
        description, code = describe_exit(reason)
        pid = self.pid
        self._child = None
        self.pid = None
        self.command = None
        self._cancel_timers()
        if pid is not None:
            for process_observer in list(self.process_observers):
                process_observer(self, pid, False)
        self.exchanges.stop()
        if self._pool is not None:
            self._pool.closeCachedConnections()
        self._pool = None
        self.client = None
        previous = self.state
        if previous is State.STARTING:
            error = StartError(
                self.model.id,
                f"process exited with {description} while starting",
                exit_code=code,
                last_lines=self._tail(),
            )
            # Failed first: whoever hears of the failure sees a model that has failed (and
            # cannot join the start that just ended).
            self._note_failure(error)
            self._set_state(State.FAILED)
            self._fail_start_waiters(error)
        elif previous is State.READY:
            self.log.warn(
                "model {model} exited unexpectedly with {status}", model=self.model.id, status=description
            )
            self._set_state(State.STOPPED)
        else:
            self.log.info("model {model} stopped ({status})", model=self.model.id, status=description)
            self._set_state(self._end_state)
        waiters, self._stop_waiters = self._stop_waiters, []
        for waiter in waiters:
            waiter.callback(None)
        if self._start_waiters and self.state in (State.STOPPED, State.FAILED):
            self._begin_start()

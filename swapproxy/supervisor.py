# -*- test-case-name: tests.test_supervisor -*-
"""
Which children run: swap groups, the request queue, concurrency limits, TTL and shutdown.

Every request for a model takes a `Ticket`. Tickets are served in arrival order: a ticket whose
model is ready and conflicts with nothing is granted a `Lease` at once; one that needs other
models stopped waits until those models have no request in flight, and from then on later
tickets for those models wait behind it, so that a busy model cannot keep its group forever.
Models are stopped for a swap only when no request is in flight on them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, DeferredList
from twisted.internet.interfaces import IDelayedCall
from twisted.python.failure import Failure

from swapproxy.config import Config, ModelConfig
from swapproxy.logs import proxy_logger
from swapproxy.upstream import StartError, State, Upstream


class Rejected(Exception):
    """
    A request that is refused before it waits for anything.

    :ivar status: the HTTP status to answer.
    :ivar error_type: the OpenAI-style error type.
    :ivar code: the OpenAI-style error code.
    """

    status = 503
    error_type = "server_error"
    code = "unavailable"


class TooManyRequests(Rejected):
    status = 429
    error_type = "rate_limit_error"
    code = "concurrency_limit"


class ShuttingDown(Rejected):
    status = 503
    error_type = "server_error"
    code = "shutting_down"


class Lease:
    """
    Permission to send one request to a ready model; `release` it when the response is done.
    """

    def __init__(self, supervisor: Supervisor, upstream: Upstream) -> None:
        self._supervisor = supervisor
        self.upstream = upstream
        self.released = False

    def release(self) -> None:
        """
        End this request's claim on the model. Calling it again does nothing.
        """
        if not self.released:
            self.released = True
            self._supervisor._release(self.upstream.model.id)


class Ticket:
    """
    One request's place in the queue, and what it is waiting for.

    :ivar stage: ``queued`` (behind other requests), ``stopping`` (other models are being
        stopped to make room), ``starting`` (this model is loading), ``ready`` or ``failed``.
    :ivar waiting_for: the models that must stop before this one can run.
    :ivar position: 1-based place among the waiting tickets.
    """

    def __init__(self, supervisor: Supervisor, upstream: Upstream, arrived_at: float) -> None:
        self._supervisor = supervisor
        self.upstream = upstream
        self.model_id = upstream.model.id
        self.arrived_at = arrived_at
        self.stage = "queued"
        self.waiting_for: tuple[str, ...] = ()
        self.position = 0
        self.granted_at: float | None = None
        self.error: Exception | None = None
        self._start: Deferred[None] | None = None
        self._result: Deferred[Lease] = Deferred(self._cancel)

    def wait(self) -> Deferred[Lease]:
        """
        The Deferred of this ticket's `Lease`; it fails with `StartError` or `Rejected`.

        Cancelling it withdraws the ticket; a start that others share carries on.
        """
        return self._result

    def _cancel(self, _: Deferred[Lease]) -> None:
        self._supervisor._withdraw(self)


class Supervisor(Service):
    """
    Owns one `Upstream` per configured model and decides which of them run.

    :param config: the loaded configuration.
    :param reactor: provides ``IReactorProcess`` and ``IReactorTime``.
    :param environ: the environment children inherit (``os.environ`` by default).
    :param upstream_factory: makes the `Upstream` of a model (tests pass fakes).
    """

    def __init__(
        self,
        config: Config,
        reactor: Any,
        environ: Mapping[str, str] | None = None,
        upstream_factory: Callable[[ModelConfig], Upstream] | None = None,
    ) -> None:
        self.log = proxy_logger("swapproxy.supervisor")
        self.config = config
        self._reactor = reactor
        if upstream_factory is None:

            def upstream_factory(model: ModelConfig) -> Upstream:
                return Upstream(model, reactor, config.health_check_timeout, environ)

        self.upstreams: dict[str, Upstream] = {}
        for model_id, model in config.models.items():
            upstream = upstream_factory(model)
            upstream.state_observers.append(self._upstream_changed)
            self.upstreams[model_id] = upstream
        self.in_flight: dict[str, int] = {model_id: 0 for model_id in config.models}
        self._queue: list[Ticket] = []
        self._ttl_calls: dict[str, IDelayedCall] = {}
        self._pumping = False
        self._pump_again = False
        self._shutting_down = False
        self._preload: Deferred[None] | None = None

    # -- requests -----------------------------------------------------------------------------

    def request(self, model_id: str) -> Ticket:
        """
        Queue a request for a model.

        :param model_id: a configured model id (aliases are resolved by the caller).
        :raises TooManyRequests: the model already has ``concurrencyLimit`` requests.
        :raises ShuttingDown: swapproxy is stopping.
        """
        if self._shutting_down:
            raise ShuttingDown("swapproxy is shutting down")
        upstream = self.upstreams[model_id]
        load = self.in_flight[model_id] + sum(1 for t in self._queue if t.model_id == model_id)
        if load >= upstream.model.concurrency_limit:
            raise TooManyRequests(
                f"model {model_id!r} already has {load} requests (concurrencyLimit "
                f"{upstream.model.concurrency_limit}); retry later"
            )
        ticket = Ticket(self, upstream, self._reactor.seconds())
        self._queue.append(ticket)
        self._pump()
        return ticket

    def queued(self, model_id: str | None = None) -> int:
        """
        How many requests wait (for one model, or for all).
        """
        return sum(1 for t in self._queue if model_id is None or t.model_id == model_id)

    def _withdraw(self, ticket: Ticket) -> None:
        if ticket in self._queue:
            self._queue.remove(ticket)
        if ticket._start is not None and not ticket._start.called:
            ticket._start.cancel()
        self._pump()

    def _release(self, model_id: str) -> None:
        self.in_flight[model_id] -= 1
        if self.in_flight[model_id] == 0:
            self._arm_ttl(model_id)
        self._pump()

    # -- scheduling ---------------------------------------------------------------------------

    def conflicts(self, model_id: str) -> list[str]:
        """
        The running models that must stop before ``model_id`` may run.
        """
        group = self.config.group_of(model_id)
        result = []
        for other_id, other in self.upstreams.items():
            if other_id == model_id or not other.running:
                continue
            other_group = self.config.group_of(other_id)
            if other_group.id == group.id:
                if group.swap:
                    result.append(other_id)
            elif group.exclusive and not other_group.persistent:
                result.append(other_id)
        return result

    def _pump(self) -> None:
        if self._pumping:
            self._pump_again = True
            return
        self._pumping = True
        try:
            self._pump_again = True
            while self._pump_again:
                self._pump_again = False
                self._schedule()
        finally:
            self._pumping = False

    def _schedule(self) -> None:
        blocked: set[str] = set()
        claimed: set[str] = set()
        position = 0
        for ticket in list(self._queue):
            model_id = ticket.model_id
            upstream = ticket.upstream
            if model_id in blocked:
                position += 1
                ticket.stage, ticket.position = "queued", position
                ticket.waiting_for = tuple(sorted(blocked))
                claimed.add(model_id)
                continue
            conflicts = self.conflicts(model_id)
            if not conflicts and upstream.state is State.READY:
                self._grant(ticket)
                continue
            position += 1
            ticket.position = position
            claimed.add(model_id)
            if conflicts:
                ticket.waiting_for = tuple(conflicts)
                busy = [c for c in conflicts if self.in_flight[c] or c in claimed]
                for other_id in conflicts:
                    if other_id not in busy and self.upstreams[other_id].state is not State.STOPPING:
                        self.log.info(
                            "stopping model {other} to make room for {model}", other=other_id, model=model_id
                        )
                        self._cancel_ttl(other_id)
                        self.upstreams[other_id].stop(self.config.health_check_timeout)
                ticket.stage = "queued" if busy else "stopping"
                blocked.update(conflicts)
                continue
            ticket.waiting_for = ()
            ticket.stage = "starting"
            if ticket._start is None:
                ticket._start = upstream.start()
                ticket._start.addErrback(self._start_failed, ticket)

    def _grant(self, ticket: Ticket) -> None:
        self._queue.remove(ticket)
        model_id = ticket.model_id
        self.in_flight[model_id] += 1
        self._cancel_ttl(model_id)
        ticket.stage = "ready"
        ticket.position = 0
        ticket.granted_at = self._reactor.seconds()
        ticket._result.callback(Lease(self, ticket.upstream))

    def _start_failed(self, failure: Failure, ticket: Ticket) -> None:
        if failure.check(CancelledError):
            return None
        if ticket in self._queue:
            self._queue.remove(ticket)
        ticket.stage = "failed"
        ticket.error = failure.value
        ticket._result.errback(failure)
        self._pump()
        return None

    def _upstream_changed(self, upstream: Upstream, old: State, new: State) -> None:
        self._pump()
        if new is State.READY:
            self._arm_ttl(upstream.model.id)
        elif new is not State.STARTING:
            self._cancel_ttl(upstream.model.id)

    # -- TTL ----------------------------------------------------------------------------------

    def _arm_ttl(self, model_id: str) -> None:
        upstream = self.upstreams[model_id]
        ttl = upstream.model.ttl
        if ttl <= 0 or upstream.state is not State.READY or self.in_flight[model_id]:
            return
        self._cancel_ttl(model_id)
        self._ttl_calls[model_id] = self._reactor.callLater(ttl, self._ttl_expired, model_id)

    def _cancel_ttl(self, model_id: str) -> None:
        call = self._ttl_calls.pop(model_id, None)
        if call is not None and call.active():
            call.cancel()

    def _ttl_expired(self, model_id: str) -> None:
        self._ttl_calls.pop(model_id, None)
        upstream = self.upstreams[model_id]
        if upstream.state is State.READY and not self.in_flight[model_id] and not self.queued(model_id):
            self.log.info(
                "unloading model {model}: idle for its ttl of {ttl}s", model=model_id, ttl=upstream.model.ttl
            )
            upstream.stop()

    # -- unload and shutdown ------------------------------------------------------------------

    def unload(self, model_id: str | None = None) -> Deferred[None]:
        """
        Stop one model, or every model, at once; requests in flight on them are cut.

        :returns: a Deferred that fires when the children have exited.
        """
        targets = [model_id] if model_id is not None else list(self.upstreams)
        stops = []
        for target in targets:
            self._cancel_ttl(target)
            upstream = self.upstreams[target]
            if upstream.running:
                self.log.info("unloading model {model}", model=target)
            stops.append(upstream.stop())
        return DeferredList(stops, consumeErrors=True).addCallback(lambda _: None)

    def startService(self) -> None:
        super().startService()
        if self.config.preload:
            self._preload = Deferred.fromCoroutine(self._run_preload())

    async def _run_preload(self) -> None:
        for model_id in self.config.preload:
            if self._shutting_down:
                return
            self.log.info("preloading model {model}", model=model_id)
            try:
                lease = await self.request(model_id).wait()
            except (StartError, Rejected) as e:
                self.log.warn("preloading {model} failed: {error}", model=model_id, error=str(e))
                continue
            lease.release()

    def stopService(self) -> Deferred[None]:
        """
        Refuse new requests, fail the waiting ones, stop every child and wait for them all.
        """
        super().stopService()
        self._shutting_down = True
        if self._preload is not None and not self._preload.called:
            self._preload.cancel()
            self._preload.addErrback(lambda failure: failure.trap(CancelledError))
        for ticket in list(self._queue):
            self._queue.remove(ticket)
            if ticket._start is not None and not ticket._start.called:
                ticket._start.cancel()
            ticket._result.errback(ShuttingDown("swapproxy is shutting down"))
        for model_id in list(self._ttl_calls):
            self._cancel_ttl(model_id)
        running = [model_id for model_id, up in self.upstreams.items() if up.running]
        if running:
            self.log.info("shutting down: stopping {models}", models=", ".join(running))
        return self.unload()

    def running_upstreams(self) -> list[Upstream]:
        """
        The upstreams that have a child process, in model id order.
        """
        return [up for _, up in sorted(self.upstreams.items()) if up.running]


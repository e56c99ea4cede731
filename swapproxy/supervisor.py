# -*- test-case-name: tests.test_supervisor -*-
"""
Which children run: swap groups or the swap matrix, concurrency limits, leases, TTL, reload and
shutdown.

Every request for a model takes a `Ticket` and waits in the queue of a `Scheduler`
(`swapproxy.scheduler`), which states the policy: service order by ``priority`` then arrival,
requests for a running model collated ahead of older ones for other models within the
``maxOvertakes`` and ``maxWait`` bounds, ``linger``, and never a model started only to be stopped.
The supervisor is its `Placement`: it knows which models are in each other's way (groups, the
matrix, ``memoryBudget``), owns the processes and grants the `Lease` that lets a request go.

`Supervisor.reload` applies a new configuration without dropping a request: a model whose process
settings changed, or that was removed, keeps its old process until the requests in flight on it
are done (it is "retiring"), and a new process is started only once that one has gone.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import attrs
from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, DeferredList
from twisted.internet.interfaces import IDelayedCall

from swapproxy.config import Config, GroupConfig, ModelConfig
from swapproxy.logs import proxy_logger
from swapproxy.budget import MEASURE_DELAY, MemoryBudget
from swapproxy.memory import Footprints, Resident, show_bytes
from swapproxy.reactors import IUpstreamReactor
from swapproxy.scheduler import Scheduler, Ticket
from swapproxy.upstream import StartError, State, Upstream, needs_restart

__all__ = [
    "MEASURE_DELAY", "InsufficientMemory", "Lease", "Rejected", "ReloadResult", "ShuttingDown", "Supervisor",
    "Ticket", "TooManyRequests", "UnknownModel",
]


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


class InsufficientMemory(Rejected):
    """
    The model can never fit in ``memoryBudget``, even with every model that may be stopped stopped.
    """

    status = 507
    error_type = "server_error"
    code = "insufficient_memory"


class UnknownModel(Rejected):
    """
    The model is not configured (a reload removed it, perhaps while the request waited).
    """

    status = 404
    error_type = "invalid_request_error"
    code = "model_not_found"


@attrs.frozen
class ReloadResult:
    """
    What `Supervisor.reload` did, as model ids.

    :ivar added: new models; they start on their first request.
    :ivar changed: models whose command, environment, address or health check changed: the old
        process finishes its requests in flight and stops, the next request starts the new one.
    :ivar removed: models no longer configured; stopped once their requests in flight are done.
    :ivar updated: models with other new settings (ttl, aliases, ...), applied to the running process.
    :ivar unchanged: models whose settings are the same.
    """

    added: tuple[str, ...] = ()
    changed: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    updated: tuple[str, ...] = ()
    unchanged: tuple[str, ...] = ()


@attrs.define
class _Retiree:
    """
    A process a reload replaced or removed: it serves its requests in flight, then stops.

    :ivar group: the group the model was in, which decides what it conflicts with until it is gone.
    """

    group: GroupConfig
    in_flight: int


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
            self._supervisor._release(self.upstream)


class Supervisor(Service):
    """
    Owns one `Upstream` per configured model and decides which of them run.

    :param config: the loaded configuration.
    :param reactor: spawns the models' processes, keeps time and connects to the models.
    :param environ: the environment children inherit (``os.environ`` by default).
    :param upstream_factory: makes the `Upstream` of a model (tests pass fakes).
    :param footprints: measures what the models use (tests pass fakes).

    ``config``, ``upstreams`` and ``in_flight`` change on `reload`: read them when needed, do not
    keep them.
    """

    def __init__(
        self,
        config: Config,
        reactor: IUpstreamReactor,
        environ: Mapping[str, str] | None = None,
        upstream_factory: Callable[[ModelConfig], Upstream] | None = None,
        footprints: Footprints | None = None,
    ) -> None:
        self.log = proxy_logger("swapproxy.supervisor")
        self.config = config
        self._reactor = reactor
        #: The ``memoryBudget``, and what the models were measured to use.
        self.budget = MemoryBudget(config, reactor, footprints if footprints is not None else Footprints(reactor),
                                   self._residents)
        if upstream_factory is None:

            def upstream_factory(model: ModelConfig) -> Upstream:
                return Upstream(model, reactor, environ)

        self._upstream_factory = upstream_factory
        self._upstream_watchers: list[Callable[[Upstream], None]] = []
        #: Called with (stopped model id, model id it made room for) each time a swap stops a model.
        self.swap_observers: list[Callable[[str, str], None]] = []
        #: Called after each scheduling pass: requests in flight or queued may have changed.
        self.change_observers: list[Callable[[], None]] = []
        self.upstreams: dict[str, Upstream] = {}
        self.in_flight: dict[str, int] = {}
        self._retiring: dict[Upstream, _Retiree] = {}
        for model in config.models.values():
            self._add_upstream(model)
        self._scheduler = Scheduler(self, reactor, lambda: self.config.scheduler, self._pump)
        #: When each model's last request in flight ended.
        self.last_used: dict[str, float] = {}
        self._ttl_calls: dict[str, IDelayedCall] = {}
        self._pumping = False
        self._pump_again = False
        self._shutting_down = False
        self._preloads: list[Deferred[None]] = []

    def _add_upstream(self, model: ModelConfig) -> None:
        upstream = self._upstream_factory(model)
        upstream.state_observers.append(self._upstream_changed)
        self.upstreams[model.id] = upstream
        self.in_flight[model.id] = 0
        for watcher in list(self._upstream_watchers):
            watcher(upstream)

    def each_upstream(self, watcher: Callable[[Upstream], None]) -> None:
        """
        Call ``watcher`` with every current upstream now, and with each one a reload adds later.

        This is how per-model companions (load trackers, metrics) follow reloads.
        """
        self._upstream_watchers.append(watcher)
        for upstream in list(self.upstreams.values()):
            watcher(upstream)

    # -- requests -----------------------------------------------------------------------------

    def request(self, model_id: str, defer_start: bool = False, load_only: bool = False) -> Ticket:
        """
        Queue a request for a model.

        :param model_id: a configured model id (aliases are resolved by the caller).
        :param defer_start: if this request is the one that starts the model, or stops others
            to make room for it, do that only after the reactor's next round of I/O, so that
            the bytes the caller writes now reach its client first (the loading stream's first
            byte must not wait for a fork, a signal or a walk of a process tree).
        :param load_only: no request waits: the caller only wants the model loaded (it is not
            counted by ``queued(requests_only=True)``).
        :raises TooManyRequests: the model already has ``concurrencyLimit`` requests.
        :raises ShuttingDown: swapproxy is stopping.
        :raises UnknownModel: the model is not configured (a reload removed it).
        """
        if self._shutting_down:
            raise ShuttingDown("swapproxy is shutting down")
        upstream = self.upstreams.get(model_id)
        if upstream is None:
            raise UnknownModel(f"model {model_id!r} is not configured; see GET /v1/models")
        load = self.in_flight[model_id] + self._scheduler.queued(model_id)
        if load >= upstream.model.concurrency_limit:
            raise TooManyRequests(
                f"model {model_id!r} already has {load} requests (concurrencyLimit "
                f"{upstream.model.concurrency_limit}); retry later"
            )
        shortfall = None if upstream.running else self.budget.never_fits(self.config.models[model_id])
        if shortfall is not None:
            raise InsufficientMemory(shortfall)
        ticket = self._scheduler.add(upstream, defer_start, self._withdraw, load_only)
        self._pump()
        # Only the start this request itself would trigger is put off; later ones are not.
        ticket.defer_start = False
        return ticket

    def queued(self, model_id: str | None = None, requests_only: bool = False) -> int:
        """
        How many tickets wait (for one model, or for all); with ``requests_only``, not counting
        the loads no request waits for.
        """
        return self._scheduler.queued(model_id, requests_only)

    def _withdraw(self, ticket: Ticket) -> None:
        self._scheduler.withdraw(ticket)
        self._pump()

    def _release(self, upstream: Upstream) -> None:
        model_id = upstream.model.id
        retiree = self._retiring.get(upstream)
        if retiree is not None:
            retiree.in_flight -= 1
            if retiree.in_flight <= 0:
                self._stop_retiree(upstream)
        elif self.upstreams.get(model_id) is upstream:
            self.in_flight[model_id] -= 1
            self.last_used[model_id] = self._reactor.seconds()
            if self.in_flight[model_id] == 0:
                self._arm_ttl(model_id)
        self._pump()
        if self.upstreams.get(model_id) is upstream and upstream.state is State.READY:
            self.budget.measure(upstream)

    def in_flight_of(self, upstream: Upstream) -> int:
        """
        The requests in flight on ``upstream``, a current or a retiring process.
        """
        retiree = self._retiring.get(upstream)
        if retiree is not None:
            return retiree.in_flight
        if self.upstreams.get(upstream.model.id) is upstream:
            return self.in_flight[upstream.model.id]
        return 0

    # -- placement: which models are in each other's way --------------------------------------

    def conflicts(self, model_id: str) -> list[str]:
        """
        The running models that must stop before ``model_id`` may run.
        """
        return list(dict.fromkeys(upstream.model.id for upstream in self.conflicting(model_id)))

    def conflicting(self, model_id: str) -> list[Upstream]:
        """
        The running processes that must stop before ``model_id`` may start: by its group or the
        swap matrix, then, with a ``memoryBudget``, the least recently used models that must go
        for it to fit.
        """
        placement = self._placement_conflicts(model_id)
        if self.budget.limit is None:
            return placement
        return placement + self.budget.evictions(self.upstreams[model_id], placement)

    def _placement_conflicts(self, model_id: str) -> list[Upstream]:
        if self.config.matrix is not None:
            return self._matrix_evictions(model_id)
        group = self.config.group_of(model_id)
        result = []
        for other_id, other in self.upstreams.items():
            if other_id != model_id and other.running and _displaces(group, self.config.group_of(other_id)):
                result.append(other)
        for other, retiree in self._retiring.items():
            if other.running and (self._holds_port_of(other, model_id) or _displaces(group, retiree.group)):
                result.append(other)
        return result

    def _holds_port_of(self, retiring: Upstream, model_id: str) -> bool:
        """
        Whether a process a reload replaced listens where ``model_id``'s new server is to listen:
        its own model's, or another's whose ``${PORT}`` the reload shifted. The new server waits
        for it in any case.
        """
        port = self.config.models[model_id].port
        return retiring.model.id == model_id or (port is not None and retiring.model.port == port)

    # -- memory -------------------------------------------------------------------------------

    @property
    def memory_budget(self) -> int | None:
        """
        The bytes the running models may use together; ``None`` for no budget.
        """
        return self.budget.limit

    def memory_of(self, model_id: str) -> dict[str, int | None]:
        """
        A model's declared (``memory``) and measured footprints in bytes; ``None`` when unknown.
        """
        return self.budget.memory_of(self.config.models.get(model_id), model_id)

    def _processes(self) -> list[Upstream]:
        return [up for up in self.upstreams.values() if up.running] + [up for up in self._retiring if up.running]

    def _memory_protected(self, upstream: Upstream, model_id: str) -> bool:
        """
        Whether a memory shortage for ``model_id`` may not stop ``upstream`` (a member of another,
        ``persistent``, group).
        """
        if self.config.matrix is not None or self.upstreams.get(upstream.model.id) is not upstream:
            return False
        group = self.config.group_of(upstream.model.id)
        return group.persistent and group.id != self.config.group_of(model_id).id

    def _residents(self, model_id: str, leaving: list[Upstream]) -> list[Resident]:
        """
        The running processes, except those ``leaving``, as the budget sees them when
        ``model_id`` must start.
        """
        return [
            Resident(up, up.model.id, self.budget.need(up.model), up.stopping,
                     bool(self.in_flight_of(up) or self.queued(up.model.id)),
                     self.last_used.get(up.model.id, up.started_at or 0.0), self._memory_protected(up, model_id))
            for up in self._processes() if up not in leaving
        ]

    def _matrix_evictions(self, model_id: str) -> list[Upstream]:
        assert self.config.matrix is not None
        running = [up for up in self.upstreams.values() if up.running]
        running += [up for up in self._retiring if up.running]
        decision = self.config.matrix.solve(model_id, list(dict.fromkeys(up.model.id for up in running)))
        return [
            up for up in running
            if up.model.id in decision.evict or (up in self._retiring and self._holds_port_of(up, model_id))
        ]

    def _pump(self) -> None:
        if self._pumping:
            self._pump_again = True
            return
        self._pumping = True
        try:
            self._pump_again = True
            while self._pump_again:
                self._pump_again = False
                self._scheduler.schedule()
        finally:
            self._pumping = False
        for observer in list(self.change_observers):
            observer()

    def make_room(self, other: Upstream, model_id: str) -> None:
        """
        Stop ``other`` so that ``model_id`` can start, and say why.
        """
        why = (self._why_evicted(model_id) if other in self._placement_conflicts(model_id)
               else f" (memoryBudget {show_bytes(self.memory_budget or 0)})")
        self.log.info("stopping model {other} to make room for {model}{why}", other=other.model.id,
                      model=model_id, why=why)
        for observer in list(self.swap_observers):
            observer(other.model.id, model_id)
        if self.upstreams.get(other.model.id) is other:
            self._cancel_ttl(other.model.id)
        # Its own unloadTimeout (llama-swap gives a swap healthCheckTimeout).
        other.stop()

    def would_displace(self, upstream: Upstream, claimed: set[Upstream]) -> bool:
        """
        Whether a model that one of the ``claimed`` models (wanted by requests ahead) needs
        stopped would be ``upstream``'s model, once it runs.
        """
        model_id = upstream.model.id
        matrix = self.config.matrix
        if matrix is not None:
            running = [up.model.id for up in self.upstreams.values() if up.running] + [model_id]
            return any(model_id in matrix.solve(other.model.id, running).evict
                       for other in claimed if other is not upstream)
        group = self.config.group_of(model_id)
        for other in claimed:
            if other is upstream:
                continue
            try:
                other_group = self.config.group_of(other.model.id)
            except KeyError:
                continue
            if _displaces(other_group, group):
                return True
        return False

    def lease(self, upstream: Upstream) -> Lease:
        """
        Count one more request in flight on ``upstream``, a ready current process, and make its
        `Lease`.
        """
        model_id = upstream.model.id
        self.in_flight[model_id] += 1
        self._cancel_ttl(model_id)
        return Lease(self, upstream)

    def unfit(self, ticket: Ticket) -> Exception | None:
        """
        Why ``ticket``'s model can never run: it cannot fit in ``memoryBudget``; ``None`` when it can.
        """
        shortfall = self.budget.never_fits(self.config.models[ticket.model_id])
        return InsufficientMemory(shortfall) if shortfall is not None else None

    def idle_since(self, upstream: Upstream) -> float | None:
        """
        When the last request on ``upstream`` ended, if it is its model's current process and
        has served one; ``None`` otherwise.
        """
        model_id = upstream.model.id
        if self.upstreams.get(model_id) is not upstream:
            return None
        return self.last_used.get(model_id)

    def _why_evicted(self, model_id: str) -> str:
        """
        For the log: the matrix set a swap makes room for, and its cost.
        """
        matrix = self.config.matrix
        if matrix is None:
            return ""
        running = list(dict.fromkeys(up.model.id for up in self.upstreams.values() if up.running))
        decision = matrix.solve(model_id, running)
        if not decision.set_name:
            return f" ({model_id} is in no matrix set, so it runs alone)"
        return (f" (matrix set {decision.set_name}: {' & '.join(decision.members)},"
                f" evict cost {decision.cost})")

    def exclusive(self, first: str, second: str) -> bool:
        """
        Whether two models cannot run together (by their groups or the matrix).
        """
        if self.config.matrix is not None:
            return bool(self.config.matrix.solve(first, [second]).evict)
        group_of = self.config.group_of
        try:
            first_group, second_group = group_of(first), group_of(second)
        except KeyError:  # a model a reload removed
            return True
        return _displaces(first_group, second_group) or _displaces(second_group, first_group)

    def _upstream_changed(self, upstream: Upstream, old: State, new: State) -> None:
        if upstream in self._retiring:
            if not upstream.running:
                del self._retiring[upstream]
                self.log.info("the replaced process of model {model} has ended", model=upstream.model.id)
            self._pump()
            return
        if new is State.STARTING:
            self._scheduler.unserved.add(upstream)
        elif new is not State.READY:
            self._scheduler.unserved.discard(upstream)
        self.budget.state_changed(upstream, new)
        self._pump()
        if self.upstreams.get(upstream.model.id) is not upstream:
            return
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

    def unload_due(self, model_id: str) -> float | None:
        """
        When (clock seconds) the TTL will unload an idle model; ``None`` while no TTL timer runs
        (``ttl`` 0, requests in flight or queued, or not ready).
        """
        call = self._ttl_calls.get(model_id)
        return call.getTime() if call is not None and call.active() else None

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
            upstream = self.upstreams.get(target)
            if upstream is None:
                continue
            self._cancel_ttl(target)
            if upstream.running:
                self.log.info("unloading model {model}", model=target)
            stops.append(upstream.stop())
        for retiree in list(self._retiring):
            if model_id is None or retiree.model.id == model_id:
                stops.append(retiree.stop())
        return DeferredList(stops, consumeErrors=True).addCallback(lambda _: None)

    def startService(self) -> None:
        super().startService()
        self.preload(self.config.preload)

    def preload(self, model_ids: Sequence[str]) -> None:
        """
        Start these models one after another in the background, as ``hooks.on_startup.preload``
        does at start-up (a reload that adds preloaded models calls it too). A model that fails is
        logged and skipped.
        """
        if model_ids:
            run = Deferred.fromCoroutine(self._run_preload(tuple(model_ids)))
            self._preloads.append(run)
            run.addBoth(self._preload_done, run)

    def _preload_done(self, result: object, run: Deferred[None]) -> object:
        self._preloads.remove(run)
        return result

    async def _run_preload(self, model_ids: tuple[str, ...]) -> None:
        for model_id in model_ids:
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
        self._scheduler.stop()
        for run in list(self._preloads):
            run.addErrback(lambda failure: failure.trap(CancelledError))
            run.cancel()
        for ticket in list(self._scheduler.tickets):
            self._scheduler.fail(ticket, ShuttingDown("swapproxy is shutting down"))
        self.budget.stop()
        for model_id in list(self._ttl_calls):
            self._cancel_ttl(model_id)
        running = [model_id for model_id, up in self.upstreams.items() if up.running]
        running += [f"{up.model.id} (replaced)" for up in self._retiring if up.running]
        if running:
            self.log.info("shutting down: stopping {models}", models=", ".join(running))
        return self.unload()

    def running_upstreams(self) -> list[Upstream]:
        """
        The upstreams that have a child process, in model id order.

        A process that a reload replaced and that still finishes its requests is not among them;
        see `retiring_upstreams`.
        """
        return [up for _, up in sorted(self.upstreams.items()) if up.running]

    def retiring_upstreams(self) -> list[Upstream]:
        """
        The processes a reload replaced or removed that have not ended yet, in model id order.
        """
        return sorted((up for up in self._retiring if up.running), key=lambda up: up.model.id)

    # -- reload -------------------------------------------------------------------------------

    def reload(self, config: Config) -> ReloadResult:
        """
        Switch to a new, already validated, configuration without dropping a request.

        Models whose settings did not change keep their process; those whose other settings
        changed (`needs_restart` is false) keep it too, with the new settings. A changed or removed
        model's process serves its requests in flight and then stops; requests that wait for a
        changed model move to its new process, which starts once the old one has gone. Requests
        that wait for a removed model fail with `UnknownModel`.

        :raises ShuttingDown: swapproxy is stopping.
        """
        if self._shutting_down:
            raise ShuttingDown("swapproxy is shutting down")
        old = self.config
        removed = tuple(mid for mid in old.models if mid not in config.models)
        added, changed, updated, unchanged = [], [], [], []
        for model_id, model in config.models.items():
            before = old.models.get(model_id)
            if before is None:
                added.append(model_id)
            elif needs_restart(before, model):
                changed.append(model_id)
            elif before != model:
                updated.append(model_id)
            else:
                unchanged.append(model_id)
        self.config = config
        self.budget.reconfigure(old, config)
        retired = []
        for model_id in removed + tuple(changed):
            upstream = self.upstreams.pop(model_id)
            in_flight = self.in_flight.pop(model_id)
            self._cancel_ttl(model_id)
            if upstream.running:
                self._retiring[upstream] = _Retiree(old.group_of(model_id), in_flight)
                retired.append(upstream)
        for model_id in added + changed:
            self._add_upstream(config.models[model_id])
        # In place and in config order, as at start-up: the web layer reads these dicts.
        upstreams = [(model_id, self.upstreams[model_id]) for model_id in config.models]
        counts = [(model_id, self.in_flight[model_id]) for model_id in config.models]
        self.upstreams.clear()
        self.upstreams.update(upstreams)
        self.in_flight.clear()
        self.in_flight.update(counts)
        for model_id in updated + unchanged:
            self.upstreams[model_id].reconfigure(config.models[model_id])
            if model_id in updated:
                self._cancel_ttl(model_id)
                self._arm_ttl(model_id)
        for ticket in list(self._scheduler.tickets):
            if ticket.model_id in removed:
                self._scheduler.fail(
                    ticket, UnknownModel(f"model {ticket.model_id!r} was removed from the configuration")
                )
            elif ticket.model_id in changed:
                ticket.move_to(self.upstreams[ticket.model_id])
        for upstream in retired:
            if self._retiring[upstream].in_flight == 0:
                self._stop_retiree(upstream)
        self._pump()
        return ReloadResult(tuple(added), tuple(changed), removed, tuple(updated), tuple(unchanged))

    def _stop_retiree(self, upstream: Upstream) -> None:
        if upstream.running and not upstream.stopping:
            self.log.info("stopping the replaced process of model {model}", model=upstream.model.id)
        upstream.stop()


def _displaces(group: GroupConfig, other: GroupConfig) -> bool:
    """
    Whether starting a member of ``group`` stops a running member of ``other``.
    """
    if other.id == group.id:
        return group.swap
    return group.exclusive and not other.persistent

# -*- test-case-name: tests.test_supervisor -*-
"""
Which children run: swap groups or the swap matrix, the request queue, concurrency limits, TTL
and shutdown.

Every request for a model takes a `Ticket`. A ticket whose model is ready and conflicts with
nothing is granted a `Lease` at once. The others wait, in service order: by ``priority``, then
arrival. The first waiting ticket whose model cannot run yet has the models in its way stopped as
soon as no request is in flight on them (never mid-request), then its model is started.

Requests are *collated*: while a model runs, later requests for it are granted ahead of older
requests that wait for other models, so a burst for one model is served by one start instead of
a swap per change of model. That is bounded: once a waiting ticket has been overtaken by
``maxOvertakes`` later requests on the models in its way, or has waited ``maxWait`` seconds, it
is *due*: those models get no new requests until it has run, and due tickets go first in arrival
order. ``maxOvertakes: 0`` is strict order: every ticket holds back the models in its way, as
llama-swap's FIFO does without its collation.

A model is never stopped while it starts for a waiting ticket, and a model that has not served
anyone since it started serves its first waiting ticket before anything can stop it; so no model
is started only to be stopped.

`Supervisor.reload` applies a new configuration without dropping a request: a model whose process
settings changed, or that was removed, keeps its old process until the requests in flight on it
are done (it is "retiring"), and a new process is started only once that one has gone.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import attrs
from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, DeferredList
from twisted.internet.interfaces import IDelayedCall
from twisted.python.failure import Failure

from swapproxy.config import Config, GroupConfig, ModelConfig
from swapproxy.logs import proxy_logger
from swapproxy.memory import Footprints, Resident, available_memory, make_room, never_fits, show_bytes
from swapproxy.upstream import StartError, State, Upstream, needs_restart


#: Seconds after a model becomes ready that its footprint is first measured.
MEASURE_DELAY = 1.0


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


class Ticket:
    """
    One request's place in the queue, and what it is waiting for.

    :ivar stage: ``queued`` (behind other requests), ``stopping`` (other models are being
        stopped to make room), ``starting`` (this model is loading), ``ready`` or ``failed``.
    :ivar waiting_for: the models that must stop, or be served, before this one runs.
    :ivar position: 1-based place in the order the waiting tickets are expected to be served.
    :ivar reason: why it waits, for people: "3 requests for qwen finish first, then gemma starts".
    :ivar overtaken: how many later requests were served, on the models in its way, while it waited.
    :ivar due: whether it may no longer be overtaken (see the module docstring).
    :ivar load_only: whether it is a load that no request waits for (``/api/models/load``).
    """

    def __init__(self, supervisor: Supervisor, upstream: Upstream, arrived_at: float, seq: int) -> None:
        self._supervisor = supervisor
        self.upstream = upstream
        self.model_id = upstream.model.id
        self.arrived_at = arrived_at
        self.seq = seq
        self.stage = "queued"
        self.waiting_for: tuple[str, ...] = ()
        self.position = 0
        self.reason = ""
        self.overtaken = 0
        self.due = False
        self.granted_at: float | None = None
        self.error: Exception | None = None
        self._start: Deferred[None] | None = None
        self.defer_start = False
        self.load_only = False
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
    :param footprints: measures what the models use (tests pass fakes).

    ``config``, ``upstreams`` and ``in_flight`` change on `reload`: read them when needed, do not
    keep them.
    """

    def __init__(
        self,
        config: Config,
        reactor: Any,
        environ: Mapping[str, str] | None = None,
        upstream_factory: Callable[[ModelConfig], Upstream] | None = None,
        footprints: Footprints | None = None,
    ) -> None:
        self.log = proxy_logger("swapproxy.supervisor")
        self.config = config
        self._reactor = reactor
        self.footprints = footprints if footprints is not None else Footprints(reactor)
        #: Bytes the running models may use together; ``None`` for no budget.
        self.memory_budget = available_memory() if config.memory_budget_auto else config.memory_budget
        if upstream_factory is None:

            def upstream_factory(model: ModelConfig) -> Upstream:
                return Upstream(
                    model,
                    reactor,
                    self.config.health_check_timeout,
                    environ,
                    health_check_ceiling=self.config.start_ceiling,
                )

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
        self._queue: list[Ticket] = []
        self._arrivals = itertools.count()
        #: Upstreams that started and have not granted a request since.
        self._unserved: set[Upstream] = set()
        #: The timer that looks at the queue again: when the oldest held-back ticket reaches
        #: ``maxWait``, or a model's ``linger`` ends.
        self._wakeup_call: IDelayedCall | None = None
        #: When each model's last request in flight ended.
        self.last_used: dict[str, float] = {}
        #: The first measurement of each ready model's footprint, due `MEASURE_DELAY` after ready.
        self._measure_calls: dict[Upstream, IDelayedCall] = {}
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
        load = self.in_flight[model_id] + sum(1 for t in self._queue if t.model_id == model_id)
        if load >= upstream.model.concurrency_limit:
            raise TooManyRequests(
                f"model {model_id!r} already has {load} requests (concurrencyLimit "
                f"{upstream.model.concurrency_limit}); retry later"
            )
        shortfall = None if upstream.running else self._never_fits(model_id)
        if shortfall is not None:
            raise InsufficientMemory(shortfall)
        ticket = Ticket(self, upstream, self._reactor.seconds(), next(self._arrivals))
        ticket.defer_start = defer_start
        ticket.load_only = load_only
        self._queue.append(ticket)
        self._pump()
        # Only the start this request itself would trigger is put off; later ones are not.
        ticket.defer_start = False
        return ticket

    def queued(self, model_id: str | None = None, requests_only: bool = False) -> int:
        """
        How many tickets wait (for one model, or for all); with ``requests_only``, not counting
        the loads no request waits for.
        """
        return sum(1 for t in self._queue
                   if (model_id is None or t.model_id == model_id) and not (requests_only and t.load_only))

    def _withdraw(self, ticket: Ticket) -> None:
        if ticket in self._queue:
            self._queue.remove(ticket)
        if ticket._start is not None and not ticket._start.called:
            ticket._start.cancel()
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
            self._measure(upstream)

    def _in_flight_of(self, upstream: Upstream) -> int:
        retiree = self._retiring.get(upstream)
        if retiree is not None:
            return retiree.in_flight
        if self.upstreams.get(upstream.model.id) is upstream:
            return self.in_flight[upstream.model.id]
        return 0

    # -- scheduling ---------------------------------------------------------------------------

    def conflicts(self, model_id: str) -> list[str]:
        """
        The running models that must stop before ``model_id`` may run.
        """
        return list(dict.fromkeys(upstream.model.id for upstream in self._conflicting(model_id)))

    def _conflicting(self, model_id: str) -> list[Upstream]:
        """
        The running processes that must stop before ``model_id`` may start: by its group or the
        swap matrix, then, with a ``memoryBudget``, the least recently used models that must go
        for it to fit.
        """
        placement = self._placement_conflicts(model_id)
        if self.memory_budget is None:
            return placement
        return placement + self._memory_evictions(model_id, placement)

    def _placement_conflicts(self, model_id: str) -> list[Upstream]:
        if self.config.matrix is not None:
            return self._matrix_evictions(model_id)
        group = self.config.group_of(model_id)
        result = []
        for other_id, other in self.upstreams.items():
            if other_id != model_id and other.running and _displaces(group, self.config.group_of(other_id)):
                result.append(other)
        for other, retiree in self._retiring.items():
            # A model's retiring process holds its port: the new one waits for it in any case.
            if other.running and (other.model.id == model_id or _displaces(group, retiree.group)):
                result.append(other)
        return result

    # -- memory -------------------------------------------------------------------------------

    def memory_of(self, model_id: str) -> dict[str, int | None]:
        """
        A model's declared (``memory``) and measured footprints in bytes; ``None`` when unknown.
        """
        model = self.config.models.get(model_id)
        return {"declared": model.memory if model is not None else None,
                "measured": self.footprints.measured.get(model_id)}

    def _need(self, model: ModelConfig) -> int:
        """
        What a model is counted for: its ``memory``, else what it was measured to use, else 0.
        """
        return model.memory or self.footprints.measured.get(model.id, 0)

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
            Resident(up, up.model.id, self._need(up.model), up.stopping,
                     bool(self._in_flight_of(up) or self.queued(up.model.id)),
                     self.last_used.get(up.model.id, up.started_at or 0.0), self._memory_protected(up, model_id))
            for up in self._processes() if up not in leaving
        ]

    def _memory_evictions(self, model_id: str, placement: list[Upstream]) -> list[Upstream]:
        """
        The models to stop, beyond ``placement``, for ``model_id`` to fit in the budget.
        """
        assert self.memory_budget is not None
        target = self.upstreams[model_id]
        if target.running:
            return []
        room = make_room(self._need(target.model), self.memory_budget, self._residents(model_id, placement))
        return [resident.process for resident in room]

    def _never_fits(self, model_id: str) -> str | None:
        """
        Why ``model_id`` cannot fit in the memory budget even with every model stopped that may
        be; ``None`` when it can (or there is no budget).
        """
        if self.memory_budget is None:
            return None
        model = self.config.models[model_id]
        return never_fits(model_id, self._need(model), "declared" if model.memory else "measured",
                          self.memory_budget, self._residents(model_id, []))

    def _first_measure(self, upstream: Upstream) -> None:
        del self._measure_calls[upstream]
        self._measure(upstream, force=True)

    def _measure(self, upstream: Upstream, force: bool = False) -> None:
        self.footprints.measure(upstream.model.id, upstream.pid, force).addErrback(
            lambda failure: self.log.failure("measuring the memory of {model}", failure, model=upstream.model.id))

    def _matrix_evictions(self, model_id: str) -> list[Upstream]:
        assert self.config.matrix is not None
        running = [up for up in self.upstreams.values() if up.running]
        running += [up for up in self._retiring if up.running]
        decision = self.config.matrix.solve(model_id, list(dict.fromkeys(up.model.id for up in running)))
        return [
            up for up in running
            if up.model.id in decision.evict or (up.model.id == model_id and up in self._retiring)
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
                self._schedule()
        finally:
            self._pumping = False
        for observer in list(self.change_observers):
            observer()

    def _schedule(self) -> None:
        """
        One look at the queue: grant what can be granted, stop what is in the way of the first
        waiting tickets, start what can start, then tell each waiting ticket where it stands.
        """
        order = self._service_order()
        strict = self.config.scheduler.strict
        cache: dict[str, list[Upstream]] = {}

        def in_way(model_id: str) -> list[Upstream]:
            if model_id not in cache:
                cache[model_id] = self._conflicting(model_id)
            return cache[model_id]

        # 1. Grants. A ticket that may no longer be overtaken holds back the models in its way.
        first_riders = self._first_riders(order)
        held: set[Upstream] = set()
        for ticket in order:
            if strict or ticket.due:
                held.update(in_way(ticket.model_id))
            if ticket.upstream in held and ticket not in first_riders:
                continue
            if not in_way(ticket.model_id) and ticket.upstream.state is State.READY:
                for now_due in self._grant(ticket, in_way):
                    held.update(in_way(now_due.model_id))

        # 2. Stops and starts, for the waiting tickets in service order (the state changes as we go).
        order = [ticket for ticket in order if ticket in self._queue]
        first_riders = self._first_riders(order)
        claimed = {ticket.upstream for ticket in first_riders}
        wakeups: list[float] = []
        for ticket in order:
            upstream = ticket.upstream
            if ticket not in self._queue or (upstream in held and ticket not in first_riders):
                continue
            shortfall = None if upstream.running else self._never_fits(ticket.model_id)
            if shortfall is not None:
                # What it was measured to need, or what persistent models hold, grew meanwhile.
                self._fail_ticket(ticket, InsufficientMemory(shortfall))
                continue
            conflicts = self._conflicting(ticket.model_id)
            if conflicts and ticket.defer_start:
                # The request that would stop them answers its client first: signals and walks
                # of the process tree wait for the reactor's next round of I/O, as the start does.
                self._after_io(self._pump)
            elif conflicts:
                for other in conflicts:
                    if other in claimed or self._in_flight_of(other) or other.stopping:
                        continue
                    lingers_until = self._lingers_until(other, ticket)
                    if lingers_until is not None:
                        # Kept for its follow-up also against the tickets behind this one.
                        claimed.add(other)
                        wakeups.append(lingers_until)
                        continue
                    self._make_room(other, ticket.model_id)
            elif upstream.state is not State.READY and (ticket._start is None or ticket._start.called):
                if upstream.stopping or (
                        not upstream.running and self._would_displace(upstream, claimed)):
                    # Wait for it to exit (a start now would restart it behind our back), and do
                    # not put it in the way of a request ahead of this one.
                    pass
                elif ticket.defer_start and not upstream.running:
                    self._after_io(self._pump)
                else:
                    ticket._start = upstream.start()
                    ticket._start.addErrback(self._start_failed, ticket)
            claimed.add(upstream)

        # 3. What each waiting ticket is told.
        self._describe([ticket for ticket in order if ticket in self._queue])
        self._arm_wakeup(wakeups)

    def _after_io(self, call: Callable[[], None]) -> None:
        """
        Call ``call`` after the reactor's next round of I/O, which flushes what was written now.

        A reactor runs the calls that are due before it polls its sockets: ``callLater(0)`` alone
        would run first. The call it makes runs on the turn after the poll.
        """
        self._reactor.callLater(0, self._reactor.callLater, 0, call)

    def _make_room(self, other: Upstream, model_id: str) -> None:
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

    def _would_displace(self, upstream: Upstream, claimed: set[Upstream]) -> bool:
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

    def _service_order(self) -> list[Ticket]:
        """
        The waiting tickets in the order they are served: due tickets first, by arrival; then by
        priority (higher first), then arrival. Marks the tickets that ``maxWait`` has made due.
        """
        policy = self.config.scheduler
        now = self._reactor.seconds()
        priority = policy.priority
        if policy.max_wait > 0 and not policy.strict:
            for ticket in self._queue:
                if not ticket.due and ticket.arrived_at + policy.max_wait <= now:  # as _arm_wakeup reckons
                    ticket.due = True
        return sorted(
            self._queue,
            key=lambda t: (0, 0, t.seq) if t.due else (1, -priority.get(t.model_id, 0), t.seq),
        )

    def _first_riders(self, order: list[Ticket]) -> set[Ticket]:
        """
        For each model that started and has served no one yet, its first waiting ticket: it is
        served before anything can stop the model, so that no start is wasted.
        """
        riders: dict[Upstream, Ticket] = {}
        for ticket in order:
            if ticket.upstream in self._unserved:
                riders.setdefault(ticket.upstream, ticket)
        return set(riders.values())

    def _grant(self, ticket: Ticket, in_way: Callable[[str], list[Upstream]] | None = None) -> list[Ticket]:
        """
        Give ``ticket`` its lease; count it against the older tickets whose way it stands in.

        :returns: the tickets this overtaking made due.
        """
        self._queue.remove(ticket)
        upstream = ticket.upstream
        model_id = ticket.model_id
        self.in_flight[model_id] += 1
        self._unserved.discard(upstream)
        self._cancel_ttl(model_id)
        ticket.stage = "ready"
        ticket.position = 0
        ticket.reason = ""
        ticket.granted_at = self._reactor.seconds()
        now_due = []
        limit = self.config.scheduler.max_overtakes
        if in_way is not None and limit > 0:
            for waiting in self._queue:
                if waiting.seq < ticket.seq and not waiting.due and upstream in in_way(waiting.model_id):
                    waiting.overtaken += 1
                    if waiting.overtaken >= limit:
                        waiting.due = True
                        now_due.append(waiting)
        ticket._result.callback(Lease(self, upstream))
        return now_due

    def _describe(self, order: list[Ticket]) -> None:
        """
        Set each waiting ticket's stage, position, ``waiting_for`` and reason from the order in
        which the tickets are expected to be served: in batches of one model, a starting model's
        batch first, the others in service order. A ticket joins the batch of its model unless a
        ticket that may not be overtaken (strict order, or due) stands between them.
        """
        strict = self.config.scheduler.strict
        batches: list[tuple[Upstream, list[Ticket]]] = []
        open_batch: dict[Upstream, list[Ticket]] = {}
        for ticket in order:
            upstream = ticket.upstream
            if upstream in open_batch:
                open_batch[upstream].append(ticket)
            else:
                open_batch[upstream] = [ticket]
                batches.append((upstream, open_batch[upstream]))
            if strict or ticket.due:
                for other in list(open_batch):
                    if other is not upstream and self._exclusive(other.model.id, ticket.model_id):
                        del open_batch[other]
        # The riders of a start are served first, wherever they are in the order.
        starting = {}
        for batch in batches:
            if batch[0].state is State.STARTING:
                starting.setdefault(batch[0], id(batch))
        batches.sort(key=lambda batch: starting.get(batch[0]) != id(batch))
        position = 0
        ahead: list[tuple[str, int]] = []
        for upstream, tickets in batches:
            model_id = upstream.model.id
            conflicts = self._conflicting(model_id)
            in_way = list(dict.fromkeys(c.model.id for c in conflicts))
            busy = [(c.model.id, self._in_flight_of(c)) for c in conflicts if self._in_flight_of(c)]
            before = [(other, count) for other, count in ahead if other == model_id or self._exclusive(other, model_id)]
            if not in_way and not before:
                # Starting, or just became ready (the next pass grants it).
                ready = upstream.state is State.READY
                stage, waiting_for, reason = "starting", (), f"{model_id} is {'ready' if ready else 'starting'}"
            elif in_way and not before and not busy:
                verb = "is" if len(in_way) == 1 else "are"
                stage, waiting_for = "stopping", tuple(in_way)
                reason = f"{_and(in_way)} {verb} stopping to make room for {model_id}"
            else:
                first = _merge(busy + before)
                stage = "queued"
                waiting_for = tuple(dict.fromkeys(in_way + [m for m, _ in first if m != model_id]))
                then = f"{model_id} starts" + (" again" if upstream.running else "")
                if first:
                    total = sum(count for _, count in first)
                    reason = f"{_counts(first)} {'finishes' if total == 1 else 'finish'} first, then {then}"
                else:
                    reason = f"waiting for {_and(in_way)} to stop, then {then}"
            for ticket in tickets:
                position += 1
                ticket.position = position
                ticket.stage, ticket.waiting_for, ticket.reason = stage, waiting_for, reason
            ahead.append((model_id, len(tickets)))

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

    def _exclusive(self, first: str, second: str) -> bool:
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

    def _lingers_until(self, upstream: Upstream, ticket: Ticket) -> float | None:
        """
        Until when ``upstream`` is kept for a follow-up request before it is stopped for
        ``ticket``: ``linger`` seconds after its last request ended, if it was busy when
        ``ticket`` came (a client that just got its answer may well ask again), and ``ticket`` is
        not due. ``None``: stop it now.
        """
        policy = self.config.scheduler
        model_id = upstream.model.id
        if policy.strict or ticket.due or policy.linger <= 0:
            return None
        if self.upstreams.get(model_id) is not upstream or model_id not in self.last_used:
            return None
        if self.last_used[model_id] <= ticket.arrived_at:
            # It was idle when this ticket came: no sign of a follow-up.
            return None
        until = self.last_used[model_id] + policy.linger
        return until if until > self._reactor.seconds() else None

    def _arm_wakeup(self, deadlines: list[float]) -> None:
        """
        Have the queue looked at again at the earliest of ``deadlines`` and of the moment the
        oldest ticket that is not due reaches ``maxWait``.
        """
        policy = self.config.scheduler
        deadlines = list(deadlines)
        if policy.max_wait > 0 and not policy.strict:
            waiting = [t.arrived_at for t in self._queue if not t.due and t.stage != "starting"]
            if waiting:
                deadlines.append(min(waiting) + policy.max_wait)
        deadline = min(deadlines) if deadlines and not self._shutting_down else None
        if deadline is not None and deadline <= self._reactor.seconds():
            # Never a timer for now: it would look at the queue again and again.
            self.log.warn("scheduler wake-up for {deadline} is not in the future; not armed", deadline=deadline)
            deadline = None
        call = self._wakeup_call
        if call is not None and call.active():
            if deadline is not None and call.getTime() == deadline:
                return
            call.cancel()
        self._wakeup_call = None
        if deadline is not None:
            self._wakeup_call = self._reactor.callLater(max(0.0, deadline - self._reactor.seconds()), self._pump)

    def _start_failed(self, failure: Failure, ticket: Ticket) -> None:
        if failure.check(CancelledError):
            return None
        if ticket in self._queue:
            self._queue.remove(ticket)
        ticket.stage = "failed"
        ticket.error = failure.value
        ticket._result.errback(failure)
        if ticket.upstream.state is not State.STARTING:
            # A model still "starting" while it fails its waiters is about to change state, and
            # that change looks at the queue; looking now would let a request join the dying start.
            self._pump()
        return None

    def _upstream_changed(self, upstream: Upstream, old: State, new: State) -> None:
        if upstream in self._retiring:
            if not upstream.running:
                del self._retiring[upstream]
                self.log.info("the replaced process of model {model} has ended", model=upstream.model.id)
            self._pump()
            return
        if new is State.STARTING:
            self._unserved.add(upstream)
            self.footprints.started(upstream.model.id)
        elif new is not State.READY:
            self._unserved.discard(upstream)
        call = self._measure_calls.pop(upstream, None)
        if call is not None and call.active():
            call.cancel()
        if new is State.READY:
            # Not at once: it takes a millisecond or two, which the first requests should not wait for.
            self._measure_calls[upstream] = self._reactor.callLater(MEASURE_DELAY, self._first_measure, upstream)
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
        for run in list(self._preloads):
            run.addErrback(lambda failure: failure.trap(CancelledError))
            run.cancel()
        for ticket in list(self._queue):
            self._fail_ticket(ticket, ShuttingDown("swapproxy is shutting down"))
        if self._wakeup_call is not None and self._wakeup_call.active():
            self._wakeup_call.cancel()
        for call in self._measure_calls.values():
            if call.active():
                call.cancel()
        self._measure_calls.clear()
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
        if config.memory_budget_auto:
            if not old.memory_budget_auto:
                self.memory_budget = available_memory()
        else:
            self.memory_budget = config.memory_budget
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
            self.upstreams[model_id].reconfigure(
                config.models[model_id], config.health_check_timeout, config.start_ceiling
            )
            if model_id in updated:
                self._cancel_ttl(model_id)
                self._arm_ttl(model_id)
        for ticket in list(self._queue):
            if ticket.model_id in removed:
                self._fail_ticket(
                    ticket, UnknownModel(f"model {ticket.model_id!r} was removed from the configuration")
                )
            elif ticket.model_id in changed:
                start, ticket._start = ticket._start, None
                if start is not None and not start.called:
                    start.cancel()
                ticket.upstream = self.upstreams[ticket.model_id]
        for upstream in retired:
            if self._retiring[upstream].in_flight == 0:
                self._stop_retiree(upstream)
        self._pump()
        return ReloadResult(tuple(added), tuple(changed), removed, tuple(updated), tuple(unchanged))

    def _stop_retiree(self, upstream: Upstream) -> None:
        if upstream.running and not upstream.stopping:
            self.log.info("stopping the replaced process of model {model}", model=upstream.model.id)
        upstream.stop()

    def _fail_ticket(self, ticket: Ticket, error: Exception) -> None:
        self._queue.remove(ticket)
        start, ticket._start = ticket._start, None
        if start is not None and not start.called:
            start.cancel()
        ticket.stage = "failed"
        ticket.error = error
        ticket._result.errback(error)


def _displaces(group: GroupConfig, other: GroupConfig) -> bool:
    """
    Whether starting a member of ``group`` stops a running member of ``other``.
    """
    if other.id == group.id:
        return group.swap
    return group.exclusive and not other.persistent


def _and(items: list[str]) -> str:
    """
    ``a``, ``a and b``, ``a, b and c``.
    """
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _merge(counts: list[tuple[str, int]]) -> list[tuple[str, int]]:
    """
    Add up the counts of the same model, keeping the order of first appearance.
    """
    merged: dict[str, int] = {}
    for model_id, count in counts:
        merged[model_id] = merged.get(model_id, 0) + count
    return list(merged.items())


def _counts(counts: list[tuple[str, int]]) -> str:
    """
    ``3 requests for qwen and 1 for llama``.
    """
    parts = [f"{count} for {model_id}" for model_id, count in counts]
    first_count = counts[0][1]
    parts[0] = f"{first_count} request{'' if first_count == 1 else 's'} for {counts[0][0]}"
    return _and(parts)

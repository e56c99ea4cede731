# -*- test-case-name: tests.test_supervisor -*-
"""
The order in which waiting requests are served: the queue policy of `swapproxy.supervisor`.

Every request for a model takes a `Ticket`. A ticket whose model is ready and conflicts with
nothing is granted at once. The others wait, in service order: by ``priority``, then arrival.
The first waiting ticket whose model cannot run yet has the models in its way stopped as soon as
no request is in flight on them (never mid-request), then its model is started.

Requests are *collated*: while a model runs, later requests for it are granted ahead of older
requests that wait for other models, so a burst for one model is served by one start instead of
a swap per change of model. That is bounded: once a waiting ticket has been overtaken by
``maxOvertakes`` later requests on the models in its way, or has waited ``maxWait`` seconds, it
is *due*: those models get no new requests until it has run, and due tickets go first in arrival
order. ``maxOvertakes: 0`` is strict order: every ticket holds back the models in its way, as
llama-swap's FIFO does without its collation.

A model that was busy when a ticket for another came *lingers* ``linger`` seconds after its last
request, for a follow-up, before it is stopped for that ticket. A model is never stopped while it
starts for a waiting ticket, and a model that has not served anyone since it started serves its
first waiting ticket before anything can stop it; so no model is started only to be stopped.

The `Scheduler` decides; what it decides is done by its `Placement` (the supervisor), which knows
which models are in each other's way and owns the processes and the leases.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.python.failure import Failure

from swapproxy.config import SchedulerConfig
from swapproxy.logs import proxy_logger
from swapproxy.upstream import State, Upstream

if TYPE_CHECKING:
    from swapproxy.supervisor import Lease


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

    def __init__(
        self, upstream: Upstream, arrived_at: float, seq: int, withdraw: Callable[[Ticket], None]
    ) -> None:
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
        self.error: BaseException | None = None
        self.defer_start = False
        self.load_only = False
        self._start: Deferred[None] | None = None
        self._result: Deferred[Lease] = Deferred(lambda _: withdraw(self))

    def wait(self) -> Deferred[Lease]:
        """
        The Deferred of this ticket's `Lease`; it fails with `StartError` or `Rejected`.

        Cancelling it withdraws the ticket; a start that others share carries on.
        """
        return self._result

    @property
    def in_start(self) -> bool:
        """
        Whether it waits on a start of its model that it joined and that has not ended.
        """
        return self._start is not None and not self._start.called

    def join_start(self, failed: Callable[[Failure, Ticket], None]) -> None:
        """
        Start its model, or join the start under way; ``failed`` hears of a start that fails.
        """
        self._start = self.upstream.start()
        self._start.addErrback(failed, self)

    def leave_start(self) -> None:
        """
        Withdraw from the start it joined, if that has not ended (others who share it go on).
        """
        start, self._start = self._start, None
        if start is not None and not start.called:
            start.cancel()

    def move_to(self, upstream: Upstream) -> None:
        """
        Wait for ``upstream`` instead (a reload replaced the model's process).
        """
        self.leave_start()
        self.upstream = upstream

    def grant(self, lease: Lease, now: float) -> None:
        """
        It may go: hand its waiter ``lease``.
        """
        self.stage = "ready"
        self.position = 0
        self.reason = ""
        self.granted_at = now
        self._result.callback(lease)

    def fail(self, reason: Exception | Failure) -> None:
        """
        It will not be served: fail its waiter with ``reason``.
        """
        self.leave_start()
        self.stage = "failed"
        self.error = reason.value if isinstance(reason, Failure) else reason
        self._result.errback(reason)


class Placement(Protocol):
    """
    What the `Scheduler` asks of the supervisor: where models stand, and the acts it decides.
    """

    def conflicting(self, model_id: str) -> list[Upstream]:
        """The running processes that must stop before ``model_id`` may start."""

    def in_flight_of(self, upstream: Upstream) -> int:
        """The requests in flight on ``upstream``."""

    def exclusive(self, first: str, second: str) -> bool:
        """Whether two models cannot run together."""

    def would_displace(self, upstream: Upstream, claimed: set[Upstream]) -> bool:
        """Whether a model one of ``claimed`` needs stopped would be ``upstream``'s, once it runs."""

    def idle_since(self, upstream: Upstream) -> float | None:
        """When the last request on ``upstream`` ended, if it is its model's current process."""

    def unfit(self, ticket: Ticket) -> Exception | None:
        """Why ``ticket``'s model can never run (it cannot fit in memory), or ``None``."""

    def lease(self, upstream: Upstream) -> Lease:
        """Count one more request in flight on ``upstream`` and make its `Lease`."""

    def make_room(self, other: Upstream, model_id: str) -> None:
        """Stop ``other`` so that ``model_id`` can start."""


class Scheduler:
    """
    The waiting tickets, and each pass over them that grants, stops and starts.

    :param placement: where models stand, and who acts.
    :param clock: keeps the wake-ups.
    :param policy: returns the current ``routing.scheduler`` settings.
    :param wake: asks for another pass (the supervisor's, which tells its observers too).
    """

    def __init__(
        self,
        placement: Placement,
        clock: IReactorTime,
        policy: Callable[[], SchedulerConfig],
        wake: Callable[[], None],
    ) -> None:
        self.log = proxy_logger("swapproxy.supervisor")
        self._placement = placement
        self._clock = clock
        self._policy = policy
        self._wake = wake
        #: The waiting tickets, in arrival order.
        self.tickets: list[Ticket] = []
        self._arrivals = itertools.count()
        #: Upstreams that started and have not granted a request since.
        self.unserved: set[Upstream] = set()
        #: The timer that looks at the queue again: when the oldest held-back ticket reaches
        #: ``maxWait``, or a model's ``linger`` ends.
        self._wakeup_call: IDelayedCall | None = None
        self._stopped = False

    def add(self, upstream: Upstream, defer_start: bool, withdraw: Callable[[Ticket], None],
            load_only: bool = False) -> Ticket:
        """
        Queue a new ticket for ``upstream``, arriving now.
        """
        ticket = Ticket(upstream, self._clock.seconds(), next(self._arrivals), withdraw)
        ticket.defer_start = defer_start
        ticket.load_only = load_only
        self.tickets.append(ticket)
        return ticket

    def withdraw(self, ticket: Ticket) -> None:
        """
        Take ``ticket`` out of the queue, and out of the start it joined.
        """
        if ticket in self.tickets:
            self.tickets.remove(ticket)
        if ticket.in_start:
            ticket.leave_start()

    def fail(self, ticket: Ticket, error: Exception) -> None:
        """
        Take a waiting ``ticket`` out of the queue and fail it with ``error``.
        """
        self.tickets.remove(ticket)
        ticket.fail(error)

    def queued(self, model_id: str | None = None, requests_only: bool = False) -> int:
        """
        How many tickets wait (for one model, or for all); with ``requests_only``, not counting
        the loads no request waits for.
        """
        return sum(1 for t in self.tickets
                   if (model_id is None or t.model_id == model_id) and not (requests_only and t.load_only))

    def stop(self) -> None:
        """
        Look at the queue no more (swapproxy is shutting down).
        """
        self._stopped = True
        if self._wakeup_call is not None and self._wakeup_call.active():
            self._wakeup_call.cancel()

    def schedule(self) -> None:
        """
        One look at the queue: grant what can be granted, stop what is in the way of the first
        waiting tickets, start what can start, then tell each waiting ticket where it stands.
        """
        placement = self._placement
        order = self._service_order()
        strict = self._policy().strict
        cache: dict[str, list[Upstream]] = {}

        def in_way(model_id: str) -> list[Upstream]:
            if model_id not in cache:
                cache[model_id] = placement.conflicting(model_id)
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
        order = [ticket for ticket in order if ticket in self.tickets]
        first_riders = self._first_riders(order)
        claimed = {ticket.upstream for ticket in first_riders}
        wakeups: list[float] = []
        for ticket in order:
            upstream = ticket.upstream
            if ticket not in self.tickets or (upstream in held and ticket not in first_riders):
                continue
            unfit = None if upstream.running else placement.unfit(ticket)
            if unfit is not None:
                # What it was measured to need, or what persistent models hold, grew meanwhile.
                self.fail(ticket, unfit)
                continue
            conflicts = placement.conflicting(ticket.model_id)
            if conflicts and ticket.defer_start:
                # The request that would stop them answers its client first: signals and walks
                # of the process tree wait for the reactor's next round of I/O, as the start does.
                self._after_io(self._wake)
            elif conflicts:
                for other in conflicts:
                    if other in claimed or placement.in_flight_of(other) or other.stopping:
                        continue
                    lingers_until = self._lingers_until(other, ticket)
                    if lingers_until is not None:
                        # Kept for its follow-up also against the tickets behind this one.
                        claimed.add(other)
                        wakeups.append(lingers_until)
                        continue
                    placement.make_room(other, ticket.model_id)
            elif upstream.state is not State.READY and not ticket.in_start:
                if upstream.stopping or (
                        not upstream.running and placement.would_displace(upstream, claimed)):
                    # Wait for it to exit (a start now would restart it behind our back), and do
                    # not put it in the way of a request ahead of this one.
                    pass
                elif ticket.defer_start and not upstream.running:
                    self._after_io(self._wake)
                else:
                    ticket.join_start(self._start_failed)
            claimed.add(upstream)

        # 3. What each waiting ticket is told.
        self._describe([ticket for ticket in order if ticket in self.tickets])
        self._arm_wakeup(wakeups)

    def _after_io(self, call: Callable[[], None]) -> None:
        """
        Call ``call`` after the reactor's next round of I/O, which flushes what was written now.

        A reactor runs the calls that are due before it polls its sockets: ``callLater(0)`` alone
        would run first. The call it makes runs on the turn after the poll.
        """
        self._clock.callLater(0, self._clock.callLater, 0, call)

    def _service_order(self) -> list[Ticket]:
        """
        The waiting tickets in the order they are served: due tickets first, by arrival; then by
        priority (higher first), then arrival. Marks the tickets that ``maxWait`` has made due.
        """
        policy = self._policy()
        now = self._clock.seconds()
        priority = policy.priority
        if policy.max_wait > 0 and not policy.strict:
            for ticket in self.tickets:
                if not ticket.due and ticket.arrived_at + policy.max_wait <= now:  # as _arm_wakeup reckons
                    ticket.due = True
        return sorted(
            self.tickets,
            key=lambda t: (0, 0, t.seq) if t.due else (1, -priority.get(t.model_id, 0), t.seq),
        )

    def _first_riders(self, order: list[Ticket]) -> set[Ticket]:
        """
        For each model that started and has served no one yet, its first waiting ticket: it is
        served before anything can stop the model, so that no start is wasted.
        """
        riders: dict[Upstream, Ticket] = {}
        for ticket in order:
            if ticket.upstream in self.unserved:
                riders.setdefault(ticket.upstream, ticket)
        return set(riders.values())

    def _grant(self, ticket: Ticket, in_way: Callable[[str], list[Upstream]]) -> list[Ticket]:
        """
        Give ``ticket`` its lease; count it against the older tickets whose way it stands in.

        :returns: the tickets this overtaking made due.
        """
        self.tickets.remove(ticket)
        upstream = ticket.upstream
        lease = self._placement.lease(upstream)
        self.unserved.discard(upstream)
        now_due = []
        limit = self._policy().max_overtakes
        if limit > 0:
            for waiting in self.tickets:
                if waiting.seq < ticket.seq and not waiting.due and upstream in in_way(waiting.model_id):
                    waiting.overtaken += 1
                    if waiting.overtaken >= limit:
                        waiting.due = True
                        now_due.append(waiting)
        ticket.grant(lease, self._clock.seconds())
        return now_due

    def _describe(self, order: list[Ticket]) -> None:
        """
        Set each waiting ticket's stage, position, ``waiting_for`` and reason from the order in
        which the tickets are expected to be served: in batches of one model, a starting model's
        batch first, the others in service order. A ticket joins the batch of its model unless a
        ticket that may not be overtaken (strict order, or due) stands between them.
        """
        placement = self._placement
        strict = self._policy().strict
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
                    if other is not upstream and placement.exclusive(other.model.id, ticket.model_id):
                        del open_batch[other]
        # The riders of a start are served first, wherever they are in the order.
        starting: dict[Upstream, int] = {}
        for batch in batches:
            if batch[0].state is State.STARTING:
                starting.setdefault(batch[0], id(batch))
        batches.sort(key=lambda batch: starting.get(batch[0]) != id(batch))
        position = 0
        ahead: list[tuple[str, int]] = []
        for upstream, tickets in batches:
            model_id = upstream.model.id
            waiting_for: tuple[str, ...]
            conflicts = placement.conflicting(model_id)
            in_way = list(dict.fromkeys(c.model.id for c in conflicts))
            busy = [(c.model.id, placement.in_flight_of(c)) for c in conflicts if placement.in_flight_of(c)]
            before = [(other, count) for other, count in ahead
                      if other == model_id or placement.exclusive(other, model_id)]
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

    def _lingers_until(self, upstream: Upstream, ticket: Ticket) -> float | None:
        """
        Until when ``upstream`` is kept for a follow-up request before it is stopped for
        ``ticket``: ``linger`` seconds after its last request ended, if it was busy when
        ``ticket`` came (a client that just got its answer may well ask again), and ``ticket`` is
        not due. ``None``: stop it now.
        """
        policy = self._policy()
        if policy.strict or ticket.due or policy.linger <= 0:
            return None
        last_used = self._placement.idle_since(upstream)
        if last_used is None:
            return None
        if last_used <= ticket.arrived_at:
            # It was idle when this ticket came: no sign of a follow-up.
            return None
        until = last_used + policy.linger
        return until if until > self._clock.seconds() else None

    def _arm_wakeup(self, deadlines: list[float]) -> None:
        """
        Have the queue looked at again at the earliest of ``deadlines`` and of the moment the
        oldest ticket that is not due reaches ``maxWait``.
        """
        policy = self._policy()
        deadlines = list(deadlines)
        if policy.max_wait > 0 and not policy.strict:
            waiting = [t.arrived_at for t in self.tickets if not t.due and t.stage != "starting"]
            if waiting:
                deadlines.append(min(waiting) + policy.max_wait)
        deadline = min(deadlines) if deadlines and not self._stopped else None
        if deadline is not None and deadline <= self._clock.seconds():
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
            self._wakeup_call = self._clock.callLater(max(0.0, deadline - self._clock.seconds()), self._wake)

    def _start_failed(self, failure: Failure, ticket: Ticket) -> None:
        if failure.check(CancelledError):
            return None
        if ticket in self.tickets:
            self.tickets.remove(ticket)
        ticket.fail(failure)
        if ticket.upstream.state is not State.STARTING:
            # A model still "starting" while it fails its waiters is about to change state, and
            # that change looks at the queue; looking now would let a request join the dying start.
            self._wake()
        return None


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

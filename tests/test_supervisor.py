"""
Tests for `swapproxy.supervisor`: which models run, the request queue, TTL and shutdown.

Most tests drive a `Supervisor` with `ScriptedUpstream` children and a `Clock`: the test says when a
model becomes ready, fails, or has exited. A few run real `Upstream` objects on a fake process
reactor (for how the two interact), and one spawns real children to check shutdown.
"""

from __future__ import annotations

import json
import random
import signal
import sys
from typing import Any

import psutil
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.test.requesthelper import DummyRequest

from swapproxy.board import ModelBoard
from swapproxy.config import ModelConfig, parse_config
from swapproxy.memory import Footprints, GpuMemory
from swapproxy.metrics import Metrics
from swapproxy.supervisor import (
    MEASURE_DELAY,
    InsufficientMemory,
    Lease,
    Rejected,
    ReloadResult,
    ShuttingDown,
    Supervisor,
    Ticket,
    TooManyRequests,
    UnknownModel,
)
from swapproxy.testing.local import FAKE_UPSTREAM, free_port_range
from swapproxy.testing.upstreams import ScriptedUpstreams
from swapproxy.upstream import StartError, State, Upstream
from swapproxy.web.api import Running
from tests.support.processes import alive, process_pipes_open, wait_until
from tests.support.reactors import ProcessReactor

CMD = "llama-server --port ${PORT}"
GIB = 1024**3
#: Top-level settings for strict arrival order.
STRICT = {"routing": {"scheduler": {"settings": {"fifo": {"maxOvertakes": 0}}}}}


def make_config(models: dict[str, dict[str, Any]], **top: Any) -> Any:
    """
    A parsed configuration with these models (``cmd`` filled in) and top-level settings.
    """
    return parse_config(
        json.dumps({"models": {mid: {"cmd": CMD, **keys} for mid, keys in models.items()}, **top}),
        "test.yaml",
    )


class SupervisorTestCase(SynchronousTestCase):
    """
    Builds a `Supervisor` whose upstreams are `ScriptedUpstream` objects, on a `Clock`.
    """

    def make(self, models: dict[str, dict[str, Any]] | list[str], **top: Any) -> Supervisor:
        if isinstance(models, list):
            models = {mid: {} for mid in models}
        self.clock = Clock()
        self.ups = ScriptedUpstreams()
        #: What each fake pid is "measured" to use, in bytes.
        self.rss: dict[int, int] = {}
        footprints = Footprints(self.clock, rss=lambda pids: sum(self.rss.get(pid, 0) for pid in pids),
                                gpu=GpuMemory(self.clock, ""), pids=lambda pid: [pid])
        return Supervisor(make_config(models, **top), self.clock, upstream_factory=self.ups, footprints=footprints)

    def lease(self, supervisor: Supervisor, model_id: str) -> Lease:
        """
        Request ``model_id`` and return its lease, making the model ready if it is starting.
        """
        d = supervisor.request(model_id).wait()
        upstream = self.ups[model_id]
        if upstream.state is State.STARTING:
            upstream.become_ready()
        return self.successResultOf(d)

    def assert_never_ran_together(self, *model_ids: str) -> None:
        """
        None of ``model_ids`` was started while another of them had a process.
        """
        for model_id in model_ids:
            for running in self.ups[model_id].running_at_spawn:
                overlap = set(running) & set(model_ids)
                self.assertEqual(overlap, set(), f"{model_id} was started while {overlap} ran")


class RequestTests(SupervisorTestCase):
    """
    Starting the model a request needs, and leases.
    """

    def test_first_request_starts_model(self) -> None:
        """
        The first request for a model starts it and waits; it gets a lease once the model is
        ready.
        """
        supervisor = self.make(["a"])
        ticket = supervisor.request("a")
        d = ticket.wait()
        self.assertEqual(self.ups["a"].start_count, 1)
        self.assertEqual(ticket.stage, "starting")
        self.assertNoResult(d)
        self.ups["a"].become_ready()
        lease = self.successResultOf(d)
        self.assertIs(lease.upstream, self.ups["a"])
        self.assertEqual(ticket.stage, "ready")
        self.assertEqual(supervisor.in_flight["a"], 1)

    def test_ready_model_granted_at_once(self) -> None:
        """
        A request for a model that is ready is granted at once, without another start.
        """
        supervisor = self.make(["a"])
        self.lease(supervisor, "a").release()
        lease = self.successResultOf(supervisor.request("a").wait())
        self.assertIs(lease.upstream, self.ups["a"])
        self.assertEqual(self.ups["a"].start_count, 1)

    def test_requests_during_start_share_it(self) -> None:
        """
        Requests that arrive while their model starts wait for the same start.
        """
        supervisor = self.make(["a"])
        waits = [supervisor.request("a").wait() for _ in range(3)]
        self.clock.advance(2)
        waits.append(supervisor.request("a").wait())
        self.assertEqual(self.ups["a"].start_count, 1)
        self.ups["a"].become_ready()
        for d in waits:
            self.assertIsInstance(self.successResultOf(d), Lease)
        self.assertEqual(supervisor.in_flight["a"], 4)

    def test_release_is_idempotent(self) -> None:
        """
        Releasing a lease twice counts once.
        """
        supervisor = self.make(["a"])
        first, second = self.lease(supervisor, "a"), self.lease(supervisor, "a")
        first.release()
        first.release()
        self.assertEqual(supervisor.in_flight["a"], 1)
        second.release()
        self.assertEqual(supervisor.in_flight["a"], 0)

    def test_crash_while_ready_restarts_on_next_request(self) -> None:
        """
        A model whose process died is started again by the next request; the requests that were
        in flight on the dead process still release cleanly.
        """
        supervisor = self.make(["a"])
        old = self.lease(supervisor, "a")
        self.ups["a"].exited()
        self.assertEqual(self.ups["a"].state, State.STOPPED)
        d = supervisor.request("a").wait()
        self.assertEqual(self.ups["a"].start_count, 2)
        self.ups["a"].become_ready()
        new = self.successResultOf(d)
        old.release()
        self.assertEqual(supervisor.in_flight["a"], 1)
        new.release()
        self.assertEqual(supervisor.in_flight["a"], 0)


class SwapTests(SupervisorTestCase):
    """
    One model of a swap group at a time; swaps wait for requests in flight; arrival order.
    """

    def test_swap_stops_first_before_starting_second(self) -> None:
        """
        In the default group, a request for another model stops the running one, and starts the
        new one only once the old one has exited.
        """
        supervisor = self.make(["a", "b"])
        self.lease(supervisor, "a").release()
        ticket = supervisor.request("b")
        d = ticket.wait()
        self.assertEqual(self.ups["a"].state, State.STOPPING)
        self.assertEqual(self.ups["b"].start_count, 0)
        self.assertEqual(ticket.stage, "stopping")
        self.assertEqual(ticket.waiting_for, ("a",))
        self.ups["a"].exited()
        self.assertEqual(self.ups["b"].start_count, 1)
        self.ups["b"].become_ready()
        self.assertIs(self.successResultOf(d).upstream, self.ups["b"])
        self.assertEqual(self.ups.running(), ["b"])
        self.assertEqual(self.ups.events, [("start", "a"), ("stop", "a"), ("exited", "a"), ("start", "b")])

    def test_swap_uses_unload_timeout_as_grace(self) -> None:
        """
        A model evicted by a swap gets its own ``unloadTimeout`` to exit, the model's or the global
        one (llama-swap gives it ``healthCheckTimeout``, which is meant for starts).
        """
        supervisor = self.make({"a": {"unloadTimeout": 3}, "b": {}, "c": {}}, healthCheckTimeout=30, unloadTimeout=7)
        self.lease(supervisor, "a").release()
        d = supervisor.request("b").wait()
        self.assertEqual(self.ups["a"].stop_graces, [3])
        self.ups["a"].exited()
        self.ups["b"].become_ready()
        self.successResultOf(d).release()
        supervisor.request("c")
        self.assertEqual(self.ups["b"].stop_graces, [7])

    def test_swap_back_and_forth(self) -> None:
        """
        Alternating requests swap every time and never run two models of the group together.
        """
        supervisor = self.make(["a", "b", "c"])
        for model_id in ["a", "b", "a", "c", "b", "c"]:
            d = supervisor.request(model_id).wait()
            for other in self.ups.running():
                if other != model_id and self.ups[other].state is State.STOPPING:
                    self.ups[other].exited()
            if self.ups[model_id].state is State.STARTING:
                self.ups[model_id].become_ready()
            self.successResultOf(d).release()
            self.assertEqual(self.ups.running(), [model_id])
        self.assert_never_ran_together("a", "b", "c")

    def test_swap_during_start_of_other_model(self) -> None:
        """
        A request for another model while one is starting waits for that start (and its
        request) rather than killing it half-loaded.
        """
        supervisor = self.make(["a", "b"])
        da = supervisor.request("a").wait()
        db = supervisor.request("b").wait()
        self.assertEqual(self.ups["a"].stop_graces, [])
        self.assertEqual(self.ups["b"].start_count, 0)
        self.ups["a"].become_ready()
        lease_a = self.successResultOf(da)
        self.assertNoResult(db)
        lease_a.release()
        self.ups["a"].exited()
        self.ups["b"].become_ready()
        self.successResultOf(db)
        self.assert_never_ran_together("a", "b")

    def test_swap_waits_for_requests_in_flight(self) -> None:
        """
        A model is stopped for a swap only after every request in flight on it is released.
        """
        supervisor = self.make(["a", "b"])
        first, second = self.lease(supervisor, "a"), self.lease(supervisor, "a")
        ticket = supervisor.request("b")
        d = ticket.wait()
        self.clock.advance(3600)
        self.assertEqual(self.ups["a"].state, State.READY)
        self.assertEqual(self.ups["a"].stop_graces, [])
        self.assertEqual(ticket.stage, "queued")
        self.assertEqual(ticket.waiting_for, ("a",))
        first.release()
        self.assertEqual(self.ups["a"].state, State.READY)
        second.release()
        self.assertEqual(self.ups["a"].state, State.STOPPING)
        self.ups["a"].exited()
        self.ups["b"].become_ready()
        self.successResultOf(d)
        self.assert_never_ran_together("a", "b")

    def test_swap_behind_a_hung_model(self) -> None:
        """
        A swap waits for a hung model only until it is found unhealthy and its requests in
        flight fail (the forward pipeline releases them); then it waits for its exit alone,
        without stopping it a second time (nor counting a swap: it was stopped because it hung).
        """
        supervisor = self.make(["a", "b"])
        swaps: list[tuple[str, str]] = []
        supervisor.swap_observers.append(lambda stopped, model_id: swaps.append((stopped, model_id)))
        in_flight = self.lease(supervisor, "a")
        for_b = supervisor.request("b").wait()
        self.ups["a"].hang()
        self.assertNoResult(for_b)
        in_flight.release()  # failed by the pipeline
        self.assertEqual(self.ups["a"].stop_graces, [10.0])
        self.assertEqual(self.ups.events[-1], ("unhealthy", "a"))
        self.assertEqual(swaps, [])
        self.assertEqual(self.ups["b"].start_count, 0)
        self.ups["a"].exited()
        self.ups["b"].become_ready()
        self.assertIs(self.successResultOf(for_b).upstream, self.ups["b"])
        self.assert_never_ran_together("a", "b")

    def test_request_for_a_hung_model_starts_it_again(self) -> None:
        """
        A request for a model that is being stopped because it hung waits for the exit, then
        starts it anew.
        """
        supervisor = self.make(["a"])
        in_flight = self.lease(supervisor, "a")
        self.ups["a"].hang()
        in_flight.release()
        d = supervisor.request("a").wait()
        self.assertNoResult(d)
        self.ups["a"].exited()
        self.assertEqual(self.ups["a"].start_count, 2)
        self.ups["a"].become_ready()
        self.assertIs(self.successResultOf(d).upstream, self.ups["a"])

    def test_strict_arrival_order_and_no_starvation(self) -> None:
        """
        With ``maxOvertakes: 0``, requests that wait for a swap are served in the order they
        arrived, and new requests for the busy model queue behind them instead of keeping it
        loaded forever: a swap for every change of model.
        """
        supervisor = self.make(["a", "b", "c"], **STRICT)
        lease_a = self.lease(supervisor, "a")
        served: list[str] = []
        leases: dict[str, Lease] = {}

        def track(name: str) -> None:
            def granted(lease: Lease) -> None:
                served.append(name)
                leases[name] = lease

            supervisor.request(name[0]).wait().addCallback(granted)

        for name in ["b1", "c1", "b2", "a2"]:
            track(name)
        self.assertEqual(served, [], "a request for busy model a jumped the queue")
        self.assertEqual(self.ups["a"].stop_graces, [])
        self.assertEqual(supervisor.queued(), 4)

        lease_a.release()
        self.ups["a"].exited()
        self.ups["b"].become_ready()
        self.assertEqual(served, ["b1"])
        leases["b1"].release()
        self.ups["b"].exited()
        self.ups["c"].become_ready()
        self.assertEqual(served, ["b1", "c1"])
        leases["c1"].release()
        self.ups["c"].exited()
        self.ups["b"].become_ready()
        self.assertEqual(served, ["b1", "c1", "b2"])
        leases["b2"].release()
        self.ups["b"].exited()
        self.ups["a"].become_ready()
        self.assertEqual(served, ["b1", "c1", "b2", "a2"])
        self.assertEqual(supervisor.queued(), 0)
        self.assert_never_ran_together("a", "b", "c")

    def test_queue_positions(self) -> None:
        """
        Waiting tickets know their place in the queue and what they wait for.
        """
        supervisor = self.make(["a", "b", "c"])
        self.lease(supervisor, "a")
        tb, tc = supervisor.request("b"), supervisor.request("c")
        self.assertEqual((tb.position, tc.position), (1, 2))
        self.assertEqual(tb.waiting_for, ("a",))
        self.assertEqual(tb.stage, "queued")


def fifo(**settings: Any) -> dict[str, Any]:
    """
    Top-level settings with these ``routing.scheduler.settings.fifo`` keys.
    """
    return {"routing": {"scheduler": {"settings": {"fifo": settings}}}}


class Recorder:
    """
    Requests a model through a supervisor and records the order in which requests are granted.
    """

    def __init__(self, supervisor: Supervisor) -> None:
        self.supervisor = supervisor
        self.served: list[str] = []
        self.leases: dict[str, Lease] = {}
        self.tickets: dict[str, Ticket] = {}

    def ask(self, *names: str) -> None:
        """
        Request ``names[i][0]`` for each name (``b1`` asks for model ``b``).
        """
        for name in names:
            def granted(lease: Lease, name: str = name) -> None:
                self.served.append(name)
                self.leases[name] = lease

            self.tickets[name] = ticket = self.supervisor.request(name[0])
            ticket.wait().addCallbacks(granted, lambda failure: failure.trap(CancelledError))

    def leave(self, name: str) -> None:
        """
        The client of request ``name`` goes away.
        """
        self.tickets[name].wait().cancel()

    def done(self, *names: str) -> None:
        for name in names:
            self.leases[name].release()


class CollationTests(SupervisorTestCase):
    """
    The default policy: requests for a running model are served ahead of older requests for other
    models, within ``maxOvertakes`` and ``maxWait``.
    """

    def test_running_model_serves_later_requests_first(self) -> None:
        """
        While a model serves requests, a later request for it is served at once, ahead of an
        older one that waits for a swap; the swap happens when the model has nothing in flight.
        """
        supervisor = self.make(["a", "b"])
        record = Recorder(supervisor)
        record.ask("a1", "b1")
        self.ups["a"].become_ready()
        record.ask("a2")
        self.assertEqual(record.served, ["a1", "a2"])
        self.assertEqual(record.tickets["b1"].overtaken, 1)
        self.assertEqual(self.ups["a"].stop_graces, [])
        record.done("a1")
        self.assertEqual(self.ups["a"].state, State.READY, "stopped with a request in flight")
        record.done("a2")
        self.assertEqual(self.ups["a"].state, State.STOPPING)
        self.ups["a"].exited()
        self.ups["b"].become_ready()
        self.assertEqual(record.served, ["a1", "a2", "b1"])

    def test_one_start_serves_every_waiting_request_for_the_model(self) -> None:
        """
        Requests that waited for a model in between requests for others are all served by one
        start of it: two starts where strict order takes five.
        """
        supervisor = self.make(["a", "b", "c"])
        busy = self.lease(supervisor, "a")
        record = Recorder(supervisor)
        record.ask("b1", "c1", "b2", "c2", "b3")
        busy.release()
        self.ups["a"].exited()
        self.ups["b"].become_ready()
        self.assertEqual(record.served, ["b1", "b2", "b3"])
        record.done("b1", "b2", "b3")
        self.ups["b"].exited()
        self.ups["c"].become_ready()
        self.assertEqual(record.served, ["b1", "b2", "b3", "c1", "c2"])
        self.assertEqual((self.ups["b"].start_count, self.ups["c"].start_count), (1, 1))
        self.assert_never_ran_together("a", "b", "c")

    def test_strict_order_swaps_for_every_change(self) -> None:
        """
        The same requests with ``maxOvertakes: 0``: served in arrival order, a start each.
        """
        supervisor = self.make(["a", "b", "c"], **STRICT)
        busy = self.lease(supervisor, "a")
        record = Recorder(supervisor)
        record.ask("b1", "c1", "b2", "c2", "b3")
        busy.release()
        for name in ["b1", "c1", "b2", "c2", "b3"]:
            for other in self.ups.running():
                if self.ups[other].state is State.STOPPING:
                    self.ups[other].exited()
            self.ups[name[0]].become_ready()
            self.assertEqual(record.served[-1], name)
            record.done(name)
        self.assertEqual((self.ups["b"].start_count, self.ups["c"].start_count), (3, 2))

    def test_overtaking_is_bounded(self) -> None:
        """
        A waiting request is overtaken by at most ``maxOvertakes`` later ones; after that the
        model in its way takes no new request, finishes those in flight and is swapped out; the
        requests it held back are served after the one that waited.
        """
        supervisor = self.make(["a", "b"], **fifo(maxOvertakes=3))
        record = Recorder(supervisor)
        record.ask("a1")
        self.ups["a"].become_ready()
        record.ask("b1", "a2", "a3", "a4", "a5", "a6")
        self.assertEqual(record.served, ["a1", "a2", "a3", "a4"])
        b1 = record.tickets["b1"]
        self.assertEqual((b1.overtaken, b1.due), (3, True))
        a5 = record.tickets["a5"]
        self.assertEqual((a5.stage, a5.position), ("queued", 2))
        self.assertEqual(a5.reason, "1 request for b finishes first, then a starts again")
        record.done("a1", "a2", "a3")
        self.assertEqual(self.ups["a"].state, State.READY, "stopped with a request in flight")
        record.done("a4")
        self.assertEqual(self.ups["a"].state, State.STOPPING)
        self.assertEqual(b1.stage, "stopping")
        self.ups["a"].exited()
        self.ups["b"].become_ready()
        self.assertEqual(record.served[-1], "b1")
        record.done("b1")
        self.ups["b"].exited()
        self.ups["a"].become_ready()
        self.assertEqual(record.served, ["a1", "a2", "a3", "a4", "b1", "a5", "a6"])

    def test_waiting_is_bounded_in_time(self) -> None:
        """
        After ``maxWait`` seconds a waiting request is due even if few requests overtook it: the
        clock alone makes the busy model take no new request.
        """
        supervisor = self.make(["a", "b"], **fifo(maxOvertakes=100, maxWait=30))
        record = Recorder(supervisor)
        record.ask("a1")
        self.ups["a"].become_ready()
        record.ask("b1")
        self.clock.advance(29)
        record.ask("a2")
        self.assertEqual(record.served, ["a1", "a2"])
        self.clock.advance(1)
        self.assertTrue(record.tickets["b1"].due)
        record.ask("a3")
        self.assertEqual(record.served, ["a1", "a2"])
        record.done("a1", "a2")
        self.assertEqual(self.ups["a"].state, State.STOPPING)
        self.ups["a"].exited()
        self.ups["b"].become_ready()
        self.assertEqual(record.served, ["a1", "a2", "b1"])

    def test_no_timer_without_waiting_requests(self) -> None:
        """
        The ``maxWait`` timer runs only while a request waits behind another model.
        """
        supervisor = self.make(["a", "b"], **fifo(maxWait=30))
        record = Recorder(supervisor)
        record.ask("a1")
        self.ups["a"].become_ready()
        self.clock.advance(MEASURE_DELAY)  # a's footprint is measured
        self.assertEqual(self.clock.getDelayedCalls(), [])
        record.ask("b1")
        self.assertEqual([call.getTime() for call in self.clock.getDelayedCalls()], [MEASURE_DELAY + 30])
        record.leave("b1")
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def side_model_starting(self) -> tuple[Supervisor, Lease, Recorder]:
        """
        In strict order: a busy; x (in a non-exclusive group) starts for x1; b1, which needs x
        and a gone, and x2 wait.
        """
        supervisor = self.make(
            ["a", "b", "x"],
            groups={"main": {"members": ["a", "b"]}, "side": {"exclusive": False, "members": ["x"]}},
            **STRICT,
        )
        busy = self.lease(supervisor, "a")
        record = Recorder(supervisor)
        record.ask("x1", "b1", "x2")
        return supervisor, busy, record

    def test_start_serves_its_first_request_before_it_can_be_stopped(self) -> None:
        """
        A model started for a request serves it even if, meanwhile, an older-order request that
        may not wait any longer needs the model gone: no start is wasted. Later requests for it
        wait their turn.
        """
        _, busy, record = self.side_model_starting()
        self.assertEqual(self.ups["x"].start_count, 1)
        self.assertEqual(record.tickets["x1"].stage, "starting")
        self.assertEqual(self.ups["x"].stop_graces, [], "stopped while starting for a request")
        self.ups["x"].become_ready()
        self.assertEqual(record.served, ["x1"])
        busy.release()
        record.done("x1")
        self.assertEqual((self.ups["a"].state, self.ups["x"].state), (State.STOPPING, State.STOPPING))
        self.ups["a"].exited()
        self.ups["x"].exited()
        self.ups["b"].become_ready()
        self.assertEqual(record.served, ["x1", "b1"])
        record.done("b1")
        self.assertEqual(self.ups["b"].state, State.READY, "x does not displace b")
        self.ups["x"].become_ready()
        self.assertEqual(record.served, ["x1", "b1", "x2"])

    def test_start_whose_first_request_left_serves_the_next(self) -> None:
        """
        When the request a start was for goes away, the next request for that model takes its
        place: the start carries on and serves it.
        """
        _, busy, record = self.side_model_starting()
        record.leave("x1")
        self.assertEqual(self.ups["x"].state, State.STARTING)
        self.ups["x"].become_ready()
        self.assertEqual(record.served, ["x2"])
        busy.release()
        self.assertEqual(self.ups["x"].state, State.READY, "stopped with a request in flight")

    def test_request_for_a_stopping_model_waits_its_turn(self) -> None:
        """
        A request for a model that is being stopped for another one does not restart it beside
        the other: it waits until the other has served its requests.
        """
        supervisor = self.make(["a", "b"])
        self.lease(supervisor, "a").release()
        record = Recorder(supervisor)
        record.ask("b1", "a2")
        self.assertEqual(self.ups["a"].state, State.STOPPING)
        self.ups["a"].exited()
        self.assertEqual(self.ups.running(), ["b"])
        self.ups["b"].become_ready()
        self.assertEqual(record.served, ["b1"])
        record.done("b1")
        self.ups["b"].exited()
        self.ups["a"].become_ready()
        self.assertEqual(record.served, ["b1", "a2"])
        self.assert_never_ran_together("a", "b")

    def test_shared_start_survives_one_waiter_leaving(self) -> None:
        """
        Collated requests share one start; one of them leaving neither stops the start nor
        withdraws the others.
        """
        supervisor = self.make(["a", "b"])
        busy = self.lease(supervisor, "a")
        record = Recorder(supervisor)
        record.ask("b1", "a2", "b2", "b3")
        busy.release()
        record.done("a2")
        self.ups["a"].exited()
        record.leave("b1")
        self.assertEqual((self.ups["b"].state, self.ups["b"].stop_graces), (State.STARTING, []))
        self.ups["b"].become_ready()
        self.assertEqual(record.served, ["a2", "b2", "b3"])
        self.assertEqual(self.ups["b"].start_count, 1)


class LingerTests(SupervisorTestCase):
    """
    ``linger``: a model that was busy when a request for another one came is kept a moment after
    its last request, for a follow-up, before it is swapped out.
    """

    def test_busy_model_waits_for_a_follow_up(self) -> None:
        """
        The model stays for ``linger`` seconds after its last request ends; a follow-up within
        that time is served without a swap, and the model is stopped ``linger`` after that one.
        """
        supervisor = self.make(["a", "b"], **fifo(linger=0.5))
        record = Recorder(supervisor)
        record.ask("a1")
        self.ups["a"].become_ready()
        record.ask("b1")
        self.clock.advance(1)
        record.done("a1")
        self.assertEqual(self.ups["a"].state, State.READY)
        self.clock.advance(0.25)
        record.ask("a2")
        self.assertEqual(record.served, ["a1", "a2"])
        record.done("a2")
        self.clock.advance(0.25)
        self.assertEqual(self.ups["a"].state, State.READY)
        self.clock.advance(0.25)
        self.assertEqual(self.ups["a"].state, State.STOPPING)
        self.assertEqual(self.ups["a"].start_count, 1)

    def test_idle_model_is_swapped_at_once(self) -> None:
        """
        A request that finds the other model idle does not wait for ``linger``: one client
        switching models gets its swap at once.
        """
        supervisor = self.make(["a", "b"], **fifo(linger=0.05))
        self.lease(supervisor, "a").release()
        self.clock.advance(0.001)
        supervisor.request("b")
        self.assertEqual(self.ups["a"].state, State.STOPPING)

    def test_due_request_does_not_wait_for_linger(self) -> None:
        """
        A request that may no longer be overtaken has the model stopped as soon as it is idle.
        """
        supervisor = self.make(["a", "b"], **fifo(linger=0.05, maxOvertakes=1))
        record = Recorder(supervisor)
        record.ask("a1")
        self.ups["a"].become_ready()
        record.ask("b1", "a2")
        self.assertTrue(record.tickets["b1"].due)
        self.clock.advance(1)
        record.done("a1", "a2")
        self.assertEqual(self.ups["a"].state, State.STOPPING)

    def test_no_linger_in_strict_order(self) -> None:
        supervisor = self.make(["a", "b"], **STRICT)
        busy = self.lease(supervisor, "a")
        supervisor.request("b")
        self.clock.advance(1)
        busy.release()
        self.assertEqual(self.ups["a"].state, State.STOPPING)


class QueueReportTests(SupervisorTestCase):
    """
    What a waiting request is told: its place in the order requests will really be served, and why.
    """

    def test_position_follows_the_collated_order(self) -> None:
        """
        Requests for the same model are counted together: the second request for b is second,
        ahead of the older request for c.
        """
        supervisor = self.make(["a", "b", "c"])
        first, second = self.lease(supervisor, "a"), self.lease(supervisor, "a")
        record = Recorder(supervisor)
        record.ask("b1", "c1", "b2")
        positions = {name: ticket.position for name, ticket in record.tickets.items()}
        self.assertEqual(positions, {"b1": 1, "b2": 2, "c1": 3})
        self.assertEqual(record.tickets["b1"].reason, "2 requests for a finish first, then b starts")
        self.assertEqual(
            record.tickets["c1"].reason, "2 requests for a and 2 for b finish first, then c starts"
        )
        self.assertEqual(record.tickets["c1"].waiting_for, ("a", "b"))
        first.release()
        self.assertEqual(record.tickets["b1"].reason, "1 request for a finishes first, then b starts")
        second.release()
        self.assertEqual(record.tickets["b1"].stage, "stopping")
        self.assertEqual(record.tickets["b1"].reason, "a is stopping to make room for b")
        self.assertEqual(record.tickets["c1"].stage, "queued")
        self.ups["a"].exited()
        self.assertEqual(
            [(t.stage, t.position, t.reason) for t in record.tickets.values()],
            [("starting", 1, "b is starting"), ("queued", 3, "2 requests for b finish first, then c starts"),
             ("starting", 2, "b is starting")],
        )

    def test_strict_positions_are_arrival_order(self) -> None:
        """
        In strict order the position is the place in arrival order, and the reason lists every
        model to be served before.
        """
        supervisor = self.make(["a", "b", "c"], **STRICT)
        self.lease(supervisor, "a")
        record = Recorder(supervisor)
        record.ask("b1", "c1", "b2")
        positions = {name: ticket.position for name, ticket in record.tickets.items()}
        self.assertEqual(positions, {"b1": 1, "c1": 2, "b2": 3})
        self.assertEqual(
            record.tickets["b2"].reason, "1 request for a, 1 for b and 1 for c finish first, then b starts"
        )


class PriorityTests(SupervisorTestCase):
    """
    ``routing.scheduler.settings.fifo.priority``: higher first from the queue, within the bound.
    """

    def test_higher_priority_starts_first(self) -> None:
        """
        When the running model is done, the waiting request with the higher priority goes first
        even though it arrived later.
        """
        supervisor = self.make(["a", "b", "c"], **fifo(priority={"c": 5}))
        busy = self.lease(supervisor, "a")
        record = Recorder(supervisor)
        record.ask("b1", "c1")
        self.assertEqual((record.tickets["c1"].position, record.tickets["b1"].position), (1, 2))
        busy.release()
        self.ups["a"].exited()
        self.assertEqual((self.ups["b"].start_count, self.ups["c"].start_count), (0, 1))
        self.ups["c"].become_ready()
        self.assertEqual(record.served, ["c1"])

    def test_priority_by_alias(self) -> None:
        """
        A priority may name a model by an alias.
        """
        supervisor = self.make({"a": {}, "b": {}, "c": {"aliases": ["fast"]}}, **fifo(priority={"fast": 5}))
        self.assertEqual(supervisor.config.scheduler.priority, {"c": 5})

    def test_priority_is_bounded_too(self) -> None:
        """
        Higher-priority requests overtake an older one at most ``maxOvertakes`` times.
        """
        supervisor = self.make(["a", "b", "c"], **fifo(priority={"c": 5}, maxOvertakes=2))
        busy = self.lease(supervisor, "a")
        record = Recorder(supervisor)
        record.ask("b1", "c1", "c2")
        busy.release()
        self.ups["a"].exited()
        self.ups["c"].become_ready()
        self.assertEqual(record.served, ["c1", "c2"])
        self.assertTrue(record.tickets["b1"].due)
        record.ask("c3")
        self.assertEqual(record.served, ["c1", "c2"])
        record.done("c1", "c2")
        self.ups["c"].exited()
        self.ups["b"].become_ready()
        self.assertEqual(record.served, ["c1", "c2", "b1"])

    def test_priority_never_stops_a_starting_model(self) -> None:
        """
        A later request of higher priority waits for a model that is starting for others and
        for the requests queued for it; then it goes first.
        """
        supervisor = self.make(["a", "b", "c"], **fifo(priority={"c": 9}))
        record = Recorder(supervisor)
        record.ask("a1", "a2", "c1", "b1")
        self.assertEqual(self.ups["a"].stop_graces, [])
        self.ups["a"].become_ready()
        self.assertEqual(record.served, ["a1", "a2"])
        record.done("a1", "a2")
        self.ups["a"].exited()
        self.assertEqual((self.ups["b"].start_count, self.ups["c"].start_count), (0, 1))

    def test_strict_order_keeps_priority(self) -> None:
        """
        With ``maxOvertakes: 0`` priorities still order the queue, as in llama-swap.
        """
        supervisor = self.make(["a", "b", "c"], **fifo(priority={"c": 5}, maxOvertakes=0))
        busy = self.lease(supervisor, "a")
        record = Recorder(supervisor)
        record.ask("b1", "c1")
        busy.release()
        self.ups["a"].exited()
        self.assertEqual(self.ups["c"].start_count, 1)


class ConcurrencyLimitTests(SupervisorTestCase):
    """
    ``concurrencyLimit``: requests beyond it are refused with 429.
    """

    def test_limit_counts_waiting_and_in_flight(self) -> None:
        """
        Requests waiting for the model count towards its limit as well as those in flight;
        the one beyond the limit is refused with a 429 that names the model.
        """
        supervisor = self.make({"a": {"concurrencyLimit": 2}})
        waits = [supervisor.request("a").wait() for _ in range(2)]
        error = self.assertRaises(TooManyRequests, supervisor.request, "a")
        self.assertEqual(error.status, 429)
        self.assertEqual(error.error_type, "rate_limit_error")
        self.assertIn("'a'", str(error))
        self.ups["a"].become_ready()
        leases = [self.successResultOf(d) for d in waits]
        self.assertRaises(TooManyRequests, supervisor.request, "a")
        leases[0].release()
        self.assertIsInstance(self.successResultOf(supervisor.request("a").wait()), Lease)
        self.assertRaises(TooManyRequests, supervisor.request, "a")

    def test_default_limit_is_10(self) -> None:
        """
        Without ``concurrencyLimit`` a model takes 10 requests at a time.
        """
        supervisor = self.make(["a"])
        for _ in range(10):
            supervisor.request("a")
        self.assertRaises(TooManyRequests, supervisor.request, "a")

    def test_limit_is_per_model(self) -> None:
        """
        One model at its limit does not refuse requests for another.
        """
        supervisor = self.make({"a": {"concurrencyLimit": 1}, "b": {}})
        supervisor.request("a")
        self.assertRaises(TooManyRequests, supervisor.request, "a")
        self.assertIsInstance(supervisor.request("b"), Ticket)

    def test_withdrawn_ticket_frees_its_place(self) -> None:
        """
        A request whose client went away no longer counts towards the limit.
        """
        supervisor = self.make({"a": {"concurrencyLimit": 1}})
        d = supervisor.request("a").wait()
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertIsInstance(supervisor.request("a"), Ticket)


class GroupTests(SupervisorTestCase):
    """
    Configured groups: ``swap``, ``exclusive`` and ``persistent``.
    """

    def test_swap_false_members_run_together(self) -> None:
        """
        Members of a group with ``swap: false`` run at the same time.
        """
        supervisor = self.make(["a", "b"], groups={"pair": {"swap": False, "members": ["a", "b"]}})
        lease_a = self.lease(supervisor, "a")
        d = supervisor.request("b").wait()
        self.assertEqual(self.ups["a"].state, State.READY)
        self.assertEqual(self.ups["b"].running_at_spawn, [["a"]])
        self.ups["b"].become_ready()
        self.successResultOf(d)
        lease_a.release()
        self.assertEqual(self.ups.running(), ["a", "b"])
        self.assertEqual(self.ups["a"].stop_graces, [])

    def test_swap_group_swaps_within(self) -> None:
        """
        A configured group with ``swap: true`` runs one member at a time.
        """
        supervisor = self.make(["a", "b"], groups={"g": {"members": ["a", "b"]}})
        self.lease(supervisor, "a").release()
        supervisor.request("b")
        self.assertEqual(self.ups["a"].state, State.STOPPING)
        self.assertEqual(self.ups["b"].start_count, 0)

    def test_exclusive_group_stops_other_groups(self) -> None:
        """
        Starting a member of an exclusive group stops the models of other groups.
        """
        supervisor = self.make(
            ["a", "b"], groups={"first": {"members": ["a"]}, "second": {"exclusive": True, "members": ["b"]}}
        )
        self.lease(supervisor, "a").release()
        d = supervisor.request("b").wait()
        self.assertEqual(self.ups["a"].state, State.STOPPING)
        self.assertEqual(self.ups["b"].start_count, 0)
        self.ups["a"].exited()
        self.ups["b"].become_ready()
        self.successResultOf(d)
        self.assertEqual(self.ups.running(), ["b"])

    def test_default_group_is_exclusive(self) -> None:
        """
        A model in no group stops the models of a configured (non-persistent) group.
        """
        supervisor = self.make(["a", "x"], groups={"g": {"swap": False, "members": ["a"]}})
        self.lease(supervisor, "a").release()
        supervisor.request("x")
        self.assertEqual(self.ups["a"].state, State.STOPPING)

    def test_persistent_group_not_stopped(self) -> None:
        """
        A persistent group's models keep running when another group's exclusive model starts.
        """
        supervisor = self.make(
            ["a", "b", "x"],
            groups={"resident": {"persistent": True, "members": ["a"]}, "other": {"members": ["b"]}},
        )
        self.lease(supervisor, "a").release()
        d = supervisor.request("b").wait()
        self.assertEqual(self.ups["b"].start_count, 1)
        self.ups["b"].become_ready()
        self.successResultOf(d).release()
        d = supervisor.request("x").wait()
        self.assertEqual(self.ups["a"].state, State.READY)
        self.assertEqual(self.ups["b"].state, State.STOPPING)
        self.ups["b"].exited()
        self.ups["x"].become_ready()
        self.successResultOf(d)
        self.assertEqual(self.ups.running(), ["a", "x"])
        self.assertEqual(self.ups["a"].stop_graces, [])

    def test_persistent_group_still_swaps_within(self) -> None:
        """
        ``persistent`` protects a group from others; inside it, members still swap.
        """
        supervisor = self.make(["a", "c"], groups={"resident": {"persistent": True, "members": ["a", "c"]}})
        self.lease(supervisor, "a").release()
        supervisor.request("c")
        self.assertEqual(self.ups["a"].state, State.STOPPING)

    def test_non_exclusive_group_does_not_stop_others(self) -> None:
        """
        Starting a member of a non-exclusive group leaves other groups' models running.
        """
        supervisor = self.make(
            ["a", "x"], groups={"side": {"exclusive": False, "members": ["a"]}}
        )
        self.lease(supervisor, "x").release()
        d = supervisor.request("a").wait()
        self.assertEqual(self.ups["x"].state, State.READY)
        self.assertEqual(self.ups["a"].start_count, 1)
        self.ups["a"].become_ready()
        self.successResultOf(d).release()
        self.assertEqual(self.ups.running(), ["a", "x"])
        self.assertEqual(self.ups["x"].stop_graces, [])


class MatrixTests(SupervisorTestCase):
    """
    ``routing.router.use: matrix``: the cheapest set containing the requested model decides
    what is stopped.
    """

    def make_matrix(self, sets: dict[str, str], costs: dict[str, int] | None = None) -> Supervisor:
        matrix: dict[str, Any] = {"sets": sets}
        if costs:
            matrix["evict_costs"] = costs
        return self.make(["llm1", "llm2", "tts", "big"],
                         routing={"router": {"use": "matrix", "settings": {"matrix": matrix}}})

    def test_models_of_a_set_run_together(self) -> None:
        """
        A model that may run with the running ones starts beside them; an alternative replaces
        only the model it is an alternative to.
        """
        supervisor = self.make_matrix({"standard": "(llm1 | llm2) & tts", "full": "big"})
        self.lease(supervisor, "tts").release()
        self.lease(supervisor, "llm1").release()
        self.assertEqual(self.ups.running(), ["llm1", "tts"])
        d = supervisor.request("llm2").wait()
        self.assertEqual((self.ups["llm1"].state, self.ups["tts"].state), (State.STOPPING, State.READY))
        self.ups["llm1"].exited()
        self.ups["llm2"].become_ready()
        self.successResultOf(d)
        self.assertEqual(self.ups.running(), ["llm2", "tts"])

    def test_cheapest_eviction_wins(self) -> None:
        """
        With two sets that each keep one running model, the costlier model to lose is kept.
        """
        supervisor = self.make_matrix({"with_llm": "big & llm1", "with_tts": "big & tts", "pair": "llm1 & tts"},
                                      costs={"tts": 5})
        self.lease(supervisor, "llm1").release()
        self.lease(supervisor, "tts").release()
        supervisor.request("big")
        self.assertEqual((self.ups["llm1"].state, self.ups["tts"].state), (State.STOPPING, State.READY))

    def test_model_in_no_set_runs_alone(self) -> None:
        supervisor = self.make_matrix({"pair": "llm1 & tts"})
        self.lease(supervisor, "llm1").release()
        self.lease(supervisor, "tts").release()
        supervisor.request("big")
        self.assertEqual((self.ups["llm1"].state, self.ups["tts"].state), (State.STOPPING, State.STOPPING))

    def test_busy_model_is_evicted_only_when_idle(self) -> None:
        supervisor = self.make_matrix({"standard": "(llm1 | llm2) & tts"})
        busy = self.lease(supervisor, "llm1")
        ticket = supervisor.request("llm2")
        self.assertEqual((ticket.stage, ticket.waiting_for), ("queued", ("llm1",)))
        self.assertEqual(ticket.reason, "1 request for llm1 finishes first, then llm2 starts")
        self.assertEqual(self.ups["llm1"].state, State.READY)
        busy.release()
        self.assertEqual(self.ups["llm1"].state, State.STOPPING)
        self.ups["llm1"].exited()
        self.ups["llm2"].become_ready()
        self.successResultOf(ticket.wait())
        self.assert_never_ran_together("llm1", "llm2")


class TTLTests(SupervisorTestCase):
    """
    ``ttl``: an idle model is stopped.
    """

    def test_stopped_after_ttl_idle(self) -> None:
        """
        A model with no request for ``ttl`` seconds since the last one ended is stopped, with
        its unload grace period.
        """
        supervisor = self.make({"a": {"ttl": 5}})
        lease = self.lease(supervisor, "a")
        self.clock.advance(100)
        self.assertEqual(self.ups["a"].state, State.READY, "stopped with a request in flight")
        lease.release()
        self.clock.advance(4.9)
        self.assertEqual(self.ups["a"].state, State.READY)
        self.clock.advance(0.1)
        self.assertEqual(self.ups["a"].state, State.STOPPING)
        self.assertEqual(self.ups["a"].stop_graces, [10])
        self.ups["a"].exited()
        self.assertEqual(self.ups.running(), [])

    def test_ttl_measured_from_last_release(self) -> None:
        """
        The idle time starts when the last request in flight ends.
        """
        supervisor = self.make({"a": {"ttl": 5}})
        first, second = self.lease(supervisor, "a"), self.lease(supervisor, "a")
        self.clock.advance(1)
        first.release()
        self.clock.advance(2)
        second.release()
        self.clock.advance(4.9)
        self.assertEqual(self.ups["a"].state, State.READY)
        self.clock.advance(0.1)
        self.assertEqual(self.ups["a"].state, State.STOPPING)

    def test_new_request_restarts_idle_time(self) -> None:
        """
        A request during the idle time starts the count again after it ends.
        """
        supervisor = self.make({"a": {"ttl": 5}})
        self.lease(supervisor, "a").release()
        self.clock.advance(4)
        lease = self.lease(supervisor, "a")
        self.clock.advance(3)
        lease.release()
        self.clock.advance(4.9)
        self.assertEqual(self.ups["a"].state, State.READY)
        self.clock.advance(0.1)
        self.assertEqual(self.ups["a"].state, State.STOPPING)

    def test_idle_after_start_without_request(self) -> None:
        """
        A model that became ready but whose only request was withdrawn is stopped after ``ttl``.
        """
        supervisor = self.make({"a": {"ttl": 5}})
        d = supervisor.request("a").wait()
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.clock.advance(1)
        self.ups["a"].become_ready()
        self.clock.advance(5)
        self.assertEqual(self.ups["a"].state, State.STOPPING)

    def test_global_ttl(self) -> None:
        """
        ``globalTTL`` applies to models without their own ``ttl``.
        """
        supervisor = self.make({"a": {}, "b": {"ttl": 0}}, globalTTL=7, groups={"g": {"swap": False, "members": ["a", "b"]}})
        self.lease(supervisor, "a").release()
        self.lease(supervisor, "b").release()
        self.clock.advance(7)
        self.assertEqual(self.ups["a"].state, State.STOPPING)
        self.assertEqual(self.ups["b"].state, State.READY)

    def test_no_ttl_never_stops(self) -> None:
        """
        Without a ttl a model stays loaded however long it is idle.
        """
        supervisor = self.make(["a"])
        self.lease(supervisor, "a").release()
        self.clock.advance(10 * 24 * 3600)
        self.assertEqual(self.ups["a"].state, State.READY)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_restarted_model_gets_fresh_ttl(self) -> None:
        """
        A model swapped out and started again is not stopped by the ttl of its previous run.
        """
        supervisor = self.make({"a": {"ttl": 5}, "b": {}})
        self.lease(supervisor, "a").release()
        self.clock.advance(1)
        d = supervisor.request("b").wait()
        self.ups["a"].exited()
        self.ups["b"].become_ready()
        self.successResultOf(d).release()
        self.clock.advance(1)
        d = supervisor.request("a").wait()
        self.ups["b"].exited()
        self.ups["a"].become_ready()
        lease = self.successResultOf(d)
        self.clock.advance(1)
        lease.release()
        self.clock.advance(4.9)
        self.assertEqual(self.ups["a"].state, State.READY)
        self.assertEqual(self.ups["a"].stop_graces, [10])  # the swap's stop only
        self.clock.advance(0.1)
        self.assertEqual(self.ups["a"].state, State.STOPPING)


class StartFailureTests(SupervisorTestCase):
    """
    A start that fails, and requests that give up.
    """

    def test_start_failure_fails_all_waiting(self) -> None:
        """
        Every request waiting on a start that fails gets the start's error; the next request
        starts the model again.
        """
        supervisor = self.make(["a"])
        tickets = [supervisor.request("a") for _ in range(3)]
        waits = [t.wait() for t in tickets]
        error = self.ups["a"].fail_start("process exited with exit code 1 while starting")
        for ticket, d in zip(tickets, waits):
            self.assertIs(self.failureResultOf(d, StartError).value, error)
            self.assertEqual(ticket.stage, "failed")
        self.assertEqual(supervisor.queued(), 0)
        self.assertEqual(supervisor.in_flight["a"], 0)
        d = supervisor.request("a").wait()
        self.assertEqual(self.ups["a"].start_count, 2)
        self.ups["a"].become_ready()
        self.successResultOf(d)

    def test_start_failure_unblocks_queue(self) -> None:
        """
        Requests for another model waiting behind a start that fails go ahead.
        """
        supervisor = self.make(["a", "b"])
        da = supervisor.request("a").wait()
        db = supervisor.request("b").wait()
        self.ups["a"].fail_start()
        self.failureResultOf(da, StartError)
        self.assertEqual(self.ups["b"].start_count, 1)
        self.ups["b"].become_ready()
        self.successResultOf(db)

    def test_exit_during_start_fails_waiting(self) -> None:
        """
        A child that exits while starting fails the requests waiting for it.
        """
        supervisor = self.make(["a"])
        d = supervisor.request("a").wait()
        self.ups["a"].exited()
        self.failureResultOf(d, StartError)
        self.assertEqual(supervisor.queued(), 0)

    def test_withdrawn_ticket_does_not_affect_others(self) -> None:
        """
        A request that gives up while its model starts leaves the start and the other waiting
        requests alone.
        """
        supervisor = self.make(["a"])
        leaving = supervisor.request("a").wait()
        staying = supervisor.request("a").wait()
        leaving.cancel()
        self.failureResultOf(leaving, CancelledError)
        self.assertEqual(self.ups["a"].state, State.STARTING)
        self.assertEqual(self.ups["a"].stop_graces, [])
        self.ups["a"].become_ready()
        self.successResultOf(staying)
        self.assertEqual(supervisor.in_flight["a"], 1)
        self.assertEqual(supervisor.queued(), 0)

    def test_withdrawn_swap_request_cancels_the_swap(self) -> None:
        """
        A request that gave up while waiting for a busy model to finish no longer makes that
        model stop.
        """
        supervisor = self.make(["a", "b"])
        lease = self.lease(supervisor, "a")
        d = supervisor.request("b").wait()
        d.cancel()
        self.failureResultOf(d, CancelledError)
        lease.release()
        self.assertEqual(self.ups["a"].state, State.READY)
        self.assertEqual(self.ups["b"].start_count, 0)
        self.assertEqual(supervisor.queued(), 0)

    def test_withdrawn_ticket_keeps_order_of_others(self) -> None:
        """
        Withdrawing one waiting request leaves the others waiting in their order.
        """
        supervisor = self.make(["a", "b", "c"])
        lease = self.lease(supervisor, "a")
        db = supervisor.request("b").wait()
        dc = supervisor.request("c").wait()
        db.cancel()
        self.failureResultOf(db, CancelledError)
        lease.release()
        self.ups["a"].exited()
        self.assertEqual(self.ups["b"].start_count, 0)
        self.ups["c"].become_ready()
        self.successResultOf(dc)


class UnloadTests(SupervisorTestCase):
    """
    ``unload(model)`` and ``unload()``.
    """

    def make_pair(self) -> Supervisor:
        return self.make(["a", "b"], groups={"pair": {"swap": False, "members": ["a", "b"]}})

    def test_unload_one(self) -> None:
        """
        Unloading one model stops it (even with a request in flight) and fires once it exited.
        """
        supervisor = self.make_pair()
        lease = self.lease(supervisor, "a")
        self.lease(supervisor, "b").release()
        d = supervisor.unload("a")
        self.assertEqual(self.ups["a"].state, State.STOPPING)
        self.assertEqual(self.ups["b"].state, State.READY)
        self.assertEqual(self.ups["a"].stop_graces, [10])
        self.assertNoResult(d)
        self.ups["a"].exited()
        self.successResultOf(d)
        lease.release()
        self.assertEqual(supervisor.in_flight["a"], 0)

    def test_unload_all(self) -> None:
        """
        Unloading every model stops them all and fires once all have exited.
        """
        supervisor = self.make_pair()
        self.lease(supervisor, "a").release()
        self.lease(supervisor, "b").release()
        d = supervisor.unload()
        self.assertEqual(self.ups["a"].state, State.STOPPING)
        self.assertEqual(self.ups["b"].state, State.STOPPING)
        self.ups["a"].exited()
        self.assertNoResult(d)
        self.ups["b"].exited()
        self.successResultOf(d)
        self.assertEqual(self.ups.running(), [])

    def test_unload_nothing_running(self) -> None:
        """
        Unloading when nothing runs succeeds at once.
        """
        supervisor = self.make_pair()
        self.successResultOf(supervisor.unload())
        self.successResultOf(supervisor.unload("a"))

    def test_unload_during_start_fails_waiting(self) -> None:
        """
        Requests waiting for a model that is unloaded while it starts fail.
        """
        supervisor = self.make(["a"])
        d = supervisor.request("a").wait()
        unloaded = supervisor.unload("a")
        self.failureResultOf(d, StartError)
        self.ups["a"].exited()
        self.successResultOf(unloaded)
        self.assertEqual(self.ups["a"].start_count, 1)

    def test_unloaded_model_restarts_on_request(self) -> None:
        """
        After an unload the next request starts the model again.
        """
        supervisor = self.make(["a"])
        self.lease(supervisor, "a").release()
        supervisor.unload()
        self.ups["a"].exited()
        self.lease(supervisor, "a")
        self.assertEqual(self.ups["a"].start_count, 2)


class ShutdownTests(SupervisorTestCase):
    """
    ``stopService``: refuse, fail the waiting, stop everything, wait.
    """

    def test_stop_service(self) -> None:
        """
        Stopping the service fails waiting requests with `ShuttingDown`, refuses new ones, stops
        every child, and fires only when all have exited.
        """
        supervisor = self.make(
            ["a", "b", "c"], groups={"pair": {"swap": False, "members": ["a", "b"]}}
        )
        supervisor.startService()
        lease = self.lease(supervisor, "a")
        starting = supervisor.request("b").wait()
        queued = supervisor.request("c").wait()
        self.assertEqual(self.ups.running(), ["a", "b"])
        d = supervisor.stopService()
        for waiting in (starting, queued):
            error = self.failureResultOf(waiting, ShuttingDown).value
            self.assertEqual(error.status, 503)
        self.assertEqual(self.ups["a"].state, State.STOPPING)
        self.assertEqual(self.ups["b"].state, State.STOPPING)
        self.assertRaises(ShuttingDown, supervisor.request, "a")
        self.assertRaises(Rejected, supervisor.request, "c")
        self.ups["b"].exited()
        self.assertNoResult(d)
        lease.release()
        self.assertNoResult(d)
        self.ups["a"].exited()
        self.successResultOf(d)
        self.assertEqual(self.ups.running(), [])
        self.assertEqual(self.ups["c"].start_count, 0)
        self.assertFalse(supervisor.running)

    def test_stop_service_cancels_ttl(self) -> None:
        """
        No timer outlives the service.
        """
        supervisor = self.make({"a": {"ttl": 60}})
        supervisor.startService()
        self.lease(supervisor, "a").release()
        d = supervisor.stopService()
        self.ups["a"].exited()
        self.successResultOf(d)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_stop_service_nothing_running(self) -> None:
        """
        With nothing running the service stops at once.
        """
        supervisor = self.make(["a"])
        supervisor.startService()
        self.successResultOf(supervisor.stopService())


class PreloadTests(SupervisorTestCase):
    """
    ``hooks.on_startup.preload``.
    """

    def test_preload_starts_models_in_order(self) -> None:
        """
        Starting the service loads the preload models one after the other, then leaves them
        ready with nothing in flight.
        """
        supervisor = self.make(
            ["a", "b", "c"],
            groups={"pair": {"swap": False, "members": ["a", "b"]}},
            hooks={"on_startup": {"preload": ["a", "b"]}},
        )
        supervisor.startService()
        self.assertEqual((self.ups["a"].start_count, self.ups["b"].start_count), (1, 0))
        self.ups["a"].become_ready()
        self.assertEqual(self.ups["b"].start_count, 1)
        self.ups["b"].become_ready()
        self.assertEqual(self.ups.running(), ["a", "b"])
        self.assertEqual(supervisor.in_flight, {"a": 0, "b": 0, "c": 0})
        self.assertEqual(self.ups["c"].start_count, 0)

    def test_preload_failure_continues(self) -> None:
        """
        A preload model that fails to start does not stop the others from loading.
        """
        supervisor = self.make(
            ["a", "b"],
            groups={"pair": {"swap": False, "members": ["a", "b"]}},
            hooks={"on_startup": {"preload": ["a", "b"]}},
        )
        supervisor.startService()
        self.ups["a"].fail_start()
        self.assertEqual(self.ups["b"].start_count, 1)
        self.ups["b"].become_ready()
        self.assertEqual(self.ups.running(), ["b"])

    def test_stop_during_preload(self) -> None:
        """
        Stopping the service during preload stops what is loading and loads nothing more.
        """
        supervisor = self.make(
            ["a", "b"],
            groups={"pair": {"swap": False, "members": ["a", "b"]}},
            hooks={"on_startup": {"preload": ["a", "b"]}},
        )
        supervisor.startService()
        d = supervisor.stopService()
        self.assertEqual(self.ups["a"].state, State.STOPPING)
        self.ups["a"].exited()
        self.successResultOf(d)
        self.assertEqual(self.ups["b"].start_count, 0)
        self.assertEqual(self.ups["a"].start_count, 1)


class ReloadTests(SupervisorTestCase):
    """
    `Supervisor.reload`: unchanged models keep their process, changed and removed ones finish
    their requests first, nothing waiting is lost.
    """

    NEW_CMD = CMD + " -m other.gguf"

    def reload(self, supervisor: Supervisor, models: dict[str, dict[str, Any]], **top: Any) -> ReloadResult:
        return supervisor.reload(make_config(models, **top))

    def test_unchanged_model_keeps_its_process(self) -> None:
        """
        A model whose settings did not change keeps the same upstream and process; a new model
        is added, stopped until asked for.
        """
        supervisor = self.make({"a": {}, "b": {}})
        self.lease(supervisor, "a").release()
        before = supervisor.upstreams["a"]
        result = self.reload(supervisor, {"a": {}, "b": {}, "c": {}})
        self.assertEqual(result, ReloadResult(added=("c",), unchanged=("a", "b")))
        self.assertIs(supervisor.upstreams["a"], before)
        self.assertEqual(before.state, State.READY)
        self.assertEqual(before.start_count, 1)
        self.assertEqual(before.stop_graces, [])
        self.assertEqual(supervisor.upstreams["c"].state, State.STOPPED)
        self.assertEqual(list(supervisor.upstreams), ["a", "b", "c"])
        self.assertEqual(supervisor.in_flight, {"a": 0, "b": 0, "c": 0})
        self.assertIsInstance(self.successResultOf(supervisor.request("a").wait()), Lease)

    def test_new_settings_that_need_no_restart_apply_in_place(self) -> None:
        """
        A new ttl (or alias, unloadTimeout, ...) applies to the running process, which keeps
        running; the new ttl counts from the reload.
        """
        supervisor = self.make({"a": {"ttl": 100}})
        self.lease(supervisor, "a").release()
        before = supervisor.upstreams["a"]
        self.clock.advance(50)
        result = self.reload(supervisor, {"a": {"ttl": 10, "aliases": ["alpha"]}}, healthCheckTimeout=30)
        self.assertEqual(result.updated, ("a",))
        self.assertIs(supervisor.upstreams["a"], before)
        self.assertEqual(before.model.ttl, 10)
        self.assertEqual(before.reconfigured, [(30, 300)])
        self.assertEqual(supervisor.config.resolve("alpha"), before.model)
        self.clock.advance(9.9)
        self.assertEqual(before.state, State.READY)
        self.clock.advance(0.1)
        self.assertEqual(before.state, State.STOPPING)

    def test_changed_model_finishes_in_flight_requests_then_restarts(self) -> None:
        """
        A model whose command changed keeps serving the request in flight on its old process;
        a new request waits, the old process is stopped once idle, and the new one starts only
        after the old one has exited.
        """
        supervisor = self.make({"a": {}})
        in_flight = self.lease(supervisor, "a")
        old = supervisor.upstreams["a"]
        result = self.reload(supervisor, {"a": {"cmd": self.NEW_CMD}})
        self.assertEqual(result.changed, ("a",))
        new = supervisor.upstreams["a"]
        self.assertIsNot(new, old)
        self.assertEqual(old.state, State.READY, "the old process serves its request in flight")
        self.assertEqual(supervisor.retiring_upstreams(), [old])
        ticket = supervisor.request("a")
        d = ticket.wait()
        self.assertEqual((ticket.stage, ticket.waiting_for), ("queued", ("a",)))
        self.assertEqual(new.start_count, 0)
        in_flight.release()
        self.assertEqual(old.state, State.STOPPING)
        self.assertEqual(new.start_count, 0, "a new process never runs beside the old one")
        old.exited()
        self.assertEqual(supervisor.retiring_upstreams(), [])
        self.assertEqual(new.start_count, 1)
        self.assertEqual(new.model.cmd[-2:], ("-m", "other.gguf"))
        new.become_ready()
        self.assertIs(self.successResultOf(d).upstream, new)

    def test_new_port_held_by_another_replaced_process(self) -> None:
        """
        A model added ahead of the others in id order shifts their ``${PORT}``: b's new port is
        the one c's replaced process still listens on while it finishes a request. b starts only
        once that process has exited, so that c's old server never answers in b's name.
        """
        pair = {"groups": {"all": {"swap": False, "exclusive": False, "members": ["b", "c"]}}}
        supervisor = self.make({"b": {}, "c": {}}, **pair)
        self.lease(supervisor, "b").release()
        in_flight = self.lease(supervisor, "c")
        old_b, old_c = supervisor.upstreams["b"], supervisor.upstreams["c"]
        trio = {"groups": {"all": {"swap": False, "exclusive": False, "members": ["a", "b", "c"]}}}
        result = self.reload(supervisor, {"a": {}, "b": {}, "c": {}}, **trio)
        self.assertEqual(result.changed, ("b", "c"))
        new_b = supervisor.upstreams["b"]
        self.assertEqual(new_b.model.port, old_c.model.port)
        old_b.exited()
        d = supervisor.request("b").wait()
        self.assertEqual(new_b.start_count, 0, "b's new server would find its port taken")
        in_flight.release()
        old_c.exited()
        self.assertEqual(new_b.start_count, 1)
        new_b.become_ready()
        self.assertIs(self.successResultOf(d).upstream, new_b)

    def test_idle_changed_model_stops_at_once(self) -> None:
        """
        A changed model with nothing in flight is stopped right away, with its unloadTimeout.
        """
        supervisor = self.make({"a": {"unloadTimeout": 4}})
        self.lease(supervisor, "a").release()
        old = supervisor.upstreams["a"]
        self.reload(supervisor, {"a": {"cmd": self.NEW_CMD}})
        self.assertEqual(old.stop_graces, [4])
        self.assertEqual(supervisor.upstreams["a"].state, State.STOPPED)

    def test_waiting_request_for_changed_model_moves_to_new_process(self) -> None:
        """
        A request waiting for a changed model's start is not failed: the old start is aborted and
        the request is served by the new process.
        """
        supervisor = self.make({"a": {}})
        d = supervisor.request("a").wait()
        old = supervisor.upstreams["a"]
        self.assertEqual(old.state, State.STARTING)
        self.reload(supervisor, {"a": {"cmd": self.NEW_CMD}})
        self.assertEqual(old.state, State.STOPPING)
        self.assertNoResult(d)
        old.exited()
        new = supervisor.upstreams["a"]
        self.assertEqual(new.start_count, 1)
        new.become_ready()
        self.assertIs(self.successResultOf(d).upstream, new)

    def test_removed_model_finishes_in_flight_requests(self) -> None:
        """
        A removed model is unknown to new requests, serves its request in flight, and then stops.
        """
        supervisor = self.make({"a": {}, "b": {}}, groups={"all": {"swap": False, "members": ["a", "b"]}})
        in_flight = self.lease(supervisor, "b")
        old = supervisor.upstreams["b"]
        result = self.reload(supervisor, {"a": {}})
        self.assertEqual(result.removed, ("b",))
        self.assertNotIn("b", supervisor.upstreams)
        self.assertNotIn("b", supervisor.in_flight)
        error = self.assertRaises(UnknownModel, supervisor.request, "b")
        self.assertEqual(error.status, 404)
        self.assertEqual(old.state, State.READY)
        in_flight.release()
        self.assertEqual(old.state, State.STOPPING)
        old.exited()
        self.assertEqual(supervisor.retiring_upstreams(), [])

    def test_waiting_request_for_removed_model_fails(self) -> None:
        """
        A request waiting for a removed model's start fails with 404, and the start is aborted.
        """
        supervisor = self.make({"a": {}, "b": {}})
        d = supervisor.request("b").wait()
        result = self.reload(supervisor, {"a": {}})
        self.assertEqual(result.removed, ("b",))
        error = self.failureResultOf(d, UnknownModel).value
        self.assertIn("'b' was removed", str(error))
        self.assertEqual(self.ups.events[-1], ("stop", "b"))
        self.assertEqual(supervisor.queued(), 0)

    def test_retiring_process_still_counts_for_swaps(self) -> None:
        """
        A removed model that still serves a request keeps its place in its swap group: a model
        that would swap it out waits until it is done and has exited.
        """
        supervisor = self.make(["a", "b"])
        in_flight = self.lease(supervisor, "a")
        self.reload(supervisor, {"b": {}})
        old_a = self.ups["a"]
        d = supervisor.request("b").wait()
        self.assertEqual(self.ups["b"].start_count, 0)
        in_flight.release()
        self.assertEqual(old_a.state, State.STOPPING)
        self.assertEqual(self.ups["b"].start_count, 0)
        old_a.exited()
        self.assertEqual(self.ups["b"].start_count, 1)
        self.ups["b"].become_ready()
        self.successResultOf(d)
        self.assert_never_ran_together("a", "b")

    def test_each_upstream_follows_reloads(self) -> None:
        """
        `each_upstream` watchers see the current upstreams at once, then each one a reload adds
        or replaces.
        """
        supervisor = self.make({"a": {}, "b": {}})
        seen: list[str] = []
        supervisor.each_upstream(lambda upstream: seen.append(upstream.model.id))
        self.assertEqual(seen, ["a", "b"])
        self.reload(supervisor, {"a": {"cmd": self.NEW_CMD}, "b": {}, "c": {}})
        self.assertEqual(sorted(seen[2:]), ["a", "c"])

    def test_unload_stops_retiring_processes(self) -> None:
        """
        Unloading a model (or every model) also stops its replaced process, requests in flight
        or not; so does shutdown.
        """
        supervisor = self.make({"a": {}})
        supervisor.startService()
        self.lease(supervisor, "a")
        old = supervisor.upstreams["a"]
        self.reload(supervisor, {"a": {"cmd": self.NEW_CMD}})
        d = supervisor.unload("a")
        self.assertEqual(old.state, State.STOPPING)
        self.assertNoResult(d)
        old.exited()
        self.successResultOf(d)

    def test_shutdown_waits_for_retiring_processes(self) -> None:
        """
        Shutdown stops a replaced process too and waits for it; no reload after that.
        """
        supervisor = self.make({"a": {}})
        supervisor.startService()
        self.lease(supervisor, "a")
        old = supervisor.upstreams["a"]
        self.reload(supervisor, {"a": {"cmd": self.NEW_CMD}})
        d = supervisor.stopService()
        self.assertEqual(old.state, State.STOPPING)
        self.assertNoResult(d)
        old.exited()
        self.successResultOf(d)
        self.assertRaises(ShuttingDown, self.reload, supervisor, {"a": {}})

    def test_reload_back_and_forth(self) -> None:
        """
        Two reloads in a row (a change, then back) leave one current process per model and stop
        every replaced one.
        """
        supervisor = self.make({"a": {}})
        in_flight = self.lease(supervisor, "a")
        first = supervisor.upstreams["a"]
        self.reload(supervisor, {"a": {"cmd": self.NEW_CMD}})
        self.reload(supervisor, {"a": {}})
        self.assertEqual(supervisor.retiring_upstreams(), [first])
        d = supervisor.request("a").wait()
        in_flight.release()
        first.exited()
        current = supervisor.upstreams["a"]
        self.assertEqual(current.model.cmd, first.model.cmd)
        current.become_ready()
        self.assertIs(self.successResultOf(d).upstream, current)
        self.assertEqual(supervisor.in_flight["a"], 1)


class MemoryBudgetTests(SupervisorTestCase):
    """
    ``memoryBudget`` with ``memory`` per model: idle models make room, least recently used first.
    """

    def make_budget(self, budget: str, memory: dict[str, str], **top: Any) -> Supervisor:
        models = {mid: ({"memory": size} if size else {}) for mid, size in memory.items()}
        top.setdefault("groups", {"all": {"swap": False, "members": list(memory)}})
        return self.make(models, memoryBudget=budget, **top)

    def test_least_recently_used_idle_model_makes_room(self) -> None:
        """
        A start that would exceed the budget stops the idle model used longest ago, and only
        once it has exited does the new model start.
        """
        supervisor = self.make_budget("10GiB", {"a": "4GiB", "b": "4GiB", "c": "4GiB"})
        self.lease(supervisor, "a").release()
        self.clock.advance(1)
        self.lease(supervisor, "b").release()
        ticket = supervisor.request("c")
        self.assertEqual((self.ups["a"].state, self.ups["b"].state), (State.STOPPING, State.READY))
        self.assertEqual((ticket.stage, ticket.waiting_for), ("stopping", ("a",)))
        self.assertEqual(self.ups["c"].start_count, 0)
        self.ups["a"].exited()
        self.ups["c"].become_ready()
        self.successResultOf(ticket.wait())
        self.assertEqual(self.ups.running(), ["b", "c"])

    def test_fits_without_stopping_anything(self) -> None:
        supervisor = self.make_budget("12GiB", {"a": "4GiB", "b": "4GiB", "c": "4GiB"})
        for model_id in "abc":
            self.lease(supervisor, model_id).release()
        self.assertEqual(self.ups.running(), ["a", "b", "c"])

    def test_idle_model_goes_before_a_busy_one(self) -> None:
        """
        A busy model is kept even if it was used longer ago; a busy one is stopped only when no
        idle one is left, and never mid-request.
        """
        supervisor = self.make_budget("8GiB", {"a": "4GiB", "b": "4GiB", "c": "4GiB"})
        busy = self.lease(supervisor, "a")
        self.clock.advance(1)
        self.lease(supervisor, "b").release()
        first_c = supervisor.request("c").wait()
        self.assertEqual((self.ups["a"].state, self.ups["b"].state), (State.READY, State.STOPPING))
        self.ups["b"].exited()
        self.ups["c"].become_ready()
        self.successResultOf(first_c).release()
        busy_c = self.successResultOf(supervisor.request("c").wait())
        ticket = supervisor.request("b")
        self.assertEqual((ticket.stage, ticket.waiting_for), ("queued", ("a",)))
        self.assertEqual((self.ups["a"].state, self.ups["c"].state), (State.READY, State.READY))
        busy_c.release()
        self.assertEqual((self.ups["a"].state, self.ups["c"].state), (State.READY, State.STOPPING))

    def test_persistent_models_are_kept(self) -> None:
        supervisor = self.make_budget(
            "8GiB", {"a": "4GiB", "b": "4GiB", "c": "4GiB"},
            groups={"resident": {"persistent": True, "swap": False, "exclusive": False, "members": ["a"]},
                    "others": {"swap": False, "exclusive": False, "members": ["b", "c"]}})
        self.lease(supervisor, "a").release()
        self.clock.advance(1)
        self.lease(supervisor, "b").release()
        supervisor.request("c")
        self.assertEqual((self.ups["a"].state, self.ups["b"].state), (State.READY, State.STOPPING))

    def test_model_that_never_fits_is_refused(self) -> None:
        """
        A model larger than the whole budget is answered 507 at once, with the numbers.
        """
        supervisor = self.make_budget("22GiB", {"big": "30GiB", "a": ""})
        error = self.assertRaises(InsufficientMemory, supervisor.request, "big")
        self.assertEqual((error.status, error.code), (507, "insufficient_memory"))
        self.assertEqual(str(error), "model 'big' needs 30.0 GiB (declared), more than the memory budget of"
                                     " 22.0 GiB (memoryBudget)")
        self.assertEqual(self.ups["big"].start_count, 0)

    def test_persistent_models_can_leave_too_little(self) -> None:
        supervisor = self.make_budget(
            "10GiB", {"a": "8GiB", "b": "4GiB"},
            groups={"resident": {"persistent": True, "swap": False, "exclusive": False, "members": ["a"]},
                    "others": {"exclusive": False, "members": ["b"]}})
        self.lease(supervisor, "a").release()
        error = self.assertRaises(InsufficientMemory, supervisor.request, "b")
        self.assertEqual(str(error), "model 'b' needs 4.0 GiB (declared), but 8.0 GiB of the 10.0 GiB memory"
                                     " budget is held by persistent models a; unload them first")

    def test_measured_footprint_counts_when_none_is_declared(self) -> None:
        """
        A model without ``memory`` is counted for what it was measured to use once loaded.
        """
        supervisor = self.make_budget("10GiB", {"a": "", "b": "", "c": ""})
        self.assertEqual(supervisor.memory_of("a"), {"declared": None, "measured": None})
        for model_id in "ab":
            ticket = supervisor.request(model_id)
            self.rss[self.ups[model_id].pid] = 4 * GIB
            self.ups[model_id].become_ready()
            self.successResultOf(ticket.wait()).release()
            self.clock.advance(1)
        self.assertEqual(supervisor.memory_of("a"), {"declared": None, "measured": 4 * GIB})
        ticket = supervisor.request("c")
        self.assertEqual(self.ups["c"].start_count, 1, "c was never measured: counted as 0")
        self.rss[self.ups["c"].pid] = 4 * GIB
        self.ups["c"].become_ready()
        self.successResultOf(ticket.wait()).release()
        self.ups["a"].stop()
        self.ups["a"].exited()
        self.assertEqual(self.ups.running(), ["b", "c"])
        supervisor.request("a")
        self.assertEqual(self.ups["b"].state, State.STOPPING, "a's measured 4 GiB needs room now")

    def test_declared_memory_wins_over_measured(self) -> None:
        supervisor = self.make_budget("10GiB", {"a": "6GiB"})
        ticket = supervisor.request("a")
        self.rss[self.ups["a"].pid] = 1 * GIB
        self.ups["a"].become_ready()
        self.successResultOf(ticket.wait())
        self.assertEqual(supervisor.memory_of("a"), {"declared": 6 * GIB, "measured": None})
        self.clock.advance(MEASURE_DELAY)
        self.assertEqual(supervisor.memory_of("a"), {"declared": 6 * GIB, "measured": GIB})

    def test_footprint_is_remeasured_while_running(self) -> None:
        """
        A model that grows while it serves (its context cache fills) is measured again when a
        request ends, at most every 30 s; the largest figure is kept.
        """
        supervisor = self.make_budget("10GiB", {"a": ""})
        lease = self.lease(supervisor, "a")
        pid = self.ups["a"].pid
        self.rss[pid] = GIB
        self.clock.advance(31)
        lease.release()
        self.assertEqual(supervisor.memory_of("a")["measured"], GIB)
        self.rss[pid] = 3 * GIB
        self.clock.advance(1)
        self.lease(supervisor, "a").release()
        self.assertEqual(supervisor.memory_of("a")["measured"], GIB, "measured again within 30 s")
        self.clock.advance(30)
        self.lease(supervisor, "a").release()
        self.assertEqual(supervisor.memory_of("a")["measured"], 3 * GIB)

    def test_auto_budget_is_what_is_free(self) -> None:
        supervisor = self.make_budget("auto", {"a": "1GiB"})
        self.assertGreater(supervisor.memory_budget, 0)
        self.assertLessEqual(supervisor.memory_budget, psutil.virtual_memory().total)

    def test_no_budget_no_limit(self) -> None:
        supervisor = self.make({"a": {"memory": "1000GiB"}})
        self.assertIsNone(supervisor.memory_budget)
        self.lease(supervisor, "a")

    def test_groups_still_apply(self) -> None:
        """
        The budget adds to the group rules: a swap group still swaps even with memory to spare.
        """
        supervisor = self.make({"a": {"memory": "1GiB"}, "b": {"memory": "1GiB"}}, memoryBudget="100GiB")
        self.lease(supervisor, "a").release()
        supervisor.request("b")
        self.assertEqual(self.ups["a"].state, State.STOPPING)

    def test_running_shows_declared_and_measured(self) -> None:
        supervisor = self.make_budget("10GiB", {"a": "6GiB"})
        ticket = supervisor.request("a")
        self.rss[self.ups["a"].pid] = 5 * GIB
        self.ups["a"].become_ready()
        self.successResultOf(ticket.wait())
        self.clock.advance(MEASURE_DELAY)
        request = DummyRequest([b""])
        body = Running(supervisor, self.clock, ModelBoard(supervisor, self.clock, {})).render_GET(request)
        entry = json.loads(body)["running"][0]
        self.assertEqual(entry["memory"], {"declared": 6 * GIB, "measured": 5 * GIB})


    def test_metrics_show_declared_measured_and_budget(self) -> None:
        supervisor = self.make_budget("10GiB", {"a": "6GiB", "b": ""})
        ticket = supervisor.request("a")
        self.rss[self.ups["a"].pid] = 5 * GIB
        self.ups["a"].become_ready()
        self.successResultOf(ticket.wait())
        self.clock.advance(MEASURE_DELAY)
        text = generate_latest(Metrics(supervisor, self.clock, process_metrics=False).registry).decode()
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                   for family in text_string_to_metric_families(text) for s in family.samples}
        memory = {labels: value for (name, labels), value in samples.items() if name == "swapproxy_model_memory_bytes"}
        self.assertEqual(memory, {(("model", "a"), ("source", "declared")): 6 * GIB,
                                  (("model", "a"), ("source", "measured")): 5 * GIB})
        self.assertEqual(samples[("swapproxy_memory_budget_bytes", ())], 10 * GIB)


class InvariantTests(SupervisorTestCase):
    """
    Random (seeded) mixes of requests, releases, cancels, starts that succeed or fail, exits and
    time, under each policy: every request is answered, no model is stopped mid-request, and a
    swap group never runs two models.
    """

    CONFIGS: list[dict[str, Any]] = [
        {},
        STRICT,
        fifo(maxOvertakes=2, maxWait=5, priority={"c": 3}),
        {"groups": {"p": {"swap": False, "members": ["a", "b"]}, "q": {"exclusive": False, "members": ["c"]},
                    "r": {"persistent": True, "swap": False, "exclusive": False, "members": ["d"]}}},
        {"routing": {"router": {"use": "matrix", "settings": {"matrix": {
            "sets": {"s": "(a | b) & c", "t": "d"}, "evict_costs": {"c": 3}}}}}},
        {"memoryBudget": "9GiB", "groups": {"all": {"swap": False, "exclusive": False, "members": ["a", "b", "c", "d"]}}},
    ]

    def run_mix(self, seed: int, top: dict[str, Any]) -> None:
        rng = random.Random(seed)
        models = ["a", "b", "c", "d"]
        memory = {"memory": "4GiB"} if "memoryBudget" in top else {}
        supervisor = self.make({m: dict(memory) for m in models}, **top)
        one_at_a_time = top in ({}, STRICT) or "priority" in str(top)

        def watch(upstream: Any, old: State, new: State) -> None:
            if new is State.STOPPING and old is State.READY:
                self.assertEqual(supervisor.in_flight[upstream.model.id], 0, f"seed {seed}: stopped mid-request")

        for model_id in models:
            self.ups[model_id].state_observers.append(watch)
        waits: list[Deferred[Lease]] = []
        leases: list[Lease] = []
        for _ in range(400):
            roll = rng.random()
            if roll < 0.35:
                try:
                    d = supervisor.request(rng.choice(models)).wait()
                except Rejected:
                    continue
                d.addCallbacks(leases.append, lambda f: f.trap(CancelledError, StartError, Rejected))
                waits.append(d)
            elif roll < 0.6 and leases:
                leases.pop(rng.randrange(len(leases))).release()
            elif roll < 0.8:
                for upstream in (self.ups[m] for m in models):
                    if upstream.state is State.STARTING and rng.random() < 0.5:
                        upstream.fail_start() if rng.random() < 0.05 else upstream.become_ready()
                    elif upstream.state is State.STOPPING and rng.random() < 0.5:
                        upstream.exited()
            elif roll < 0.83:
                pending = [d for d in waits if not d.called]
                if pending:
                    rng.choice(pending).cancel()
            else:
                self.clock.advance(rng.choice([0.01, 0.05, 1, 30, 70]))
            if one_at_a_time:
                live = [m for m in models if self.ups[m].state in (State.STARTING, State.READY)]
                self.assertLessEqual(len(live), 1, f"seed {seed}: {live} run together")
        for _ in range(1000):
            while leases:
                leases.pop().release()
            moved = False
            for upstream in (self.ups[m] for m in models):
                if upstream.state is State.STARTING:
                    upstream.become_ready()
                    moved = True
                elif upstream.state is State.STOPPING:
                    upstream.exited()
                    moved = True
            self.clock.advance(1)
            if not moved and not supervisor.queued() and not leases:
                break
        self.assertEqual([d for d in waits if not d.called], [], f"seed {seed}, {top}: requests never answered")

    def test_every_request_is_answered(self) -> None:
        for top in self.CONFIGS:
            for seed in range(10):
                self.run_mix(seed, top)

    def test_max_wait_deadline_is_reached(self) -> None:
        """
        A ticket becomes due exactly when the ``maxWait`` timer fires, whatever the rounding of
        its arrival time (the timer does not fire again and again).
        """
        supervisor = self.make(["a", "b"], **fifo(maxWait=5))
        self.lease(supervisor, "a")
        self.clock.advance(30.05)  # 30.05 + 5 - 30.05 < 5 in floating point
        ticket = supervisor.request("b")
        self.clock.advance(4.5)
        self.assertFalse(ticket.due)
        self.clock.advance(0.5)
        self.assertTrue(ticket.due)
        self.assertEqual(self.clock.getDelayedCalls(), [])


class Probe:
    """
    A health probe answering 503 until ``healthy`` is set.
    """

    def __init__(self) -> None:
        self.healthy: set[str] = set()

    def __call__(self, upstream: Upstream) -> Deferred[int]:
        return succeed(200 if upstream.model.id in self.healthy else 503)


class WithUpstreamTests(SynchronousTestCase):
    """
    The supervisor with real `Upstream` objects on a fake process reactor.
    """

    def setUp(self) -> None:
        self.reactor = ProcessReactor().install(self)
        self.probe = Probe()

    def make(self, models: list[str], **top: Any) -> Supervisor:
        config = make_config({mid: {"cmd": f"{sys.executable} -c pass --port ${{PORT}}"} for mid in models}, **top)

        def factory(model: ModelConfig) -> Upstream:
            return Upstream(model, self.reactor, health_probe=self.probe)

        return Supervisor(config, self.reactor, upstream_factory=factory)

    def test_swap(self) -> None:
        """
        A swap sends SIGTERM to the old child and spawns the new one after the old one exited.
        """
        supervisor = self.make(["a", "b"])
        self.probe.healthy = {"a", "b"}
        d = supervisor.request("a").wait()
        self.reactor.advance(1)
        self.successResultOf(d).release()
        a = self.reactor.spawned[0]
        d = supervisor.request("b").wait()
        self.assertEqual(a.signals, [signal.SIGTERM])
        self.assertEqual(len(self.reactor.spawned), 1)
        a.exit(0)
        self.assertEqual(len(self.reactor.spawned), 2)
        self.reactor.advance(1)
        self.assertIs(self.successResultOf(d).upstream, supervisor.upstreams["b"])

    def test_timed_out_start_killed_after_unload_timeout(self) -> None:
        """
        A model whose start timed out is stopped with its ``unloadTimeout``, also when a request
        for another model is waiting for it to go: one SIGTERM, then SIGKILL after the grace.
        """
        supervisor = self.make(["a", "b"], healthCheckTimeout=15, unloadTimeout=2)
        da = supervisor.request("a").wait()
        db = supervisor.request("b").wait()
        a = self.reactor.spawned[0]
        self.reactor.advance(15)
        self.failureResultOf(da, StartError)
        self.assertEqual(a.signals, [signal.SIGTERM])
        self.reactor.advance(2)
        self.assertEqual(a.signals, [signal.SIGTERM, signal.SIGKILL])
        a.exit(None, signal.SIGKILL)
        self.assertEqual(supervisor.upstreams["a"].state, State.FAILED)
        self.probe.healthy = {"b"}
        self.reactor.advance(1)
        self.successResultOf(db)

    def test_failed_start_unblocks_queue(self) -> None:
        """
        When a child exits during its start, the model is failed and a request for another model
        that waited behind it goes ahead.
        """
        supervisor = self.make(["a", "b"])
        da = supervisor.request("a").wait()
        db = supervisor.request("b").wait()
        self.reactor.spawned[0].output(b"error: failed to load model\n", fd=2)
        self.reactor.spawned[0].exit(1)
        self.assertIn("error: failed to load model", str(self.failureResultOf(da, StartError).value))
        self.assertEqual(supervisor.upstreams["a"].state, State.FAILED)
        self.assertEqual(self.reactor.spawned[0].signals, [])
        self.assertEqual(len(self.reactor.spawned), 2)
        self.probe.healthy = {"b"}
        self.reactor.advance(1)
        self.successResultOf(db)


class RealShutdownTests(TestCase):
    """
    Shutdown with real children, one of which ignores SIGTERM and has a grandchild.
    """

    timeout = 60

    async def test_stop_service_leaves_no_orphans(self) -> None:
        fake = f"{sys.executable} {FAKE_UPSTREAM} --port ${{PORT}}"
        config = parse_config(
            json.dumps({
                "startPort": free_port_range(2),
                "unloadTimeout": 0.5,
                "models": {
                    "polite": {"cmd": fake},
                    "stubborn": {"cmd": fake + " --ignore-sigterm --spawn-grandchild"},
                },
                "groups": {"all": {"swap": False, "members": ["polite", "stubborn"]}},
            }),
            "test.yaml",
        )
        if config.models["polite"].port == config.models["stubborn"].port:
            self.fail("ports must differ")
        supervisor = Supervisor(config, reactor)
        processes: list[psutil.Process] = []

        def kill_leftovers() -> None:
            for process in processes:
                try:
                    process.kill()
                except psutil.NoSuchProcess:
                    pass

        self.addCleanup(lambda: Deferred.fromCoroutine(wait_until(lambda: not process_pipes_open(), what="pipes")))
        self.addCleanup(kill_leftovers)
        supervisor.startService()
        self.addCleanup(lambda: supervisor.running and supervisor.stopService())
        for model_id in ("polite", "stubborn"):
            lease = await supervisor.request(model_id).wait()
            lease.release()
        children = [psutil.Process(up.pid) for up in supervisor.upstreams.values() if up.pid is not None]
        processes.extend(children)
        for child in children:
            processes.extend(child.children(recursive=True))
        self.assertEqual((len(children), len(processes)), (2, 3))
        await supervisor.stopService()
        self.assertEqual([child.pid for child in children if alive(child.pid)], [])
        await wait_until(lambda: not any(alive(p.pid) for p in processes), what="every child and grandchild to end")
        self.assertEqual([up for up in supervisor.upstreams.values() if up.running], [])

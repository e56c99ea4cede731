"""
Tests for `swapproxy.upstream`: one model's child process, its start, health and stop.

The unit tests run the state machine on a fake process reactor and a fake health probe, with
time driven by the test. `RealProcessTests` spawn ``tests/fake_upstream.py`` for real, for what
only a real process shows: sessions, process trees, signals and exit codes.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import sys
from typing import Any

import attrs
import psutil
from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.error import ConnectionRefusedError
from twisted.logger import capturedLogs, formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import ResponseNeverReceived
from twisted.web.resource import Resource
from twisted.web.server import Site
from twisted.web.static import Data

from swapproxy.config import ModelConfig, parse_config
from swapproxy.testing.local import FAKE_UPSTREAM, free_port
from swapproxy.probes import MAX_PROBE_DELAY, MIN_PROBE_INTERVAL, OUTPUT_PROBE_BURST, OUTPUT_PROBE_WINDOW, probe_echo
from swapproxy.upstream import (
    READY_OUTPUT_INTERVAL,
    StartError,
    StartStep,
    State,
    Upstream,
    make_http_client,
    needs_restart,
)
from tests.support.processes import alive, process_pipes_open, wait_until
from tests.support.reactors import PausableProcess, ProcessReactor


#: The issue's bounds on readiness polling: the first probe after at most 50 ms, and never more
#: than 250 ms between probes, so that a model that is ready is used at once.
FIRST_PROBE_BOUND = 0.05
PROBE_INTERVAL_BOUND = 0.25


def model_config(model: dict[str, Any], **top: Any) -> ModelConfig:
    """
    The `ModelConfig` of model ``m`` in a configuration with these settings.
    """
    model.setdefault("cmd", f"{sys.executable} -c pass --port ${{PORT}}")
    config = parse_config(json.dumps({"models": {"m": model}, **top}), "test.yaml")
    return config.models["m"]


class Probe:
    """
    A health probe: answers ``status`` (a number, or ``"refused"``) until ``healthy_at``, then 200.

    With ``pending`` set, each probe returns a Deferred the test fires (kept in ``pending_calls``);
    cancelling one fails it as an HTTP client's cancelled request fails (``ResponseNeverReceived``
    wrapping the ``CancelledError``), not with a bare ``CancelledError``.
    """

    def __init__(self, clock: Any, status: int | str = 503, healthy_at: float | None = None) -> None:
        self.clock = clock
        self.status = status
        self.healthy_at = healthy_at
        self.calls: list[float] = []
        self.pending = False
        self.pending_calls: list[Deferred[int]] = []

    def __call__(self, upstream: Upstream) -> Deferred[int]:
        self.calls.append(self.clock.seconds())
        if self.pending:
            d: Deferred[int] = Deferred(lambda d: d.errback(ResponseNeverReceived([Failure(CancelledError())])))
            self.pending_calls.append(d)
            return d
        if self.healthy_at is not None and self.clock.seconds() >= self.healthy_at:
            return succeed(200)
        if self.status == "refused":
            return fail(ConnectionRefusedError("connection refused"))
        return succeed(int(self.status))


def advance_to_next_call(clock: Any) -> None:
    """
    Move the clock exactly to its next scheduled call and run what is due then.
    """
    calls = clock.getDelayedCalls()
    assert calls, "nothing is scheduled"
    clock.rightNow = max(clock.rightNow, min(call.getTime() for call in calls))
    clock.advance(0)


class UpstreamTestMixin:
    """
    Builds an `Upstream` on a `ProcessReactor` with a `Probe`.
    """

    def setUp(self) -> None:
        self.reactor = ProcessReactor().install(self)  # type: ignore[arg-type]
        self.probe = Probe(self.reactor)

    def make_upstream(
        self,
        model: dict[str, Any] | None = None,
        health_check_timeout: float = 120,
        environ: dict[str, str] | None = None,
        **top: Any,
    ) -> Upstream:
        return Upstream(
            model_config(dict(model or {}), healthCheckTimeout=health_check_timeout, **top),
            self.reactor,
            environ=environ if environ is not None else {"PATH": os.environ.get("PATH", os.defpath)},
            health_probe=self.probe,
        )

    def ready_upstream(self, model: dict[str, Any] | None = None, **top: Any) -> Upstream:
        upstream = self.make_upstream(model, **top)
        self.probe.healthy_at = 0
        d = upstream.start()
        self.reactor.advance(PROBE_INTERVAL_BOUND)
        self.successResultOf(d)  # type: ignore[attr-defined]
        return upstream


class StartTests(UpstreamTestMixin, SynchronousTestCase):
    """
    Starting a model: spawn, readiness polling, shared starts and start failures.
    """

    def test_start_spawns_cmd_in_own_session(self) -> None:
        """
        The model's ``cmd`` is spawned through a launcher that gives it a session of its own, and
        the upstream is starting until the health check answers.
        """
        upstream = self.make_upstream({"cmd": f"{sys.executable} -c pass --port ${{PORT}}"}, startPort=6100)
        d = upstream.start()
        self.assertEqual(len(self.reactor.spawned), 1)
        process = self.reactor.spawned[0]
        self.assertEqual(process.command, [sys.executable, "-c", "pass", "--port", "6100"])
        self.assertNotEqual(process.args, process.command, "the child must be spawned in a new session")
        self.assertEqual(upstream.state, State.STARTING)
        self.assertEqual(upstream.pid, process.pid)
        self.assertTrue(upstream.running)
        self.assertNoResult(d)

    def test_first_probe_is_quick(self) -> None:
        """
        The health endpoint is first asked within 50 ms of the spawn; a child that is healthy by
        then is ready at once.
        """
        upstream = self.make_upstream()
        self.probe.healthy_at = 0
        d = upstream.start()
        advance_to_next_call(self.reactor)
        self.assertEqual(len(self.probe.calls), 1)
        self.assertLessEqual(self.probe.calls[0], FIRST_PROBE_BOUND)
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual(upstream.state, State.READY)

    def test_ready_detected_within_250ms(self) -> None:
        """
        However long a model takes to load, it is seen as ready at most 250 ms after its health
        endpoint first answers 200, and not before; answers other than 200 (503 while loading, or
        no connection at all) are not ready.
        """
        for status in (503, "refused", 404):
            for healthy_at in (0.01, 0.03, 0.3, 1.0, 4.321, 37.5, 119.0):
                self.reactor = ProcessReactor().install(self)
                self.probe = Probe(self.reactor, status=status, healthy_at=healthy_at)
                upstream = self.make_upstream()
                ready_at: list[float] = []
                upstream.start().addCallback(lambda _: ready_at.append(self.reactor.seconds()))
                while not ready_at:
                    advance_to_next_call(self.reactor)
                    self.assertEqual(upstream.state, State.STARTING if not ready_at else State.READY)
                self.assertGreaterEqual(ready_at[0], healthy_at)
                self.assertLessEqual(
                    ready_at[0] - healthy_at,
                    PROBE_INTERVAL_BOUND + 1e-9,
                    f"healthy at {healthy_at}s (before: {status}) but ready only at {ready_at[0]}s",
                )
                self.assertEqual(len(self.reactor.spawned), 1)

    def test_concurrent_starts_share_one_spawn(self) -> None:
        """
        Callers that ask for the model while it starts share that start: one process, and each
        caller is told when it is ready.
        """
        upstream = self.make_upstream()
        waiters = [upstream.start() for _ in range(3)]
        self.reactor.advance(1)
        waiters.append(upstream.start())
        self.assertEqual(len(self.reactor.spawned), 1)
        for d in waiters:
            self.assertNoResult(d)
        self.probe.healthy_at = self.reactor.seconds()
        self.reactor.advance(PROBE_INTERVAL_BOUND)
        for d in waiters:
            self.assertIsNone(self.successResultOf(d))
        self.assertIsNone(self.successResultOf(upstream.start()))
        self.assertEqual(len(self.reactor.spawned), 1)

    def test_cancelled_waiter_does_not_cancel_start(self) -> None:
        """
        One caller giving up (its client hung up) withdraws only that caller; the start goes on
        for the others.
        """
        upstream = self.make_upstream()
        leaving = upstream.start()
        staying = upstream.start()
        leaving.cancel()
        self.failureResultOf(leaving, CancelledError)
        self.assertEqual(upstream.state, State.STARTING)
        self.assertEqual(self.reactor.spawned[0].signals, [])
        self.probe.healthy_at = 2
        self.reactor.advance(2 + PROBE_INTERVAL_BOUND)
        self.assertIsNone(self.successResultOf(staying))
        self.assertEqual(upstream.state, State.READY)
        self.assertEqual(len(self.reactor.spawned), 1)

    def test_start_goes_on_when_every_waiter_cancels(self) -> None:
        """
        Even when every caller has gone, the start is not abandoned: the next caller finds the
        same process, ready.
        """
        upstream = self.make_upstream()
        d = upstream.start()
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.probe.healthy_at = 1
        self.reactor.advance(1 + PROBE_INTERVAL_BOUND)
        self.assertEqual(upstream.state, State.READY)
        self.assertIsNone(self.successResultOf(upstream.start()))
        self.assertEqual(len(self.reactor.spawned), 1)

    def test_exit_during_start_fails_fast(self) -> None:
        """
        A child that exits while starting fails the start at once, for every waiter, with its
        exit code and its last lines of output; the upstream is failed.
        """
        upstream = self.make_upstream()
        first, second = upstream.start(), upstream.start()
        process = self.reactor.spawned[0]
        self.reactor.advance(0.5)
        lines = [f"llama_model_load: line {i}" for i in range(8)] + ["error: failed to load model 'x.gguf'"]
        process.output("\n".join(lines[:4]).encode() + b"\n", fd=2)
        process.output("\n".join(lines[4:]).encode() + b"\n", fd=2)
        process.exit(1)
        for d in (first, second):
            error = self.failureResultOf(d, StartError).value
            self.assertEqual(error.model_id, "m")
            self.assertEqual(error.exit_code, 1)
            self.assertEqual(error.last_lines[-1], "error: failed to load model 'x.gguf'")
            self.assertIn("exit code 1", str(error))
            self.assertIn("error: failed to load model 'x.gguf'", str(error))
        self.assertEqual(upstream.state, State.FAILED)
        self.assertFalse(upstream.running)
        self.assertIsNone(upstream.pid)
        self.assertIs(upstream.last_error, error)

    def test_exit_during_start_quotes_unterminated_last_line(self) -> None:
        """
        A last line without a newline is still quoted in the start error.
        """
        upstream = self.make_upstream()
        d = upstream.start()
        self.reactor.spawned[0].output(b"error: out of memory", fd=2)
        self.reactor.spawned[0].exit(2)
        error = self.failureResultOf(d, StartError).value
        self.assertEqual(error.exit_code, 2)
        self.assertEqual(error.last_lines, ("error: out of memory",))

    def test_killed_during_start(self) -> None:
        """
        A child killed by a signal while starting fails the start, naming the signal.
        """
        upstream = self.make_upstream()
        d = upstream.start()
        self.reactor.spawned[0].exit(None, signal.SIGSEGV)
        error = self.failureResultOf(d, StartError).value
        self.assertIn("SIGSEGV", str(error))
        self.assertEqual(upstream.state, State.FAILED)

    def test_health_timeout(self) -> None:
        """
        A child that never becomes healthy fails the start after ``healthCheckTimeout``, with an
        error that names the timeout, and the child is stopped.
        """
        upstream = self.make_upstream(health_check_timeout=15)
        d = upstream.start()
        process = self.reactor.spawned[0]
        self.reactor.advance(14.9)
        self.assertNoResult(d)
        self.assertEqual(process.signals, [])
        self.reactor.advance(0.1)
        error = self.failureResultOf(d, StartError).value
        self.assertIn("timed out after 15s", str(error))
        self.assertIn("health check", str(error))
        self.assertEqual(process.signals, [signal.SIGTERM])
        self.assertEqual(upstream.state, State.STOPPING)
        probes = len(self.probe.calls)
        self.reactor.advance(5)
        self.assertEqual(len(self.probe.calls), probes, "no probing after the start was given up")
        process.exit(0)
        self.assertEqual(upstream.state, State.FAILED)
        self.assertFalse(upstream.running)

    def test_health_timeout_can_be_retried(self) -> None:
        """
        After a timed-out start, the next start spawns a new child.
        """
        upstream = self.make_upstream(health_check_timeout=15)
        self.failureResultOf(self._timed_out_start(upstream), StartError)
        self.reactor.spawned[0].exit(0)
        d = upstream.start()
        self.assertEqual(len(self.reactor.spawned), 2)
        self.probe.healthy_at = self.reactor.seconds()
        self.reactor.advance(PROBE_INTERVAL_BOUND)
        self.successResultOf(d)

    def _timed_out_start(self, upstream: Upstream) -> Deferred[None]:
        d = upstream.start()
        self.reactor.advance(15)
        return d

    def test_check_endpoint_none_is_ready_at_once(self) -> None:
        """
        With ``checkEndpoint: none`` the model is ready as soon as it is spawned, unprobed.
        """
        upstream = self.make_upstream({"checkEndpoint": "none"})
        self.assertIsNone(self.successResultOf(upstream.start()))
        self.assertEqual(upstream.state, State.READY)
        self.assertEqual(len(self.reactor.spawned), 1)
        self.reactor.advance(200)
        self.assertEqual(self.probe.calls, [])
        self.assertEqual(upstream.state, State.READY)

    def test_model_env_added_to_inherited_env(self) -> None:
        """
        The child gets the inherited environment plus the model's ``env``; a model entry wins
        over an inherited variable of the same name.
        """
        environ = {"PATH": os.environ.get("PATH", os.defpath), "HOME": "/home/llama", "SHARED": "inherited"}
        upstream = self.make_upstream(
            {"env": ["CUDA_VISIBLE_DEVICES=1", "SHARED=model", "EMPTY="]}, environ=environ
        )
        upstream.start()
        env = self.reactor.spawned[0].env
        self.assertEqual(env["HOME"], "/home/llama")
        self.assertEqual(env["PATH"], environ["PATH"])
        self.assertEqual(env["CUDA_VISIBLE_DEVICES"], "1")
        self.assertEqual(env["SHARED"], "model")
        self.assertEqual(env["EMPTY"], "")

    def test_executable_not_found(self) -> None:
        """
        A ``cmd`` whose program does not exist fails the start with a message naming it; the
        upstream is failed, and the next start looks for the program again.
        """
        bindir = self.mktemp()
        os.mkdir(bindir)
        upstream = self.make_upstream(
            {"cmd": "my-llama-server --port ${PORT}"}, environ={"PATH": bindir}
        )
        error = self.failureResultOf(upstream.start(), StartError).value
        self.assertIn("'my-llama-server'", str(error))
        self.assertIn("not found", str(error))
        self.assertEqual(upstream.state, State.FAILED)
        self.assertEqual(self.reactor.spawned, [])

        program = os.path.join(bindir, "my-llama-server")
        with open(program, "w") as f:
            f.write("#!/bin/sh\n")
        os.chmod(program, stat.S_IRWXU)
        d = upstream.start()
        self.assertEqual(len(self.reactor.spawned), 1)
        self.assertEqual(self.reactor.spawned[0].command[0], program)
        self.assertEqual(upstream.state, State.STARTING)
        self.assertNoResult(d)

    def test_spawn_error(self) -> None:
        """
        An error from the OS when spawning fails the start with that error, and the upstream is
        failed.
        """
        upstream = self.make_upstream()
        self.reactor.spawn_error = PermissionError(13, "Permission denied")
        error = self.failureResultOf(upstream.start(), StartError).value
        self.assertIn("Permission denied", str(error))
        self.assertEqual(upstream.state, State.FAILED)
        self.assertFalse(upstream.running)
        upstream.start()
        self.assertEqual(len(self.reactor.spawned), 1)

    def test_state_observers(self) -> None:
        """
        State observers see every transition of a start and a stop, in order.
        """
        upstream = self.make_upstream()
        seen: list[tuple[State, State]] = []
        upstream.state_observers.append(lambda up, old, new: seen.append((old, new)))
        self.probe.healthy_at = 0
        upstream.start()
        self.reactor.advance(PROBE_INTERVAL_BOUND)
        upstream.stop()
        self.reactor.spawned[0].exit(0)
        self.assertEqual(
            seen,
            [
                (State.STOPPED, State.STARTING),
                (State.STARTING, State.READY),
                (State.READY, State.STOPPING),
                (State.STOPPING, State.STOPPED),
            ],
        )

    def test_output_logged_line_by_line(self) -> None:
        """
        The child's stdout and stderr are logged one line per event, tagged with the model id,
        also when a line arrives in pieces.
        """
        upstream = self.make_upstream()
        upstream.start()
        process = self.reactor.spawned[0]
        with capturedLogs() as events:
            process.output(b"load_tensors: loading\nllama_context: n_ctx", fd=2)
            process.output(b" = 4096\r\n", fd=2)
            process.output(b"server listening\n", fd=1)
        lines = [e for e in events if e.get("model") == "m" and "line" in e]
        self.assertEqual(
            [e["line"] for e in lines],
            ["load_tensors: loading", "llama_context: n_ctx = 4096", "server listening"],
        )
        self.assertEqual(formatEvent(lines[0]), "[m] load_tensors: loading")

    def test_lines_of_one_read(self) -> None:
        """
        Several lines that come in one read are still logged one event each, in order, with the
        model id and the stream; the line observers see each of them, and the start error quotes
        them as lines.
        """
        upstream = self.make_upstream()
        seen: list[str] = []
        upstream.line_observers.append(lambda up, line: seen.append(line))
        d = upstream.start()
        process = self.reactor.spawned[0]
        with capturedLogs() as events:
            process.output(b"first\r\nsecond\n\nthird\npartial", fd=2)
            process.output(b" line\n", fd=2)
        lines = [e for e in events if e.get("model") == "m" and "line" in e]
        self.assertEqual([e["line"] for e in lines], ["first", "second", "", "third", "partial line"])
        self.assertEqual({e["stream"] for e in lines}, {"stderr"})
        self.assertEqual({e["log_namespace"] for e in lines}, {"upstream.m"})
        self.assertEqual(formatEvent(lines[1]), "[m] second")
        self.assertEqual(seen, ["first", "second", "", "third", "partial line"])
        process.exit(1)
        self.assertIn("first | second | third | partial line", str(self.failureResultOf(d, StartError).value))


def run_clock(clock: Any, until: float, step: float = 0.25) -> None:
    """
    Move the clock forward in small steps to ``until``, so that every timer fires on time.
    """
    while clock.seconds() + step <= until + 1e-9:
        clock.advance(step)
    if clock.seconds() < until:
        clock.advance(until - clock.seconds())


class StallAwareTimeoutTests(UpstreamTestMixin, SynchronousTestCase):
    """
    ``healthCheckTimeout`` counts from the last sign of life (output, a new health answer), up to
    a hard ceiling: a slow but progressing load is not killed, a hung one is.
    """

    def test_child_printing_every_10s_is_not_killed(self) -> None:
        """
        A child that prints a line every 10 s (a big model loading) is still starting at 120 s
        with a 15 s healthCheckTimeout, and becomes ready when it answers 200.
        """
        upstream = self.make_upstream(health_check_timeout=15)
        d = upstream.start()
        process = self.reactor.spawned[0]
        for second in range(10, 130, 10):
            run_clock(self.reactor, second)
            process.output(b"load_tensors: still loading\n", fd=2)
        self.assertEqual(self.reactor.seconds(), 120)
        self.assertNoResult(d)
        self.assertEqual(process.signals, [])
        self.assertEqual(upstream.state, State.STARTING)
        self.probe.healthy_at = 125
        run_clock(self.reactor, 126)
        self.successResultOf(d)

    def test_silent_child_killed_timeout_after_last_output(self) -> None:
        """
        A child that stops printing is given up exactly healthCheckTimeout after its last output,
        with an error that says so, and is stopped.
        """
        upstream = self.make_upstream(health_check_timeout=15)
        d = upstream.start()
        process = self.reactor.spawned[0]
        run_clock(self.reactor, 10)
        process.output(b"llama_model_loader: loaded meta data\n")
        run_clock(self.reactor, 20)
        process.output(b"...")  # a partial line is a sign of life too
        run_clock(self.reactor, 34.9)
        self.assertNoResult(d)
        self.assertEqual(process.signals, [])
        run_clock(self.reactor, 35)
        error = str(self.failureResultOf(d, StartError).value)
        self.assertIn("health check timed out after 35s", error)
        self.assertIn("no output and no new health answer for 15s (healthCheckTimeout)", error)
        self.assertEqual(process.signals, [signal.SIGTERM])

    def test_new_health_answer_is_a_sign_of_life(self) -> None:
        """
        A silent child whose health answer changes (no connection, then 503 "loading") has made
        progress; the same answer again is not progress.
        """
        self.probe.status = "refused"
        upstream = self.make_upstream(health_check_timeout=15)
        d = upstream.start()
        run_clock(self.reactor, 10)
        self.probe.status = 503
        run_clock(self.reactor, 24.9)
        self.assertNoResult(d)
        changed_at = upstream.last_sign_of_life
        assert changed_at is not None
        self.assertTrue(10 < changed_at <= 10 + PROBE_INTERVAL_BOUND, changed_at)
        run_clock(self.reactor, changed_at + 14.9)
        self.assertNoResult(d)
        run_clock(self.reactor, changed_at + 15.1)
        error = str(self.failureResultOf(d, StartError).value)
        self.assertIn("(last answer: loading)", error)

    def test_ceiling_kills_even_a_chatty_child(self) -> None:
        """
        A child that keeps printing but never becomes healthy is given up at the ceiling,
        10 x healthCheckTimeout by default.
        """
        upstream = self.make_upstream(health_check_timeout=15)
        d = upstream.start()
        process = self.reactor.spawned[0]
        for second in range(5, 150, 5):
            run_clock(self.reactor, second)
            process.output(b"waiting for the GPU\n")
        run_clock(self.reactor, 149.9)
        self.assertNoResult(d)
        run_clock(self.reactor, 150)
        error = str(self.failureResultOf(d, StartError).value)
        self.assertIn("health check timed out after 150s", error)
        self.assertIn("not healthy within the healthCheckCeiling of 150s", error)
        self.assertIn("waiting for the GPU", error)
        self.assertEqual(process.signals, [signal.SIGTERM])

    def test_configured_ceiling(self) -> None:
        """
        ``healthCheckCeiling`` sets the ceiling.
        """
        config = parse_config(
            json.dumps({"healthCheckTimeout": 20, "healthCheckCeiling": 45, "models": {"m": {"cmd": "x ${PORT}"}}}),
            "test.yaml",
        )
        self.assertEqual(config.start_ceiling, 45)
        self.assertEqual(config.models["m"].start_ceiling, 45)
        upstream = Upstream(
            config.models["m"],
            self.reactor,
            environ={"PATH": os.environ.get("PATH", os.defpath)},
            health_probe=self.probe,
        )
        upstream.model = attrs.evolve(upstream.model, cmd=(sys.executable, "-c", "pass"))
        d = upstream.start()
        for second in range(10, 60, 10):
            run_clock(self.reactor, second)
            if not d.called:
                self.reactor.spawned[0].output(b"progress\n")
        self.assertIn("healthCheckCeiling of 45s", str(self.failureResultOf(d, StartError).value))
        self.assertEqual(self.reactor.spawned[0].signal_times, [45])

    def test_lower_timeout_on_reconfigure_applies_to_the_start_in_progress(self) -> None:
        """
        A reload that lowers healthCheckTimeout moves the deadline of a start in progress.
        """
        upstream = self.make_upstream(health_check_timeout=100)
        d = upstream.start()
        run_clock(self.reactor, 10)
        upstream.reconfigure(attrs.evolve(upstream.model, health_check_timeout=15))
        run_clock(self.reactor, 14.9)
        self.assertNoResult(d)
        run_clock(self.reactor, 15)
        self.failureResultOf(d, StartError)


class ReconfigureTests(UpstreamTestMixin, SynchronousTestCase):
    """
    New settings for a running child, and the settings that need a new one.
    """

    def test_settings_that_need_no_restart(self) -> None:
        """
        ttl, aliases, unloadTimeout, cmdStop... change under a running child, which keeps running;
        the new unloadTimeout is the grace of the next stop.
        """
        upstream = self.ready_upstream()
        process = self.reactor.spawned[0]
        new = model_config({"ttl": 30, "aliases": ["x"], "unloadTimeout": 3, "name": "M"})
        self.assertFalse(needs_restart(upstream.model, new))
        upstream.reconfigure(new)
        self.assertIs(upstream.model, new)
        self.assertEqual(upstream.state, State.READY)
        upstream.stop()
        self.reactor.advance(3)
        self.assertEqual(process.signals, [signal.SIGTERM, signal.SIGKILL])

    def test_settings_that_need_a_restart(self) -> None:
        """
        A new cmd, env, proxy or checkEndpoint needs a new process: reconfigure refuses it.
        """
        upstream = self.ready_upstream()
        for change in (
            {"cmd": f"{sys.executable} -c 'pass' --port ${{PORT}} --other"},
            {"env": ["A=1"]},
            {"proxy": "http://127.0.0.1:9999", "cmd": "x"},
            {"checkEndpoint": "/ready"},
        ):
            new = model_config(change)
            self.assertTrue(needs_restart(upstream.model, new), change)
            self.assertRaises(ValueError, upstream.reconfigure, new)

    def test_process_observers(self) -> None:
        """
        Process observers hear of each child when it is spawned and once it has exited.
        """
        upstream = self.make_upstream()
        seen: list[tuple[int, bool, tuple[str, ...] | None]] = []
        upstream.process_observers.append(lambda up, pid, alive: seen.append((pid, alive, up.command)))
        d = upstream.start()
        process = self.reactor.spawned[0]
        self.assertEqual(seen, [(process.pid, True, tuple(process.command))])
        process.exit(1)
        self.failureResultOf(d, StartError)
        self.assertEqual(seen[1:], [(process.original_pid, False, None)])


class StopTests(UpstreamTestMixin, SynchronousTestCase):
    """
    Stopping a model: signals, the grace period, ``cmdStop``, and stops during a start.
    """

    def test_stop_sends_sigterm_to_group_and_waits_for_exit(self) -> None:
        """
        A stop sends SIGTERM to the child's process group, and is complete only when the child
        has exited.
        """
        upstream = self.ready_upstream()
        process = self.reactor.spawned[0]
        d = upstream.stop()
        self.assertIn((process.original_pid, signal.SIGTERM), self.reactor.group_signals)
        self.assertEqual(process.signals, [signal.SIGTERM])
        self.assertEqual(upstream.state, State.STOPPING)
        self.assertTrue(upstream.running)
        self.assertNoResult(d)
        process.exit(0)
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual(upstream.state, State.STOPPED)
        self.assertFalse(upstream.running)
        self.assertIsNone(upstream.pid)
        self.assertIsNone(upstream.client)

    def test_sigkill_after_unload_timeout(self) -> None:
        """
        A child that does not exit after SIGTERM gets SIGKILL when the model's ``unloadTimeout``
        has passed, not before.
        """
        upstream = self.ready_upstream({"unloadTimeout": 3})
        process = self.reactor.spawned[0]
        stopped_at = self.reactor.seconds()
        d = upstream.stop()
        self.reactor.advance(2.9)
        self.assertEqual(process.signals, [signal.SIGTERM])
        self.reactor.advance(0.1)
        self.assertEqual(process.signals, [signal.SIGTERM, signal.SIGKILL])
        self.assertAlmostEqual(process.signal_times[1] - stopped_at, 3)
        self.assertNoResult(d)
        process.exit(None, signal.SIGKILL)
        self.successResultOf(d)
        self.assertEqual(upstream.state, State.STOPPED)

    def test_default_grace_is_10s(self) -> None:
        """
        Without ``unloadTimeout`` the grace period before SIGKILL is 10 seconds.
        """
        upstream = self.ready_upstream()
        process = self.reactor.spawned[0]
        upstream.stop()
        self.reactor.advance(9.9)
        self.assertEqual(process.signals, [signal.SIGTERM])
        self.reactor.advance(0.1)
        self.assertEqual(process.signals, [signal.SIGTERM, signal.SIGKILL])

    def test_explicit_grace(self) -> None:
        """
        ``stop(grace)`` overrides the model's grace period.
        """
        upstream = self.ready_upstream()
        process = self.reactor.spawned[0]
        upstream.stop(grace=1)
        self.reactor.advance(1)
        self.assertEqual(process.signals, [signal.SIGTERM, signal.SIGKILL])

    def test_no_sigkill_after_exit(self) -> None:
        """
        A child that exits within the grace period gets no SIGKILL later.
        """
        upstream = self.ready_upstream()
        process = self.reactor.spawned[0]
        upstream.stop()
        process.exit(0)
        self.reactor.advance(60)
        self.assertEqual(process.signals, [signal.SIGTERM])
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_stop_twice_shares_the_stop(self) -> None:
        """
        A second stop while stopping sends nothing more and fires on the same exit.
        """
        upstream = self.ready_upstream()
        process = self.reactor.spawned[0]
        first, second = upstream.stop(), upstream.stop()
        self.assertEqual(process.signals, [signal.SIGTERM])
        self.assertNoResult(second)
        process.exit(0)
        self.successResultOf(first)
        self.successResultOf(second)

    def test_stop_when_stopped(self) -> None:
        """
        Stopping a model that is not running succeeds at once.
        """
        upstream = self.make_upstream()
        self.assertIsNone(self.successResultOf(upstream.stop()))
        self.assertEqual(self.reactor.spawned, [])

    def test_stop_during_start_aborts_start(self) -> None:
        """
        A stop during a start fails the start's waiters with a `StartError` and stops the child;
        a later start spawns a new one.
        """
        upstream = self.make_upstream()
        waiters = [upstream.start(), upstream.start()]
        process = self.reactor.spawned[0]
        self.reactor.advance(1)
        d = upstream.stop()
        for waiter in waiters:
            error = self.failureResultOf(waiter, StartError).value
            self.assertEqual(error.model_id, "m")
        self.assertEqual(process.signals, [signal.SIGTERM])
        probes = len(self.probe.calls)
        self.probe.healthy_at = 0
        self.reactor.advance(1)
        self.assertEqual(len(self.probe.calls), probes)
        self.assertEqual(upstream.state, State.STOPPING)
        self.assertNoResult(d)
        process.exit(None, signal.SIGTERM)
        self.successResultOf(d)
        self.assertEqual(upstream.state, State.STOPPED)
        again = upstream.start()
        self.assertEqual(len(self.reactor.spawned), 2)
        self.reactor.advance(PROBE_INTERVAL_BOUND)
        self.successResultOf(again)

    def test_start_while_stopping_restarts_after_exit(self) -> None:
        """
        A start asked for while the model stops waits for the exit, then spawns a new child.
        """
        upstream = self.ready_upstream()
        stopping = self.reactor.spawned[0]
        stop = upstream.stop()
        d = upstream.start()
        self.assertEqual(len(self.reactor.spawned), 1)
        self.assertNoResult(d)
        stopping.exit(0)
        self.successResultOf(stop)
        self.assertEqual(len(self.reactor.spawned), 2)
        self.assertEqual(upstream.state, State.STARTING)
        self.reactor.advance(PROBE_INTERVAL_BOUND)
        self.successResultOf(d)
        self.assertEqual(upstream.pid, self.reactor.spawned[1].pid)

    def test_crash_while_ready(self) -> None:
        """
        A child that dies while ready leaves the model stopped, and the next start spawns it
        again.
        """
        upstream = self.ready_upstream()
        self.reactor.spawned[0].exit(None, signal.SIGSEGV)
        self.assertEqual(upstream.state, State.STOPPED)
        self.assertFalse(upstream.running)
        self.assertIsNone(upstream.client)
        d = upstream.start()
        self.assertEqual(len(self.reactor.spawned), 2)
        self.assertNoResult(d)
        self.reactor.advance(PROBE_INTERVAL_BOUND)
        self.successResultOf(d)

    def test_cmd_stop_replaces_sigterm(self) -> None:
        """
        With ``cmdStop``, a stop runs that command with ``${PID}`` replaced by the child's pid
        instead of sending SIGTERM, and the stop ends when the child exits.
        """
        upstream = self.ready_upstream({"cmdStop": f"{sys.executable} -c pass --pid ${{PID}}"})
        child = self.reactor.spawned[0]
        d = upstream.stop()
        self.assertEqual(len(self.reactor.spawned), 2)
        stop_command = self.reactor.spawned[1]
        self.assertEqual(stop_command.args, [sys.executable, "-c", "pass", "--pid", str(child.pid)])
        self.assertEqual(child.signals, [])
        stop_command.exit(0)
        self.assertNoResult(d)
        child.exit(0)
        self.successResultOf(d)
        self.assertEqual(upstream.state, State.STOPPED)

    def test_cmd_stop_then_sigkill(self) -> None:
        """
        A child still alive when ``cmdStop`` has finished and the grace period has passed gets
        SIGKILL.
        """
        upstream = self.ready_upstream({"cmdStop": f"{sys.executable} -c pass ${{PID}}", "unloadTimeout": 2})
        child = self.reactor.spawned[0]
        d = upstream.stop()
        stop_command = self.reactor.spawned[1]
        self.reactor.advance(1)
        stop_command.exit(1)
        self.reactor.advance(1.9)
        self.assertEqual(child.signals, [])
        self.reactor.advance(0.1)
        self.assertEqual(child.signals, [signal.SIGKILL])
        child.exit(None, signal.SIGKILL)
        self.successResultOf(d)

    def test_cmd_stop_not_found_falls_back_to_sigterm(self) -> None:
        """
        A ``cmdStop`` whose program does not exist does not leave the child running: it gets
        SIGTERM instead.
        """
        upstream = self.ready_upstream({"cmdStop": "no-such-stop-tool-xyz ${PID}"})
        child = self.reactor.spawned[0]
        upstream.stop()
        self.assertEqual(len(self.reactor.spawned), 1)
        self.assertEqual(child.signals, [signal.SIGTERM])


class HealthWhileReadyTests(UpstreamTestMixin, SynchronousTestCase):
    """
    A ready model is health-checked every ``healthCheckInterval``; one that stops answering is
    marked unhealthy, stopped (SIGKILL after ``unloadTimeout``) and started again for its waiters.
    """

    def test_checked_every_interval_while_ready(self) -> None:
        """
        One check per ``healthCheckInterval`` while the model is ready, none once it stops.
        """
        upstream = self.ready_upstream({"healthCheckInterval": 10})
        before = len(self.probe.calls)
        self.reactor.pump([1] * 60)
        self.assertEqual(len(self.probe.calls) - before, 6)
        self.assertEqual(upstream.state, State.READY)
        upstream.stop()
        self.reactor.spawned[0].exit(0)
        self.reactor.pump([1] * 60)
        self.assertEqual(len(self.probe.calls) - before, 6)

    def test_not_checked_while_its_stop_hooks_run(self) -> None:
        """
        A model that is stopping, while a stop hook (saving its slots) takes its time, is not
        checked: it is no longer in service.
        """
        upstream = self.ready_upstream({"healthCheckInterval": 10})
        saving: Deferred[None] = Deferred()
        upstream.stop_hooks.append(lambda _: saving)
        before = len(self.probe.calls)
        upstream.stop()
        self.assertEqual(upstream.state, State.STOPPING)
        self.reactor.pump([1] * 60)
        self.assertEqual(len(self.probe.calls), before)
        saving.callback(None)
        self.reactor.spawned[0].exit(0)
        self.assertEqual(upstream.state, State.STOPPED)

    def test_off(self) -> None:
        upstream = self.ready_upstream({"healthCheckInterval": 0})
        before = len(self.probe.calls)
        self.reactor.pump([1] * 100)
        self.assertEqual(len(self.probe.calls), before)
        self.assertEqual(upstream.state, State.READY)

    def test_frozen_model_is_found_stopped_and_started_again(self) -> None:
        """
        A model whose health check stops answering is unhealthy after three checks in a row
        time out; it gets SIGTERM, then SIGKILL after ``unloadTimeout`` (a frozen process
        ignores SIGTERM), and the request that waits for it starts it again. The log says what
        happened.
        """
        upstream = self.ready_upstream({"healthCheckInterval": 10, "unloadTimeout": 3})
        process = self.reactor.spawned[0]
        hangs: list[tuple[str, str]] = []
        upstream.hang_observers.append(lambda up, cause, what: hangs.append((cause, what)))
        self.probe.pending = True  # no answer from now on
        with capturedLogs() as events:
            frozen_at = self.reactor.seconds()
            self.reactor.pump([0.5] * 60)
        self.assertEqual(upstream.state, State.UNHEALTHY)
        self.assertTrue(upstream.running)
        # The checks at 10 s, then 1 s after each failure, each waiting its 5 s.
        self.assertEqual(len(self.probe.pending_calls), 3)
        [(cause, what)] = hangs
        self.assertEqual(cause, "health_check")
        self.assertEqual(what, "its health check (/health) failed 3 times in a row (last: no answer within 5s)")
        self.assertEqual(upstream.unhealthy_reason, what)
        self.assertEqual(process.signals[0], signal.SIGTERM)
        self.assertAlmostEqual(process.signal_times[0] - frozen_at, 10 + 5 + 1 + 5 + 1 + 5)
        self.assertEqual(process.signals[1], signal.SIGKILL)
        self.assertAlmostEqual(process.signal_times[1] - process.signal_times[0], 3)
        messages = [formatEvent(e) for e in events]
        self.assertIn(
            "model m stopped responding: " + what + "; failing its 0 request(s) in flight and stopping it "
            "(SIGTERM, then SIGKILL after 3s); the requests that wait for it will start it again",
            messages,
        )
        self.probe.pending = False
        waiting = upstream.start()
        self.assertNoResult(waiting)
        process.exit(None, signal.SIGKILL)
        self.assertEqual(len(self.reactor.spawned), 2)
        self.reactor.advance(PROBE_INTERVAL_BOUND)
        self.successResultOf(waiting)
        self.assertEqual(upstream.state, State.READY)
        self.assertIsNone(upstream.unhealthy_reason)

    def test_one_good_answer_resets_the_count(self) -> None:
        """
        Failed checks must be consecutive: a model that fails two checks now and then stays
        ready.
        """
        upstream = self.ready_upstream({"healthCheckInterval": 10})
        self.reactor.advance(upstream.ready_at + 9.75 - self.reactor.seconds())
        for _ in range(5):
            self.probe.status, self.probe.healthy_at = 503, None
            self.reactor.pump([0.25] * 6)  # fails at 10 s, and at 11 s
            self.probe.healthy_at = 0
            self.reactor.pump([0.25] * 3)  # answers at 12 s
            self.reactor.pump([0.25] * 39)  # the next check is due 10 s later
        self.assertEqual(upstream.state, State.READY)
        self.assertEqual(len(self.probe.calls), 1 + 5 * 3)

    def test_refused_and_error_answers_count(self) -> None:
        upstream = self.ready_upstream({"healthCheckInterval": 2})
        self.probe.status, self.probe.healthy_at = "refused", None
        self.reactor.pump([0.5] * 20)
        self.assertEqual(upstream.state, State.UNHEALTHY)
        self.assertIn("failed 3 times in a row (last: Connection was refused", upstream.unhealthy_reason)

    def test_stall_of_its_requests(self) -> None:
        """
        A model whose requests in flight go silent (`swapproxy.stall`) is marked unhealthy and
        stopped the same way, and its requests fail.
        """
        upstream = self.ready_upstream({"streamIdleTimeout": 20, "healthCheckInterval": 0})
        exchange = upstream.exchanges.begin(stream=True)
        sending: Deferred[object] = Deferred()
        exchange.send(sending, 0)
        self.reactor.pump([1] * 26)
        self.assertEqual(upstream.state, State.UNHEALTHY)
        self.assertIn("sent nothing for 20s", upstream.unhealthy_reason)
        self.failureResultOf(sending, CancelledError)
        self.assertEqual(exchange.failure.kind, "stream_idle")
        self.assertEqual(self.reactor.spawned[0].signals, [signal.SIGTERM])

    def test_sigkill_even_if_cmd_stop_hangs(self) -> None:
        """
        A hung model with ``cmdStop`` gets SIGKILL ``unloadTimeout`` after it was found, even if
        the stop command (which may ask the hung server to stop) never ends.
        """
        upstream = self.ready_upstream({"cmdStop": f"{sys.executable} -c pass ${{PID}}", "unloadTimeout": 2})
        child = self.reactor.spawned[0]
        upstream.mark_unhealthy("its health check failed", "health_check")
        self.assertEqual(len(self.reactor.spawned), 2)  # cmdStop runs, and hangs
        self.reactor.advance(2)
        self.assertEqual(child.signals, [signal.SIGKILL])

    def test_only_a_ready_model(self) -> None:
        """
        A model that is being stopped anyway is not marked unhealthy.
        """
        upstream = self.ready_upstream()
        upstream.stop()
        upstream.mark_unhealthy("whatever", "health_check")
        self.assertEqual(upstream.state, State.STOPPING)
        self.assertIsNone(upstream.unhealthy_reason)


class HookTests(UpstreamTestMixin, SynchronousTestCase):
    """
    What companions (the slot cache) hook into a child's life: its argv, the step between a
    healthy answer and READY, and the step before a stop on purpose.
    """

    def hooked(self, kind: str) -> tuple[Upstream, list[Deferred[None]]]:
        """
        An upstream with one ``start`` or ``stop`` hook whose Deferreds the test fires.
        """
        upstream = self.make_upstream()
        calls: list[Deferred[None]] = []

        def hook(hooked: Upstream) -> Deferred[None]:
            self.assertIs(hooked, upstream)
            calls.append(Deferred())
            return calls[-1]

        getattr(upstream, f"{kind}_hooks").append(hook)
        return upstream, calls

    def started(self, upstream: Upstream) -> Deferred[None]:
        d = upstream.start()
        self.reactor.advance(PROBE_INTERVAL_BOUND)
        return d

    def test_argv_filter_changes_what_is_spawned(self) -> None:
        upstream = self.make_upstream({"cmd": f"{sys.executable} -c pass --port ${{PORT}}"})
        upstream.argv_filters.append(lambda up, argv: [*argv, "--slot-save-path", "/tmp/x"])
        upstream.start()
        self.assertEqual(self.reactor.spawned[0].command[-2:], ["--slot-save-path", "/tmp/x"])
        self.assertEqual(upstream.command[-2:], ("--slot-save-path", "/tmp/x"))

    def test_the_first_request_waits_for_the_start_hooks(self) -> None:
        """
        Healthy is not ready while a start hook runs: no waiter is let through, no more probes
        go out (not even for output), and its `start_step` is reported; then it is READY.
        """
        upstream, calls = self.hooked("start")
        self.probe.healthy_at = 0
        d = upstream.start()
        process = self.reactor.spawned[0]
        self.reactor.advance(PROBE_INTERVAL_BOUND)
        self.assertEqual(len(calls), 1)
        self.assertEqual((upstream.state, upstream.healthy_at), (State.STARTING, self.probe.calls[0]))
        probes = len(self.probe.calls)
        upstream.start_step = StartStep("restoring", "restoring 1 cached conversation, 1.0 MB", 0.5)
        process.output(b"srv  log line\n", fd=2)
        self.reactor.advance(10)
        self.assertEqual(len(self.probe.calls), probes)
        self.assertNoResult(d)
        calls[0].callback(None)
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual(upstream.state, State.READY)
        self.assertIsNone(upstream.start_step)
        self.assertEqual(upstream.ready_at, self.reactor.seconds())

    def test_a_failing_start_hook_is_logged_not_a_failed_start(self) -> None:
        upstream, calls = self.hooked("start")
        self.probe.healthy_at = 0
        d = upstream.start()
        self.reactor.advance(PROBE_INTERVAL_BOUND)
        calls[0].errback(RuntimeError("no room"))
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual(upstream.state, State.READY)
        self.assertEqual([str(f.value) for f in self.flushLoggedErrors(RuntimeError)], ["no room"])

    def test_exit_during_a_start_hook_fails_the_start(self) -> None:
        upstream, calls = self.hooked("start")
        self.probe.healthy_at = 0
        d = upstream.start()
        self.reactor.advance(PROBE_INTERVAL_BOUND)
        self.reactor.spawned[0].exit(None, signal.SIGSEGV)
        self.assertIn("while starting", self.failureResultOf(d, StartError).value.reason)
        calls[0].callback(None)
        self.assertEqual(upstream.state, State.FAILED)

    def test_a_stop_hook_runs_before_the_signal(self) -> None:
        """
        A ready model is STOPPING while its stop hook runs (nothing is granted it), and is
        signalled once the hook is done; the stop ends when the child exits.
        """
        upstream, calls = self.hooked("stop")
        self.probe.healthy_at = 0
        self.successResultOf(self.started(upstream))
        process = self.reactor.spawned[0]
        d = upstream.stop()
        self.assertEqual((upstream.state, len(calls), process.signals), (State.STOPPING, 1, []))
        second = upstream.stop()
        self.assertEqual(len(calls), 1, "a second stop joins the first")
        calls[0].callback(None)
        self.assertEqual(process.signals, [signal.SIGTERM])
        self.assertNoResult(d)
        process.exit(0)
        self.successResultOf(d)
        self.successResultOf(second)
        self.assertEqual(upstream.state, State.STOPPED)

    def test_no_stop_hook_for_a_crash_a_start_or_when_told_not_to(self) -> None:
        upstream, calls = self.hooked("stop")
        self.probe.healthy_at = 0
        self.successResultOf(self.started(upstream))
        self.reactor.spawned[0].exit(None, signal.SIGSEGV)
        starting = upstream.start()
        upstream.stop()
        self.failureResultOf(starting, StartError)
        self.assertEqual(self.reactor.spawned[1].signals, [signal.SIGTERM])
        self.reactor.spawned[1].exit(0)
        self.successResultOf(self.started(upstream))
        upstream.stop(run_hooks=False)
        self.assertEqual(self.reactor.spawned[2].signals, [signal.SIGTERM])
        self.assertEqual(calls, [])

    def test_child_gone_while_the_stop_hook_runs(self) -> None:
        """
        A child that exits while its stop hook runs is stopped; the hook's end signals nothing,
        not even a child started since.
        """
        upstream, calls = self.hooked("stop")
        self.probe.healthy_at = 0
        self.successResultOf(self.started(upstream))
        d = upstream.stop()
        again = upstream.start()
        self.reactor.spawned[0].exit(0)
        self.successResultOf(d)
        self.assertEqual(len(self.reactor.spawned), 2)
        calls[0].callback(None)
        self.assertEqual([p.signals for p in self.reactor.spawned], [[], []])
        self.reactor.advance(PROBE_INTERVAL_BOUND)
        self.successResultOf(again)


class RealProcessTests(TestCase):
    """
    `Upstream` with the real reactor and ``tests/fake_upstream.py`` as the child.
    """

    timeout = 60

    def make_upstream(self, *args: str, **top: Any) -> Upstream:
        argv = [sys.executable, FAKE_UPSTREAM, "--port", "${PORT}", *args]
        cmd = " ".join(json.dumps(a) if " " in a else a for a in argv)
        config = parse_config(
            json.dumps({"startPort": free_port(), "models": {"fake": {"cmd": cmd}}, **top}), "test.yaml"
        )
        upstream = Upstream(config.models["fake"], reactor)
        self.processes: list[psutil.Process] = []
        self.addCleanup(lambda: Deferred.fromCoroutine(wait_until(lambda: not process_pipes_open(), what="pipes to close")))
        self.addCleanup(self._kill_leftovers)
        self.addCleanup(lambda: upstream.stop(grace=0.5))
        upstream.state_observers.append(self._remember_pid)
        upstream.line_observers.append(self._remember_grandchild)
        return upstream

    def _remember_pid(self, upstream: Upstream, old: State, new: State) -> None:
        if new is State.STARTING and upstream.pid is not None:
            self._remember(upstream.pid)

    def _remember_grandchild(self, upstream: Upstream, line: str) -> None:
        if line.startswith("grandchild pid="):
            self._remember(int(line.partition("=")[2]))

    def _remember(self, pid: int) -> None:
        try:
            self.processes.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            pass

    def _kill_leftovers(self) -> None:
        for process in self.processes:
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass

    def grandchild_pid(self, upstream: Upstream) -> int:
        for line in upstream.recent_lines:
            if line.startswith("grandchild pid="):
                return int(line.partition("=")[2])
        self.fail(f"no grandchild line in {list(upstream.recent_lines)}")

    async def test_start_becomes_ready(self) -> None:
        """
        A real child becomes ready, in a session of its own, and answers on its port.
        """
        upstream = self.make_upstream("--model", "fake")
        await upstream.start()
        self.assertEqual(upstream.state, State.READY)
        assert upstream.pid is not None and upstream.client is not None
        self.assertEqual(os.getsid(upstream.pid), upstream.pid)
        self.assertNotEqual(os.getsid(upstream.pid), os.getsid(0))
        response = await upstream.client.get(upstream.url_for("/health"))
        self.assertEqual(response.code, 200)
        await response.content()
        pid = upstream.pid
        await upstream.stop()
        self.assertEqual(upstream.state, State.STOPPED)
        self.assertFalse(alive(pid))

    async def test_stop_kills_grandchildren(self) -> None:
        """
        A stop ends the whole tree the model started, grandchildren included.
        """
        upstream = self.make_upstream("--spawn-grandchild")
        await upstream.start()
        assert upstream.pid is not None
        pid, grandchild = upstream.pid, self.grandchild_pid(upstream)
        self.assertTrue(alive(grandchild))
        await upstream.stop()
        self.assertFalse(alive(pid))
        await wait_until(lambda: not alive(grandchild), what="the grandchild to be killed")

    async def test_last_words_of_a_crash(self) -> None:
        """
        A ready model that logs a request and crashes right after: what it printed last is among
        its recent lines when its exit is reported, although its output was being read only every
        READY_OUTPUT_INTERVAL.
        """
        upstream = self.make_upstream()
        await upstream.start()
        assert upstream.client is not None
        at_exit: list[list[str]] = []
        exited = Deferred[None]()

        def changed(up: Upstream, old: State, new: State) -> None:
            if new is State.STOPPED:
                at_exit.append(list(up.recent_lines))
                exited.callback(None)

        upstream.state_observers.append(changed)
        url = upstream.url_for("/v1/chat/completions")
        response = await upstream.client.post(url, json={"messages": []})
        await response.content()
        crash = upstream.client.post(url, json={"messages": [], "fake_crash_after": 0})
        crash.addErrback(lambda _: None)
        await exited
        self.assertTrue(any("crashing before answering" in line for line in at_exit[0]), at_exit[0])

    async def test_crash_kills_grandchildren(self) -> None:
        """
        When the model's process dies on its own, what it left behind is killed too, and the
        model is stopped.
        """
        upstream = self.make_upstream("--spawn-grandchild")
        await upstream.start()
        assert upstream.pid is not None
        grandchild = self.grandchild_pid(upstream)
        exited = Deferred[None]()
        upstream.state_observers.append(lambda up, old, new: new is State.STOPPED and exited.callback(None))
        os.kill(upstream.pid, signal.SIGKILL)
        await exited
        self.assertEqual(upstream.state, State.STOPPED)
        await wait_until(lambda: not alive(grandchild), what="the grandchild to be killed")

    async def test_ignored_sigterm_gets_sigkill(self) -> None:
        """
        A child that ignores SIGTERM is killed once ``unloadTimeout`` has passed, and the stop
        completes.
        """
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        upstream = self.make_upstream("--ignore-sigterm", "--spawn-grandchild", unloadTimeout=0.5)
        await upstream.start()
        assert upstream.pid is not None
        pid, grandchild = upstream.pid, self.grandchild_pid(upstream)
        await upstream.stop()
        self.assertIn("fake upstream: ignoring SIGTERM", upstream.recent_lines)
        self.assertFalse(alive(pid))
        await wait_until(lambda: not alive(grandchild), what="the grandchild to be killed")
        messages = [formatEvent(e) for e in events if e.get("model") == "fake"]
        self.assertTrue(any("SIGKILL" in m for m in messages), messages)

    async def test_exit_during_load_reports_code_and_output(self) -> None:
        """
        A child that fails to load fails the start with its exit code and its last line.
        """
        upstream = self.make_upstream("--exit-during-load", "3", "--load-time", "0.2")
        with self.assertRaises(StartError) as raised:
            await upstream.start()
        error = raised.exception
        self.assertEqual(error.exit_code, 3)
        self.assertEqual(error.last_lines[-1], "error: failed to load model 'fake.gguf'")
        self.assertIn("exit code 3", str(error))
        self.assertIsNone(upstream.pid)

    async def test_port_taken_by_another_program(self) -> None:
        """
        When another program already listens on the port ``${PORT}`` gave the model (a
        llama-swap still running with the same config, another instance), the start fails
        saying so, and no child is spawned: otherwise that program would answer the health
        check, and the model's requests, in the model's name, while the model's own server
        exits for want of its port.
        """
        upstream = self.make_upstream()
        assert upstream.model.port is not None
        other = Resource()
        other.putChild(b"health", Data(b'{"status": "ok"}', "application/json"))
        port = reactor.listenTCP(upstream.model.port, Site(other), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        with self.assertRaises(StartError) as raised:
            await upstream.start()
        self.assertIn(f"port {upstream.model.port} is already in use", str(raised.exception))
        self.assertEqual(upstream.state, State.FAILED)
        self.assertIsNone(upstream.pid)


class ProbeOnOutputTests(UpstreamTestMixin, SynchronousTestCase):
    """
    A child that prints may just have become ready (llama-server prints "model loaded" as it
    does): it is probed soon after, whatever the backoff, so that a swap waits for no timer.
    """

    def test_line_just_after_a_probe_is_followed_by_a_probe(self) -> None:
        """
        A line printed a moment after a probe saw the child loading, with the backoff at its
        longest, is followed by a probe within MIN_PROBE_INTERVAL, which finds it ready.
        """
        upstream = self.make_upstream()
        d = upstream.start()
        process = self.reactor.spawned[0]
        run_clock(self.reactor, 5)
        advance_to_next_call(self.reactor)
        probed_at = self.probe.calls[-1]
        self.assertEqual(self.reactor.seconds(), probed_at)
        self.reactor.advance(0.001)
        printed_at = self.reactor.seconds()
        self.probe.healthy_at = printed_at
        process.output(b"srv  llama_server: model loaded\n", fd=2)
        run_clock(self.reactor, printed_at + MIN_PROBE_INTERVAL, step=0.001)
        self.assertIsNone(self.successResultOf(d))
        self.assertLessEqual(self.probe.calls[-1] - printed_at, MIN_PROBE_INTERVAL + 1e-9)

    def test_line_during_a_probe_is_followed_by_another_probe(self) -> None:
        """
        A line printed while a probe is out is followed, once that probe answers "loading",
        by another probe at once (at least MIN_PROBE_INTERVAL after the previous one).
        """
        self.probe.pending = True
        upstream = self.make_upstream()
        d = upstream.start()
        process = self.reactor.spawned[0]
        run_clock(self.reactor, 0.5, step=0.001)
        self.assertEqual(len(self.probe.calls), 1, "the first probe is still out")
        process.output(b"srv  llama_server: model loaded\n", fd=2)
        self.probe.pending_calls[0].callback(503)
        self.reactor.advance(0)
        self.assertEqual(len(self.probe.calls), 2)
        self.assertAlmostEqual(self.probe.calls[1], 0.5)
        self.probe.pending_calls[1].callback(200)
        self.assertIsNone(self.successResultOf(d))

    def test_chatty_child_is_probed_a_bounded_number_of_times(self) -> None:
        """
        A child that prints a line every millisecond for 10 s is probed at most
        OUTPUT_PROBE_BURST times per OUTPUT_PROBE_WINDOW on top of the backoff (40 times a
        second, not the 200 of one probe per MIN_PROBE_INTERVAL), never two probes closer than
        MIN_PROBE_INTERVAL; and it is still seen ready within MIN_PROBE_INTERVAL of a line.
        """
        upstream = self.make_upstream()
        d = upstream.start()
        process = self.reactor.spawned[0]
        for _ in range(10_000):
            process.output(b"llama_model_loader: - tensor\n", fd=2)
            self.reactor.advance(0.001)
        gaps = [b - a for a, b in zip(self.probe.calls, self.probe.calls[1:])]
        self.assertGreaterEqual(min(gaps), MIN_PROBE_INTERVAL - 1e-9)
        backoff = 10 / MAX_PROBE_DELAY + 5
        self.assertLessEqual(len(self.probe.calls), 10 / OUTPUT_PROBE_WINDOW * OUTPUT_PROBE_BURST + backoff)
        self.assertGreater(len(self.probe.calls), backoff, "output brings probes forward")

        run_clock(self.reactor, self.reactor.seconds() + OUTPUT_PROBE_WINDOW)
        printed_at = self.reactor.seconds()
        self.probe.healthy_at = printed_at
        process.output(b"srv  llama_server: model loaded\n", fd=2)
        run_clock(self.reactor, printed_at + MIN_PROBE_INTERVAL, step=0.001)
        self.assertIsNone(self.successResultOf(d))

    def test_a_logged_probe_does_not_bring_on_the_next(self) -> None:
        """
        A server that logs each health check it answers (as the demo's fake and vLLM-style
        servers do) is probed on the backoff alone: 14 times in 3 s rather than 500 times, each
        probe's log line asking for the next one. Its other lines still bring a probe forward.
        """
        upstream = self.make_upstream()
        upstream.start()
        process = self.reactor.spawned[0]
        answer = self.probe.__call__

        def logged_probe(upstream: Upstream) -> Deferred[int]:
            result = answer(upstream)
            process.output(b'fake upstream: 127.0.0.1 "GET /health HTTP/1.1" 503\n', fd=2)
            return result

        upstream._health_probe = logged_probe
        run_clock(self.reactor, 3, step=0.001)
        # At 20, 60, 140 and 300 ms (the backoff doubles), then every 250 ms.
        self.assertEqual(len(self.probe.calls), 4 + int((3 - 0.3) / MAX_PROBE_DELAY))
        process.output(b"main: model loaded\n", fd=2)
        before = len(self.probe.calls)
        run_clock(self.reactor, 3 + MIN_PROBE_INTERVAL, step=0.001)
        self.assertEqual(len(self.probe.calls), before + 1)

    def test_a_read_with_an_echo_and_news(self) -> None:
        """
        A read that brings a probe's echo and another line brings a probe forward; a read of
        echoes alone does not.
        """
        upstream = self.make_upstream()
        upstream.start()
        process = self.reactor.spawned[0]
        run_clock(self.reactor, 3, step=0.001)
        before = len(self.probe.calls)
        process.output(b'fake upstream: 127.0.0.1 "GET /health HTTP/1.1" 503\n' * 2, fd=2)
        run_clock(self.reactor, 3 + MIN_PROBE_INTERVAL, step=0.001)
        self.assertEqual(len(self.probe.calls), before)
        process.output(b'fake upstream: 127.0.0.1 "GET /health HTTP/1.1" 503\nmain: model loaded\n', fd=2)
        run_clock(self.reactor, 3 + 2 * MIN_PROBE_INTERVAL, step=0.001)
        self.assertEqual(len(self.probe.calls), before + 1)

    def test_a_logged_probe_is_no_sign_of_life(self) -> None:
        """
        A hung server that still answers 503 and logs each health check is given up after
        healthCheckTimeout, as a silent one is: its log lines about our probes show nothing new.
        """
        upstream = self.make_upstream(health_check_timeout=15)
        d = upstream.start()
        process = self.reactor.spawned[0]
        answer = self.probe.__call__

        def logged_probe(upstream: Upstream) -> Deferred[int]:
            process.output(b"srv  log_server_r: request: GET /health 127.0.0.1 503\n", fd=2)
            return answer(upstream)

        upstream._health_probe = logged_probe
        run_clock(self.reactor, 15.3)
        error = str(self.failureResultOf(d, StartError).value)
        self.assertIn("no output and no new health answer for 15s", error)


class ReadyOutputTests(UpstreamTestMixin, SynchronousTestCase):
    """
    A ready model's output is read at most every READY_OUTPUT_INTERVAL, a loading model's as it
    comes; none of it is lost, and a child's last words are read before its exit is reported.
    """

    def setUp(self) -> None:
        super().setUp()
        self.reactor.process_type = PausableProcess

    def lines(self, events: Any) -> list[str]:
        return [e["line"] for e in events if e.get("model") == "m" and "line" in e]

    def test_ready_output_waits_for_the_interval(self) -> None:
        """
        After a read, what a ready model prints waits until READY_OUTPUT_INTERVAL has passed,
        then comes in order.
        """
        upstream = self.ready_upstream()
        process = self.reactor.spawned[0]
        assert isinstance(process, PausableProcess)
        with capturedLogs() as events:
            process.output(b"slot launch_slot_: processing task\n", fd=2)
            self.assertEqual(self.lines(events), ["slot launch_slot_: processing task"])
            self.assertTrue(process.paused)
            process.output(b"slot print_timing: eval time\n", fd=2)
            process.output(b"slot release: stop processing\n", fd=1)
            self.assertEqual(len(self.lines(events)), 1)
            self.reactor.advance(READY_OUTPUT_INTERVAL)
            self.assertEqual(self.lines(events), ["slot launch_slot_: processing task", "slot print_timing: eval time",
                                                  "slot release: stop processing"])
        self.assertEqual(process.pauses, 2, "the late read paused reading again")
        self.assertEqual(list(upstream.recent_lines)[-3:], self.lines(events))

    def test_loading_output_is_read_as_it_comes(self) -> None:
        """
        While the model loads, its output is never held back: it may be the line that says it
        is ready.
        """
        self.make_upstream().start()
        process = self.reactor.spawned[0]
        assert isinstance(process, PausableProcess)
        with capturedLogs() as events:
            for i in range(3):
                process.output(b"load_tensors: loading %d\n" % i, fd=2)
        self.assertEqual(len(self.lines(events)), 3)
        self.assertEqual(process.pauses, 0)

    def test_full_read_is_not_held(self) -> None:
        """
        A read that filled the read buffer is followed by the next at once: more is waiting, and
        the child must not block on a full pipe.
        """
        self.ready_upstream()
        process = self.reactor.spawned[0]
        assert isinstance(process, PausableProcess)
        process.output(b"x" * 8191 + b"\n", fd=2)
        self.assertFalse(process.paused)

    def test_last_words_before_the_exit(self) -> None:
        """
        A ready model that prints and exits while its output is held back: its last lines are in
        the log and in its recent lines before the exit is reported.
        """
        upstream = self.ready_upstream()
        process = self.reactor.spawned[0]
        assert isinstance(process, PausableProcess)
        at_exit: list[list[str]] = []
        upstream.state_observers.append(lambda up, old, new: at_exit.append(list(up.recent_lines)))
        with capturedLogs() as events:
            process.output(b"slot release: stop processing\n", fd=2)
            process.output(b"GGML_ASSERT failed\n", fd=2)
            process.exit(134)
        self.assertEqual(self.lines(events), ["slot release: stop processing", "GGML_ASSERT failed"])
        self.assertEqual(at_exit[0][-1], "GGML_ASSERT failed")
        self.assertEqual(upstream.state, State.STOPPED)
        self.assertFalse(process.paused)
        self.assertEqual(self.reactor.getDelayedCalls(), [])


class ProbeEchoTests(SynchronousTestCase):
    """
    Which log lines are a server's record of our own health probe.
    """

    def test_access_log_formats(self) -> None:
        """
        llama-server's, uvicorn's (vLLM) and Go-style access log lines for the health path match;
        other requests and loading lines do not.
        """
        echo = probe_echo("/health")
        for line in ("srv  log_server_r: request: GET /health 127.0.0.1 503",
                     'INFO:     127.0.0.1:51000 - "GET /health HTTP/1.1" 503 Service Unavailable',
                     '[GIN] 2025/01/01 - 12:00:00 | 503 |  12.1µs | 127.0.0.1 | GET      "/health"',
                     "GET /health?full=1 200"):
            self.assertTrue(echo.search(line), line)
        for line in ('"GET /healthz HTTP/1.1" 200', '"POST /health HTTP/1.1" 200', "main: model loaded",
                     '"GET /v1/models HTTP/1.1" 200', "load_tensors: loading model tensors"):
            self.assertFalse(echo.search(line), line)

    def test_root_path(self) -> None:
        """
        With ``checkEndpoint: /`` only requests for ``/`` itself match.
        """
        echo = probe_echo("/")
        self.assertTrue(echo.search('"GET / HTTP/1.1" 503'))
        self.assertFalse(echo.search('"GET /v1/models HTTP/1.1" 200'))
        self.assertFalse(echo.search("loading /models/qwen.gguf"))


class RecordingAgent:
    """
    An `IAgent` that remembers each request and never answers: the Deferred of each is kept.
    """

    def __init__(self) -> None:
        self.requests: list[tuple[bytes, bytes, Any, Any]] = []
        self.answers: list[Deferred[Any]] = []

    def request(self, method: bytes, uri: bytes, headers: Any = None, bodyProducer: Any = None) -> Deferred[Any]:
        self.requests.append((method, uri, headers, bodyProducer))
        self.answers.append(Deferred())
        return self.answers[-1]


class RelayClientTests(SynchronousTestCase):
    """
    The upstream client: the relay's requests go straight to the pool's own relay client
    (`swapproxy.relayclient`), everything else through treq.
    """

    def setUp(self) -> None:
        from twisted.internet.testing import MemoryReactorClock
        from twisted.web.http_headers import Headers

        self.client, self.pool = make_http_client(MemoryReactorClock(), 4)
        self.agent = RecordingAgent()
        self.client._agent = self.agent
        self.relayed: list[tuple[Any, ...]] = []
        self.answer: Deferred[Any] = Deferred()
        self.client._relay = lambda *args: (self.relayed.append(args), self.answer)[1]  # type: ignore[attr-defined]
        self.headers = Headers({b"content-type": [b"application/json"], b"x-forwarded-for": [b"127.0.0.1"]})

    def test_relay_request_goes_straight_to_the_pool(self) -> None:
        """
        Method, URL, headers and body reach the relay client as given, nothing added (no
        Accept-Encoding, no cookies), and its own answer comes back, unwrapped.
        """
        d = self.client.request("POST", "http://127.0.0.1:5800/v1/chat/completions?x=1", headers=self.headers,
                                data=b'{"model": "m"}', unbuffered=True, allow_redirects=False)
        self.assertIs(d, self.answer)
        [(method, uri, headers, body)] = self.relayed
        self.assertEqual((method, uri), (b"POST", b"http://127.0.0.1:5800/v1/chat/completions?x=1"))
        self.assertEqual(sorted(headers.getAllRawHeaders()), sorted(self.headers.getAllRawHeaders()))
        self.assertEqual(body, b'{"model": "m"}')
        self.assertEqual(self.agent.requests, [])

    def test_request_without_body(self) -> None:
        d = self.client.request("GET", "http://127.0.0.1:5800/props", headers=self.headers, data=None,
                                unbuffered=True, allow_redirects=False)
        self.assertIs(d, self.answer)
        [(method, _, headers, body)] = self.relayed
        self.assertEqual(method, b"GET")
        self.assertIsNone(body)
        self.assertIsNone(headers.getRawHeaders(b"accept-encoding"))

    def test_other_requests_take_treqs_way(self) -> None:
        """
        A buffered request (the health probe's), or one with a URL that is not ASCII, goes
        through treq, which asks for gzip.
        """
        self.client.request("GET", "http://127.0.0.1:5800/health", allow_redirects=False)
        self.client.request("POST", "http://127.0.0.1:5800/v1/caf\u00e9", headers=self.headers, data=b"{}",
                            unbuffered=True, allow_redirects=False)
        self.assertEqual(len(self.agent.requests), 2)
        for _, uri, headers, _ in self.agent.requests:
            self.assertEqual(headers.getRawHeaders(b"accept-encoding"), [b"gzip"])
        self.assertEqual(self.agent.requests[1][1], b"http://127.0.0.1:5800/v1/caf%C3%A9")

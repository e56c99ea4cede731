"""
Tests for `swapproxy.stall`: when a model's silence makes it stalled, on a `Clock`.

The watch is driven directly here, with stand-ins for the relays; `tests.test_relay` shows what
a client receives when its model stalls, and `tests.test_hang` the same with real processes.
"""

from __future__ import annotations

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from swapproxy.stall import BUSY_CPU, SAMPLES, Stalled, StallWatch

TIMEOUT = 60.0


class Relay:
    """
    A body being relayed: the test adds bytes, pauses it, and sees whether it was aborted.
    """

    def __init__(self) -> None:
        self.bytes = 0
        self.paused = False
        self.aborted: BaseException | None = None

    def abort(self, error: BaseException) -> None:
        self.aborted = error


class StallWatchTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        self.timeout = TIMEOUT
        self.cpu: float | None = 0.0
        self.stalls: list[str] = []
        self.watch = StallWatch("qwen", self.clock, lambda: self.timeout, lambda: self.cpu, self.stalls.append)

    def wait(self, seconds: float) -> None:
        """
        Let ``seconds`` pass, a second at a time, as a reactor's time passes.
        """
        whole = int(seconds)
        self.clock.pump([1.0] * whole + [seconds - whole])

    def stream(self) -> tuple[Relay, Deferred[object]]:
        """
        A streaming request whose head has arrived; its body is relayed by the returned relay.
        """
        exchange = self.watch.begin(stream=True)
        sending: Deferred[object] = Deferred()
        exchange.send(sending, 0)
        sending.callback("head")
        relay = Relay()
        exchange.relaying(relay)
        return relay, sending

    def test_silent_stream_stalls_after_the_timeout(self) -> None:
        """
        A stream that gets no byte for the timeout, from a model whose process uses no CPU, is
        aborted with a `Stalled` error naming the model, and the model is reported stalled once.
        """
        relay, _ = self.stream()
        relay.bytes = 100
        self.wait(TIMEOUT / SAMPLES)  # the watch sees the bytes
        self.wait(TIMEOUT - 1)
        self.assertIsNone(relay.aborted)
        self.assertEqual(self.stalls, [])
        self.wait(TIMEOUT / SAMPLES + 1)
        self.assertIsInstance(relay.aborted, Stalled)
        self.assertEqual(relay.aborted.kind, "stream_idle")
        self.assertIn("'qwen' stopped responding", str(relay.aborted))
        self.assertEqual(len(self.stalls), 1)
        self.assertIn("sent nothing for 60s", self.stalls[0])
        self.wait(10 * TIMEOUT)
        self.assertEqual(len(self.stalls), 1)

    def test_never_before_the_timeout(self) -> None:
        """
        However the samples fall, a model is not stalled until it has been silent for the whole
        timeout: bytes every 59 s keep a stream going for as long as they come.
        """
        relay, _ = self.stream()
        for _ in range(20):
            self.wait(TIMEOUT - 1)
            relay.bytes += 1
        self.assertIsNone(relay.aborted)
        self.assertEqual(self.stalls, [])

    def test_a_long_prefill_is_not_a_stall(self) -> None:
        """
        A model that sends nothing for many timeouts while its process burns CPU (a long prompt
        being processed) is left alone, and its answer flows when it comes.
        """
        relay, _ = self.stream()
        for _ in range(10 * SAMPLES):
            self.wait(TIMEOUT / SAMPLES)
            self.cpu += BUSY_CPU * TIMEOUT  # a core at 100 % would be SAMPLES x this
        self.assertIsNone(relay.aborted)
        relay.bytes = 50
        self.wait(TIMEOUT / SAMPLES)
        self.assertEqual(self.stalls, [])

    def test_bytes_waiting_unread_are_seen_before_a_stall(self) -> None:
        """
        A reactor runs its timers before it reads its sockets: after a pause of its own, the
        sample that finds the model silent for the timeout may come while the model's next bytes
        wait unread. The verdict is confirmed after the next round of I/O, which reads them.
        """
        quiet_since: list[float] = []
        watch = StallWatch("qwen", self.clock, lambda: self.timeout, lambda: unread(), self.stalls.append)
        exchange = watch.begin(stream=True)
        sending: Deferred[object] = Deferred()
        exchange.send(sending, 0)
        sending.callback("head")
        relay = Relay()
        exchange.relaying(relay)

        def unread() -> float:
            # Read at each sample; at the verdict, the bytes are in the socket: the round of I/O
            # that follows the timers (here: right after this sample) delivers them.
            if quiet_since and self.clock.seconds() >= quiet_since[0] + TIMEOUT and relay.bytes == 100:
                self.clock.callLater(0, setattr, relay, "bytes", 110)
            return 0.0

        relay.bytes = 100
        self.wait(TIMEOUT / SAMPLES)
        quiet_since.append(self.clock.seconds())
        self.wait(TIMEOUT + TIMEOUT / SAMPLES)
        self.assertEqual(self.stalls, [])
        self.assertIsNone(relay.aborted)
        self.assertEqual(relay.bytes, 110)

    def test_late_samples_measure_before_judging(self) -> None:
        """
        When the samples of a silence come late (a busy reactor), so that the first one after
        the model's last bytes is already past the timeout, the model is not judged on no CPU
        reading at all: the CPU time is read then, and a model that burns CPU is left alone.
        """
        relay, _ = self.stream()
        relay.bytes = 100
        self.wait(TIMEOUT / SAMPLES)  # the watch sees the bytes: the silence starts here
        self.cpu += TIMEOUT
        self.clock.advance(2 * TIMEOUT)  # the next sample runs two timeouts late
        self.assertEqual(self.stalls, [])
        self.cpu += TIMEOUT
        self.wait(TIMEOUT / SAMPLES)
        self.assertEqual(self.stalls, [])
        self.assertIsNone(relay.aborted)

    def test_late_samples_still_find_a_frozen_model(self) -> None:
        """
        A frozen model whose samples come late is stalled one sample after the late one.
        """
        relay, _ = self.stream()
        relay.bytes = 100
        self.wait(TIMEOUT / SAMPLES)
        self.clock.advance(2 * TIMEOUT)
        self.assertEqual(self.stalls, [])
        self.wait(TIMEOUT / SAMPLES)
        self.assertEqual(len(self.stalls), 1)
        self.assertIsInstance(relay.aborted, Stalled)

    def test_busy_then_frozen(self) -> None:
        """
        A model that was busy and then freezes (its CPU time stops) is stalled one timeout after
        it froze.
        """
        relay, _ = self.stream()
        for _ in range(2 * SAMPLES):
            self.wait(TIMEOUT / SAMPLES)
            self.cpu += TIMEOUT
        self.assertEqual(self.stalls, [])
        self.wait(TIMEOUT + TIMEOUT / SAMPLES)
        self.assertEqual(len(self.stalls), 1)

    def test_bytes_on_another_response_count(self) -> None:
        """
        A response the model keeps waiting while it streams another (llama-server queues a
        request when its slots are busy) is not a stall.
        """
        queued, _ = self.stream()
        busy, _ = self.stream()
        for _ in range(5 * SAMPLES):
            self.wait(TIMEOUT / SAMPLES)
            busy.bytes += 10
        self.assertIsNone(queued.aborted)
        self.assertEqual(self.stalls, [])

    def test_new_requests_do_not_keep_a_hung_model_alive(self) -> None:
        """
        Requests that keep arriving at a silent model do not push its stall back: it is stalled
        a timeout after the first one began waiting, and every one is failed.
        """
        relay, _ = self.stream()
        waiting = []
        for _ in range(3):
            self.wait(TIMEOUT / 3)
            exchange = self.watch.begin(stream=True)
            sending: Deferred[object] = Deferred()
            exchange.send(sending, 0)
            waiting.append(sending)
        self.wait(TIMEOUT / SAMPLES)
        self.assertEqual(len(self.stalls), 1)
        self.assertIsInstance(relay.aborted, Stalled)
        for sending in waiting:
            self.failureResultOf(sending, CancelledError)

    def test_paused_by_a_slow_client_is_not_a_stall(self) -> None:
        """
        A stream the client's flow control holds back gets no bytes because of the client,
        not the model.
        """
        relay, _ = self.stream()
        relay.paused = True
        self.wait(5 * TIMEOUT)
        self.assertIsNone(relay.aborted)
        relay.paused = False
        self.wait(TIMEOUT + TIMEOUT / SAMPLES)
        self.assertIsNotNone(relay.aborted)

    def test_stream_waiting_for_its_head(self) -> None:
        """
        A streaming request counts its silence from the moment it is sent: a model that never
        sends the head is stalled too, and the wait for the head is cancelled.
        """
        exchange = self.watch.begin(stream=True)
        sending: Deferred[object] = Deferred()
        exchange.send(sending, 0)
        self.wait(TIMEOUT + TIMEOUT / SAMPLES)
        self.failureResultOf(sending, CancelledError)
        self.assertEqual(exchange.failure.kind, "stream_idle")
        self.assertEqual(len(self.stalls), 1)

    def test_non_streaming_request_may_think_before_its_head(self) -> None:
        """
        A non-streaming answer comes in one piece when it is done: its silence before the head
        is no stall, however long; once its body has begun, it is watched like a stream.
        """
        exchange = self.watch.begin(stream=False)
        sending: Deferred[object] = Deferred()
        exchange.send(sending, 0)
        self.wait(20 * TIMEOUT)
        self.assertNoResult(sending)
        self.assertEqual(self.stalls, [])
        sending.callback("head")
        relay = Relay()
        exchange.relaying(relay)
        self.wait(TIMEOUT - 1)
        self.assertEqual(self.stalls, [])
        self.wait(1 + TIMEOUT / SAMPLES)
        self.assertIsInstance(relay.aborted, Stalled)

    def test_response_header_timeout(self) -> None:
        """
        ``timeouts.responseHeader`` fails a request that got no head in time, with its own
        kind; the model is not taken for stalled because of it.
        """
        self.timeout = 0
        exchange = self.watch.begin(stream=False)
        sending: Deferred[object] = Deferred()
        exchange.send(sending, 5)
        self.wait(4.9)
        self.assertNoResult(sending)
        self.wait(0.1)
        self.failureResultOf(sending, CancelledError)
        self.assertEqual(exchange.failure.kind, "response_header")
        self.assertIn("no response head within 5s (timeouts.responseHeader)", str(exchange.failure))
        self.assertEqual(self.stalls, [])

    def test_head_in_time_cancels_the_header_timer(self) -> None:
        exchange = self.watch.begin(stream=False)
        sending: Deferred[object] = Deferred()
        exchange.send(sending, 5)
        sending.callback("head")
        self.wait(10)
        self.assertIsNone(exchange.failure)
        self.assertEqual(self.successResultOf(sending), "head")

    def test_off(self) -> None:
        """
        ``streamIdleTimeout: 0``: no timer runs, nothing is ever stalled.
        """
        self.timeout = 0
        relay, _ = self.stream()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.wait(100 * TIMEOUT)
        self.assertIsNone(relay.aborted)

    def test_one_timer_per_model(self) -> None:
        """
        However many requests are in flight, the model has one timer; once they have ended it
        runs out and is not armed again, and `StallWatch.stop` cancels it.
        """
        exchanges = [self.watch.begin(stream=True) for _ in range(5)]
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        for exchange in exchanges:
            exchange.end()
        self.wait(TIMEOUT / SAMPLES)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        with self.watch.begin(stream=False):
            self.assertEqual(len(self.clock.getDelayedCalls()), 1)
            self.watch.stop()
            self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_fail_all(self) -> None:
        """
        When the model is found unhealthy otherwise (its health check), every request in
        flight is failed: those waiting for a head and those being relayed.
        """
        relay, _ = self.stream()
        waiting = self.watch.begin(stream=False)
        sending: Deferred[object] = Deferred()
        waiting.send(sending, 0)
        error = Stalled("model 'qwen' stopped responding: its health check failed", "health_check")
        self.watch.fail_all(error)
        self.assertIs(relay.aborted, error)
        self.failureResultOf(sending, CancelledError)
        self.assertIs(waiting.failure, error)

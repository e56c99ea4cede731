"""
Tests for L{swapproxy.progress}: how far a load has got, as the loading stream will tell it, and
the small state file that remembers how long each model took to load.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from swapproxy.config import ModelConfig, parse_config
from swapproxy.progress import HISTORY_LENGTH, LoadHistory, LoadTracker, Progress
from swapproxy.supervisor import Supervisor
from swapproxy.upstream import StartStep, State, Upstream
from tests.support.reactors import ProcessReactor

COMMAND = "llama-server --port 5800 -m /models/qwen.gguf"

#: What llama-server prints while it loads a model, in order (trimmed); the tensor dots follow
#: the ``load_tensors`` lines.
METADATA_LINES = (
    "build: 6000 (abcdef) with cc (GCC) 13.2.0 for x86_64-linux-gnu\n"
    "system info: n_threads = 8, n_threads_batch = 8, total_threads = 16\n"
    "main: binding port with default address family\n"
    "main: loading model\n"
    "srv    load_model: loading model '/models/qwen.gguf'\n"
)
LOADER_LINES = (
    "llama_model_loader: loaded meta data with 20 key-value pairs and 291 tensors from /models/qwen.gguf\n"
    "llama_model_loader: - kv   0:                       general.architecture str              = qwen2\n"
    "print_info: file format = GGUF V3 (latest)\n"
    "print_info: file type   = Q4_K - Medium\n"
)
TENSOR_LINES = (
    "load_tensors: loading model tensors, this can take a while... (mmap = true)\n"
    "load_tensors:   CPU_Mapped model buffer size =  4685.30 MiB\n"
)
CONTEXT_LINES = (
    "llama_context: constructing llama_context\n"
    "llama_context: n_ctx         = 4096\n"
)
WARMUP_LINES = "common_init_from_params: warming up the model with an empty run - please wait ...\n"
LOADED_LINES = "srv          init: initializing slots, n_slots = 1\nmain: model loaded\n"
LISTENING_LINES = "main: server is listening on http://127.0.0.1:5800 - starting the main loop\n"


def model_config(command: str = COMMAND, model_id: str = "qwen") -> ModelConfig:
    text = f"models:\n  {model_id}:\n    cmd: {command}\n    proxy: http://127.0.0.1:5800\n"
    return parse_config(text, "test.yaml", {}).models[model_id]


class LoadingUpstream:
    """
    The part of an `Upstream` a `LoadTracker` follows, driven by the test.

    `emit` delivers child output as `Upstream` does: each chunk to the output observers as it
    arrives, then each completed line to the line observers.
    """

    def __init__(self, model: ModelConfig, clock: Clock) -> None:
        self.model = model
        self._clock = clock
        self.state = State.STOPPED
        self.started_at: float | None = None
        self.ready_at: float | None = None
        self.healthy_at: float | None = None
        self.start_step: StartStep | None = None
        self.health_status = ""
        self.state_observers: list[Callable[[Any, State, State], None]] = []
        self.line_observers: list[Callable[[Any, str], None]] = []
        self.output_observers: list[Callable[[Any, bytes], None]] = []
        self._partial = b""

    def _set_state(self, new: State) -> None:
        old, self.state = self.state, new
        for observer in list(self.state_observers):
            observer(self, old, new)

    def start(self) -> None:
        self.started_at = self._clock.seconds()
        self.ready_at = self.healthy_at = self.start_step = None
        self.health_status = ""
        self._partial = b""
        self._set_state(State.STARTING)

    def healthy(self, step: StartStep) -> None:
        """
        The health check passed; a start hook runs (``step`` says what it does).
        """
        self.healthy_at = self._clock.seconds()
        self.start_step = step

    def ready(self) -> None:
        self.ready_at = self._clock.seconds()
        self.start_step = None
        self._set_state(State.READY)

    def fail(self) -> None:
        self._set_state(State.FAILED)

    def stop(self) -> None:
        self._set_state(State.STOPPING)
        self._set_state(State.STOPPED)

    def emit(self, data: str | bytes) -> None:
        raw = data.encode("utf-8") if isinstance(data, str) else data
        for observer in list(self.output_observers):
            observer(self, raw)
        *lines, self._partial = (self._partial + raw).split(b"\n")
        for line in lines:
            for line_observer in list(self.line_observers):
                line_observer(self, line.decode("utf-8", "replace"))


class TrackerTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.history = LoadHistory(None)
        self.upstream = LoadingUpstream(model_config(), self.clock)
        self.tracker = LoadTracker(self.upstream, self.clock, self.history)  # type: ignore[arg-type]

    def snapshot(self) -> Progress:
        return self.tracker.snapshot()


class StageLineTests(TrackerTestCase):
    """
    The stage lines llama-server prints move the fraction forward, with a plain-words label.
    """

    def test_nothing_known_before_any_output(self) -> None:
        """
        A fresh start with no output, no health answer and no history: the stage is
        ``starting`` and neither a percentage nor an estimate is made up.
        """
        self.upstream.start()
        self.clock.advance(5)
        progress = self.snapshot()
        self.assertEqual(progress, Progress("starting", "", None, 5.0, None, None))

    def test_stage_lines_in_order(self) -> None:
        """
        Each stage llama-server reaches is a step forward, named in plain words.
        """
        self.upstream.start()
        seen = []
        for chunk in (METADATA_LINES, LOADER_LINES, TENSOR_LINES, CONTEXT_LINES, WARMUP_LINES,
                      LOADED_LINES, LISTENING_LINES):
            self.upstream.emit(chunk)
            progress = self.snapshot()
            seen.append((progress.stage, progress.fraction, progress.label))
        self.assertEqual(
            seen,
            [
                ("loading", 0.03, "reading model metadata"),
                ("loading", 0.06, "reading model metadata"),
                ("loading", 0.10, "loading weights"),
                ("loading", 0.85, "creating context"),
                ("loading", 0.92, "warming up"),
                ("loading", 0.95, "model loaded"),
                ("loading", 0.98, "server starting"),
            ],
        )

    def test_progress_never_goes_back(self) -> None:
        """
        A line that looks like an earlier stage, printed late, does not move the fraction back.
        """
        self.upstream.start()
        self.upstream.emit(METADATA_LINES + LOADER_LINES + TENSOR_LINES + CONTEXT_LINES)
        self.upstream.emit("llama_model_loader: - type  f32:  121 tensors\n")
        self.upstream.emit("load_tensors: offloaded 0/29 layers to GPU\n")
        progress = self.snapshot()
        self.assertEqual((progress.fraction, progress.label), (0.85, "creating context"))

    def test_output_before_start_and_after_ready_is_ignored(self) -> None:
        """
        Only a load in progress is tracked: what the server prints once it is ready (its
        request log) changes nothing, and a new start begins from zero.
        """
        self.upstream.start()
        self.upstream.emit(METADATA_LINES + TENSOR_LINES)
        self.assertEqual(self.snapshot().fraction, 0.10)
        self.upstream.ready()
        after_ready = self.snapshot()
        self.upstream.emit(CONTEXT_LINES + "." * 40 + "\n")
        self.assertEqual(self.snapshot(), after_ready)
        self.upstream.stop()
        self.upstream.start()
        self.assertEqual(self.snapshot().fraction, None)
        self.assertEqual(self.snapshot().stage, "starting")

    def test_a_requested_load_shows_nothing_of_the_previous_one(self) -> None:
        """
        Between the request that starts a model and the start itself (put off until the reactor has flushed the loading stream's first bytes),
        the model is still stopped: the tracker says "starting", with last time's duration, and
        never where the previous load ended (it said 98%, then dropped back to 0%).
        """
        self.upstream.start()
        self.clock.advance(5.3)
        self.upstream.emit(METADATA_LINES + LOADER_LINES + TENSOR_LINES + CONTEXT_LINES + LOADED_LINES
                           + LISTENING_LINES)
        self.assertEqual(self.snapshot().fraction, 0.98)
        self.upstream.ready()
        self.upstream.stop()

        progress = self.snapshot()
        self.assertEqual((progress.stage, progress.label, progress.fraction), ("starting", "", 0.0))
        self.assertEqual((progress.expected, progress.eta, progress.elapsed), (5.3, 5.3, 0.0))

    def test_health_answer_loading_without_lines(self) -> None:
        """
        A server that prints nothing but answers its health check with 503 "Loading model" is
        shown as loading, without a made-up percentage.
        """
        self.upstream.start()
        self.upstream.health_status = "loading"
        self.clock.advance(2)
        progress = self.snapshot()
        self.assertEqual((progress.stage, progress.label, progress.fraction, progress.eta),
                         ("loading", "loading model", None, None))

    def test_connection_refused_is_still_starting(self) -> None:
        """
        A server that does not listen yet is ``starting``, not ``loading``.
        """
        self.upstream.start()
        self.upstream.health_status = "refused"
        self.assertEqual(self.snapshot().stage, "starting")


class TensorDotTests(TrackerTestCase):
    """
    While it reads the weights, llama-server prints one dot per percent, with no newline until
    the end: the dots move the fraction across the tensor-loading span (10% to 85%).
    """

    def setUp(self) -> None:
        super().setUp()
        self.upstream.start()
        self.upstream.emit(METADATA_LINES + LOADER_LINES + TENSOR_LINES)

    def test_fifty_dots_in_chunks_is_half_way_through_the_weights(self) -> None:
        """
        50 dots, arriving in chunks of various sizes without a newline, are half of the weights.
        """
        for size in (1, 7, 2, 15, 1, 24):
            self.upstream.emit("." * size)
        progress = self.snapshot()
        self.assertEqual(progress.label, "loading weights")
        self.assertAlmostEqual(progress.fraction, 0.10 + 0.75 * 0.5)

    def test_each_dot_counts_once(self) -> None:
        """
        The fraction follows the dots one by one, and never goes past the end of the span.
        """
        fractions = []
        for _ in range(100):
            self.upstream.emit(".")
            fractions.append(self.snapshot().fraction)
        self.assertEqual(fractions, sorted(fractions))
        self.assertEqual(len(set(fractions)), 100)
        self.assertAlmostEqual(fractions[0], 0.1075)
        self.assertAlmostEqual(fractions[-1], 0.85)
        self.upstream.emit("\n" + "." * 30 + "\n")
        self.assertAlmostEqual(self.snapshot().fraction, 0.85)

    def test_dots_then_context_line(self) -> None:
        """
        The end of the dots and the next stage line take the fraction on to that stage.
        """
        self.upstream.emit("." * 100 + "\n")
        self.upstream.emit(CONTEXT_LINES)
        progress = self.snapshot()
        self.assertEqual((progress.fraction, progress.label), (0.85, "creating context"))

    def test_dots_inside_a_line_are_not_progress(self) -> None:
        """
        Dots inside ordinary text ("please wait ...") are not tensor progress.
        """
        before = self.snapshot().fraction
        self.upstream.emit("main: please wait... still reading...\n")
        self.assertEqual(self.snapshot().fraction, before)


class EstimateTests(TrackerTestCase):
    """
    The estimate of the time left, from this model's previous loads or from the fraction.
    """

    def test_no_estimate_without_history_or_stage(self) -> None:
        self.upstream.start()
        self.clock.advance(3)
        self.assertIsNone(self.snapshot().eta)

    def test_history_gives_fraction_and_eta_to_a_silent_server(self) -> None:
        """
        A server that prints nothing still gets a fraction and an estimate once its previous
        load durations are known: 4 s into a load that took 10 s last time is 40%, 6 s left.
        """
        self.history.record("qwen", COMMAND, 10.0)
        self.upstream.start()
        first = self.snapshot()
        self.assertEqual((first.expected, first.eta), (10.0, 10.0))
        self.clock.advance(4)
        progress = self.snapshot()
        self.assertEqual(progress.expected, 10.0)
        self.assertAlmostEqual(progress.fraction, 0.4)
        self.assertAlmostEqual(progress.eta, 6.0)

    def test_stage_lines_ahead_of_history_win(self) -> None:
        """
        When the server says it is further along than the clock suggests, the server is right
        about the fraction; the estimate of the time left still comes from the history.
        """
        self.history.record("qwen", COMMAND, 10.0)
        self.upstream.start()
        self.clock.advance(1)
        self.upstream.emit(METADATA_LINES + TENSOR_LINES + CONTEXT_LINES)
        progress = self.snapshot()
        self.assertEqual(progress.fraction, 0.85)
        self.assertAlmostEqual(progress.eta, 9.0)

    def test_load_slower_than_last_time(self) -> None:
        """
        A load that takes longer than last time never claims to be done: the fraction stops
        short of 100% and the estimate says "any moment" (0), never a negative time.
        """
        self.history.record("qwen", COMMAND, 2.0)
        self.upstream.start()
        self.clock.advance(30)
        progress = self.snapshot()
        self.assertEqual((progress.fraction, progress.eta), (0.95, 0.0))

    def test_no_estimate_without_history(self) -> None:
        """
        A model's first load has no estimate of the time left, however far its stages have got:
        the stages of llama-server take very different times, so any extrapolation is invented
        (half of the weights after 4.75 s said 5.25 s left; the load took 5 s in all).
        """
        self.upstream.start()
        self.upstream.emit(METADATA_LINES)
        self.clock.advance(1)
        self.assertEqual((self.snapshot().fraction, self.snapshot().eta), (0.03, None))
        self.upstream.emit(TENSOR_LINES)
        self.clock.advance(3.75)
        self.upstream.emit("." * 50)
        progress = self.snapshot()
        self.assertAlmostEqual(progress.fraction, 0.475)
        self.assertIsNone(progress.eta)


class RecordingTests(TrackerTestCase):
    """
    The tracker records how long each successful load took.
    """

    def test_successful_load_is_recorded(self) -> None:
        self.upstream.start()
        self.clock.advance(12.5)
        self.upstream.ready()
        self.assertEqual(self.history.expected("qwen", COMMAND), 12.5)

    def test_failed_or_stopped_load_is_not_recorded(self) -> None:
        self.upstream.start()
        self.clock.advance(3)
        self.upstream.fail()
        self.upstream.start()
        self.clock.advance(4)
        self.upstream.stop()
        self.assertIsNone(self.history.expected("qwen", COMMAND))

    def test_next_start_shows_the_last_duration(self) -> None:
        """
        The second load of a model knows how long the first one took.
        """
        self.upstream.start()
        self.clock.advance(8)
        self.upstream.ready()
        self.upstream.stop()
        self.upstream.start()
        self.clock.advance(2)
        progress = self.snapshot()
        self.assertEqual(progress.expected, 8.0)
        self.assertAlmostEqual(progress.eta, 6.0)
        self.assertAlmostEqual(progress.fraction, 0.25)


class StartStepTests(TrackerTestCase):
    """
    Once loaded, what a start hook does (restoring saved slots) is the stage the tracker reports,
    and the time it takes is not counted as load time.
    """

    def test_a_start_step_is_the_stage(self) -> None:
        """
        The step's own fraction is reported as such; the start's fraction goes on from where
        the load got to, through what is left.
        """
        self.upstream.start()
        self.upstream.emit(LOADED_LINES)
        self.clock.advance(3)
        loaded = self.snapshot().fraction
        assert loaded is not None
        self.upstream.healthy(StartStep("restoring", "restoring 2 cached conversations, 1.1 GB", 0.5))
        self.clock.advance(1)
        progress = self.snapshot()
        self.assertEqual(
            (progress.stage, progress.label, progress.step_fraction, progress.elapsed),
            ("restoring", "restoring 2 cached conversations, 1.1 GB", 0.5, 4.0),
        )
        self.assertEqual(progress.fraction, loaded + (1 - loaded) * 0.5)
        self.assertIsNone(progress.eta)

    def test_the_fraction_never_goes_back_when_a_step_begins(self) -> None:
        """
        A start hook that begins at 0 % of its own work, after a load that got to 95 % (its
        stage lines, or the time previous loads took): the start's fraction does not fall back.
        """
        self.history.record("qwen", COMMAND, 10.0)
        for lines, wait in ((LOADED_LINES, 1), ("", 12)):
            self.upstream.start()
            self.upstream.emit(lines)
            self.clock.advance(wait)
            seen = [self.snapshot().fraction]
            for fraction in (0.0, None, 0.25, 1.0):
                self.upstream.start_step = StartStep("restoring", "restoring 1 cached conversation, 1 MB", fraction)
                seen.append(self.snapshot().fraction)
            self.assertGreaterEqual(seen[0], 0.95)
            self.assertEqual(seen, sorted(seen), seen)
            self.assertEqual(seen[-1], 1.0)
            self.upstream.ready()

    def test_the_load_time_recorded_ends_at_the_health_check(self) -> None:
        self.upstream.start()
        self.clock.advance(3)
        self.upstream.healthy(StartStep("restoring", "restoring 1 cached conversation, 20.0 MB"))
        self.clock.advance(5)
        self.upstream.ready()
        self.assertEqual(self.history.expected("qwen", COMMAND), 3.0)


class SecondLoadTests(SynchronousTestCase):
    """
    What the loading stream reads from the tracker through a whole second load of a model, with
    the real `Supervisor` and `Upstream` (fake child processes) and the production deferred start.
    """

    def setUp(self) -> None:
        self.reactor = ProcessReactor().install(self)
        self.reactor.advance(1_700_000_000)
        self.health = 503
        text = f"models:\n  qwen:\n    cmd: {sys.executable} -m llama_server --port ${{PORT}}\n"
        config = parse_config(text, "test.yaml", {})

        def factory(model: ModelConfig) -> Upstream:
            return Upstream(model, self.reactor, environ={"PATH": os.environ.get("PATH", os.defpath)},
                            health_probe=lambda upstream: succeed(self.health))

        self.supervisor = Supervisor(config, self.reactor, upstream_factory=factory)
        self.tracker = LoadTracker(self.supervisor.upstreams["qwen"], self.reactor, LoadHistory(None))

    def load(self, seconds: float, seen: list[Progress]) -> Deferred[object]:
        """
        Request qwen as a loading stream does, and take it through a llama-server load of
        ``seconds``, keeping a snapshot after each step (the first before any time passes).
        """
        self.health = 503
        ticket = self.supervisor.request("qwen", defer_start=True)
        seen.append(self.tracker.snapshot())
        # The deferred start waits for the reactor's next round of I/O: two turns.
        self.reactor.advance(0)
        self.reactor.advance(0)
        child = self.reactor.spawned[-1]
        for text in (METADATA_LINES, LOADER_LINES, TENSOR_LINES, "." * 50, "." * 50 + "\n", CONTEXT_LINES,
                     WARMUP_LINES, LOADED_LINES + LISTENING_LINES):
            self.reactor.advance(seconds / 10)
            child.output(text.encode(), fd=2)
            seen.append(self.tracker.snapshot())
        self.health = 200
        self.reactor.advance(seconds / 10)
        return ticket.wait()

    def test_first_event_of_the_next_load_is_not_the_end_of_the_last(self) -> None:
        """
        After a load that reached 98%, the next load's first snapshot, taken before the deferred
        start, says "starting" at 0% with last time's duration; from there the fraction only
        grows.
        """
        first: list[Progress] = []
        self.successResultOf(self.load(5.0, first)).release()
        self.assertEqual(first[-1].fraction, 0.98)
        self.supervisor.unload("qwen")
        self.reactor.spawned[-1].exit(0)

        second: list[Progress] = []
        self.successResultOf(self.load(5.0, second)).release()
        self.assertEqual((second[0].stage, second[0].fraction, second[0].elapsed), ("starting", 0.0, 0.0))
        # The first load took 9 steps of 0.5 s from its spawn to its ready answer.
        self.assertAlmostEqual(second[0].expected, 4.5, places=3)
        self.assertEqual(second[0].eta, second[0].expected)
        fractions = [progress.fraction for progress in second]
        self.assertEqual(fractions, sorted(fractions))
        self.assertEqual(fractions[-1], 0.98)


class LoadHistoryTests(SynchronousTestCase):
    """
    `LoadHistory`: the median of recent durations, per model and command, in a JSON file.
    """

    def path(self) -> str:
        directory = self.mktemp()
        return os.path.join(directory, "state", "load-times.json")

    def test_unknown_model(self) -> None:
        self.assertIsNone(LoadHistory(None).expected("qwen", COMMAND))

    def test_median_of_recent_loads(self) -> None:
        history = LoadHistory(None)
        for seconds in (10.0, 30.0, 12.0):
            history.record("qwen", COMMAND, seconds)
        self.assertEqual(history.expected("qwen", COMMAND), 12.0)

    def test_only_recent_loads_count(self) -> None:
        """
        Old durations age out: after a model got faster, the old slow loads stop counting.
        """
        history = LoadHistory(None)
        for _ in range(HISTORY_LENGTH):
            history.record("qwen", COMMAND, 100.0)
        for _ in range(HISTORY_LENGTH // 2 + 1):
            history.record("qwen", COMMAND, 5.0)
        self.assertEqual(history.expected("qwen", COMMAND), 5.0)

    def test_another_command_starts_afresh(self) -> None:
        """
        A model whose command changed (another file, other flags) does not inherit the old
        durations, and its first new load replaces them.
        """
        history = LoadHistory(None)
        history.record("qwen", COMMAND, 40.0)
        other = COMMAND.replace("qwen.gguf", "qwen-q8.gguf")
        self.assertIsNone(history.expected("qwen", other))
        history.record("qwen", other, 3.0)
        self.assertEqual(history.expected("qwen", other), 3.0)
        self.assertIsNone(history.expected("qwen", COMMAND))

    def test_models_are_separate(self) -> None:
        history = LoadHistory(None)
        history.record("qwen", COMMAND, 4.0)
        self.assertIsNone(history.expected("llama", COMMAND))

    def test_persisted_across_instances(self) -> None:
        """
        Durations survive a restart: a new `LoadHistory` on the same file knows them, and the
        file's directory is created when needed.
        """
        path = self.path()
        LoadHistory(path).record("qwen", COMMAND, 7.25)
        LoadHistory(path).record("llama", "llama-server -m llama.gguf", 3.0)
        reopened = LoadHistory(path)
        self.assertEqual(reopened.expected("qwen", COMMAND), 7.25)
        self.assertEqual(reopened.expected("llama", "llama-server -m llama.gguf"), 3.0)
        with open(path, encoding="utf-8") as f:
            self.assertEqual(json.load(f)["qwen"], {"cmd": COMMAND, "durations": [7.25]})
        self.assertEqual([name for name in os.listdir(os.path.dirname(path))], ["load-times.json"])

    def test_tracker_history_survives_restart(self) -> None:
        """
        A load recorded by one swapproxy process gives the next process an estimate.
        """
        path = self.path()
        clock = Clock()
        upstream = LoadingUpstream(model_config(), clock)
        LoadTracker(upstream, clock, LoadHistory(path))  # type: ignore[arg-type]
        upstream.start()
        clock.advance(6)
        upstream.ready()

        clock = Clock()
        upstream = LoadingUpstream(model_config(), clock)
        tracker = LoadTracker(upstream, clock, LoadHistory(path))  # type: ignore[arg-type]
        upstream.start()
        clock.advance(1.5)
        progress = tracker.snapshot()
        self.assertEqual((progress.expected, progress.eta), (6.0, 4.5))

    def test_corrupt_file_is_ignored(self) -> None:
        """
        A damaged state file costs the estimates, never the start: it is ignored, and the next
        recorded load replaces it with a valid file.
        """
        path = self.path()
        os.makedirs(os.path.dirname(path))
        damages = [
            b'{"qwen": {"cmd": ',
            b"[1, 2, 3]",
            b'{"qwen": "oops", "llama": 3}',
            b'{"qwen": {"cmd": "%s", "durations": ["x", -4, null]}}' % COMMAND.encode(),
            b"\x00\xff\xfe not text",
        ]
        for damage in damages:
            with open(path, "wb") as f:
                f.write(damage)
            history = LoadHistory(path)
            self.assertIsNone(history.expected("qwen", COMMAND), damage)
        history.record("qwen", COMMAND, 2.0)
        self.assertEqual(LoadHistory(path).expected("qwen", COMMAND), 2.0)

    def test_unwritable_file_keeps_history_in_memory(self) -> None:
        """
        When the state file cannot be written, the durations are still used in this process.
        """
        directory = self.mktemp()
        os.makedirs(directory)
        blocker = os.path.join(directory, "not-a-directory")
        with open(blocker, "w") as f:
            f.write("")
        history = LoadHistory(os.path.join(blocker, "load-times.json"))
        history.record("qwen", COMMAND, 9.0)
        self.assertEqual(history.expected("qwen", COMMAND), 9.0)

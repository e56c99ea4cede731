# -*- test-case-name: tests.test_progress -*-
"""
How far a model's load has got, from what its server prints, how its health check answers,
and how long its previous loads took.

llama-server prints named stages while it loads (``load_tensors: ...``, ``llama_context: ...``,
``main: model loaded``) and, while it reads the weights, one ``.`` per percent of the tensors
loaded. `LoadTracker` turns those into a fraction; `LoadHistory` remembers each model's last load
durations in a small JSON file, so that the next load can show an estimate of the time left even
for a server that prints nothing.
"""

from __future__ import annotations

import json
import re
import statistics
from typing import Any

import attrs
from twisted.internet.interfaces import IReactorTime

from swapproxy.logs import proxy_logger
from swapproxy.statefile import replace_json
from swapproxy.upstream import State, Upstream

log = proxy_logger("swapproxy.progress")

#: How many past load durations are kept per model.
HISTORY_LENGTH = 5

#: (pattern, fraction reached when a line matches), in load order. Tensor loading, reported by
#: dots, spans the fractions between "tensors" and "context".
_TENSORS_START = 0.10
_TENSORS_END = 0.85
_STAGES: tuple[tuple[re.Pattern[str], float, str], ...] = tuple(
    (re.compile(pattern), fraction, label)
    for pattern, fraction, label in (
        (r"load_model: loading model|llama_model_load_from_file|llama_model_loader: loaded meta data", 0.03,
         "reading model metadata"),
        (r"print_info: file (format|type)|llama_model_loader: - type", 0.06, "reading model metadata"),
        (r"load_tensors: loading model tensors|load_tensors:", _TENSORS_START, "loading weights"),
        (r"llama_context: constructing|llama_context:|llama_init_from_model", _TENSORS_END, "creating context"),
        (r"llama_kv_cache|kv_cache_init|llama_kv_cache_unified", 0.88, "allocating KV cache"),
        (r"warming up the model|threadpool init", 0.92, "warming up"),
        (r"initializing slots|load_model: initializing|model loaded", 0.95, "model loaded"),
        (r"server is listening|listening on http|starting the main loop", 0.98, "server starting"),
    )
)
_LEADING_DOTS = re.compile(r"(\.+)")


@attrs.frozen
class Progress:
    """
    A snapshot of one load.

    :ivar stage: ``starting`` (no sign of loading yet), ``loading``, or what a start hook does
        once the model is loaded (`swapproxy.upstream.StartStep`, such as ``restoring``).
    :ivar label: what the server is doing, in plain words (may be empty).
    :ivar fraction: how much of the whole start is done, 0..1, or ``None`` when it cannot be
        known; within one start it never goes back, also when a start hook begins.
    :ivar elapsed: seconds since the process was started.
    :ivar eta: estimated seconds left, or ``None`` when there is no estimate: the model has no
        load history yet (guessing from the first stages of a first load was wrong by half).
    :ivar expected: how long previous loads took (median), or ``None``.
    :ivar step_fraction: while a start hook runs, how much of its own work is done (the
        `swapproxy.upstream.StartStep`'s fraction), else ``None``.
    """

    stage: str
    label: str
    fraction: float | None
    elapsed: float
    eta: float | None
    expected: float | None
    step_fraction: float | None = None


class LoadHistory:
    """
    Each model's recent load durations, kept in a JSON file across restarts.

    A duration only counts for the same command line, so that a model pointed at another file
    starts afresh.

    :param path: the JSON file; ``None`` keeps the history in memory only.
    """

    def __init__(self, path: str | None) -> None:
        self.path = path
        self._entries: dict[str, dict[str, Any]] = {}
        if path is not None:
            try:
                with open(path, encoding="utf-8") as f:
                    data = json.load(f)
                if isinstance(data, dict):
                    self._entries = {k: v for k, v in data.items() if isinstance(v, dict)}
            except FileNotFoundError:
                pass
            except (OSError, ValueError) as e:
                log.warn("ignoring unreadable load history {path}: {error}", path=path, error=e)

    def expected(self, model_id: str, command: str) -> float | None:
        """
        The median of the model's recent load durations for this command, if any.
        """
        entry = self._entries.get(model_id)
        if not entry or entry.get("cmd") != command:
            return None
        durations = [d for d in entry.get("durations", []) if isinstance(d, (int, float)) and d >= 0]
        return statistics.median(durations) if durations else None

    def record(self, model_id: str, command: str, seconds: float) -> None:
        """
        Remember one load duration and save the file.
        """
        entry = self._entries.get(model_id)
        if not entry or entry.get("cmd") != command:
            entry = {"cmd": command, "durations": []}
        entry["durations"] = (list(entry.get("durations", [])) + [round(seconds, 3)])[-HISTORY_LENGTH:]
        self._entries[model_id] = entry
        self._save()

    def _save(self) -> None:
        if self.path is None:
            return
        try:
            replace_json(self.path, self._entries, indent=1, sort_keys=True)
        except OSError as e:
            log.warn("could not save load history {path}: {error}", path=self.path, error=e)


class LoadTracker:
    """
    Follows one upstream's loads: stage lines, tensor dots, health answers and durations.

    What it reports is about the load under way: until the process has started (a start is put
    off until the loading stream's first event has left) it says
    ``starting``, never where the previous load ended. Within one load the fraction never goes
    back: stages only move forward, and the share of last time's duration only grows.

    :param upstream: the upstream to follow (its observers are hooked here).
    :param clock: provides ``seconds()``.
    :param history: where load durations are remembered.
    """

    def __init__(self, upstream: Upstream, clock: IReactorTime, history: LoadHistory) -> None:
        self._upstream = upstream
        self._clock = clock
        self._history = history
        self._command = " ".join(upstream.model.cmd)
        self._reset()
        upstream.state_observers.append(self._state_changed)
        upstream.line_observers.append(self._line)
        upstream.output_observers.append(self._output)

    def _reset(self) -> None:
        self._fraction = 0.0
        self._label = ""
        self._seen_stage = False
        self._dots = 0
        self._line_dots = 0
        self._partial = ""

    def _state_changed(self, upstream: Upstream, old: State, new: State) -> None:
        if new is State.READY and old is State.STARTING and upstream.started_at is not None:
            # The load itself: what start hooks (restoring saved slots) add varies from start to start.
            loaded_at = upstream.healthy_at or upstream.ready_at
            assert loaded_at is not None
            self._history.record(upstream.model.id, self._command, loaded_at - upstream.started_at)
        if new is State.STARTING or old is State.STARTING:
            # A load begins or ends: nothing of it may show in the next one.
            self._reset()

    def _line(self, upstream: Upstream, line: str) -> None:
        if upstream.state is not State.STARTING:
            return
        for pattern, fraction, label in _STAGES:
            if fraction >= self._fraction and pattern.search(line):
                self._fraction = fraction
                self._label = label
                self._seen_stage = True
                break

    def _output(self, upstream: Upstream, data: bytes) -> None:
        if upstream.state is not State.STARTING:
            return
        # llama.cpp prints one dot per percent of the weights loaded, with no newline until
        # 100%: count the dots that start each line as it is printed.
        for index, piece in enumerate(data.decode("utf-8", "replace").split("\n")):
            if index:
                self._partial, self._line_dots = "", 0
            if len(self._partial) > 200:
                continue
            self._partial += piece
            match = _LEADING_DOTS.match(self._partial)
            count = len(match.group(1)) if match else 0
            if count > self._line_dots:
                self._dots += count - self._line_dots
                self._line_dots = count
                if self._fraction <= _TENSORS_END:
                    span = _TENSORS_END - _TENSORS_START
                    tensors = _TENSORS_START + span * min(self._dots, 100) / 100
                    self._fraction = max(self._fraction, tensors)
                    self._label = "loading weights"
                    self._seen_stage = True

    def snapshot(self) -> Progress:
        """
        Where the current load stands; a load requested but not yet under way is ``starting``.
        """
        upstream = self._upstream
        expected = self._history.expected(upstream.model.id, self._command)
        if upstream.state is not State.STARTING or upstream.started_at is None:
            return Progress("starting", "", None if expected is None else 0.0, 0.0, expected, expected)
        elapsed = self._clock.seconds() - upstream.started_at
        fraction: float | None = self._fraction if self._seen_stage else None
        if expected is not None and expected > 0:
            by_time = min(0.95, elapsed / expected)
            fraction = by_time if fraction is None else max(fraction, by_time)
        step = upstream.start_step
        if step is not None:
            # Loaded; a start hook has the last word (restoring saved slots). Its share of the
            # start is what the load left: the fraction goes on from where the load got to.
            done = fraction or 0.0
            overall = None if step.fraction is None else done + (1.0 - done) * step.fraction
            return Progress(step.stage, step.label, fraction if overall is None else overall, elapsed, None,
                            expected, step.fraction)
        eta = None if expected is None else max(0.0, expected - elapsed)
        loading = self._seen_stage or upstream.health_status == "loading"
        label = self._label or ("loading model" if loading else "")
        return Progress("loading" if loading else "starting", label, fraction, elapsed, eta, expected)

# -*- test-case-name: tests.test_board -*-
"""
What every model is doing right now, as ``/api/events``, ``/running``, ``/v1/models`` and the
dashboard show it: its state, its load progress (the numbers the loading stream shows), the
requests in flight and queued, uptime, TTL, how long its last load took and why it last failed.

`ModelBoard` computes a model's entry from the supervisor, the upstream and its `LoadTracker`
whenever asked, and tells its subscribers what changed:

* ``modelStatus`` (every model's entry, sorted by id, as llama-swap sends it) when a model's
  state changes or a reload adds or removes a model, before anyone else hears of the change;
* ``model`` (one entry) when anything else in an entry changes: requests in flight or queued
  (the supervisor calls `ModelBoard.refresh` after each scheduling pass), the TTL deadline, or the
  load progress, which is looked at every `TICK` seconds while a model loads and anyone listens.

Values that move with the clock alone (uptime, TTL left, load time elapsed and left) are sent as
they are when the entry is sent; a reader counts them on by itself until the next entry.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall

from swapproxy.progress import LoadTracker
from swapproxy.subscribers import Subscribers
from swapproxy.supervisor import Supervisor
from swapproxy.upstream import State, Upstream

#: Seconds between two looks at the progress of a loading model (the loading stream's tick).
TICK = 0.25
#: How many of a model's last output lines are kept with its last failure.
FAILURE_LINES = 10

#: Called with the kind of change (``modelStatus`` or ``model``) and its payload.
Subscriber = Callable[[str, Any], None]


def _rounded(value: float | None, digits: int = 1) -> float | None:
    return None if value is None else round(value, digits)


class ModelBoard:
    """
    The live state of every configured model, and who wants to hear of its changes.

    :param supervisor: whose models are shown.
    :param clock: provides ``seconds()`` and ``callLater`` (the progress ticker runs on it).
    :param trackers: each model's `LoadTracker` by model id (read when needed, so that the
        trackers of models a reload adds are found).
    """

    def __init__(self, supervisor: Supervisor, clock: IReactorTime, trackers: Mapping[str, LoadTracker]) -> None:
        self._supervisor = supervisor
        self._clock = clock
        self._trackers = trackers
        self._subscribers = Subscribers("model board")
        self._sent: dict[str, tuple[Any, ...]] = {}
        self._last_load: dict[str, float] = {}
        self._last_failure: dict[str, dict[str, Any]] = {}
        self._ticker = LoopingCall(self.refresh)
        self._ticker.clock = clock
        supervisor.each_upstream(self._watch)
        supervisor.change_observers.append(self.refresh)

    # -- subscribers ------------------------------------------------------------------------------

    def subscribe(self, subscriber: Subscriber) -> Callable[[], None]:
        """
        Call ``subscriber(kind, payload)`` with each ``modelStatus`` and ``model`` change from now on.

        :returns: a function that unsubscribes (calling it twice is harmless).
        """
        if not self._subscribers:
            self._sent = {model_id: self._key(model_id) for model_id in self._supervisor.upstreams}
        remove = self._subscribers.add(subscriber)
        self._update_ticker()

        def unsubscribe() -> None:
            remove()
            self._update_ticker()

        return unsubscribe

    def _publish_all(self) -> None:
        self._sent = {model_id: self._key(model_id) for model_id in self._supervisor.upstreams}
        self._subscribers.publish("modelStatus", self.entries())

    def _update_ticker(self) -> None:
        loading = any(up.state is State.STARTING for up in self._supervisor.upstreams.values())
        if loading and self._subscribers and not self._ticker.running:
            self._ticker.start(TICK, now=False)
        elif (not loading or not self._subscribers) and self._ticker.running:
            self._ticker.stop()

    # -- what changes -----------------------------------------------------------------------------

    def _watch(self, upstream: Upstream) -> None:
        # First in line: a state change is told before the supervisor acts on it (and grants a
        # request that might end before a later observer heard of the change).
        upstream.state_observers.insert(0, self._state_changed)
        if self._subscribers:
            self._publish_all()

    def _state_changed(self, upstream: Upstream, old: State, new: State) -> None:
        model_id = upstream.model.id
        if self._supervisor.upstreams.get(model_id) is not upstream:
            return  # a process a reload replaced: the model's entry is its new upstream's
        now = self._clock.seconds()
        if old is State.STARTING and new is State.READY and upstream.started_at is not None:
            ready_at = upstream.ready_at if upstream.ready_at is not None else now
            self._last_load[model_id] = max(0.0, ready_at - upstream.started_at)
        elif new is State.FAILED and upstream.last_error is not None:
            error = upstream.last_error
            self._last_failure[model_id] = {
                "time": round(now, 3),
                "reason": error.reason,
                "exit_code": error.exit_code,
                "last_lines": list(error.last_lines)[-FAILURE_LINES:],
            }
        elif new is State.UNHEALTHY:
            # Found hung: why stays in its entry after the kill, as a crash's does.
            lines = [line for line in upstream.recent_lines if line.strip()]
            self._last_failure[model_id] = {
                "time": round(now, 3),
                "reason": f"stopped responding: {upstream.unhealthy_reason or 'found hung'}",
                "exit_code": None,
                "last_lines": lines[-FAILURE_LINES:],
            }
        elif old is State.READY and new is State.STOPPED:
            # Not stopped by anyone (that goes through "stopping"): the process died.
            lines = [line for line in upstream.recent_lines if line.strip()]
            self._last_failure[model_id] = {
                "time": round(now, 3),
                "reason": "the process exited unexpectedly while ready",
                "exit_code": None,
                "last_lines": lines[-FAILURE_LINES:],
            }
        if self._subscribers:
            self._publish_all()
        self._update_ticker()

    def refresh(self) -> None:
        """
        Tell the subscribers of every entry that changed since they last heard of it.

        Cheap when nobody listens; the supervisor calls it after each scheduling pass.
        """
        if not self._subscribers:
            return
        upstreams = self._supervisor.upstreams
        if upstreams.keys() != self._sent.keys():
            self._publish_all()
            return
        for model_id in upstreams:
            key = self._key(model_id)
            if key != self._sent[model_id]:
                self._sent[model_id] = key
                self._subscribers.publish("model", self.entry(model_id))

    # -- entries ----------------------------------------------------------------------------------

    def progress(self, model_id: str) -> dict[str, Any] | None:
        """
        How far the model's load has got, while it loads (``None`` otherwise): ``stage``
        (``starting`` or ``loading``), ``label``, ``fraction`` (0..1 or ``None``), ``percent``,
        ``elapsed``, ``eta`` and ``expected`` (seconds, or ``None`` when unknown).
        """
        upstream = self._supervisor.upstreams.get(model_id)
        tracker = self._trackers.get(model_id)
        if upstream is None or tracker is None or upstream.state is not State.STARTING:
            return None
        snapshot = tracker.snapshot()
        fraction = snapshot.fraction
        return {
            "stage": snapshot.stage,
            "label": snapshot.label,
            "fraction": _rounded(fraction, 3),
            "percent": None if fraction is None else int(fraction * 100),
            "elapsed": round(snapshot.elapsed, 1),
            "eta": _rounded(snapshot.eta),
            "expected": _rounded(snapshot.expected),
        }

    def status(self, model_id: str, progress: dict[str, Any] | None = None) -> str:
        """
        One word for what the model is doing: ``stopped``, ``queued`` (requests, or a load, wait
        for their turn; no process yet), ``stopping``, ``starting`` (no sign of loading yet), ``loading``, ``ready``,
        ``unhealthy`` (found hung, being stopped) or ``failed`` (its last start failed).
        """
        state = self._supervisor.upstreams[model_id].state
        if state is State.STARTING:
            progress = progress if progress is not None else self.progress(model_id)
            # Any stage after "starting" is part of the load: "loading", and a start step such as
            # "restoring" saved slots once the model is loaded.
            return "starting" if progress is None or progress["stage"] == "starting" else "loading"
        if state in (State.STOPPED, State.FAILED) and self._supervisor.queued(model_id):
            return "queued"
        return str(state.value)

    def _key(self, model_id: str) -> tuple[Any, ...]:
        # What an entry says, without what moves with the clock alone.
        supervisor = self._supervisor
        upstream = supervisor.upstreams[model_id]
        progress = self.progress(model_id)
        failure = self._last_failure.get(model_id)
        return (
            id(upstream),
            id(upstream.model),
            upstream.state,
            upstream.pid,
            supervisor.in_flight.get(model_id, 0),
            supervisor.queued(model_id),
            supervisor.queued(model_id, requests_only=True),
            supervisor.unload_due(model_id),
            None if progress is None else (progress["stage"], progress["label"], progress["percent"]),
            self._last_load.get(model_id),
            None if failure is None else failure["time"],
        )

    def entry(self, model_id: str) -> dict[str, Any]:
        """
        Everything the dashboard shows of one model.

        llama-swap's ``modelStatus`` fields (``id``, ``name``, ``description``, ``state``,
        ``unlisted``) come first; ``state`` is the process's (stopped, starting, ready, stopping,
        failed) and ``status`` the word of `status`.
        """
        supervisor = self._supervisor
        upstream = supervisor.upstreams[model_id]
        model = upstream.model
        now = self._clock.seconds()
        progress = self.progress(model_id)
        due = supervisor.unload_due(model_id)
        try:
            group = supervisor.config.group_of(model_id).id
        except KeyError:
            group = None
        last_load = self._last_load.get(model_id)
        return {
            "id": model_id,
            "name": model.name,
            "description": model.description,
            "state": upstream.state.value,
            "unlisted": model.unlisted,
            "status": self.status(model_id, progress),
            "aliases": list(model.aliases),
            "group": group,
            "in_flight": supervisor.in_flight.get(model_id, 0),
            "queued": supervisor.queued(model_id, requests_only=True),
            "pid": upstream.pid,
            "uptime": round(now - upstream.started_at, 1)
            if upstream.running and upstream.started_at is not None
            else None,
            "ttl": model.ttl,
            "ttl_remaining": None if due is None else round(max(0.0, due - now), 1),
            "progress": progress,
            "last_load": _rounded(last_load, 2),
            "last_failure": self._last_failure.get(model_id),
        }

    def entries(self) -> list[dict[str, Any]]:
        """
        The `entry` of every configured model, sorted by id.
        """
        return [self.entry(model_id) for model_id in sorted(self._supervisor.upstreams)]

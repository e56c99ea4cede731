# -*- test-case-name: tests.test_loading -*-
"""
The loading stream's ticker: a streaming request for a model that is not ready is answered at
once with a valid SSE stream that shows what is happening (queue, stopping another model, real
load progress); the forward pipeline (`swapproxy.web.forward`) then splices the model's own
stream into the same response.

One writer at a time: the `LoadingStream` ticker writes until it is stopped; only then does the
pipeline relay the upstream body.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.web.server import Request

from swapproxy.logs import proxy_logger
from swapproxy.progress import LoadTracker
from swapproxy.supervisor import Ticket
from swapproxy.upstream import StartError
from swapproxy.web.sse import LOADING_TEXT_END, LOADING_TEXT_START, SSE_HEADERS, ChatEvents, MessagesEvents

log = proxy_logger("swapproxy.loading")

#: How often the ticker looks at the load; events go out only when something changed, or as
#: a dot once a second.
TICK = 0.25
DOT_INTERVAL = 1.0
Events = ChatEvents | MessagesEvents


def _seconds(value: float) -> str:
    return f"{value:.1f} s" if value < 100 else f"{value:.0f} s"


class LoadingStream:
    """
    Writes loading events for one request until its ticket is granted or fails.

    :param request: the client's request; nothing else writes to it while the ticker runs.
    :param clock: provides ``seconds()`` and ``callLater`` (the ticker runs on it).
    :param ticket: the request's place in the queue.
    :param tracker: the load tracker of the ticket's model.
    :param events: the SSE dialect.
    """

    def __init__(self, request: Request, clock: IReactorTime, ticket: Ticket, tracker: LoadTracker, events: Events) -> None:
        self._request = request
        self._clock = clock
        self._ticket = ticket
        self._tracker = tracker
        self.events = events
        self._loop = LoopingCall(self._tick)
        self._loop.clock = clock
        self._last_key: tuple[Any, ...] = ()
        self._last_event_at = 0.0
        self._last_percent = -100
        self._started_at = clock.seconds()
        self.events_sent = 0

    def begin(self) -> None:
        """
        Send the 200, the SSE headers and the first event now, and start the ticker.
        """
        request = self._request
        request.setResponseCode(200)
        request.defaultContentType = None
        for name, value in SSE_HEADERS:
            request.setHeader(name, value)
        text, status, key = self._describe()
        self._said(key)
        self._write(self.events.opening() + self.events.text(LOADING_TEXT_START + text, status))
        self._loop.start(TICK, now=False)

    def resume(self, ticket: Ticket) -> None:
        """
        Start ticking again for a new ticket: the model exited before it could answer, and is
        being started once more.
        """
        self._ticket = ticket
        text, status, key = self._describe()
        self._said(key)
        gone = f"\nModel {ticket.model_id} exited before it answered; starting it again."
        self._write(self.events.text(LOADING_TEXT_START + gone + text, status))
        self._loop.start(TICK, now=False)

    def _said(self, key: tuple[Any, ...]) -> None:
        # The next tick must not repeat the line just sent.
        self._last_key = key
        if key[0] == "loading" and key[2] is not None:
            self._last_percent = key[2]

    def stop(self) -> None:
        """
        Stop the ticker; write nothing more.
        """
        if self._loop.running:
            self._loop.stop()

    def finish_ready(self) -> None:
        """
        Stop the ticker and say the model is ready; the caller relays the model's stream next.
        """
        self.stop()
        waited = self._clock.seconds() - self._started_at
        model_id = self._ticket.model_id
        status = self._status("ready", 1.0, None)
        self._write(
            self.events.text(f"\nModel {model_id} is ready (waited {_seconds(waited)}).\n\n{LOADING_TEXT_END}", status)
            + self.events.closing()
        )

    def finish_failed(self, error: Exception) -> None:
        """
        Stop the ticker and say why the model cannot be used; the caller ends the stream with
        the dialect's error event.
        """
        self.stop()
        model_id = self._ticket.model_id
        if isinstance(error, StartError):
            reason = error.reason + (f". Last output: {error.last_lines[-1]}" if error.last_lines else "")
        else:
            reason = str(error)
        text = f"\nModel {model_id} could not be started: {reason}\n{LOADING_TEXT_END}"
        self._write(self.events.text(text, self._status("failed", None, None)))

    # -- ticking ------------------------------------------------------------------------------

    def _write(self, data: bytes) -> None:
        if data:
            self.events_sent += 1
            self._last_event_at = self._clock.seconds()
            self._request.write(data)

    def _status(self, stage: str, progress: float | None, eta: float | None, **extra: Any) -> dict[str, Any]:
        status: dict[str, Any] = {
            "stage": stage,
            "model": self._ticket.model_id,
            "progress": None if progress is None else round(progress, 3),
            "elapsed": round(self._clock.seconds() - self._started_at, 1),
            "eta": None if eta is None else round(eta, 1),
        }
        status.update(extra)
        return status

    def _describe(self) -> tuple[str, dict[str, Any], tuple[Any, ...]]:
        """
        The current status line, its machine-readable twin, and a key that changes when the
        line says something new.
        """
        ticket = self._ticket
        model_id = ticket.model_id
        if ticket.stage == "queued":
            text = f"Waiting for a turn to load {model_id}: queue position {ticket.position}"
            text += f"; {ticket.reason}." if ticket.reason else "."
            status = self._status("queued", None, None, position=ticket.position, waiting_for=list(ticket.waiting_for),
                                  reason=ticket.reason)
            return "\n" + text, status, ("queued", ticket.position, ticket.reason)
        if ticket.stage == "stopping":
            others = ", ".join(ticket.waiting_for)
            text = f"Stopping {others} to make room for {model_id}."
            status = self._status("stopping", None, None, waiting_for=list(ticket.waiting_for))
            return "\n" + text, status, ("stopping", ticket.waiting_for)
        progress = self._tracker.snapshot()
        if progress.stage not in ("starting", "loading"):
            # Loaded; a start hook finishes the start (restoring saved slots, `StartStep`): the
            # text says how far the hook got, the status how far the whole start.
            percent = None if progress.step_fraction is None else int(progress.step_fraction * 100)
            text = f"Loaded {model_id}; {progress.label}" + ("" if percent is None else f": {percent}%")
            text += f" ({_seconds(progress.elapsed)} elapsed)"
            status = self._status(progress.stage, progress.fraction, None, label=progress.label)
            return "\n" + text, status, (progress.stage, (progress.label, percent))
        if progress.stage == "starting":
            text = f"Starting {model_id}"
            if progress.expected is not None:
                text += f" (it took {_seconds(progress.expected)} last time)"
            status = self._status("starting", progress.fraction, progress.eta)
            return "\n" + text + ".", status, ("starting",)
        percent = None if progress.fraction is None else int(progress.fraction * 100)
        parts = [f"Loading {model_id}"]
        if percent is not None:
            parts[0] += f": {percent}%"
        details = [progress.label] if progress.label else []
        details.append(f"{_seconds(progress.elapsed)} elapsed")
        if progress.eta is not None:
            details.append(f"about {_seconds(progress.eta)} left" if progress.eta > 0 else "should be ready any moment")
        else:
            details.append("no estimate yet")  # the first load of this model
        text = parts[0] + " (" + ", ".join(details) + ")"
        status = self._status("loading", progress.fraction, progress.eta, label=progress.label)
        return "\n" + text, status, ("loading", progress.label, percent)

    def _tick(self) -> None:
        try:
            text, status, key = self._describe()
            now = self._clock.seconds()
            since = now - self._last_event_at
            percent = key[2] if key and key[0] == "loading" and len(key) > 2 and key[2] is not None else None
            changed = key[:2] != self._last_key[:2]
            progressed = percent is not None and percent - self._last_percent >= 5
            if changed or (progressed and since >= DOT_INTERVAL - TICK / 2):
                self._last_key = key
                if percent is not None:
                    self._last_percent = percent
                self._write(self.events.text(text, status))
            elif since >= DOT_INTERVAL - TICK / 2:
                self._write(self.events.idle(status))
        except Exception:
            log.failure("loading stream ticker for {model}", model=self._ticket.model_id)
            self.stop()

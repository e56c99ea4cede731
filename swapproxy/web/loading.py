# -*- test-case-name: tests.test_loading -*-
"""
The loading stream: a streaming request for a model that is not ready is answered at once with
a valid SSE stream that shows what is happening (queue, stopping another model, real load
progress), and then the model's own stream is spliced into the same response.

One writer at a time: the `LoadingStream` ticker writes until `LoadingStream.finish` stops it;
only then does the relay of the upstream body begin.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.defer import CancelledError
from twisted.internet.task import LoopingCall
from twisted.web.http_headers import Headers
from twisted.web.server import Request

from swapproxy.logs import proxy_logger
from swapproxy.metrics import relay_tap
from swapproxy.progress import LoadTracker
from swapproxy.supervisor import Rejected, Ticket
from swapproxy.upstream import StartError
from swapproxy.web.relay import BodyRelay, describe_error, is_event_stream, send_upstream
from swapproxy.web.render import ClientState
from swapproxy.web.sse import SSE_HEADERS, ChatEvents, MessagesEvents, MessagesSplice

log = proxy_logger("swapproxy.loading")

#: How often the ticker looks at the load; events go out only when something changed, or as
#: a dot once a second.
TICK = 0.25
DOT_INTERVAL = 1.0
#: The most of a non-stream upstream answer that is read to report it as an error event.
ERROR_BODY_LIMIT = 65536

Events = ChatEvents | MessagesEvents


def _seconds(value: float) -> str:
    return f"{value:.1f} s" if value < 100 else f"{value:.0f} s"


class LoadingStream:
    """
    Writes loading events for one request until its ticket is granted or fails.

    :param request: the client's request; nothing else writes to it until `finish`.
    :param clock: provides ``seconds()`` and ``callLater`` (the ticker runs on it).
    :param ticket: the request's place in the queue.
    :param tracker: the load tracker of the ticket's model.
    :param events: the SSE dialect.
    """

    def __init__(self, request: Request, clock: Any, ticket: Ticket, tracker: LoadTracker, events: Events) -> None:
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
        # The first tick must not repeat the line just sent.
        self._last_key = key
        if key[0] == "loading" and key[2] is not None:
            self._last_percent = key[2]
        self._write(self.events.opening() + self.events.text(text, status))
        self._loop.start(TICK, now=False)

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
            self.events.text(f"\nModel {model_id} is ready (waited {_seconds(waited)}).\n\n", status)
            + self.events.closing()
        )

    def finish_failed(self, error: Exception) -> None:
        """
        Stop the ticker, say why the model cannot be used, then an error event that ends the stream.
        """
        self.stop()
        model_id = self._ticket.model_id
        if isinstance(error, StartError):
            reason = error.reason + (f". Last output: {error.last_lines[-1]}" if error.last_lines else "")
            status_code = 502
        else:
            reason = str(error)
            status_code = getattr(error, "status", 503)
        self._write(self.events.text(f"\nModel {model_id} could not be started: {reason}\n", self._status("failed", None, None)))
        self._write(self.events.error(status_code, str(error)))

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
                # A dot in the text; Anthropic clients get their own keep-alive, a ping event.
                dot = self.events.field != "none" and not isinstance(self.events, MessagesEvents)
                self._write(self.events.text(".", status) if dot else self.events.keepalive())
        except Exception:
            log.failure("loading stream ticker for {model}", model=self._ticket.model_id)
            self.stop()


async def splice_upstream(
    loading: LoadingStream,
    upstream: Any,
    request: Request,
    client: ClientState,
    path: bytes,
    body: bytes,
    headers: Headers,
) -> None:
    """
    Send the request upstream and relay its event stream into the already-open response.

    A non-2xx answer, or one that is not an event stream, becomes one SSE error event that ends
    the stream: never raw bytes on an SSE stream.
    """
    events = loading.events
    model_id = upstream.model.id
    try:
        response = await send_upstream(upstream, request, path, body, headers)
    except CancelledError:
        raise
    except Exception as e:
        request.write(events.error(502, f"model {model_id!r} did not answer: {describe_error(e)}"))
        return
    if 200 <= response.code < 300 and is_event_stream(response.headers):
        splice = MessagesSplice() if isinstance(events, MessagesEvents) else None
        relay = BodyRelay(request, client, splice, tap=relay_tap(request))
        response.deliverBody(relay)
        reason = await relay.done
        if reason is not None and not client.gone:
            request.write(events.error(502, f"model {model_id!r} ended the stream early: {describe_error(reason)}"))
        return
    content = await _bounded_content(response)
    message = _error_message(content)
    if 200 <= response.code < 300:
        message = f"model {model_id!r} answered with {response.headers.getRawHeaders(b'content-type', [b'?'])[0].decode('latin-1')} instead of an event stream"
    else:
        message = f"model {model_id!r} answered HTTP {response.code}: {message}"
    request.write(events.error(response.code if response.code >= 400 else 502, message))


async def _bounded_content(response: Any) -> bytes:
    from treq import collect

    chunks: list[bytes] = []
    size = 0

    def keep(data: bytes) -> None:
        nonlocal size
        if size < ERROR_BODY_LIMIT:
            chunks.append(data[: ERROR_BODY_LIMIT - size])
            size += len(data)

    await collect(response, keep)
    return b"".join(chunks)


def _error_message(content: bytes) -> str:
    text = content.decode("utf-8", "replace").strip()
    try:
        payload = json.loads(text)
    except ValueError:
        return text[:500] or "(empty body)"
    if isinstance(payload, dict):
        error = payload.get("error")
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return error["message"]
        if isinstance(error, str):
            return error
    return text[:500]


async def serve_with_loading(
    request: Request,
    client: ClientState,
    clock: Any,
    ticket: Ticket,
    tracker: LoadTracker,
    events: Events,
    path: bytes,
    body: bytes,
    headers: Headers,
) -> None:
    """
    Answer with the loading stream until the ticket is granted, then splice the model's stream.
    """
    loading = LoadingStream(request, clock, ticket, tracker, events)
    loading.begin()
    try:
        lease = await ticket.wait()
    except (StartError, Rejected) as e:
        loading.finish_failed(e)
        return
    finally:
        loading.stop()
    try:
        loading.finish_ready()
        await splice_upstream(loading, lease.upstream, request, client, path, body, headers)
    finally:
        lease.release()

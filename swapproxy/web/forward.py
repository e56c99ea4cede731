# -*- test-case-name: tests.test_relay -*-
"""
The forward pipeline: the one path every request for a model takes, whatever its route.

    ticket -> loading head (if any) -> lease -> send -> relay -> release

* The *ticket* is the request's place in the supervisor's queue.
* The *loading head*: a streaming request on a route whose dialect has a loading stream, for a
  model that is not ready, is answered at once with the SSE head and loading events
  (`swapproxy.web.loading.LoadingStream`) until its ticket is granted.
* The *lease* is the ticket granted: the model is ready and counts this request in flight until
  the lease is released, which happens however the request ends.
* *Send* and *relay*: the request goes upstream, and the answer is relayed with flow control
  (`swapproxy.web.relay.BodyRelay`), through the dialect's splice after a loading head.

Errors: before any byte of the response, an OpenAI-style JSON error with its status. Once an
event stream has begun (the loading head, or the model's own event stream), the dialect's SSE
error event ends it. A body that is not an event stream and breaks off is cut, so the client
can tell it is incomplete.

A model that stops answering does not hold a request for ever: each request in flight is an
`swapproxy.stall.Exchange` of its upstream, failed with a 504 (or the error event) when the
model goes silent (``streamIdleTimeout``), is found unhealthy, or sends no head within
``timeouts.responseHeader``.

A request that finds its model's process gone before the request could be sent (it crashed a
moment ago and still looked ready) waits for the exit and goes round once more, which starts the
model again: with a loading head, the loading stream resumes and says so.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

from twisted.internet.defer import CancelledError
from twisted.internet.interfaces import IReactorTime
from twisted.web.http_headers import Headers
from twisted.web.server import Request

from swapproxy.config import ModelConfig
from swapproxy.logs import proxy_logger
from swapproxy.metrics import relay_tap, request_meter
from swapproxy.progress import LoadTracker
from swapproxy.stall import Exchange, Stalled
from swapproxy.supervisor import Rejected, ShuttingDown, Supervisor, Ticket
from swapproxy.upstream import StartError, Upstream
from swapproxy.web.errors import write_error
from swapproxy.web.loading import LoadingStream
from swapproxy.web.relay import (
    BodyRelay,
    UpstreamGone,
    copy_response_head,
    describe_error,
    forward_headers,
    is_event_stream,
    process_gone,
    send_upstream,
)
from swapproxy.web.render import ClientState
from swapproxy.web.sse import PlainEvents

log = proxy_logger("swapproxy.forward")

#: The most of a non-stream upstream answer that is read to report it as an error event.
ERROR_BODY_LIMIT = 65536


class Forward:
    """
    Forwards requests to models: the pipeline of this module, shared by every model route.

    :param supervisor: decides when each request may run.
    :param clock: drives the loading stream's ticker.
    :param trackers: each model's `LoadTracker`, for the loading stream.
    """

    def __init__(self, supervisor: Supervisor, clock: IReactorTime, trackers: Mapping[str, LoadTracker]) -> None:
        self.supervisor = supervisor
        self.clock = clock
        self.trackers = trackers

    async def __call__(
        self,
        request: Request,
        client: ClientState,
        model: ModelConfig,
        path: bytes,
        body: bytes | None,
        dialect: PlainEvents,
        stream: bool = False,
    ) -> None:
        """
        Forward ``request`` to ``model`` and relay the answer; the caller finishes the request.

        :param path: the path and query to request upstream, starting with ``/``.
        :param body: the request body to send (``None`` or empty for none).
        :param dialect: the route's SSE dialect, one object for this request.
        :param stream: whether the client asked for a stream (a loading head needs one).
        """
        loading = dialect.loading and stream and model.send_loading_state
        head: LoadingStream | None = None
        for attempt in (1, 2):
            try:
                ticket = self.supervisor.request(model.id, defer_start=loading and head is None)
            except Rejected as e:
                if e.status == 429 and head is None:
                    # Before the error is written: its write sends the headers.
                    request.setHeader(b"retry-after", b"1")
                _fail(request, head, dialect, e.status, str(e), e.error_type, e.code)
                return
            if head is not None:
                head.resume(ticket)
            elif loading and ticket.stage != "ready":
                head = LoadingStream(request, self.clock, ticket, self.trackers[model.id], dialect)  # type: ignore[arg-type]
                head.begin()
            try:
                lease = await _granted(ticket, head)
            except StartError as e:
                _not_started(request, head, dialect, e, 502, None, "model_start_failed")
                return
            except Rejected as e:
                _not_started(request, head, dialect, e, e.status, e.error_type, e.code)
                return
            try:
                if head is not None:
                    head.finish_ready()
                # After the loading head's first bytes: they need none of this.
                headers = forward_headers(request)
                await _exchange(
                    lease.upstream, request, client, path, body, headers, dialect, head, attempt == 1, stream
                )
                return
            except UpstreamGone:
                log.info("model {model} died before the request was sent; restarting it", model=model.id)
                await lease.upstream.stop()
            finally:
                lease.release()


async def _granted(ticket: Ticket, head: LoadingStream | None) -> Any:
    """
    The ticket's lease; the loading head's ticker stops however the wait ends.
    """
    try:
        return await ticket.wait()
    finally:
        if head is not None:
            head.stop()


def _not_started(
    request: Request,
    head: LoadingStream | None,
    dialect: PlainEvents,
    error: Exception,
    status: int,
    error_type: str | None,
    code: str | None,
) -> None:
    """
    The model could not be made ready for this request: say so, in the loading text if there
    is one, then as an error.
    """
    if head is not None:
        head.finish_failed(error)
    _fail(request, head, dialect, status, str(error), error_type, code)


def _fail(
    request: Request,
    head: LoadingStream | None,
    dialect: PlainEvents,
    status: int,
    message: str,
    error_type: str | None = None,
    code: str | None = None,
) -> None:
    """
    Answer an error: JSON before the head, the dialect's error event after it.
    """
    if head is None and not request.startedWriting:
        write_error(request, status, message, error_type, code)
    else:
        request.write(dialect.error(status, message, error_type, code))


async def _exchange(
    upstream: Upstream,
    request: Request,
    client: ClientState,
    path: bytes,
    body: bytes | None,
    headers: Headers,
    dialect: PlainEvents,
    head: LoadingStream | None,
    retry_if_gone: bool,
    stream: bool,
) -> None:
    """
    Send the request to ``upstream`` and relay its answer, as one exchange of its stall watch.

    :param head: the loading stream, if it has begun the response: then only a 2xx event
        stream is relayed (through the dialect's splice); any other answer becomes one error
        event.
    :param stream: whether the client asked for a stream (then the model's silence counts
        from the moment the request is sent).
    :raises UpstreamGone: with ``retry_if_gone``, when the request could not be sent because the
        upstream's process has died; nothing was written.
    """
    with upstream.exchanges.begin(stream) as exchange:
        model_id = upstream.model.id
        try:
            sending = send_upstream(upstream, request, path, body, headers)
            response = await exchange.send(sending, upstream.model.hang_limits.response_header_timeout)
        except Exception as e:
            # Cancelled by the exchange (the model stopped answering), or by the client leaving.
            if exchange.failure is not None:
                _count_timeout(request, exchange.failure)
                _fail(request, head, dialect, 504, str(exchange.failure))
                return
            if isinstance(e, CancelledError):
                raise
            if retry_if_gone and process_gone(upstream):
                raise UpstreamGone(str(e)) from e
            log.warn("model {model} did not answer: {error}", model=model_id, error=e)
            _fail(request, head, dialect, 502, f"model {model_id!r} did not answer: {describe_error(e)}")
            return
        await relay_answer(request, client, response, f"model {model_id!r}", dialect, head, exchange)


async def relay_answer(
    request: Request,
    client: ClientState,
    response: Any,
    source: str,
    dialect: PlainEvents,
    head: LoadingStream | None = None,
    exchange: Exchange | None = None,
    track: Callable[[BodyRelay], Callable[[], None]] | None = None,
) -> None:
    """
    Relay an answer (a local model's or a peer's) to the client, with flow control.

    A relay that is aborted with `ShuttingDown` (swapproxy stops) ends an event stream with the
    dialect's error event saying so.

    :param source: what answered, in words, for messages: ``model 'a'``.
    :param head: the loading stream, if it has begun the response: then only a 2xx event
        stream is relayed (through the dialect's splice); any other answer becomes one error
        event.
    :param exchange: the local model's exchange, which watches the relay for a stall.
    :param track: is told of the relay while it runs (it returns what forgets it), so that it
        can be ended at shutdown.
    """
    if head is None:
        streaming = copy_response_head(request, response)
        transform = None
    elif 200 <= response.code < 300 and is_event_stream(response.headers):
        streaming = True
        transform = dialect.splice()
    else:
        if exchange is not None:
            exchange.end()  # a short error answer, read in full
        await _refuse_answer(request, response, source, dialect)
        return
    relay = BodyRelay(request, client, transform, tap=relay_tap(request))
    if exchange is not None:
        exchange.relaying(relay)
    forget = track(relay) if track is not None else None
    try:
        response.deliverBody(relay)
        reason = await relay.done
    finally:
        if forget is not None:
            forget()
    if reason is None or client.gone:
        return
    if isinstance(reason, Stalled):
        _count_timeout(request, reason)
        status, message = 504, str(reason)
    elif isinstance(reason, ShuttingDown):
        status, message = reason.status, str(reason)
    else:
        log.warn("{source} ended its response early: {error}", source=source, error=describe_error(reason))
        status, message = 502, f"{source} ended the stream early: {describe_error(reason)}"
    if streaming:
        request.write(dialect.error(status, message))
    else:
        # No terminating chunk: the client must see that the body is incomplete.
        client.gone = True
        request.loseConnection()


def _count_timeout(request: Request, error: Stalled) -> None:
    """
    Count in the metrics that swapproxy gave up on the model's answer to ``request``.
    """
    meter = request_meter(request)
    if meter is not None:
        meter.timed_out(error.kind)


async def _refuse_answer(request: Request, response: Any, source: str, dialect: PlainEvents) -> None:
    """
    After a loading head, an answer that is not an event stream: one error event saying what
    the model answered, never its raw bytes.
    """
    content = await _bounded_content(response)
    if 200 <= response.code < 300:
        content_type = response.headers.getRawHeaders(b"content-type", [b"?"])[0].decode("latin-1")
        message = f"{source} answered with {content_type} instead of an event stream"
    else:
        message = f"{source} answered HTTP {response.code}: {_error_message(content)}"
    request.write(dialect.error(response.code if response.code >= 400 else 502, message))


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
        message = error.get("message") if isinstance(error, dict) else None
        if isinstance(message, str):
            return message
        if isinstance(error, str):
            return error
    return text[:500]

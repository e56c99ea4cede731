# -*- test-case-name: tests.test_events -*-
"""
The endpoints an operator watches swapproxy with: ``/logs``, ``/logs/stream...``, ``/metrics``,
``/api/metrics`` and ``/api/events``.

The log and event streams never end by themselves: each runs as an `render_async` handler that
waits until its client leaves, writing through a `LiveWriter` so that a slow reader costs a
bounded amount of memory and never holds anything up.
"""

from __future__ import annotations

import json
import math
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.web.resource import Resource
from twisted.web.server import Request

from swapproxy.board import ModelBoard
from swapproxy.logbuffer import LogHistory, LogStream
from swapproxy.metrics import Metrics
from swapproxy.peers import PeerSet
from swapproxy.store import ActivityStore
from swapproxy.supervisor import Supervisor
from swapproxy.web.api import JSONResource, write_json
from swapproxy.web.errors import NotFound, error_response
from swapproxy.web.live import LiveWriter, dropped_event_marker, dropped_log_marker
from swapproxy.web.render import ClientState, render_async, rest_of_path
from swapproxy.web.sse import SSE_HEADERS, comment

#: Seconds between the ``: ping`` comments of ``/api/events``.
HEARTBEAT = 15.0

_TEXT_STREAM_HEADERS = (
    (b"content-type", b"text/plain; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-content-type-options", b"nosniff"),
    (b"x-accel-buffering", b"no"),
)


def query_has(request: Request, name: bytes) -> bool:
    """
    Whether the query names ``name``, with any value or none (``?no-history``), which
    ``request.args`` leaves out when there is no ``=``.
    """
    query = request.uri.partition(b"?")[2]
    return any(part.partition(b"=")[0] == name for part in query.split(b"&"))


async def _until_client_leaves() -> None:
    # render_async cancels this when the client hangs up.
    await Deferred()


class LogPage(JSONResource):
    """
    ``GET /logs``: the combined log history (proxy messages and model output) as plain text.
    """

    def __init__(self, logs: LogHistory) -> None:
        super().__init__()
        self._logs = logs

    def getChild(self, path: bytes, request: Request) -> Resource:
        if path == b"":
            return self
        return NotFound()

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        request.setHeader(b"cache-control", b"no-cache")
        request.setHeader(b"x-content-type-options", b"nosniff")
        return self._logs.combined.history()


class LogFollow(JSONResource):
    """
    ``GET /logs/stream`` (combined), ``/logs/stream/proxy``, ``/logs/stream/upstream`` and
    ``/logs/stream/<model>``: the history, then every new line until the client leaves.

    ``?no-history`` (any value) skips the history. A model may be named by id or alias.
    """

    isLeaf = True

    def __init__(self, supervisor: Supervisor, logs: LogHistory) -> None:
        super().__init__()
        self._supervisor = supervisor
        self._logs = logs

    def _stream(self, name: str) -> LogStream | None:
        if name == "":
            return self._logs.combined
        if name in ("proxy", "upstream"):
            return self._logs.stream(name)
        model = self._supervisor.config.resolve(name)
        return self._logs.model(model.id) if model is not None else None

    def render_GET(self, request: Request) -> bytes | int:
        name = rest_of_path(request)
        stream = self._stream(name)
        if stream is None:
            return error_response(
                request,
                404,
                f"no log stream {name!r}: use /logs/stream, /logs/stream/proxy, /logs/stream/upstream "
                "or /logs/stream/<model> (see GET /v1/models)",
            )
        history = not query_has(request, b"no-history")
        return render_async(request, lambda client: self._follow(request, client, stream, history))

    async def _follow(self, request: Request, client: ClientState, stream: LogStream, history: bool) -> None:
        for name, value in _TEXT_STREAM_HEADERS:
            request.setHeader(name, value)
        request.write(b"")  # the head goes out now, before any line
        writer = LiveWriter(request, dropped_log_marker)
        if history:
            writer.write(stream.history())
        unsubscribe = stream.subscribe(writer.write)
        try:
            await _until_client_leaves()
        finally:
            unsubscribe()
            writer.close(client.gone)


class MetricsPage(Resource):
    """
    ``GET /metrics``: the Prometheus text exposition of ``registry``.

    Synchronous on purpose: rendering the registry is quick and needs no thread.
    """

    isLeaf = True

    def __init__(self, metrics: Metrics) -> None:
        super().__init__()
        self._metrics = metrics

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode("ascii"))
        return bytes(generate_latest(self._metrics.registry))


class TokenMetrics(JSONResource):
    """
    ``GET /api/metrics``: the recent per-request token metrics as a JSON array, oldest first, as
    llama-swap returns them (at most ``metricsMaxInMemory``).
    """

    isLeaf = True

    def __init__(self, metrics: Metrics) -> None:
        super().__init__()
        self._metrics = metrics

    def render_GET(self, request: Request) -> bytes:
        return write_json(request, list(self._metrics.records))


def event_message(kind: str, data: Any) -> bytes:
    """
    One ``/api/events`` message, framed as llama-swap frames them: an SSE ``message`` event whose
    data is ``{"type": kind, "data": <data as a JSON string>}``.
    """
    envelope = {"type": kind, "data": json.dumps(data, separators=(",", ":"))}
    return b"event: message\ndata: " + json.dumps(envelope, separators=(",", ":")).encode("utf-8") + b"\n\n"


class EventStream(JSONResource):
    """
    ``GET /api/events``: an SSE stream for dashboards, in llama-swap's framing.

    It opens with a ``modelStatus`` snapshot of every model (`ModelBoard.entry`: state, progress,
    requests, TTL, last load and failure) and a ``metrics`` message with the recent token
    metrics, then sends ``modelStatus`` on every state change, ``model`` (one entry) when
    anything else of a model changes (load progress among it), ``request`` when a model request
    ends, ``metrics`` for each new token-metric record, and a ``: ping`` comment every 15 s.
    With ``peers`` configured, ``peers`` (`swapproxy.peers.PeerSet.entries`: each peer model's
    state and load progress, and its peer's reachability) at once and each time it changes; a
    dashboard watching makes swapproxy ask the peers for their models now and then.

    ``?logs`` adds the log histories and then each new log text as ``logData``
    (``{"source": "proxy" | "upstream", "data": text}``); ``?logs=models`` does so for the proxy
    log and each model's own log instead (``{"source": "model", "model": id, "data": text}``).
    ``?activity`` adds the recent requests (`swapproxy.store.activity_row`, oldest first) as one
    ``activity`` message, then each new one as an ``activity`` message of one row.
    """

    isLeaf = True

    def __init__(
        self,
        metrics: Metrics,
        logs: LogHistory,
        clock: IReactorTime,
        board: ModelBoard,
        activity: ActivityStore,
        supervisor: Supervisor,
        peers: PeerSet | None = None,
    ) -> None:
        super().__init__()
        self._peers = peers
        self._metrics = metrics
        self._logs = logs
        self._clock = clock
        self._board = board
        self._activity = activity
        self._supervisor = supervisor

    def render_GET(self, request: Request) -> bytes | int:
        logs = request.args.get(b"logs", [b""])[0] if query_has(request, b"logs") else None
        if logs not in (None, b"", b"models"):
            return error_response(request, 400, "logs: use ?logs (proxy and upstream) or ?logs=models")
        with_activity = query_has(request, b"activity")
        return render_async(request, lambda client: self._events(request, client, logs, with_activity))

    def _log_sources(self, logs: bytes) -> list[tuple[dict[str, str], LogStream]]:
        if logs == b"models":
            sources = [({"source": "proxy"}, self._logs.proxy)]
            for model_id in sorted(self._supervisor.upstreams):
                sources.append(({"source": "model", "model": model_id}, self._logs.model(model_id)))
            return sources
        return [({"source": "proxy"}, self._logs.proxy), ({"source": "upstream"}, self._logs.upstream)]

    async def _events(self, request: Request, client: ClientState, logs: bytes | None, with_activity: bool) -> None:
        if with_activity:
            # Just after a start, the history is still being read from the database.
            await self._activity.flush()
        request.setResponseCode(200)
        request.defaultContentType = None
        for name, value in SSE_HEADERS:
            request.setHeader(name, value)
        request.setHeader(b"x-content-type-options", b"nosniff")
        writer = LiveWriter(request, dropped_event_marker)

        def send(kind: str, data: Any) -> None:
            writer.write(event_message(kind, data))

        send("modelStatus", self._board.entries())
        send("metrics", list(self._metrics.records))
        unsubscribes = [self._board.subscribe(send), self._metrics.subscribe(send)]
        if self._peers is not None:
            peers = self._peers.entries()
            if peers:
                send("peers", peers)
            unsubscribes.append(self._peers.subscribe(send))
        if with_activity:
            send("activity", list(self._activity.recent))
            unsubscribes.append(self._activity.subscribe(lambda row: send("activity", [row])))
        for fields, stream in self._log_sources(logs) if logs is not None else []:

            def send_log(data: bytes, fields: dict[str, str] = fields) -> None:
                send("logData", {**fields, "data": data.decode("utf-8", "replace")})

            history = stream.history()
            if history:
                send_log(history)
            unsubscribes.append(stream.subscribe(send_log))
        heartbeat = LoopingCall(writer.write, comment("ping"))
        heartbeat.clock = self._clock
        heartbeat.start(HEARTBEAT, now=False)
        try:
            await _until_client_leaves()
        finally:
            heartbeat.stop()
            for unsubscribe in unsubscribes:
                unsubscribe()
            writer.close(client.gone)


class ActivityPage(JSONResource):
    """
    ``GET /api/activity``: the model requests swapproxy answered, newest first, from the activity
    history (`swapproxy.store`): ``{"data": [rows]}``.

    ``?limit=N`` (1 to 1000, default 100), ``?before=T`` (only requests that ended before Unix
    time ``T``, to page back), ``?model=ID``.
    """

    isLeaf = True

    def __init__(self, activity: ActivityStore) -> None:
        super().__init__()
        self._activity = activity

    def render_GET(self, request: Request) -> bytes | int:
        def argument(name: bytes) -> str | None:
            values = request.args.get(name)
            return values[0].decode("utf-8", "replace") if values else None

        try:
            limit = int(argument(b"limit") or 100)
        except ValueError:
            return error_response(request, 400, f"limit must be an integer, got {argument(b'limit')!r}")
        before = argument(b"before")
        before_time = None
        if before is not None:
            try:
                before_time = float(before)
            except ValueError:
                before_time = math.nan
            if not math.isfinite(before_time):
                return error_response(request, 400, f"before must be a Unix time in seconds, got {before!r}")
        if not 1 <= limit <= 1000:
            return error_response(request, 400, f"limit must be between 1 and 1000, got {limit}")
        model = argument(b"model")
        return render_async(request, lambda client: self._answer(request, limit, before_time, model))

    async def _answer(self, request: Request, limit: int, before: float | None, model: str | None) -> None:
        rows = await self._activity.older(limit, before, model)
        request.write(write_json(request, {"data": rows}))

# -*- test-case-name: tests.test_web -*-
"""
swapproxy's own endpoints: ``/v1/models``, ``/health``, ``/running``, loading and unloading.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import unquote, urlsplit

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure
from twisted.web.error import UnsupportedMethod
from twisted.web.resource import Resource
from twisted.web.server import Request

from swapproxy.board import ModelBoard
from swapproxy.logs import proxy_logger
from swapproxy.peers import PeerSet
from swapproxy.supervisor import Lease, Rejected, Supervisor
from swapproxy.targets import ActiveProfile
from swapproxy.upstream import StartError, State
from swapproxy.web.errors import error_response
from swapproxy.web.listing import alias_records, peer_records, profile_records, selector_records, with_capabilities
from swapproxy.web.render import ClientState, path_segments, render_async, rest_of_path


log = proxy_logger("swapproxy.web")


def write_json(request: Request, payload: Any, status: int = 200) -> bytes:
    """
    Set the status and JSON headers; return the encoded body for ``render_*`` to return.

    The answer is live state, possibly behind an API key: no cache keeps it.
    """
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"cache-control", b"no-store")
    return json.dumps(payload).encode("utf-8")


def _method_not_allowed(request: Request, allowed: bytes) -> bytes:
    request.setHeader(b"allow", allowed)
    return error_response(request, 405, f"{request.method.decode('ascii', 'replace')} is not allowed here")


class JSONResource(Resource):
    """
    A Resource that answers a method it lacks with a JSON 405 and ``Allow``, not an HTML page.
    """

    def render(self, request: Request) -> Any:
        try:
            return super().render(request)
        except UnsupportedMethod as e:
            return _method_not_allowed(request, b", ".join(e.allowedMethods))


def _model_status(board: ModelBoard, model_id: str) -> dict[str, Any]:
    status: dict[str, Any] = {
        "value": "unloaded" if board.status(model_id) in ("stopped", "queued", "failed") else "loaded",
        "state": board.status(model_id),
    }
    progress = board.progress(model_id)
    if progress is not None:
        status["progress"] = progress
    return status


class ModelList(JSONResource):
    """
    ``GET /v1/models``: the OpenAI model list, with llama-swap's name, description and metadata,
    and each model's ``status``: ``value`` (``loaded`` or ``unloaded``, as llama-swap says),
    ``state`` (the word of `ModelBoard.status`) and, while it loads, ``progress``; capabilities,
    and the records of aliases, peer models (with their live state), selectors and the active
    profile's pins (`swapproxy.web.listing`).

    ``GET /v1/models/<id>`` (``id`` may contain ``/``, as a peer model's does) answers the one
    record of that id, as OpenAI's retrieve call does, or a 404 ``model_not_found``.

    :param board: each local model's live state.
    :param peers: the peers; their state is refreshed, if stale, before the list is made.
    :param profile: the active profile.
    """

    isLeaf = True

    def __init__(self, supervisor: Supervisor, reactor: IReactorTime, board: ModelBoard, peers: PeerSet | None = None,
                 profile: ActiveProfile | None = None) -> None:
        super().__init__()
        self._supervisor = supervisor
        self._reactor = reactor
        self._board = board
        self._peers = peers
        self._profile = profile

    def render_GET(self, request: Request) -> int:
        return render_async(request, lambda client: self._list(request))

    async def _list(self, request: Request) -> None:
        wanted = unquote("/".join(s.decode("utf-8", "replace") for s in path_segments(request.postpath)))
        config = self._supervisor.config
        if self._peers is not None and config.peers:
            await self._peers.refresh()
        created = int(self._reactor.seconds())
        data = self._local_records(created)
        data += alias_records(config, data)
        states = {mid: upstream.state for mid, upstream in self._supervisor.upstreams.items()}
        data += peer_records(config, self._peers.health if self._peers is not None else {}, created)
        data += selector_records(config, states, created)
        if self._profile is not None:
            taken = set(config.models) | set(config.aliases) | set(config.peer_routes) | set(config.selectors)
            data += profile_records(config, self._profile.pins(), taken, created)
        data.sort(key=lambda record: record["id"])
        if wanted:
            record = next((r for r in data if r["id"] == wanted), None)
            if record is None:
                body = error_response(request, 404, f"model {wanted!r} not found; see GET /v1/models",
                                      code="model_not_found")
            else:
                body = write_json(request, record)
        else:
            body = write_json(request, {"object": "list", "data": data})
        # One answer of known length, as the synchronous routes give, not a chunked one.
        request.setHeader(b"content-length", b"%d" % len(body))
        request.write(body)

    def _local_records(self, created: int) -> list[dict[str, Any]]:
        data = []
        for model_id, model in sorted(self._supervisor.config.models.items()):
            if model.unlisted:
                continue
            record: dict[str, Any] = {
                "id": model_id,
                "object": "model",
                "created": created,
                "owned_by": "swapproxy",
                "state": self._supervisor.upstreams[model_id].state.value,
                "status": _model_status(self._board, model_id),
            }
            if model.name.strip():
                record["name"] = model.name.strip()
            if model.description.strip():
                record["description"] = model.description.strip()
            if model.metadata:
                record["meta"] = {"llamaswap": model.metadata}
            if model.aliases:
                record["aliases"] = list(model.aliases)
            data.append(with_capabilities(record, model.capabilities))
        return data


class Health(JSONResource):
    """
    ``GET /health``: 200 ``OK`` while swapproxy serves.
    """

    isLeaf = True

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return b"OK"


class Running(JSONResource):
    """
    ``GET /running``: each model that has a process: its state, ``status`` (`ModelBoard.status`),
    pid, port, uptime, in-flight and queued requests, while it loads its ``progress``, its memory
    in bytes (``declared`` and ``measured``, ``null`` when unknown), and while it is idle with a
    TTL, how long it has been idle (``idle``) and how long until the TTL unloads it
    (``ttl_remaining``); both are ``null`` otherwise. A process that a config reload replaced or
    removed is listed with ``"replaced": true`` until it ends.
    """

    isLeaf = True

    def __init__(self, supervisor: Supervisor, reactor: IReactorTime, board: ModelBoard) -> None:
        super().__init__()
        self._supervisor = supervisor
        self._reactor = reactor
        self._board = board

    def render_GET(self, request: Request) -> bytes:
        now = self._reactor.seconds()
        running = []
        for upstream in self._supervisor.running_upstreams():
            model = upstream.model
            entry: dict[str, Any] = {
                "model": model.id,
                "state": upstream.state.value,
                "status": self._board.status(model.id),
                "pid": upstream.pid,
                "port": model.port if model.port is not None else urlsplit(model.proxy).port,
                "proxy": model.proxy,
                "ttl": model.ttl,
                "in_flight": self._supervisor.in_flight[model.id],
                "queued": self._supervisor.queued(model.id, requests_only=True),
                "memory": self._supervisor.memory_of(model.id),
            }
            if upstream.started_at is not None:
                entry["uptime"] = round(now - upstream.started_at, 3)
            progress = self._board.progress(model.id)
            if progress is not None:
                entry["progress"] = progress
            if upstream.unhealthy_reason is not None:
                entry["unhealthy"] = upstream.unhealthy_reason
            due = self._supervisor.unload_due(model.id)
            entry["ttl_remaining"] = None if due is None else round(max(0.0, due - now), 3)
            entry["idle"] = None if due is None else round(max(0.0, model.ttl - (due - now)), 3)
            if model.name:
                entry["name"] = model.name
            for name, report in upstream.reports.items():
                reported = report()
                if reported is not None:
                    entry[name] = reported
            running.append(entry)
        for upstream in self._supervisor.retiring_upstreams():
            # A process a reload replaced or removed, finishing its requests in flight.
            running.append(
                {
                    "model": upstream.model.id,
                    "state": upstream.state.value,
                    "pid": upstream.pid,
                    "proxy": upstream.model.proxy,
                    "replaced": True,
                }
            )
        return write_json(request, {"running": running})


class UnloadAll(JSONResource):
    """
    ``GET /unload``: stop every model now (requests in flight on them are cut); ``OK``.
    """

    isLeaf = True

    def __init__(self, supervisor: Supervisor) -> None:
        super().__init__()
        self._supervisor = supervisor

    def render_GET(self, request: Request) -> int:
        return render_async(request, lambda client: self._unload(request, client))

    render_POST = render_GET

    async def _unload(self, request: Request, client: ClientState) -> None:
        await self._supervisor.unload()
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        request.write(b"OK")


class ApiUnload(Resource):
    """
    ``POST /api/models/unload`` (every model) and ``POST /api/models/unload/<model>``.
    """

    isLeaf = True

    def __init__(self, supervisor: Supervisor) -> None:
        super().__init__()
        self._supervisor = supervisor

    def render(self, request: Request) -> bytes | int:
        if request.method != b"POST":
            return _method_not_allowed(request, b"POST")
        name = rest_of_path(request)
        model_id = None
        if name:
            model = self._supervisor.config.resolve(name)
            if model is None:
                return error_response(request, 404, f"model {name!r} not found")
            model_id = model.id
        return render_async(request, lambda client: self._unload(request, model_id))

    async def _unload(self, request: Request, model_id: str | None) -> None:
        await self._supervisor.unload(model_id)
        request.setHeader(b"content-type", b"application/json")
        request.write(json.dumps({"msg": "ok", "unloaded": model_id or "all"}).encode("utf-8"))


class ApiLoad(Resource):
    """
    ``POST /api/models/load/<model>``: load a model now, as a request for it would (it waits its
    turn, stops what its group says must stop, and then stays loaded until its TTL or an unload).

    Answers at once: ``200 {"msg": "ok", "state": "ready"}`` when the model is ready already,
    else ``202 {"msg": "loading", ...}``; how the load goes is on ``/api/events`` and ``/running``.
    """

    isLeaf = True

    def __init__(self, supervisor: Supervisor) -> None:
        super().__init__()
        self._supervisor = supervisor
        self._loads: set[Deferred[Lease]] = set()

    def render(self, request: Request) -> bytes:
        if request.method != b"POST":
            return _method_not_allowed(request, b"POST")
        name = rest_of_path(request)
        if not name:
            return error_response(request, 400, "name the model to load: POST /api/models/load/<model>")
        model = self._supervisor.config.resolve(name)
        if model is None:
            return error_response(request, 404, f"model {name!r} not found; see GET /v1/models")
        if self._supervisor.upstreams[model.id].state is State.READY:
            return write_json(request, {"msg": "ok", "model": model.id, "state": "ready"})
        try:
            ticket = self._supervisor.request(model.id, load_only=True)
        except Rejected as e:
            return error_response(request, e.status, str(e), e.error_type, e.code)
        # Not tied to this request: the load goes on when the client has its answer.
        load = ticket.wait()
        self._loads.add(load)
        load.addCallbacks(self._loaded, self._failed, errbackArgs=(model.id,))
        load.addBoth(lambda _: self._loads.discard(load))
        return write_json(request, {"msg": "loading", "model": model.id, "state": ticket.stage}, 202)

    @staticmethod
    def _loaded(lease: Lease) -> None:
        lease.release()

    @staticmethod
    def _failed(failure: Failure, model_id: str) -> None:
        if failure.check(CancelledError):
            return
        if failure.check(StartError):
            return  # logged where it happened, and shown on the board
        if failure.check(Rejected):
            log.info("loading model {model} was refused: {error}", model=model_id, error=failure.getErrorMessage())
            return
        log.failure("while loading model {model}", failure, model=model_id)

# -*- test-case-name: tests.test_web -*-
"""
swapproxy's own endpoints: ``/v1/models``, ``/health``, ``/running`` and unloading.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import unquote, urlsplit

from twisted.web.error import UnsupportedMethod
from twisted.web.resource import Resource
from twisted.web.server import Request

from swapproxy.supervisor import Supervisor
from swapproxy.web.errors import error_response
from swapproxy.web.render import ClientState, render_async


def write_json(request: Request, payload: Any, status: int = 200) -> bytes:
    """
    Set the status and JSON headers; return the encoded body for ``render_*`` to return.
    """
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
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


class ModelList(JSONResource):
    """
    ``GET /v1/models``: the OpenAI model list, with llama-swap's name, description and metadata.
    """

    isLeaf = True

    def __init__(self, supervisor: Supervisor, reactor: Any) -> None:
        super().__init__()
        self._supervisor = supervisor
        self._reactor = reactor

    def render_GET(self, request: Request) -> bytes:
        created = int(self._reactor.seconds())
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
            }
            if model.name.strip():
                record["name"] = model.name.strip()
            if model.description.strip():
                record["description"] = model.description.strip()
            if model.metadata:
                record["meta"] = {"llamaswap": model.metadata}
            if model.aliases:
                record["aliases"] = list(model.aliases)
            data.append(record)
        origin = request.getHeader(b"origin")
        if origin:
            request.setHeader(b"access-control-allow-origin", origin)
        return write_json(request, {"object": "list", "data": data})


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
    ``GET /running``: each model that has a process: its state, pid, port, uptime, in-flight and
    queued requests, its memory in bytes (``declared`` and ``measured``, ``null`` when unknown), and while it is idle with a TTL, how long it has been idle (``idle``) and
    how long until the TTL unloads it (``ttl_remaining``); both are ``null`` otherwise. A process
    that a config reload replaced or removed is listed with ``"replaced": true`` until it ends.
    """

    isLeaf = True

    def __init__(self, supervisor: Supervisor, reactor: Any) -> None:
        super().__init__()
        self._supervisor = supervisor
        self._reactor = reactor

    def render_GET(self, request: Request) -> bytes:
        now = self._reactor.seconds()
        running = []
        for upstream in self._supervisor.running_upstreams():
            model = upstream.model
            entry: dict[str, Any] = {
                "model": model.id,
                "state": upstream.state.value,
                "pid": upstream.pid,
                "port": model.port if model.port is not None else urlsplit(model.proxy).port,
                "proxy": model.proxy,
                "ttl": model.ttl,
                "in_flight": self._supervisor.in_flight[model.id],
                "queued": self._supervisor.queued(model.id),
                "memory": self._supervisor.memory_of(model.id),
            }
            if upstream.started_at is not None:
                entry["uptime"] = round(now - upstream.started_at, 3)
            due = self._supervisor.unload_due(model.id)
            entry["ttl_remaining"] = None if due is None else round(max(0.0, due - now), 3)
            entry["idle"] = None if due is None else round(max(0.0, model.ttl - (due - now)), 3)
            if model.name:
                entry["name"] = model.name
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
        name = unquote("/".join(s.decode("utf-8", "replace") for s in request.postpath)).strip("/")
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

# -*- test-case-name: tests.test_router_api -*-
"""
llama.cpp's router-mode API, served with swapproxy's models: ``GET /models``,
``POST /models/load``, ``POST /models/unload``, ``GET /models/sse`` and the router's ``/props``.

Clients build model pickers and progress bars on this API (llama.cpp's web UI, Open WebUI,
pocketpal, agent plugins). The shapes are those of llama.cpp's ``tools/server/README.md`` and its
``server-models.cpp``:

* a model's ``status`` is ``{"value": "unloaded" | "loading" | "loaded", "args": [...]}``; a
  model whose last start failed is ``"unloaded"`` with ``"failed": true`` and its ``exit_code``;
  while it loads, ``progress`` is ``{"stages": ["text_model"], "current": "text_model", "value":
  0..1}``, the fraction the dashboard and the loading stream show (`swapproxy.board.ModelBoard`);
* each ``/models/sse`` event is one ``data:`` line of ``{"model", "event", "data"}``:
  ``model_status`` ``{"status": "loading"}`` when a start begins, ``status_change`` with
  ``{"status": "loading", "progress": ...}`` as the load moves, ``{"status": "loaded", "info":
  ...}`` when it is ready, and ``{"status": "unloaded", "exit_code": N}`` when it ends (N is not
  0 when the start failed);
* errors are llama.cpp's ``{"error": {"code": <status>, "message", "type"}}``.

``POST /models/load`` answers at once, as the router does, and the load goes on (watch
``/models/sse``); it goes through the supervisor's queue like any request, so it swaps other
models out as a request would. ``POST /models/unload`` answers once the model has stopped.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import Request

from swapproxy import __version__
from swapproxy.board import ModelBoard
from swapproxy.config import ModelConfig
from swapproxy.logs import proxy_logger
from swapproxy.peers import PeerSet
from swapproxy.subscribers import Subscribers
from swapproxy.supervisor import Rejected, Supervisor
from swapproxy.upstream import StartError, State
from swapproxy.web.api import JSONResource
from swapproxy.web.errors import NotFound
from swapproxy.web.live import LiveWriter, dropped_event_marker
from swapproxy.web.render import ClientState, render_async, request_body
from swapproxy.web.sse import SSE_HEADERS, comment

log = proxy_logger("swapproxy.router_api")

#: Seconds between the ``: ping`` comments of ``/models/sse``, which keep proxies from closing it.
HEARTBEAT = 15.0

_VALUES = {
    State.STOPPED: "unloaded",
    State.FAILED: "unloaded",
    State.STARTING: "loading",
    State.READY: "loaded",
    State.STOPPING: "loaded",  # the router too says "loaded" until the process has exited
    State.UNHEALTHY: "loaded",  # found hung and being stopped: "loaded" until its process has gone
}
_STAGES = ["text_model"]
#: The board states in which a model is ``unloaded``.
_DOWN = frozenset({State.STOPPED.value, State.FAILED.value})
#: The router's value of a peer model, by the peer's word for it (``unloaded`` for any other).
_PEER_VALUES = {"ready": "loaded", "loaded": "loaded", "stopping": "loaded", "unhealthy": "loaded",
                "starting": "loading", "loading": "loading"}


def llama_error(request: Request, status: int, message: str, error_type: str = "invalid_request_error") -> bytes:
    """
    Set ``request``'s status; return llama.cpp's error body.
    """
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json; charset=utf-8")
    return _json({"error": {"code": status, "message": message, "type": error_type}})


def _json(payload: Any) -> bytes:
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def _exit_code(entry: Mapping[str, Any]) -> int:
    """
    The router's ``exit_code`` of a model's board entry: 0 for a model that stopped, never 0 for
    one whose start failed (even if its process exited with 0, or was killed), since clients
    tell the two apart by it.
    """
    if entry["state"] != State.FAILED.value:
        return 0
    failure = entry["last_failure"]
    return (failure or {}).get("exit_code") or 1


def _progress(entry: Mapping[str, Any]) -> dict[str, Any]:
    """
    A loading model's ``progress``, as the router reports it: the board's fraction.
    """
    fraction = (entry["progress"] or {}).get("fraction")
    return {"stages": _STAGES, "current": _STAGES[0], "value": round(fraction or 0.0, 3)}


@attrs.define
class _Shown:
    """
    What ``/models/sse`` readers were last told of one model.

    :ivar state: the state of the model's board entry (a `State` value).
    :ivar progress: the load progress last sent, while it loads.
    """

    state: str
    progress: float | None = None


class RouterStatus:
    """
    Every listed model's status in the router's terms, and the ``/models/sse`` events of its
    changes: a view of the `ModelBoard`, which owns each model's state and load progress and
    says when they change.

    The peers' models are listed too, as ``<peer>/<model>``, with the state their peer reported
    (`swapproxy.peers.PeerSet.entries`) and a ``peer`` object (``id``, ``reachable``); they are
    the peers' to load and unload.

    :param board: every model's live state; followed while someone reads ``/models/sse``.
    :param supervisor: whose configuration gives each model's command (the ``args``).
    :param clock: provides ``seconds()``.
    :param peers: the peers, whose models are listed.
    """

    def __init__(self, board: ModelBoard, supervisor: Supervisor, clock: IReactorTime,
                 peers: PeerSet | None = None) -> None:
        self._board = board
        self._supervisor = supervisor
        self._clock = clock
        self._peers = peers
        self._subscribers = Subscribers("/models/sse")
        self._unsubscribe: Callable[[], None] | None = None
        self._shown: dict[str, _Shown] = {}

    # -- the status of GET /models ------------------------------------------------------------

    def status(self, entry: Mapping[str, Any]) -> dict[str, Any]:
        """
        The ``status`` object of one model (its board entry) in ``GET /models``.
        """
        upstream = self._supervisor.upstreams[entry["id"]]
        status: dict[str, Any] = {"value": _VALUES[State(entry["state"])], "args": list(upstream.model.cmd)}
        if entry["state"] == State.STARTING.value:
            status["progress"] = _progress(entry)
        elif entry["state"] == State.FAILED.value:
            status["failed"] = True
            status["exit_code"] = _exit_code(entry)
        return status

    def listing(self, created: int) -> dict[str, Any]:
        """
        The body of ``GET /models``: every listed model, in id order.
        """
        data = []
        for entry in self._board.entries():
            if entry["unlisted"]:
                continue
            record: dict[str, Any] = {
                "id": entry["id"],
                "aliases": entry["aliases"],
                "tags": [],
                "object": "model",
                "owned_by": "swapproxy",
                "created": created,
                "status": self.status(entry),
                "architecture": {"input_modalities": ["text"], "output_modalities": ["text"]},
                "source": "preset",
                "can_remove": False,
            }
            if entry["name"].strip():
                record["name"] = entry["name"].strip()
            if entry["description"].strip():
                record["description"] = entry["description"].strip()
            data.append(record)
        for entry in self._peers.entries() if self._peers is not None else []:
            status: dict[str, Any] = {"value": _PEER_VALUES.get(entry["status"], "unloaded"), "args": []}
            if status["value"] == "loading":
                status["progress"] = _progress(entry)
            data.append({
                "id": entry["id"], "aliases": [], "tags": [], "object": "model", "owned_by": entry["peer"],
                "created": created, "status": status,
                "architecture": {"input_modalities": ["text"], "output_modalities": ["text"]},
                "source": "preset", "can_remove": False, "name": f"{entry['peer']}: {entry['model']}",
                "peer": {"id": entry["peer"], "reachable": entry["reachable"]},
            })
        data.sort(key=lambda record: record["id"])
        return {"data": data, "object": "list"}

    async def refresh(self) -> None:
        """
        Learn the peers' models' states, if what is known of them is stale (`PeerSet.refresh`).
        """
        if self._peers is not None and self._supervisor.config.peers:
            await self._peers.refresh()

    # -- events -------------------------------------------------------------------------------

    def subscribe(self, send: Callable[[bytes], None]) -> Callable[[], None]:
        """
        Call ``send`` with each event, framed (``data: {...}\\n\\n``), until the returned function
        is called. The board is followed while anyone is subscribed.
        """
        if not self._subscribers:
            self._shown = {entry["id"]: _Shown(entry["state"]) for entry in self._board.entries()
                           if not entry["unlisted"]}
            self._unsubscribe = self._board.subscribe(self._board_changed)
        remove = self._subscribers.add(send)

        def unsubscribe() -> None:
            remove()
            if not self._subscribers and self._unsubscribe is not None:
                self._unsubscribe()
                self._unsubscribe = None

        return unsubscribe

    def _publish(self, model_id: str, event: str, data: dict[str, Any]) -> None:
        self._subscribers.publish(b"data: " + _json({"model": model_id, "event": event, "data": data}) + b"\n\n")

    def _board_changed(self, kind: str, payload: Any) -> None:
        if kind == "model":
            self._follow(payload)
            return
        listed = {entry["id"]: entry for entry in payload if not entry["unlisted"]}
        for model_id in [m for m in self._shown if m not in listed]:
            # A reload removed the model (or made it unlisted): it is unloaded as far as a router
            # client can tell, as GET /models says.
            if self._shown.pop(model_id).state not in _DOWN:
                self._publish(model_id, "status_change", {"status": "unloaded", "exit_code": 0})
        for entry in listed.values():
            self._follow(entry)

    def _follow(self, entry: Mapping[str, Any]) -> None:
        """
        Tell of what changed in one model's board entry: a start, its progress, ready, stopped.
        """
        if entry["unlisted"]:
            return
        model_id, state = entry["id"], entry["state"]
        shown = self._shown.setdefault(model_id, _Shown(State.STOPPED.value))
        before, shown.state = shown.state, state
        if state == State.STARTING.value:
            if before != state:
                shown.progress = None
                self._publish(model_id, "model_status", {"status": "loading"})
            progress = _progress(entry)
            # Sent when it moved by a percent or more.
            if shown.progress is None or abs(progress["value"] - shown.progress) >= 0.01:
                shown.progress = progress["value"]
                self._publish(model_id, "status_change", {"status": "loading", "progress": progress})
        elif state == State.READY.value and before == State.STARTING.value:
            self._publish(model_id, "status_change",
                          {"status": "loading", "progress": {"stages": _STAGES, "current": _STAGES[0], "value": 1.0}})
            info = {"id": model_id, "aliases": entry["aliases"], "tags": [], "object": "model",
                    "created": int(self._clock.seconds()), "owned_by": "swapproxy"}
            self._publish(model_id, "status_change", {"status": "loaded", "info": info})
        elif state in _DOWN and before not in _DOWN:
            self._publish(model_id, "status_change", {"status": "unloaded", "exit_code": _exit_code(entry)})


def _model_named(request: Request, supervisor: Supervisor) -> tuple[str, ModelConfig | None]:
    """
    The ``model`` of a JSON request body, and the model it names (``None`` when it names none).

    :raises ValueError: the body is not a JSON object naming a model; the message says why.
    """
    body = request_body(request)
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise ValueError(f"request body is not valid JSON: {e}") from None
    name = payload.get("model") if isinstance(payload, dict) else None
    if not isinstance(name, str) or not name.strip():
        raise ValueError('request body must be a JSON object with a "model" field naming a model (see GET /models)')
    return name.strip(), supervisor.config.resolve(name.strip())


class RouterModels(JSONResource):
    """
    ``GET /models``: every listed model with its router status (``?reload`` is accepted and
    ignored: swapproxy reloads its config on SIGHUP or with ``--watch-config``).
    """

    def __init__(self, status: RouterStatus, clock: IReactorTime) -> None:
        super().__init__()
        self._status = status
        self._clock = clock

    def getChild(self, path: bytes, request: Request) -> Resource:
        if path == b"":
            return self
        return NotFound()

    def render_GET(self, request: Request) -> int:
        return render_async(request, lambda client: self._list(request))

    async def _list(self, request: Request) -> None:
        await self._status.refresh()
        body = _json(self._status.listing(int(self._clock.seconds())))
        request.setHeader(b"content-type", b"application/json; charset=utf-8")
        request.setHeader(b"content-length", b"%d" % len(body))
        request.write(body)


class _ModelAction(Resource):
    """
    A ``POST`` of ``{"model": ...}`` on the router API: the method and the body are checked
    here, the action is the subclass's `act`.
    """

    isLeaf = True

    def __init__(self, supervisor: Supervisor) -> None:
        super().__init__()
        self._supervisor = supervisor

    def render(self, request: Request) -> bytes | int:
        if request.method != b"POST":
            request.setHeader(b"allow", b"POST")
            method = request.method.decode("ascii", "replace")
            return llama_error(request, 405, f"{method} is not allowed here; use POST")
        try:
            name, model = _model_named(request, self._supervisor)
        except ValueError as e:
            return llama_error(request, 400, str(e))
        return self.act(request, name, model)

    def act(self, request: Request, name: str, model: ModelConfig | None) -> bytes | int:
        raise NotImplementedError  # pragma: no cover


class RouterLoad(_ModelAction):
    """
    ``POST /models/load`` ``{"model": ...}``: start loading the model; ``{"success": true}`` at
    once.
    """

    def act(self, request: Request, name: str, model: ModelConfig | None) -> bytes:
        if model is None:
            listed = ", ".join(m.id for m in self._supervisor.config.models.values() if not m.unlisted)
            return llama_error(request, 404, f"model {name!r} is not found; available models: {listed or '(none)'}",
                               "not_found_error")
        if self._supervisor.upstreams[model.id].state in (State.STARTING, State.READY):
            return llama_error(request, 400, "model is already running")
        try:
            ticket = self._supervisor.request(model.id, load_only=True)
        except Rejected as e:
            return llama_error(request, e.status, str(e), e.error_type)
        ticket.wait().addCallbacks(lambda lease: lease.release(), self._failed, errbackArgs=(model.id,))
        request.setHeader(b"content-type", b"application/json; charset=utf-8")
        return _json({"success": True})

    @staticmethod
    def _failed(failure: Failure, model_id: str) -> None:
        # The client has its answer; /models and /models/sse report the failure.
        if failure.check(StartError, Rejected):
            log.info("loading {model} for POST /models/load failed: {error}", model=model_id,
                     error=failure.getErrorMessage())
        else:
            log.failure("loading {model} for POST /models/load", failure, model=model_id)


class RouterUnload(_ModelAction):
    """
    ``POST /models/unload`` ``{"model": ...}``: stop the model; ``{"success": true}`` once it
    has stopped.
    """

    def act(self, request: Request, name: str, model: ModelConfig | None) -> bytes | int:
        if model is None:
            return llama_error(request, 400, "model is not found")
        if self._supervisor.upstreams[model.id].state in (State.STOPPED, State.FAILED):
            return llama_error(request, 400, "model is not running")
        model_id = model.id
        return render_async(request, lambda client: self._unload(request, model_id))

    async def _unload(self, request: Request, model_id: str) -> None:
        await self._supervisor.unload(model_id)
        request.setHeader(b"content-type", b"application/json; charset=utf-8")
        request.write(_json({"success": True}))


class RouterEvents(JSONResource):
    """
    ``GET /models/sse``: each model's status changes and load progress, as they happen, until
    the client leaves; a ``: ping`` comment every 15 s keeps proxies from closing it. A reader
    that does not keep up loses whole events, never swapproxy's memory (`LiveWriter`).
    """

    isLeaf = True

    def __init__(self, status: RouterStatus, clock: IReactorTime) -> None:
        super().__init__()
        self._status = status
        self._clock = clock

    def render_GET(self, request: Request) -> int:
        return render_async(request, lambda client: self._events(request, client))

    async def _events(self, request: Request, client: ClientState) -> None:
        request.setResponseCode(200)
        request.defaultContentType = None
        for name, value in SSE_HEADERS:
            request.setHeader(name, value)
        request.write(b"")  # the head goes out now: the first event may be a long way off
        writer = LiveWriter(request, dropped_event_marker)
        unsubscribe = self._status.subscribe(writer.write)
        heartbeat = LoopingCall(writer.write, comment("ping"))
        heartbeat.clock = self._clock
        heartbeat.start(HEARTBEAT, now=False)
        try:
            await Deferred()  # render_async cancels it when the client hangs up
        finally:
            heartbeat.stop()
            unsubscribe()
            writer.close(client.gone)


def router_props(supervisor: Supervisor) -> dict[str, Any]:
    """
    ``GET /props`` for swapproxy itself, in the router's shape: ``role`` ``router`` tells a
    client to look at ``/models``.
    """
    config = supervisor.config
    # The most models that can run side by side: one per swapping group, all the others.
    most = sum(1 if group.swap else len(group.members) for group in config.groups.values() if group.members)
    return {
        "role": "router",
        "max_instances": most,
        "models_autoload": True,
        "model_alias": "swapproxy",
        "model_path": "none",
        "default_generation_settings": {"params": None, "n_ctx": 0},
        "build_info": f"swapproxy {__version__}",
    }


def props_for_swapproxy(supervisor: Supervisor) -> Callable[[Request], bytes]:
    """
    What ``GET /props`` answers when it names no model and there is no default model.
    """

    def answer(request: Request) -> bytes:
        request.setHeader(b"content-type", b"application/json; charset=utf-8")
        return _json(router_props(supervisor))

    return answer

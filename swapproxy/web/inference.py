# -*- test-case-name: tests.test_web -*-
"""
Where the model is chosen: the inference routes and ``/upstream/<model>/...``.

Each request names its model (JSON ``model``, the multipart field ``model``, or the path) and is
handed, with its route's SSE dialect, to the forward pipeline (`swapproxy.web.forward.Forward`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote, unquote

from twisted.web.resource import Resource
from twisted.web.server import Request

from swapproxy.config import ModelConfig
from swapproxy.logs import proxy_logger
from swapproxy.metrics import Metrics, request_meter
from swapproxy.progress import LoadTracker
from swapproxy.reactors import IClientReactor
from swapproxy.supervisor import Supervisor
from swapproxy.upstream import State
from swapproxy.web.errors import NotFound, write_error
from swapproxy.web.filters import encode_payload, rewrite_payload, strip_loading_text
from swapproxy.targets import NoTarget, Target, Targets, state_of
from swapproxy.web.forward import Forward
from swapproxy.web.modelchoice import NO_MODEL, default_model
from swapproxy.web.peer_forward import PeerForward, peer_headers, rewrite_for_peer
from swapproxy.web.relay import forward_headers
from swapproxy.web.websocket import is_websocket_upgrade, relay_websocket, websocket_to_model
from swapproxy.web.render import ClientState, path_segments, render_async, request_body
from swapproxy.web.sse import ChatEvents, MessagesEvents, PlainEvents

log = proxy_logger("swapproxy.web")

#: The SSE dialect of each route that has a loading stream, by the name `build_root` gives it.
LOADING_DIALECTS = {"chat": ChatEvents, "messages": MessagesEvents}
#: The dialect of every other route: it has no loading stream, and only needs an error event.
PLAIN = PlainEvents()


class BadRequest(Exception):
    """
    The client's request cannot be served; ``str(error)`` says why.
    """

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def unknown_model(supervisor: Supervisor, name: str) -> BadRequest:
    """
    The 404 for a model name that is neither a model id nor an alias.
    """
    listed = [m.id for m in supervisor.config.models.values() if not m.unlisted]
    return BadRequest(404, f"model {name!r} not found; available models: {', '.join(listed) or '(none)'}")


def parse_json_model(body: bytes) -> tuple[str, dict[str, Any]]:
    """
    The ``model`` named by a JSON request body ("" when it names none), and the parsed body.

    :raises BadRequest: the body is not a JSON object, or its ``model`` is not a string.
    """
    if not body.strip():
        raise BadRequest(400, "request body is empty: expected a JSON object with a 'model' field")
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise BadRequest(400, f"request body is not valid JSON: {e}") from None
    except RecursionError:
        raise BadRequest(400, "request body is nested too deeply") from None
    if not isinstance(payload, dict):
        raise BadRequest(400, f"request body must be a JSON object, got {type(payload).__name__}")
    model = payload.get("model")
    if isinstance(model, (int, float)) and not isinstance(model, bool):
        model = str(model)
    if model is None:
        model = ""
    if not isinstance(model, str):
        raise BadRequest(400, "missing or invalid 'model' field: it must name a model (see GET /v1/models)")
    return model, payload


def multipart_boundary(request: Request) -> bytes | None:
    """
    The boundary of a ``multipart/form-data`` request, if it is one.
    """
    content_type = request.getHeader(b"content-type") or b""
    kind, _, params = content_type.partition(b";")
    if kind.strip().lower() != b"multipart/form-data":
        return None
    for param in params.split(b";"):
        key, _, value = param.strip().partition(b"=")
        if key.lower() == b"boundary" and value:
            return value.strip(b'"')
    return None


def replace_multipart_field(body: bytes, boundary: bytes, name: bytes, value: bytes) -> bytes:
    """
    ``body`` with the value of the form field ``name`` replaced; everything else byte for byte.
    """
    delimiter = b"--" + boundary
    parts = body.split(delimiter)
    for index, part in enumerate(parts):
        head, separator, content = part.partition(b"\r\n\r\n")
        if not separator:
            continue
        disposition = [line for line in head.split(b"\r\n") if line.lower().startswith(b"content-disposition:")]
        if disposition and (b'name="' + name + b'"') in disposition[0] and b"filename=" not in disposition[0]:
            parts[index] = head + separator + value + b"\r\n"
    return delimiter.join(parts)


class ModelRoute(Resource):
    """
    Shared logic of every route that sends a request to a model.

    :param supervisor: decides when the request may run.
    :param clock: drives the loading stream's ticker (and connects websockets to the models).
    :param trackers: each model's `LoadTracker`, for the loading stream.
    :param loading_dialect: ``chat`` or ``messages`` on the routes that have a loading stream.
    :param metrics: measures each request (status, durations, tokens), when given.
    :param targets: resolves profiles, selectors and peer model names (local models and
        aliases only, when ``None``).
    :param peer_forward: forwards requests for peers' models.
    """

    isLeaf = True

    def __init__(
        self,
        supervisor: Supervisor,
        clock: IClientReactor,
        trackers: Mapping[str, LoadTracker] | None = None,
        loading_dialect: str | None = None,
        metrics: Metrics | None = None,
        targets: Targets | None = None,
        peer_forward: PeerForward | None = None,
    ) -> None:
        super().__init__()
        self.supervisor = supervisor
        self.clock = clock
        self.loading_dialect = loading_dialect
        self.metrics = metrics
        self.forward = Forward(supervisor, clock, trackers if trackers is not None else {})
        self.targets = targets if targets is not None else Targets(lambda: supervisor.config, state_of(supervisor))
        self.peer_forward = peer_forward

    def resolve(self, name: str) -> ModelConfig:
        """
        The model ``name`` names; a request that names none gets the default model
        (`swapproxy.web.modelchoice`).
        """
        if not name:
            model = default_model(self.supervisor)
            if model is None:
                raise BadRequest(400, NO_MODEL)
            return model
        model = self.supervisor.config.resolve(name)
        if model is None:
            raise unknown_model(self.supervisor, name)
        return model

    def find(self, name: str, selectors: bool = True) -> Target:
        """
        Where a request for ``name`` goes (`swapproxy.targets`); release it when done.

        A request that names no model (``name`` is empty) goes to the default model
        (`swapproxy.web.modelchoice`).

        :raises BadRequest: 404 when it goes nowhere, 400 when it names none and there is no default.
        """
        if not name:
            model = default_model(self.supervisor)
            if model is None:
                raise BadRequest(400, NO_MODEL)
            name = model.id
        try:
            target = self.targets.find(name, selectors)
        except NoTarget as e:
            if e.status == 404 and self.targets.profile.name is None:
                raise unknown_model(self.supervisor, name) from None
            raise BadRequest(e.status, str(e)) from None
        if target.peer is not None and self.peer_forward is None:
            target.release()
            raise unknown_model(self.supervisor, name)
        return target

    async def serve_target(
        self, request: Request, client: ClientState, target: Target, path: bytes, body: bytes, stream: bool = False
    ) -> None:
        """
        Forward the request to ``target``: a local model through the pipeline, or a peer.
        """
        if target.model is not None:
            await self.serve(request, client, target.model, path, body, stream, target.requested)
            return
        assert target.peer is not None and self.peer_forward is not None
        await self.peer_forward(request, client, target.peer, path, body, self.dialect(target.requested, None))

    def dialect(self, requested: str, model: ModelConfig | None) -> PlainEvents:
        """
        This route's SSE dialect for one request.
        """
        dialect_type = LOADING_DIALECTS.get(self.loading_dialect or "")
        if dialect_type is None:
            return PLAIN
        field = model.loading_state_field if model is not None else "reasoning_content"
        return dialect_type(requested, field, int(self.clock.seconds()))

    async def serve(
        self,
        request: Request,
        client: ClientState,
        model: ModelConfig,
        path: bytes,
        body: bytes,
        stream: bool = False,
        requested: str = "",
    ) -> None:
        """
        Forward the request to ``model`` through the pipeline, in this route's dialect.

        :param requested: the model name the client used, echoed in loading events.
        """
        meter = request_meter(request)
        if meter is not None:
            meter.model = model.id
        dialect = self.dialect(requested or model.id, model)
        await self.forward(request, client, model, path, body, dialect, stream)

    def route_label(self, request: Request) -> str:
        """
        The route's label in the metrics: the path it is mounted at, as traversed (a fixed set).
        """
        return "/" + "/".join(s.decode("utf-8", "replace") for s in path_segments(request.prepath) if s)

    def render(self, request: Request) -> bytes | int:
        if self.metrics is not None:
            self.metrics.track(request, self.route_label(request))
        return render_async(request, lambda client: self.handle(request, client))

    async def handle(self, request: Request, client: ClientState) -> None:
        try:
            await self.handle_request(request, client)
        except BadRequest as e:
            write_error(request, e.status, str(e))

    async def handle_request(self, request: Request, client: ClientState) -> None:
        raise NotImplementedError  # pragma: no cover


class InferenceRoute(ModelRoute):
    """
    A POST route whose model is named in the JSON body (or, for multipart bodies, the form
    field ``model``), forwarded to the same path upstream.

    Not a leaf, so that a deeper route (``/v1/messages/count_tokens``) can hang below it.

    :param strip_prefix: a prefix of the route's path that the model does not see (llama-swap's
        versionless routes: ``/v/chat/completions`` goes to ``/chat/completions``).
    """

    isLeaf = False

    def __init__(self, *args: Any, strip_prefix: bytes = b"", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._strip_prefix = strip_prefix

    def getChild(self, path: bytes, request: Request) -> Resource:
        if path == b"":
            return self
        return NotFound()

    async def handle_request(self, request: Request, client: ClientState) -> None:
        if request.method != b"POST":
            request.setHeader(b"allow", b"POST")
            raise BadRequest(405, f"{request.method.decode('ascii', 'replace')} is not allowed here; use POST")
        body = request_body(request)
        boundary = multipart_boundary(request)
        stream = False
        if boundary is not None:
            values = request.args.get(b"model") or [b""]
            requested = values[0].decode("utf-8", "replace").strip()
            target = self.find(requested)
            sent = target.peer.model if target.peer is not None else target.name
            if target.model is not None and target.model.use_model_name:
                sent = target.model.use_model_name
            if requested and sent != requested:
                body = replace_multipart_field(body, boundary, b"model", sent.encode("utf-8"))
        else:
            body = strip_loading_text(body)
            requested, payload = parse_json_model(body)
            target = self.find(requested)
            changed = False
            if requested:
                # A body that names no model goes as it came, to the default model.
                changed = payload.get("model") != target.name
                payload["model"] = target.name
            if target.model is not None:
                changed = rewrite_payload(target.model, target.name, payload) or changed
            elif target.peer is not None:
                changed = rewrite_for_peer(target.peer, target.name, payload) or changed
            if changed:
                body = encode_payload(payload)
            # After the filters: a setParams or stripParams of "stream" decides.
            stream = payload.get("stream") is True
        path = request.uri
        if self._strip_prefix and path.startswith(self._strip_prefix + b"/"):
            path = path[len(self._strip_prefix):]
        try:
            await self.serve_target(request, client, target, path, body, stream=stream)
        finally:
            target.release()


#: Characters left as they are in a path segment (RFC 3986 pchar) and in a query, which keeps
#: the client's percent-escapes.
_SEGMENT_SAFE = "!$&'()*+,;=:@-._~"
_QUERY_SAFE = _SEGMENT_SAFE + "/?%[]"


class UpstreamPassthrough(ModelRoute):
    """
    ``/upstream/<model>/<path>``: any method, forwarded to ``<path>`` on that model's server
    (or on a peer's, for a peer model).

    The model name may contain ``/``; the longest name that is a model, an alias, a peer model
    or a pin of the active profile wins (selectors are not looked up here). A path that matches
    ``upstream.ignorePaths`` does not start a model that is not ready: it is answered 409.
    """

    async def handle_request(self, request: Request, client: ClientState) -> None:
        segments = [unquote(s.decode("utf-8", "replace")) for s in path_segments(request.postpath)]
        config = self.supervisor.config
        pins = self.targets.profile.pins()
        for split in range(len(segments), 0, -1):
            name = "/".join(segments[:split])
            if name in pins or config.resolve(name) is not None or config.resolve_peer(name) is not None:
                rest = segments[split:]
                break
        else:
            if not segments or not segments[0]:
                raise BadRequest(404, "no model in path /upstream/; use /upstream/<model>/<path>")
            raise BadRequest(404, f"model {segments[0]!r} not found (path /upstream/{'/'.join(segments)});"
                                  " use /upstream/<model>/<path>")
        query = request.uri.partition(b"?")[2]
        if not rest:
            location = b"/upstream/" + name.encode("utf-8") + b"/"
            if query:
                location += b"?" + query
            request.setResponseCode(301 if request.method in (b"GET", b"HEAD") else 308)
            request.setHeader(b"location", location)
            return
        if any(piece in (".", "..") for part in rest for piece in part.replace("\\", "/").split("/")):
            raise BadRequest(400, "path segments '.' and '..' are not allowed after /upstream/<model>/")
        # Twisted has decoded each segment once; encode them again so that no decoded "/", "?",
        # "#" or control character can change the path the upstream sees.
        path = b"/" + b"/".join(quote(s, safe=_SEGMENT_SAFE).encode("ascii") for s in path_segments(request.postpath)[split:])
        if query:
            path += b"?" + quote(query, safe=_QUERY_SAFE).encode("ascii")
        body = request_body(request)
        target = self.find(name, selectors=False)
        meter = request_meter(request)
        if meter is not None:
            # Named now: a websocket and a 409 never reach the pipeline, which names it too.
            meter.model = target.model.id if target.model is not None else target.peer.fqn  # type: ignore[union-attr]
        try:
            if target.model is not None and self._ignored(target.model, "/" + "/".join(rest)):
                raise BadRequest(409, f"model {target.model.id!r} is not loaded, and the path matches"
                                      " upstream.ignorePaths, so it does not start the model")
            if is_websocket_upgrade(request):
                await self._websocket(request, client, target, path)
            else:
                await self.serve_target(request, client, target, path, body)
        finally:
            target.release()

    async def _websocket(self, request: Request, client: ClientState, target: Target, path: bytes) -> None:
        """
        Relay a websocket upgrade to the target's server (`swapproxy.web.websocket`).
        """
        if target.model is not None:
            headers = forward_headers(request)
            await websocket_to_model(self.supervisor, self.clock, request, client, target.model, path, headers)
            return
        assert target.peer is not None
        peer = target.peer.peer
        headers = peer_headers(request, peer)
        await relay_websocket(request, client, self.clock, peer.proxy, path, headers, f"peer {peer.id!r}",
                              peer.timeouts.connect)

    def _ignored(self, model: ModelConfig, rest: str) -> bool:
        """
        Whether a request for ``rest`` must not start ``model``: its path matches
        ``upstream.ignorePaths`` and the model is not ready.
        """
        upstream = self.supervisor.upstreams.get(model.id)
        if upstream is not None and upstream.state is State.READY:
            return False
        return any(p.search(rest) for p in self.supervisor.config.upstream_ignore_paths)

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
from swapproxy.supervisor import Supervisor
from swapproxy.web.errors import NotFound, write_error
from swapproxy.web.filters import encode_payload, rewrite_payload, strip_loading_text
from swapproxy.web.forward import Forward
from swapproxy.web.modelchoice import NO_MODEL, default_model
from swapproxy.web.render import ClientState, render_async
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
    :param clock: drives the loading stream's ticker.
    :param trackers: each model's `LoadTracker`, for the loading stream.
    :param loading_dialect: ``chat`` or ``messages`` on the routes that have a loading stream.
    :param metrics: measures each request (status, durations, tokens), when given.
    """

    isLeaf = True

    def __init__(
        self,
        supervisor: Supervisor,
        clock: Any = None,
        trackers: Mapping[str, LoadTracker] | None = None,
        loading_dialect: str | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        super().__init__()
        self.supervisor = supervisor
        self.clock = clock
        self.loading_dialect = loading_dialect
        self.metrics = metrics
        self.forward = Forward(supervisor, clock, trackers if trackers is not None else {})

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
        dialect_type = LOADING_DIALECTS.get(self.loading_dialect or "")
        if dialect_type is None:
            dialect = PLAIN
        else:
            dialect = dialect_type(requested or model.id, model.loading_state_field, int(self.clock.seconds()))
        await self.forward(request, client, model, path, body, dialect, stream)

    def route_label(self, request: Request) -> str:
        """
        The route's label in the metrics: the path it is mounted at, as traversed (a fixed set).
        """
        return "/" + "/".join(s.decode("utf-8", "replace") for s in request.prepath if s)

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
    """

    isLeaf = False

    def getChild(self, path: bytes, request: Request) -> Resource:
        if path == b"":
            return self
        return NotFound()

    async def handle_request(self, request: Request, client: ClientState) -> None:
        if request.method != b"POST":
            request.setHeader(b"allow", b"POST")
            raise BadRequest(405, f"{request.method.decode('ascii', 'replace')} is not allowed here; use POST")
        body = request.content.read()
        boundary = multipart_boundary(request)
        stream = False
        if boundary is not None:
            values = request.args.get(b"model") or [b""]
            requested = values[0].decode("utf-8", "replace").strip()
            model = self.resolve(requested)
            if model.use_model_name:
                body = replace_multipart_field(body, boundary, b"model", model.use_model_name.encode("utf-8"))
        else:
            body = strip_loading_text(body)
            requested, payload = parse_json_model(body)
            model = self.resolve(requested)
            if rewrite_payload(model, requested, payload):
                body = encode_payload(payload)
            # After the filters: a setParams or stripParams of "stream" decides.
            stream = payload.get("stream") is True
        await self.serve(request, client, model, request.uri, body, stream=stream, requested=requested)


#: Characters left as they are in a path segment (RFC 3986 pchar) and in a query, which keeps
#: the client's percent-escapes.
_SEGMENT_SAFE = "!$&'()*+,;=:@-._~"
_QUERY_SAFE = _SEGMENT_SAFE + "/?%[]"


class UpstreamPassthrough(ModelRoute):
    """
    ``/upstream/<model>/<path>``: any method, forwarded to ``<path>`` on that model's server.

    The model name may contain ``/``; the longest name that is a model or alias wins.
    """

    async def handle_request(self, request: Request, client: ClientState) -> None:
        segments = [unquote(s.decode("utf-8", "replace")) for s in request.postpath]
        for split in range(len(segments), 0, -1):
            model = self.supervisor.config.resolve("/".join(segments[:split]))
            if model is not None:
                rest = segments[split:]
                break
        else:
            name = "/".join(segments) or "(none)"
            raise BadRequest(404, f"no model in path /upstream/{name}; use /upstream/<model>/<path>")
        query = request.uri.partition(b"?")[2]
        if not rest:
            location = b"/upstream/" + "/".join(segments[:split]).encode("utf-8") + b"/"
            if query:
                location += b"?" + query
            request.setResponseCode(301 if request.method in (b"GET", b"HEAD") else 308)
            request.setHeader(b"location", location)
            return
        if any(piece in (".", "..") for part in rest for piece in part.replace("\\", "/").split("/")):
            raise BadRequest(400, "path segments '.' and '..' are not allowed after /upstream/<model>/")
        # Twisted has decoded each segment once; encode them again so that no decoded "/", "?",
        # "#" or control character can change the path the upstream sees.
        path = b"/" + b"/".join(quote(s, safe=_SEGMENT_SAFE).encode("ascii") for s in request.postpath[split:])
        if query:
            path += b"?" + quote(query, safe=_QUERY_SAFE).encode("ascii")
        body = request.content.read()
        await self.serve(request, client, model, path, body)

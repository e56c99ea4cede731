# -*- test-case-name: tests.test_llamacpp -*-
"""
llama-server's own endpoints (``/tokenize``, ``/props``, ``/slots``, ...), forwarded to a model as
llama.cpp's router forwards them.

A client written for llama-server names no model at all; one written for the router names it in
the JSON body or, for a GET, as ``?model=``. So the model is the body's ``model``, else the
``model`` query parameter, else the default model (`swapproxy.web.modelchoice`). As in the
router, ``?autoload=false`` asks not to start a model that is not loaded.

``GET /props`` that names no model, unless ``defaultModel`` is set or only one model is
configured, answers for swapproxy itself in the router's shape (``"role": "router"``), which is
how llama.cpp's web UI and other clients tell a router from a single server; which model happens
to be running does not change that answer.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from twisted.web.resource import Resource
from twisted.web.server import Request

from swapproxy.upstream import State
from swapproxy.web.errors import NotFound
from swapproxy.web.filters import strip_loading_text
from swapproxy.web.inference import BadRequest, ModelRoute
from swapproxy.web.modelchoice import default_model
from swapproxy.web.render import ClientState, request_body

#: llama-server's own endpoints, each forwarded to the same path on the chosen model.
LLAMA_SERVER_ROUTES = (
    "/tokenize",
    "/detokenize",
    "/apply-template",
    "/props",
    "/slots",
    "/lora-adapters",
    "/chat/completions/input_tokens",
    "/v1/chat/completions/input_tokens",
    "/responses/input_tokens",
    "/v1/responses/input_tokens",
)


def query_value(request: Request, name: bytes) -> str:
    """
    The first value of query parameter ``name``, stripped; "" when it is absent.
    """
    values = request.args.get(name) if request.args else None
    return values[0].decode("utf-8", "replace").strip() if values else ""


def _body_model(body: bytes) -> str:
    if not body.lstrip().startswith(b"{"):
        return ""
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return ""  # forwarded as it is: the model says what is wrong with it
    model = payload.get("model") if isinstance(payload, dict) else None
    return model.strip() if isinstance(model, str) else ""


class LlamaServerRoute(ModelRoute):
    """
    One of llama-server's own endpoints, any method, forwarded to the same path and query on the
    model the request names (body, then ``?model=``) or the default model.

    :param numbered: whether one more path segment of digits is part of the route
        (``/slots/<id>``).
    :param unnamed: answers a request that names no model when no default model is configured
        (``defaultModel``, or a single model), instead of going to the only model running or
        the usual 400 (``GET /props``).
    """

    isLeaf = False

    def __init__(
        self,
        *args: Any,
        numbered: bool = False,
        unnamed: Callable[[Request], bytes] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self._numbered = numbered
        self._unnamed = unnamed

    def getChild(self, path: bytes, request: Request) -> Resource:
        if path == b"" or (self._numbered and path.isdigit() and not request.postpath):
            return self
        return NotFound()

    def route_label(self, request: Request) -> str:
        label = super().route_label(request)
        if self._numbered and request.prepath and request.prepath[-1].isdigit():
            label = label.rpartition("/")[0] + "/<id>"
        return label

    async def handle_request(self, request: Request, client: ClientState) -> None:
        body = request_body(request)
        if body:
            body = strip_loading_text(body)
        requested = _body_model(body) or query_value(request, b"model")
        if not requested and self._unnamed is not None and default_model(self.supervisor, running=False) is None:
            request.write(self._unnamed(request))
            return
        model = self.resolve(requested)
        if query_value(request, b"autoload").lower() in ("false", "0"):
            if self.supervisor.upstreams[model.id].state is not State.READY:
                raise BadRequest(400, f"model {model.id!r} is not loaded, and the request says autoload=false")
        await self.serve(request, client, model, request.uri, body, requested=requested)

# -*- test-case-name: tests.test_web -*-
"""
Where a request enters: the Resource tree and the Site.
"""

from __future__ import annotations

from typing import Any

from twisted.web.resource import Resource
from twisted.web.server import Request

from swapproxy.config import CorsConfig
from swapproxy.board import ModelBoard
from swapproxy.logbuffer import LogHistory
from swapproxy.metrics import Metrics
from swapproxy.peers import PeerSet
from swapproxy.progress import LoadHistory, LoadTracker
from swapproxy.reactors import ISwapproxyReactor
from swapproxy.store import ActivityStore
from swapproxy.supervisor import Supervisor
from swapproxy.targets import Targets, state_of
from swapproxy.web.api import ApiLoad, ApiUnload, Health, ModelList, Running, UnloadAll
from swapproxy.web.auth import ApiKeys, Unauthorized
from swapproxy.web.cors import CorsPolicy, Preflight
from swapproxy.web.dashboard import Dashboard, Redirect
from swapproxy.web.errors import NotFound
from swapproxy.web.inference import InferenceRoute, ModelRoute, UpstreamPassthrough
from swapproxy.web.llamacpp import LLAMA_SERVER_ROUTES, LlamaServerRoute
from swapproxy.web.monitor import ActivityPage, EventStream, LogFollow, LogPage, MetricsPage, TokenMetrics
from swapproxy.web.peer_forward import PeerForward
from swapproxy.web.profiles import Profiles
from swapproxy.web.router_api import (
    RouterEvents,
    RouterLoad,
    RouterModels,
    RouterStatus,
    RouterUnload,
    props_for_swapproxy,
)
from swapproxy.web.site import SwapproxySite

#: Routes whose model is named in the request body, forwarded to the same path upstream.
INFERENCE_ROUTES = (
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/rerank",
    "/v1/reranking",
    "/rerank",
    "/reranking",
    "/v1/audio/speech",
    "/v1/audio/transcriptions",
    "/v1/messages",
    "/v1/messages/count_tokens",
    "/v1/responses",
    "/completion",
    "/infill",
    # image servers (stable-diffusion.cpp's sd-server), as llama-swap forwards them
    "/v1/images/generations",
    "/v1/images/edits",
    "/sdapi/v1/txt2img",
    "/sdapi/v1/img2img",
    # llama-server's aliases of the routes above
    "/chat/completions",
    "/completions",
    "/responses",
    "/embeddings",
    "/embedding",
    "/audio/transcriptions",
)

#: llama-swap's versionless routes: forwarded without the ``/v``, for a model whose ``proxy`` ends in
#: its API's version (``http://host/api/v1``).
VERSIONLESS_ROUTES = ("/v/chat/completions", "/v/responses", "/v/completions", "/v/messages",
                      "/v/messages/count_tokens", "/v/embeddings", "/v/rerank", "/v/reranking")

#: llama-swap's audio API route (an audio server's task runner): forwarded without the ``/audioapi``.
AUDIO_API_ROUTES = ("/audioapi/v1/tasks/run",)

#: Routes that llama-swap forwards to the model named in the body or, for a GET, in ``?model=``,
#: as llama-server's own endpoints are.
MODEL_QUERY_ROUTES = ("/v1/audio/voices", "/sdapi/v1/loras")

class Directory(Resource):
    """
    An inner node of the tree; unknown children are a JSON 404.
    """

    def getChild(self, path: bytes, request: Request) -> Resource:
        return NotFound()

    def render(self, request: Request) -> bytes:
        return NotFound().render(request)


class Root(Directory):
    """
    The root; every ``OPTIONS`` request is a CORS preflight, whatever its path, and every other
    request gets the CORS policy's headers, then passes the ``apiKeys`` check, before any route
    is looked up.

    :param api_keys: who may use which route (everyone, when ``None``).
    :param cors: the CORS policy (the default ``cors`` section's when ``None``).
    """

    def __init__(self, api_keys: ApiKeys | None = None, cors: CorsPolicy | None = None) -> None:
        super().__init__()
        self.api_keys = api_keys
        self.cors = cors if cors is not None else CorsPolicy(CorsConfig)

    def getChildWithDefault(self, path: bytes, request: Request) -> Resource:
        if request.method == b"OPTIONS":
            return Preflight(self.cors)
        self.cors.apply(request)
        if self.api_keys is not None and not self.api_keys.admit(request, path):
            return Unauthorized()
        child: Resource = super().getChildWithDefault(path, request)
        return child

    def render(self, request: Request) -> bytes:
        if request.method == b"OPTIONS":
            return Preflight(self.cors).render(request)
        return NotFound().render(request)


def mount(root: Resource, path: str, resource: Resource) -> None:
    """
    Put ``resource`` at ``path`` (``/a/b/c``), creating inner `Directory` nodes as needed.
    """
    *parents, leaf = [segment.encode("ascii") for segment in path.strip("/").split("/")]
    node = root
    for segment in parents:
        child = node.children.get(segment)
        if child is None:
            child = Directory()
            node.putChild(segment, child)
        node = child
    existing = node.children.get(leaf)
    if existing is not None:
        for name, grandchild in existing.children.items():
            resource.putChild(name, grandchild)
    node.putChild(leaf, resource)


#: The routes that answer a streaming request for a loading model with the loading stream.
LOADING_DIALECTS = {"/v1/chat/completions": "chat", "/chat/completions": "chat", "/v/chat/completions": "chat",
                    "/v1/messages": "messages", "/v/messages": "messages"}


def build_root(
    supervisor: Supervisor,
    reactor: ISwapproxyReactor,
    history: LoadHistory | None = None,
    *,
    logs: LogHistory | None = None,
    metrics: Metrics | None = None,
    activity: ActivityStore | None = None,
    peers: PeerSet | None = None,
) -> Resource:
    """
    The whole Resource tree of swapproxy.

    :param history: where load durations are remembered (in memory only by default).
    :param logs: the log history behind ``/logs`` (an empty one, fed by nothing, by default:
        `swapproxy.logbuffer.LogRouting` is what feeds it).
    :param metrics: what ``/metrics`` and ``/api/*`` report (new, with its own registry, by default).
    :param activity: the history of model requests, which ``metrics`` feeds (in memory only by
        default).
    :param peers: the peers' clients and health (`swapproxy.peers.PeerSet`); a service that must
        be stopped to close its connections (one that is never started nor stopped by default).
    """
    history = history if history is not None else LoadHistory(None)
    logs = logs if logs is not None else LogHistory()
    metrics = metrics if metrics is not None else Metrics(supervisor, reactor)
    activity = activity if activity is not None else ActivityStore(None, reactor)
    metrics.subscribe(activity.metrics_event)
    trackers: dict[str, LoadTracker] = {}

    def track(upstream: Any) -> None:
        # Also for the models a config reload adds or replaces.
        trackers[upstream.model.id] = LoadTracker(upstream, reactor, history)

    supervisor.each_upstream(track)
    board = ModelBoard(supervisor, reactor, trackers)
    peers = peers if peers is not None else PeerSet(lambda: supervisor.config, reactor)
    targets = Targets(lambda: supervisor.config, state_of(supervisor))
    peer_forward = PeerForward(peers)
    root = Root(ApiKeys(lambda: supervisor.config.api_keys), CorsPolicy(lambda: supervisor.config.cors))
    for path in INFERENCE_ROUTES:
        route: ModelRoute = InferenceRoute(supervisor, reactor, trackers, LOADING_DIALECTS.get(path), metrics, targets, peer_forward)
        mount(root, path, route)
    for prefix, paths in ((b"/v", VERSIONLESS_ROUTES), (b"/audioapi", AUDIO_API_ROUTES)):
        for path in paths:
            route = InferenceRoute(supervisor, reactor, trackers, LOADING_DIALECTS.get(path), metrics, targets,
                                   peer_forward, strip_prefix=prefix)
            mount(root, path, route)
    for path in LLAMA_SERVER_ROUTES + MODEL_QUERY_ROUTES:
        unnamed = props_for_swapproxy(supervisor) if path == "/props" else None
        route = LlamaServerRoute(supervisor, reactor, trackers, metrics=metrics, numbered=path == "/slots",
                                 unnamed=unnamed)
        mount(root, path, route)
    mount(root, "/upstream", UpstreamPassthrough(supervisor, reactor, trackers, metrics=metrics, targets=targets,
                                                 peer_forward=peer_forward))
    status = RouterStatus(board, supervisor, reactor, peers)
    mount(root, "/models", RouterModels(status, reactor))
    mount(root, "/models/load", RouterLoad(supervisor))
    mount(root, "/models/unload", RouterUnload(supervisor))
    mount(root, "/models/sse", RouterEvents(status, reactor))
    mount(root, "/v1/models", ModelList(supervisor, reactor, board, peers, targets.profile))
    mount(root, "/api/profiles", Profiles(targets.profile, lambda: supervisor.config))
    mount(root, "/health", Health())
    mount(root, "/running", Running(supervisor, reactor, board))
    mount(root, "/unload", UnloadAll(supervisor))
    mount(root, "/api/models/unload", ApiUnload(supervisor))
    mount(root, "/api/models/load", ApiLoad(supervisor))
    mount(root, "/logs", LogPage(logs))
    mount(root, "/logs/stream", LogFollow(supervisor, logs))
    mount(root, "/metrics", MetricsPage(metrics))
    mount(root, "/api/metrics", TokenMetrics(metrics))
    mount(root, "/api/events", EventStream(metrics, logs, reactor, board, activity, supervisor, peers))
    mount(root, "/api/activity", ActivityPage(activity))
    mount(root, "/ui", Dashboard())
    root.putChild(b"", Redirect(b"/ui/"))
    return root


def build_site(
    supervisor: Supervisor,
    reactor: ISwapproxyReactor,
    history: LoadHistory | None = None,
    *,
    logs: LogHistory | None = None,
    metrics: Metrics | None = None,
    activity: ActivityStore | None = None,
    peers: PeerSet | None = None,
) -> SwapproxySite:
    """
    The HTTP factory serving swapproxy's Resource tree, with the configuration's ``limits``.

    ``logs``, ``metrics``, ``activity`` and ``peers`` as for `build_root`.
    """
    root = build_root(supervisor, reactor, history, logs=logs, metrics=metrics, activity=activity, peers=peers)
    return SwapproxySite(root, lambda: supervisor.config.limits, reactor)

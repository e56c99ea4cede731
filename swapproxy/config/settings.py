# -*- test-case-name: tests.test_config -*-
"""
The frozen classes a validated configuration is made of, with their defaults.

Nothing here reads YAML: `swapproxy.config.document` builds a `Config` from a file, with every
default applied, every macro expanded and every ``${PORT}`` allocated, so nothing downstream
re-checks it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import attrs

from swapproxy.matrix import Matrix

DEFAULT_GROUP = "(default)"
LOG_LEVELS = ("debug", "info", "warn", "error")
LOG_TO_STDOUT = ("proxy", "upstream", "both", "none")
#: The timestamp of /logs lines when ``logTimeFormat`` is not set ("" turns them off).
DEFAULT_LOG_TIME_FORMAT = "datetime"
LOADING_STATE_FIELDS = ("reasoning_content", "reasoning", "content", "none")
DEFAULT_CONCURRENCY_LIMIT = 10
#: Seconds a start may go without a sign of life when ``healthCheckTimeout`` is not set.
DEFAULT_HEALTH_CHECK_TIMEOUT = 120
#: Without ``healthCheckCeiling``, a start is given up after this many ``healthCheckTimeout``s
#: even when the model keeps printing.
HEALTH_CHECK_CEILING_FACTOR = 10


def start_ceiling(health_check_timeout: float, health_check_ceiling: float | None) -> float:
    """
    The hard limit on a start, in seconds: ``health_check_ceiling``, or when that is 0 or
    ``None``, `HEALTH_CHECK_CEILING_FACTOR` times ``health_check_timeout``.
    """
    return health_check_ceiling or HEALTH_CHECK_CEILING_FACTOR * health_check_timeout


# -- how long a model may keep a request waiting (issue 18) -----------------------------------

#: Seconds a model may send nothing while a response waits for it (see `HangLimits`). The
#: OpenAI and Anthropic Python SDKs give up on a read after 600 s: a longer silence fails for
#: their users anyway. llama-server sends nothing at all while it processes a prompt (measured
#: by ``python -m bench.prefill``), so a prefill longer than this would be cut if its process
#: were not also watched for CPU time (`swapproxy.stall`).
DEFAULT_STREAM_IDLE_TIMEOUT = 600.0
#: Seconds between health checks while a model is ready.
DEFAULT_HEALTH_CHECK_INTERVAL = 10.0


@attrs.frozen
class HangLimits:
    """
    How long a ready model may keep swapproxy waiting before it is taken for hung; 0 turns a
    limit off. Global keys give the defaults, a model's own keys override them.

    :ivar stream_idle_timeout: ``streamIdleTimeout``: seconds a model may send no byte on any
        of its responses while one waits (a streaming request from the moment it is sent, any
        other once its head has arrived) and its process uses no CPU; then those responses fail
        (504) and the model is restarted.
    :ivar response_header_timeout: ``timeouts.responseHeader`` (llama-swap's key): seconds a
        request may wait for its response head; then it fails with a 504.
    :ivar health_check_interval: ``healthCheckInterval``: seconds between health checks while
        the model is ready; three failed checks in a row and it is restarted.
    """

    stream_idle_timeout: float = DEFAULT_STREAM_IDLE_TIMEOUT
    response_header_timeout: float = 0.0
    health_check_interval: float = DEFAULT_HEALTH_CHECK_INTERVAL


@attrs.frozen
class ModelConfig:
    """
    One model: how to start, reach, probe and stop its server, with every default resolved.

    ``cmd_stop`` may still contain the literal ``${PID}``, which the caller substitutes at stop time.
    ``ttl`` is effective (``globalTTL`` applied), 0 means never unload.
    """

    id: str
    cmd: tuple[str, ...]
    cmd_stop: tuple[str, ...]
    proxy: str
    check_endpoint: str | None
    ttl: int
    unload_timeout: float
    aliases: tuple[str, ...]
    use_model_name: str
    env: tuple[tuple[str, str], ...]
    unlisted: bool
    name: str
    description: str
    metadata: Mapping[str, Any]
    concurrency_limit: int
    send_loading_state: bool
    loading_state_field: str
    port: int | None
    strip_params: tuple[str, ...]
    set_params: Mapping[str, Any]
    set_params_by_id: Mapping[str, Mapping[str, Any]]
    #: The connection timeouts of requests to the model (``timeouts``).
    timeouts: Timeouts = attrs.Factory(lambda: Timeouts())
    #: What the model can do, shown in ``/v1/models`` (``capabilities``).
    capabilities: Capabilities = attrs.Factory(lambda: Capabilities())
    #: ``compat.ignoreWebsockets``: a websocket upgrade neither starts the model nor counts as a
    #: request in flight (for TTL, swaps and ``concurrencyLimit``).
    ignore_websockets: bool = False
    hang_limits: HangLimits = HangLimits()
    #: Whether its server's slots are saved before it stops and restored when it starts again
    #: (``slotCache``; the model's own setting, else the global one).
    slot_cache: bool = False
    #: Bytes the model is declared to need (``memory``); ``None`` when not declared.
    memory: int | None = None
    #: ``healthCheckTimeout``: seconds a start may go without a sign of life (a byte of output,
    #: a change in the health answer) before it is given up.
    health_check_timeout: float = DEFAULT_HEALTH_CHECK_TIMEOUT
    #: Seconds a start may take in all, however lively the model is: ``healthCheckCeiling``, or
    #: `HEALTH_CHECK_CEILING_FACTOR` times ``health_check_timeout``.
    start_ceiling: float = HEALTH_CHECK_CEILING_FACTOR * DEFAULT_HEALTH_CHECK_TIMEOUT


@attrs.frozen
class GroupConfig:
    """
    A swap group: ``swap`` lets one member run at a time, ``exclusive`` unloads other groups when a
    member starts, ``persistent`` protects the members from other groups' exclusive starts.
    """

    id: str
    swap: bool
    exclusive: bool
    persistent: bool
    members: tuple[str, ...]


@attrs.frozen
class Timeouts:
    """
    The timeouts of requests to a model or a peer (``timeouts``), in seconds; 0 disables one.

    :ivar connect: to open the TCP connection.
    :ivar keepalive: TCP keep-alive probe interval of the connection (0: no keep-alive probes).
    :ivar response_header: from sending the request to the answer's status line and headers.
    :ivar tls_handshake: to finish the TLS handshake (``https://``).
    :ivar expect_continue: accepted for llama-swap compatibility; swapproxy never sends
        ``Expect: 100-continue``.
    :ivar idle_conn: how long an idle keep-alive connection is kept for reuse.
    """

    connect: float = 30.0
    keepalive: float = 30.0
    response_header: float = 0.0
    tls_handshake: float = 10.0
    expect_continue: float = 1.0
    idle_conn: float = 90.0


#: A peer's timeouts when its config sets none: llama-swap's, with a 60 s ``responseHeader``.
PEER_TIMEOUTS = Timeouts(response_header=60.0)

MODALITIES = ("text", "audio", "image")


@attrs.frozen
class Capabilities:
    """
    What a model accepts and produces (``capabilities``), rendered into ``/v1/models`` as
    llama-swap does (`swapproxy.listing.capability_fields`).
    """

    inputs: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()
    tools: bool = False
    reranker: bool = False
    context: int = 0

    @property
    def empty(self) -> bool:
        """
        Whether nothing is declared (then nothing is rendered).
        """
        return not (self.inputs or self.outputs or self.tools or self.reranker or self.context)


@attrs.frozen
class PeerConfig:
    """
    Another server whose models swapproxy relays to (``peers.<id>``): another swapproxy, a
    llama-swap, or any OpenAI-compatible API.

    :ivar proxy: the base URL; a request's path is appended to it.
    :ivar api_key: sent as ``Authorization: Bearer`` and ``x-api-key`` instead of the client's
        key; empty for none.
    :ivar models: the model ids the peer serves, in config order, without repeats.
    :ivar strip_params: like a model's ``filters.stripParams``, for requests to this peer.
    :ivar set_params: like a model's ``filters.setParams``.
    :ivar set_params_by_id: like a model's ``filters.setParamsByID``, by the name the client used.
    """

    id: str
    proxy: str
    api_key: str
    models: tuple[str, ...]
    strip_params: tuple[str, ...] = ()
    set_params: Mapping[str, Any] = attrs.Factory(dict)
    set_params_by_id: Mapping[str, Mapping[str, Any]] = attrs.Factory(dict)
    timeouts: Timeouts = PEER_TIMEOUTS


@attrs.frozen
class PeerModel:
    """
    One model of one peer: what a peer model name resolves to.
    """

    peer: PeerConfig
    model: str

    @property
    def fqn(self) -> str:
        """
        The fully qualified name, ``<peer id>/<model id>``, always routed to this peer.
        """
        return f"{self.peer.id}/{self.model}"


SELECTOR_STRATEGIES = ("pin", "warm", "spillover")


@attrs.frozen
class SelectorConfig:
    """
    A virtual model id resolved to one of its targets for each request (``selectors.<id>``).

    :ivar strategy: ``pin`` (always the first target), ``warm`` (the first ready target, else
        the first starting one, else the first) or ``spillover`` (fill each target up to
        ``spillover`` requests in flight, in order, before the next is used).
    :ivar targets: model ids, aliases or peer model names (never other selectors).
    """

    id: str
    strategy: str
    targets: tuple[str, ...]
    spillover: int = 1
    name: str = ""
    description: str = ""
    unlisted: bool = False
    metadata: Mapping[str, Any] = attrs.Factory(dict)


@attrs.frozen
class ProfileConfig:
    """
    A named set of pins (``profiles.<id>``): while it is active, a request for a pinned name
    goes to the pin's target; a pin to ``""`` (or null) makes that name unavailable (404).
    """

    id: str
    description: str
    pins: Mapping[str, str]


#: ``upstream.ignorePaths`` when the config sets none: static files never start a model.
DEFAULT_UPSTREAM_IGNORE_PATHS = (r".*\.(js|json|css|png|gif|jpg|jpeg|ico|txt)$",)


@attrs.frozen
class Limits:
    """
    What one client may send (``limits`` in the config); 0 means no limit, except for
    ``max_header_size``.

    :ivar max_body_size: bytes in one request body; more is answered 413.
    :ivar max_header_size: bytes in the request line and headers together; more is answered 431.
    :ivar request_timeout: seconds from a request's first byte until its whole body has arrived;
        a slower request is answered 408 and its connection closed.
    :ivar idle_timeout: seconds a connection may stay silent between requests.
    :ivar max_connections: open client connections; a connection beyond it is answered 503.
    """

    max_body_size: int = 64 * 1024**2
    max_header_size: int = 16 * 1024
    request_timeout: float = 120.0
    idle_timeout: float = 60.0
    max_connections: int = 512


@attrs.frozen
class CorsConfig:
    """
    The CORS policy (``cors`` in the config), applied to preflights and responses alike.

    :ivar allowed_origins: origins a browser page may call swapproxy from: ``*`` (any),
        ``localhost`` (any page served from localhost, 127.0.0.1 or [::1]), or exact origins
        such as ``https://chat.example.com``; empty allows none.
    :ivar allow_credentials: whether pages may send cookies and HTTP authentication.
    :ivar allowed_headers: request headers a page may send; ``*`` allows whatever it asks for.
    :ivar max_age: seconds a browser may cache a preflight answer.
    """

    allowed_origins: tuple[str, ...] = ("*",)
    allow_credentials: bool = False
    allowed_headers: tuple[str, ...] = ("*",)
    max_age: int = 86400


@attrs.frozen
class SlotCacheConfig:
    """
    Where and how llama-server's slots are kept across stops (``slotCache``); see
    `swapproxy.slotcache`.

    :ivar enabled: the default for models that do not say (``slotCache: true`` at the top level).
    :ivar path: the directory of the saved slots; ``None`` is ``<state dir>/slots``.
    :ivar max_size: bytes the saved slots may take in all; the oldest go first. 0: no limit.
    :ivar min_free: bytes that must stay free on the disk; a save that would leave less is
        skipped, and the oldest files go first when it does.
    :ivar save_timeout: seconds a stop may wait for saving, after which the model is stopped
        anyway.
    :ivar restore_timeout: seconds a start may spend restoring before the first request is let
        through anyway.
    """

    enabled: bool = False
    path: str | None = None
    max_size: int = 20 * 1024**3
    min_free: int = 2 * 1024**3
    save_timeout: float = 10.0
    restore_timeout: float = 30.0


#: Default ``routing.scheduler.settings.fifo.maxOvertakes`` (see README, "Scheduling").
DEFAULT_MAX_OVERTAKES = 16
#: Default ``routing.scheduler.settings.fifo.maxWait``, seconds.
DEFAULT_MAX_WAIT = 60.0
#: Default ``routing.scheduler.settings.fifo.linger``, seconds.
DEFAULT_LINGER = 0.05


@attrs.frozen
class SchedulerConfig:
    """
    How waiting requests are ordered (``routing.scheduler``).

    :ivar priority: model id -> priority; higher is served first, 0 by default.
    :ivar max_overtakes: how many later requests may be served ahead of a waiting one, on the
        models it waits for, before those models get no new requests until it has run; 0 means
        strict arrival order.
    :ivar max_wait: seconds after which a waiting request is no longer overtaken; 0 means no
        time bound.
    :ivar linger: seconds a model that is in demand is kept after its last request ended, for a
        follow-up request, before it is swapped out for a waiting one.
    """

    priority: Mapping[str, int] = attrs.Factory(dict)
    max_overtakes: int = DEFAULT_MAX_OVERTAKES
    max_wait: float = DEFAULT_MAX_WAIT
    linger: float = DEFAULT_LINGER

    @property
    def strict(self) -> bool:
        """
        Whether requests are served strictly in arrival (and priority) order.
        """
        return self.max_overtakes == 0


@attrs.frozen
class Config:
    """
    A whole validated configuration.

    ``models`` is in sorted id order; ``groups`` holds the configured groups followed by the
    implicit ``"(default)"`` group of every model not in another group; ``aliases`` maps each alias
    (including ``filters.setParamsByID`` keys) to its model id. ``warnings`` are ready-to-log lines.
    """

    source: str
    health_check_timeout: int
    log_level: str
    log_to_stdout: str
    start_port: int
    global_ttl: int
    unload_timeout: float
    send_loading_state: bool
    loading_state_field: str
    api_keys: tuple[str, ...]
    models: Mapping[str, ModelConfig]
    groups: Mapping[str, GroupConfig]
    aliases: Mapping[str, str]
    preload: tuple[str, ...]
    warnings: tuple[str, ...]
    log_time_format: str = DEFAULT_LOG_TIME_FORMAT
    metrics_max_in_memory: int = 1000
    limits: Limits = attrs.Factory(Limits)
    #: Seconds a start may take in all, however much the model prints; 0 means
    #: ``HEALTH_CHECK_CEILING_FACTOR`` times ``health_check_timeout``.
    health_check_ceiling: int = 0
    #: The model id a request that names no model is for (``defaultModel``); "" for none.
    default_model: str = ""
    cors: CorsConfig = attrs.Factory(CorsConfig)
    #: ``store.path``: the activity database; ``""`` means ``activity.sqlite`` in the state directory.
    store_path: str = ""
    #: ``store.maxRows``: the most requests the activity database keeps (the oldest go first).
    store_max_rows: int = 10000
    #: ``peers`` by peer id.
    peers: Mapping[str, PeerConfig] = attrs.Factory(dict)
    #: Every name that routes to a peer: each ``peer/model``, and each bare model id that
    #: exactly one peer serves and that is not a local model id or alias.
    peer_routes: Mapping[str, PeerModel] = attrs.Factory(dict)
    selectors: Mapping[str, SelectorConfig] = attrs.Factory(dict)
    profiles: Mapping[str, ProfileConfig] = attrs.Factory(dict)
    #: ``includeAliasesInList``: ``/v1/models`` also lists each alias of a listed model.
    include_aliases_in_list: bool = False
    #: ``upstream.ignorePaths``, compiled: ``/upstream/<model>/<path>`` requests whose path
    #: matches one of them do not start a model that is not ready (409).
    upstream_ignore_paths: tuple[re.Pattern[str], ...] = attrs.Factory(
        lambda: tuple(re.compile(p) for p in DEFAULT_UPSTREAM_IGNORE_PATHS))
    #: Lines to log at info level: keys accepted from llama-swap that have no effect here.
    notices: tuple[str, ...] = ()
    #: The global `HangLimits`, each model's default.
    hang_limits: HangLimits = HangLimits()
    slot_cache: SlotCacheConfig = attrs.Factory(SlotCacheConfig)
    scheduler: SchedulerConfig = attrs.Factory(SchedulerConfig)
    #: The swap matrix when ``routing.router.use`` is ``matrix`` (or a top-level ``matrix``); then
    #: ``groups`` holds only the default group.
    matrix: Matrix | None = None
    #: Bytes the running models may use together (``memoryBudget``); ``None`` for no budget.
    memory_budget: int | None = None
    #: ``memoryBudget: auto``: the budget is what the machine has free when swapproxy starts.
    memory_budget_auto: bool = False

    @property
    def start_ceiling(self) -> int:
        """
        The hard limit on a start, in seconds, with the default applied.
        """
        return int(start_ceiling(self.health_check_timeout, self.health_check_ceiling))

    def resolve(self, name: str) -> ModelConfig | None:
        """
        Find a model by id, then by alias; ``None`` when neither matches.
        """
        model = self.models.get(name)
        if model is None and name in self.aliases:
            model = self.models.get(self.aliases[name])
        return model

    def resolve_peer(self, name: str) -> PeerModel | None:
        """
        The peer model ``name`` routes to: a ``peer/model`` name, or a bare model id that one
        peer alone serves. ``None`` otherwise, and always for local model ids and aliases
        (local wins).
        """
        return self.peer_routes.get(name)

    def group_of(self, model_id: str) -> GroupConfig:
        """
        The group that ``model_id`` (a real id, not an alias) belongs to.

        :raises KeyError: when no group holds ``model_id``.
        """
        for group in self.groups.values():
            if model_id in group.members:
                return group
        raise KeyError(model_id)


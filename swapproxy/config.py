"""
Load and validate a llama-swap style YAML configuration.

`load_config` and `parse_config` turn one YAML document into frozen `Config`, `ModelConfig` and
`GroupConfig` objects with every default applied, every macro expanded and every ``${PORT}``
allocated, so nothing downstream re-checks the file. Every problem a user can cause raises
`ConfigError`, whose message is one line: ``<file>: <key.path>: <problem>``. Keys this version does
not support (for example those of a newer llama-swap) are not errors: they are listed in a single
warning in `Config.warnings`, so the caller can log it and carry on.

Deliberate differences from llama-swap (reference section 1):

* duplicate mapping keys are an error (PyYAML and Go silently keep the last one);
* ``${env.NAME}`` is substituted in parsed scalars, not raw text: it cannot break the YAML and needs
  no escaping; an unquoted scalar is re-typed after substitution (``startPort: ${env.P}`` is an int);
* a macro may use any other macro, declared before or after it; a loop is an error. Configs that
  llama-swap accepts (LIFO: only earlier macros) expand identically;
* macros are also expanded in ``env`` values, ``name``, ``description`` and ``filters``, and
  ``${PORT}`` is available in every expanded field once ``cmd`` uses it;
* the default ``proxy`` is ``http://127.0.0.1:${PORT}`` (``localhost`` may resolve to ``::1``);
* an alias equal to a model id, and an unknown group member, are errors;
* ``\\r`` counts as whitespace in ``cmd`` (llama-swap leaks it into arguments from CRLF files).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import urlsplit

import attrs
import yaml

from swapproxy.matrix import Matrix, MatrixError

DEFAULT_GROUP = "(default)"
LOG_LEVELS = ("debug", "info", "warn", "error")
LOG_TO_STDOUT = ("proxy", "upstream", "both", "none")
#: The timestamp of /logs lines when ``logTimeFormat`` is not set ("" turns them off).
DEFAULT_LOG_TIME_FORMAT = "datetime"
LOADING_STATE_FIELDS = ("reasoning_content", "reasoning", "content", "none")
DEFAULT_CONCURRENCY_LIMIT = 10
#: Without ``healthCheckCeiling``, a start is given up after this many ``healthCheckTimeout``s
#: even when the model keeps printing.
HEALTH_CHECK_CEILING_FACTOR = 10


def start_ceiling(health_check_timeout: float, health_check_ceiling: float | None) -> float:
    """
    The hard limit on a start, in seconds: ``health_check_ceiling``, or when that is 0 or
    ``None``, `HEALTH_CHECK_CEILING_FACTOR` times ``health_check_timeout``.
    """
    return health_check_ceiling or HEALTH_CHECK_CEILING_FACTOR * health_check_timeout


#: The keys of `HangLimits`, global and per model.
_HANG_KEYS = frozenset({"streamIdleTimeout", "healthCheckInterval", "timeouts"})
_TOP_KEYS = frozenset({
    "healthCheckTimeout", "healthCheckCeiling", "logLevel", "logToStdout", "logTimeFormat", "startPort", "macros",
    "models", "groups", "hooks", "sendLoadingState", "loadingStateField", "globalTTL",
    "unloadTimeout", "apiKeys", "metricsMaxInMemory", "logRequests", "profiles", "limits",
    "defaultModel", "cors", "store",
    # llama-swap head's keys of issue 14: see _build_head_keys.
    "peers", "selectors", "includeAliasesInList", "upstream",
    # Scheduling (issue 12): _build_router, _build_scheduler, memoryBudget.
    "routing", "matrix", "memoryBudget", "slotCache"}) | _HANG_KEYS
_MODEL_KEYS = frozenset({
    "cmd", "cmdStop", "proxy", "checkEndpoint", "ttl", "aliases", "useModelName", "env",
    "unlisted", "name", "description", "metadata", "concurrencyLimit", "sendLoadingState",
    "loadingStateField", "macros", "filters", "unloadTimeout", "capabilities", "compat", "slotCache", "memory"}) | _HANG_KEYS
_GROUP_KEYS = frozenset({"swap", "exclusive", "persistent", "members"})
_STORE_KEYS = frozenset({"path", "maxRows"})
_MATRIX_KEYS = frozenset({"vars", "evict_costs", "sets"})
_MATRIX_VAR = re.compile(r"[A-Za-z0-9.-]{1,32}")
_FIFO_KEYS = frozenset({"priority", "maxOvertakes", "maxWait", "linger"})
_FILTER_KEYS = frozenset({"stripParams", "strip_params", "setParams", "setParamsByID"})
_RESERVED_MACROS = frozenset({"PORT", "MODEL_ID", "PID"})
_MACRO_NAME = re.compile(r"[A-Za-z0-9_-]{1,63}")
_MACRO_REF = re.compile(r"\$\{([A-Za-z0-9_.-]+)\}")
_ENV_REF = re.compile(r"\$\{env\.([A-Za-z_][A-Za-z0-9_]*)\}")
_MAX_EXPANSION = 1 << 20
_STR_TAG = "tag:yaml.org,2002:str"
_MERGE_TAG = "tag:yaml.org,2002:merge"


class ConfigError(Exception):
    """
    A configuration that cannot be used.

    ``str(err)`` is one line, ``<file>: <key.path>: <problem>``, for example
    ``config.yaml: models.qwen.ttl: must be an integer >= 0, got "ten"``.
    """

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.splitlines()))


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


def _build_hang_limits(ch: _Checker, raw: dict[Any, Any], path: str, default: HangLimits,
                       response_header: float) -> HangLimits:
    """
    The `HangLimits` of the mapping ``raw`` (the top level, or a model), ``default`` where it
    says nothing; ``response_header`` is its ``timeouts.responseHeader``, parsed with the rest
    of ``timeouts`` by `_build_timeouts`.
    """

    def seconds(value: Any, key: str, fallback: float) -> float:
        return ch.number(value, _join(path, key), fallback)

    return HangLimits(
        stream_idle_timeout=seconds(raw.get("streamIdleTimeout"), "streamIdleTimeout", default.stream_idle_timeout),
        response_header_timeout=response_header,
        health_check_interval=seconds(raw.get("healthCheckInterval"), "healthCheckInterval",
                                      default.health_check_interval),
    )


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
_TIMEOUT_KEYS = {"connect": "connect", "keepalive": "keepalive", "responseHeader": "response_header",
                 "tlsHandshake": "tls_handshake", "expectContinue": "expect_continue",
                 "idleConn": "idle_conn"}

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


_LIMIT_KEYS = frozenset({"maxBodySize", "maxHeaderSize", "requestTimeout", "idleTimeout",
                         "maxConnections"})
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([kmg]i?b?|b)?\s*", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "ki": 1024, "kib": 1024, "m": 1000**2,
               "mb": 1000**2, "mi": 1024**2, "mib": 1024**2, "g": 1000**3, "gb": 1000**3,
               "gi": 1024**3, "gib": 1024**3}


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


_CORS_KEYS = frozenset({"allowedOrigins", "allowCredentials", "allowedHeaders", "maxAge"})
_ORIGIN = re.compile(r"[a-z][a-z0-9+.-]*://(\[[0-9a-f:.]+\]|[a-z0-9._~%!$&'()*+,;=-]+)(:[0-9]{1,5})?", re.IGNORECASE)
_HEADER_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


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


def load_config(path: str, environ: Mapping[str, str] | None = None) -> Config:
    """
    Read and validate the YAML file at ``path``; errors name ``path`` as given.

    :param environ: where ``${env.NAME}`` is looked up; ``os.environ`` by default.
    :raises ConfigError: when the file cannot be read or is not a valid configuration.
    """
    try:
        with open(path, encoding="utf-8-sig") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise ConfigError(f"{path}: cannot read config file: {reason}") from None
    return parse_config(text, path, environ)


def parse_config(
    text: str, source: str = "config.yaml", environ: Mapping[str, str] | None = None
) -> Config:
    """
    Validate the YAML document ``text``; ``source`` names it in messages.

    :raises ConfigError: on the first problem found.
    """
    try:
        return _build(text, source, os.environ if environ is None else environ)
    except RecursionError:
        raise ConfigError(f"{source}: the document is nested too deeply") from None


def split_command(text: str) -> list[str]:
    """
    Split a ``cmd``/``cmdStop`` block into argv the way llama-swap does (reference section 1.5).

    Lines whose first non-blank character is ``#`` are dropped; a trailing ``\\`` joins lines; the
    rest is split into POSIX shell words (quotes and backslash escapes; no expansion, globbing or
    pipes). An unterminated quote is tolerated: the rest of the text ends the word. Unlike
    llama-swap, ``\\r`` is whitespace, so CRLF files do not leak it into arguments.
    """
    lines = []
    for line in text.split("\n"):
        trimmed = line.strip()
        if trimmed.startswith("#"):
            continue
        lines.append(trimmed[:-1] + " " if trimmed.endswith("\\") else line)
    text = "\n".join(lines)
    words: list[str] = []
    word: list[str] = []
    in_word = False
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c in " \t\n\r":
            if in_word:
                words.append("".join(word))
                word, in_word = [], False
            i += 1
        elif c == "\\":
            if i + 1 < n and text[i + 1] != "\n":
                word.append(text[i + 1])
                in_word = True
            i += 2
        elif c == "'":
            end = text.find("'", i + 1)
            end = n if end < 0 else end
            word.append(text[i + 1:end])
            in_word, i = True, end + 1
        elif c == '"':
            in_word, i = True, i + 1
            while i < n and text[i] != '"':
                if text[i] == "\\" and i + 1 < n and text[i + 1] in '$`"\\\n':
                    if text[i + 1] != "\n":
                        word.append(text[i + 1])
                    i += 2
                else:
                    word.append(text[i])
                    i += 1
            i += 1
        else:
            word.append(c)
            in_word, i = True, i + 1
    if in_word:
        words.append("".join(word))
    return words


def _drop_comment_lines(text: str) -> str:
    return "\n".join(line for line in text.split("\n") if not line.strip().startswith("#"))


def _join(path: str, key: object) -> str:
    text = key if isinstance(key, str) and key.isprintable() else _show(key)
    return f"{path}.{text}" if path else text


def _show(value: object) -> str:
    """Render a YAML value for a message, on one short line."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, str):
        text = json.dumps(value, ensure_ascii=False)
    elif isinstance(value, (int, float)):
        text = repr(value)
    else:
        text = f"a {type(value).__name__}"
    return text if len(text) <= 80 else text[:77] + "..."


def _macro_text(value: Any) -> str:
    """Format a typed macro value for interpolation into a string, as Go's ``%v`` would."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e21:
        return str(int(value))
    return str(value)


class _Checker:
    """Type-checks values at key paths and collects warnings, all named after one source."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.warnings: list[str] = []
        self.notices: list[str] = []
        self.unsupported: list[str] = []

    def error(self, path: str, problem: str) -> ConfigError:
        return ConfigError(f"{self.source}: {path}: {problem}" if path else f"{self.source}: {problem}")

    def warn(self, message: str) -> None:
        self.warnings.append(f"{self.source}: {message}")

    def mapping(self, value: Any, path: str) -> dict[Any, Any]:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise self.error(path, f"must be a mapping, got {_show(value)}")
        return value

    def known(self, mapping: dict[Any, Any], path: str, allowed: frozenset[str]) -> None:
        self.unsupported.extend(_join(path, k) for k in mapping if k not in allowed)

    def integer(self, value: Any, path: str, default: int, minimum: int | None = None,
                maximum: int | None = None) -> int:
        if value is None:
            return default
        if (isinstance(value, int) and not isinstance(value, bool)
                and (minimum is None or value >= minimum) and (maximum is None or value <= maximum)):
            return value
        want = "an integer" + (f" >= {minimum}" if minimum is not None else "")
        want += f" and <= {maximum}" if maximum is not None else ""
        raise self.error(path, f"must be {want}, got {_show(value)}")

    def number(self, value: Any, path: str, default: float) -> float:
        if value is None:
            return default
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if math.isfinite(value) and value >= 0:
                return float(value)
        raise self.error(path, f"must be a number of seconds >= 0, got {_show(value)}")

    def boolean(self, value: Any, path: str, default: bool) -> bool:
        if value is None:
            return default
        if not isinstance(value, bool):
            raise self.error(path, f"must be true or false, got {_show(value)}")
        return value

    def string(self, value: Any, path: str, default: str = "") -> str:
        if value is None:
            return default
        if not isinstance(value, str):
            raise self.error(path, f"must be a string, got {_show(value)}")
        return value

    def strings(self, value: Any, path: str, blank_ok: bool = False) -> list[str]:
        if value is None:
            return []
        if isinstance(value, list):
            for i, item in enumerate(value):
                if not isinstance(item, str) or not (blank_ok or item.strip()):
                    raise self.error(f"{path}[{i}]", f"must be a non-empty string, got {_show(item)}")
            return value
        raise self.error(path, f"must be a list of strings, got {_show(value)}")

    def choice(self, value: Any, path: str, default: str, choices: tuple[str, ...]) -> str:
        text = self.string(value, path, default).strip().lower()
        if text not in choices:
            raise self.error(path, f"must be one of {', '.join(choices)}, got {_show(value)}")
        return text


class _NodeChecker:
    """
    Walks the composed YAML graph before construction: rejects duplicate keys and recursive
    aliases with their key path, and substitutes ``${env.NAME}`` in scalars.
    """

    def __init__(self, loader: yaml.SafeLoader, checker: _Checker,
                 environ: Mapping[str, str]) -> None:
        self.loader, self.checker, self.environ = loader, checker, environ
        self.active: set[int] = set()
        self.done: set[int] = set()

    def visit(self, node: yaml.Node, path: str) -> None:
        if id(node) in self.done:
            return
        if id(node) in self.active:
            raise self.checker.error(path or "(top level)", "recursive YAML aliases are not supported")
        self.active.add(id(node))
        if isinstance(node, yaml.ScalarNode):
            self.substitute_env(node, path)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                self.visit(item, f"{path}[{i}]")
        elif isinstance(node, yaml.MappingNode):
            seen: dict[Any, yaml.Node] = {}
            for key_node, value_node in node.value:
                child = path
                if key_node.tag != _MERGE_TAG:
                    self.visit(key_node, path)
                    if isinstance(key_node, yaml.ScalarNode):
                        key = self.loader.construct_object(key_node)
                        child = _join(path, key)
                        first = seen.get(key)
                        if first is not None:
                            raise self.checker.error(child, (
                                f"duplicate key (first at line {first.start_mark.line + 1},"
                                f" again at line {key_node.start_mark.line + 1})"))
                        seen[key] = key_node
                self.visit(value_node, child)
        self.active.discard(id(node))
        self.done.add(id(node))

    def substitute_env(self, node: yaml.ScalarNode, path: str) -> None:
        def replace(match: re.Match[str]) -> str:
            if match.group(1) not in self.environ:
                raise self.checker.error(
                    path or "(top level)", f"environment variable '{match.group(1)}' is not set")
            return self.environ[match.group(1)]

        if "${env." not in node.value:
            return
        value = _ENV_REF.sub(replace, node.value)
        if node.style is None and node.tag == _STR_TAG:
            # An unquoted scalar is re-typed, as if the value had been written in the file.
            node.tag = self.loader.resolve(  # type: ignore[no-untyped-call]
                yaml.ScalarNode, value, (True, False))
        node.value = value


def _read_yaml(text: str, checker: _Checker, environ: Mapping[str, str]) -> Any:
    source = checker.source
    loader = None
    try:
        loader = yaml.SafeLoader(text)
        node = loader.get_single_node()
        if node is None:
            return None
        _NodeChecker(loader, checker, environ).visit(node, "")
        return loader.construct_document(node)
    except yaml.reader.ReaderError as e:
        raise ConfigError(f"{source}: character {e.position + 1}: invalid YAML: {e.reason}") from None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ConfigError(f"{source}: {where}invalid YAML: {e.problem or e.context}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: invalid YAML: {e}") from None
    except (ValueError, TypeError, OverflowError) as e:
        raise ConfigError(f"{source}: invalid YAML value: {e}") from None
    finally:
        if loader is not None:
            loader.dispose()


def _macro_defs(ch: _Checker, value: Any, path: str) -> dict[str, Any]:
    defs: dict[str, Any] = {}
    for name, macro in ch.mapping(value, path).items():
        where = _join(path, name)
        if not isinstance(name, str) or not _MACRO_NAME.fullmatch(name):
            raise ch.error(where, "macro names must match [A-Za-z0-9_-]+ and be under 64 characters")
        if name in _RESERVED_MACROS:
            raise ch.error(where, f"'{name}' is a reserved macro name")
        if not isinstance(macro, (str, int, float)):
            raise ch.error(where, f"must be a string, number or boolean, got {_show(macro)}")
        if isinstance(macro, str) and f"${{{name}}}" in macro:
            raise ch.error(where, f"macro '{name}' contains self-reference")
        defs[name] = macro
    return defs


class _MacroScope:
    """
    The macros visible to one model, resolved on demand by name with loop detection.
    ``${PORT}`` and ``${PID}`` are left in place for later.
    """

    def __init__(self, ch: _Checker, model_id: str, defs: dict[str, Any]) -> None:
        self.ch, self.defs = ch, defs
        self.resolved: dict[str, Any] = {"MODEL_ID": model_id}

    def value(self, name: str, path: str, chain: list[str]) -> Any:
        if name in self.resolved:
            return self.resolved[name]
        if name in chain:
            loop = " -> ".join(chain[chain.index(name):] + [name])
            raise self.ch.error(path, f"macro loop: {loop}")
        value = self.defs[name]
        if isinstance(value, str):
            value = self._expand(value, path, chain + [name])
        self.resolved[name] = value
        return value

    def _expand(self, text: str, path: str, chain: list[str]) -> str:
        def replace(match: re.Match[str]) -> str:
            name = match.group(1)
            if name in ("PORT", "PID"):
                return match.group(0)
            if name not in self.defs and name != "MODEL_ID":
                via = f" (used by macro '{chain[-1]}')" if chain else ""
                raise self.ch.error(path, f"unknown macro '${{{name}}}'{via}")
            return _macro_text(self.value(name, path, chain))

        result = _MACRO_REF.sub(replace, text)
        if len(result) > _MAX_EXPANSION:
            raise self.ch.error(path, "macro expansion is longer than 1 MiB")
        return result

    def text(self, text: str, path: str) -> str:
        return self._expand(text, path, [])

    def typed(self, value: Any, path: str) -> Any:
        """Expand a YAML tree; a string that is exactly one macro takes the macro's type."""
        if isinstance(value, str):
            match = _MACRO_REF.fullmatch(value)
            if match and (match.group(1) in self.defs or match.group(1) == "MODEL_ID"):
                return self.value(match.group(1), path, [])
            return self.text(value, path)
        if isinstance(value, dict):
            return {k: self.typed(v, _join(path, k)) for k, v in value.items()}
        if isinstance(value, list):
            return [self.typed(v, f"{path}[{i}]") for i, v in enumerate(value)]
        return value


def _place_port(ch: _Checker, value: Any, path: str, port: int | None,
                allow_pid: bool = False, typed: bool = False) -> Any:
    """
    Substitute ``${PORT}`` and reject ``${PORT}``/``${PID}`` where unavailable. Inside a YAML tree
    (``typed``), a string that is exactly ``${PORT}`` becomes the integer port.
    """
    if isinstance(value, str):
        if port is not None:
            if typed and value == "${PORT}":
                return port
            value = value.replace("${PORT}", str(port))
        elif "${PORT}" in value:
            raise ch.error(path, "${PORT} is only available when cmd uses ${PORT}")
        if "${PID}" in value and not allow_pid:
            raise ch.error(path, "${PID} is only available in cmdStop")
        return value
    if isinstance(value, dict):
        return {k: _place_port(ch, v, _join(path, k), port, typed=True) for k, v in value.items()}
    if isinstance(value, list):
        return [_place_port(ch, v, f"{path}[{i}]", port, typed=True) for i, v in enumerate(value)]
    return value


def _build_model(ch: _Checker, mid: str, raw: Any, global_macros: dict[str, Any],
                 top: dict[str, Any], next_port: int) -> ModelConfig:
    path = f"models.{mid}"
    m = ch.mapping(raw, path)
    ch.known(m, path, _MODEL_KEYS)
    defs = dict(global_macros)
    defs.update(_macro_defs(ch, m.get("macros"), f"{path}.macros"))
    scope = _MacroScope(ch, mid, defs)

    def text(key: str, default: str) -> str:
        return scope.text(ch.string(m.get(key), f"{path}.{key}", default), f"{path}.{key}")

    if m.get("cmd") is None:
        raise ch.error(f"{path}.cmd", "missing: every model needs the command that starts its server")
    cmd = scope.text(_drop_comment_lines(ch.string(m["cmd"], f"{path}.cmd")), f"{path}.cmd")
    if not split_command(cmd):
        raise ch.error(f"{path}.cmd", "empty command")
    proxy = text("proxy", "http://127.0.0.1:${PORT}")
    port: int | None = None
    if "${PORT}" in cmd:
        port = next_port
        if port > 65535:
            raise ch.error(f"{path}.cmd", f"no port left for ${{PORT}}: it would be {port}")
    elif "${PORT}" in proxy:
        if "proxy" in m:
            problem = "uses ${PORT} but cmd does not - ${PORT} is only available when used in cmd"
        else:
            problem = ("is not set, so it defaults to http://127.0.0.1:${PORT}, but cmd does not use"
                       " ${PORT}; put ${PORT} in cmd or set proxy to the server's URL")
        raise ch.error(f"{path}.proxy", problem)

    def final(where: str, value: Any, allow_pid: bool = False) -> Any:
        return _place_port(ch, value, where, port, allow_pid)

    stop_text = scope.text(_drop_comment_lines(ch.string(m.get("cmdStop"), f"{path}.cmdStop")),
                           f"{path}.cmdStop")
    proxy = _check_url(ch, f"{path}.proxy", final(f"{path}.proxy", proxy))
    check = final(f"{path}.checkEndpoint", text("checkEndpoint", "/health")).strip() or "/health"

    env = []
    for i, entry in enumerate(ch.strings(m.get("env"), f"{path}.env")):
        where = f"{path}.env[{i}]"
        name, eq, value = entry.partition("=")
        if not eq or not name.strip():
            raise ch.error(where, f"must look like NAME=value, got {_show(entry)}")
        env.append((name.strip(), final(where, scope.text(value, where))))

    ttl = m.get("ttl")
    if type(ttl) is int and ttl == -1:  # llama-swap's default: "use globalTTL"
        ttl = None
    strip, set_params, by_id = _build_filters(ch, m.get("filters"), f"{path}.filters", scope, final)

    metadata = ch.mapping(m.get("metadata"), f"{path}.metadata")
    concurrency = ch.integer(m.get("concurrencyLimit"), f"{path}.concurrencyLimit", 0, minimum=0)
    timeouts = _build_timeouts(ch, m.get("timeouts"), f"{path}.timeouts", top["timeouts"])
    slot_cache = ch.boolean(m.get("slotCache"), f"{path}.slotCache", top["slot_cache"].enabled)
    return ModelConfig(
        id=mid,
        cmd=tuple(split_command(final(f"{path}.cmd", cmd))),
        cmd_stop=tuple(split_command(final(f"{path}.cmdStop", stop_text, allow_pid=True))),
        proxy=proxy,
        check_endpoint=None if check == "none" else ("/" + check.lstrip("/")),
        ttl=ch.integer(ttl, f"{path}.ttl", top["global_ttl"], minimum=0),
        unload_timeout=(ch.number(m.get("unloadTimeout"), f"{path}.unloadTimeout", 0)
                        or top["unload_timeout"]),
        aliases=tuple(ch.strings(m.get("aliases"), f"{path}.aliases")),
        use_model_name=ch.string(m.get("useModelName"), f"{path}.useModelName").strip(),
        env=tuple(env),
        unlisted=ch.boolean(m.get("unlisted"), f"{path}.unlisted", False),
        name=final(f"{path}.name", text("name", "")).strip(),
        description=final(f"{path}.description", text("description", "")).strip(),
        metadata=final(f"{path}.metadata", scope.typed(metadata, f"{path}.metadata")),
        concurrency_limit=concurrency or DEFAULT_CONCURRENCY_LIMIT,
        send_loading_state=ch.boolean(m.get("sendLoadingState"), f"{path}.sendLoadingState",
                                      top["send_loading_state"]),
        loading_state_field=ch.choice(m.get("loadingStateField"), f"{path}.loadingStateField",
                                      top["loading_state_field"], LOADING_STATE_FIELDS),
        port=port,
        strip_params=strip,
        set_params=set_params,
        set_params_by_id=by_id,
        timeouts=timeouts,
        capabilities=_build_capabilities(ch, m.get("capabilities"), f"{path}.capabilities"),
        ignore_websockets=_build_compat(ch, m.get("compat"), f"{path}.compat"),
        hang_limits=_build_hang_limits(ch, m, path, top["hang_limits"], timeouts.response_header),
        slot_cache=slot_cache,
        memory=_memory_size(ch, m.get("memory"), f"{path}.memory"),
    )


def _build_filters(
    ch: _Checker, raw: Any, fpath: str, scope: _MacroScope, final: Callable[[str, Any], Any]
) -> tuple[tuple[str, ...], dict[str, Any], dict[str, dict[str, Any]]]:
    """
    A ``filters`` mapping (of a model or a peer): ``stripParams`` (sorted, without ``model``),
    ``setParams`` and ``setParamsByID``, macros expanded.
    """
    filters = ch.mapping(raw, fpath)
    ch.known(filters, fpath, _FILTER_KEYS)
    strip: set[str] = set()
    for key in ("stripParams", "strip_params"):
        where = f"{fpath}.{key}"
        raw_strip = filters.get(key)
        parts = (ch.strings(raw_strip, where) if isinstance(raw_strip, list)
                 else [ch.string(raw_strip, where)])
        for part in parts:
            strip.update(p.strip() for p in final(where, scope.text(part, where)).split(","))
    where = f"{fpath}.setParams"
    set_params = final(where, scope.typed(ch.mapping(filters.get("setParams"), where), where))
    _check_params(ch, set_params, where)
    by_id = {}
    for key, params in ch.mapping(filters.get("setParamsByID"), f"{fpath}.setParamsByID").items():
        where = _join(f"{fpath}.setParamsByID", key)
        name = final(where, scope.text(ch.string(key, where), where)).strip()
        if not name:
            raise ch.error(where, "keys must be non-empty model names")
        params = final(where, scope.typed(ch.mapping(params, where), where))
        _check_params(ch, params, where)
        by_id[name] = params
    return tuple(sorted(strip - {"", "model"})), set_params, by_id


def _build_timeouts(ch: _Checker, raw: Any, path: str, default: Timeouts) -> Timeouts:
    """
    A ``timeouts`` mapping (of a model or a peer): seconds, 0 to disable; unset keys keep
    ``default``'s.
    """
    timeouts = ch.mapping(raw, path)
    ch.known(timeouts, path, frozenset(_TIMEOUT_KEYS))
    values = {attr: ch.number(timeouts.get(key), f"{path}.{key}", getattr(default, attr))
              for key, attr in _TIMEOUT_KEYS.items()}
    return Timeouts(**values)


def _build_capabilities(ch: _Checker, raw: Any, path: str) -> Capabilities:
    caps = ch.mapping(raw, path)
    ch.known(caps, path, frozenset({"in", "out", "tools", "reranker", "context"}))
    modalities = {}
    for key in ("in", "out"):
        values = ch.strings(caps.get(key), f"{path}.{key}")
        for i, value in enumerate(values):
            if value not in MODALITIES:
                raise ch.error(f"{path}.{key}[{i}]",
                               f"unknown modality {_show(value)}; use {', '.join(MODALITIES)}")
        modalities[key] = tuple(values)
    return Capabilities(
        inputs=modalities["in"],
        outputs=modalities["out"],
        tools=ch.boolean(caps.get("tools"), f"{path}.tools", False),
        reranker=ch.boolean(caps.get("reranker"), f"{path}.reranker", False),
        context=ch.integer(caps.get("context"), f"{path}.context", 0, minimum=0),
    )


def _build_compat(ch: _Checker, raw: Any, path: str) -> bool:
    compat = ch.mapping(raw, path)
    ch.known(compat, path, frozenset({"ignoreWebsockets"}))
    return ch.boolean(compat.get("ignoreWebsockets"), f"{path}.ignoreWebsockets", False)


def _check_url(ch: _Checker, where: str, proxy: str) -> str:
    """
    ``proxy`` if it is an ``http://`` or ``https://`` URL with a host (and no port 0).
    """
    try:
        url = urlsplit(proxy)
        valid = url.scheme in ("http", "https") and bool(url.hostname) and url.port != 0
    except ValueError:
        valid = False
    if not valid:
        raise ch.error(where, f"must be an http:// or https:// URL with a host, got {_show(proxy)}")
    return proxy


def _check_params(ch: _Checker, params: dict[Any, Any], where: str) -> None:
    """
    Check a ``setParams`` mapping in place: string keys, JSON values, and no key that would set
    ``model`` (or a path inside it), which is dropped with a warning.
    """
    for key in list(params):
        path = _join(where, key)
        if not isinstance(key, str) or not key.strip():
            raise ch.error(path, "keys must be non-empty strings, JSON key paths such as a.b (quote a number)")
        if key.split(".", 1)[0].strip() == "model":
            del params[key]
            ch.warn(f"{path}: ignored, the model field cannot be set")
            continue
        _check_json(ch, params[key], path)


def _check_json(ch: _Checker, value: Any, path: str) -> None:
    """Reject a YAML value that has no JSON equivalent (dates, binary, sets)."""
    if value is None or isinstance(value, (str, bool, int, float)):
        return
    if isinstance(value, list):
        for i, item in enumerate(value):
            _check_json(ch, item, f"{path}[{i}]")
    elif isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise ch.error(_join(path, key), "JSON object keys must be strings (quote it)")
            _check_json(ch, item, _join(path, key))
    else:
        raise ch.error(path, f"must be a JSON value (string, number, boolean, null, list or"
                             f" mapping), got {_show(value)} (quote it to send it as a string)")


def _byte_count(value: Any) -> float | None:
    """
    The bytes an integer or a size string (``64MiB``, ``512 KiB``, ``1.5GB``) stands for, or ``None``.
    """
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    match = _SIZE.fullmatch(value) if isinstance(value, str) else None
    return float(match.group(1)) * _SIZE_UNITS[(match.group(2) or "").lower()] if match else None


def _size(ch: _Checker, value: Any, path: str, default: int, minimum: int,
          zero_ok: bool = True) -> int:
    """A byte count: an integer, or a string such as ``64MiB``, ``512 KiB`` or ``1.5GB``."""
    if value is None:
        return default
    count = _byte_count(value)
    if count is None or count >= 1 << 62 or not ((count == 0 and zero_ok) or count >= minimum):
        no_limit = "0 (no limit) or " if zero_ok else ""
        raise ch.error(path, f"must be {no_limit}a size of at least {minimum} bytes, such as"
                             f" 1048576, 512KiB or 64MiB, got {_show(value)}")
    return int(count)


def _build_limits(ch: _Checker, raw: Any) -> Limits:
    limits = ch.mapping(raw, "limits")
    ch.known(limits, "limits", _LIMIT_KEYS)
    default = Limits()
    header_size = _size(ch, limits.get("maxHeaderSize"), "limits.maxHeaderSize",
                        default.max_header_size, 1024, zero_ok=False)
    return Limits(
        max_body_size=_size(ch, limits.get("maxBodySize"), "limits.maxBodySize",
                            default.max_body_size, 1),
        max_header_size=header_size,
        request_timeout=ch.number(limits.get("requestTimeout"), "limits.requestTimeout",
                                  default.request_timeout),
        idle_timeout=ch.number(limits.get("idleTimeout"), "limits.idleTimeout",
                               default.idle_timeout),
        max_connections=ch.integer(limits.get("maxConnections"), "limits.maxConnections",
                                   default.max_connections, minimum=0),
    )


def _build_cors(ch: _Checker, raw: Any) -> CorsConfig:
    cors = ch.mapping(raw, "cors")
    ch.known(cors, "cors", _CORS_KEYS)
    default = CorsConfig()
    origins = default.allowed_origins
    if cors.get("allowedOrigins") is not None:
        origins = tuple(o.strip().rstrip("/") for o in ch.strings(cors["allowedOrigins"], "cors.allowedOrigins"))
        for i, origin in enumerate(origins):
            if origin not in ("*", "localhost") and not _ORIGIN.fullmatch(origin):
                raise ch.error(f"cors.allowedOrigins[{i}]", "must be \"*\", \"localhost\" or an origin such as"
                               f" https://chat.example.com or http://localhost:3000 (no path), got {_show(origin)}")
    headers = default.allowed_headers
    if cors.get("allowedHeaders") is not None:
        headers = tuple(h.strip() for h in ch.strings(cors["allowedHeaders"], "cors.allowedHeaders"))
        for i, name in enumerate(headers):
            if name != "*" and not _HEADER_TOKEN.fullmatch(name):
                raise ch.error(f"cors.allowedHeaders[{i}]", f"must be \"*\" or a header name, got {_show(name)}")
    return CorsConfig(
        allowed_origins=origins,
        allow_credentials=ch.boolean(cors.get("allowCredentials"), "cors.allowCredentials",
                                     default.allow_credentials),
        allowed_headers=headers,
        max_age=ch.integer(cors.get("maxAge"), "cors.maxAge", default.max_age, minimum=0),
    )


def _build_default_model(ch: _Checker, raw: Any, models: dict[str, ModelConfig],
                         aliases: dict[str, str]) -> str:
    name = ch.string(raw, "defaultModel").strip()
    if not name:
        return ""
    if name in models:
        return name
    if name in aliases:
        return aliases[name]
    raise ch.error("defaultModel", f"unknown model {_show(name)}; models are: {', '.join(models) or '(none)'}")


_SLOT_CACHE_KEYS = frozenset({"enabled", "path", "maxSize", "minFree", "saveTimeout", "restoreTimeout"})


def _build_slot_cache(ch: _Checker, raw: Any) -> SlotCacheConfig:
    """``slotCache``: ``true``/``false``, or a mapping of settings (enabled unless it says not)."""
    if raw is None or isinstance(raw, bool):
        return SlotCacheConfig(enabled=bool(raw))
    if not isinstance(raw, dict):
        raise ch.error("slotCache", f"must be true, false or a mapping of settings, got {_show(raw)}")
    settings = ch.mapping(raw, "slotCache")
    ch.known(settings, "slotCache", _SLOT_CACHE_KEYS)
    default = SlotCacheConfig()
    path = ch.string(settings.get("path"), "slotCache.path").strip()
    return SlotCacheConfig(
        enabled=ch.boolean(settings.get("enabled"), "slotCache.enabled", True),
        path=os.path.expanduser(path) if path else None,
        max_size=_size(ch, settings.get("maxSize"), "slotCache.maxSize", default.max_size, 1),
        min_free=_size(ch, settings.get("minFree"), "slotCache.minFree", default.min_free, 1),
        save_timeout=ch.number(settings.get("saveTimeout"), "slotCache.saveTimeout", default.save_timeout),
        restore_timeout=ch.number(settings.get("restoreTimeout"), "slotCache.restoreTimeout",
                                  default.restore_timeout),
    )


def _build_aliases(ch: _Checker, models: dict[str, ModelConfig]) -> dict[str, str]:
    aliases: dict[str, str] = {}
    for mid, model in models.items():
        extra = [k for k in model.set_params_by_id if k != mid and k not in model.aliases]
        for alias in list(model.aliases) + extra:
            key = "aliases" if alias in model.aliases else "filters.setParamsByID"
            where = f"models.{mid}.{key}"
            if alias in models:
                raise ch.error(where,
                               f"alias '{alias}' is also a model id; the alias could never be used")
            if alias in aliases:
                owner = aliases[alias]
                raise ch.error(where, f"alias '{alias}' is listed twice" if owner == mid else
                               f"duplicate alias '{alias}': also an alias of model '{owner}'")
            aliases[alias] = mid
    return aliases


def _build_groups(ch: _Checker, raw: Any, models: dict[str, ModelConfig],
                  aliases: dict[str, str], where: str = "groups") -> dict[str, GroupConfig]:
    groups: dict[str, GroupConfig] = {}
    owner: dict[str, str] = {}
    for gid, graw in ch.mapping(raw, where).items():
        path = _join(where, gid)
        if not isinstance(gid, str) or not gid.strip():
            raise ch.error(path, "group ids must be non-empty strings")
        if gid == DEFAULT_GROUP:
            raise ch.error(path, f"'{DEFAULT_GROUP}' is reserved for the models in no other group")
        g = ch.mapping(graw, path)
        ch.known(g, path, _GROUP_KEYS)
        members = ch.strings(g.get("members"), f"{path}.members")
        for member in members:
            if member not in models:
                hint = (f"'{member}' is an alias of '{aliases[member]}', groups need model ids"
                        if member in aliases else "models are: " + (", ".join(models) or "(none)"))
                raise ch.error(f"{path}.members", f"unknown model '{member}'; {hint}")
            if member in owner:
                raise ch.error(f"{path}.members", (
                    f"duplicate member '{member}'" if owner[member] == gid
                    else f"model '{member}' is already in group '{owner[member]}';"
                         " a model can be in only one group"))
            owner[member] = gid
        groups[gid] = GroupConfig(
            id=gid,
            swap=ch.boolean(g.get("swap"), f"{path}.swap", True),
            exclusive=ch.boolean(g.get("exclusive"), f"{path}.exclusive", True),
            persistent=ch.boolean(g.get("persistent"), f"{path}.persistent", False),
            members=tuple(members))
    groups[DEFAULT_GROUP] = GroupConfig(DEFAULT_GROUP, True, True, False,
                                        tuple(m for m in models if m not in owner))
    return groups


def _memory_size(ch: _Checker, value: Any, path: str, auto_ok: bool = False) -> int | None:
    """
    A memory size (``memory``, ``memoryBudget``): an integer of bytes or a string such as ``6GiB``,
    ``512MiB`` or ``1.5GB``; ``None`` when not set.
    """
    if value is None:
        return None
    count = _byte_count(value)
    if count is None or not 1 <= count < 1 << 62:
        auto = " or auto (what is free when swapproxy starts)" if auto_ok else ""
        raise ch.error(path, f"must be a size such as 6GiB, 512MiB or 8000000000{auto}, got {_show(value)}")
    return int(count)


def _build_router(ch: _Checker, data: dict[Any, Any], models: dict[str, ModelConfig],
                  aliases: dict[str, str]) -> tuple[dict[str, GroupConfig], Matrix | None]:
    """
    The groups, or the swap matrix, from the top-level ``groups``/``matrix`` keys or from
    ``routing.router`` (llama-swap head accepts either style, not both).
    """
    routing = ch.mapping(data.get("routing"), "routing")
    ch.known(routing, "routing", frozenset({"router", "scheduler"}))
    router = ch.mapping(routing.get("router"), "routing.router")
    ch.known(router, "routing.router", frozenset({"use", "settings"}))
    settings = ch.mapping(router.get("settings"), "routing.router.settings")
    ch.known(settings, "routing.router.settings", frozenset({"groups", "matrix"}))
    top_groups, top_matrix = data.get("groups"), data.get("matrix")
    if top_matrix is not None or top_groups:
        if router.get("use") is not None or settings.get("matrix") is not None or settings.get("groups"):
            key = "matrix" if top_matrix is not None else "groups"
            raise ch.error(key, "cannot be used together with routing.router; move it to"
                                f" routing.router.settings.{key}")
        if top_matrix is not None and top_groups:
            raise ch.error("matrix", "cannot be used together with groups: use one or the other")
        use, groups_raw, groups_path, matrix_raw, matrix_path = (
            "matrix" if top_matrix is not None else "group", top_groups, "groups", top_matrix, "matrix")
    else:
        use = ch.choice(router.get("use"), "routing.router.use", "group", ("group", "matrix"))
        groups_raw, groups_path = settings.get("groups"), "routing.router.settings.groups"
        matrix_raw, matrix_path = settings.get("matrix"), "routing.router.settings.matrix"
        if use == "matrix" and matrix_raw is None:
            raise ch.error("routing.router.use", "is matrix, but routing.router.settings.matrix is not set")
        # The other one may be set too, as in llama-swap's own example, to switch by changing
        # `use`: it is checked, and not used.
        if use == "matrix" and settings.get("groups"):
            _build_groups(ch, groups_raw, models, aliases, groups_path)
        elif use == "group" and settings.get("matrix") is not None:
            _build_matrix(ch, matrix_raw, matrix_path, models, aliases)
    if use == "group":
        return _build_groups(ch, groups_raw, models, aliases, groups_path), None
    groups = {DEFAULT_GROUP: GroupConfig(DEFAULT_GROUP, True, True, False, tuple(models))}
    return groups, _build_matrix(ch, matrix_raw, matrix_path, models, aliases)


def _build_matrix(ch: _Checker, raw: Any, path: str, models: dict[str, ModelConfig],
                  aliases: dict[str, str]) -> Matrix:
    matrix = ch.mapping(raw, path)
    ch.known(matrix, path, _MATRIX_KEYS)
    names: dict[str, str] = {}
    for key, model in ch.mapping(matrix.get("vars"), f"{path}.vars").items():
        where = _join(f"{path}.vars", key)
        if not isinstance(key, str) or not _MATRIX_VAR.fullmatch(key):
            raise ch.error(where, "var names must be 1 to 32 letters, digits, '-' or '.'")
        if not isinstance(model, str) or model not in models:
            hint = (f"'{model}' is an alias of '{aliases[model]}', vars need model ids"
                    if isinstance(model, str) and model in aliases else
                    "models are: " + (", ".join(models) or "(none)"))
            raise ch.error(where, f"unknown model {_show(model)}; {hint}")
        names[key] = model

    def resolve(name: str) -> str | None:
        return names.get(name) or (name if name in models else None)

    costs: dict[str, int] = {}
    for key, cost in ch.mapping(matrix.get("evict_costs"), f"{path}.evict_costs").items():
        where = _join(f"{path}.evict_costs", key)
        model = resolve(key) if isinstance(key, str) else None
        if model is None:
            raise ch.error(where, "unknown var or model")
        costs[model] = ch.integer(cost, where, 1, minimum=1)
    sets = []
    for name, expression in ch.mapping(matrix.get("sets"), f"{path}.sets").items():
        where = _join(f"{path}.sets", name)
        if not isinstance(name, str) or not name.strip():
            raise ch.error(where, "set names must be non-empty strings")
        sets.append((name, ch.string(expression, where)))
    if not sets:
        raise ch.error(f"{path}.sets", "define at least one set, such as main: 'a & b'")
    try:
        return Matrix(sets, resolve, costs)
    except MatrixError as e:
        where = _join(f"{path}.sets", e.set_name) if e.set_name is not None else f"{path}.sets"
        raise ch.error(where, str(e)) from None


def _build_scheduler(ch: _Checker, raw: Any, models: dict[str, ModelConfig],
                     aliases: dict[str, str]) -> SchedulerConfig:
    path = "routing.scheduler"
    scheduler = ch.mapping(ch.mapping(raw, "routing").get("scheduler"), path)
    ch.known(scheduler, path, frozenset({"use", "settings"}))
    ch.choice(scheduler.get("use"), f"{path}.use", "fifo", ("fifo",))
    settings = ch.mapping(scheduler.get("settings"), f"{path}.settings")
    ch.known(settings, f"{path}.settings", frozenset({"fifo"}))
    fifo = ch.mapping(settings.get("fifo"), f"{path}.settings.fifo")
    ch.known(fifo, f"{path}.settings.fifo", _FIFO_KEYS)
    where = f"{path}.settings.fifo.priority"
    priority: dict[str, int] = {}
    named: dict[str, str] = {}
    for name, value in ch.mapping(fifo.get("priority"), where).items():
        key = _join(where, name)
        model = name if name in models else aliases.get(name) if isinstance(name, str) else None
        if model is None:
            raise ch.error(key, "unknown model; models are: " + (", ".join(models) or "(none)"))
        if model in priority:
            raise ch.error(key, f"model '{model}' already has a priority (as '{named[model]}')")
        priority[model] = ch.integer(value, key, 0)
        named[model] = name
    return SchedulerConfig(
        priority=priority,
        max_overtakes=ch.integer(fifo.get("maxOvertakes"), f"{path}.settings.fifo.maxOvertakes",
                                 DEFAULT_MAX_OVERTAKES, minimum=0),
        max_wait=ch.number(fifo.get("maxWait"), f"{path}.settings.fifo.maxWait", DEFAULT_MAX_WAIT),
        linger=ch.number(fifo.get("linger"), f"{path}.settings.fifo.linger", DEFAULT_LINGER),
    )


def _build(text: str, source: str, environ: Mapping[str, str]) -> Config:
    ch = _Checker(source)
    data = _read_yaml(text, ch, environ)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ch.error("(top level)", f"must be a mapping of settings, got {_show(data)}")
    ch.known(data, "", _TOP_KEYS | frozenset(_NO_EFFECT_KEYS))

    health = ch.integer(data.get("healthCheckTimeout"), "healthCheckTimeout", 120)
    if health < 15:
        ch.warn(f"healthCheckTimeout: {health} is below the minimum of 15, using 15")
        health = 15
    ceiling = ch.integer(data.get("healthCheckCeiling"), "healthCheckCeiling", 0, minimum=0)
    if 0 < ceiling < health:
        raise ch.error("healthCheckCeiling", f"must be 0 (meaning {HEALTH_CHECK_CEILING_FACTOR} x "
                       f"healthCheckTimeout) or at least healthCheckTimeout ({health}), got {ceiling}")
    level = ch.string(data.get("logLevel"), "logLevel", "info").strip().lower()
    if level not in LOG_LEVELS:
        ch.warn(f"logLevel: unknown level {_show(data.get('logLevel'))}, using info")
        level = "info"
    if "logRequests" in data:
        ch.warn("logRequests: deprecated and ignored")
    metrics_max = ch.integer(data.get("metricsMaxInMemory"), "metricsMaxInMemory", 1000)
    limits = _build_limits(ch, data.get("limits"))
    store = ch.mapping(data.get("store"), "store")
    ch.known(store, "store", _STORE_KEYS)
    api_keys = ch.strings(data.get("apiKeys"), "apiKeys")
    for i, key in enumerate(api_keys):
        if any(c.isspace() for c in key):
            raise ch.error(f"apiKeys[{i}]", "must not contain whitespace")
    top: dict[str, Any] = dict(
        global_ttl=ch.integer(data.get("globalTTL"), "globalTTL", 0, minimum=0),
        unload_timeout=ch.number(data.get("unloadTimeout"), "unloadTimeout", 10.0),
        send_loading_state=ch.boolean(data.get("sendLoadingState"), "sendLoadingState", False),
        loading_state_field=ch.choice(data.get("loadingStateField"), "loadingStateField",
                                      "reasoning_content", LOADING_STATE_FIELDS),
        slot_cache=_build_slot_cache(ch, data.get("slotCache")),
        # The global timeouts are each model's defaults (an extension: llama-swap has them per model).
        timeouts=_build_timeouts(ch, data.get("timeouts"), "timeouts", Timeouts()))
    top["hang_limits"] = _build_hang_limits(ch, data, "", HangLimits(), top["timeouts"].response_header)
    start_port = ch.integer(data.get("startPort"), "startPort", 5800, minimum=1, maximum=65535)
    global_macros = _macro_defs(ch, data.get("macros"), "macros")

    raw_models = ch.mapping(data.get("models"), "models")
    for mid in raw_models:
        if not isinstance(mid, str) or not mid.strip():
            raise ch.error(_join("models", mid), "model ids must be non-empty strings (quote it)")
    if not raw_models:
        ch.warn("models: no models configured")
    models: dict[str, ModelConfig] = {}
    next_port = start_port
    for mid in sorted(raw_models):
        models[mid] = _build_model(ch, mid, raw_models[mid], global_macros, top, next_port)
        next_port += models[mid].port is not None
    aliases = _build_aliases(ch, models)
    groups, matrix = _build_router(ch, data, models, aliases)
    scheduler = _build_scheduler(ch, data.get("routing"), models, aliases)
    budget_raw = data.get("memoryBudget")
    budget_auto = isinstance(budget_raw, str) and budget_raw.strip().lower() == "auto"
    budget = None if budget_auto else _memory_size(ch, budget_raw, "memoryBudget", auto_ok=True)
    default_model = _build_default_model(ch, data.get("defaultModel"), models, aliases)
    cors = _build_cors(ch, data.get("cors"))

    hooks = ch.mapping(data.get("hooks"), "hooks")
    ch.known(hooks, "hooks", frozenset({"on_startup"}))
    on_startup = ch.mapping(hooks.get("on_startup"), "hooks.on_startup")
    ch.known(on_startup, "hooks.on_startup", frozenset({"preload"}))
    head = _build_head_keys(ch, data, models, aliases, groups, global_macros)
    preload: list[str] = []
    for name in ch.strings(on_startup.get("preload"), "hooks.on_startup.preload", blank_ok=True):
        name = name.strip()
        selector = head["selectors"].get(name)
        if selector is not None:
            # A selector preloads the first of its targets that is a local model.
            name = next((t for t in selector.targets if t in models or t in aliases), name)
        target = models.get(name) or models.get(aliases.get(name, ""))
        if target is None and name in head["peer_routes"]:
            ch.warn(f"hooks.on_startup.preload: '{name}' is a peer model; only local models are preloaded")
        elif target is None and name:
            ch.warn(f"hooks.on_startup.preload: unknown model '{name}' ignored")
        elif target is not None and target.id not in preload:
            preload.append(target.id)

    if ch.unsupported:
        ch.warnings.insert(0, f"{source}: unsupported keys ignored: {', '.join(ch.unsupported)}")
    return Config(
        source=source,
        health_check_timeout=health,
        log_level=level,
        log_to_stdout=ch.choice(data.get("logToStdout"), "logToStdout", "proxy", LOG_TO_STDOUT),
        start_port=start_port,
        global_ttl=top["global_ttl"],
        unload_timeout=top["unload_timeout"],
        send_loading_state=top["send_loading_state"],
        loading_state_field=top["loading_state_field"],
        api_keys=tuple(api_keys),
        models=models,
        groups=groups,
        aliases=aliases,
        preload=tuple(preload),
        warnings=tuple(ch.warnings),
        log_time_format=ch.string(data.get("logTimeFormat"), "logTimeFormat", DEFAULT_LOG_TIME_FORMAT).strip(),
        metrics_max_in_memory=metrics_max if metrics_max > 0 else 1000,
        limits=limits,
        health_check_ceiling=ceiling,
        default_model=default_model,
        cors=cors,
        store_path=os.path.expanduser(ch.string(store.get("path"), "store.path").strip()),
        store_max_rows=ch.integer(store.get("maxRows"), "store.maxRows", 10000, minimum=1),
        notices=tuple(ch.notices),
        **head,
        hang_limits=top["hang_limits"],
        slot_cache=top["slot_cache"],
        scheduler=scheduler,
        matrix=matrix,
        memory_budget=budget,
        memory_budget_auto=budget_auto,
    )


# -- the keys of llama-swap head (issue 14) ---------------------------------------------------

#: Top-level llama-swap keys that configure what swapproxy does not have (request captures, a
#: performance monitor, the llama-swap web UI): accepted, checked for their type, and named in
#: one notice, so that a llama-swap config starts unchanged.
_NO_EFFECT_KEYS = {
    "captureBuffer": "request/response captures",
    "performance": "CPU/GPU sampling",
    "ui": "llama-swap's web UI settings",
}
_PEER_KEYS = frozenset({"proxy", "apiKey", "models", "filters", "timeouts"})
_SELECTOR_KEYS = frozenset({"strategy", "targets", "settings", "name", "description", "unlisted", "metadata"})


def _build_head_keys(ch: _Checker, data: dict[Any, Any], models: dict[str, ModelConfig],
                     aliases: dict[str, str], groups: dict[str, GroupConfig],
                     global_macros: dict[str, Any]) -> dict[str, Any]:
    """
    ``peers``, ``selectors``, ``profiles``, ``includeAliasesInList``, ``upstream`` and the keys
    without effect: the `Config` fields they make, by name.
    """
    for key, what in _NO_EFFECT_KEYS.items():
        if key in data:
            if key == "captureBuffer":
                ch.integer(data[key], key, 0, minimum=0)
            else:
                ch.mapping(data[key], key)
    present = [key for key in _NO_EFFECT_KEYS if key in data]
    if present:
        ch.notices.append(f"{ch.source}: accepted without effect (swapproxy has no "
                          + ", ".join(_NO_EFFECT_KEYS[k] for k in present) + "): " + ", ".join(present))
    peers = _build_peers(ch, data.get("peers"), global_macros)
    routes = _peer_routes(ch, peers, models, aliases)
    selectors = _build_selectors(ch, data.get("selectors"), models, aliases, groups, routes)
    profiles = _build_profiles(ch, data.get("profiles"), models, aliases, routes, selectors)
    return dict(
        peers=peers,
        peer_routes=routes,
        selectors=selectors,
        profiles=profiles,
        include_aliases_in_list=ch.boolean(data.get("includeAliasesInList"), "includeAliasesInList", False),
        upstream_ignore_paths=_build_upstream(ch, data.get("upstream")),
    )


def _build_peers(ch: _Checker, raw: Any, global_macros: dict[str, Any]) -> dict[str, PeerConfig]:
    peers: dict[str, PeerConfig] = {}
    for pid, praw in ch.mapping(raw, "peers").items():
        path = _join("peers", pid)
        if not isinstance(pid, str) or not pid.strip():
            raise ch.error(path, "peer ids must be non-empty strings (quote it)")
        if "/" in pid:
            raise ch.error(path, "a peer id must not contain '/': its models are named <peer>/<model>")
        p = ch.mapping(praw, path)
        ch.known(p, path, _PEER_KEYS)
        scope = _MacroScope(ch, pid, dict(global_macros))

        def final(where: str, value: Any) -> Any:
            return _place_port(ch, value, where, None)

        def text(key: str) -> str:
            return str(final(f"{path}.{key}", scope.text(ch.string(p.get(key), f"{path}.{key}"), f"{path}.{key}")))

        if p.get("proxy") is None:
            raise ch.error(f"{path}.proxy", "missing: every peer needs the base URL of its server")
        proxy = _check_url(ch, f"{path}.proxy", text("proxy").strip())
        url = urlsplit(proxy)
        if url.username is not None or url.password is not None:
            raise ch.error(f"{path}.proxy", "must not contain a user name or password: set the peer's apiKey")
        if url.query or url.fragment or proxy.endswith(("?", "#")):
            raise ch.error(f"{path}.proxy", f"must not have a query or fragment (each request's path is appended"
                                            f" to it), got {_show(proxy)}")
        names: list[str] = []
        for i, name in enumerate(ch.strings(p.get("models"), f"{path}.models")):
            name = final(f"{path}.models[{i}]", scope.text(name, f"{path}.models[{i}]")).strip()
            if name in names:
                raise ch.error(f"{path}.models[{i}]", f"{_show(name)} is listed twice")
            names.append(name)
        if not names:
            raise ch.error(f"{path}.models", "missing: list the model ids this peer serves")
        api_key = text("apiKey").strip()
        if any(c.isspace() for c in api_key):
            raise ch.error(f"{path}.apiKey", "must not contain whitespace")
        strip, set_params, by_id = _build_filters(ch, p.get("filters"), f"{path}.filters", scope, final)
        peers[pid] = PeerConfig(
            id=pid,
            proxy=proxy,
            api_key=api_key,
            models=tuple(names),
            strip_params=strip,
            set_params=set_params,
            set_params_by_id=by_id,
            timeouts=_build_timeouts(ch, p.get("timeouts"), f"{path}.timeouts", PEER_TIMEOUTS),
        )
    return peers


def _peer_routes(ch: _Checker, peers: dict[str, PeerConfig], models: dict[str, ModelConfig],
                 aliases: dict[str, str]) -> dict[str, PeerModel]:
    """
    Every name that reaches a peer: ``peer/model`` always; a bare model id when one peer alone
    serves it and no local model, alias or ``peer/model`` name has it.
    """
    routes: dict[str, PeerModel] = {}
    bare: dict[str, list[PeerModel]] = {}
    for pid in sorted(peers):
        for name in peers[pid].models:
            target = PeerModel(peers[pid], name)
            fqn = target.fqn
            where = f"peers.{pid}.models"
            # Unique: peer ids have no "/", and a peer lists each model once.
            if fqn in models:
                raise ch.error(where, f"peer model name '{fqn}' is also a local model id")
            if fqn in aliases:
                raise ch.error(where, f"peer model name '{fqn}' is also an alias of model '{aliases[fqn]}'")
            routes[fqn] = target
            bare.setdefault(name, []).append(target)
    for name, targets in bare.items():
        if len(targets) == 1 and name not in routes and name not in models and name not in aliases:
            routes[name] = targets[0]
    return routes


def _build_selectors(ch: _Checker, raw: Any, models: dict[str, ModelConfig], aliases: dict[str, str],
                     groups: dict[str, GroupConfig], routes: dict[str, PeerModel]) -> dict[str, SelectorConfig]:
    raw_selectors = ch.mapping(raw, "selectors")
    selectors: dict[str, SelectorConfig] = {}
    for sid, sraw in raw_selectors.items():
        path = _join("selectors", sid)
        if not isinstance(sid, str) or not sid.strip():
            raise ch.error(path, "selector ids must be non-empty strings (quote it)")
        if sid in models:
            raise ch.error(path, f"'{sid}' is also a model id")
        if sid in aliases:
            raise ch.error(path, f"'{sid}' is also an alias of model '{aliases[sid]}'")
        if sid in routes and routes[sid].fqn == sid:
            raise ch.error(path, f"'{sid}' is also the name of a peer model")
        s = ch.mapping(sraw, path)
        ch.known(s, path, _SELECTOR_KEYS)
        if s.get("strategy") is None:
            raise ch.error(f"{path}.strategy", "missing: use " + ", ".join(SELECTOR_STRATEGIES))
        strategy = ch.choice(s.get("strategy"), f"{path}.strategy", "", SELECTOR_STRATEGIES)
        targets = ch.strings(s.get("targets"), f"{path}.targets")
        if not targets:
            raise ch.error(f"{path}.targets", "missing: list at least one model")
        resolved: list[str] = []
        for i, target in enumerate(targets):
            where = f"{path}.targets[{i}]"
            if target in raw_selectors:
                raise ch.error(where, f"'{target}' is a selector; a selector cannot target another")
            local = target if target in models else aliases.get(target)
            if local is None and target not in routes:
                raise ch.error(where, f"unknown model '{target}'")
            if strategy == "warm" and local is None:
                raise ch.error(where, f"'{target}' is a peer model; warm selectors need local models")
            real = local or routes[target].fqn
            if strategy == "spillover" and real in resolved:
                raise ch.error(where, f"'{target}' is model '{real}' again")
            resolved.append(real)
        settings = ch.mapping(s.get("settings"), f"{path}.settings")
        ch.known(settings, f"{path}.settings", frozenset({"spillover"}))
        spillover = ch.integer(settings.get("spillover"), f"{path}.settings.spillover", 1, minimum=1)
        if strategy == "spillover":
            _check_coexist(ch, path, [r for r in resolved if r in models], groups)
        selectors[sid] = SelectorConfig(
            id=sid,
            strategy=strategy,
            targets=tuple(targets),
            spillover=spillover,
            name=ch.string(s.get("name"), f"{path}.name").strip(),
            description=ch.string(s.get("description"), f"{path}.description").strip(),
            unlisted=ch.boolean(s.get("unlisted"), f"{path}.unlisted", False),
            metadata=ch.mapping(s.get("metadata"), f"{path}.metadata"),
        )
    return selectors


def _check_coexist(ch: _Checker, path: str, local: list[str], groups: dict[str, GroupConfig]) -> None:
    """
    A spillover selector's local targets must be able to run together: all members of one
    group with ``swap: false``.
    """
    if len(local) <= 1:
        return
    owner = {m: g for g in groups.values() for m in g.members}
    group = owner[local[0]]
    if group.swap or any(owner[m].id != group.id for m in local[1:]):
        raise ch.error(f"{path}.targets", "spillover targets that are local models must run together:"
                       " put them in one group with swap: false")


def _build_profiles(ch: _Checker, raw: Any, models: dict[str, ModelConfig], aliases: dict[str, str],
                    routes: dict[str, PeerModel], selectors: dict[str, SelectorConfig]) -> dict[str, ProfileConfig]:
    profiles: dict[str, ProfileConfig] = {}
    for name, praw in ch.mapping(raw, "profiles").items():
        path = _join("profiles", name)
        if not isinstance(name, str) or not name.strip():
            raise ch.error(path, "profile names must be non-empty strings (quote it)")
        if isinstance(praw, list):
            raise ch.error(path, "must be a mapping with description and pins; the old list of"
                                 " models is gone (llama-swap replaced it with groups)")
        p = ch.mapping(praw, path)
        ch.known(p, path, frozenset({"description", "pins"}))
        pins: dict[str, str] = {}
        for pin, target in ch.mapping(p.get("pins"), f"{path}.pins").items():
            where = _join(f"{path}.pins", pin)
            if not isinstance(pin, str) or not pin.strip():
                raise ch.error(where, "pin names must be non-empty model names (quote it)")
            if pin in routes and routes[pin].fqn == pin:
                raise ch.error(where, f"'{pin}' is the name of a peer model; it cannot be pinned")
            target = ch.string(target, where).strip()
            if target and not (target in models or target in aliases or target in routes or target in selectors):
                raise ch.error(where, f"unknown model '{target}' (use \"\" or ~ to make '{pin}' unavailable)")
            pins[pin] = target
        if not pins:
            raise ch.error(f"{path}.pins", "missing: pin at least one name to a model")
        profiles[name] = ProfileConfig(name, ch.string(p.get("description"), f"{path}.description").strip(), pins)
    return profiles


def _build_upstream(ch: _Checker, raw: Any) -> tuple[re.Pattern[str], ...]:
    upstream = ch.mapping(raw, "upstream")
    ch.known(upstream, "upstream", frozenset({"ignorePaths"}))
    patterns = ch.strings(upstream.get("ignorePaths"), "upstream.ignorePaths") or list(DEFAULT_UPSTREAM_IGNORE_PATHS)
    compiled = []
    for i, pattern in enumerate(patterns):
        try:
            compiled.append(re.compile(pattern))
        except re.error as e:
            raise ch.error(f"upstream.ignorePaths[{i}]", f"not a regular expression: {e}") from None
    return tuple(compiled)

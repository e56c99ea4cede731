# -*- test-case-name: tests.test_config -*-
"""
A whole configuration document: its top-level keys, each section built in turn, and the `Config`
they make.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from swapproxy.config.checker import Checker, ConfigError, join, show
from swapproxy.config.clients import build_api_keys, build_cors, build_limits
from swapproxy.config.forwarding import build_timeouts
from swapproxy.config.macros import MacroScope, macro_defs
from swapproxy.config.models import (
    HANG_KEYS,
    ModelDefaults,
    build_aliases,
    build_default_model,
    build_hang_limits,
    build_model,
)
from swapproxy.config.peers import NO_EFFECT_KEYS, build_head_keys
from swapproxy.config.reading import read_yaml
from swapproxy.config.routing import build_memory_budget, build_router, build_scheduler
from swapproxy.config.settings import (
    DEFAULT_HEALTH_CHECK_TIMEOUT,
    DEFAULT_LOG_TIME_FORMAT,
    HEALTH_CHECK_CEILING_FACTOR,
    LOADING_STATE_FIELDS,
    LOG_LEVELS,
    LOG_TO_STDOUT,
    Config,
    HangLimits,
    ModelConfig,
    PeerModel,
    SelectorConfig,
    SlotCacheConfig,
    Timeouts,
    start_ceiling,
)
from swapproxy.config.storage import build_slot_cache, build_store

_TOP_KEYS = frozenset({
    "healthCheckTimeout", "healthCheckCeiling", "logLevel", "logToStdout", "logTimeFormat", "startPort", "macros",
    "models", "groups", "hooks", "sendLoadingState", "loadingStateField", "globalTTL",
    "unloadTimeout", "apiKeys", "metricsMaxInMemory", "logRequests", "profiles", "limits",
    "defaultModel", "cors", "store",
    # llama-swap head's keys of issue 14: see swapproxy.config.peers.
    "peers", "selectors", "includeAliasesInList", "upstream",
    # Scheduling (issue 12): swapproxy.config.routing, memoryBudget.
    "routing", "matrix", "memoryBudget", "slotCache"}) | HANG_KEYS


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


def _health_check_limits(ch: Checker, data: dict[Any, Any]) -> tuple[int, int]:
    """
    ``healthCheckTimeout`` (at least 15) and ``healthCheckCeiling`` (0: the default).
    """
    health = ch.integer(data.get("healthCheckTimeout"), "healthCheckTimeout", DEFAULT_HEALTH_CHECK_TIMEOUT)
    if health < 15:
        ch.warn(f"healthCheckTimeout: {health} is below the minimum of 15, using 15")
        health = 15
    ceiling = ch.integer(data.get("healthCheckCeiling"), "healthCheckCeiling", 0, minimum=0)
    if 0 < ceiling < health:
        raise ch.error("healthCheckCeiling", f"must be 0 (meaning {HEALTH_CHECK_CEILING_FACTOR} x "
                       f"healthCheckTimeout) or at least healthCheckTimeout ({health}), got {ceiling}")
    return health, ceiling


def _log_level(ch: Checker, data: dict[Any, Any]) -> str:
    level = ch.string(data.get("logLevel"), "logLevel", "info").strip().lower()
    if level not in LOG_LEVELS:
        ch.warn(f"logLevel: unknown level {show(data.get('logLevel'))}, using info")
        level = "info"
    if "logRequests" in data:
        ch.warn("logRequests: deprecated and ignored")
    return level


def _model_defaults(ch: Checker, data: dict[Any, Any], slot_cache: SlotCacheConfig, health: int,
                    ceiling: int) -> ModelDefaults:
    """
    The global keys that are each model's defaults.
    """
    # The global timeouts are each model's defaults (an extension: llama-swap has them per model).
    timeouts = build_timeouts(ch, data.get("timeouts"), "timeouts", Timeouts())
    return ModelDefaults(
        global_ttl=ch.integer(data.get("globalTTL"), "globalTTL", 0, minimum=0),
        unload_timeout=ch.number(data.get("unloadTimeout"), "unloadTimeout", 10.0),
        send_loading_state=ch.boolean(data.get("sendLoadingState"), "sendLoadingState", False),
        loading_state_field=ch.choice(data.get("loadingStateField"), "loadingStateField",
                                      "reasoning_content", LOADING_STATE_FIELDS),
        slot_cache=slot_cache.enabled,
        timeouts=timeouts,
        hang_limits=build_hang_limits(ch, data, "", HangLimits(), timeouts.response_header),
        health_check_timeout=health,
        start_ceiling=start_ceiling(health, ceiling),
    )


def _build_models(ch: Checker, raw: Any, global_macros: dict[str, Any], defaults: ModelDefaults,
                  start_port: int) -> dict[str, ModelConfig]:
    """
    ``models``, in sorted id order; each model whose ``cmd`` uses ``${PORT}`` gets the next port
    from ``start_port``.
    """
    raw_models = ch.mapping(raw, "models")
    for mid in raw_models:
        if not isinstance(mid, str) or not mid.strip():
            raise ch.error(join("models", mid), "model ids must be non-empty strings (quote it)")
    if not raw_models:
        ch.warn("models: no models configured")
    models: dict[str, ModelConfig] = {}
    next_port = start_port
    for mid in sorted(raw_models):
        models[mid] = build_model(ch, mid, raw_models[mid], global_macros, defaults, next_port)
        next_port += models[mid].port is not None
    return models


def _startup_hooks(ch: Checker, raw: Any) -> dict[Any, Any]:
    """
    ``hooks.on_startup``.
    """
    hooks = ch.mapping(raw, "hooks")
    ch.known(hooks, "hooks", frozenset({"on_startup"}))
    on_startup = ch.mapping(hooks.get("on_startup"), "hooks.on_startup")
    ch.known(on_startup, "hooks.on_startup", frozenset({"preload"}))
    return on_startup


def _build_preload(ch: Checker, on_startup: dict[Any, Any], models: dict[str, ModelConfig], aliases: dict[str, str],
                   selectors: Mapping[str, SelectorConfig], peer_routes: Mapping[str, PeerModel]) -> tuple[str, ...]:
    """
    ``hooks.on_startup.preload``, as model ids in order without repeats; names that are no
    local model are warned about and left out.
    """
    preload: list[str] = []
    for name in ch.strings(on_startup.get("preload"), "hooks.on_startup.preload", blank_ok=True):
        name = name.strip()
        selector = selectors.get(name)
        if selector is not None:
            # A selector preloads the first of its targets that is a local model.
            name = next((t for t in selector.targets if t in models or t in aliases), name)
        target = models.get(name) or models.get(aliases.get(name, ""))
        if target is None and name in peer_routes:
            ch.warn(f"hooks.on_startup.preload: '{name}' is a peer model; only local models are preloaded")
        elif target is None and name:
            ch.warn(f"hooks.on_startup.preload: unknown model '{name}' ignored")
        elif target is not None and target.id not in preload:
            preload.append(target.id)
    return tuple(preload)


def _build(text: str, source: str, environ: Mapping[str, str]) -> Config:
    ch = Checker(source)
    data = read_yaml(text, ch, environ)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ch.error("(top level)", f"must be a mapping of settings, got {show(data)}")
    ch.known(data, "", _TOP_KEYS | frozenset(NO_EFFECT_KEYS))
    global_macros = macro_defs(ch, data.get("macros"), "macros")
    # llama-swap: "global macros can be used in any configuration value". The models and the
    # peers expand them in their own scopes; keys swapproxy ignores are left as written.
    top = MacroScope(ch, None, dict(global_macros))
    data = {key: top.typed(value, join("", key)) if key in _TOP_KEYS - {"macros", "models", "peers"} else value
            for key, value in data.items()}

    health, ceiling = _health_check_limits(ch, data)
    level = _log_level(ch, data)
    metrics_max = ch.integer(data.get("metricsMaxInMemory"), "metricsMaxInMemory", 1000)
    limits = build_limits(ch, data.get("limits"))
    store_path, store_max_rows = build_store(ch, data.get("store"))
    api_keys = build_api_keys(ch, data.get("apiKeys"))
    slot_cache = build_slot_cache(ch, data.get("slotCache"))
    defaults = _model_defaults(ch, data, slot_cache, health, ceiling)
    start_port = ch.integer(data.get("startPort"), "startPort", 5800, minimum=1, maximum=65535)

    models = _build_models(ch, data.get("models"), global_macros, defaults, start_port)
    aliases = build_aliases(ch, models)
    groups, matrix = build_router(ch, data, models, aliases)
    scheduler = build_scheduler(ch, data.get("routing"), models, aliases)
    budget, budget_auto = build_memory_budget(ch, data.get("memoryBudget"))
    default_model = build_default_model(ch, data.get("defaultModel"), models, aliases)
    cors = build_cors(ch, data.get("cors"))
    on_startup = _startup_hooks(ch, data.get("hooks"))
    head = build_head_keys(ch, data, models, aliases, groups, global_macros)
    preload = _build_preload(ch, on_startup, models, aliases, head["selectors"], head["peer_routes"])

    if ch.unsupported:
        ch.warnings.insert(0, f"{source}: unsupported keys ignored: {', '.join(ch.unsupported)}")
    return Config(
        source=source,
        health_check_timeout=health,
        log_level=level,
        log_to_stdout=ch.choice(data.get("logToStdout"), "logToStdout", "proxy", LOG_TO_STDOUT),
        start_port=start_port,
        global_ttl=defaults.global_ttl,
        unload_timeout=defaults.unload_timeout,
        send_loading_state=defaults.send_loading_state,
        loading_state_field=defaults.loading_state_field,
        api_keys=api_keys,
        models=models,
        groups=groups,
        aliases=aliases,
        preload=preload,
        warnings=tuple(ch.warnings),
        log_time_format=ch.string(data.get("logTimeFormat"), "logTimeFormat", DEFAULT_LOG_TIME_FORMAT).strip(),
        metrics_max_in_memory=metrics_max if metrics_max > 0 else 1000,
        limits=limits,
        health_check_ceiling=ceiling,
        default_model=default_model,
        cors=cors,
        store_path=store_path,
        store_max_rows=store_max_rows,
        notices=tuple(ch.notices),
        **head,
        hang_limits=defaults.hang_limits,
        slot_cache=slot_cache,
        scheduler=scheduler,
        matrix=matrix,
        memory_budget=budget,
        memory_budget_auto=budget_auto,
    )

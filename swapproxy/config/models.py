# -*- test-case-name: tests.test_config -*-
"""
The ``models`` section: one `ModelConfig` per model, its aliases, and ``defaultModel``.

A model's own keys override the global ones (`ModelDefaults`); its macros are expanded in every
value, and ``${PORT}`` is the next free port from ``startPort`` when ``cmd`` uses it. The
default ``proxy`` is ``http://127.0.0.1:${PORT}`` (``localhost`` may resolve to ``::1``).
"""

from __future__ import annotations

from typing import Any

import attrs

from swapproxy.config.checker import Checker, join, show
from swapproxy.config.forwarding import build_filters, build_timeouts, check_url
from swapproxy.config.macros import MacroScope, macro_defs, place_port
from swapproxy.config.settings import (
    DEFAULT_CONCURRENCY_LIMIT,
    LOADING_STATE_FIELDS,
    MODALITIES,
    Capabilities,
    HangLimits,
    ModelConfig,
    Timeouts,
)
from swapproxy.config.shellwords import drop_comment_lines, split_command

#: The keys of `HangLimits`, global and per model.
HANG_KEYS = frozenset({"streamIdleTimeout", "healthCheckInterval", "timeouts"})
_MODEL_KEYS = frozenset({
    "cmd", "cmdStop", "proxy", "checkEndpoint", "ttl", "aliases", "useModelName", "env",
    "unlisted", "name", "description", "metadata", "concurrencyLimit", "sendLoadingState",
    "loadingStateField", "macros", "filters", "unloadTimeout", "capabilities", "compat", "slotCache", "memory"}) | HANG_KEYS


@attrs.frozen
class ModelDefaults:
    """
    What a model's settings are when its own keys do not say: the global keys, checked.
    """

    global_ttl: int
    unload_timeout: float
    send_loading_state: bool
    loading_state_field: str
    slot_cache: bool
    timeouts: Timeouts
    hang_limits: HangLimits
    health_check_timeout: int
    start_ceiling: float


def build_hang_limits(ch: Checker, raw: dict[Any, Any], path: str, default: HangLimits,
                      response_header: float) -> HangLimits:
    """
    The `HangLimits` of the mapping ``raw`` (the top level, or a model), ``default`` where it
    says nothing; ``response_header`` is its ``timeouts.responseHeader``, parsed with the rest
    of ``timeouts`` by `build_timeouts`.
    """

    def seconds(value: Any, key: str, fallback: float) -> float:
        return ch.number(value, join(path, key), fallback)

    return HangLimits(
        stream_idle_timeout=seconds(raw.get("streamIdleTimeout"), "streamIdleTimeout", default.stream_idle_timeout),
        response_header_timeout=response_header,
        health_check_interval=seconds(raw.get("healthCheckInterval"), "healthCheckInterval",
                                      default.health_check_interval),
    )


class _ModelKeys:
    """
    One model's mapping, read with its macros expanded and, once `command` has allocated it,
    ``${PORT}`` in place.
    """

    def __init__(self, ch: Checker, mid: str, raw: Any, global_macros: dict[str, Any]) -> None:
        self.ch = ch
        self.path = f"models.{mid}"
        self.raw = ch.mapping(raw, self.path)
        ch.known(self.raw, self.path, _MODEL_KEYS)
        defs = dict(global_macros)
        defs.update(macro_defs(ch, self.raw.get("macros"), f"{self.path}.macros"))
        self.scope = MacroScope(ch, mid, defs)
        self.port: int | None = None

    def get(self, key: str) -> Any:
        """
        A key's value with its macros expanded, as llama-swap expands every value of a model: a
        string that is exactly one macro takes the macro's type (``ttl: ${ttl}``); ``${PORT}``
        not yet.
        """
        value = self.raw.get(key)
        return None if value is None else self.scope.typed(value, self.where(key))

    def where(self, key: str) -> str:
        return f"{self.path}.{key}"

    def text(self, key: str, default: str = "") -> str:
        """A string key, its macros expanded (``${PORT}`` not yet)."""
        return self.scope.text(self.ch.string(self.raw.get(key), self.where(key), default), self.where(key))

    def command_text(self, key: str) -> str:
        """A ``cmd``/``cmdStop`` block without its comment lines, its macros expanded."""
        return self.scope.text(drop_comment_lines(self.ch.string(self.raw.get(key), self.where(key))), self.where(key))

    def final(self, where: str, value: Any, allow_pid: bool = False) -> Any:
        """``value`` with ``${PORT}`` in place; ``${PID}`` only where ``allow_pid``."""
        return place_port(self.ch, value, where, self.port, allow_pid)

    def final_text(self, key: str, default: str = "") -> str:
        return str(self.final(self.where(key), self.text(key, default))).strip()

    def command(self, next_port: int) -> tuple[str, str]:
        """
        ``cmd`` and ``proxy`` with macros expanded, and the port ``${PORT}`` stands for
        (``next_port`` if ``cmd`` uses it).
        """
        ch, where = self.ch, self.where
        if self.raw.get("cmd") is None:
            raise ch.error(where("cmd"), "missing: every model needs the command that starts its server")
        cmd = self.command_text("cmd")
        if not split_command(cmd):
            raise ch.error(where("cmd"), "empty command")
        proxy = self.text("proxy", "http://127.0.0.1:${PORT}")
        if "${PORT}" in cmd:
            self.port = next_port
            if next_port > 65535:
                raise ch.error(where("cmd"), f"no port left for ${{PORT}}: it would be {next_port}")
        elif "${PORT}" in proxy:
            if "proxy" in self.raw:
                problem = "uses ${PORT} but cmd does not - ${PORT} is only available when used in cmd"
            else:
                problem = ("is not set, so it defaults to http://127.0.0.1:${PORT}, but cmd does not use"
                           " ${PORT}; put ${PORT} in cmd or set proxy to the server's URL")
            raise ch.error(where("proxy"), problem)
        return cmd, proxy

    def env(self) -> tuple[tuple[str, str], ...]:
        env = []
        for i, entry in enumerate(self.ch.strings(self.raw.get("env"), self.where("env"))):
            where = f"{self.path}.env[{i}]"
            name, eq, value = entry.partition("=")
            if not eq or not name.strip():
                raise self.ch.error(where, f"must look like NAME=value, got {show(entry)}")
            env.append((name.strip(), self.final(where, self.scope.text(value, where))))
        return tuple(env)


def build_model(ch: Checker, mid: str, raw: Any, global_macros: dict[str, Any],
                defaults: ModelDefaults, next_port: int) -> ModelConfig:
    """
    The `ModelConfig` of ``models.<mid>``; ``next_port`` is the port its ``${PORT}`` gets.
    """
    keys = _ModelKeys(ch, mid, raw, global_macros)
    where = keys.where
    cmd, proxy = keys.command(next_port)
    stop_text = keys.command_text("cmdStop")
    proxy = check_url(ch, where("proxy"), keys.final(where("proxy"), proxy))
    check = keys.final_text("checkEndpoint", "/health") or "/health"
    env = keys.env()
    ttl = keys.get("ttl")
    if type(ttl) is int and ttl == -1:  # llama-swap's default: "use globalTTL"
        ttl = None
    strip, set_params, by_id = build_filters(ch, keys.get("filters"), where("filters"), keys.scope, keys.final)
    metadata = ch.mapping(keys.get("metadata"), where("metadata"))
    concurrency = ch.integer(keys.get("concurrencyLimit"), where("concurrencyLimit"), 0, minimum=0)
    timeouts = build_timeouts(ch, keys.get("timeouts"), where("timeouts"), defaults.timeouts)
    slot_cache = ch.boolean(keys.get("slotCache"), where("slotCache"), defaults.slot_cache)
    return ModelConfig(
        id=mid,
        cmd=tuple(split_command(keys.final(where("cmd"), cmd))),
        cmd_stop=tuple(split_command(keys.final(where("cmdStop"), stop_text, allow_pid=True))),
        proxy=proxy,
        check_endpoint=None if check == "none" else ("/" + check.lstrip("/")),
        ttl=ch.integer(ttl, where("ttl"), defaults.global_ttl, minimum=0),
        unload_timeout=(ch.number(keys.get("unloadTimeout"), where("unloadTimeout"), 0)
                        or defaults.unload_timeout),
        aliases=tuple(ch.strings(keys.get("aliases"), where("aliases"))),
        use_model_name=ch.string(keys.get("useModelName"), where("useModelName")).strip(),
        env=env,
        unlisted=ch.boolean(keys.get("unlisted"), where("unlisted"), False),
        name=keys.final_text("name"),
        description=keys.final_text("description"),
        metadata=keys.final(where("metadata"), keys.scope.typed(metadata, where("metadata"))),
        concurrency_limit=concurrency or DEFAULT_CONCURRENCY_LIMIT,
        send_loading_state=ch.boolean(keys.get("sendLoadingState"), where("sendLoadingState"),
                                      defaults.send_loading_state),
        loading_state_field=ch.choice(keys.get("loadingStateField"), where("loadingStateField"),
                                      defaults.loading_state_field, LOADING_STATE_FIELDS),
        port=keys.port,
        strip_params=strip,
        set_params=set_params,
        set_params_by_id=by_id,
        timeouts=timeouts,
        capabilities=_build_capabilities(ch, keys.get("capabilities"), where("capabilities")),
        ignore_websockets=_build_compat(ch, keys.get("compat"), where("compat")),
        hang_limits=build_hang_limits(ch, {key: keys.get(key) for key in HANG_KEYS}, keys.path,
                                      defaults.hang_limits, timeouts.response_header),
        slot_cache=slot_cache,
        memory=ch.memory_size(keys.get("memory"), where("memory")),
        health_check_timeout=defaults.health_check_timeout,
        start_ceiling=defaults.start_ceiling,
    )


def _build_capabilities(ch: Checker, raw: Any, path: str) -> Capabilities:
    caps = ch.mapping(raw, path)
    ch.known(caps, path, frozenset({"in", "out", "tools", "reranker", "context"}))
    modalities = {}
    for key in ("in", "out"):
        values = ch.strings(caps.get(key), f"{path}.{key}")
        for i, value in enumerate(values):
            if value not in MODALITIES:
                raise ch.error(f"{path}.{key}[{i}]",
                               f"unknown modality {show(value)}; use {', '.join(MODALITIES)}")
        modalities[key] = tuple(values)
    return Capabilities(
        inputs=modalities["in"],
        outputs=modalities["out"],
        tools=ch.boolean(caps.get("tools"), f"{path}.tools", False),
        reranker=ch.boolean(caps.get("reranker"), f"{path}.reranker", False),
        context=ch.integer(caps.get("context"), f"{path}.context", 0, minimum=0),
    )


def _build_compat(ch: Checker, raw: Any, path: str) -> bool:
    compat = ch.mapping(raw, path)
    ch.known(compat, path, frozenset({"ignoreWebsockets"}))
    return ch.boolean(compat.get("ignoreWebsockets"), f"{path}.ignoreWebsockets", False)


def build_aliases(ch: Checker, models: dict[str, ModelConfig]) -> dict[str, str]:
    """
    Each alias (``aliases``, and the ``filters.setParamsByID`` keys that are not the model's
    id) and its model's id. An alias equal to a model id is an error.
    """
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


def build_default_model(ch: Checker, raw: Any, models: dict[str, ModelConfig],
                        aliases: dict[str, str]) -> str:
    """
    ``defaultModel``, as a model id; "" when not set.
    """
    name = ch.string(raw, "defaultModel").strip()
    if not name:
        return ""
    if name in models:
        return name
    if name in aliases:
        return aliases[name]
    raise ch.error("defaultModel", f"unknown model {show(name)}; models are: {', '.join(models) or '(none)'}")

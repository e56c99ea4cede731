# -*- test-case-name: tests.test_config_head -*-
"""
The keys of llama-swap head (issue 14): ``peers`` (other servers whose models swapproxy relays
to), the names that route to them, ``selectors``, ``profiles``, ``includeAliasesInList``,
``upstream``, and the keys accepted without effect.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlsplit

from swapproxy.config.checker import Checker, join, show
from swapproxy.config.forwarding import build_filters, build_timeouts, check_url
from swapproxy.config.macros import MacroScope, place_port
from swapproxy.config.settings import (
    DEFAULT_UPSTREAM_IGNORE_PATHS,
    PEER_TIMEOUTS,
    SELECTOR_STRATEGIES,
    GroupConfig,
    ModelConfig,
    PeerConfig,
    PeerModel,
    ProfileConfig,
    SelectorConfig,
)

#: Top-level llama-swap keys that configure what swapproxy does not have (request captures, a
#: performance monitor, the llama-swap web UI): accepted, checked for their type, and named in
#: one notice, so that a llama-swap config starts unchanged.
NO_EFFECT_KEYS = {
    "captureBuffer": "request/response captures",
    "performance": "CPU/GPU sampling",
    "ui": "llama-swap's web UI settings",
}
_PEER_KEYS = frozenset({"proxy", "apiKey", "models", "filters", "timeouts"})
_SELECTOR_KEYS = frozenset({"strategy", "targets", "settings", "name", "description", "unlisted", "metadata"})


def build_head_keys(ch: Checker, data: dict[Any, Any], models: dict[str, ModelConfig],
                    aliases: dict[str, str], groups: dict[str, GroupConfig],
                    global_macros: dict[str, Any]) -> dict[str, Any]:
    """
    ``peers``, ``selectors``, ``profiles``, ``includeAliasesInList``, ``upstream`` and the keys
    without effect: the `Config` fields they make, by name.
    """
    for key, what in NO_EFFECT_KEYS.items():
        if key in data:
            if key == "captureBuffer":
                ch.integer(data[key], key, 0, minimum=0)
            else:
                ch.mapping(data[key], key)
    present = [key for key in NO_EFFECT_KEYS if key in data]
    if present:
        ch.notices.append(f"{ch.source}: accepted without effect (swapproxy has no "
                          + ", ".join(NO_EFFECT_KEYS[k] for k in present) + "): " + ", ".join(present))
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


def _build_peers(ch: Checker, raw: Any, global_macros: dict[str, Any]) -> dict[str, PeerConfig]:
    peers: dict[str, PeerConfig] = {}
    for pid, praw in ch.mapping(raw, "peers").items():
        path = join("peers", pid)
        if not isinstance(pid, str) or not pid.strip():
            raise ch.error(path, "peer ids must be non-empty strings (quote it)")
        if "/" in pid:
            raise ch.error(path, "a peer id must not contain '/': its models are named <peer>/<model>")
        p = ch.mapping(praw, path)
        ch.known(p, path, _PEER_KEYS)
        scope = MacroScope(ch, pid, dict(global_macros))

        def final(where: str, value: Any) -> Any:
            return place_port(ch, value, where, None)

        def text(key: str) -> str:
            return str(final(f"{path}.{key}", scope.text(ch.string(p.get(key), f"{path}.{key}"), f"{path}.{key}")))

        if p.get("proxy") is None:
            raise ch.error(f"{path}.proxy", "missing: every peer needs the base URL of its server")
        proxy = check_url(ch, f"{path}.proxy", text("proxy").strip())
        url = urlsplit(proxy)
        if url.username is not None or url.password is not None:
            raise ch.error(f"{path}.proxy", "must not contain a user name or password: set the peer's apiKey")
        if url.query or url.fragment or proxy.endswith(("?", "#")):
            raise ch.error(f"{path}.proxy", f"must not have a query or fragment (each request's path is appended"
                                            f" to it), got {show(proxy)}")
        names: list[str] = []
        for i, name in enumerate(ch.strings(p.get("models"), f"{path}.models")):
            name = final(f"{path}.models[{i}]", scope.text(name, f"{path}.models[{i}]")).strip()
            if name in names:
                raise ch.error(f"{path}.models[{i}]", f"{show(name)} is listed twice")
            names.append(name)
        if not names:
            raise ch.error(f"{path}.models", "missing: list the model ids this peer serves")
        api_key = text("apiKey").strip()
        if any(c.isspace() for c in api_key):
            raise ch.error(f"{path}.apiKey", "must not contain whitespace")
        strip, set_params, by_id = build_filters(ch, p.get("filters"), f"{path}.filters", scope, final)
        peers[pid] = PeerConfig(
            id=pid,
            proxy=proxy,
            api_key=api_key,
            models=tuple(names),
            strip_params=strip,
            set_params=set_params,
            set_params_by_id=by_id,
            timeouts=build_timeouts(ch, p.get("timeouts"), f"{path}.timeouts", PEER_TIMEOUTS),
        )
    return peers


def _peer_routes(ch: Checker, peers: dict[str, PeerConfig], models: dict[str, ModelConfig],
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


def _build_selectors(ch: Checker, raw: Any, models: dict[str, ModelConfig], aliases: dict[str, str],
                     groups: dict[str, GroupConfig], routes: dict[str, PeerModel]) -> dict[str, SelectorConfig]:
    raw_selectors = ch.mapping(raw, "selectors")
    selectors: dict[str, SelectorConfig] = {}
    for sid, sraw in raw_selectors.items():
        path = join("selectors", sid)
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


def _check_coexist(ch: Checker, path: str, local: list[str], groups: dict[str, GroupConfig]) -> None:
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


def _build_profiles(ch: Checker, raw: Any, models: dict[str, ModelConfig], aliases: dict[str, str],
                    routes: dict[str, PeerModel], selectors: dict[str, SelectorConfig]) -> dict[str, ProfileConfig]:
    profiles: dict[str, ProfileConfig] = {}
    for name, praw in ch.mapping(raw, "profiles").items():
        path = join("profiles", name)
        if not isinstance(name, str) or not name.strip():
            raise ch.error(path, "profile names must be non-empty strings (quote it)")
        if isinstance(praw, list):
            raise ch.error(path, "must be a mapping with description and pins; the old list of"
                                 " models is gone (llama-swap replaced it with groups)")
        p = ch.mapping(praw, path)
        ch.known(p, path, frozenset({"description", "pins"}))
        pins: dict[str, str] = {}
        for pin, target in ch.mapping(p.get("pins"), f"{path}.pins").items():
            where = join(f"{path}.pins", pin)
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


def _build_upstream(ch: Checker, raw: Any) -> tuple[re.Pattern[str], ...]:
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

# -*- test-case-name: tests.test_config -*-
"""
How requests to a model or a peer are sent: its URL, its ``filters`` (request rewriting) and its
``timeouts``. Models and peers share these keys.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from swapproxy.config.checker import Checker, join, show
from swapproxy.config.macros import MacroScope
from swapproxy.config.settings import Timeouts

_FILTER_KEYS = frozenset({"stripParams", "strip_params", "setParams", "setParamsByID"})
_TIMEOUT_KEYS = {"connect": "connect", "keepalive": "keepalive", "responseHeader": "response_header",
                 "tlsHandshake": "tls_handshake", "expectContinue": "expect_continue",
                 "idleConn": "idle_conn"}


def build_filters(
    ch: Checker, raw: Any, fpath: str, scope: MacroScope, final: Callable[[str, Any], Any]
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
        where = join(f"{fpath}.setParamsByID", key)
        name = final(where, scope.text(ch.string(key, where), where)).strip()
        if not name:
            raise ch.error(where, "keys must be non-empty model names")
        params = final(where, scope.typed(ch.mapping(params, where), where))
        _check_params(ch, params, where)
        by_id[name] = params
    return tuple(sorted(strip - {"", "model"})), set_params, by_id


def build_timeouts(ch: Checker, raw: Any, path: str, default: Timeouts) -> Timeouts:
    """
    A ``timeouts`` mapping (of a model or a peer): seconds, 0 to disable; unset keys keep
    ``default``'s.
    """
    timeouts = ch.mapping(raw, path)
    ch.known(timeouts, path, frozenset(_TIMEOUT_KEYS))
    values = {attr: ch.number(timeouts.get(key), f"{path}.{key}", getattr(default, attr))
              for key, attr in _TIMEOUT_KEYS.items()}
    return Timeouts(**values)


def check_url(ch: Checker, where: str, proxy: str) -> str:
    """
    ``proxy`` if it is an ``http://`` or ``https://`` URL with a host (and no port 0).
    """
    try:
        url = urlsplit(proxy)
        valid = url.scheme in ("http", "https") and bool(url.hostname) and url.port != 0
    except ValueError:
        valid = False
    if not valid:
        raise ch.error(where, f"must be an http:// or https:// URL with a host, got {show(proxy)}")
    return proxy


def _check_params(ch: Checker, params: dict[Any, Any], where: str) -> None:
    """
    Check a ``setParams`` mapping in place: string keys, JSON values, and no key that would set
    ``model`` (or a path inside it), which is dropped with a warning.
    """
    for key in list(params):
        path = join(where, key)
        if not isinstance(key, str) or not key.strip():
            raise ch.error(path, "keys must be non-empty strings, JSON key paths such as a.b (quote a number)")
        if key.split(".", 1)[0].strip() == "model":
            del params[key]
            ch.warn(f"{path}: ignored, the model field cannot be set")
            continue
        _check_json(ch, params[key], path)


def _check_json(ch: Checker, value: Any, path: str) -> None:
    """Reject a YAML value that has no JSON equivalent (dates, binary, sets)."""
    if value is None or isinstance(value, (str, bool, int, float)):
        return
    if isinstance(value, list):
        for i, item in enumerate(value):
            _check_json(ch, item, f"{path}[{i}]")
    elif isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise ch.error(join(path, key), "JSON object keys must be strings (quote it)")
            _check_json(ch, item, join(path, key))
    else:
        raise ch.error(path, f"must be a JSON value (string, number, boolean, null, list or"
                             f" mapping), got {show(value)} (quote it to send it as a string)")

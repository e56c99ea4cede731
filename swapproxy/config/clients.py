# -*- test-case-name: tests.test_config -*-
"""
What clients may do: ``limits`` (sizes and timeouts of what one client sends), ``cors`` (which
browser pages may call swapproxy) and ``apiKeys``.
"""

from __future__ import annotations

import re
from typing import Any

from swapproxy.config.checker import Checker, show
from swapproxy.config.settings import CorsConfig, Limits

_LIMIT_KEYS = frozenset({"maxBodySize", "maxHeaderSize", "requestTimeout", "idleTimeout",
                         "maxConnections"})
_CORS_KEYS = frozenset({"allowedOrigins", "allowCredentials", "allowedHeaders", "maxAge"})
_ORIGIN = re.compile(r"[a-z][a-z0-9+.-]*://(\[[0-9a-f:.]+\]|[a-z0-9._~%!$&'()*+,;=-]+)(:[0-9]{1,5})?", re.IGNORECASE)
_HEADER_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


def build_limits(ch: Checker, raw: Any) -> Limits:
    """``limits``."""
    limits = ch.mapping(raw, "limits")
    ch.known(limits, "limits", _LIMIT_KEYS)
    default = Limits()
    header_size = ch.size(limits.get("maxHeaderSize"), "limits.maxHeaderSize",
                          default.max_header_size, 1024, zero_ok=False)
    return Limits(
        max_body_size=ch.size(limits.get("maxBodySize"), "limits.maxBodySize", default.max_body_size, 1),
        max_header_size=header_size,
        request_timeout=ch.number(limits.get("requestTimeout"), "limits.requestTimeout",
                                  default.request_timeout),
        idle_timeout=ch.number(limits.get("idleTimeout"), "limits.idleTimeout",
                               default.idle_timeout),
        max_connections=ch.integer(limits.get("maxConnections"), "limits.maxConnections",
                                   default.max_connections, minimum=0),
    )


def build_cors(ch: Checker, raw: Any) -> CorsConfig:
    """``cors``; origins and header names are checked for their form."""
    cors = ch.mapping(raw, "cors")
    ch.known(cors, "cors", _CORS_KEYS)
    default = CorsConfig()
    origins = default.allowed_origins
    if cors.get("allowedOrigins") is not None:
        origins = tuple(o.strip().rstrip("/") for o in ch.strings(cors["allowedOrigins"], "cors.allowedOrigins"))
        for i, origin in enumerate(origins):
            if origin not in ("*", "localhost") and not _ORIGIN.fullmatch(origin):
                raise ch.error(f"cors.allowedOrigins[{i}]", "must be \"*\", \"localhost\" or an origin such as"
                               f" https://chat.example.com or http://localhost:3000 (no path), got {show(origin)}")
    headers = default.allowed_headers
    if cors.get("allowedHeaders") is not None:
        headers = tuple(h.strip() for h in ch.strings(cors["allowedHeaders"], "cors.allowedHeaders"))
        for i, name in enumerate(headers):
            if name != "*" and not _HEADER_TOKEN.fullmatch(name):
                raise ch.error(f"cors.allowedHeaders[{i}]", f"must be \"*\" or a header name, got {show(name)}")
    return CorsConfig(
        allowed_origins=origins,
        allow_credentials=ch.boolean(cors.get("allowCredentials"), "cors.allowCredentials",
                                     default.allow_credentials),
        allowed_headers=headers,
        max_age=ch.integer(cors.get("maxAge"), "cors.maxAge", default.max_age, minimum=0),
    )



def build_api_keys(ch: Checker, raw: Any) -> tuple[str, ...]:
    """``apiKeys``: the keys a client may present, none with whitespace."""
    api_keys = ch.strings(raw, "apiKeys")
    for i, key in enumerate(api_keys):
        if any(c.isspace() for c in key):
            raise ch.error(f"apiKeys[{i}]", "must not contain whitespace")
    return tuple(api_keys)

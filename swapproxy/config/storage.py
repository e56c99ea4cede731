# -*- test-case-name: tests.test_config -*-
"""
What swapproxy keeps on disk: the activity database (``store``) and llama-server's saved slots
(``slotCache``).
"""

from __future__ import annotations

import os
from typing import Any

from swapproxy.config.checker import Checker, show
from swapproxy.config.settings import SlotCacheConfig

_STORE_KEYS = frozenset({"path", "maxRows"})
_SLOT_CACHE_KEYS = frozenset({"enabled", "path", "maxSize", "minFree", "saveTimeout", "restoreTimeout"})


def build_slot_cache(ch: Checker, raw: Any) -> SlotCacheConfig:
    """``slotCache``: ``true``/``false``, or a mapping of settings (enabled unless it says not)."""
    if raw is None or isinstance(raw, bool):
        return SlotCacheConfig(enabled=bool(raw))
    if not isinstance(raw, dict):
        raise ch.error("slotCache", f"must be true, false or a mapping of settings, got {show(raw)}")
    settings = ch.mapping(raw, "slotCache")
    ch.known(settings, "slotCache", _SLOT_CACHE_KEYS)
    default = SlotCacheConfig()
    path = ch.string(settings.get("path"), "slotCache.path").strip()
    return SlotCacheConfig(
        enabled=ch.boolean(settings.get("enabled"), "slotCache.enabled", True),
        path=os.path.expanduser(path) if path else None,
        max_size=ch.size(settings.get("maxSize"), "slotCache.maxSize", default.max_size, 1),
        min_free=ch.size(settings.get("minFree"), "slotCache.minFree", default.min_free, 1),
        save_timeout=ch.number(settings.get("saveTimeout"), "slotCache.saveTimeout", default.save_timeout),
        restore_timeout=ch.number(settings.get("restoreTimeout"), "slotCache.restoreTimeout",
                                  default.restore_timeout),
    )


def build_store(ch: Checker, raw: Any) -> tuple[str, int]:
    """
    ``store``: the path of the activity database (``""`` for the default) and its ``maxRows``.
    """
    store = ch.mapping(raw, "store")
    ch.known(store, "store", _STORE_KEYS)
    return (os.path.expanduser(ch.string(store.get("path"), "store.path").strip()),
            ch.integer(store.get("maxRows"), "store.maxRows", 10000, minimum=1))

# -*- test-case-name: tests.test_config -*-
"""
Type checks of YAML values at key paths, and the one error they raise.

Every builder of `swapproxy.config` reads its section through a `Checker`, so that every problem
a user can cause is a `ConfigError` whose message names the file, the key path and the problem.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([kmg]i?b?|b)?\s*", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "ki": 1024, "kib": 1024, "m": 1000**2,
               "mb": 1000**2, "mi": 1024**2, "mib": 1024**2, "g": 1000**3, "gb": 1000**3,
               "gi": 1024**3, "gib": 1024**3}


class ConfigError(Exception):
    """
    A configuration that cannot be used.

    ``str(err)`` is one line, ``<file>: <key.path>: <problem>``, for example
    ``config.yaml: models.qwen.ttl: must be an integer >= 0, got "ten"``.
    """

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.splitlines()))


def join(path: str, key: object) -> str:
    """
    The key path of ``key`` inside ``path`` (``models.qwen`` + ``ttl``), for messages.
    """
    text = key if isinstance(key, str) and key.isprintable() else show(key)
    return f"{path}.{text}" if path else text


def show(value: object) -> str:
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



class Checker:
    """
    Type-checks values at key paths and collects warnings, all named after one source.

    Each check returns the value (or ``default`` when it is ``None``: the key is not set) and
    raises `ConfigError` when it has the wrong type.

    :ivar warnings: ready-to-log lines about what was used in another way than written.
    :ivar notices: ready-to-log lines about keys accepted without effect.
    :ivar unsupported: the key paths of keys this version does not know.
    """

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
            raise self.error(path, f"must be a mapping, got {show(value)}")
        return value

    def known(self, mapping: dict[Any, Any], path: str, allowed: frozenset[str]) -> None:
        self.unsupported.extend(join(path, k) for k in mapping if k not in allowed)

    def integer(self, value: Any, path: str, default: int, minimum: int | None = None,
                maximum: int | None = None) -> int:
        if value is None:
            return default
        if (isinstance(value, int) and not isinstance(value, bool)
                and (minimum is None or value >= minimum) and (maximum is None or value <= maximum)):
            return value
        want = "an integer" + (f" >= {minimum}" if minimum is not None else "")
        want += f" and <= {maximum}" if maximum is not None else ""
        raise self.error(path, f"must be {want}, got {show(value)}")

    def number(self, value: Any, path: str, default: float) -> float:
        if value is None:
            return default
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if math.isfinite(value) and value >= 0:
                return float(value)
        raise self.error(path, f"must be a number of seconds >= 0, got {show(value)}")

    def boolean(self, value: Any, path: str, default: bool) -> bool:
        if value is None:
            return default
        if not isinstance(value, bool):
            raise self.error(path, f"must be true or false, got {show(value)}")
        return value

    def string(self, value: Any, path: str, default: str = "") -> str:
        if value is None:
            return default
        if not isinstance(value, str):
            raise self.error(path, f"must be a string, got {show(value)}")
        return value

    def strings(self, value: Any, path: str, blank_ok: bool = False) -> list[str]:
        if value is None:
            return []
        if isinstance(value, list):
            for i, item in enumerate(value):
                if not isinstance(item, str) or not (blank_ok or item.strip()):
                    raise self.error(f"{path}[{i}]", f"must be a non-empty string, got {show(item)}")
            return value
        raise self.error(path, f"must be a list of strings, got {show(value)}")

    def choice(self, value: Any, path: str, default: str, choices: tuple[str, ...]) -> str:
        text = self.string(value, path, default).strip().lower()
        if text not in choices:
            raise self.error(path, f"must be one of {', '.join(choices)}, got {show(value)}")
        return text

    def size(self, value: Any, path: str, default: int, minimum: int, zero_ok: bool = True) -> int:
        """A byte count: an integer, or a string such as ``64MiB``, ``512 KiB`` or ``1.5GB``."""
        if value is None:
            return default
        count = byte_count(value)
        if count is None or count >= 1 << 62 or not ((count == 0 and zero_ok) or count >= minimum):
            no_limit = "0 (no limit) or " if zero_ok else ""
            raise self.error(path, f"must be {no_limit}a size of at least {minimum} bytes, such as"
                                   f" 1048576, 512KiB or 64MiB, got {show(value)}")
        return int(count)

    def memory_size(self, value: Any, path: str, auto_ok: bool = False) -> int | None:
        """
        A memory size (``memory``, ``memoryBudget``): an integer of bytes or a string such as
        ``6GiB``, ``512MiB`` or ``1.5GB``; ``None`` when not set.
        """
        if value is None:
            return None
        count = byte_count(value)
        if count is None or not 1 <= count < 1 << 62:
            auto = " or auto (what is free when swapproxy starts)" if auto_ok else ""
            raise self.error(path, f"must be a size such as 6GiB, 512MiB or 8000000000{auto}, got {show(value)}")
        return int(count)


def byte_count(value: Any) -> float | None:
    """
    The bytes an integer or a size string (``64MiB``, ``512 KiB``, ``1.5GB``) stands for, or ``None``.
    """
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    match = _SIZE.fullmatch(value) if isinstance(value, str) else None
    return float(match.group(1)) * _SIZE_UNITS[(match.group(2) or "").lower()] if match else None

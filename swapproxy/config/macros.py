# -*- test-case-name: tests.test_config -*-
"""
Macros (``macros``, global and per model or peer) and the ``${PORT}`` / ``${PID}`` placeholders.

Unlike llama-swap, a macro may use any other macro, declared before or after it, and a loop is an
error; configs that llama-swap accepts (LIFO: only earlier macros) expand identically. Macros are
expanded in every text field of a model, and ``${PORT}`` is available in all of them once ``cmd``
uses it.
"""

from __future__ import annotations

import re
from typing import Any

from swapproxy.config.checker import Checker, join, show

_RESERVED_MACROS = frozenset({"PORT", "MODEL_ID", "PID"})
_MACRO_NAME = re.compile(r"[A-Za-z0-9_-]{1,63}")
_MACRO_REF = re.compile(r"\$\{([A-Za-z0-9_.-]+)\}")
_MAX_EXPANSION = 1 << 20


def _macro_text(value: Any) -> str:
    """Format a typed macro value for interpolation into a string, as Go's ``%v`` would."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e21:
        return str(int(value))
    return str(value)


def macro_defs(ch: Checker, value: Any, path: str) -> dict[str, Any]:
    """
    The macro definitions of a ``macros`` mapping, by name; each is checked on its own.
    """
    defs: dict[str, Any] = {}
    for name, macro in ch.mapping(value, path).items():
        where = join(path, name)
        if not isinstance(name, str) or not _MACRO_NAME.fullmatch(name):
            raise ch.error(where, "macro names must match [A-Za-z0-9_-]+ and be under 64 characters")
        if name in _RESERVED_MACROS:
            raise ch.error(where, f"'{name}' is a reserved macro name")
        if not isinstance(macro, (str, int, float)):
            raise ch.error(where, f"must be a string, number or boolean, got {show(macro)}")
        if isinstance(macro, str) and f"${{{name}}}" in macro:
            raise ch.error(where, f"macro '{name}' contains self-reference")
        defs[name] = macro
    return defs


class MacroScope:
    """
    The macros visible to one model (or, without ``model_id``, to the top-level settings, where
    ``${MODEL_ID}`` is left in place), resolved on demand by name with loop detection.
    ``${PORT}`` and ``${PID}`` are left in place for later.
    """

    def __init__(self, ch: Checker, model_id: str | None, defs: dict[str, Any]) -> None:
        self.ch, self.defs = ch, defs
        self.resolved: dict[str, Any] = {} if model_id is None else {"MODEL_ID": model_id}

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
            if name in ("PORT", "PID") or (name == "MODEL_ID" and name not in self.resolved):
                return match.group(0)
            if name not in self.defs and name not in self.resolved:
                via = f" (used by macro '{chain[-1]}')" if chain else ""
                raise self.ch.error(path, f"unknown macro '${{{name}}}'{via}")
            return _macro_text(self.value(name, path, chain))

        result = _MACRO_REF.sub(replace, text)
        if len(result) > _MAX_EXPANSION:
            raise self.ch.error(path, "macro expansion is longer than 1 MiB")
        return result

    def text(self, text: str, path: str) -> str:
        """``text`` with every macro expanded (``${PORT}`` and ``${PID}`` left in place)."""
        return self._expand(text, path, [])

    def typed(self, value: Any, path: str) -> Any:
        """Expand a YAML tree; a string that is exactly one macro takes the macro's type."""
        if isinstance(value, str):
            match = _MACRO_REF.fullmatch(value)
            if match and (match.group(1) in self.defs or match.group(1) in self.resolved):
                return self.value(match.group(1), path, [])
            return self.text(value, path)
        if isinstance(value, dict):
            return {k: self.typed(v, join(path, k)) for k, v in value.items()}
        if isinstance(value, list):
            return [self.typed(v, f"{path}[{i}]") for i, v in enumerate(value)]
        return value


def place_port(ch: Checker, value: Any, path: str, port: int | None,
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
        return {k: place_port(ch, v, join(path, k), port, typed=True) for k, v in value.items()}
    if isinstance(value, list):
        return [place_port(ch, v, f"{path}[{i}]", port, typed=True) for i, v in enumerate(value)]
    return value

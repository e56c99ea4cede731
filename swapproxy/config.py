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
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

import attrs
import yaml

from swapproxy.matrix import Matrix, MatrixError

DEFAULT_GROUP = "(default)"
LOG_LEVELS = ("debug", "info", "warn", "error")
LOG_TO_STDOUT = ("proxy", "upstream", "both", "none")
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


_TOP_KEYS = frozenset({
    "healthCheckTimeout", "healthCheckCeiling", "logLevel", "logToStdout", "logTimeFormat", "startPort", "macros",
    "models", "groups", "hooks", "sendLoadingState", "loadingStateField", "globalTTL",
    "unloadTimeout", "apiKeys", "metricsMaxInMemory", "logRequests", "profiles", "limits", "routing",
    "matrix", "memoryBudget"})
_MODEL_KEYS = frozenset({
    "cmd", "cmdStop", "proxy", "checkEndpoint", "ttl", "aliases", "useModelName", "env",
    "unlisted", "name", "description", "metadata", "concurrencyLimit", "sendLoadingState",
    "loadingStateField", "macros", "filters", "unloadTimeout", "memory"})
_GROUP_KEYS = frozenset({"swap", "exclusive", "persistent", "members"})
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
    log_time_format: str = ""
    metrics_max_in_memory: int = 1000
    limits: Limits = attrs.Factory(Limits)
    #: Seconds a start may take in all, however much the model prints; 0 means
    #: ``HEALTH_CHECK_CEILING_FACTOR`` times ``health_check_timeout``.
    health_check_ceiling: int = 0
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
    proxy = final(f"{path}.proxy", proxy)
    try:
        url = urlsplit(proxy)
        valid = url.scheme in ("http", "https") and bool(url.hostname) and url.port != 0
    except ValueError:
        valid = False
    if not valid:
        raise ch.error(f"{path}.proxy",
                       f"must be an http:// or https:// URL with a host, got {_show(proxy)}")
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
    fpath = f"{path}.filters"
    filters = ch.mapping(m.get("filters"), fpath)
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

    metadata = ch.mapping(m.get("metadata"), f"{path}.metadata")
    concurrency = ch.integer(m.get("concurrencyLimit"), f"{path}.concurrencyLimit", 0, minimum=0)
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
        strip_params=tuple(sorted(strip - {"", "model"})),
        set_params=set_params,
        set_params_by_id=by_id,
        memory=_memory_size(ch, m.get("memory"), f"{path}.memory"),
    )


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
        unused = "groups" if use == "matrix" else "matrix"
        if settings.get(unused):
            ch.warn(f"routing.router.settings.{unused}: ignored, routing.router.use is {use}")
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
    ch.known(data, "", _TOP_KEYS)

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
    if data.get("profiles"):
        ch.warn("profiles: not supported (llama-swap replaced them with groups), ignored")
    metrics_max = ch.integer(data.get("metricsMaxInMemory"), "metricsMaxInMemory", 1000)
    limits = _build_limits(ch, data.get("limits"))
    api_keys = ch.strings(data.get("apiKeys"), "apiKeys")
    for i, key in enumerate(api_keys):
        if any(c.isspace() for c in key):
            raise ch.error(f"apiKeys[{i}]", "must not contain whitespace")
    top: dict[str, Any] = dict(
        global_ttl=ch.integer(data.get("globalTTL"), "globalTTL", 0, minimum=0),
        unload_timeout=ch.number(data.get("unloadTimeout"), "unloadTimeout", 10.0),
        send_loading_state=ch.boolean(data.get("sendLoadingState"), "sendLoadingState", False),
        loading_state_field=ch.choice(data.get("loadingStateField"), "loadingStateField",
                                      "reasoning_content", LOADING_STATE_FIELDS))
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

    hooks = ch.mapping(data.get("hooks"), "hooks")
    ch.known(hooks, "hooks", frozenset({"on_startup"}))
    on_startup = ch.mapping(hooks.get("on_startup"), "hooks.on_startup")
    ch.known(on_startup, "hooks.on_startup", frozenset({"preload"}))
    preload: list[str] = []
    for name in ch.strings(on_startup.get("preload"), "hooks.on_startup.preload", blank_ok=True):
        name = name.strip()
        target = models.get(name) or models.get(aliases.get(name, ""))
        if target is None and name:
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
        log_time_format=ch.string(data.get("logTimeFormat"), "logTimeFormat").strip(),
        metrics_max_in_memory=metrics_max if metrics_max > 0 else 1000,
        limits=limits,
        health_check_ceiling=ceiling,
        scheduler=scheduler,
        matrix=matrix,
        memory_budget=budget,
        memory_budget_auto=budget_auto,
    )

"""
Load and validate a llama-swap style YAML configuration.

`load_config` and `parse_config` turn one YAML document into frozen `Config`, `ModelConfig` and
`GroupConfig` objects with every default applied, every macro expanded and every ``${PORT}``
allocated, so nothing downstream re-checks the file. Every problem a user can cause raises
`ConfigError`, whose message is one line: ``<file>: <key.path>: <problem>``. Keys this version does
not support (for example those of a newer llama-swap) are not errors: they are listed in a single
warning in `Config.warnings`, so the caller can log it and carry on.

The package, by idea: `settings` (the frozen classes and their defaults), `reading` (YAML with
duplicate keys and ``${env.NAME}``), `macros`, `shellwords` (``cmd`` into argv), `checker` (typed
access at key paths, `ConfigError`), and one builder per section: `models`, `forwarding` (what
models and peers share: URL, filters, timeouts), `routing` (groups, matrix, scheduler, memory
budget), `clients` (limits, CORS, API keys), `storage` (activity store, slot cache), `peers`
(peers, selectors, profiles), with `document` putting the sections together.

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

from swapproxy.config.checker import ConfigError
from swapproxy.config.document import load_config, parse_config
from swapproxy.config.settings import (
    DEFAULT_CONCURRENCY_LIMIT,
    DEFAULT_GROUP,
    DEFAULT_HEALTH_CHECK_INTERVAL,
    DEFAULT_HEALTH_CHECK_TIMEOUT,
    DEFAULT_LINGER,
    DEFAULT_LOG_TIME_FORMAT,
    DEFAULT_MAX_OVERTAKES,
    DEFAULT_MAX_WAIT,
    DEFAULT_STREAM_IDLE_TIMEOUT,
    DEFAULT_UPSTREAM_IGNORE_PATHS,
    HEALTH_CHECK_CEILING_FACTOR,
    LOADING_STATE_FIELDS,
    LOG_LEVELS,
    LOG_TO_STDOUT,
    MODALITIES,
    PEER_TIMEOUTS,
    SELECTOR_STRATEGIES,
    Capabilities,
    Config,
    CorsConfig,
    GroupConfig,
    HangLimits,
    Limits,
    ModelConfig,
    PeerConfig,
    PeerModel,
    ProfileConfig,
    SchedulerConfig,
    SelectorConfig,
    SlotCacheConfig,
    Timeouts,
    start_ceiling,
)
from swapproxy.config.shellwords import split_command

__all__ = [
    "DEFAULT_CONCURRENCY_LIMIT",
    "DEFAULT_GROUP",
    "DEFAULT_HEALTH_CHECK_INTERVAL",
    "DEFAULT_HEALTH_CHECK_TIMEOUT",
    "DEFAULT_LINGER",
    "DEFAULT_LOG_TIME_FORMAT",
    "DEFAULT_MAX_OVERTAKES",
    "DEFAULT_MAX_WAIT",
    "DEFAULT_STREAM_IDLE_TIMEOUT",
    "DEFAULT_UPSTREAM_IGNORE_PATHS",
    "HEALTH_CHECK_CEILING_FACTOR",
    "LOADING_STATE_FIELDS",
    "LOG_LEVELS",
    "LOG_TO_STDOUT",
    "MODALITIES",
    "PEER_TIMEOUTS",
    "SELECTOR_STRATEGIES",
    "Capabilities",
    "Config",
    "ConfigError",
    "CorsConfig",
    "GroupConfig",
    "HangLimits",
    "Limits",
    "ModelConfig",
    "PeerConfig",
    "PeerModel",
    "ProfileConfig",
    "SchedulerConfig",
    "SelectorConfig",
    "SlotCacheConfig",
    "Timeouts",
    "load_config",
    "parse_config",
    "split_command",
    "start_ceiling",
]

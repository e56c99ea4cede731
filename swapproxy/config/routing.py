# -*- test-case-name: tests.test_config -*-
"""
Which models run together, and in which order requests are served: swap ``groups`` or the swap
``matrix`` (top level, or under ``routing.router``), ``routing.scheduler`` and ``memoryBudget``.

Unlike llama-swap, a group member that is not a model id (an unknown model, or an alias) is an
error.
"""

from __future__ import annotations

import re
from typing import Any

from swapproxy.config.checker import Checker, ConfigError, join, show
from swapproxy.config.settings import (
    DEFAULT_GROUP,
    DEFAULT_LINGER,
    DEFAULT_MAX_OVERTAKES,
    DEFAULT_MAX_WAIT,
    GroupConfig,
    ModelConfig,
    SchedulerConfig,
)
from swapproxy.matrix import Matrix, MatrixError

_GROUP_KEYS = frozenset({"swap", "exclusive", "persistent", "members"})
_MATRIX_KEYS = frozenset({"vars", "evict_costs", "sets"})
_MATRIX_VAR = re.compile(r"[A-Za-z0-9.-]{1,32}")
_FIFO_KEYS = frozenset({"priority", "maxOvertakes", "maxWait", "linger"})


def build_router(ch: Checker, data: dict[Any, Any], models: dict[str, ModelConfig],
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
        # The other one may be set too, as in llama-swap's own example, to switch by changing
        # `use`. llama-swap does not read it; a mistake in it is a warning here, not an error,
        # so that a config llama-swap starts with starts here too.
        try:
            if use == "matrix" and settings.get("groups"):
                _build_groups(ch, groups_raw, models, aliases, groups_path)
            elif use == "group" and settings.get("matrix") is not None:
                _build_matrix(ch, matrix_raw, matrix_path, models, aliases)
        except ConfigError as e:
            problem = str(e).removeprefix(f"{ch.source}: ")
            ch.warn(f"{problem} (not used while routing.router.use is {use}, so this config still starts)")
    if use == "group":
        return _build_groups(ch, groups_raw, models, aliases, groups_path), None
    groups = {DEFAULT_GROUP: GroupConfig(DEFAULT_GROUP, True, True, False, tuple(models))}
    return groups, _build_matrix(ch, matrix_raw, matrix_path, models, aliases)


def _build_matrix(ch: Checker, raw: Any, path: str, models: dict[str, ModelConfig],
                  aliases: dict[str, str]) -> Matrix:
    matrix = ch.mapping(raw, path)
    ch.known(matrix, path, _MATRIX_KEYS)
    names: dict[str, str] = {}
    for key, model in ch.mapping(matrix.get("vars"), f"{path}.vars").items():
        where = join(f"{path}.vars", key)
        if not isinstance(key, str) or not _MATRIX_VAR.fullmatch(key):
            raise ch.error(where, "var names must be 1 to 32 letters, digits, '-' or '.'")
        if not isinstance(model, str) or model not in models:
            hint = (f"'{model}' is an alias of '{aliases[model]}', vars need model ids"
                    if isinstance(model, str) and model in aliases else
                    "models are: " + (", ".join(models) or "(none)"))
            raise ch.error(where, f"unknown model {show(model)}; {hint}")
        names[key] = model

    def resolve(name: str) -> str | None:
        return names.get(name) or (name if name in models else None)

    costs: dict[str, int] = {}
    for key, cost in ch.mapping(matrix.get("evict_costs"), f"{path}.evict_costs").items():
        where = join(f"{path}.evict_costs", key)
        model = resolve(key) if isinstance(key, str) else None
        if model is None:
            raise ch.error(where, "unknown var or model")
        costs[model] = ch.integer(cost, where, 1, minimum=1)
    sets = []
    for name, expression in ch.mapping(matrix.get("sets"), f"{path}.sets").items():
        where = join(f"{path}.sets", name)
        if not isinstance(name, str) or not name.strip():
            raise ch.error(where, "set names must be non-empty strings")
        sets.append((name, ch.string(expression, where)))
    if not sets:
        raise ch.error(f"{path}.sets", "define at least one set, such as main: 'a & b'")
    try:
        return Matrix(sets, resolve, costs)
    except MatrixError as e:
        where = join(f"{path}.sets", e.set_name) if e.set_name is not None else f"{path}.sets"
        raise ch.error(where, str(e)) from None


def build_scheduler(ch: Checker, raw: Any, models: dict[str, ModelConfig],
                    aliases: dict[str, str]) -> SchedulerConfig:
    """
    ``routing.scheduler`` (``raw`` is ``routing``): the ``fifo`` scheduler's settings.
    """
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
        key = join(where, name)
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


def _build_groups(ch: Checker, raw: Any, models: dict[str, ModelConfig],
                  aliases: dict[str, str], where: str = "groups") -> dict[str, GroupConfig]:
    groups: dict[str, GroupConfig] = {}
    owner: dict[str, str] = {}
    for gid, graw in ch.mapping(raw, where).items():
        path = join(where, gid)
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


def build_memory_budget(ch: Checker, raw: Any) -> tuple[int | None, bool]:
    """
    ``memoryBudget``: the bytes the running models may use together (``None`` for no budget),
    and whether it is ``auto`` (what the machine has free when swapproxy starts).
    """
    auto = isinstance(raw, str) and raw.strip().lower() == "auto"
    return (None if auto else ch.memory_size(raw, "memoryBudget", auto_ok=True)), auto

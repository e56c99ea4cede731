# -*- test-case-name: tests.test_filters -*-
"""
Request rewriting: a model's ``useModelName`` and ``filters`` applied to a JSON request body.

llama-swap's semantics (reference sections 1.3 and 1.10), in its order:

1. ``useModelName`` replaces the ``model`` field;
2. ``filters.stripParams`` removes keys;
3. ``filters.setParams`` sets keys;
4. ``filters.setParamsByID`` sets keys, only when the client named the model by that exact key.

Keys are JSON paths as in llama-swap (sjson): ``a.b`` is the key ``b`` inside the object ``a``,
``\\.`` is a literal dot, and a number indexes an array that is already there. Each mapping is
applied in sorted key order. No filter can remove or set ``model``, or anything inside it.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from typing import Any

from swapproxy.config import ModelConfig


def split_path(path: str) -> list[str]:
    """
    The keys of a dotted JSON path: ``a.b\\.c`` is ``["a", "b.c"]``.
    """
    keys: list[str] = []
    key: list[str] = []
    escaped = False
    for char in path:
        if escaped:
            key.append(char)
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == ".":
            keys.append("".join(key))
            key = []
        else:
            key.append(char)
    keys.append("".join(key))
    return keys


def _protected(keys: list[str]) -> bool:
    return keys[0].strip() == "model"


def _index(key: str) -> int | None:
    return int(key) if key.isdigit() else None


def strip_path(payload: dict[str, Any], path: str) -> bool:
    """
    Remove the value at ``path`` from ``payload``.

    :returns: whether something was removed.
    """
    keys = split_path(path)
    if _protected(keys):
        return False
    node: Any = payload
    for key in keys[:-1]:
        if isinstance(node, dict):
            node = node.get(key)
        elif isinstance(node, list):
            index = _index(key)
            node = node[index] if index is not None and index < len(node) else None
        else:
            return False
    last = keys[-1]
    if isinstance(node, dict) and last in node:
        del node[last]
        return True
    if isinstance(node, list):
        index = _index(last)
        if index is not None and index < len(node):
            del node[index]
            return True
    return False


def _same(a: Any, b: Any) -> bool:
    """Equal as JSON: ``1`` is not ``true`` and ``1`` is not ``1.0``."""
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def set_path(payload: dict[str, Any], path: str, value: Any) -> bool:
    """
    Set the value at ``path`` in ``payload``, creating objects on the way; a value in the way
    that is neither an object nor an array is replaced by an object.

    :returns: whether the payload changed.
    """
    keys = split_path(path)
    if _protected(keys):
        return False
    node: Any = payload
    for key in keys[:-1]:
        if isinstance(node, list):
            index = _index(key)
            if index is None or index >= len(node):
                return False
            child = node[index]
            if not isinstance(child, (dict, list)):
                child = node[index] = {}
        else:
            child = node.get(key)
            if not isinstance(child, (dict, list)):
                child = node[key] = {}
        node = child
    last = keys[-1]
    if isinstance(node, list):
        index = _index(last)
        if index is None or index >= len(node):
            # llama-swap appends for "-1" and pads with nulls; an index past the end does the same.
            if last == "-1":
                node.append(copy.deepcopy(value))
                return True
            if index is None:
                return False
            node.extend([None] * (index - len(node) + 1))
        if _same(node[index], value):
            return False
        node[index] = copy.deepcopy(value)
        return True
    if last in node and _same(node[last], value):
        return False
    node[last] = copy.deepcopy(value)
    return True


def _set_all(payload: dict[str, Any], params: Mapping[str, Any]) -> bool:
    changed = False
    for path in sorted(params):
        changed = set_path(payload, path, params[path]) or changed
    return changed


def rewrite_payload(model: ModelConfig, requested: str, payload: dict[str, Any]) -> bool:
    """
    Apply ``model``'s ``useModelName`` and filters to a parsed JSON body, in place.

    :param requested: the model name exactly as the client sent it (for ``setParamsByID``).
    :returns: whether anything changed; when not, the client's bytes can be sent as they are.
    """
    changed = False
    if model.use_model_name and payload.get("model") != model.use_model_name:
        payload["model"] = model.use_model_name
        changed = True
    for path in model.strip_params:
        changed = strip_path(payload, path) or changed
    changed = _set_all(payload, model.set_params) or changed
    by_name = model.set_params_by_id.get(requested)
    if by_name:
        changed = _set_all(payload, by_name) or changed
    return changed


def encode_payload(payload: dict[str, Any]) -> bytes:
    """
    A rewritten body as UTF-8 JSON; strings that cannot be UTF-8 (lone surrogates, which JSON
    escapes can carry) are kept as ``\\u`` escapes instead.
    """
    try:
        return json.dumps(payload, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(payload).encode("ascii")

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
import re
from collections.abc import Mapping
from typing import Any

from swapproxy.config import ModelConfig
from swapproxy.web.sse import LOADING_TEXT_END, LOADING_TEXT_START


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



# -- swapproxy's loading text in a conversation's history ----------------------------------------

_DECODER = json.JSONDecoder()
_SPACE = re.compile(r"[ \t\n\r]*")
#: Both markers contain U+2060, so a body without it, raw or escaped, has nothing to strip.
_QUICK = ("\u2060".encode(), b"\\u2060")
_HISTORY_FIELDS = ("reasoning_content", "reasoning", "content")
_Span = tuple[int, int]
_Edit = tuple[int, int, str]


def strip_loading_text(body: bytes) -> bytes:
    """
    ``body`` without the loading text swapproxy wrote into earlier answers, where a client sent
    it back in the conversation's history.

    The loading text is what lies between `LOADING_TEXT_START` and `LOADING_TEXT_END` (or after a
    start that has no end) in the assistant messages of a JSON ``messages`` array: their
    ``reasoning_content``, ``reasoning`` and ``content`` strings, their text content parts and
    Anthropic ``thinking`` blocks. A reasoning field, part or block left empty goes as a whole.
    Everything else stays byte for byte as the client sent it, escapes and spacing included; a
    body with nothing to strip is returned as it is.
    """
    if not any(marker in body for marker in _QUICK):
        return body
    try:
        text = body.decode("utf-8")
        edits = sorted(_history_edits(text))
    except (ValueError, IndexError, RecursionError):
        return body  # not JSON: the route says so
    if not edits:
        return body
    pieces = []
    position = 0
    for start, end, replacement in edits:
        pieces.append(text[position:start])
        pieces.append(replacement)
        position = end
    pieces.append(text[position:])
    return "".join(pieces).encode("utf-8")


def _skip_space(text: str, index: int) -> int:
    match = _SPACE.match(text, index)
    assert match is not None
    return match.end()


def _items(text: str, start: int) -> list[tuple[str | None, _Span, Any]]:
    """
    The members of the JSON object or the elements of the JSON array at ``text[start]``: the
    key (``None`` in an array), the span from the key (or element) to the end of the value, and
    the value.
    """
    opening = text[start]
    closing = {"{": "}", "[": "]"}[opening]
    found: list[tuple[str | None, _Span, Any]] = []
    index = _skip_space(text, start + 1)
    if text[index] == closing:
        return found
    while True:
        item_start = index
        key = None
        if opening == "{":
            if text[index] != '"':
                raise ValueError("expected a key")
            key, index = json.decoder.scanstring(text, index + 1)  # type: ignore[attr-defined]
            index = _skip_space(text, index)
            if text[index] != ":":
                raise ValueError("expected ':'")
            index = _skip_space(text, index + 1)
        value, index = _DECODER.raw_decode(text, index)
        found.append((key, (item_start, index), value))
        index = _skip_space(text, index)
        if text[index] == closing:
            return found
        if text[index] != ",":
            raise ValueError("expected ','")
        index = _skip_space(text, index + 1)


def _value_start(text: str, item: _Span, key: str | None) -> int:
    if key is None:
        return item[0]
    _, index = json.decoder.scanstring(text, item[0] + 1)  # type: ignore[attr-defined]
    return _skip_space(text, _skip_space(text, index) + 1)


def _loading_ranges(value: str) -> list[_Span]:
    """
    Where the loading text is in a string: each start marker to the end marker after it, or to
    the end of the string.
    """
    ranges = []
    index = value.find(LOADING_TEXT_START)
    while index >= 0:
        end = value.find(LOADING_TEXT_END, index + len(LOADING_TEXT_START))
        end = len(value) if end < 0 else end + len(LOADING_TEXT_END)
        ranges.append((index, end))
        index = value.find(LOADING_TEXT_START, end)
    return ranges


def _literal_units(literal: str) -> list[_Span]:
    """
    The span, in a JSON string literal's text (quotes excluded), of each character it decodes
    to: one per plain character, per escape, and per escaped surrogate pair.
    """
    units = []
    index = 0
    while index < len(literal):
        if literal[index] != "\\":
            end = index + 1
        elif literal[index + 1] != "u":
            end = index + 2
        else:
            end = index + 6
            high = int(literal[index + 2 : end], 16)
            if 0xD800 <= high < 0xDC00 and literal[end : end + 2] == "\\u":
                if 0xDC00 <= int(literal[end + 2 : end + 6], 16) < 0xE000:
                    end += 6
        units.append((index, end))
        index = end
    return units


def _stripped_string(text: str, span: _Span, value: str) -> tuple[str, str] | None:
    """
    The string literal at ``span`` (whose value is ``value``) without its loading text, as the
    client wrote it otherwise, and what it now decodes to; ``None`` when it has none.
    """
    ranges = _loading_ranges(value)
    if not ranges:
        return None
    literal = text[span[0] + 1 : span[1] - 1]
    units = _literal_units(literal)
    kept_literal = []
    kept_value = []
    position = 0
    for start, end in ranges:
        kept_literal.append(literal[units[position][0] if position < len(units) else len(literal) : units[start][0]])
        kept_value.append(value[position:start])
        position = end
    kept_literal.append(literal[units[position][0] :] if position < len(units) else "")
    kept_value.append(value[position:])
    return '"' + "".join(kept_literal) + '"', "".join(kept_value)


def _removals(items: list[tuple[str | None, _Span, Any]], gone: set[int]) -> list[_Edit]:
    """
    The edits that remove the items numbered in ``gone`` from their object or array, with the
    commas between them, so that what stays is valid JSON.
    """
    edits = []
    index = 0
    while index < len(items):
        if index not in gone:
            index += 1
            continue
        first = index
        while index + 1 < len(items) and index + 1 in gone:
            index += 1
        last = index
        if last + 1 < len(items):
            edits.append((items[first][1][0], items[last + 1][1][0], ""))
        elif first > 0:
            edits.append((items[first - 1][1][1], items[last][1][1], ""))
        else:
            edits.append((items[first][1][0], items[last][1][1], ""))
        index += 1
    return edits


def _history_edits(text: str) -> list[_Edit]:
    start = _skip_space(text, 0)
    if text[start] != "{":
        return []
    edits: list[_Edit] = []
    for key, span, value in _items(text, start):
        if key != "messages" or not isinstance(value, list):
            continue
        for _, message_span, message in _items(text, _value_start(text, span, key)):
            if isinstance(message, dict) and message.get("role") == "assistant":
                edits += _message_edits(text, message_span[0])
    return edits


def _message_edits(text: str, start: int) -> list[_Edit]:
    edits: list[_Edit] = []
    members = _items(text, start)
    gone = set()
    for number, (key, span, value) in enumerate(members):
        if key not in _HISTORY_FIELDS:
            continue
        value_span = (_value_start(text, span, key), span[1])
        if isinstance(value, str):
            stripped = _stripped_string(text, value_span, value)
            if stripped is None:
                continue
            if not stripped[1] and key != "content":
                gone.add(number)
            else:
                edits.append((value_span[0], value_span[1], stripped[0]))
        elif key == "content" and isinstance(value, list):
            edits += _parts_edits(text, value_span[0])
    return edits + _removals(members, gone)


def _parts_edits(text: str, start: int) -> list[_Edit]:
    """
    The edits of a content array: text parts and ``thinking`` blocks lose the loading text, and
    go when nothing else is left in them.
    """
    edits: list[_Edit] = []
    parts = _items(text, start)
    gone = set()
    for number, (_, span, part) in enumerate(parts):
        if not isinstance(part, dict):
            continue
        field = {"text": "text", "thinking": "thinking"}.get(part.get("type"))  # type: ignore[arg-type]
        if field is None or not isinstance(part.get(field), str):
            continue
        for key, member_span, value in _items(text, span[0]):
            if key != field:
                continue
            value_span = (_value_start(text, member_span, key), member_span[1])
            stripped = _stripped_string(text, value_span, value)
            if stripped is None:
                continue
            if stripped[1]:
                edits.append((value_span[0], value_span[1], stripped[0]))
            else:
                gone.add(number)
    return edits + _removals(parts, gone)

# -*- test-case-name: tests.test_loading -*-
"""
The dialects of server-sent events swapproxy writes itself: OpenAI chat completion chunks and
Anthropic Messages events while a model loads, and each dialect's error event once a stream has
begun (`PlainEvents` for the routes that have no loading stream).

Each formatter turns "this text, this machine-readable status" into complete, valid events for
its dialect, so that every byte the client receives parses.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable
from typing import Any

from swapproxy.web.errors import error_object

#: What the loading text starts and ends with, wherever it goes (``reasoning_content``,
#: ``reasoning``, ``content``, an Anthropic ``thinking`` block): two runs of zero-width characters
#: that no model writes, invisible in a client and kept by any client that sends the text back,
#: so that `swapproxy.web.filters.strip_loading_text` finds it in the next request's history.
LOADING_TEXT_START = "\u200b\u2060\u200c\u2060\u200d"
LOADING_TEXT_END = "\u200d\u2060\u200c\u2060\u200b"

SSE_HEADERS = (
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
)


def data_event(payload: Any, event: str | None = None) -> bytes:
    """
    One SSE event: an optional ``event:`` line, one ``data:`` line of compact JSON, a blank line.
    """
    data = json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    head = b"event: " + event.encode("ascii") + b"\n" if event else b""
    return head + b"data: " + data + b"\n\n"


def comment(text: str) -> bytes:
    """
    An SSE comment line per line of ``text`` (clients must ignore them), ending the event block.
    """
    text = text.replace(LOADING_TEXT_START, "").replace(LOADING_TEXT_END, "")
    lines = [line for line in text.splitlines() if line.strip()] or [""]
    return b"".join(b": " + line.encode("utf-8") + b"\n" for line in lines) + b"\n"


class PlainEvents:
    """
    The dialect of a route without a loading stream (``/v1/completions``, ``/upstream/...``):
    all it says is an OpenAI-style error, once a model's event stream has begun.

    Every dialect is one object per request, handed to the forward pipeline
    (`swapproxy.web.forward`), which asks it what to write instead of asking what it is:

    :ivar loading: whether a streaming request on this route gets the loading stream.
    """

    loading = False

    def error(self, status: int, message: str, error_type: str | None = None, code: str | None = None) -> bytes:
        """
        An error event that ends the stream: the OpenAI-style error object (its ``code`` a
        string, the same as the JSON answer's for the same error), then ``data: [DONE]``.
        """
        return data_event(error_object(status, message, error_type, code)) + b"data: [DONE]\n\n"

    def splice(self) -> Callable[[bytes], bytes] | None:
        """
        What rewrites the model's stream after the loading events, if anything must.
        """
        return None


class ChatEvents(PlainEvents):
    """
    Loading events as ``chat.completion.chunk`` objects.

    :param model: the model name the client asked for, echoed in every chunk.
    :param field: the delta field for the text: ``reasoning_content``, ``reasoning``, ``content``,
        or ``none`` (SSE comments only, nothing enters the conversation).
    :param created: the Unix time of the response.
    """

    loading = True

    def __init__(self, model: str, field: str, created: int) -> None:
        self.model = model
        self.field = field
        self.created = created
        self._id: str | None = None
        self._first = True

    @property
    def id(self) -> str:
        # Made when the first chunk needs it: most requests on this route never send one.
        if self._id is None:
            self._id = "chatcmpl-swapproxy-" + secrets.token_hex(12)
        return self._id

    def opening(self) -> bytes:
        return b""

    def text(self, text: str, status: dict[str, Any]) -> bytes:
        """
        One event carrying ``text`` and the machine-readable ``status``.
        """
        if self.field == "none":
            return comment(text)
        delta: dict[str, Any] = {}
        if self._first:
            delta["role"] = "assistant"
            self._first = False
        delta[self.field] = text
        chunk = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}],
            "swapproxy": status,
        }
        return data_event(chunk)

    def keepalive(self) -> bytes:
        return comment("loading")

    def idle(self, status: dict[str, Any]) -> bytes:
        """
        What is sent when nothing changed for a while: a dot in the text (a comment with
        ``none``).
        """
        return self.keepalive() if self.field == "none" else self.text(".", status)

    def closing(self) -> bytes:
        """
        What ends the loading part before the model's own stream follows.
        """
        return b""


class MessagesEvents(PlainEvents):
    """
    Loading events as an Anthropic Messages stream: a ``thinking`` content block whose
    ``thinking_delta`` events carry the text, and ``ping`` events while nothing changes.

    A loading stream that resumes (the model is started again) opens a new thinking block: the
    model's own content blocks are numbered after all of them (`splice`).
    """

    loading = True

    def __init__(self, model: str, field: str, created: int) -> None:
        self.model = model
        self.field = field
        self.created = created
        self._started = False
        self._open = False
        self._blocks = 0

    def opening(self) -> bytes:
        self._started = True
        message: dict[str, Any] = {
            "id": "msg_swapproxy_" + secrets.token_hex(12),
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": 0, "output_tokens": 0},
        }
        return data_event({"type": "message_start", "message": message}, "message_start")

    def text(self, text: str, status: dict[str, Any]) -> bytes:
        if self.field == "none":
            return comment(text)
        out = b""
        if not self._open:
            self._open = True
            self._blocks += 1
            block = {"type": "thinking", "thinking": "", "signature": ""}
            start = {"type": "content_block_start", "index": self._blocks - 1, "content_block": block}
            out += data_event(start, "content_block_start")
        delta = {"type": "content_block_delta", "index": self._blocks - 1,
                 "delta": {"type": "thinking_delta", "thinking": text}}
        delta["swapproxy"] = status
        return out + data_event(delta, "content_block_delta")

    def keepalive(self) -> bytes:
        return data_event({"type": "ping"}, "ping")

    def idle(self, status: dict[str, Any]) -> bytes:
        # Anthropic clients have a keep-alive of their own: a ping event.
        return self.keepalive()

    def closing(self) -> bytes:
        if not self._open:
            return b""
        self._open = False
        return data_event({"type": "content_block_stop", "index": self._blocks - 1}, "content_block_stop")

    def error(self, status: int, message: str, error_type: str | None = None, code: str | None = None) -> bytes:
        body = {"type": "error", "error": {"type": error_type or "api_error", "message": message}}
        return self.closing() + data_event(body, "error")

    def splice(self) -> Callable[[bytes], bytes] | None:
        return MessagesSplice(self._blocks) if self._started else None


class MessagesSplice:
    """
    Fits an upstream Anthropic Messages stream after the loading stream's ``thinking`` blocks.

    The loading stream already sent ``message_start`` and used the first ``offset`` content
    blocks, so the model's own ``message_start`` is dropped and its content block indices move
    up by ``offset``. The usage of the dropped ``message_start`` (``input_tokens``, the cache
    counts) goes into the ``message_delta`` where the model did not say it again, since the
    loading stream's ``message_start`` could only say 0: clients take a ``message_delta``'s usage
    as the final one. Every other event passes through byte for byte. Feed it the body as it
    arrives: it holds back only an incomplete event.
    """

    def __init__(self, offset: int = 1) -> None:
        self._offset = offset
        self._pending = b""
        #: The usage of the model's ``message_start``, but for what ``message_delta`` counts on.
        self._usage: dict[str, Any] = {}

    def __call__(self, data: bytes) -> bytes:
        self._pending += data
        out = []
        while True:
            end, separator = _event_end(self._pending)
            if end < 0:
                break
            block, self._pending = self._pending[:end], self._pending[end + len(separator) :]
            rewritten = self._rewrite(block) if block.strip() else block
            if rewritten or not block.strip():
                out.append(rewritten + separator)
        return b"".join(out)

    def _rewrite(self, block: bytes) -> bytes:
        lines = block.replace(b"\r\n", b"\n").split(b"\n")
        data_lines = [line[5:].lstrip(b" ") for line in lines if line.startswith(b"data:")]
        try:
            payload = json.loads(b"\n".join(data_lines)) if data_lines else None
        except ValueError:
            return block
        if not isinstance(payload, dict):
            return block
        kind = payload.get("type")
        event = kind if any(line.startswith(b"event:") for line in lines) else None
        if kind == "message_start":
            message = payload.get("message")
            usage = message.get("usage") if isinstance(message, dict) else None
            if isinstance(usage, dict):
                self._usage = {key: value for key, value in usage.items() if key != "output_tokens"}
            return b""
        if kind in ("content_block_start", "content_block_delta", "content_block_stop") and isinstance(
            payload.get("index"), int
        ):
            payload["index"] += self._offset
            return data_event(payload, event)[:-2]
        if kind == "message_delta" and self._usage and isinstance(payload.get("usage", {}), dict):
            usage = payload.get("usage", {})
            payload["usage"] = {**self._usage, **usage}
            return data_event(payload, event)[:-2]
        return block


def _event_end(buffer: bytes) -> tuple[int, bytes]:
    """
    Where the first complete SSE event in ``buffer`` ends, and the blank line that ends it.
    """
    candidates = [(buffer.find(sep), sep) for sep in (b"\r\n\r\n", b"\n\n")]
    found = [(index, sep) for index, sep in candidates if index >= 0]
    return min(found) if found else (-1, b"")

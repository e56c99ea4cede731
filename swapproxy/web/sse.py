# -*- test-case-name: tests.test_loading -*-
"""
Server-sent events in the two dialects swapproxy speaks while a model loads: OpenAI chat
completion chunks and Anthropic Messages events.

Each formatter turns "this text, this machine-readable status" into complete, valid events for
its dialect, so that every byte the client receives parses.
"""

from __future__ import annotations

import json
import secrets
from typing import Any

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
    lines = [line for line in text.splitlines() if line.strip()] or [""]
    return b"".join(b": " + line.encode("utf-8") + b"\n" for line in lines) + b"\n"


class ChatEvents:
    """
    Loading events as ``chat.completion.chunk`` objects.

    :param model: the model name the client asked for, echoed in every chunk.
    :param field: the delta field for the text: ``reasoning_content``, ``reasoning``, ``content``,
        or ``none`` (SSE comments only, nothing enters the conversation).
    :param created: the Unix time of the response.
    """

    def __init__(self, model: str, field: str, created: int) -> None:
        self.model = model
        self.field = field
        self.created = created
        self.id = "chatcmpl-swapproxy-" + secrets.token_hex(12)
        self._first = True

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

    def closing(self) -> bytes:
        """
        What ends the loading part before the model's own stream follows.
        """
        return b""

    def error(self, status: int, message: str, error_type: str = "server_error") -> bytes:
        """
        An error event and the end of the stream.
        """
        error = {"error": {"message": message, "type": error_type, "code": status}}
        return data_event(error) + b"data: [DONE]\n\n"


class MessagesEvents:
    """
    Loading events as an Anthropic Messages stream: a ``thinking`` content block whose
    ``thinking_delta`` events carry the text, and ``ping`` events while nothing changes.
    """

    def __init__(self, model: str, field: str, created: int) -> None:
        self.model = model
        self.field = field
        self.created = created
        self.id = "msg_swapproxy_" + secrets.token_hex(12)
        self._open = False

    def opening(self) -> bytes:
        message = {
            "id": self.id,
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
            block = {"type": "thinking", "thinking": "", "signature": ""}
            out += data_event({"type": "content_block_start", "index": 0, "content_block": block}, "content_block_start")
        delta = {"type": "content_block_delta", "index": 0, "delta": {"type": "thinking_delta", "thinking": text}}
        delta["swapproxy"] = status
        return out + data_event(delta, "content_block_delta")

    def keepalive(self) -> bytes:
        return data_event({"type": "ping"}, "ping")

    def closing(self) -> bytes:
        if not self._open:
            return b""
        self._open = False
        return data_event({"type": "content_block_stop", "index": 0}, "content_block_stop")

    def error(self, status: int, message: str, error_type: str = "api_error") -> bytes:
        body = {"type": "error", "error": {"type": error_type, "message": message}}
        return self.closing() + data_event(body, "error")

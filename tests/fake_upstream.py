#!/usr/bin/env python3
"""A fake llama-server for swapproxy's tests: stdlib only, so it starts in a few tens of milliseconds.

Run it as a script (the tests spawn it once per scenario)::

    python tests/fake_upstream.py --port 8081 --model qwen --load-time 2 --stage-lines

It speaks HTTP/1.1 with keep-alive on ``--host:--port`` and answers the endpoints swapproxy
forwards: ``/health`` (503 "Loading model" while ``--load-time`` runs, exactly like
llama-server), ``/v1/models``, ``/props``, the OpenAI, llama.cpp and Anthropic inference routes
(streaming and not), ``/slow-respond``, ``/slots`` (501, as a llama-server without a slot API),
and an echo of anything else so a test can see what the
proxy forwarded (an inference answer carries that echo too when asked, with ``fake_echo``). The HTTP layer is a small one on ``socketserver`` with a daemon thread per
connection: importing ``http.server`` alone would add about 40 ms to every start.

Per-request controls are read from the JSON body, which the proxy forwards unchanged, and from the
query string when the body is not JSON (a JSON field wins):

``fake_status``       answer this (non-2xx) HTTP status with an OpenAI-style error body
``fake_delay``        seconds to wait before answering
``fake_crash_after``  stream this many content chunks, then ``os._exit(3)``; without streaming,
                      exit before answering
``fake_tokens``       number of tokens to generate (overrides ``--tokens`` and ``--respond``);
                      ``max_tokens`` / ``max_completion_tokens`` / ``n_predict`` /
                      ``max_output_tokens`` cap it
``fake_token_delay``  seconds before each token (overrides ``--token-delay``)
``fake_echo``         add an ``echo`` object (method, path, headers, body received) to a
                      non-streaming answer; without it answers stay as small as llama-server's

With ``--echo-body``, every answer's text is the request body exactly as it arrived.

Lines on stderr that tests wait for: ``fake upstream pid=N listening on HOST:PORT`` (not with
``--quiet``), ``grandchild pid=N``, ``ignoring SIGTERM``, ``client went away after K chunks``,
``error: failed to load model 'fake.gguf'``, and with ``--stage-lines`` the llama-server loading
lines ending in ``main: model loaded``. ``--quiet`` hides only the listening line and the
per-request log lines. ``--allocate-mb N`` holds N MiB of resident memory, for memory-budget tests.

SIGTERM ends the process with status 0 at once, also in the middle of a stream (it uses
``os._exit`` so that no daemon thread can hold up or crash interpreter shutdown).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import socketserver
import sys
import threading
import time

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs milliseconds at startup; annotations are strings anyway
    from typing import Any, Callable, NoReturn

MODEL_FILE = "fake.gguf"

LOADING_BODY = {"error": {"code": 503, "message": "Loading model", "type": "unavailable_error"}}

SLOW_RESPOND_DEFAULT = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"

# POST routes and the kind of answer they give.
INFERENCE_ROUTES = {
    "/v1/chat/completions": "chat",
    "/chat/completions": "chat",
    "/v1/completions": "text_completion",
    "/completions": "text_completion",
    "/completion": "llama_completion",
    "/infill": "llama_completion",
    "/v1/embeddings": "embeddings",
    "/embeddings": "embeddings",
    "/v1/rerank": "rerank",
    "/rerank": "rerank",
    "/v1/reranking": "rerank",
    "/reranking": "rerank",
    "/v1/messages": "messages",
    "/v1/responses": "responses",
    "/v1/audio/speech": "speech",
    "/v1/audio/transcriptions": "transcription",
}

# The kinds that can stream; the others answer one JSON document even with "stream": true.
STREAMING_KINDS = frozenset({"chat", "text_completion", "llama_completion", "messages", "responses"})

# Top-level request fields whose words count as prompt tokens.
PROMPT_FIELDS = (
    "messages", "prompt", "input", "system", "instructions", "query", "documents",
    "input_prefix", "input_suffix",
)

_log_lock = threading.RLock()
_midline = False  # the loading dots leave the cursor mid-line


def log(text: str, end: str = "\n", wait: float = -1) -> None:
    """Write ``text`` to stderr at once; a closed or broken stderr is ignored.

    A whole line logged while the loading dots are mid-line starts on a line of its own.

    :param wait: give up (dropping the text) after this many seconds if another thread is busy
        writing, e.g. blocked on a full pipe; -1 waits for ever.
    """
    global _midline
    if not _log_lock.acquire(timeout=wait):
        return
    try:
        out = text + end
        if _midline and end == "\n" and not text.startswith("\n"):
            out = "\n" + out
        _midline = not out.endswith("\n")
        sys.stderr.write(out)
        sys.stderr.flush()
    except (OSError, ValueError):
        pass
    finally:
        _log_lock.release()


def die(code: int, last_words: str = "") -> NoReturn:
    """Log ``last_words`` if stderr is free within a second, then end the process with ``code``.

    ``os._exit`` ends it whatever the other threads are doing (a normal exit could hang or abort
    on a daemon thread holding stderr).
    """
    if last_words:
        log(last_words, wait=1.0)
    os._exit(code)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    # A fixed help width keeps argparse from importing shutil (5 ms) to ask for the terminal size.
    parser = argparse.ArgumentParser(description="Fake llama-server for swapproxy's tests.",
                                     formatter_class=lambda prog: argparse.HelpFormatter(prog, width=100))
    parser.add_argument("--port", type=int, required=True, help="port to listen on (0: any free port)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--model", default="fake-model", help="model name reported by /v1/models and /props")
    parser.add_argument("--respond", default=None, metavar="TEXT",
                        help="answer TEXT (streamed word by word) instead of --tokens tokens")
    parser.add_argument("--load-time", type=float, default=0.0, metavar="SECONDS",
                        help="simulated model loading time")
    parser.add_argument("--exit-during-load", type=int, default=None, metavar="CODE",
                        help="fail loading: exit with CODE after half the load time")
    parser.add_argument("--ignore-sigterm", action="store_true")
    parser.add_argument("--spawn-grandchild", action="store_true",
                        help="start a sleeping grandchild process and print its pid")
    parser.add_argument("--stage-lines", action="store_true",
                        help="print llama-server-like loading lines on stderr during the load time")
    parser.add_argument("--echo-body", action="store_true",
                        help="answer the request body itself, as one token, so a test sees what arrived")
    parser.add_argument("--tokens", type=int, default=10, metavar="N", help="tokens per answer")
    parser.add_argument("--token-delay", type=float, default=0.0, metavar="SECONDS",
                        help="delay before each generated token")
    parser.add_argument("--health-mode", choices=("503", "refuse"), default="503",
                        help="while loading: answer /health with 503, or do not listen at all")
    parser.add_argument("--quiet", action="store_true",
                        help="do not print the listening line and the request log")
    parser.add_argument("--allocate-mb", type=int, default=0, metavar="N",
                        help="hold N MiB of memory (every page touched, so it is resident) while running")
    return parser.parse_args(argv)


# ---------------------------------------------------------------------------------------------
# Loading simulation


def _loading_steps(settings: argparse.Namespace) -> list[tuple[float, str]]:
    """``(fraction of the load time, text)`` pairs that mimic llama-server's loading output.

    A text without a trailing newline is written as is (the tensor-loading dots).
    """
    model = settings.model
    steps = [
        (0.0, "build: 0 (fake) with python for fake upstream\n"),
        (0.0, "system info: n_threads = 2, n_threads_batch = 2, total_threads = 2\n"),
        (0.0, "main: binding port with default address family\n"),
        (0.0, "main: loading model\n"),
        (0.0, f"srv    load_model: loading model '{MODEL_FILE}'\n"),
        (0.05, f"llama_model_loader: loaded meta data with 20 key-value pairs and 291 tensors "
               f"from {MODEL_FILE} (version GGUF V3 (latest))\n"),
        (0.05, "llama_model_loader: - kv   0:             general.architecture str              = llama\n"),
        (0.05, f"llama_model_loader: - kv   1:                     general.name str              = {model}\n"),
        (0.05, "print_info: file format = GGUF V3 (latest)\n"),
        (0.05, "print_info: file type   = Q4_K - Medium\n"),
        (0.1, "load_tensors: loading model tensors, this can take a while... (mmap = true)\n"),
        (0.1, "load_tensors:   CPU_Mapped model buffer size =  4685.30 MiB\n"),
    ]
    dots = 50
    for i in range(dots):
        steps.append((0.15 + 0.7 * i / dots, "."))
    steps.append((0.85, "\n"))
    steps += [
        (0.88, "llama_context: constructing llama_context\n"),
        (0.88, "llama_context: n_ctx         = 4096\n"),
        (0.88, "llama_context:        CPU  output buffer size =     0.49 MiB\n"),
        (0.9, "common_init_from_params: warming up the model with an empty run - please wait ... "
              "(--no-warmup to disable)\n"),
        (0.95, "srv          init: initializing slots, n_slots = 1\n"),
        (0.95, "slot         init: id  0 | task -1 | new slot n_ctx_slot = 4096\n"),
    ]
    return steps


def _final_lines(settings: argparse.Namespace, host: str, port: int) -> str:
    return (
        "main: model loaded\n"
        "main: chat template, chat_template: chatml, example_format: '<|im_start|>system\n"
        "You are a helpful assistant<|im_end|>\n<|im_start|>user\nHello<|im_end|>\n"
        "<|im_start|>assistant\n'\n"
        f"main: server is listening on http://{host}:{port} - starting the main loop\n"
        "srv  update_slots: all slots are idle\n"
    )


FAILURE_LINES = (
    "llama_model_load: error loading model: tensor 'blk.12.ffn_down.weight' data is not within "
    "the file bounds, model is corrupted or incomplete\n"
    "llama_model_load_from_file_impl: failed to load model\n"
    f"common_init_from_params: failed to load model '{MODEL_FILE}'\n"
    f"srv    load_model: failed to load model, '{MODEL_FILE}'\n"
    "main: exiting due to model loading error\n"
    f"error: failed to load model '{MODEL_FILE}'\n"
)


def simulate_loading(settings: argparse.Namespace, when_loaded: Callable[[], tuple[str, int]]) -> None:
    """Spend ``--load-time`` "loading", then call ``when_loaded`` (which returns host and port).

    Prints the loading lines with ``--stage-lines``. With ``--exit-during-load`` it prints the
    failure lines and ends the process half way instead.
    """
    load_time = max(settings.load_time, 0.0)
    fail_at = 0.5 if settings.exit_during_load is not None else None
    started = time.monotonic()
    steps = _loading_steps(settings) if settings.stage_lines else []
    for fraction, text in steps:
        if fail_at is not None and fraction >= fail_at:
            break
        _sleep_until(started + fraction * load_time)
        log(text, end="")
    if fail_at is not None:
        _sleep_until(started + fail_at * load_time)
        die(settings.exit_during_load, FAILURE_LINES.rstrip("\n"))
    _sleep_until(started + load_time)
    host, port = when_loaded()
    if settings.stage_lines:
        log(_final_lines(settings, host, port), end="")


def _sleep_until(deadline: float) -> None:
    remaining = deadline - time.monotonic()
    if remaining > 0:
        time.sleep(remaining)


# ---------------------------------------------------------------------------------------------
# Small helpers for answers


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


_SENTINEL = "\x00fake-slot\x00"
_QUOTED_SENTINEL = json.dumps(_SENTINEL, ensure_ascii=False)


class Template:
    """A JSON document with holes, rendered fast: the constant parts are encoded once.

    Build it from an object in which the holes are ``Template.SLOT``; ``render`` takes one
    already JSON-encoded string per hole, in document order.
    """

    SLOT = _SENTINEL

    def __init__(self, obj: Any) -> None:
        self._parts = _dumps(obj).split(_QUOTED_SENTINEL)

    def render(self, *values: str) -> str:
        parts = self._parts
        out = [parts[0]]
        for value, part in zip(values, parts[1:]):
            out.append(value)
            out.append(part)
        return "".join(out)


def _sse(payload: str, event: str | None = None) -> bytes:
    if event is None:
        return ("data: " + payload + "\n\n").encode()
    return ("event: " + event + "\ndata: " + payload + "\n\n").encode()


def _number(value: Any, kind: type) -> Any:
    if value is None or isinstance(value, (dict, list)):
        return None
    try:
        return kind(value)
    except (TypeError, ValueError):
        return None


def _truthy(value: Any) -> bool:
    if isinstance(value, str):
        return value.lower() in ("1", "true", "yes", "on")
    return bool(value)


def _count_words(obj: Any) -> int:
    if isinstance(obj, str):
        return len(obj.split())
    if isinstance(obj, list):
        return sum(_count_words(item) for item in obj)
    if isinstance(obj, dict):
        return sum(_count_words(v) for k, v in obj.items() if k not in ("role", "type", "name"))
    return 0


def prompt_tokens(request: dict[str, Any]) -> int:
    """A plausible prompt token count: the words in the prompt-carrying fields, at least 1."""
    return max(1, sum(_count_words(request.get(field)) for field in PROMPT_FIELDS))


def _new_id(prefix: str) -> str:
    return prefix + os.urandom(12).hex()


def timings(prompt_n: int, predicted_n: int, predicted_ms: float) -> dict[str, Any]:
    """llama-server's ``timings`` object."""
    prompt_ms = round(1.0 + prompt_n * 0.2, 3)
    predicted_ms = round(max(predicted_ms, 0.001), 3)
    return {
        "cache_n": 0,
        "prompt_n": prompt_n,
        "prompt_ms": prompt_ms,
        "prompt_per_token_ms": round(prompt_ms / prompt_n, 3) if prompt_n else 0.0,
        "prompt_per_second": round(prompt_n * 1000.0 / prompt_ms, 3),
        "predicted_n": predicted_n,
        "predicted_ms": predicted_ms,
        "predicted_per_token_ms": round(predicted_ms / predicted_n, 3) if predicted_n else 0.0,
        "predicted_per_second": round(predicted_n * 1000.0 / predicted_ms, 3),
    }


def usage(prompt_n: int, predicted_n: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_n, "completion_tokens": predicted_n,
            "total_tokens": prompt_n + predicted_n}


def embedding_for(text: str) -> list[float]:
    """Eight deterministic floats derived from ``text``."""
    seed = sum(text.encode("utf-8", "replace")) + len(text)
    return [round(math.sin((seed + 1) * (i + 1)), 6) for i in range(8)]


def parse_multipart(content_type: str, body: bytes) -> list[dict[str, Any]] | None:
    """Split a multipart/form-data body into parts: name, filename, content_type, data.

    :returns: None when ``content_type`` has no boundary.
    """
    boundary = None
    for param in content_type.split(";")[1:]:
        key, _, value = param.strip().partition("=")
        if key.lower() == "boundary":
            boundary = value.strip().strip('"')
    if not boundary:
        return None
    parts = []
    for chunk in body.split(b"--" + boundary.encode())[1:]:
        if chunk.startswith(b"--"):
            break
        chunk = chunk[2:] if chunk.startswith(b"\r\n") else chunk
        head, _, data = chunk.partition(b"\r\n\r\n")
        if data.endswith(b"\r\n"):
            data = data[:-2]
        part: dict[str, Any] = {"name": None, "filename": None, "content_type": None, "data": data}
        for line in head.decode("utf-8", "replace").split("\r\n"):
            header, _, value = line.partition(":")
            if header.strip().lower() == "content-disposition":
                for param in value.split(";")[1:]:
                    key, _, pvalue = param.strip().partition("=")
                    if key in ("name", "filename"):
                        part[key] = pvalue.strip('"')
            elif header.strip().lower() == "content-type":
                part["content_type"] = value.strip()
        parts.append(part)
    return parts


def parse_duration(text: str) -> float:
    """Seconds from ``"0.1"``, ``"100ms"``, ``"1.5s"``, ``"250us"``; raises ValueError."""
    text = text.strip()
    for suffix, scale in (("ms", 1e-3), ("us", 1e-6), ("µs", 1e-6), ("s", 1.0)):
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * scale
    return float(text)


def percent_decode(text: str) -> str:
    """``urllib.parse.unquote_plus`` without importing urllib.parse (5 ms)."""
    text = text.replace("+", " ")
    if "%" not in text:
        return text
    pieces = text.split("%")
    out = bytearray(pieces[0].encode())
    for piece in pieces[1:]:
        try:
            out += bytes.fromhex(piece[:2]) + piece[2:].encode()
        except ValueError:
            out += b"%" + piece.encode()
    return out.decode("utf-8", "replace")


def split_target(target: str) -> tuple[str, str, dict[str, str]]:
    """Path, raw query string and decoded query parameters of a request target.

    Accepts origin form (``/a?b=c``) and absolute form (``http://host/a?b=c``).
    """
    if "://" in target.split("?", 1)[0]:
        rest = target.split("://", 1)[1]
        target = "/" + rest.split("/", 1)[1] if "/" in rest else "/"
    target = target.split("#", 1)[0]
    path, _, query = target.partition("?")
    params = {}
    for pair in query.split("&"):
        if pair:
            name, _, value = pair.partition("=")
            params[percent_decode(name)] = percent_decode(value)
    return path, query, params


class ClientGone(Exception):
    """The client closed the connection while we were writing."""


# ---------------------------------------------------------------------------------------------
# Streams: a head, one event per token, a tail whose content depends on the elapsed time


class StreamPlan:
    """What one streamed answer writes, event by event."""

    def __init__(self, head: list[bytes], token_event: Callable[[str, int], bytes],
                 tail: Callable[[float], list[bytes]], content_type: str = "text/event-stream") -> None:
        self.head = head
        self.token_event = token_event
        self.tail = tail
        self.content_type = content_type


def chat_stream(model: str, prompt_n: int, n: int) -> StreamPlan:
    common = {"id": _new_id("chatcmpl-"), "object": "chat.completion.chunk",
              "created": int(time.time()), "model": model, "system_fingerprint": "fake-upstream"}
    role = dict(common, choices=[{"index": 0, "delta": {"role": "assistant", "content": ""},
                                  "logprobs": None, "finish_reason": None}])
    token = Template(dict(common, choices=[{"index": 0, "delta": {"content": Template.SLOT},
                                            "logprobs": None, "finish_reason": None}]))

    def tail(ms: float) -> list[bytes]:
        final = dict(common, choices=[{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}],
                     usage=usage(prompt_n, n), timings=timings(prompt_n, n, ms))
        return [_sse(_dumps(final)), b"data: [DONE]\n\n"]

    return StreamPlan([_sse(_dumps(role))],
                      lambda tok, i: _sse(token.render(_dumps(tok))), tail)


def text_completion_stream(model: str, prompt_n: int, n: int) -> StreamPlan:
    common = {"id": _new_id("cmpl-"), "object": "text_completion", "created": int(time.time()),
              "model": model, "system_fingerprint": "fake-upstream"}
    token = Template(dict(common, choices=[{"text": Template.SLOT, "index": 0, "logprobs": None,
                                            "finish_reason": None}]))

    def tail(ms: float) -> list[bytes]:
        final = dict(common, choices=[{"text": "", "index": 0, "logprobs": None, "finish_reason": "stop"}],
                     usage=usage(prompt_n, n), timings=timings(prompt_n, n, ms))
        return [_sse(_dumps(final)), b"data: [DONE]\n\n"]

    return StreamPlan([], lambda tok, i: _sse(token.render(_dumps(tok))), tail)


def llama_completion_stream(model: str, prompt_n: int, n: int) -> StreamPlan:
    """llama.cpp's native ``/completion`` stream: ``{"content", "stop"}`` events, no [DONE]."""
    token = Template({"index": 0, "content": Template.SLOT, "tokens": [], "stop": False,
                      "id_slot": 0, "tokens_predicted": Template.SLOT, "tokens_evaluated": prompt_n})

    def tail(ms: float) -> list[bytes]:
        final = {"index": 0, "content": "", "tokens": [], "id_slot": 0, "stop": True, "model": model,
                 "tokens_predicted": n, "tokens_evaluated": prompt_n, "stop_type": "eos",
                 "stopping_word": "", "tokens_cached": prompt_n + n, "timings": timings(prompt_n, n, ms)}
        return [_sse(_dumps(final))]

    return StreamPlan([], lambda tok, i: _sse(token.render(_dumps(tok), str(i + 1))), tail)


def messages_stream(model: str, prompt_n: int, n: int) -> StreamPlan:
    """The Anthropic Messages event sequence the anthropic SDK parses."""
    start = {"type": "message_start", "message": {
        "id": _new_id("msg_"), "type": "message", "role": "assistant", "model": model, "content": [],
        "stop_reason": None, "stop_sequence": None,
        "usage": {"input_tokens": prompt_n, "output_tokens": 0}}}
    block_start = {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}
    delta = Template({"type": "content_block_delta", "index": 0,
                      "delta": {"type": "text_delta", "text": Template.SLOT}})

    def tail(ms: float) -> list[bytes]:
        return [
            _sse(_dumps({"type": "content_block_stop", "index": 0}), "content_block_stop"),
            _sse(_dumps({"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                         "usage": {"output_tokens": n}}), "message_delta"),
            _sse(_dumps({"type": "message_stop"}), "message_stop"),
        ]

    return StreamPlan([_sse(_dumps(start), "message_start"), _sse(_dumps(block_start), "content_block_start")],
                      lambda tok, i: _sse(delta.render(_dumps(tok)), "content_block_delta"), tail)


def _response_object(resp_id: str, item_id: str, model: str, status: str, text: str | None,
                     prompt_n: int, n: int) -> dict[str, Any]:
    output = []
    if text is not None:
        output.append({"type": "message", "id": item_id, "status": "completed", "role": "assistant",
                       "content": [{"type": "output_text", "text": text, "annotations": []}]})
    obj: dict[str, Any] = {"id": resp_id, "object": "response", "created_at": int(time.time()),
                           "status": status, "model": model, "output": output}
    if status == "completed":
        obj["usage"] = {"input_tokens": prompt_n, "output_tokens": n, "total_tokens": prompt_n + n}
    return obj


def responses_stream(model: str, prompt_n: int, n: int, text: str) -> StreamPlan:
    """The OpenAI Responses API event sequence (``event: response.*``)."""
    resp_id, item_id = _new_id("resp_"), _new_id("msg_")
    # sequence numbers: 0..2 head, 3..n+2 deltas, then the tail
    head = [
        _sse(_dumps({"type": "response.created", "sequence_number": 0,
                     "response": _response_object(resp_id, item_id, model, "in_progress", None, prompt_n, n)}),
             "response.created"),
        _sse(_dumps({"type": "response.output_item.added", "sequence_number": 1, "output_index": 0,
                     "item": {"type": "message", "id": item_id, "status": "in_progress", "role": "assistant",
                              "content": []}}), "response.output_item.added"),
        _sse(_dumps({"type": "response.content_part.added", "sequence_number": 2, "item_id": item_id,
                     "output_index": 0, "content_index": 0,
                     "part": {"type": "output_text", "text": "", "annotations": []}}), "response.content_part.added"),
    ]
    delta = Template({"type": "response.output_text.delta", "sequence_number": Template.SLOT,
                      "item_id": item_id, "output_index": 0, "content_index": 0, "delta": Template.SLOT,
                      "logprobs": []})

    def tail(ms: float) -> list[bytes]:
        seq = 3 + n
        part = {"type": "output_text", "text": text, "annotations": []}
        done = _response_object(resp_id, item_id, model, "completed", text, prompt_n, n)
        return [
            _sse(_dumps({"type": "response.output_text.done", "sequence_number": seq, "item_id": item_id,
                         "output_index": 0, "content_index": 0, "text": text, "logprobs": []}),
                 "response.output_text.done"),
            _sse(_dumps({"type": "response.content_part.done", "sequence_number": seq + 1, "item_id": item_id,
                         "output_index": 0, "content_index": 0, "part": part}), "response.content_part.done"),
            _sse(_dumps({"type": "response.output_item.done", "sequence_number": seq + 2, "output_index": 0,
                         "item": done["output"][0]}), "response.output_item.done"),
            _sse(_dumps({"type": "response.completed", "sequence_number": seq + 3, "response": done}),
                 "response.completed"),
        ]

    return StreamPlan(head, lambda tok, i: _sse(delta.render(str(3 + i), _dumps(tok)),
                                                "response.output_text.delta"), tail)


# ---------------------------------------------------------------------------------------------
# HTTP: a small HTTP/1.1 server on socketserver (http.server alone costs ~40 ms of imports)

REASONS = {
    100: "Continue", 200: "OK", 201: "Created", 202: "Accepted", 204: "No Content",
    400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
    405: "Method Not Allowed", 408: "Request Timeout", 409: "Conflict", 413: "Content Too Large",
    422: "Unprocessable Content", 429: "Too Many Requests", 500: "Internal Server Error",
    501: "Not Implemented", 502: "Bad Gateway", 503: "Service Unavailable", 504: "Gateway Timeout",
}

MAX_LINE = 65536
MAX_HEADERS = 200


class BadRequest(Exception):
    """The request cannot be parsed; answered with 400 and the connection is closed."""


class Headers:
    """Request headers in arrival order, looked up case-insensitively; repeats are joined with ", "."""

    def __init__(self, pairs: list[tuple[str, str]]) -> None:
        self.pairs = pairs
        self._lowered: dict[str, str] = {}
        for name, value in pairs:
            key = name.lower()
            self._lowered[key] = f"{self._lowered[key]}, {value}" if key in self._lowered else value

    def get(self, name: str, default: str = "") -> str:
        return self._lowered.get(name.lower(), default)

    def lowered(self) -> dict[str, str]:
        return dict(self._lowered)


class FakeUpstreamServer(socketserver.ThreadingTCPServer):
    """Threading TCP server with daemon threads and one-line error logs."""

    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True

    def __init__(self, settings: argparse.Namespace, ready: threading.Event) -> None:
        self.settings = settings
        self.ready = ready
        super().__init__((settings.host, settings.port), FakeUpstreamHandler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, OSError):
            if not self.settings.quiet:
                log(f"fake upstream: connection from {client_address[0]}:{client_address[1]} dropped: {exc!r}")
            return
        import traceback

        log("fake upstream: unexpected error\n" + traceback.format_exc(), end="")


class FakeUpstreamHandler(socketserver.StreamRequestHandler):
    """One client connection: reads requests one after the other (keep-alive) and answers them."""

    disable_nagle_algorithm = True
    server: FakeUpstreamServer

    def handle(self) -> None:
        while self._handle_one():
            pass

    # -- request --------------------------------------------------------------------------

    def _handle_one(self) -> bool:
        """Read and answer one request; returns whether the connection stays open."""
        line = self.rfile.readline(MAX_LINE + 1)
        while line in (b"\r\n", b"\n"):
            line = self.rfile.readline(MAX_LINE + 1)
        if not line:
            return False
        self.method, self.target, self.version = "-", "-", "HTTP/1.1"
        self.keep_alive = False
        self.chunked = True
        try:
            self._parse_head(line)
            if self.headers.get("Expect").lower() == "100-continue":
                self.wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            self.body = self._read_body()
        except BadRequest as e:
            self.keep_alive = False
            self.query_string, self.url_path, self.body = "", "-", b""
            self._send_json(400, {"error": {"message": f"bad request: {e}", "type": "invalid_request_error",
                                            "code": 400}})
            return False
        self._dispatch()
        return self.keep_alive

    def _parse_head(self, line: bytes) -> None:
        if len(line) > MAX_LINE:
            raise BadRequest("request line too long")
        parts = line.decode("latin-1").rstrip("\r\n").split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            raise BadRequest(f"malformed request line {line[:100]!r}")
        self.method, self.target, self.version = parts
        pairs: list[tuple[str, str]] = []
        while True:
            header = self.rfile.readline(MAX_LINE + 1)
            if header in (b"\r\n", b"\n"):
                break
            if not header:
                raise BadRequest("connection closed inside the headers")
            if len(pairs) >= MAX_HEADERS or len(header) > MAX_LINE:
                raise BadRequest("too many or too long headers")
            name, colon, value = header.decode("latin-1").partition(":")
            if not colon or not name.strip():
                raise BadRequest(f"malformed header {header[:100]!r}")
            pairs.append((name.strip(), value.strip()))
        self.headers = Headers(pairs)
        self.url_path, self.query_string, self.query = split_target(self.target)
        # HTTP/1.0 clients get close-delimited bodies instead of chunks.
        self.chunked = self.version != "HTTP/1.0"
        self.keep_alive = self.chunked and "close" not in self.headers.get("Connection").lower()

    def _read_body(self) -> bytes:
        try:
            if "chunked" in self.headers.get("Transfer-Encoding").lower():
                parts: list[bytes] = []
                while True:
                    line = self.rfile.readline(MAX_LINE + 1)
                    if not line:
                        raise BadRequest("connection closed inside a chunked body")
                    size = int(line.split(b";")[0].strip(), 16)
                    if size == 0:
                        while self.rfile.readline(MAX_LINE + 1) not in (b"\r\n", b"\n", b""):
                            pass
                        return b"".join(parts)
                    parts.append(self.rfile.read(size))
                    self.rfile.readline(3)
            length = self.headers.get("Content-Length")
            return self.rfile.read(int(length)) if length else b""
        except ValueError as e:
            raise BadRequest(f"bad body framing: {e}") from e

    def _dispatch(self) -> None:
        path, method = self.url_path, self.method
        if path == "/slots" or path.startswith("/slots/"):
            # As llama-server started with --no-slots and without --slot-save-path.
            return self._send_json(501, {"error": {"code": 501, "type": "not_supported_error",
                                                   "message": "This server does not support slots endpoint."}})
        if method in ("GET", "HEAD"):
            if path in ("/health", "/v1/health"):
                return self._health()
            if path in ("/v1/models", "/models"):
                return self._models()
            if path == "/props":
                return self._send_json(200, {"model": self.server.settings.model})
            if path == "/slow-respond":
                return self._slow_respond()
        if method == "POST" and path in INFERENCE_ROUTES:
            return self._inference(INFERENCE_ROUTES[path])
        self._send_json(200, self._echo())

    def _echo(self) -> dict[str, Any]:
        length = _number(self.headers.get("Content-Length"), int)
        return {"method": self.method, "path": self.url_path, "query": self.query_string,
                "headers": self.headers.lowered(), "body": self.body.decode("utf-8", "replace"),
                "content_length": length, "body_length": len(self.body)}

    def _json_body(self) -> dict[str, Any]:
        try:
            parsed = json.loads(self.body)
        except ValueError:
            return {}
        return parsed if isinstance(parsed, dict) else {}

    # -- plain answers --------------------------------------------------------------------

    def _send_head(self, status: int, headers: list[tuple[str, str]]) -> None:
        if not self.server.settings.quiet:
            log(f'fake upstream: {self.client_address[0]} "{self.method} {self.target} {self.version}" {status}')
        lines = [f"HTTP/1.1 {status} {REASONS.get(status, 'Fake Status')}",
                 "Server: fake-llama-server",
                 "Date: " + time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime())]
        lines += [f"{name}: {value}" for name, value in headers]
        if not self.keep_alive:
            lines.append("Connection: close")
        self.wfile.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))

    def _send_bytes(self, status: int, content_type: str, data: bytes) -> None:
        try:
            self._send_head(status, [("Content-Type", content_type), ("Content-Length", str(len(data)))])
            if self.method != "HEAD":
                self.wfile.write(data)
        except OSError:
            self.keep_alive = False

    def _send_json(self, status: int, obj: Any) -> None:
        self._send_bytes(status, "application/json; charset=utf-8", _dumps(obj).encode())

    def _send_error_json(self, status: int, message: str | None = None) -> None:
        self._send_json(status, {"error": {"message": message or f"fake error {status}", "type": "server_error",
                                           "code": status}})

    def _health(self) -> None:
        if self.server.ready.is_set():
            self._send_json(200, {"status": "ok"})
        else:
            self._send_json(503, LOADING_BODY)

    def _models(self) -> None:
        model = self.server.settings.model
        self._send_json(200, {"object": "list", "data": [
            {"id": model, "object": "model", "created": int(time.time()), "owned_by": "llamacpp",
             "meta": {"n_ctx_train": 4096, "n_params": 8030261248, "size": 4912898304}}]})

    # -- streams --------------------------------------------------------------------------

    def _start_stream(self, content_type: str) -> None:
        headers = [("Content-Type", content_type), ("Cache-Control", "no-cache")]
        if self.chunked:
            headers.append(("Transfer-Encoding", "chunked"))
        try:
            self._send_head(200, headers)
        except OSError as e:
            raise ClientGone() from e

    def _write_event(self, data: bytes) -> None:
        try:
            if self.chunked:
                self.wfile.write(b"%x\r\n%b\r\n" % (len(data), data))
            else:
                self.wfile.write(data)
        except OSError as e:
            raise ClientGone() from e

    def _end_stream(self) -> None:
        if self.chunked:
            try:
                self.wfile.write(b"0\r\n\r\n")
            except OSError as e:
                raise ClientGone() from e

    def _client_gone(self, sent: int) -> None:
        self.keep_alive = False
        log(f"fake upstream: client went away after {sent} chunks ({self.method} {self.url_path})")

    def _slow_respond(self) -> None:
        text = self.query.get("echo", SLOW_RESPOND_DEFAULT)
        try:
            delay = parse_duration(self.query.get("delay", "0.1"))
        except ValueError:
            message = f"invalid delay {self.query.get('delay')!r}: use seconds (0.1) or a duration (100ms)\n"
            return self._send_bytes(400, "text/plain; charset=utf-8", message.encode())
        sent = 0
        try:
            self._start_stream("text/plain; charset=utf-8")
            for char in text:
                self._write_event(char.encode())
                sent += 1
                time.sleep(delay)
            self._end_stream()
        except ClientGone:
            self._client_gone(sent)

    def _run_stream(self, plan: StreamPlan, tokens: list[str], token_delay: float,
                    crash_after: int | None) -> None:
        sent = 0
        started = time.monotonic()
        try:
            self._start_stream(plan.content_type)
            for event in plan.head:
                self._write_event(event)
                sent += 1
            for i, tok in enumerate(tokens):
                if crash_after is not None and i >= crash_after:
                    self._crash(f"after {i} content chunks")
                if token_delay > 0:
                    time.sleep(token_delay)
                self._write_event(plan.token_event(tok, i))
                sent += 1
            if crash_after is not None:
                self._crash(f"after {len(tokens)} content chunks, before the end of the stream")
            for event in plan.tail((time.monotonic() - started) * 1000.0):
                self._write_event(event)
                sent += 1
            self._end_stream()
        except ClientGone:
            self._client_gone(sent)

    def _crash(self, when: str) -> NoReturn:
        die(3, f"fake upstream: fake_crash_after: crashing {when} ({self.method} {self.url_path})")

    # -- inference ------------------------------------------------------------------------

    def _controls(self, request: dict[str, Any]) -> dict[str, Any]:
        def get(name: str, kind: type) -> Any:
            value = _number(request.get(name), kind)
            return value if value is not None else _number(self.query.get(name), kind)

        return {"status": get("fake_status", int), "delay": get("fake_delay", float),
                "crash_after": get("fake_crash_after", int), "tokens": get("fake_tokens", int),
                "token_delay": get("fake_token_delay", float),
                "echo": _truthy(request.get("fake_echo", self.query.get("fake_echo", False)))}

    def _tokens(self, request: dict[str, Any], requested: int | None) -> list[str]:
        settings = self.server.settings
        if settings.echo_body:
            return [self.body.decode("utf-8", "replace")]
        if requested is None and settings.respond is not None:
            words = settings.respond.split(" ")
            tokens = [w + " " for w in words[:-1]] + [words[-1]]
            tokens = [t for t in tokens if t]
        else:
            count = settings.tokens if requested is None else requested
            tokens = [f"tok{i} " for i in range(max(count, 0))]
        for cap_field in ("max_tokens", "max_completion_tokens", "n_predict", "max_output_tokens"):
            cap = _number(request.get(cap_field), int)
            if cap is not None and cap >= 0:
                tokens = tokens[:cap]
        return tokens

    def _inference(self, kind: str) -> None:
        if not self.server.ready.is_set():
            return self._send_json(503, LOADING_BODY)
        request = self._json_body()
        controls = self._controls(request)
        if controls["delay"]:
            time.sleep(max(controls["delay"], 0.0))
        if controls["status"] is not None and not 200 <= controls["status"] < 300:
            return self._send_error_json(controls["status"])
        stream = kind in STREAMING_KINDS and _truthy(request.get("stream", self.query.get("stream", False)))
        if controls["crash_after"] is not None and not stream:
            self._crash("before answering")
        model = request.get("model")
        if not isinstance(model, str):
            model = self.server.settings.model
        tokens = self._tokens(request, controls["tokens"])
        token_delay = controls["token_delay"]
        if token_delay is None:
            token_delay = self.server.settings.token_delay
        prompt_n = prompt_tokens(request)
        n = len(tokens)
        text = "".join(tokens)

        if stream:
            if kind == "chat":
                plan = chat_stream(model, prompt_n, n)
            elif kind == "text_completion":
                plan = text_completion_stream(model, prompt_n, n)
            elif kind == "llama_completion":
                plan = llama_completion_stream(model, prompt_n, n)
            elif kind == "messages":
                plan = messages_stream(model, prompt_n, n)
            else:
                plan = responses_stream(model, prompt_n, n, text)
            return self._run_stream(plan, tokens, max(token_delay, 0.0), controls["crash_after"])

        if kind in STREAMING_KINDS and token_delay > 0:
            time.sleep(token_delay * n)
        predicted_ms = max(token_delay, 0.0) * n * 1000.0 or 0.1 * n
        answer = getattr(self, "_answer_" + kind)(request, model, text, prompt_n, n, predicted_ms)
        if isinstance(answer, tuple):
            status, answer = answer
        else:
            status = 200
        if controls["echo"]:
            answer["echo"] = self._echo()
        self._send_json(status, answer)

    def _answer_chat(self, request: dict[str, Any], model: str, text: str, prompt_n: int, n: int,
                     ms: float) -> dict[str, Any]:
        return {"id": _new_id("chatcmpl-"), "object": "chat.completion", "created": int(time.time()),
                "model": model, "system_fingerprint": "fake-upstream",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "logprobs": None, "finish_reason": "stop"}],
                "usage": usage(prompt_n, n), "timings": timings(prompt_n, n, ms)}

    def _answer_text_completion(self, request: dict[str, Any], model: str, text: str, prompt_n: int, n: int,
                                ms: float) -> dict[str, Any]:
        return {"id": _new_id("cmpl-"), "object": "text_completion", "created": int(time.time()),
                "model": model, "system_fingerprint": "fake-upstream",
                "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": "stop"}],
                "usage": usage(prompt_n, n), "timings": timings(prompt_n, n, ms)}

    def _answer_llama_completion(self, request: dict[str, Any], model: str, text: str, prompt_n: int, n: int,
                                 ms: float) -> dict[str, Any]:
        return {"index": 0, "content": text, "tokens": [], "id_slot": 0, "stop": True, "model": model,
                "tokens_predicted": n, "tokens_evaluated": prompt_n, "stop_type": "eos", "stopping_word": "",
                "tokens_cached": prompt_n + n, "truncated": False, "timings": timings(prompt_n, n, ms)}

    def _answer_messages(self, request: dict[str, Any], model: str, text: str, prompt_n: int, n: int,
                         ms: float) -> dict[str, Any]:
        return {"id": _new_id("msg_"), "type": "message", "role": "assistant", "model": model,
                "content": [{"type": "text", "text": text}], "stop_reason": "end_turn", "stop_sequence": None,
                "usage": {"input_tokens": prompt_n, "output_tokens": n}}

    def _answer_responses(self, request: dict[str, Any], model: str, text: str, prompt_n: int, n: int,
                          ms: float) -> dict[str, Any]:
        return _response_object(_new_id("resp_"), _new_id("msg_"), model, "completed", text, prompt_n, n)

    def _answer_embeddings(self, request: dict[str, Any], model: str, text: str, prompt_n: int, n: int,
                           ms: float) -> dict[str, Any]:
        inputs = request.get("input", request.get("content", ""))
        if not isinstance(inputs, list) or (inputs and isinstance(inputs[0], int)):
            inputs = [inputs]
        data = [{"object": "embedding", "index": i, "embedding": embedding_for(str(item))}
                for i, item in enumerate(inputs)]
        return {"object": "list", "data": data, "model": model,
                "usage": {"prompt_tokens": prompt_n, "total_tokens": prompt_n}}

    def _answer_rerank(self, request: dict[str, Any], model: str, text: str, prompt_n: int, n: int,
                       ms: float) -> dict[str, Any]:
        documents = request.get("documents")
        if not isinstance(documents, list):
            documents = []
        results = [{"index": i, "relevance_score": round(embedding_for(str(doc))[0], 6)}
                   for i, doc in enumerate(documents)]
        results.sort(key=lambda r: -r["relevance_score"])
        top_n = _number(request.get("top_n"), int)
        if top_n is not None and top_n >= 0:
            results = results[:top_n]
        return {"model": model, "object": "list", "results": results,
                "usage": {"prompt_tokens": prompt_n, "total_tokens": prompt_n}}

    def _answer_speech(self, request: dict[str, Any], model: str, text: str, prompt_n: int, n: int,
                       ms: float) -> dict[str, Any]:
        return {"message": "ok", "model": model, "input": request.get("input"), "voice": request.get("voice")}

    def _answer_transcription(self, request: dict[str, Any], model: str, text: str, prompt_n: int, n: int,
                              ms: float) -> Any:
        content_type = self.headers.get("Content-Type", "")
        parts = parse_multipart(content_type, self.body)
        if parts is None:
            return 400, {"error": {"message": f"expected multipart/form-data with a boundary, got {content_type!r}",
                                   "type": "invalid_request_error", "code": 400}}
        fields = [p["name"] for p in parts]
        model_part = next((p for p in parts if p["name"] == "model"), None)
        file_part = next((p for p in parts if p["name"] == "file"), None)
        if model_part is None or file_part is None:
            missing = "model" if model_part is None else "file"
            return 400, {"error": {"message": f"multipart field {missing!r} is missing (got {fields})",
                                   "type": "invalid_request_error", "code": 400}}
        size = len(file_part["data"])
        return {"text": f"The length of the file is {size} bytes",
                "model": model_part["data"].decode("utf-8", "replace"), "fields": fields, "file_size": size,
                "filename": file_part["filename"], "file_content_type": file_part["content_type"]}


# ---------------------------------------------------------------------------------------------
# Process


def spawn_grandchild() -> int:
    import subprocess

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"], stdin=subprocess.DEVNULL)
    return child.pid


def install_signal_handlers(settings: argparse.Namespace) -> None:
    def on_sigterm(signum: int, frame: Any) -> None:
        if settings.ignore_sigterm:
            log("fake upstream: ignoring SIGTERM", wait=1.0)
            return
        die(0, "fake upstream: SIGTERM received, exiting")

    signal.signal(signal.SIGTERM, on_sigterm)


def main(argv: list[str] | None = None) -> None:
    settings = parse_args(argv)
    install_signal_handlers(settings)
    # Kept referenced for the life of the process: the "model weights" swapproxy can measure.
    settings.held_memory = bytearray(b"\x01") * (settings.allocate_mb * 1024 * 1024)
    if settings.spawn_grandchild:
        log(f"grandchild pid={spawn_grandchild()}")
    ready = threading.Event()
    servers: list[FakeUpstreamServer] = []

    def bind() -> tuple[str, int]:
        try:
            server = FakeUpstreamServer(settings, ready)
        except OSError as e:
            die(1, f"fake upstream: cannot listen on {settings.host}:{settings.port}: {e.strerror or e}")
        servers.append(server)
        host, port = server.socket.getsockname()[:2]
        if not settings.quiet:
            log(f"fake upstream pid={os.getpid()} listening on {host}:{port}")
        return host, port

    def loaded() -> tuple[str, int]:
        ready.set()
        host, port = servers[0].socket.getsockname()[:2]
        return host, port

    def bind_loaded() -> tuple[str, int]:
        address = bind()
        ready.set()
        return address

    loading = settings.load_time > 0 or settings.stage_lines or settings.exit_during_load is not None
    if settings.health_mode == "refuse":
        # Not listening at all until the model is loaded.
        simulate_loading(settings, bind_loaded)
    else:
        bind()
        if loading:
            threading.Thread(target=simulate_loading, args=(settings, loaded), daemon=True,
                             name="loading").start()
        else:
            ready.set()
    try:
        servers[0].serve_forever(poll_interval=0.5)
    except KeyboardInterrupt:
        die(130, "fake upstream: interrupted")


if __name__ == "__main__":
    main()

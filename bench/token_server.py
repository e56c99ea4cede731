"""
A token server for the benchmark: answers a streaming chat request as llama-server writes one,
one SSE event per token, each its own HTTP chunk written and sent at once (TCP_NODELAY, one
``send`` per token), then the usage and timings chunk, ``data: [DONE]`` and the last chunk.

Unlike llama-server it computes nothing, and unlike ``tests/fake_upstream.py`` it prepares every
byte before the first one is sent, so that it emits tokens faster than any proxy can relay them:
what the stream figure measures is then the proxy's cost per chunk, not the model's speed.

    python -m bench.token_server --port 8123

``POST /v1/chat/completions`` with ``{"stream": true, "max_tokens": N}`` streams N tokens (a
non-streaming request gets one JSON answer); ``GET /health`` answers 200. One thread per
connection, keep-alive, HTTP/1.1 only; no error handling beyond closing the connection.

``--log-lines 9`` prints, per chat request, the 9 lines a recent llama-server prints to stderr
for one (4 as it takes the request, 5 once it has answered), each written on its own and 0.1 ms
after the one before, as llama-server's log thread does: what swapproxy reads and logs of a
model's output per request.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import threading
import time

MODEL = "tokens"


def token_chunk(index: int) -> bytes:
    """
    One token's event as llama-server frames it, as one HTTP chunk.
    """
    event = {
        "choices": [{"finish_reason": None, "index": 0, "delta": {"content": f" tok{index % 1000}"}}],
        "created": 1_750_000_000, "id": "chatcmpl-bench", "model": MODEL,
        "system_fingerprint": "b1-bench", "object": "chat.completion.chunk",
    }
    data = b"data: " + json.dumps(event, separators=(",", ":")).encode() + b"\n\n"
    return b"%x\r\n%b\r\n" % (len(data), data)


#: Enough distinct token chunks for any stream; a stream cycles through them.
TOKENS = [token_chunk(i) for i in range(1000)]


def tail_chunks(tokens: int, millis: float) -> bytes:
    """
    The end of a stream: the finish chunk with usage and llama.cpp timings, ``[DONE]``, the end.
    """
    final = {
        "choices": [{"finish_reason": "length", "index": 0, "delta": {}}],
        "created": 1_750_000_000, "id": "chatcmpl-bench", "model": MODEL, "object": "chat.completion.chunk",
        "usage": {"completion_tokens": tokens, "prompt_tokens": 1, "total_tokens": tokens + 1},
        "timings": {"prompt_n": 1, "prompt_ms": 0.1, "prompt_per_second": 10000.0, "predicted_n": tokens,
                    "predicted_ms": millis, "predicted_per_second": tokens / max(millis, 1e-3) * 1000},
    }
    out = b""
    for data in (b"data: " + json.dumps(final, separators=(",", ":")).encode() + b"\n\n", b"data: [DONE]\n\n"):
        out += b"%x\r\n%b\r\n" % (len(data), data)
    return out + b"0\r\n\r\n"


#: What llama-server prints for a request as it takes it on, and once it has answered.
LOG_BEFORE = [
    "I slot get_availabl: id  3 | task -1 | selected slot by LCP similarity, f_sim_best = 1.000 (> 0.100 thold)",
    "I slot launch_slot_: id  3 | task {task} | processing task, is_child = 0",
    "W slot   operator(): id  3 | task {task} | need to evaluate at least 1 token for each active slot",
    "W slot   operator(): id  3 | task {task} | n_past was set to 28",
]
LOG_AFTER = [
    "I slot print_timing: id  3 | task {task} | prompt eval time =  0.62 ms / 1 tokens (0.62 ms per token)",
    "I slot print_timing: id  3 | task {task} |        eval time =  0.00 ms / 1 tokens (0.00 ms per token)",
    "I slot print_timing: id  3 | task {task} |       total time =  0.62 ms / 2 tokens",
    "I slot print_timing: id  3 | task {task} |    graphs reused =  3",
    "I slot      release: id  3 | task {task} | stop processing: n_tokens = 29, truncated = 0",
]


#: Seconds between two lines (llama-server's log thread writes them 0.01 to 0.1 ms apart).
LOG_LINE_GAP = 0.0001


class LogLines:
    """
    Prints llama-server's lines for each request, each in its own write to stderr.
    """

    def __init__(self, count: int) -> None:
        lines = (LOG_BEFORE + LOG_AFTER) * (count // 9 + 1)
        self.before = lines[: min(count, len(LOG_BEFORE))]
        self.after = lines[len(self.before) : count]
        self.task = 0
        self.lock = threading.Lock()

    def write(self, lines: list[str]) -> None:
        with self.lock:
            for index, line in enumerate(lines):
                if index:
                    time.sleep(LOG_LINE_GAP)
                os.write(2, f"{line.format(task=self.task)}\n".encode())


def answer(stream: bool, tokens: int, sock: socket.socket) -> None:
    if not stream:
        body = json.dumps({
            "choices": [{"finish_reason": "length", "index": 0,
                         "message": {"role": "assistant", "content": " tok0" * tokens}}],
            "created": 1_750_000_000, "id": "chatcmpl-bench", "model": MODEL, "object": "chat.completion",
            "usage": {"completion_tokens": tokens, "prompt_tokens": 1, "total_tokens": tokens + 1},
        }).encode()
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json; charset=utf-8\r\n"
                     b"Content-Length: %d\r\nKeep-Alive: timeout=5, max=100\r\n\r\n%b" % (len(body), body))
        return
    started = time.perf_counter()
    sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n"
                 b"Keep-Alive: timeout=5, max=100\r\n\r\n")
    send = sock.sendall
    for index in range(tokens):
        send(TOKENS[index % 1000])
    send(tail_chunks(tokens, (time.perf_counter() - started) * 1000))


def serve_connection(sock: socket.socket, log: LogLines | None) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buffer = b""
    try:
        while True:
            while b"\r\n\r\n" not in buffer:
                data = sock.recv(65536)
                if not data:
                    return
                buffer += data
            head, _, buffer = buffer.partition(b"\r\n\r\n")
            lines = head.split(b"\r\n")
            method, path, _ = lines[0].split(b" ", 2)
            length = 0
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            while len(buffer) < length:
                data = sock.recv(65536)
                if not data:
                    return
                buffer += data
            body, buffer = buffer[:length], buffer[length:]
            if method == b"GET":
                sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 15\r\n\r\n"
                             b'{"status":"ok"}')
                continue
            request = json.loads(body) if body else {}
            if log is not None:
                log.task += 1
                log.write(log.before)
            answer(request.get("stream") is True, int(request.get("max_tokens") or 16), sock)
            if log is not None:
                log.write(log.after)
    except OSError:
        return
    finally:
        sock.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.token_server", description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--log-lines", type=int, default=0, help="lines printed to stderr per chat request")
    args = parser.parse_args(argv)
    log = LogLines(args.log_lines) if args.log_lines > 0 else None
    listener = socket.create_server((args.host, args.port), backlog=128)
    while True:
        connection, _ = listener.accept()
        threading.Thread(target=serve_connection, args=(connection, log), daemon=True).start()


if __name__ == "__main__":
    raise SystemExit(main())

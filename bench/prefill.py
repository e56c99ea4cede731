"""
How long a real llama-server stays silent while it processes a long prompt: the figure the
default ``streamIdleTimeout`` is chosen against (README, "A model that hangs").

    python -m bench.prefill                         # the slow tiny model, prompts of 256..3500 tokens
    python -m bench.prefill --model M.gguf --tokens 1000,4000 --ctx 8192 --llama-args "-t 2"

After one short request (the first answer of a fresh llama-server also pages its weights in,
which takes longer than any prompt), for each prompt length it sends one streaming
``/v1/chat/completions`` request (``max_tokens`` 4) straight to llama-server and reports, from the moment the request was sent: when the response
head arrived, when the first body byte arrived, the longest gap between two lines llama-server
printed meanwhile, and the slowest answer of ``GET /health``, probed every 0.25 s during the
prefill, and llama-server's own prompt processing time. No swapproxy is involved.
"""

from __future__ import annotations

import argparse
import json
import shlex
import socket
import subprocess
import sys
import threading
import time

from bench.http import Connection, get
from bench.processes import answers_200, wait_for
from swapproxy.testing.llama import find_llama_server, find_vocab_dir, tiny_model
from swapproxy.testing.local import LOOPBACK, free_port_range


def _lines(process: subprocess.Popen[bytes], stamps: list[float], log_path: str | None) -> None:
    assert process.stdout is not None
    log = open(log_path, "w") if log_path else None
    for line in process.stdout:
        stamps.append(time.monotonic())
        if log is not None:
            log.write(f"{stamps[-1]:.3f} {line.decode('utf-8', 'replace')}")
            log.flush()


def _health_probe(port: int, stop: threading.Event, worst: list[float]) -> None:
    while not stop.is_set():
        started = time.monotonic()
        try:
            with Connection(port, timeout=600) as connection:
                connection.request(get("/health", port))
        except OSError:
            pass
        worst.append(time.monotonic() - started)
        stop.wait(0.25)


def _timing(body: bytes, key: bytes) -> float:
    """
    One number of the last llama.cpp ``timings`` object in ``body`` (-1 when absent).
    """
    marker = body.rfind(b'"' + key + b'":')
    if marker < 0:
        return -1
    text = body[marker + len(key) + 3 :].split(b",", 1)[0].split(b"}", 1)[0]
    try:
        return float(text)
    except ValueError:
        return -1


def measure(port: int, tokens: int, stamps: list[float]) -> dict[str, float]:
    """
    One streaming request with a prompt of about ``tokens`` tokens; the times in seconds.
    """
    words = " ".join(f"w{(i * 7 + tokens) % 89}" for i in range(tokens // 2))  # no prefix in common
    body = json.dumps({"model": "m", "stream": True, "max_tokens": 4, "cache_prompt": False,
                       "messages": [{"role": "user", "content": words}]}).encode()
    raw = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
           b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body)) + body
    stop = threading.Event()
    health: list[float] = []
    prober = threading.Thread(target=_health_probe, args=(port, stop, health), daemon=True)
    with socket.create_connection((LOOPBACK, port)) as connection:
        connection.settimeout(3600)
        sent = time.monotonic()
        stamps_before = len(stamps)
        connection.sendall(raw)
        prober.start()
        data = b""
        head_at = first_byte_at = None
        while True:
            piece = connection.recv(65536)
            if not piece:
                break
            data += piece
            now = time.monotonic()
            if head_at is None and b"\r\n\r\n" in data:
                head_at = now
                if data.index(b"\r\n\r\n") + 4 < len(data):
                    first_byte_at = now
            elif head_at is not None and first_byte_at is None:
                first_byte_at = now
        end = time.monotonic()
    stop.set()
    prober.join()
    lines = [sent] + [s for s in stamps[stamps_before:] if s <= (first_byte_at or end)]
    gaps = [b - a for a, b in zip(lines, lines[1:])] + [(first_byte_at or end) - lines[-1]]
    return {
        "tokens": tokens,
        "head": (head_at or end) - sent,
        "first_byte": (first_byte_at or end) - sent,
        "longest_log_gap": max(gaps),
        "slowest_health": max(health or [0.0]),
        "prompt_tokens": int(_timing(data, b"prompt_n")),
        "prompt_seconds": _timing(data, b"prompt_ms") / 1000,
        "status_line": data.split(b"\r\n", 1)[0].decode("latin-1"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.prefill", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="a GGUF (default: the slow tiny model of scripts/make_tiny_gguf.py)")
    parser.add_argument("--tokens", default="256,1000,2000,3500", help="prompt lengths, comma-separated")
    parser.add_argument("--ctx", type=int, default=4096)
    parser.add_argument("--log", help="write llama-server's output here, each line with its time")
    parser.add_argument("--llama-args", default="", help="more llama-server flags")
    args = parser.parse_args(argv)
    llama_server = find_llama_server()
    if llama_server is None:
        sys.exit("no llama-server found")
    model = args.model
    if model is None:
        vocab = find_vocab_dir(llama_server)
        if vocab is None:
            sys.exit("no vocab directory found")
        model = tiny_model(vocab, "slow")
    port = free_port_range(1)
    argv_ = [llama_server, "-m", model, "--host", LOOPBACK, "--port", str(port), "-c", str(args.ctx),
             "-ngl", "0", "-np", "1", "--no-webui", "-fit", "off", *shlex.split(args.llama_args)]
    process = subprocess.Popen(argv_, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    stamps: list[float] = []
    threading.Thread(target=_lines, args=(process, stamps, args.log), daemon=True).start()
    try:
        wait_for(lambda: answers_200(port), 300, "llama-server to load", step=0.05)
        measure(port, 16, stamps)  # the first answer also pages the weights in
        for tokens in (int(t) for t in args.tokens.split(",")):
            result = measure(port, tokens, stamps)
            print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in result.items()}),
                  flush=True)
    finally:
        process.kill()
        process.wait()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

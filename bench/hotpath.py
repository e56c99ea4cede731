"""
The cost of swapproxy's hot path, measured in-process where a profiler can see it: the whole of
swapproxy runs in this process as ``twistd swapproxy`` runs it (`swapproxy.tap.makeService`: the
log routing and history, the request log line, the activity store with its SQLite file, Twisted's
log written to a file), on loopback; the upstream is `bench.token_server` (started by the
supervisor, as any model), and a client in a child process sends requests back to back.

    python -m bench.hotpath --requests 2000                # CPU microseconds per proxied request
    python -m bench.hotpath --requests 2000 --log-lines 9  # ... with llama-server's output lines
    python -m bench.hotpath --streams 20 --tokens 2000     # ... per relayed token chunk
    python -m bench.hotpath --requests 2000 --profile /tmp/hot.prof   # cProfile of the same
    valgrind --tool=callgrind python -m bench.hotpath --requests 2000 # instructions (this process only)

Only the work between the client's first and last request is counted in the CPU figure (the
client and the token server are other processes). ``--log-lines`` has the token server print, per
request, the lines llama-server prints (9 for a recent one); by default it prints none. Run it
twice with different counts under callgrind to subtract the start-up.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import resource
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile

from twisted.internet.protocol import ProcessProtocol
from twisted.logger import globalLogBeginner, textFileLogObserver

from swapproxy.tap import Options, makeService

# Nothing here imports Twisted's TCP module before the options are parsed: as under twistd, that
# leaves pyOpenSSL out (`swapproxy.tap.leave_out_tls`).
BENCH = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH)
TOKEN_SERVER = os.path.join(BENCH, "token_server.py")

CLIENT = """
import json, sys, time
from bench.http import Connection, post
port, requests, streams, tokens = map(int, sys.argv[1:5])
connection = Connection(port)
plain = post("/v1/chat/completions", {"model": "tokens", "messages": [], "max_tokens": 1}, port)
stream = post("/v1/chat/completions", {"model": "tokens", "messages": [], "max_tokens": tokens, "stream": True}, port)
assert connection.request(plain).status == 200
assert connection.request(stream).status == 200
print("ready", flush=True)
sys.stdin.readline()
started = time.perf_counter()
for _ in range(requests):
    assert connection.request(plain).status == 200
for _ in range(streams):
    assert connection.request(stream, keep_body=False, parse_chunks=False).status == 200
print(json.dumps({"seconds": time.perf_counter() - started}), flush=True)
"""


class Client(ProcessProtocol):
    """
    The client process: says ``ready`` once the model is loaded, then runs when told to.
    """

    def __init__(self, on_ready: object, on_done: object) -> None:
        self.on_ready = on_ready
        self.on_done = on_done
        self.output = b""

    def outReceived(self, data: bytes) -> None:
        self.output += data
        if b"ready\n" in self.output:
            self.output = self.output.replace(b"ready\n", b"")
            self.on_ready()  # type: ignore[operator]

    def processEnded(self, reason: object) -> None:
        self.on_done(self.output)  # type: ignore[operator]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.hotpath", description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=0, help="non-streaming requests (max_tokens 1)")
    parser.add_argument("--streams", type=int, default=0, help="streams of --tokens token chunks")
    parser.add_argument("--tokens", type=int, default=2000)
    parser.add_argument("--log-lines", type=int, default=0, help="lines the model prints per request")
    parser.add_argument("--profile", metavar="PATH", help="write a cProfile of the measured part here")
    args = parser.parse_args(argv)
    first, model_port = free_ports(2)
    state = tempfile.mkdtemp(prefix="swapproxy-hotpath-")
    config_path = os.path.join(state, "config.yaml")
    with open(config_path, "w") as config:
        config.write(f"startPort: {model_port}\nmodels:\n  tokens:\n"
                     f"    cmd: {shlex.quote(sys.executable)} {shlex.quote(TOKEN_SERVER)} --port ${{PORT}}"
                     f" --log-lines {args.log_lines}\n")
    options = Options()
    options.parseOptions(["-c", config_path, "-l", f"tcp:{first}:interface=127.0.0.1", "--state-dir", state])
    from twisted.internet import reactor
    # As twistd -n: Twisted's log (with the access log lines) goes to a file.
    log_file = open(os.path.join(state, "twistd.log"), "a")
    globalLogBeginner.beginLoggingTo([textFileLogObserver(log_file)], redirectStandardIO=False)
    service = makeService(options, reactor)
    profile = cProfile.Profile() if args.profile else None
    measured: dict[str, float] = {}
    client_process: list[object] = []

    def ready() -> None:
        measured["cpu"] = -cpu()
        if profile is not None:
            profile.enable()
        client_process[0].write(b"go\n")  # type: ignore[attr-defined]

    def done(output: bytes) -> None:
        if profile is not None:
            profile.disable()
        measured["cpu"] += cpu()
        measured.update(json.loads(output.strip().splitlines()[-1]) if output.strip() else {"seconds": -1})
        service.stopService().addBoth(lambda _: reactor.stop())

    env = dict(os.environ, PYTHONPATH=REPO)
    client_process.append(reactor.spawnProcess(
        Client(ready, done), sys.executable,
        [sys.executable, "-c", CLIENT, str(first), str(args.requests), str(args.streams), str(args.tokens)],
        env=env, childFDs={0: "w", 1: "r", 2: 2}))
    service.privilegedStartService()
    service.startService()
    reactor.run()
    log_file.close()
    shutil.rmtree(state, ignore_errors=True)
    if profile is not None:
        profile.dump_stats(args.profile)
    cpu_us = measured["cpu"] * 1e6
    result = {"requests": args.requests, "streams": args.streams, "tokens": args.tokens, "log_lines": args.log_lines,
              "cpu_seconds": round(measured["cpu"], 4), "wall_seconds": round(measured["seconds"], 4)}
    if args.requests and not args.streams:
        result["cpu_us_per_request"] = round(cpu_us / args.requests, 1)
    if args.streams and not args.requests:
        result["cpu_us_per_chunk"] = round(cpu_us / (args.streams * args.tokens), 2)
        result["wall_ms_per_stream"] = round(measured["seconds"] / args.streams * 1000, 2)
    print(json.dumps(result))
    return 0


def free_ports(count: int) -> list[int]:
    """
    ``count`` loopback ports that nothing listens on just now.
    """
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


if __name__ == "__main__":
    raise SystemExit(main())

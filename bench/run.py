"""
One benchmark run: start ``twistd swapproxy`` (a separate process, so that its memory and CPU time
can be read) with real llama-server models and a token server, measure each figure proxied and
direct, print one table and save it as JSON.

"Direct" is a connection to the very upstream process swapproxy runs (its port is in the generated
config), driven by the same client code (`bench.http`). Direct and proxied measurements are
interleaved, so that a change in the machine's load hits both. Every figure is a ratio to direct
where a direct counterpart exists; every time is measured from the moment the client sends.

1. Added latency: sequential non-streaming chat requests (``max_tokens: 1``) to a loaded tiny
   llama-server, in 10 alternating blocks; ratio of the medians.
2. Throughput: 16 keep-alive clients sending back to back, 2 x 5 s per side, alternating.
3. Stream relay: `bench.token_server` streams 2000 tokens as llama-server writes them, one SSE
   chunk written and sent per token, faster than any proxy relays them; time to the last byte.
   A slow client (1 KB every 10 ms) reads a 100,000-token stream for 6 s while swapproxy's RSS
   is sampled.
4. Swap: with model A loaded, a request for B; time to the first byte of the answer, minus how
   long B's llama-server takes to become healthy when started directly right after (polled every
   millisecond), paired swap by swap.
5. First byte of the loading stream, on a keep-alive connection: a streaming request for B right
   after the same connection was served by A (a swap: A must stop first), and for a model that
   is stopped with nothing else running (from idle).
6. swapproxy's RSS after the run, and its CPU seconds per 1000 requests of figures 1 and 2.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import psutil
import yaml

from bench.http import Connection, Response, get, hammer, post
from bench.processes import Processes, Swapproxy, answers_200, llama_server_and_vocab, run_directory, wait_for
from swapproxy.config import parse_config
from swapproxy.testing.llama import llama_command, tiny_model
from swapproxy.testing.local import LOOPBACK, REPO, free_port_range

MB = 1024 * 1024
PROMPT = [{"role": "user", "content": "hi"}]

#: The targets (issue 11): figure key -> (comparison, limit, how it reads).
TARGETS: dict[str, tuple[str, float, str]] = {
    "latency": ("<=", 1.10, "ratio <= 1.10"),
    "throughput": (">=", 0.92, "ratio >= 0.92"),
    "stream_relay": ("<=", 1.5, "ratio <= 1.5"),
    "slow_reader": ("<", 10.0, "< 10 MB"),
    "swap": ("<", 25.0, "< +25 ms"),
    "swap_ttfb": ("<", 0.4, "< 0.4 ms"),
    "cold_ttfb": ("<", 0.4, "< 0.4 ms"),
    "rss": ("<=", 55.0, "<= 55 MB"),
}

#: The token server's source: a model ``cmd`` runs it by path, whatever the working directory.
TOKEN_SERVER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "token_server.py")


def percentile(values: list[float], q: float) -> float:
    """
    The nearest-rank ``q``-th percentile.
    """
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def summary(values: list[float], scale: float = 1.0) -> dict[str, float]:
    """
    Median and p99 of ``values`` times ``scale``, and their count.
    """
    return {"median": statistics.median(values) * scale, "p99": percentile(values, 99) * scale, "n": len(values)}


def met(key: str, value: float) -> bool:
    comparison, limit, _ = TARGETS[key]
    return {"<=": value <= limit, ">=": value >= limit, "<": value < limit}[comparison]


class Bench:
    """
    The run's processes, ports and figures.
    """

    def __init__(self, args: argparse.Namespace, work: str, processes: Processes) -> None:
        self.args = args
        self.work = work
        self.processes = processes
        self.figures: dict[str, dict[str, Any]] = {}
        self.proxied_requests = 0
        #: swapproxy's CPU seconds over the non-streaming proxied requests, and their count.
        self.proxied_cpu = 0.0
        self.proxied_requests_cpu = 0

    # -- setup ------------------------------------------------------------------------------

    def setup(self) -> None:
        llama, vocab = llama_server_and_vocab("bench")
        self.llama = llama
        tiny_a, tiny_b = tiny_model(vocab, "tiny", 0), tiny_model(vocab, "tiny", 1)
        first = free_port_range(10)
        self.proxy_port, self.direct_port = first, first + 1
        # Enough HTTP threads for every client: llama-server serves each keep-alive connection on
        # a thread of its own, and by default has only -np + 2 of them.
        threads = ("--threads-http", str(self.args.clients + 4), *shlex.split(self.args.llama_args))
        parallel = self.args.parallel
        tokens = f"{shlex.quote(sys.executable)} {shlex.quote(TOKEN_SERVER)} --port ${{PORT}}"
        document = {
            "healthCheckTimeout": 60,
            "startPort": first + 2,
            "sendLoadingState": True,
            "models": {
                "tiny-a": {"cmd": llama_command(llama, tiny_a, *threads, parallel=parallel), "concurrencyLimit": 64},
                "tiny-b": {"cmd": llama_command(llama, tiny_b, *threads, parallel=parallel), "concurrencyLimit": 64},
                "cold": {"cmd": llama_command(llama, tiny_a)},
                "tokens": {"cmd": tokens, "concurrencyLimit": 64},
            },
            "groups": {
                "llama": {"swap": True, "exclusive": False, "members": ["tiny-a", "tiny-b"]},
                "cold": {"swap": True, "exclusive": False, "members": ["cold"]},
                "tokens": {"swap": True, "exclusive": False, "members": ["tokens"]},
            },
        }
        text = yaml.safe_dump(document, sort_keys=False)
        self.config_path = os.path.join(self.work, "config.yaml")
        with open(self.config_path, "w", encoding="utf-8") as f:
            f.write(text)
        self.config = parse_config(text, self.config_path)
        self.port = {m.id: int(m.proxy.rsplit(":", 1)[1]) for m in self.config.models.values()}
        self.swapproxy = Swapproxy(self.processes, self.config_path, self.proxy_port,
                                   os.path.join(self.work, "state"), os.path.join(self.work, "swapproxy.log"),
                                   shlex.split(self.args.twistd_args))
        self.cpu_at_start = self.swapproxy.cpu_seconds()
        self.rss_at_start = self.swapproxy.rss()
        self.proxy = Connection(self.proxy_port)

    def chat_body(self, model_id: str, **extra: Any) -> dict[str, Any]:
        body: dict[str, Any] = {"model": model_id, "messages": PROMPT, "max_tokens": 1}
        body.update(extra)
        return body

    def via_proxy(self, body: dict[str, Any], connection: Connection | None = None, keep_body: bool = True) -> Response:
        response = (connection or self.proxy).request(post("/v1/chat/completions", body, self.proxy_port), keep_body)
        self.proxied_requests += 1
        if response.status != 200:
            raise RuntimeError(f"proxied request for {body['model']} answered {response.status}: {response.body[:500]!r}")
        return response

    def running(self) -> dict[str, Any]:
        response = self.proxy.request(get("/running", self.proxy_port))
        return {entry["model"]: entry for entry in response.json()["running"]}

    def measure_cpu(self, work: Callable[[], int]) -> int:
        """
        Run ``work`` (which returns how many proxied requests it made), adding the CPU time
        swapproxy spent meanwhile to the per-request account (non-streaming requests only).
        """
        before = self.swapproxy.cpu_seconds()
        count = work()
        self.proxied_cpu += self.swapproxy.cpu_seconds() - before
        self.proxied_requests_cpu += count
        return count

    # -- 1. added latency -----------------------------------------------------------------

    def latency(self) -> None:
        port = self.port["tiny-a"]
        self.via_proxy(self.chat_body("tiny-a"))  # loads it
        upstream = psutil.Process(self.running()["tiny-a"]["pid"])
        direct = Connection(port)
        direct_raw = post("/v1/chat/completions", self.chat_body("tiny-a"), port)
        proxied_raw = post("/v1/chat/completions", self.chat_body("tiny-a"), self.proxy_port)
        for _ in range(50):
            direct.request(direct_raw)
            self.proxy.request(proxied_raw)
        rounds = 10
        per_round: int = max(1, self.args.requests // rounds)
        direct_times: list[float] = []
        proxied_times: list[float] = []
        upstream_cpu = 0.0

        def proxied_block() -> int:
            for _ in range(per_round):
                response = self.proxy.request(proxied_raw)
                assert response.status == 200, response.body
                proxied_times.append(response.total)
            return per_round

        def direct_block() -> None:
            nonlocal upstream_cpu
            before = sum(upstream.cpu_times()[:2])
            for _ in range(per_round):
                response = direct.request(direct_raw)
                assert response.status == 200, response.body
                direct_times.append(response.total)
            upstream_cpu += sum(upstream.cpu_times()[:2]) - before

        for index in range(rounds):
            if index % 2:
                direct_block()
                self.measure_cpu(proxied_block)
            else:
                self.measure_cpu(proxied_block)
                direct_block()
        direct.close()
        self.proxied_requests += rounds * per_round
        self.upstream_cpu_per_1000 = upstream_cpu / (rounds * per_round) * 1000
        p, d = summary(proxied_times, 1000), summary(direct_times, 1000)
        ratio = p["median"] / d["median"]
        self.figures["latency"] = {
            "title": "1. added latency, max_tokens 1 (ms)",
            "proxied": p, "direct": d, "ratio": ratio, "p99_ratio": p["p99"] / d["p99"],
            "added_ms": p["median"] - d["median"], "value": ratio, "met": met("latency", ratio),
        }

    # -- 2. throughput --------------------------------------------------------------------

    def throughput(self) -> None:
        port = self.port["tiny-a"]
        clients, seconds = self.args.clients, self.args.seconds
        direct_raw = post("/v1/chat/completions", self.chat_body("tiny-a"), port)
        proxied_raw = post("/v1/chat/completions", self.chat_body("tiny-a"), self.proxy_port)
        hammer(port, direct_raw, clients, 1.0)
        hammer(self.proxy_port, proxied_raw, clients, 1.0)
        d_lat: list[float] = []
        p_lat: list[float] = []
        errors: list[int] = []
        d_time = p_time = 0.0

        def proxied() -> int:
            nonlocal p_time
            latencies, failed, elapsed = hammer(self.proxy_port, proxied_raw, clients, seconds / 2)
            p_lat.extend(latencies)
            errors.extend(failed)
            p_time += elapsed
            return len(latencies)

        for _ in range(2):  # direct, proxied, direct, proxied: a drift in the machine's load hits both
            latencies, failed, elapsed = hammer(port, direct_raw, clients, seconds / 2)
            d_lat.extend(latencies)
            errors.extend(failed)
            d_time += elapsed
            self.measure_cpu(proxied)
        self.proxied_requests += len(p_lat)
        if errors:
            raise RuntimeError(f"non-200 answers under load: {errors[:10]}")
        d_rps, p_rps = len(d_lat) / d_time, len(p_lat) / p_time
        ratio = p_rps / d_rps
        self.figures["throughput"] = {
            "title": f"2. throughput, {clients} clients x {seconds:g} s (req/s)",
            "proxied": {"rps": p_rps, "latency_ms": summary(p_lat, 1000)},
            "direct": {"rps": d_rps, "latency_ms": summary(d_lat, 1000)},
            "ratio": ratio, "value": ratio, "met": met("throughput", ratio),
        }

    # -- 3. stream relay and a slow reader ------------------------------------------------

    def stream_relay(self) -> None:
        tokens = 2000
        body = self.chat_body("tokens", stream=True, max_tokens=tokens)
        self.via_proxy(self.chat_body("tokens"))  # loads it
        port = self.port["tokens"]
        direct = Connection(port)
        direct_raw = post("/v1/chat/completions", body, port)
        proxied_raw = post("/v1/chat/completions", body, self.proxy_port)
        d_check, p_check = direct.request(direct_raw), self.proxy.request(proxied_raw)
        events = d_check.body.count(b"data: ")
        # Byte for byte, but for the timings in the last chunk.
        if events < tokens or p_check.body.split(b"\n\n")[:tokens] != d_check.body.split(b"\n\n")[:tokens]:
            raise RuntimeError(f"stream relay: direct {events} events, proxied {p_check.body.count(b'data: ')}")
        for _ in range(5):
            direct.request(direct_raw, keep_body=False, parse_chunks=False)
            self.proxy.request(proxied_raw, keep_body=False, parse_chunks=False)
        direct_times: list[float] = []
        proxied_times: list[float] = []

        for index in range(self.args.streams):
            if index % 2:
                direct_times.append(direct.request(direct_raw, keep_body=False, parse_chunks=False).total)
                proxied_times.append(self.proxy.request(proxied_raw, keep_body=False, parse_chunks=False).total)
            else:
                proxied_times.append(self.proxy.request(proxied_raw, keep_body=False, parse_chunks=False).total)
                direct_times.append(direct.request(direct_raw, keep_body=False, parse_chunks=False).total)
        direct.close()
        self.proxied_requests += self.args.streams + 6
        p, d = summary(proxied_times, 1000), summary(direct_times, 1000)
        ratio = p["median"] / d["median"]
        self.figures["stream_relay"] = {
            "title": f"3. stream of {tokens} tokens, one chunk each, time to last byte (ms)",
            "proxied": p, "direct": d, "ratio": ratio, "p99_ratio": p["p99"] / d["p99"],
            "bytes": d_check.body_bytes, "value": ratio, "met": met("stream_relay", ratio),
        }

    def slow_reader(self) -> None:
        """
        A client reads 1 KB every 10 ms from a stream the token server writes as fast as it can.
        """
        chunks = self.args.slow_chunks
        body = self.chat_body("tokens", stream=True, max_tokens=chunks)
        before = self.swapproxy.rss()
        peak = before
        read = 0
        sock = socket.create_connection((LOOPBACK, self.proxy_port))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
        try:
            sock.sendall(post("/v1/chat/completions", body, self.proxy_port))
            started = time.perf_counter()
            next_sample = started
            while time.perf_counter() - started < self.args.slow_seconds:
                data = sock.recv(1024)
                if not data:
                    break
                read += len(data)
                if time.perf_counter() >= next_sample:
                    peak = max(peak, self.swapproxy.rss())
                    next_sample += 0.1
                time.sleep(0.01)
            peak = max(peak, self.swapproxy.rss())
        finally:
            sock.close()
        self.proxied_requests += 1
        time.sleep(0.5)
        after = self.swapproxy.rss()
        growth = (peak - before) / MB
        self.figures["slow_reader"] = {
            "title": f"3b. slow reader: RSS growth (MB), {chunks} chunks upstream",
            "proxied": {"rss_before_mb": before / MB, "rss_peak_mb": peak / MB, "rss_after_close_mb": after / MB,
                        "client_read_bytes": read, "seconds": self.args.slow_seconds},
            "value": growth, "met": met("slow_reader", growth),
        }

    # -- 4. swap latency ------------------------------------------------------------------

    def direct_cold_start(self, model_id: str) -> tuple[float, float, float]:
        """
        Start ``model_id``'s llama-server directly (its argv, another port), poll ``/health``
        every millisecond until 200, then send the same request.

        :returns: seconds until healthy, until the first byte of the answer, and to stop it.
        """
        argv = list(self.config.models[model_id].cmd)
        argv[argv.index("--port") + 1] = str(self.direct_port)
        started = time.perf_counter()
        process = self.processes.spawn(argv, os.path.join(self.work, "direct-llama.log"))
        try:
            wait_for(lambda: process.poll() is None and answers_200(self.direct_port), 60,
                     f"{model_id} started directly")
            healthy = time.perf_counter() - started
            with Connection(self.direct_port) as connection:
                response = connection.request(post("/v1/chat/completions", self.chat_body(model_id), self.direct_port))
            assert response.status == 200, response.body
            first_byte = time.perf_counter() - started - (response.total - response.ttfb)
        finally:
            stopped = self.processes.stop(process)
        return healthy, first_byte, stopped

    def swap(self) -> None:
        swaps: list[float] = []
        healthy: list[float] = []
        cold: list[float] = []
        stops: list[float] = []
        unload = post("/api/models/unload", {}, self.proxy_port)
        for index in range(self.args.swaps):
            loaded, model_id = ("tiny-a", "tiny-b") if index % 2 == 0 else ("tiny-b", "tiny-a")
            self.via_proxy(self.chat_body(loaded))
            response = self.via_proxy(self.chat_body(model_id))
            assert set(self.running()) & {"tiny-a", "tiny-b"} == {model_id}
            swaps.append(response.ttfb)
            # The direct start, with no llama-server running either, as in the swap.
            self.proxy.request(unload)
            wait_for(lambda: not self.running(), 30, "the models to unload", 0.005)
            h, c, s = self.direct_cold_start(model_id)
            healthy.append(h)
            cold.append(c)
            stops.append(s)
        p, h_summary = summary(swaps, 1000), summary(healthy, 1000)
        # Each swap against the direct start right after it: a drift in the machine's load
        # hits both alike.
        overhead = statistics.median(s - h for s, h in zip(swaps, healthy)) * 1000
        # The direct start's own first answer (llama-server's first request after a load is slow).
        overhead_first_byte = statistics.median(s - c for s, c in zip(swaps, cold)) * 1000
        self.direct_cold_ttfb = summary(cold, 1000)
        self.figures["swap"] = {
            "title": "4. swap A -> B, time to first byte (ms)",
            "proxied": p, "direct": h_summary, "direct_first_byte": self.direct_cold_ttfb,
            "direct_stop": summary(stops, 1000),
            "overhead_ms": overhead, "p99_overhead_ms": p["p99"] - h_summary["p99"],
            "overhead_vs_direct_first_byte_ms": overhead_first_byte,
            "value": overhead, "met": met("swap", overhead),
        }

    # -- 5. the loading stream's first byte: for a swap, and from idle ------------------------

    def loading_first_byte(self, model_id: str) -> float:
        """
        A streaming request for ``model_id`` (not ready) on the established keep-alive
        connection; returns seconds from the send to the first byte. The whole stream is read.
        """
        response = self.proxy.request(post("/v1/chat/completions", self.chat_body(model_id, stream=True),
                                           self.proxy_port))
        self.proxied_requests += 1
        if response.status != 200 or b"data: [DONE]" not in response.body or b'"stage"' not in response.body:
            raise RuntimeError(f"loading stream for {model_id}: {response.status} {response.body[-500:]!r}")
        return response.ttfb

    def direct_first_byte(self) -> dict[str, float]:
        """
        What a client gets directly instead of a loading stream: the first byte of the answer of
        a llama-server started for it (from the swap step, or measured here).
        """
        direct = getattr(self, "direct_cold_ttfb", None)
        if direct is None:
            self.direct_cold_ttfb = direct = summary(
                [self.direct_cold_start("cold")[1] for _ in range(max(3, self.args.colds // 4))], 1000)
        return direct

    def swap_ttfb(self) -> None:
        times: list[float] = []
        for index in range(self.args.swaps):
            loaded, model_id = ("tiny-a", "tiny-b") if index % 2 == 0 else ("tiny-b", "tiny-a")
            self.via_proxy(self.chat_body(loaded))  # A is loaded and has just served this connection
            times.append(self.loading_first_byte(model_id))
        self.first_byte_figure("swap_ttfb", "5. swap A -> B, streaming, loading on: first byte (ms)", times)

    def cold_ttfb(self) -> None:
        unload = post("/api/models/unload", {}, self.proxy_port)
        times: list[float] = []
        for _ in range(self.args.colds):
            self.proxy.request(unload)
            wait_for(lambda: not self.running(), 30, "every model to unload", 0.005)
            times.append(self.loading_first_byte("cold"))
        self.proxy.request(unload)
        self.first_byte_figure("cold_ttfb", "5b. from idle, streaming, loading on: first byte (ms)", times)

    def first_byte_figure(self, key: str, title: str, times: list[float]) -> None:
        """
        Record a loading stream's first bytes (seconds) as figure ``key``, against what a
        client gets directly.
        """
        p = summary(times, 1000)
        direct = self.direct_first_byte()
        self.figures[key] = {
            "title": title, "proxied": p, "direct": direct, "ratio": p["median"] / direct["median"],
            "value": p["median"], "met": met(key, p["median"]),
        }

    # -- 6. memory and CPU ----------------------------------------------------------------

    def footprint(self) -> None:
        rss = self.swapproxy.rss() / MB
        imports = subprocess.run(
            [sys.executable, "-c",
             "import psutil, treq, twisted.web.server, twisted.internet.reactor; "
             "print(psutil.Process().memory_info().rss)"],
            capture_output=True, text=True, check=True,
        )
        baseline = int(imports.stdout.strip()) / MB
        per_1000 = self.proxied_cpu / self.proxied_requests_cpu * 1000
        self.figures["rss"] = {
            "title": "6. RSS after the run (MB)",
            "proxied": {"rss_mb": rss, "rss_at_start_mb": self.rss_at_start / MB},
            "direct": {"python_twisted_treq_import_mb": baseline},
            "value": rss, "met": met("rss", rss),
        }
        self.figures["cpu"] = {
            "title": "6. CPU seconds per 1000 requests (figures 1 and 2)",
            "proxied": {"cpu_s_per_1000": per_1000, "requests": self.proxied_requests_cpu,
                        "total_cpu_s": self.swapproxy.cpu_seconds() - self.cpu_at_start,
                        "total_requests": self.proxied_requests},
            "direct": {"llama_server_cpu_s_per_1000": self.upstream_cpu_per_1000},
            "value": per_1000, "met": None,
        }


# -- the table ------------------------------------------------------------------------------


def _ms(s: dict[str, float]) -> str:
    return f"{s['median']:.2f} / {s['p99']:.2f}"


def table_rows(figures: dict[str, dict[str, Any]]) -> list[tuple[str, ...]]:
    """
    (figure, swapproxy, direct, ratio, result, target, met) for each figure, as text.
    """
    rows: list[tuple[str, ...]] = []

    def verdict(key: str) -> str:
        value = figures[key]["met"]
        return "-" if value is None else ("met" if value else "MISSED")

    def target(key: str) -> str:
        return TARGETS[key][2]

    f = figures
    if "latency" in f:
        x = f["latency"]
        rows.append((x["title"] + ", median / p99", _ms(x["proxied"]), _ms(x["direct"]), f"{x['ratio']:.3f}",
                     f"{x['added_ms']:+.3f} ms", target("latency"), verdict("latency")))
    if "throughput" in f:
        x = f["throughput"]
        rows.append((x["title"], f"{x['proxied']['rps']:.0f}", f"{x['direct']['rps']:.0f}", f"{x['ratio']:.3f}",
                     "", target("throughput"), verdict("throughput")))
        rows.append(("   latency under load (ms), median / p99", _ms(x["proxied"]["latency_ms"]),
                     _ms(x["direct"]["latency_ms"]),
                     f"{x['proxied']['latency_ms']['median'] / x['direct']['latency_ms']['median']:.3f}", "", "", ""))
    if "stream_relay" in f:
        x = f["stream_relay"]
        rows.append((x["title"] + ", median / p99", _ms(x["proxied"]), _ms(x["direct"]), f"{x['ratio']:.2f}",
                     f"{x['proxied']['median'] - x['direct']['median']:+.1f} ms", target("stream_relay"),
                     verdict("stream_relay")))
    if "slow_reader" in f:
        x = f["slow_reader"]
        p = x["proxied"]
        rows.append((x["title"], f"{p['rss_before_mb']:.1f} -> peak {p['rss_peak_mb']:.1f}", "-", "-",
                     f"{x['value']:+.2f} MB", target("slow_reader"), verdict("slow_reader")))
    if "swap" in f:
        x = f["swap"]
        rows.append((x["title"] + ", median / p99", _ms(x["proxied"]), _ms(x["direct"]) + " (healthy)",
                     f"{x['proxied']['median'] / x['direct']['median']:.2f}",
                     f"{x['overhead_ms']:+.1f} ms", target("swap"), verdict("swap")))
        rows.append(("   direct: start, healthy, then the same request: first byte", "", _ms(x["direct_first_byte"]),
                     "", f"{x['overhead_vs_direct_first_byte_ms']:+.1f} ms", "", ""))
        rows.append(("   llama-server's exit on SIGTERM (a swap waits for it)", "", _ms(x["direct_stop"]),
                     "", "", "", ""))
    for key in ("swap_ttfb", "cold_ttfb"):
        if key in f:
            x = f[key]
            rows.append((x["title"] + ", median / p99", _ms(x["proxied"]), _ms(x["direct"]) + " (no stream: loaded, answered)",
                         f"{x['ratio']:.4f}", f"{x['value']:.3f} ms", target(key), verdict(key)))
    if "rss" in f:
        x = f["rss"]
        rows.append((x["title"], f"{x['value']:.1f}",
                     f"{x['direct']['python_twisted_treq_import_mb']:.1f} (imports only)", "",
                     f"{x['value']:.1f} MB", target("rss"), verdict("rss")))
    if "cpu" in f:
        x = f["cpu"]
        rows.append((x["title"], f"{x['value']:.2f}", f"{x['direct']['llama_server_cpu_s_per_1000']:.2f} (llama-server)",
                     f"{x['value'] / x['direct']['llama_server_cpu_s_per_1000']:.2f}", "", "", ""))
    return rows


def format_table(figures: dict[str, dict[str, Any]]) -> str:
    header = ("figure", "swapproxy", "direct", "ratio", "result", "target", "")
    return render_table([header, *table_rows(figures)])


def render_table(rows: list[tuple[str, ...]]) -> str:
    """
    Rows of text as a Markdown table, the first row its header, the columns padded.
    """
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for index, row in enumerate(rows):
        lines.append(" | ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
        if index == 0:
            lines.append("-|-".join("-" * width for width in widths))
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--out", default=os.path.join(REPO, "bench", "results.json"), help="JSON results file")
    parser.add_argument("--requests", type=int, default=1000, help="sequential requests per side (figure 1)")
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients (figure 2)")
    parser.add_argument("--seconds", type=float, default=10.0, help="seconds per side under load (figure 2)")
    parser.add_argument("--parallel", type=int, default=4, help="llama-server slots (-np) of the measured models")
    parser.add_argument("--streams", type=int, default=40, help="2000-token streams per side (figure 3)")
    parser.add_argument("--slow-chunks", type=int, default=100000, help="tokens of the slowly read stream")
    parser.add_argument("--slow-seconds", type=float, default=6.0, help="how long the slow client reads")
    parser.add_argument("--swaps", type=int, default=20, help="swaps (figure 4, and again for figure 5)")
    parser.add_argument("--colds", type=int, default=20, help="starts from idle (figure 5b)")
    parser.add_argument("--llama-args", default="", metavar="ARGS",
                        help="more llama-server arguments for the models of figures 1, 2 and 4 (e.g. '--poll 0')")
    parser.add_argument("--twistd-args", default="", metavar="ARGS",
                        help="more twistd options (e.g. '--profile=/tmp/p.out --profiler=cprofile --savestats')")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (config, logs)")
    parser.add_argument("--only", default="", metavar="STEPS",
                        help="run only these steps (comma-separated: throughput, stream_relay, slow_reader, swap,"
                             " swap_ttfb, cold_ttfb; latency and footprint always run)")
    return parser.parse_args(argv)


def report(args: argparse.Namespace, started: float, load_at_start: tuple[float, float, float], llama: str,
           figures: dict[str, Any], table: str, **extra: Any) -> None:
    """
    Print a run's table and the machine's load, and save both with the raw figures (and
    ``extra``) as JSON in ``args.out``.
    """
    load = os.getloadavg()
    print(table)
    print(f"\n{os.cpu_count()} CPUs; load average at the end {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
          f" (1, 5, 15 min; this run's own processes included)")
    result = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "seconds": round(time.time() - started, 1),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
                    "load_average_at_start": list(load_at_start), "load_average_at_end": list(load)},
        "settings": vars(args),
        "llama_server": llama,
        "figures": figures,
        "table": table,
        **extra,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    print(f"\nsaved to {args.out}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.time()
    load_at_start = os.getloadavg()
    with run_directory("bench", args.keep) as (work, processes):
        bench = Bench(args, work, processes)
        bench.setup()
        steps = [bench.latency, bench.throughput, bench.stream_relay, bench.slow_reader, bench.swap,
                 bench.swap_ttfb, bench.cold_ttfb, bench.footprint]
        if args.only:
            wanted = set(args.only.split(",")) | {"latency", "footprint"}
            steps = [step for step in steps if step.__name__ in wanted]
        for step in steps:
            print(f"bench: {step.__name__} ...", file=sys.stderr, flush=True)
            step()
    report(args, started, load_at_start, bench.llama, bench.figures, format_table(bench.figures))
    return 0

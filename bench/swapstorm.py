"""
The swap storm: N clients send requests for M models of one swap group, in a random (seeded) mix,
to ``twistd swapproxy`` serving the fake upstream with a fixed load time. It measures what the
scheduling policy costs and saves: wall time, model starts, and how long requests waited (p50,
p99, max), with the default collating scheduler and with strict arrival order
(``maxOvertakes: 0``), on the same request sequences.

``python -m bench.swapstorm`` runs it alone; ``make bench`` runs it after the main benchmark.
``--sweep`` adds runs with other ``maxOvertakes`` values (how the defaults were chosen).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import re
import shutil
import statistics
import sys
import tempfile
import threading
import time
from typing import Any

import yaml

from bench.processes import Processes, Swapproxy, log_path_tail
from bench.run import render_table
from swapproxy.testing.local import LOOPBACK, REPO, fake_command, free_port_range

#: llama-swap head on the same workload (3 models, 12 clients, 60 requests, 0.3 s loads), from
#: issue 12: the figures to be at or below.
LLAMA_SWAP_HEAD = {"wall_s": (9.0, 10.0), "starts": (7, 8)}

_LOADS = re.compile(r"^swapproxy_model_load_duration_seconds_count\{[^}]*\} (\S+)$", re.MULTILINE)
_FAILED_LOADS = re.compile(r"^swapproxy_model_load_failures_total\{[^}]*\} (\S+)$", re.MULTILINE)


def percentile(values: list[float], q: float) -> float:
    """
    The nearest-rank ``q``-th percentile.
    """
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))
    return ordered[min(int(rank), len(ordered)) - 1]


def sequences(seed: int, clients: int, requests: int, models: list[str]) -> list[list[str]]:
    """
    The models each client asks for, in order: ``requests`` in all, spread evenly over clients.
    """
    rng = random.Random(seed)
    per_client = [requests // clients + (i < requests % clients) for i in range(clients)]
    return [[rng.choice(models) for _ in range(count)] for count in per_client]


def get(port: int, path: str) -> str:
    connection = http.client.HTTPConnection(LOOPBACK, port, timeout=30)
    try:
        connection.request("GET", path)
        return connection.getresponse().read().decode("utf-8")
    finally:
        connection.close()


def model_starts(port: int) -> int:
    """
    How many starts swapproxy has made (successful and failed), from ``/metrics``.
    """
    text = get(port, "/metrics")
    return int(sum(float(v) for v in _LOADS.findall(text)) + sum(float(v) for v in _FAILED_LOADS.findall(text)))


class Storm:
    """
    One run of the workload against a fresh swapproxy with the given scheduler settings.
    """

    def __init__(self, args: argparse.Namespace, work: str, label: str, fifo: dict[str, Any], seed: int) -> None:
        self.args = args
        self.work = os.path.join(work, label)
        self.label = label
        self.fifo = fifo
        self.seed = seed
        os.makedirs(self.work)

    def config(self, port: int) -> str:
        models = [f"m{i + 1}" for i in range(self.args.models)]
        cmd = fake_command("--load-time", str(self.args.load_time))
        document = {
            "healthCheckTimeout": 30,
            "startPort": port,
            "unloadTimeout": 5,
            "models": {m: {"cmd": cmd, "concurrencyLimit": self.args.clients * self.args.requests} for m in models},
            "groups": {"storm": {"swap": True, "exclusive": True, "members": models}},
            "routing": {"scheduler": {"use": "fifo", "settings": {"fifo": self.fifo}}},
        }
        path = os.path.join(self.work, "config.yaml")
        with open(path, "w", encoding="utf-8") as f:
            yaml.safe_dump(document, f, sort_keys=False)
        return path

    def run(self, processes: Processes) -> dict[str, Any]:
        first = free_port_range(self.args.models + 1)
        port = first
        swapproxy = Swapproxy(processes, self.config(first + 1), port, os.path.join(self.work, "state"),
                              os.path.join(self.work, "swapproxy.log"))
        models = [f"m{i + 1}" for i in range(self.args.models)]
        plan = sequences(self.seed, self.args.clients, self.args.requests, models)
        waits: list[float] = []
        errors: list[str] = []
        lock = threading.Lock()
        barrier = threading.Barrier(len(plan) + 1)

        def client(models_in_order: list[str]) -> None:
            connection = http.client.HTTPConnection(LOOPBACK, port, timeout=60)
            barrier.wait()
            for model_id in models_in_order:
                body = {"model": model_id, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
                if self.args.request_time:
                    body["fake_delay"] = self.args.request_time
                sent = time.perf_counter()
                try:
                    connection.request("POST", "/v1/chat/completions", json.dumps(body),
                                       {"Content-Type": "application/json"})
                    response = connection.getresponse()
                    data = response.read()
                    elapsed = time.perf_counter() - sent
                    answered = json.loads(data).get("model") if response.status == 200 else None
                    problem = None if answered == model_id else f"{model_id}: {response.status} {data[:200]!r}"
                except (OSError, http.client.HTTPException, ValueError) as e:
                    elapsed, problem = time.perf_counter() - sent, f"{model_id}: {e!r}"
                    connection.close()
                    connection = http.client.HTTPConnection(LOOPBACK, port, timeout=60)
                with lock:
                    waits.append(elapsed)
                    if problem:
                        errors.append(problem)
            connection.close()

        threads = [threading.Thread(target=client, args=(models_in_order,)) for models_in_order in plan]
        for thread in threads:
            thread.start()
        starts_before = model_starts(port)
        barrier.wait()
        started = time.perf_counter()
        for thread in threads:
            thread.join()
        wall = time.perf_counter() - started
        starts = model_starts(port) - starts_before
        swapproxy.stop()
        if errors:
            raise RuntimeError(f"swap storm ({self.label}): {len(errors)} requests failed, e.g. {errors[:3]}")
        return {
            "label": self.label, "fifo": self.fifo, "wall_s": wall, "starts": starts, "requests": len(waits),
            "wait_p50_s": statistics.median(waits), "wait_p99_s": percentile(waits, 99), "wait_max_s": max(waits),
        }


def combine(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """
    One variant's runs (one per seed): the mean of each figure, the largest max wait, and the
    range of starts.
    """
    mean = {key: statistics.mean(run[key] for run in runs) for key in ("wall_s", "starts", "wait_p50_s", "wait_p99_s")}
    return {**mean, "wait_max_s": max(run["wait_max_s"] for run in runs),
            "starts_range": (min(run["starts"] for run in runs), max(run["starts"] for run in runs))}


def format_table(variants: list[tuple[str, dict[str, Any]]], args: argparse.Namespace) -> str:
    low, high = LLAMA_SWAP_HEAD["wall_s"]
    fewest, most = LLAMA_SWAP_HEAD["starts"]
    header = ("scheduler", "wall (s)", "starts", "wait p50 (s)", "p99 (s)", "max (s)")
    rows = [header] + [
        (label, f"{run['wall_s']:.2f}", f"{run['starts']:.1f} ({run['starts_range'][0]}-{run['starts_range'][1]})",
         f"{run['wait_p50_s']:.2f}", f"{run['wait_p99_s']:.2f}", f"{run['wait_max_s']:.2f}")
        for label, run in variants
    ]
    rows.append(("llama-swap head (issue 12)", f"{low:g}-{high:g}", f"{fewest}-{most}", "", "", ""))
    title = (f"swap storm: {args.clients} clients, {args.models} models in one swap group, {args.requests} requests,"
             f" {args.load_time:g} s loads; mean of seeds {args.seeds} (max wait: the largest)")
    return title + "\n" + render_table(rows)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.swapstorm", description=__doc__)
    parser.add_argument("--clients", type=int, default=12)
    parser.add_argument("--models", type=int, default=3)
    parser.add_argument("--requests", type=int, default=60, help="requests in all")
    parser.add_argument("--load-time", type=float, default=0.3, help="seconds the fake upstream takes to load")
    parser.add_argument("--request-time", type=float, default=0.0, help="seconds each answer takes")
    parser.add_argument("--seeds", default="12,13,14", help="one run per seed (the request mix), comma-separated")
    parser.add_argument("--sweep", action="store_true",
                        help="also run maxOvertakes 4, 8, 32, linger 0 and unbounded")
    parser.add_argument("--out", default=os.path.join(REPO, "bench", "results-swapstorm.json"), help="JSON results file")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    variants: list[tuple[str, dict[str, Any]]] = [("collated (defaults)", {}), ("strict order", {"maxOvertakes": 0})]
    if args.sweep:
        variants += [(f"maxOvertakes {n}", {"maxOvertakes": n}) for n in (4, 8, 32)]
        variants += [("linger 0", {"linger": 0}), ("unbounded", {"maxOvertakes": 1_000_000, "maxWait": 0})]
    work = tempfile.mkdtemp(prefix="swapproxy-swapstorm-")
    processes = Processes()
    runs: dict[str, list[dict[str, Any]]] = {}
    failed = True
    try:
        for seed in [int(seed) for seed in args.seeds.split(",")]:
            for label, fifo in variants:
                print(f"bench: swap storm, {label}, seed {seed} ...", file=sys.stderr, flush=True)
                name = f"{label.split(' (')[0].replace(' ', '-')}-{seed}"
                run = Storm(args, work, name, fifo, seed).run(processes)
                runs.setdefault(label, []).append({**run, "label": label, "seed": seed})
        failed = False
    finally:
        processes.stop_all()
        if failed:
            for log in sorted(os.listdir(work)):
                path = os.path.join(work, log, "swapproxy.log")
                if os.path.exists(path):
                    print(f"bench: failed; {log_path_tail(path)}", file=sys.stderr)
            print(f"bench: work directory kept: {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    combined = [(label, combine(label_runs)) for label, label_runs in runs.items()]
    table = format_table(combined, args)
    print(table)
    load = os.getloadavg()
    print(f"\n{os.cpu_count()} CPUs; load average at the end {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump({"settings": vars(args), "variants": dict(combined), "runs": runs, "llama_swap_head": LLAMA_SWAP_HEAD,
                   "table": table, "load_average_at_end": list(load)}, f, indent=2)
    print(f"saved to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

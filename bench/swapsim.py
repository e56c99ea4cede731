"""
The swap storm simulated: the real `Supervisor` with fake upstreams on a `Clock`, so that load and
answer times other than the fake upstream's can be tried in seconds, without noise. Clients send
their requests one after another (a few milliseconds apart), the same mixes as the swap storm's
for the same seeds; each answer takes ``--answer``
seconds, each start ``--load`` and each stop ``--stop``; the figures are means over ``--runs``
request mixes (the largest max wait).

``python -m bench.swapsim --load 5 --answer 1`` compares the default scheduler, ``linger: 0`` and
strict order on GPU-sized loads; README ("Scheduling") quotes it.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
from typing import Any

from twisted.internet.task import Clock

from bench.swapstorm import sequences
from swapproxy.config import parse_config
from swapproxy.supervisor import Lease, Supervisor
from swapproxy.testing.upstreams import ScriptedUpstreams
from swapproxy.upstream import State

VARIANTS: list[tuple[str, dict[str, Any]]] = [
    ("collated (defaults)", {}), ("linger 0", {"linger": 0}), ("strict order", {"maxOvertakes": 0})]


def simulate(args: argparse.Namespace, fifo: dict[str, Any], seed: int) -> dict[str, float]:
    """
    One mix: wall time, starts and the waits of its requests, in simulated seconds.
    """
    clock = Clock()
    upstreams = ScriptedUpstreams()
    models = [f"m{i + 1}" for i in range(args.models)]
    config = parse_config(json.dumps({
        "models": {m: {"cmd": "fake ${PORT}", "concurrencyLimit": args.requests} for m in models},
        "groups": {"storm": {"members": models}},
        "routing": {"scheduler": {"settings": {"fifo": fifo}}},
    }), "swapsim.yaml")
    supervisor = Supervisor(config, clock, upstream_factory=upstreams)
    think = random.Random(seed + 1)
    plans = sequences(seed, args.clients, args.requests, models)
    waits: list[float] = []
    finished = [0.0]

    def follow(upstream: Any, old: State, new: State) -> None:
        if new is State.STARTING:
            clock.callLater(args.load, lambda: upstream.state is State.STARTING and upstream.become_ready())
        elif new is State.STOPPING:
            clock.callLater(args.stop, lambda: upstream.state is State.STOPPING and upstream.exited())

    for model_id in models:
        upstreams[model_id].state_observers.append(follow)

    def ask(client: int, index: int) -> None:
        if index == len(plans[client]):
            finished[0] = max(finished[0], clock.seconds())
            return
        sent = clock.seconds()

        def granted(lease: Lease) -> None:
            waits.append(clock.seconds() - sent)

            def answered() -> None:
                lease.release()
                clock.callLater(think.uniform(args.think / 2, args.think * 2), ask, client, index + 1)

            clock.callLater(args.answer, answered)

        supervisor.request(plans[client][index]).wait().addCallback(granted)

    for client in range(args.clients):
        clock.callLater(0, ask, client, 0)
    while clock.getDelayedCalls():
        clock.advance(max(0.0, min(call.getTime() for call in clock.getDelayedCalls()) - clock.seconds()))
    return {"wall_s": finished[0], "starts": sum(upstreams[m].start_count for m in models),
            "wait_p50_s": statistics.median(waits), "wait_max_s": max(waits)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.swapsim", description=__doc__)
    parser.add_argument("--clients", type=int, default=12)
    parser.add_argument("--models", type=int, default=3)
    parser.add_argument("--requests", type=int, default=60)
    parser.add_argument("--load", type=float, default=0.56, help="seconds a start takes (the fake upstream's 0.3 s"
                                                                  " load plus Python's start-up: 0.56)")
    parser.add_argument("--stop", type=float, default=0.02, help="seconds a stop takes")
    parser.add_argument("--answer", type=float, default=0.003, help="seconds an answer takes")
    parser.add_argument("--think", type=float, default=0.002, help="typical seconds between a client's requests")
    parser.add_argument("--runs", type=int, default=30, help="request mixes (seeds 12, 13, ...)")
    args = parser.parse_args(argv)
    print(f"swap storm simulated: {args.clients} clients, {args.models} models, {args.requests} requests, loads"
          f" {args.load:g} s, answers {args.answer:g} s; mean of {args.runs} mixes")
    print(f"{'scheduler':<20} | wall (s) | starts | wait p50 (s) | max (s)")
    for label, fifo in VARIANTS:
        runs = [simulate(args, fifo, seed) for seed in range(12, 12 + args.runs)]
        mean = {key: statistics.mean(run[key] for run in runs) for key in ("wall_s", "starts", "wait_p50_s")}
        print(f"{label:<20} | {mean['wall_s']:8.2f} | {mean['starts']:6.1f} | {mean['wait_p50_s']:12.2f} |"
              f" {max(run['wait_max_s'] for run in runs):7.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

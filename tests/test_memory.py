"""
Tests for `swapproxy.memory` (footprints of real processes, nvidia-smi) and the ``memory`` and
``memoryBudget`` keys. How the supervisor uses the budget is tested in test_supervisor.
"""

from __future__ import annotations

import json
import os
import stat
import sys
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from swapproxy.config import ConfigError, parse_config
from swapproxy.memory import (
    Footprints,
    GpuMemory,
    Resident,
    available_memory,
    make_room,
    never_fits,
    parse_compute_apps,
    show_bytes,
)
from swapproxy.supervisor import Supervisor
from swapproxy.testing.local import FAKE_UPSTREAM, free_port_range
from tests.support.processes import process_pipes_open, wait_until

GIB = 1024**3


class MemoryConfigTests(SynchronousTestCase):
    def parse(self, **top: Any) -> Any:
        models = top.pop("models", {"a": {"cmd": "a ${PORT}"}})
        return parse_config(json.dumps({"models": models, **top}), "config.yaml", {})

    def test_sizes(self) -> None:
        config = self.parse(models={"a": {"cmd": "a ${PORT}", "memory": "6GiB"}, "b": {"cmd": "b ${PORT}"}},
                            memoryBudget="22.5 GB")
        self.assertEqual((config.models["a"].memory, config.models["b"].memory), (6 * GIB, None))
        self.assertEqual((config.memory_budget, config.memory_budget_auto), (22_500_000_000, False))
        self.assertTrue(self.parse(memoryBudget="auto").memory_budget_auto)
        self.assertIsNone(self.parse().memory_budget)

    def test_errors(self) -> None:
        error = self.assertRaises(ConfigError, self.parse, models={"a": {"cmd": "a ${PORT}", "memory": "lots"}})
        self.assertEqual(str(error), 'config.yaml: models.a.memory: must be a size such as 6GiB, 512MiB or'
                                     ' 8000000000, got "lots"')
        error = self.assertRaises(ConfigError, self.parse, memoryBudget=0)
        self.assertEqual(str(error), "config.yaml: memoryBudget: must be a size such as 6GiB, 512MiB or 8000000000"
                                     " or auto (what is free when swapproxy starts), got 0")


def resident(name: str, need: int, stopping: bool = False, busy: bool = False, last_used: float = 0.0,
             protected: bool = False) -> Resident:
    return Resident(name, name, need, stopping, busy, last_used, protected)


class MakeRoomTests(SynchronousTestCase):
    """
    `make_room` and `never_fits`, the budget's decisions.
    """

    def test_order(self) -> None:
        """
        Stopping models count first, then idle ones by age of last use, then busy ones; what is
        protected or counts 0 is never picked; no more than needed.
        """
        residents = [resident("busy-old", 4, busy=True, last_used=1), resident("idle-new", 4, last_used=9),
                     resident("idle-old", 4, last_used=2), resident("stopping", 4, stopping=True, last_used=10),
                     resident("kept", 4, protected=True), resident("unknown", 0)]
        room = make_room(4, 16, residents)
        self.assertEqual([r.process for r in room], ["stopping", "idle-old"])
        room = make_room(16, 20, residents)
        self.assertEqual([r.process for r in room], ["stopping", "idle-old", "idle-new", "busy-old"])
        self.assertEqual(make_room(4, 24, residents), [])

    def test_never_fits(self) -> None:
        self.assertIsNone(never_fits("m", 8 * GIB, "declared", 10 * GIB, [resident("x", 8 * GIB)]))
        self.assertIn("more than the memory budget", never_fits("m", 11 * GIB, "measured", 10 * GIB, []) or "")
        self.assertEqual(
            never_fits("m", 4 * GIB, "measured", 10 * GIB, [resident("p", 7 * GIB, protected=True)]),
            "model 'm' needs 4.0 GiB (measured), but 7.0 GiB of the 10.0 GiB memory budget is held by"
            " persistent models p; unload them first")


class FootprintTests(SynchronousTestCase):
    def test_show_bytes(self) -> None:
        self.assertEqual([show_bytes(n) for n in (6 * GIB, 512 * 1024**2, 2048, 5)],
                         ["6.0 GiB", "512.0 MiB", "2.0 KiB", "5 B"])

    def test_parse_compute_apps(self) -> None:
        text = "1234, 8000\n1234, 24\n99, 512\n[Not Supported]\n"
        self.assertEqual(parse_compute_apps(text), {1234: 8024 * 1024**2, 99: 512 * 1024**2})

    def test_gpu_memory_of_the_tree_is_added(self) -> None:
        gpu = GpuMemory(Clock(), "")
        d: Deferred[dict[int, int]] = Deferred()
        gpu.per_process = lambda: d  # type: ignore[method-assign]
        footprints = Footprints(Clock(), rss=lambda pids: 100, gpu=gpu, pids=lambda pid: [pid, pid + 1])
        footprints.measure("m", 10)
        d.callback({11: 1000, 12: 5})
        self.assertEqual(footprints.measured, {"m": 1100})

    def test_available_memory(self) -> None:
        self.assertGreater(available_memory(), 0)


class RealProcessTests(TestCase):
    """
    Footprints of real processes: the fake upstream holding memory, and a stand-in nvidia-smi.
    """

    timeout = 60

    async def test_measures_the_fake_upstream(self) -> None:
        """
        A model that holds 64 MiB is measured at more than that once it is ready.
        """
        config = parse_config(json.dumps({
            "startPort": free_port_range(1), "healthCheckTimeout": 15, "unloadTimeout": 2,
            "memoryBudget": "64GiB",
            "models": {"heavy": {"cmd": f"{sys.executable} {FAKE_UPSTREAM} --port ${{PORT}} --quiet --allocate-mb 64"}},
        }), "test.yaml")
        supervisor = Supervisor(config, reactor, footprints=Footprints(reactor, gpu=GpuMemory(reactor, "")))
        self.addCleanup(lambda: Deferred.fromCoroutine(wait_until(lambda: not process_pipes_open(), what="pipes")))
        supervisor.startService()
        self.addCleanup(supervisor.stopService)
        lease = await supervisor.request("heavy").wait()
        lease.release()
        await wait_until(lambda: supervisor.memory_of("heavy")["measured"] is not None, what="the first measurement")
        measured = supervisor.memory_of("heavy")["measured"]
        self.assertIsNotNone(measured)
        self.assertGreater(measured, 64 * 1024**2)
        self.assertLess(measured, 1024**3)

    async def test_nvidia_smi_per_process(self) -> None:
        """
        GPU memory per process comes from ``nvidia-smi --query-compute-apps``; a failing one counts 0.
        """
        script = self.mktemp()
        with open(script, "w") as f:
            f.write("#!/bin/sh\n"
                    "[ \"$1\" = --query-compute-apps=pid,used_memory ] || exit 2\n"
                    "printf '4242, 1024\\n77, 10\\n'\n")
        os.chmod(script, stat.S_IRWXU)
        self.assertEqual(await GpuMemory(reactor, script).per_process(), {4242: 1024**3, 77: 10 * 1024**2})
        failing = self.mktemp()
        with open(failing, "w") as f:
            f.write("#!/bin/sh\nexit 9\n")
        os.chmod(failing, stat.S_IRWXU)
        self.assertEqual(await GpuMemory(reactor, failing).per_process(), {})

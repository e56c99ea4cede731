# -*- test-case-name: tests.test_memory -*-
"""
How much memory the models take: what they declare (``memory``), what they are measured to use
once loaded, and the budget they share (``memoryBudget``): `make_room` picks the models to stop
for a start to fit, `never_fits` says why one never can.

A model's footprint is the resident memory (RSS) of its whole process tree, read with psutil, plus
the GPU memory that ``nvidia-smi --query-compute-apps`` reports for those processes when that
command exists. It is measured when the model becomes ready and again, at most every
`REMEASURE_INTERVAL` seconds, when a request on it ends; the largest figure of a run is kept and
used for the model's next start when it declares no ``memory``.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import attrs
import psutil
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorProcess
from twisted.internet.utils import getProcessOutputAndValue

from swapproxy.logs import proxy_logger
from swapproxy.reactors import IProcessClock

log = proxy_logger("swapproxy.memory")

#: Seconds between two measurements of a running model's footprint.
REMEASURE_INTERVAL = 30.0

GIB = 1024**3


def show_bytes(count: int) -> str:
    """
    ``6.0 GiB``, ``512.0 MiB``: a size for people.
    """
    for unit, size in (("GiB", GIB), ("MiB", 1024**2), ("KiB", 1024)):
        if count >= size:
            return f"{count / size:.1f} {unit}"
    return f"{count} B"


@attrs.frozen
class Resident:
    """
    A running model process as the budget sees it.

    :ivar process: what `make_room` hands back (the supervisor's upstream).
    :ivar need: the bytes it is counted for.
    :ivar stopping: it is already stopping (its memory is about to be free).
    :ivar busy: it has requests in flight or waiting.
    :ivar last_used: when its last request ended (clock seconds).
    :ivar protected: it may not be stopped for memory (a member of another, persistent, group).
    """

    process: Any
    model_id: str
    need: int
    stopping: bool
    busy: bool
    last_used: float
    protected: bool


def make_room(need: int, budget: int, resident: Sequence[Resident]) -> list[Resident]:
    """
    The residents to stop so that ``need`` more bytes fit in ``budget``: those already stopping
    first, then idle ones least recently used first, then busy ones; never protected ones nor
    ones that count for nothing. As many as can be, if that is still not enough.
    """
    excess = sum(r.need for r in resident) + need - budget
    room = []
    candidates = sorted((r for r in resident if r.need and not r.protected),
                        key=lambda r: (not r.stopping, r.busy, r.last_used))
    for candidate in candidates:
        if excess <= 0:
            break
        room.append(candidate)
        excess -= candidate.need
    return room


def never_fits(model_id: str, need: int, source: str, budget: int, resident: Sequence[Resident]) -> str | None:
    """
    Why a model that needs ``need`` bytes (``source``: declared or measured) can never fit in
    ``budget``, with the numbers; ``None`` when it can once the unprotected residents are stopped.
    """
    if need > budget:
        return (f"model {model_id!r} needs {show_bytes(need)} ({source}), more than the memory budget of"
                f" {show_bytes(budget)} (memoryBudget)")
    kept = [r for r in resident if r.protected]
    held = sum(r.need for r in kept)
    if need + held > budget:
        names = ", ".join(sorted(r.model_id for r in kept))
        return (f"model {model_id!r} needs {show_bytes(need)} ({source}), but {show_bytes(held)} of the"
                f" {show_bytes(budget)} memory budget is held by persistent models {names}; unload them first")
    return None


def tree_pids(pid: int) -> list[int]:
    """
    ``pid`` and its descendants that still exist.
    """
    try:
        process = psutil.Process(pid)
        return [pid] + [child.pid for child in process.children(recursive=True)]
    except psutil.Error:
        return []


def tree_rss(pids: Iterable[int]) -> int:
    """
    The resident memory of these processes together (those that have gone count 0).
    """
    total = 0
    for pid in pids:
        try:
            total += psutil.Process(pid).memory_info().rss
        except psutil.Error:
            pass
    return total


def available_memory() -> int:
    """
    What the machine has free now (psutil's ``available``), in bytes.
    """
    return int(psutil.virtual_memory().available)


def parse_compute_apps(text: str) -> dict[int, int]:
    """
    ``nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader,nounits`` -> pid: bytes.
    """
    used: dict[int, int] = {}
    for line in text.splitlines():
        parts = [part.strip() for part in line.split(",")]
        if len(parts) == 2 and parts[0].isdigit() and parts[1].isdigit():
            used[int(parts[0])] = used.get(int(parts[0]), 0) + int(parts[1]) * 1024**2
    return used


class GpuMemory:
    """
    GPU memory per process, from ``nvidia-smi`` when it is installed; nothing otherwise.

    :param reactor: provides ``IReactorProcess``.
    :param executable: the ``nvidia-smi`` to run; found on ``PATH`` by default.
    """

    def __init__(self, reactor: IReactorProcess, executable: str | None = None) -> None:
        self._reactor = reactor
        self.executable = executable if executable is not None else shutil.which("nvidia-smi")

    def per_process(self) -> Deferred[dict[int, int]]:
        """
        pid -> bytes of GPU memory; empty without ``nvidia-smi`` or when it fails.
        """
        if not self.executable:
            return succeed({})
        d = getProcessOutputAndValue(
            self.executable, ["--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
            reactor=self._reactor)

        def parsed(result: tuple[bytes, bytes, int]) -> dict[int, int]:
            out, _, code = result
            return parse_compute_apps(out.decode("utf-8", "replace")) if code == 0 else {}

        def failed(failure: Any) -> dict[int, int]:
            log.warn("nvidia-smi failed: {error}", error=failure.getErrorMessage())
            return {}

        result: Deferred[dict[int, int]] = d.addCallbacks(parsed, failed)
        return result


class Footprints:
    """
    The measured footprint of each model, learned from its running processes.

    :param reactor: provides ``IReactorTime`` (and ``IReactorProcess`` for ``nvidia-smi``).
    :param rss: pids -> resident bytes (tests pass a fake).
    :param gpu: what reports GPU memory per process.
    :ivar measured: model id -> the largest footprint measured during its last run, in bytes.
    """

    def __init__(
        self,
        reactor: IProcessClock,
        rss: Callable[[Iterable[int]], int] = tree_rss,
        gpu: GpuMemory | None = None,
        pids: Callable[[int], list[int]] = tree_pids,
    ) -> None:
        self._reactor = reactor
        self._rss = rss
        self._pids = pids
        self._gpu = gpu if gpu is not None else GpuMemory(reactor)
        self.measured: dict[str, int] = {}
        self._measured_at: dict[str, float] = {}
        self._running_max: dict[str, int] = {}

    def started(self, model_id: str) -> None:
        """
        A new run of the model began: its next measurements replace the last run's figure.
        """
        self._running_max.pop(model_id, None)
        self._measured_at.pop(model_id, None)

    def measure(self, model_id: str, pid: int | None, force: bool = False) -> Deferred[None]:
        """
        Measure the process tree of ``pid`` for ``model_id``, unless it was measured less than
        `REMEASURE_INTERVAL` seconds ago (``force`` measures anyway).
        """
        now = self._reactor.seconds()
        last = self._measured_at.get(model_id)
        if pid is None or (not force and last is not None and now - last < REMEASURE_INTERVAL):
            return succeed(None)
        self._measured_at[model_id] = now
        pids = self._pids(pid)
        resident = self._rss(pids)

        def add_gpu(per_process: dict[int, int]) -> None:
            total = resident + sum(per_process.get(p, 0) for p in pids)
            if total > 0:
                largest = max(total, self._running_max.get(model_id, 0))
                self._running_max[model_id] = largest
                self.measured[model_id] = largest

        return self._gpu.per_process().addCallback(add_gpu)

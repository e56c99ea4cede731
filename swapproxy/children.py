# -*- test-case-name: tests.test_children -*-
"""
The model processes swapproxy runs, remembered in a small state file, so that the next run can stop
the ones a SIGKILL of swapproxy left behind.

Each model runs in a session of its own, so when swapproxy is killed outright (the OOM killer,
``kill -9``, supervisord's SIGKILL after ``stopwaitsecs``) nothing stops its models: they keep
their memory and their ports. `ChildRecord` writes the pid, start time and command line of every
child while it runs; the next swapproxy reads the file before it serves and stops each recorded
process that is still provably the same one: same pid, same start time, same command line.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable
from typing import Any

import attrs
import psutil

from swapproxy.logs import proxy_logger
from swapproxy.statefile import replace_json
from swapproxy.upstream import Upstream

log = proxy_logger("swapproxy.children")

#: The state file's name in the state directory.
STATE_FILE = "children.json"

#: How far apart two readings of one process's start time may be (Linux counts in clock ticks).
_START_TIME_SLACK = 0.05

#: How long to wait for processes to vanish after SIGKILL.
_KILL_WAIT = 5.0


@attrs.frozen
class ChildEntry:
    """
    One recorded process.

    :ivar model: the model it serves.
    :ivar pid: its pid, which is also its session and process group id.
    :ivar create_time: its start time as psutil reports it (seconds since the epoch).
    :ivar cmdline: the argv it was started to run.
    """

    model: str
    pid: int
    create_time: float
    cmdline: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {"model": self.model, "pid": self.pid, "create_time": self.create_time, "cmdline": list(self.cmdline)}

    @classmethod
    def from_json(cls, data: Any) -> ChildEntry | None:
        try:
            entry = cls(
                model=str(data["model"]),
                pid=int(data["pid"]),
                create_time=float(data["create_time"]),
                cmdline=tuple(str(arg) for arg in data["cmdline"]),
            )
        except (KeyError, TypeError, ValueError):
            return None
        return entry if entry.pid > 1 and entry.cmdline else None


def _same_start(process: psutil.Process, create_time: float) -> bool:
    return abs(process.create_time() - create_time) <= _START_TIME_SLACK


def is_recorded_process(process: psutil.Process, entry: ChildEntry) -> bool:
    """
    Whether ``process`` is the one ``entry`` recorded: same start time, and it runs the recorded
    command.

    The recorded argv may be preceded by a launcher (``setsid``, before it has exec'd) or an
    interpreter (a script's ``#!`` line); a zombie has no command line and is judged by its start
    time alone.
    """
    try:
        if not _same_start(process, entry.create_time):
            return False
        if process.status() == psutil.STATUS_ZOMBIE:
            return True
        cmdline = tuple(process.cmdline())
    except psutil.ZombieProcess:
        return True
    except psutil.Error:
        return False
    return len(cmdline) >= len(entry.cmdline) and cmdline[len(cmdline) - len(entry.cmdline):] == entry.cmdline


def leftovers_of(entry: ChildEntry) -> list[psutil.Process]:
    """
    The live processes that provably belong to the recorded child: the child itself and its
    descendants, and the members of its session.

    If a process with the recorded pid exists but is not the recorded one, the pid was reused and
    nothing is returned. If none exists, the members of session ``entry.pid`` are still the
    child's: Linux does not hand out a pid while it names a session that has members.
    """
    found: dict[int, psutil.Process] = {}
    try:
        leader = psutil.Process(entry.pid)
    except psutil.NoSuchProcess:
        leader = None
    except psutil.Error:
        return []
    if leader is not None:
        if not is_recorded_process(leader, entry):
            return []
        found[leader.pid] = leader
        try:
            for child in leader.children(recursive=True):
                found[child.pid] = child
        except psutil.Error:
            pass
    for process in psutil.process_iter():
        if process.pid in found or process.pid == os.getpid():
            continue
        try:
            if os.getsid(process.pid) == entry.pid and process.create_time() >= entry.create_time - _START_TIME_SLACK:
                found[process.pid] = process
        except (OSError, psutil.Error):
            continue
    alive = []
    for process in found.values():
        try:
            if process.status() != psutil.STATUS_ZOMBIE:
                alive.append(process)
        except psutil.Error:
            pass
    return alive


def _describe(process: psutil.Process) -> str:
    try:
        return f"pid {process.pid} ({' '.join(process.cmdline()) or process.name()})"
    except psutil.Error:
        return f"pid {process.pid}"


def stop_processes(processes: Iterable[psutil.Process], grace: float) -> list[psutil.Process]:
    """
    SIGTERM each process, SIGKILL those still there after ``grace`` seconds. Blocks: call it
    before the reactor runs.

    psutil refuses to signal a process whose pid was reused since it was listed.

    :returns: the processes that survived even SIGKILL (normally none).
    """
    targets = list(processes)
    for process in targets:
        try:
            process.terminate()
        except psutil.Error:
            pass
    alive = _wait_gone(targets, grace)
    for process in alive:
        try:
            process.kill()
        except psutil.Error:
            pass
    return _wait_gone(alive, _KILL_WAIT)


def _running(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _wait_gone(processes: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    """
    Wait until none of ``processes`` runs; a zombie counts as gone (its parent, now init, reaps
    it). Unlike `psutil.wait_procs`, which waits for zombies that are not our children.
    """
    deadline = time.monotonic() + timeout
    alive = [process for process in processes if _running(process)]
    while alive and time.monotonic() < deadline:
        time.sleep(0.05)
        alive = [process for process in alive if _running(process)]
    return alive


class ChildRecord:
    """
    The state file of the model processes this swapproxy runs.

    The file also names its owner (this swapproxy's pid and start time), so that a second
    swapproxy started with the same state directory leaves the first one's models alone.

    :param path: the JSON file, created (with its directory) on first write.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._children: dict[int, ChildEntry] = {}
        self._enabled = True
        self._warned = False
        me = psutil.Process()
        self._owner = {"pid": me.pid, "create_time": me.create_time()}

    def _read(self) -> tuple[dict[str, Any] | None, list[ChildEntry]]:
        try:
            with open(self.path, encoding="utf-8") as f:
                data = json.load(f)
        except FileNotFoundError:
            return None, []
        except (OSError, ValueError) as e:
            log.warn("ignoring unreadable state file {path}: {error}", path=self.path, error=e)
            return None, []
        if not isinstance(data, dict):
            return None, []
        owner = data.get("owner") if isinstance(data.get("owner"), dict) else None
        listed = data.get("children")
        children: list[Any] = listed if isinstance(listed, list) else []
        return owner, [entry for entry in map(ChildEntry.from_json, children) if entry is not None]

    def clean_up(self, grace: float) -> list[str]:
        """
        Stop what an earlier swapproxy left running, then take the file over.

        Blocks for up to ``grace`` seconds (plus a few after SIGKILL): call it before serving and
        before the reactor runs. If the file's owner still runs (another swapproxy with the same
        state directory), nothing is stopped and this swapproxy records nothing.

        :param grace: seconds between SIGTERM and SIGKILL.
        :returns: a description of each process stopped.
        """
        owner, entries = self._read()
        if owner is not None and owner.get("pid") != self._owner["pid"] and _owner_alive(owner):
            log.warn(
                "another swapproxy (pid {pid}) uses the state file {path}: not cleaning up after it, "
                "and not recording this run's models there; give each swapproxy its own --state-dir",
                pid=owner.get("pid"),
                path=self.path,
            )
            self._enabled = False
            return []
        stopped: list[str] = []
        for entry in entries:
            processes = leftovers_of(entry)
            if not processes:
                continue
            described = [_describe(process) for process in processes]
            log.warn(
                "stopping what an earlier swapproxy left running for model {model}: {processes}",
                model=entry.model,
                processes=", ".join(described),
            )
            survivors = stop_processes(processes, grace)
            for process in survivors:
                log.error("could not stop {process}", process=_describe(process))
            stopped.extend(f"model {entry.model}: {text}" for text in described)
        if stopped:
            log.info("cleaned up {count} left-over processes", count=len(stopped))
        self._save()
        return stopped

    def follow(self, upstream: Upstream) -> None:
        """
        Record ``upstream``'s children from now on (a `Supervisor.each_upstream` watcher).
        """
        upstream.process_observers.append(self._process_changed)

    def _process_changed(self, upstream: Upstream, pid: int, running: bool) -> None:
        if not self._enabled:
            return
        if running:
            try:
                create_time = psutil.Process(pid).create_time()
            except psutil.Error:
                return
            command = upstream.command or upstream.model.cmd
            self._children[pid] = ChildEntry(upstream.model.id, pid, create_time, tuple(command))
        elif self._children.pop(pid, None) is None:
            return
        self._save()

    def entries(self) -> list[ChildEntry]:
        """
        The children recorded now.
        """
        return list(self._children.values())

    def _save(self) -> None:
        if not self._enabled:
            return
        data = {"owner": self._owner, "children": [entry.to_json() for entry in self._children.values()]}
        try:
            replace_json(self.path, data, indent=1)
        except OSError as e:
            if not self._warned:
                self._warned = True
                log.warn(
                    "cannot write {path} ({error}): models left running by a crash will not be "
                    "cleaned up on the next start",
                    path=self.path,
                    error=e,
                )


def _owner_alive(owner: dict[str, Any]) -> bool:
    try:
        process = psutil.Process(int(owner["pid"]))
        return _same_start(process, float(owner["create_time"])) and process.status() != psutil.STATUS_ZOMBIE
    except (KeyError, TypeError, ValueError, psutil.Error):
        return False

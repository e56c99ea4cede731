# -*- test-case-name: tests.test_upstream -*-
"""
One model's child process, procmon-style: spawned in a session of its own, its output read line
by line, stopped with ``cmdStop`` or SIGTERM to its whole process group and SIGKILL after a grace
period on the clock, and whatever it left behind killed once it exits.

A `ChildProcess` knows nothing of health or readiness: `swapproxy.upstream.Upstream` spawns one
per start and hears of its output and its exit through the callbacks it gives.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import socket
import sys
from collections.abc import Callable, Mapping, Sequence

import psutil
from twisted.internet.error import ProcessDone, ProcessExitedAlready, ProcessTerminated
from twisted.internet.interfaces import IDelayedCall, IProcessTransport
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from swapproxy.reactors import IProcessClock

#: While a model is ready, its output is read at most this often. llama-server prints about ten
#: lines per request, a few at a time: read as they came, they were five reads of a pipe per
#: request, each a round of the reactor in the middle of the requests' own bytes; read every
#: 20 ms, a read takes the lines of several requests. A loading model's output is read as it
#: comes (it brings health probes forward and shows the load's progress), and so is a read that
#: filled the read buffer (`_PIPE_READ`): more is waiting, and a child must never block on a
#: full pipe.
READY_OUTPUT_INTERVAL = 0.02
#: The most Twisted reads from a child's pipe at once.
_PIPE_READ = 8192

_SESSION_SHIM = "import os, sys; os.setsid(); os.execv(sys.argv[1], sys.argv[1:])"


def find_executable(name: str, environ: Mapping[str, str]) -> str | None:
    """
    The path of the program ``name`` on the ``PATH`` of ``environ``, or ``None``.
    """
    return shutil.which(name, path=environ.get("PATH", os.defpath))


def port_in_use(host: str, port: int) -> bool:
    """
    Whether a program already listens on ``host``:``port``, which a server about to be spawned
    is to listen on. Tried by binding it with ``SO_REUSEADDR``, as servers do, so that
    connections still closing on that port do not count.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as e:
            return e.errno == errno.EADDRINUSE
    return False


def describe_exit(reason: Failure) -> tuple[str, int | None]:
    """
    How a process ended, for people (``exit code 1``, ``signal SIGKILL``), and its exit code.
    """
    value = reason.value
    if isinstance(value, ProcessDone):
        return "exit code 0", 0
    if isinstance(value, ProcessTerminated):
        if value.signal is not None:
            try:
                name = signal.Signals(value.signal).name
            except ValueError:
                name = str(value.signal)
            return f"signal {name}", None
        return f"exit code {value.exitCode}", value.exitCode
    return str(value), None


def _launcher(executable: str) -> list[str]:
    """
    The argv prefix that runs ``executable`` as the leader of a new session.
    """
    setsid = shutil.which("setsid")
    if setsid:
        return [setsid, executable]
    return [sys.executable, "-c", _SESSION_SHIM, executable]


class ChildProcess:
    """
    One running child process and its stop.

    :param reactor: spawns the processes and keeps the kill timer.
    :param model_id: names the model in log messages.
    :param log: where the stop is logged.
    :param env: the environment it and its ``cmdStop`` run in.
    :param environ: where ``cmdStop`` is looked up (its ``PATH``).
    :param on_output: called with each chunk the child prints, before its lines.
    :param on_lines: called with ``(stream, lines)``: the whole lines of one read, ``stream``
        being ``stdout``, ``stderr`` or ``cmdStop``.
    :param on_exit: called once the child has exited and its leftovers were killed.
    :param paced: whether output may wait up to `READY_OUTPUT_INTERVAL` to be read.
    """

    def __init__(
        self,
        reactor: IProcessClock,
        model_id: str,
        log: Logger,
        env: Mapping[str, str],
        environ: Mapping[str, str],
        on_output: Callable[[bytes], None],
        on_lines: Callable[[str, list[str]], None],
        on_exit: Callable[[Failure], None],
        paced: Callable[[], bool],
    ) -> None:
        self._reactor = reactor
        self._model_id = model_id
        self._log = log
        self._env = dict(env)
        self._environ = environ
        self._on_lines = on_lines
        self._on_exit = on_exit
        self._protocol = _OutputProtocol(self, reactor, on_output, on_lines, paced)
        self._transport: IProcessTransport | None = None
        self._kill_call: IDelayedCall | None = None
        self._descendants: list[psutil.Process] = []
        #: The process id, once spawned and until it has exited.
        self.pid: int | None = None

    def spawn(self, executable: str, argv: Sequence[str]) -> int:
        """
        Run ``executable`` with ``argv`` (``argv[0]`` names it) in a session of its own.

        :returns: its process id.
        :raises OSError: when it cannot be spawned.
        """
        launcher = _launcher(executable)
        self._transport = self._reactor.spawnProcess(
            self._protocol, launcher[0], launcher + list(argv[1:]), env=self._env
        )
        self.pid = self._transport.pid
        assert self.pid is not None
        return self.pid

    def stop(self, grace: float, cmd_stop: Sequence[str], hung: bool = False) -> None:
        """
        Stop it: ``cmd_stop`` (``${PID}`` replaced) when given and found, else SIGTERM to its
        process group; SIGKILL to the group after ``grace`` seconds, counted from the end of
        ``cmd_stop``, or at once for a ``hung`` child (a ``cmd_stop`` that talks to a hung
        server may hang with it).
        """
        pid = self.pid
        if pid is None or self._transport is None:
            return
        try:
            self._descendants = psutil.Process(pid).children(recursive=True)
        except psutil.Error:
            self._descendants = []
        if cmd_stop:
            argv = [arg.replace("${PID}", str(pid)) for arg in cmd_stop]
            executable = find_executable(argv[0], self._environ)
            if executable is not None:
                self._log.info("stopping model {model} with cmdStop: {cmd}", model=self._model_id, cmd=" ".join(argv))
                try:
                    self._reactor.spawnProcess(
                        _StopCommandProtocol(self, lambda: self._arm_kill(grace)),
                        executable,
                        argv,
                        env=self._env,
                    )
                    if hung:
                        self._arm_kill(grace)
                    return
                except OSError as e:
                    self._log.warn("cmdStop of {model} could not run: {error}", model=self._model_id, error=e)
            else:
                self._log.warn("cmdStop of {model}: {exe!r} not found", model=self._model_id, exe=argv[0])
        self._log.info("stopping model {model}: SIGTERM to process group {pid}", model=self._model_id, pid=pid)
        self._signal_group(pid, signal.SIGTERM)
        self._arm_kill(grace)

    def cpu_seconds(self) -> float | None:
        """
        The CPU time the process and its descendants have used, if it can be read.
        """
        if self.pid is None:
            return None
        try:
            process = psutil.Process(self.pid)
            total = 0.0
            for each in [process, *process.children(recursive=True)]:
                times = each.cpu_times()
                total += times.user + times.system
            return total
        except psutil.Error:
            return None

    def _arm_kill(self, grace: float) -> None:
        if self._transport is None or self._kill_call is not None:
            return
        self._kill_call = self._reactor.callLater(grace, self._kill, grace)

    def _kill(self, grace: float) -> None:
        self._kill_call = None
        if self.pid is None or self._transport is None:
            return
        self._log.warn("model {model} did not exit within {grace:g}s; sending SIGKILL", model=self._model_id, grace=grace)
        self._signal_group(self.pid, signal.SIGKILL)

    def _signal_group(self, pgid: int, signum: int) -> None:
        try:
            os.killpg(pgid, signum)
        except (ProcessLookupError, PermissionError):
            # The leader may not have called setsid yet: signal it alone.
            if self._transport is not None:
                try:
                    self._transport.signalProcess(signum)
                except ProcessExitedAlready:
                    pass

    def _exited(self, reason: Failure) -> None:
        pid = self.pid
        self._transport = None
        self.pid = None
        if self._kill_call is not None and self._kill_call.active():
            self._kill_call.cancel()
        self._kill_call = None
        if pid is not None:
            if not self._descendants:
                try:
                    self._descendants = psutil.Process(pid).children(recursive=True)
                except psutil.Error:
                    pass
            self._reap_leftovers(pid)
        self._on_exit(reason)

    def _reap_leftovers(self, pid: int) -> None:
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        for proc in self._descendants:
            try:
                if proc.is_running():
                    proc.kill()
            except psutil.Error:
                pass
        self._descendants = []

    def _stop_command_output(self, data: bytes) -> None:
        self._on_lines("cmdStop", data.decode("utf-8", "replace").splitlines())

    def _stop_command_ended(self, reason: Failure) -> None:
        description, code = describe_exit(reason)
        if code != 0:
            self._log.warn("cmdStop of {model} ended with {status}", model=self._model_id, status=description)


class _OutputProtocol(ProcessProtocol):
    """
    Reads a child's stdout and stderr line by line and reports its exit.

    While its output is ``paced`` (the model is ready), the pipes are read at most every
    `READY_OUTPUT_INTERVAL`: after a read, reading pauses until then. When the child exits, what
    its pipes still hold is read before the exit is reported, so that its last words are in the
    log and in the exit message.
    """

    def __init__(
        self,
        child: ChildProcess,
        clock: IProcessClock,
        on_output: Callable[[bytes], None],
        on_lines: Callable[[str, list[str]], None],
        paced: Callable[[], bool],
    ) -> None:
        self._child = child
        self._clock = clock
        self._on_output = on_output
        self._on_lines = on_lines
        self._paced = paced
        self._partial: dict[int, bytes] = {}
        self._resume_call: IDelayedCall | None = None
        self._exited = False

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.closeStdin()

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        self._take_output(childFD, data)
        if self._resume_call is None and not self._exited and len(data) < _PIPE_READ and self._paced():
            pause = getattr(self.transport, "pauseProducing", None)
            if pause is not None:
                pause()
                self._resume_call = self._clock.callLater(READY_OUTPUT_INTERVAL, self._resume)

    def _resume(self) -> None:
        self._resume_call = None
        self._resume_reading()

    def _resume_reading(self) -> None:
        # A real process transport reads its pipes as a push producer; IProcessTransport does not say so.
        resume = getattr(self.transport, "resumeProducing", None)
        if resume is not None:
            resume()

    def _read_held_output(self) -> None:
        """
        If reading is paused, read what the pipes hold now, and read on as output comes.
        """
        call, self._resume_call = self._resume_call, None
        if call is None:
            return
        call.cancel()
        for fd, pipe in sorted(getattr(self.transport, "pipes", {}).items()):
            if fd not in (1, 2):
                continue
            try:
                while data := os.read(pipe.fileno(), 65536):
                    self._take_output(fd, data)
            except OSError:
                pass  # drained (EAGAIN), or closed
        self._resume_reading()

    def _take_output(self, childFD: int, data: bytes) -> None:
        self._on_output(data)
        partial = self._partial.pop(childFD, None)
        buffered = partial + data if partial else data
        complete, newline, rest = buffered.rpartition(b"\n")
        if len(rest) > 65536:
            complete, newline, rest = buffered, b"\n", b""
        if rest:
            self._partial[childFD] = rest
        if newline:
            # The whole lines of one read, decoded at once (no UTF-8 sequence contains "\n").
            lines = [line.rstrip("\r") for line in complete.decode("utf-8", "replace").split("\n")]
            self._on_lines("stderr" if childFD == 2 else "stdout", lines)

    def processExited(self, reason: Failure) -> None:
        self._exited = True
        self._read_held_output()
        for fd, rest in sorted(self._partial.items()):
            self._on_lines("stderr" if fd == 2 else "stdout", [rest.decode("utf-8", "replace")])
        self._partial.clear()
        self._child._exited(reason)


class _StopCommandProtocol(ProcessProtocol):
    """
    Runs ``cmdStop``, logs what it prints, and tells when it is done.
    """

    def __init__(self, child: ChildProcess, done: Callable[[], None]) -> None:
        self._child = child
        self._done = done

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.closeStdin()

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        self._child._stop_command_output(data)

    def processEnded(self, reason: Failure) -> None:
        self._child._stop_command_ended(reason)
        self._done()

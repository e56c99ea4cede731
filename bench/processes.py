"""
The processes a benchmark run starts: ``twistd swapproxy`` and llama-servers started directly.
Each is stopped by `Processes.stop_all`, which the run calls in a ``finally``.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import psutil

from bench.http import LOOPBACK, Connection, get
from swapproxy.testing.llama import HOW_TO_GET_ONE, find_llama_server, find_vocab_dir
from swapproxy.testing.local import TWISTD


def wait_for(predicate: Callable[[], bool], timeout: float, what: str, step: float = 0.001) -> float:
    """
    Poll ``predicate`` until it is true; returns the seconds it took.

    :raises TimeoutError: after ``timeout`` seconds.
    """
    started = time.perf_counter()
    while not predicate():
        if time.perf_counter() - started > timeout:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(step)
    return time.perf_counter() - started


def answers_200(port: int, path: str = "/health") -> bool:
    """
    Whether ``GET path`` on ``127.0.0.1:port`` answers 200 now (a fresh connection each time).
    """
    try:
        with Connection(port, timeout=2) as connection:
            return connection.request(get(path, port)).status == 200
    except OSError:
        return False


class Processes:
    """
    Everything this run started; `stop_all` ends it all, descendants included.
    """

    def __init__(self) -> None:
        self._started: list[subprocess.Popen[bytes]] = []
        self._seen: dict[int, psutil.Process] = {}

    def spawn(self, argv: list[str], log_path: str, new_session: bool = False) -> subprocess.Popen[bytes]:
        """
        Start ``argv`` with its output going to ``log_path``.
        """
        with open(log_path, "ab") as log:
            process = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env=dict(os.environ, PYTHONUNBUFFERED="1"), start_new_session=new_session,
            )
        self._started.append(process)
        return process

    def remember_descendants(self, process: subprocess.Popen[bytes]) -> None:
        """
        Note the current descendants of ``process``, so that `stop_all` can kill them even if
        their parent is gone by then.
        """
        try:
            for child in psutil.Process(process.pid).children(recursive=True):
                self._seen[child.pid] = child
        except psutil.Error:
            pass

    def stop(self, process: subprocess.Popen[bytes], grace: float = 15.0) -> float:
        """
        SIGTERM, then SIGKILL after ``grace``; returns how long it took to exit.
        """
        started = time.perf_counter()
        if process.poll() is None:
            self.remember_descendants(process)
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(grace)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        return time.perf_counter() - started

    def stop_all(self) -> None:
        for process in self._started:
            self.stop(process)
        for leftover in self._seen.values():
            try:
                if leftover.is_running() and leftover.status() != psutil.STATUS_ZOMBIE:
                    leftover.kill()
            except psutil.Error:
                pass


class Swapproxy:
    """
    ``twistd -n --pidfile= swapproxy`` serving a config on a loopback port.

    :param twistd_args: more options for twistd itself (``--profile``...).
    """

    def __init__(self, processes: Processes, config_path: str, port: int, state_dir: str, log_path: str,
                 twistd_args: Sequence[str] = ()) -> None:
        argv = [TWISTD, "-n", "--pidfile=", *twistd_args, "swapproxy", "-c", config_path,
                "-l", f"tcp:{port}:interface={LOOPBACK}", "--state-dir", state_dir]
        self.port = port
        self.log_path = log_path
        self._processes = processes
        self.process = processes.spawn(argv, log_path)
        self.ps = psutil.Process(self.process.pid)
        try:
            wait_for(lambda: self._check_alive() and answers_200(port), 30, "swapproxy to serve /health", 0.02)
        except TimeoutError:
            raise RuntimeError(f"swapproxy did not start; see {log_path}") from None

    def _check_alive(self) -> bool:
        if self.process.poll() is not None:
            raise RuntimeError(f"swapproxy exited with {self.process.returncode}; see {log_path_tail(self.log_path)}")
        return True

    def cpu_seconds(self) -> float:
        times = self.ps.cpu_times()
        return float(times.user + times.system)

    def rss(self) -> int:
        return int(self.ps.memory_info().rss)

    def stop(self) -> float:
        self._processes.remember_descendants(self.process)
        return self._processes.stop(self.process)


def llama_server_and_vocab(name: str) -> tuple[str, str]:
    """
    The llama-server and the llama.cpp vocab directory the end-to-end tests use.

    :raises SystemExit: with what to do, naming the run (``name``), when either is missing.
    """
    llama = find_llama_server()
    if llama is None:
        raise SystemExit(f"{name}: {HOW_TO_GET_ONE}")
    vocab = find_vocab_dir(llama)
    if vocab is None:
        raise SystemExit(f"{name}: no llama.cpp vocab files; run scripts/build_llama_server.sh --vocab-dir")
    return llama, vocab


@contextmanager
def run_directory(name: str, keep: bool) -> Iterator[tuple[str, Processes]]:
    """
    A work directory and the processes of one run: on the way out every process is stopped; on
    a failure the tail of swapproxy's log is printed; the directory is removed unless ``keep``
    is set or the run failed.

    :param name: how the run calls itself in what it prints (``bench``).
    """
    work = tempfile.mkdtemp(prefix=f"swapproxy-{name.replace('.', '-')}-")
    processes = Processes()
    failed = True
    try:
        yield work, processes
        failed = False
    finally:
        processes.stop_all()
        if failed:
            log = os.path.join(work, "swapproxy.log")
            if os.path.exists(log):
                print(f"{name}: failed; {log_path_tail(log)}", file=sys.stderr)
        if keep or failed:
            print(f"{name}: work directory kept: {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


def log_path_tail(path: str, lines: int = 30) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            tail = f.read().splitlines()[-lines:]
    except OSError:
        return path
    return path + ":\n" + "\n".join(tail)

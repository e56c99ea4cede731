"""
This machine, as the tests and the benchmark use it: loopback only, free ports, and the paths of
a source checkout (``twistd`` next to the running Python, ``tests/fake_upstream.py``).
"""

from __future__ import annotations

import os
import random
import shlex
import socket
import sys

#: The root of the source checkout.
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
#: The fake upstream program: a small OpenAI-compatible server that needs no model file.
FAKE_UPSTREAM = os.path.join(REPO, "tests", "fake_upstream.py")
TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")
LOOPBACK = "127.0.0.1"
#: Fake pids start above the largest pid Linux can hand out (2**22), so that a fake pid can never
#: name a real process, even if some code path asks the real OS about it.
FAKE_PID_BASE = 5_000_000


def port_is_free(port: int) -> bool:
    """
    Whether nothing listens on ``127.0.0.1:port`` (and we may bind it).
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((LOOPBACK, port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """
    A loopback port that was free a moment ago.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def free_port_range(count: int) -> int:
    """
    The first of ``count`` consecutive free loopback ports, picked at random above 20000 so that
    test runs in parallel rarely meet (and below the usual ephemeral range, so that client sockets
    do not take them).
    """
    rng = random.Random()
    for _ in range(200):
        first = rng.randrange(20000, 32000 - count)
        if all(port_is_free(first + i) for i in range(count)):
            return first
    raise RuntimeError(f"no {count} consecutive free ports found above 20000")


def fake_command(*args: str, quiet: bool = True) -> str:
    """
    A model ``cmd`` that runs the fake upstream on ``${PORT}`` with extra ``args``.
    """
    words = [shlex.quote(sys.executable), shlex.quote(FAKE_UPSTREAM), "--port", "${PORT}"]
    if quiet:
        words.append("--quiet")
    return " ".join(words + [shlex.quote(arg) for arg in args])

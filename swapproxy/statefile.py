# -*- test-case-name: tests.test_children,tests.test_progress -*-
"""
swapproxy's small state files: where they live, and how one is replaced without a reader ever
seeing half of it.
"""

from __future__ import annotations

import json
import os
from typing import Any


def default_state_dir(environ: dict[str, str] | os._Environ[str] | None = None) -> str:
    """
    ``$XDG_STATE_HOME/swapproxy``, or ``~/.local/state/swapproxy``.
    """
    env = os.environ if environ is None else environ
    base = env.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(base, "swapproxy")


def replace_json(path: str, data: Any, **dump_options: Any) -> None:
    """
    Write ``data`` as JSON to a temporary file beside ``path``, then rename it over ``path``;
    the directory is created if need be.

    :param dump_options: passed on to `json.dump`.
    :raises OSError: when the file cannot be written.
    """
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    temporary = f"{path}.{os.getpid()}.tmp"
    with open(temporary, "w", encoding="utf-8") as f:
        json.dump(data, f, **dump_options)
    os.replace(temporary, path)

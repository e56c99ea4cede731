"""
The real llama-server of the end-to-end tests: the one this run uses (`LLAMA_SERVER`, ``None``
when there is none, and then those tests skip), its tiny models, and the llama-servers alive
under a process.
"""

from __future__ import annotations

import psutil
from twisted.trial.unittest import SkipTest

from swapproxy.testing.llama import find_llama_server, find_vocab_dir, tiny_model

LLAMA_SERVER = find_llama_server()
_models: dict[tuple[str, int], str] = {}


def model_file(preset: str, seed: int = 0) -> str:
    """
    The cached model of ``preset`` and ``seed``, written on first use in this test run.
    """
    key = (preset, seed)
    if key not in _models:
        assert LLAMA_SERVER is not None
        vocab = find_vocab_dir(LLAMA_SERVER)
        if vocab is None:
            raise SkipTest("no llama.cpp vocab files: run scripts/build_llama_server.sh --vocab-dir")
        _models[key] = tiny_model(vocab, preset, seed)
    return _models[key]


def llama_servers_under(pid: int) -> list[psutil.Process]:
    """
    The live llama-server processes among the descendants of ``pid``.
    """
    try:
        descendants = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    found = []
    for process in descendants:
        try:
            if process.status() != psutil.STATUS_ZOMBIE and "llama-server" in process.name():
                found.append(process)
        except psutil.Error:
            pass
    return found

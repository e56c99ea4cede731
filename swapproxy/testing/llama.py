"""
A real ``llama-server`` and tiny models for it, for the end-to-end tests and the benchmark.

Nothing here builds llama-server: `find_llama_server` only looks where
``scripts/build_llama_server.sh`` would (``$LLAMA_SERVER``, ``PATH``, then its cache), and callers
skip when it finds nothing. The models are written by ``scripts/make_tiny_gguf.py`` into
``CACHE/models/`` once and reused; their content depends only on the preset, the seed and the
script, all three of which are in the file name.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import shutil
import subprocess
import sys

from swapproxy.testing.local import LOOPBACK, REPO

SCRIPTS = os.path.join(REPO, "scripts")
MAKE_TINY_GGUF = os.path.join(SCRIPTS, "make_tiny_gguf.py")
BUILD_LLAMA_SERVER = os.path.join(SCRIPTS, "build_llama_server.sh")

#: What to do when no llama-server is found.
HOW_TO_GET_ONE = (
    "no llama-server found: set LLAMA_SERVER, put llama-server on PATH, or build one into the "
    "cache with `make llama-server` (scripts/build_llama_server.sh, about 5 minutes)"
)

#: Flags every llama-server of the tests runs with: loopback only, a small context, CPU only.
BASE_FLAGS = ("--host", LOOPBACK, "--port", "${PORT}", "-c", "512", "-ngl", "0", "--no-webui")


def cache_dir() -> str:
    """
    ``$SWAPPROXY_CACHE``, or ``~/.cache/swapproxy``: where the build script keeps llama-server.
    """
    return os.environ.get("SWAPPROXY_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "swapproxy")


def _executable(path: str | None) -> str | None:
    if path and os.path.isfile(path) and os.access(path, os.X_OK):
        return os.path.abspath(path)
    return None


def find_llama_server() -> str | None:
    """
    The llama-server to test with: ``$LLAMA_SERVER``, else ``llama-server`` on ``PATH``, else the
    one ``scripts/build_llama_server.sh`` built into the cache; ``None`` when there is none.
    """
    return (
        _executable(os.environ.get("LLAMA_SERVER"))
        or _executable(shutil.which("llama-server"))
        or _executable(os.path.join(cache_dir(), "llama-server", "bin", "llama-server"))
    )


def find_vocab_dir(llama_server: str) -> str | None:
    """
    A directory of llama.cpp's ``ggml-vocab-*.gguf`` files: the cache's, the one next to a cached
    binary, or what ``scripts/build_llama_server.sh --vocab-dir`` unpacks (it downloads the
    llama-cpp-python sdist with pip when the cache has none; it never builds).
    """
    candidates = [
        os.path.join(cache_dir(), "llama-server", "vocab"),
        os.path.join(os.path.dirname(os.path.dirname(llama_server)), "vocab"),
    ]
    for candidate in candidates:
        if os.path.isfile(os.path.join(candidate, "ggml-vocab-llama-spm.gguf")):
            return candidate
    try:
        done = subprocess.run(
            [BUILD_LLAMA_SERVER, "--vocab-dir"],
            capture_output=True, text=True, timeout=300, env=dict(os.environ, PYTHON=sys.executable),
        )
    except (OSError, subprocess.SubprocessError):
        return None
    lines = done.stdout.strip().splitlines()
    if done.returncode == 0 and lines and os.path.isdir(lines[-1]):
        return lines[-1]
    return None


def _script_digest() -> str:
    with open(MAKE_TINY_GGUF, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:10]


def tiny_model(vocab_dir: str, preset: str = "tiny", seed: int = 0) -> str:
    """
    The path of a random-weight model of ``preset`` (see ``scripts/make_tiny_gguf.py``), written
    into ``CACHE/models/`` on first use.

    :raises RuntimeError: the script failed; the message has its output.
    """
    directory = os.path.join(cache_dir(), "models")
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, f"{preset}-seed{seed}-{_script_digest()}.gguf")
    if os.path.isfile(path):
        return path
    partial = f"{path}.{os.getpid()}.partial"
    done = subprocess.run(
        [sys.executable, MAKE_TINY_GGUF, "--vocab-dir", vocab_dir, "--out", partial,
         "--preset", preset, "--seed", str(seed)],
        capture_output=True, text=True, timeout=120,
    )
    if done.returncode != 0:
        if os.path.exists(partial):
            os.unlink(partial)
        raise RuntimeError(f"make_tiny_gguf.py --preset {preset} failed:\n{done.stdout}{done.stderr}")
    os.replace(partial, path)  # concurrent writers produce the same bytes; the last rename wins
    return path


def llama_command(llama_server: str, model_path: str, *extra: str, fit: bool = False, parallel: int = 1) -> str:
    """
    A model ``cmd`` running llama-server on ``${PORT}`` with `BASE_FLAGS`, reporting the model id
    swapproxy knows it by as its model name (``--alias ${MODEL_ID}``).

    :param fit: keep llama-server's memory fitting pass (``-fit on``, its default), which
        parses the tokenizer twice and so makes a load slower.
    :param parallel: request slots (``-np``).
    """
    words = [shlex.quote(llama_server), "-m", shlex.quote(model_path), *BASE_FLAGS, "-np", str(parallel),
             "--alias", "${MODEL_ID}"]
    if not fit:
        words += ["-fit", "off"]
    return " ".join(words + [shlex.quote(arg) for arg in extra])

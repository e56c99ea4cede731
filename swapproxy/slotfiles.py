# -*- test-case-name: tests.test_slotfiles -*-
"""
The directory of saved llama-server slots: what each file holds, whether it is intact, and which
files go when space runs short.

llama-server writes a slot's file itself (``POST /slots/<id>?action=save``): a small header
(``ggsq`` magic, version, the token count and the tokens) followed by the slot's KV cache.
swapproxy never writes those; it checks each one once it is written and records beside it, in
``<file>.json``, the model, the server it fits (`ServerIdentity`), its size and CRC-32, how many
tokens it holds and a hash of them, and when it was saved. A data file without that record is
not ours to restore (a save cut short, a crash) and is removed.

Everything here blocks on the disk: `swapproxy.slotcache` runs it in a thread, one call at a
time. Nothing here raises for a bad file: it is logged, removed and left out.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import struct
import zlib
from collections.abc import Iterable, Sequence
from typing import Any

import attrs

from swapproxy.logs import proxy_logger
from swapproxy.statefile import replace_json

log = proxy_logger("swapproxy.slotfiles")

#: The suffix of the files llama-server writes for us, and of the records beside them.
DATA_SUFFIX = ".slot"
RECORD_SUFFIX = ".slot.json"
#: The version of the records; another version is not read.
RECORD_VERSION = 1
#: llama.cpp's sequence state file: magic ``ggsq`` and the version this build writes.
STATE_MAGIC = 0x67677371
#: A packed token list that starts with this (LLAMA_TOKEN_NULL) is llama-server's versioned
#: form: the null, a version, the token count, the tokens, then media chunks.
_TOKEN_NULL = -1
_READ_SIZE = 1 << 20
_SAFE = re.compile(r"[^A-Za-z0-9_-]+")


@attrs.frozen
class ServerIdentity:
    """
    What a saved KV cache depends on: a file fits only a server with the same identity.

    :ivar build: llama-server's ``build_info`` (``/props``).
    :ivar model_path: the model file it runs (``/props``), and that file's size and mtime.
    :ivar argv: its command line without the values of ``--port`` and ``--slot-save-path``.
    """

    build: str
    model_path: str
    model_size: int | None
    model_mtime_ns: int | None
    argv: tuple[str, ...]

    def differences(self, other: ServerIdentity) -> list[str]:
        """
        In words, how ``other`` differs from this one (empty when they are the same).
        """
        found = []
        if self.build != other.build:
            found.append(f"llama-server build {other.build!r}, not {self.build!r}")
        if self.model_path != other.model_path:
            found.append(f"model file {other.model_path!r}, not {self.model_path!r}")
        elif (self.model_size, self.model_mtime_ns) != (other.model_size, other.model_mtime_ns):
            found.append(f"model file {other.model_path!r} changed since")
        if self.argv != other.argv:
            found.append("another command line")
        return found

    def to_json(self) -> dict[str, Any]:
        return attrs.asdict(self)

    @classmethod
    def from_json(cls, data: Any) -> ServerIdentity:
        """
        :raises ValueError: ``data`` is not an identity.
        """
        if not isinstance(data, dict):
            raise ValueError("no server identity")
        try:
            return cls(
                build=str(data["build"]),
                model_path=str(data["model_path"]),
                model_size=_optional_int(data.get("model_size")),
                model_mtime_ns=_optional_int(data.get("model_mtime_ns")),
                argv=tuple(str(arg) for arg in data["argv"]),
            )
        except (KeyError, TypeError) as e:
            raise ValueError(f"incomplete server identity: {e}") from None


def _optional_int(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise ValueError(f"not an integer: {value!r}")


def identity_argv(argv: Sequence[str]) -> tuple[str, ...]:
    """
    A command line as far as a saved KV cache cares: without the values of ``--port`` (a
    reload may move it) and ``--slot-save-path``.
    """
    kept: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        name = arg.split("=", 1)[0]
        if name in ("--port", "--slot-save-path"):
            skip = "=" not in arg
            continue
        kept.append(arg)
    return tuple(kept)


def server_identity(build: str, model_path: str, argv: Sequence[str]) -> ServerIdentity:
    """
    The identity of a server running ``model_path``; the file's size and mtime are read here.
    """
    size: int | None = None
    mtime: int | None = None
    try:
        info = os.stat(model_path)
        size, mtime = info.st_size, info.st_mtime_ns
    except OSError:
        pass
    return ServerIdentity(build, model_path, size, mtime, identity_argv(argv))


@attrs.frozen
class SlotFile:
    """
    One saved slot, as its record describes it.

    :ivar name: the data file's name in the directory.
    :ivar model: the model id it was saved for.
    :ivar server: the server it fits.
    :ivar size: the data file's size in bytes.
    :ivar crc32: the data file's CRC-32.
    :ivar tokens: how many tokens of prompt (and answer) it holds.
    :ivar tokens_sha256: the SHA-256 of those tokens (little-endian int32 each).
    :ivar saved_at: when it was saved (seconds since the epoch).
    """

    name: str
    model: str
    server: ServerIdentity
    size: int
    crc32: int
    tokens: int
    tokens_sha256: str
    saved_at: float

    def to_json(self) -> dict[str, Any]:
        return {
            "version": RECORD_VERSION, "name": self.name, "model": self.model, "server": self.server.to_json(),
            "size": self.size, "crc32": self.crc32, "tokens": self.tokens, "tokens_sha256": self.tokens_sha256,
            "saved_at": self.saved_at,
        }

    @classmethod
    def from_json(cls, data: Any) -> SlotFile:
        """
        :raises ValueError: ``data`` is not a record of this version.
        """
        if not isinstance(data, dict) or data.get("version") != RECORD_VERSION:
            raise ValueError("not a slot record of version 1")
        try:
            entry = cls(
                name=str(data["name"]), model=str(data["model"]), server=ServerIdentity.from_json(data["server"]),
                size=int(data["size"]), crc32=int(data["crc32"]), tokens=int(data["tokens"]),
                tokens_sha256=str(data["tokens_sha256"]), saved_at=float(data["saved_at"]),
            )
        except (KeyError, TypeError) as e:
            raise ValueError(f"incomplete slot record: {e}") from None
        if entry.name != os.path.basename(entry.name) or not entry.name.endswith(DATA_SUFFIX):
            raise ValueError(f"bad file name {entry.name!r}")
        return entry


def data_name(model_id: str, slot_id: int, saved_at: float, tag: str) -> str:
    """
    A name for a slot file that llama-server accepts (letters, digits, ``-``, ``_`` and dots,
    never two in a row) and that sorts by model and time.
    """
    safe = _SAFE.sub("_", model_id).strip("_")[:80] or "model"
    return f"{safe}-{int(saved_at * 1000)}-s{slot_id}-{tag}{DATA_SUFFIX}"


def tokens_digest(tokens: Sequence[int]) -> str:
    """
    The SHA-256 of a token list, as `SlotFile.tokens_sha256` records it.
    """
    return hashlib.sha256(struct.pack(f"<{len(tokens)}i", *tokens)).hexdigest()


class NotASlotFile(ValueError):
    """
    A file is not a sequence state that llama-server wrote.
    """


def read_tokens(path: str) -> list[int]:
    """
    The tokens a slot file holds, from its header (the KV cache after them is not read).

    :raises NotASlotFile: with what is wrong.
    :raises OSError: it cannot be read.
    """
    with open(path, "rb") as f:
        head = f.read(12)
        if len(head) < 12:
            raise NotASlotFile("shorter than its header")
        magic, version, count = struct.unpack("<III", head)
        if magic != STATE_MAGIC:
            raise NotASlotFile(f"not a llama.cpp sequence state (magic {magic:#010x})")
        size = os.fstat(f.fileno()).st_size
        if count * 4 > size - 12:
            raise NotASlotFile(f"its header claims {count} tokens, more than the file holds")
        packed = list(struct.unpack(f"<{count}i", f.read(count * 4)))
    if len(packed) >= 3 and packed[0] == _TOKEN_NULL:
        n = packed[2]
        if n < 0 or 3 + n > len(packed):
            raise NotASlotFile("its token list is cut short")
        return packed[3 : 3 + n]
    return packed


def file_crc32(path: str) -> int:
    """
    The CRC-32 of a whole file, read a megabyte at a time.
    """
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(_READ_SIZE):
            crc = zlib.crc32(chunk, crc)
    return crc


@attrs.frozen
class Room:
    """
    The space the directory's disk has, and what its slot files take.

    :ivar free: bytes free on the disk (for an unprivileged user).
    :ivar used: bytes the recorded slot files take.
    """

    free: int
    used: int


class SlotDirectory:
    """
    The saved slots in one directory, and the records beside them.

    :param path: the directory; it is created when missing.
    """

    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(path)

    def _file(self, name: str) -> str:
        return os.path.join(self.path, name)

    def ensure(self) -> None:
        """
        Create the directory if it is missing.

        :raises OSError: it cannot be created.
        """
        os.makedirs(self.path, exist_ok=True)

    def scan(self, busy: Iterable[str] = ()) -> list[SlotFile]:
        """
        Every intact record, oldest first. A record that cannot be read, or whose data file is
        gone, is removed with its file; a data file without a record (a save cut short) is
        removed unless it is ``busy`` (being written now).
        """
        busy = set(busy)
        try:
            names = os.listdir(self.path)
        except FileNotFoundError:
            return []
        except OSError as e:
            log.warn("cannot read the slot cache directory {path}: {error}", path=self.path, error=e)
            return []
        present = set(names)
        entries = []
        recorded = set()
        for name in sorted(names):
            if not name.endswith(RECORD_SUFFIX):
                continue
            data = name[: -len(".json")]
            recorded.add(data)
            entry = self._read_record(name)
            if entry is None or entry.name != data or data not in present:
                if entry is not None and data not in present:
                    log.info("slot cache: {name} is gone; forgetting its record", name=data)
                self._unlink(name)
                self._unlink(data)
                continue
            entries.append(entry)
        for name in names:
            if name.endswith(DATA_SUFFIX) and name not in recorded and name not in busy:
                log.info("slot cache: removing {name}, a save that did not finish", name=name)
                self._unlink(name)
        entries.sort(key=lambda e: (e.saved_at, e.name))
        return entries

    def _read_record(self, name: str) -> SlotFile | None:
        try:
            with open(self._file(name), encoding="utf-8") as f:
                return SlotFile.from_json(json.load(f))
        except (OSError, ValueError) as e:
            log.warn("slot cache: removing {name}, an unreadable record: {error}", name=name, error=e)
            return None

    def commit(self, name: str, model: str, server: ServerIdentity, saved_at: float,
               expected_size: int | None) -> tuple[SlotFile, list[int]] | None:
        """
        Check a file llama-server just wrote and record it.

        :param expected_size: the size llama-server said it wrote, if it said.
        :returns: its record and its tokens; ``None`` when it is not a whole slot file (it is
            then removed, with a log line).
        """
        path = self._file(name)
        try:
            size = os.stat(path).st_size
            if expected_size is not None and size != expected_size:
                raise NotASlotFile(f"{size} bytes, not the {expected_size} llama-server wrote")
            tokens = read_tokens(path)
            crc = file_crc32(path)
        except (OSError, NotASlotFile) as e:
            log.warn("slot cache: not keeping {name}: {error}", name=name, error=e)
            self._unlink(name)
            return None
        entry = SlotFile(name, model, server, size, crc, len(tokens), tokens_digest(tokens), saved_at)
        try:
            replace_json(self._file(name + ".json"), entry.to_json(), indent=1)
        except OSError as e:
            log.warn("slot cache: cannot record {name}: {error}", name=name, error=e)
            self._unlink(name)
            return None
        return entry, tokens

    def problem(self, entry: SlotFile) -> str | None:
        """
        What is wrong with a recorded file (its size or CRC changed), or ``None`` when it is
        intact. llama-server aborts on a truncated file: it must never be given one.
        """
        path = self._file(entry.name)
        try:
            size = os.stat(path).st_size
            if size != entry.size:
                return f"it has {size} bytes, {entry.size} were saved"
            if file_crc32(path) != entry.crc32:
                return "its content changed since it was saved (CRC-32 mismatch)"
        except OSError as e:
            return f"it cannot be read: {e.strerror or e}"
        return None

    def remove(self, entry: SlotFile) -> None:
        """
        Remove a file and its record.
        """
        self._unlink(entry.name + ".json")
        self._unlink(entry.name)

    def _unlink(self, name: str) -> None:
        try:
            os.unlink(self._file(name))
        except FileNotFoundError:
            pass
        except OSError as e:
            log.warn("slot cache: cannot remove {name}: {error}", name=name, error=e)

    def room(self, entries: Iterable[SlotFile]) -> Room:
        """
        The free space on the directory's disk, and what ``entries`` take.
        """
        try:
            free = shutil.disk_usage(self.path).free
        except OSError:
            free = 0
        return Room(free, sum(e.size for e in entries))


def superseded(new: SlotFile, tokens: Sequence[int], others: Iterable[SlotFile]) -> list[SlotFile]:
    """
    The files of the same model and server whose tokens all begin ``tokens``: the new file holds
    their conversations and more.
    """
    found = []
    for other in others:
        if (other.name != new.name and other.model == new.model and other.server == new.server
                and other.tokens <= len(tokens)
                and tokens_digest(tokens[: other.tokens]) == other.tokens_sha256):
            found.append(other)
    return found


def over_budget(entries: Sequence[SlotFile], room: Room, max_size: int, min_free: int) -> list[SlotFile]:
    """
    The oldest files to remove so that the rest take at most ``max_size`` (0: no limit) and
    the disk keeps ``min_free`` bytes free.

    :param entries: oldest first.
    """
    used, free = room.used, room.free
    doomed = []
    for entry in entries:
        if (max_size == 0 or used <= max_size) and free >= min_free:
            break
        doomed.append(entry)
        used -= entry.size
        free += entry.size
    return doomed

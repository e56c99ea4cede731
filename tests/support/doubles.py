"""
Stand-ins for swapproxy's other collaborators: a peer's client (`FakePeerClient`, the test answers
what it sent) and llama-server's slot API (`FakeSlotServer`, with real slot files).
"""

from __future__ import annotations

import os
import struct
from collections.abc import Sequence
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone


class FakePeerResponse:
    """
    A peer's answer: a status, and a body delivered at once to whoever asks for it.
    """

    def __init__(self, code: int, body: bytes) -> None:
        self.code = code
        self.body = body

    def deliverBody(self, protocol: Any) -> None:
        protocol.makeConnection(None)
        protocol.dataReceived(self.body)
        protocol.connectionLost(Failure(ResponseDone()))


class FakePeerClient:
    """
    Stands in for `swapproxy.peers.PeerClient`: records what is sent; the test answers.

    :ivar sent: ``(method, path, headers, answer)`` for each request; fire ``answer`` with a
        `FakePeerResponse` (or fail it).
    """

    def __init__(self, peer: Any, reactor: Any) -> None:
        self.peer = peer
        self.sent: list[tuple[bytes, bytes, Any, Deferred[Any]]] = []
        self.closed = False

    @classmethod
    def factory(cls, made: list[FakePeerClient]) -> Any:
        """
        A ``client_factory`` for `swapproxy.peers.PeerSet` that appends each client to ``made``.
        """

        def make(peer: Any, reactor: Any) -> FakePeerClient:
            client = cls(peer, reactor)
            made.append(client)
            return client

        return make

    def send(self, method: bytes, path: bytes, headers: Any, body: bytes | None) -> Deferred[Any]:
        answer: Deferred[Any] = Deferred()
        self.sent.append((method, path, headers, answer))
        return answer

    def close(self) -> Deferred[None]:
        self.closed = True
        return succeed(None)


def write_slot_file(path: str, tokens: Sequence[int], payload: int = 64) -> int:
    """
    Write a file laid out as llama-server 0.3.36 saves a slot: the ``ggsq`` header with the
    packed token list (LLAMA_TOKEN_NULL, version 1, the count, the tokens, no media), then
    ``payload`` bytes standing for the KV cache.

    :returns: the file's size.
    """
    packed = [-1, 1, len(tokens), *tokens, 0]
    data = struct.pack(f"<III{len(packed)}i", 0x67677371, 3, len(packed), *packed)
    data += bytes((i * 7) % 251 for i in range(payload))
    with open(path, "wb") as f:
        f.write(data)
    return len(data)


class FakeSlotServer:
    """
    llama-server's slot API as `swapproxy.slotcache.SlotCache` uses it (`SlotsAPI`), writing and
    reading real files in ``directory``. Pass ``server.api`` as the cache's ``api``.

    :ivar tokens: the tokens each slot holds (`serve` puts a request's there).
    :ivar calls: ``(action, slot id, filename)`` of every save and restore.
    :ivar hold: when set, saves and restores answer with a Deferred kept in ``held``.
    :ivar unsupported: answer every call as a server without a slot API does (501).
    :ivar refuse: file names whose restore llama-server refuses (400).
    """

    def __init__(self, directory: str, slots: int = 2, build: str = "b1-test", model_path: str = "/models/m.gguf",
                 bytes_per_token: int = 16) -> None:
        self.directory = directory
        self.tokens: dict[int, list[int]] = {i: [] for i in range(slots)}
        #: Slots restored and not used since: like llama-server, ``/slots`` shows no tokens for them.
        self.untouched: set[int] = set()
        self.build = build
        self.model_path = model_path
        self.bytes_per_token = bytes_per_token
        self.calls: list[tuple[str, int, str]] = []
        self.hold = False
        self.held: list[Deferred[Any]] = []
        self.unsupported = False
        self.refuse: set[str] = set()

    def api(self, upstream: Any) -> FakeSlotServer:
        return self

    def _answer(self, value: Any) -> Deferred[Any]:
        from swapproxy.slotcache import SlotsUnsupported

        if self.unsupported:
            return Deferred.fromCoroutine(_raise(SlotsUnsupported("POST /slots answered 501")))
        if self.hold:
            self.held.append(Deferred())
            return self.held[-1]
        return succeed(value)

    def slots_info(self) -> list[dict[str, Any]]:
        return [{"id": i, "n_ctx": 512, **({"n_prompt_tokens": len(t)} if t and i not in self.untouched else {})}
                for i, t in self.tokens.items()]

    def serve(self, slot_id: int, tokens: list[int]) -> None:
        """
        A request was served in ``slot_id``, which now holds ``tokens``.
        """
        self.tokens[slot_id] = list(tokens)
        self.untouched.discard(slot_id)

    def exited(self) -> None:
        """
        The server's process ended: its slots are empty.
        """
        self.tokens = {i: [] for i in self.tokens}
        self.untouched.clear()

    def slots(self) -> Deferred[list[dict[str, Any]]]:
        from swapproxy.slotcache import SlotsUnsupported

        if self.unsupported:
            return Deferred.fromCoroutine(_raise(SlotsUnsupported("GET /slots answered 501")))
        return succeed(self.slots_info())

    def props(self) -> Deferred[dict[str, Any]]:
        return succeed({"build_info": self.build, "model_path": self.model_path, "total_slots": len(self.tokens)})

    def save(self, slot_id: int, filename: str) -> Deferred[dict[str, Any]]:
        self.calls.append(("save", slot_id, filename))
        tokens = self.tokens[slot_id]
        size = write_slot_file(os.path.join(self.directory, filename), tokens, len(tokens) * self.bytes_per_token)
        return self._answer({"id_slot": slot_id, "filename": filename, "n_saved": len(tokens), "n_written": size})

    def restore(self, slot_id: int, filename: str) -> Deferred[dict[str, Any]]:
        from swapproxy.slotcache import SlotsError
        from swapproxy.slotfiles import read_tokens

        self.calls.append(("restore", slot_id, filename))
        if filename in self.refuse:
            return Deferred.fromCoroutine(_raise(SlotsError("POST /slots answered 400: Unable to restore slot")))
        tokens = read_tokens(os.path.join(self.directory, filename))
        answer = self._answer({"id_slot": slot_id, "filename": filename, "n_restored": len(tokens)})
        self.tokens[slot_id] = tokens
        self.untouched.add(slot_id)
        return answer


async def _raise(error: Exception) -> Any:
    raise error

# -*- test-case-name: tests.test_slotcache -*-
"""
A conversation comes back after a swap without paying its prompt again: llama-server's slots are
saved before a model stops and restored when it starts again.

llama-server keeps each conversation's prompt in a slot's KV cache; a stop loses it, and the
next turn must process the whole prompt again, for a long chat the larger part of what a swap
costs. For each model with ``slotCache`` on, `SlotCache`

* adds ``--slot-save-path`` to a llama-server command that lacks it (an ``argv_filter`` of the
  `Upstream`);
* before the model is stopped on purpose (a swap, its TTL, an unload; not a crash), asks
  ``GET /slots`` which slots hold tokens and has llama-server write each to a file
  (``POST /slots/<id>?action=save``), within ``saveTimeout`` in all; then, off the stop's path,
  checks and records each file (`swapproxy.slotfiles`), removes the files it supersedes and the
  oldest past ``maxSize`` or ``minFree``;
* when the model starts again, once it answers its health check and before the first request is
  let through, restores the most recent files that fit this server (same build, model file and
  command line) into its slots (``?action=restore``), within ``restoreTimeout``, after checking
  each file's size and CRC: this llama-server aborts on a truncated file. llama-server's prompt
  cache then reuses what a request shares with a restored slot. The loading stream shows it as
  its own stage (`swapproxy.upstream.StartStep`).

A server that has no slot API (``/slots`` answers 404 or 501, as llama-server does without
``--slot-save-path``, or any other server) gets one warning and is left alone from then on.
Nothing here ever fails a start or a stop: every problem is a log line and a skipped file.
"""

from __future__ import annotations

import json
import os
import secrets
import weakref
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, TypeVar

import attrs
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily, Metric
from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, DeferredList, TimeoutError, maybeDeferred, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers

from swapproxy.config import SlotCacheConfig
from swapproxy.logs import proxy_logger
from swapproxy.reactors import IClientReactor, ISwapproxyReactor
from swapproxy.slotfiles import (
    Room,
    ServerIdentity,
    SlotDirectory,
    SlotFile,
    data_name,
    over_budget,
    server_identity,
    superseded,
)
from swapproxy.upstream import StartStep, Upstream

log = proxy_logger("swapproxy.slotcache")

_T = TypeVar("_T")
#: The default directory of the saved slots, in swapproxy's state directory.
SLOTS_DIR = "slots"
#: Runs a blocking function (in a thread) and returns a Deferred of its result.
Runner = Callable[..., Deferred[Any]]


class SlotsUnsupported(Exception):
    """
    The server has no slot API (or not this part of it).
    """


class SlotsError(Exception):
    """
    The slot API answered with an error.
    """


class SlotsAPI:
    """
    llama-server's slot endpoints, on one upstream's connection pool.

    :param upstream: a running upstream (its ``client`` is used).
    :param reactor: for the HTTP client's timeouts.
    """

    def __init__(self, upstream: Upstream, reactor: IClientReactor) -> None:
        self._upstream = upstream
        self._reactor = reactor

    async def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        client = self._upstream.client
        if client is None:
            raise SlotsError("the model is not running")
        data = None if body is None else json.dumps(body).encode("utf-8")
        response = await client.request(method, self._upstream.url_for(path), data=data, reactor=self._reactor,
                                        headers=Headers({b"content-type": [b"application/json"]}),
                                        allow_redirects=False)
        content = await response.content()
        if response.code in (404, 405, 501):
            raise SlotsUnsupported(f"{method} {path} answered {response.code}")
        try:
            answer = json.loads(content)
        except ValueError:
            answer = None
        if response.code != 200:
            message = answer.get("error", {}).get("message") if isinstance(answer, dict) else None
            raise SlotsError(f"{method} {path} answered {response.code}: {message or content[:200]!r}")
        return answer

    async def slots(self) -> list[dict[str, Any]]:
        """
        ``GET /slots``: one object per slot.
        """
        answer = await self._call("GET", "/slots")
        if not isinstance(answer, list) or not all(isinstance(s, dict) and isinstance(s.get("id"), int) for s in answer):
            raise SlotsUnsupported("GET /slots did not answer a list of slots")
        return answer

    async def props(self) -> dict[str, Any]:
        """
        ``GET /props``: the server's build and model file.
        """
        answer = await self._call("GET", "/props")
        if not isinstance(answer, dict):
            raise SlotsUnsupported("GET /props did not answer an object")
        return answer

    async def save(self, slot_id: int, filename: str) -> dict[str, Any]:
        answer = await self._call("POST", f"/slots/{slot_id}?action=save", {"filename": filename})
        return answer if isinstance(answer, dict) else {}

    async def restore(self, slot_id: int, filename: str) -> dict[str, Any]:
        answer = await self._call("POST", f"/slots/{slot_id}?action=restore", {"filename": filename})
        return answer if isinstance(answer, dict) else {}


def is_llama_server(argv: list[str]) -> bool:
    """
    Whether a command runs llama-server (itself, or behind ``env``, ``nice``, ``taskset``...).
    """
    return any(os.path.basename(arg).split(".", 1)[0] == "llama-server" for arg in argv)


def save_path_in(argv: list[str]) -> str | None:
    """
    The ``--slot-save-path`` a command gives, if any.
    """
    for index, arg in enumerate(argv):
        if arg == "--slot-save-path" and index + 1 < len(argv):
            return argv[index + 1]
        if arg.startswith("--slot-save-path="):
            return arg.split("=", 1)[1]
    return None


def _size_text(size: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} bytes"


@attrs.frozen
class _Candidates:
    """
    The files a start may restore, checked while the model loads.

    :ivar entries: every record in the directory.
    :ivar problems: for the newest files of the model, what is wrong with each (``None``: intact).
    """

    entries: dict[str, SlotFile]
    problems: dict[str, str | None]


@attrs.define
class _Server:
    """
    What the slot cache knows of one running child.
    """

    directory: SlotDirectory
    identity: ServerIdentity | None = None
    slot_ids: tuple[int, ...] = ()
    candidates: Deferred[_Candidates | None] | None = None


@attrs.define
class Tally:
    """
    Slots saved or restored: how many, their bytes and the seconds it took.
    """

    slots: int = 0
    bytes: int = 0
    seconds: float = 0.0

    def add(self, slots: int, size: int, seconds: float) -> None:
        self.slots += slots
        self.bytes += size
        self.seconds += seconds

    def copy(self) -> Tally:
        return Tally(self.slots, self.bytes, self.seconds)

    def to_json(self) -> dict[str, Any]:
        return {"slots": self.slots, "bytes": self.bytes, "seconds": round(self.seconds, 3)}


@attrs.define
class ModelTally:
    """
    One model's slot cache activity since swapproxy started, and the last of each.
    """

    saved: Tally = attrs.Factory(Tally)
    restored: Tally = attrs.Factory(Tally)
    last_save: Tally | None = None
    last_restore: Tally | None = None

    def record(self, action: str, tally: Tally) -> None:
        """
        Count one stop's saves (``action`` ``saved``) or one start's restores (``restored``).
        """
        if action == "saved":
            self.saved.add(tally.slots, tally.bytes, tally.seconds)
            self.last_save = tally.copy()
        else:
            self.restored.add(tally.slots, tally.bytes, tally.seconds)
            self.last_restore = tally.copy()


class SlotCache(Service):
    """
    Saves llama-server's slots before a model stops, and restores them when it starts again.

    Hook it to each model with `follow` (``Supervisor.each_upstream(cache.follow)``). As a
    service, it reads the directory as it starts (removing what an interrupted save left), and
    as it stops, waits up to ``saveTimeout`` for the files of the last stops to be recorded:
    start it before the supervisor, so that it stops after it.

    :param settings: the current ``slotCache`` settings (read at each use, so that a reload
        applies).
    :param reactor: provides ``seconds``, ``callLater`` and, unless ``run`` is given, a thread pool.
    :param default_directory: where the files go when ``slotCache.path`` is not set.
    :param api: makes the slot API of an upstream (tests pass fakes).
    :param run: runs a blocking function and returns a Deferred of its result (a thread of the
        reactor's pool by default); the calls are made one after another.
    """

    def __init__(
        self,
        settings: Callable[[], SlotCacheConfig],
        reactor: ISwapproxyReactor,
        default_directory: str,
        *,
        api: Callable[[Upstream], SlotsAPI] | None = None,
        run: Runner | None = None,
    ) -> None:
        self._settings = settings
        self._reactor = reactor
        self._default_directory = os.path.abspath(default_directory)
        self._api = api or (lambda upstream: SlotsAPI(upstream, reactor))
        self._run = run or (lambda f, *args: deferToThreadPool(reactor, reactor.getThreadPool(), f, *args))
        self._queue: Deferred[None] = succeed(None)
        self._servers: dict[Upstream, _Server] = {}
        #: Every recorded file, by directory and name, as of the last scan or commit.
        self._files: dict[str, dict[str, SlotFile]] = {}
        #: Data files llama-server is writing or swapproxy is checking: not orphans.
        self._busy: set[str] = set()
        #: Each model's commit in progress: its next start waits for it.
        self._commits: dict[str, Deferred[None]] = {}
        #: Servers without a slot API that were warned about: (model id, command).
        self._unsupported: set[tuple[str, tuple[str, ...]]] = set()
        #: How many slots each model's server had last time.
        self._slot_counts: dict[str, int] = {}
        self.tallies: dict[str, ModelTally] = {}
        self._metrics: _Metrics | None = None
        self._followed: weakref.WeakSet[Upstream] = weakref.WeakSet()

    def export(self, registry: CollectorRegistry) -> None:
        """
        Publish the slot cache's Prometheus metrics in ``registry``.
        """
        self._metrics = _Metrics(self, registry)

    def startService(self) -> None:
        super().startService()
        if not any(upstream.model.slot_cache for upstream in self._followed):
            return
        directory = SlotDirectory(self._settings().path or self._default_directory)
        scan = self._in_thread(directory.scan, set(self._busy))
        scan.addCallback(lambda entries: self._files.setdefault(directory.path, {e.name: e for e in entries}))
        scan.addErrback(lambda failure: log.failure("slot cache: reading {path}", failure, path=directory.path))

    def stopService(self) -> Deferred[None]:
        super().stopService()
        if not self._commits:
            return succeed(None)
        timeout = self._settings().save_timeout
        pending = DeferredList([_settled(d) for d in self._commits.values()], consumeErrors=True)
        done: Deferred[Any] = pending.addTimeout(timeout, self._reactor)

        def late(failure: Failure) -> Failure | None:
            if not failure.check(TimeoutError):
                return failure
            log.warn("slot cache: stopping before the last saved slots were recorded (saveTimeout {timeout:g}s);"
                     " they will be removed at the next start", timeout=timeout)
            return None

        return done.addCallbacks(lambda _: None, late)

    # -- hooks ----------------------------------------------------------------------------------

    def follow(self, upstream: Upstream) -> None:
        """
        Hook into one upstream's starts and stops.
        """
        self._followed.add(upstream)
        upstream.argv_filters.append(self._add_save_path)
        upstream.start_hooks.append(self._after_healthy)
        upstream.stop_hooks.append(self._before_stop)
        upstream.process_observers.append(self._process_changed)
        upstream.reports["slot_cache"] = lambda: self.report(upstream)

    def _enabled(self, upstream: Upstream) -> bool:
        return upstream.model.slot_cache and (upstream.model.id, upstream.model.cmd) not in self._unsupported

    def _directory_for(self, argv: list[str]) -> SlotDirectory:
        given = save_path_in(argv)
        if given is not None:
            return SlotDirectory(given)
        return SlotDirectory(self._settings().path or self._default_directory)

    def _add_save_path(self, upstream: Upstream, argv: list[str]) -> list[str]:
        self._servers.pop(upstream, None)
        if not self._enabled(upstream):
            return argv
        directory = self._directory_for(argv)
        try:
            # One mkdir as the model is spawned; llama-server refuses a directory that is missing.
            directory.ensure()
        except OSError as e:
            if save_path_in(argv) is None:
                # Not the user's flag: start the model as without the cache rather than have
                # llama-server refuse to start.
                log.warn("slot cache of {model}: cannot create {path}: {error}; starting it without the slot cache",
                         model=upstream.model.id, path=directory.path, error=e)
                return argv
            log.warn("slot cache of {model}: cannot create {path}: {error}", model=upstream.model.id,
                     path=directory.path, error=e)
        if save_path_in(argv) is None and is_llama_server(argv):
            argv = [*argv, "--slot-save-path", directory.path]
        server = self._servers[upstream] = _Server(directory)
        # Read and check the files while the model loads: the start then only restores them.
        model_id = upstream.model.id
        server.candidates = Deferred.fromCoroutine(self._check(model_id, directory, self._slot_guess(model_id, argv)))
        server.candidates.addErrback(self._check_failed, model_id)
        return argv

    def _slot_guess(self, model_id: str, argv: list[str]) -> int:
        """
        How many slots the model's server will have: as many as last time, else its ``-np``.
        """
        if model_id in self._slot_counts:
            return self._slot_counts[model_id]
        for flag, value in zip(argv, argv[1:]):
            if flag in ("-np", "--parallel") and value.isdigit() and int(value) > 0:
                return int(value)
        return 4

    async def _check(self, model_id: str, directory: SlotDirectory, count: int) -> _Candidates:
        """
        Once the last stop of the model is recorded, read the directory and check the model's
        ``count`` newest files; they are kept from eviction until the start is done.
        """
        pending = self._commits.get(model_id)
        if pending is not None:
            await _settled(pending)
        entries = {e.name: e for e in await self._in_thread(directory.scan, set(self._busy))}
        self._files[directory.path] = entries
        newest = sorted((e for e in entries.values() if e.model == model_id), key=lambda e: (-e.saved_at, e.name))
        problems: dict[str, str | None] = {}
        for entry in newest[:count]:
            self._busy.add(entry.name)
            problems[entry.name] = await self._in_thread(directory.problem, entry)
        return _Candidates(entries, problems)

    def _check_failed(self, failure: Failure, model_id: str) -> None:
        log.failure("slot cache: checking the saved slots of {model}", failure, model=model_id)

    def _process_changed(self, upstream: Upstream, pid: int, spawned: bool) -> None:
        if spawned:
            return
        server = self._servers.pop(upstream, None)
        if server is not None and server.candidates is not None:
            # A start that ended before its restore: its files may be evicted again.
            server.candidates.addCallback(self._release)

    def _release(self, checked: _Candidates | None) -> None:
        if checked is not None:
            self._busy.difference_update(checked.problems)

    def _server(self, upstream: Upstream) -> _Server | None:
        """
        What is known of the upstream's child; ``None`` when the cache is off for it.
        """
        return self._servers.get(upstream) if self._enabled(upstream) else None

    def _unsupported_server(self, upstream: Upstream, error: Exception) -> None:
        key = (upstream.model.id, upstream.model.cmd)
        if key not in self._unsupported:
            self._unsupported.add(key)
            log.warn(
                "slot cache: model {model} has no slot API ({error}); its slots are not saved or restored",
                model=upstream.model.id, error=str(error),
            )
            self._count_skip(upstream.model.id, "unsupported")

    async def _learn(self, upstream: Upstream, server: _Server) -> bool:
        """
        Ask the server its slots and identity, once per process. ``False``: it has no slot API.
        """
        if server.identity is not None:
            return True
        api = self._api(upstream)
        try:
            slots = await api.slots()
            props = await api.props()
        except SlotsUnsupported as e:
            self._unsupported_server(upstream, e)
            return False
        server.slot_ids = tuple(sorted(s["id"] for s in slots))
        self._slot_counts[upstream.model.id] = len(server.slot_ids)
        argv = list(upstream.command or upstream.model.cmd)
        build, path = str(props.get("build_info", "")), str(props.get("model_path", ""))
        server.identity = await self._in_thread(server_identity, build, path, argv)
        return True

    def _in_thread(self, work: Callable[..., _T], *args: Any) -> Deferred[_T]:
        """
        Run ``work`` by ``run``, after every earlier call has returned; cancelling the result
        stops waiting for it, not the work.
        """
        result: Deferred[_T] = Deferred()

        def deliver(outcome: Any) -> None:
            if not result.called:
                (result.errback if isinstance(outcome, Failure) else result.callback)(outcome)

        def go(_: object) -> Deferred[None]:
            return maybeDeferred(self._run, work, *args).addBoth(deliver)

        self._queue.addBoth(go)
        return result

    # -- saving ---------------------------------------------------------------------------------

    async def _before_stop(self, upstream: Upstream) -> None:
        server = self._server(upstream)
        if server is None:
            return
        saved: list[tuple[str, int, dict[str, Any]]] = []
        started = self._reactor.seconds()
        settings = self._settings()
        await self._bounded(upstream.model.id, "saved", lambda tally: self._save(upstream, server, saved, tally),
                            settings.save_timeout, "saveTimeout")
        # Off the stop's path: the next start of this model waits for it.
        model_id = upstream.model.id
        commit = Deferred.fromCoroutine(self._commit(model_id, server, saved, started))
        self._commits[model_id] = commit
        commit.addBoth(self._commit_done, model_id, commit)

    async def _bounded(self, model_id: str, action: str, work: Callable[[Tally], Coroutine[Any, Any, None]],
                       timeout: float, setting: str) -> None:
        """
        Run ``work`` (saving or restoring; it counts what it does in the `Tally` it is given) for
        at most ``timeout`` seconds, then log and count what it did. Its problems are log lines.

        :param action: ``saved`` or ``restored``.
        :param setting: the name of the setting ``timeout`` comes from, for the log line.
        """
        started = self._reactor.seconds()
        tally = Tally()
        try:
            await Deferred.fromCoroutine(work(tally)).addTimeout(timeout, self._reactor)
        except TimeoutError:
            log.warn("slot cache: the slots of {model} took longer than {setting} ({timeout:g}s) to be {action};"
                     " going on without the rest", model=model_id, setting=setting, timeout=timeout, action=action)
            self._count_skip(model_id, "timeout")
        except CancelledError:
            raise
        except Exception as e:
            log.warn("slot cache: the slots of {model} could not be {action}: {error}", model=model_id,
                     action=action, error=str(e))
        tally.seconds = self._reactor.seconds() - started
        if tally.slots:
            log.info("slot cache: {action} {count} {slots} of {model} ({size}) in {seconds:.2f}s", action=action,
                     count=tally.slots, slots="slot" if tally.slots == 1 else "slots", model=model_id,
                     size=_size_text(tally.bytes), seconds=tally.seconds)
            self.tallies.setdefault(model_id, ModelTally()).record(action, tally)
            if self._metrics is not None:
                self._metrics.record(model_id, action, tally)

    async def _save(self, upstream: Upstream, server: _Server, saved: list[tuple[str, int, dict[str, Any]]],
                    tally: Tally) -> None:
        if not await self._learn(upstream, server):
            return
        api = self._api(upstream)
        try:
            slots = await api.slots()
        except SlotsUnsupported as e:
            self._unsupported_server(upstream, e)
            return
        holding = [s for s in slots if isinstance(s.get("n_prompt_tokens"), int) and s["n_prompt_tokens"] > 0]
        if not holding:
            return
        files = self._files.get(server.directory.path, {})
        # Not behind the recording of another model's files (a CRC of gigabytes) in the queue.
        room = await maybeDeferred(self._run, server.directory.room, list(files.values()))
        settings = self._settings()
        per_token = self._bytes_per_token(upstream.model.id, server.identity)
        for slot in sorted(holding, key=lambda s: s["id"]):
            estimate = per_token * slot["n_prompt_tokens"]
            if room.free - estimate < settings.min_free:
                log.warn("slot cache: not saving slot {slot} of {model}: the disk would keep less than"
                         " minFree ({free} free)", slot=slot["id"], model=upstream.model.id,
                         free=_size_text(room.free))
                self._count_skip(upstream.model.id, "no_room")
                continue
            name = data_name(upstream.model.id, slot["id"], self._reactor.seconds(), secrets.token_hex(3))
            self._busy.add(name)
            try:
                answer = await self._api(upstream).save(slot["id"], name)
            except SlotsUnsupported as e:
                self._busy.discard(name)
                self._unsupported_server(upstream, e)
                return
            except BaseException:
                self._busy.discard(name)
                raise
            saved.append((name, slot["id"], answer))
            written = answer.get("n_written")
            written = written if isinstance(written, int) else estimate
            tally.add(1, written, 0.0)
            room = Room(room.free - written, room.used)

    def _bytes_per_token(self, model_id: str, identity: ServerIdentity | None) -> int:
        """
        What a token took in this server's last saved file (0 before the first).
        """
        for files in self._files.values():
            for entry in sorted(files.values(), key=lambda e: -e.saved_at):
                if entry.model == model_id and entry.server == identity and entry.tokens:
                    return entry.size // entry.tokens
        return 0

    async def _commit(self, model_id: str, server: _Server, saved: list[tuple[str, int, dict[str, Any]]],
                      saved_at: float) -> None:
        directory = server.directory
        settings = self._settings()
        try:
            if server.identity is None:
                return
            entries = {e.name: e for e in await self._in_thread(directory.scan, set(self._busy))}
            for name, _, answer in saved:
                written = answer.get("n_written")
                committed = await self._in_thread(directory.commit, name, model_id, server.identity, saved_at,
                                                  written if isinstance(written, int) else None)
                self._busy.discard(name)
                if committed is None:
                    self._count_skip(model_id, "corrupt")
                    continue
                entry, tokens = committed
                entries[entry.name] = entry
                for old in superseded(entry, tokens, list(entries.values())):
                    log.info("slot cache: {name} holds all of {old} and more; removing {old}", name=name,
                             old=old.name)
                    await self._remove(directory, entries, old, "superseded")
            ordered = sorted(entries.values(), key=lambda e: (e.saved_at, e.name))
            too_large = [e for e in ordered if settings.max_size and e.size > settings.max_size]
            for entry in too_large:
                log.warn("slot cache: {name} ({size}) is larger than maxSize; removing it", name=entry.name,
                         size=_size_text(entry.size))
                await self._remove(directory, entries, entry, "too_large")
            ordered = sorted(entries.values(), key=lambda e: (e.saved_at, e.name))
            room = await self._in_thread(directory.room, ordered)
            # Not the files a start is about to restore.
            evictable = [e for e in ordered if e.name not in self._busy]
            for entry in over_budget(evictable, room, settings.max_size, settings.min_free):
                log.info("slot cache: removing {name} of {model} (saved {age:.0f}s ago) to stay within maxSize and"
                         " minFree", name=entry.name, model=entry.model, age=self._reactor.seconds() - entry.saved_at)
                await self._remove(directory, entries, entry, "budget")
        finally:
            for name, _, _ in saved:
                self._busy.discard(name)
        self._files[directory.path] = entries

    async def _remove(self, directory: SlotDirectory, entries: dict[str, SlotFile], entry: SlotFile,
                      reason: str) -> None:
        entries.pop(entry.name, None)
        await self._in_thread(directory.remove, entry)
        if self._metrics is not None:
            self._metrics.removed(entry.model, reason)

    def _commit_done(self, result: object, model_id: str, commit: Deferred[None]) -> None:
        if self._commits.get(model_id) is commit:
            del self._commits[model_id]
        if isinstance(result, Failure):
            log.failure("slot cache: recording the saved slots of {model}", result, model=model_id)

    # -- restoring ------------------------------------------------------------------------------

    async def _after_healthy(self, upstream: Upstream) -> None:
        server = self._server(upstream)
        if server is not None:
            await self._bounded(upstream.model.id, "restored", lambda tally: self._restore(upstream, server, tally),
                                self._settings().restore_timeout, "restoreTimeout")

    async def _restore(self, upstream: Upstream, server: _Server, restored: Tally) -> None:
        model_id = upstream.model.id
        directory = server.directory
        checked = None if server.candidates is None else await _settled(server.candidates)
        try:
            if checked is None:
                checked = await self._check(model_id, directory, len(server.slot_ids) or 4)
            if await self._learn(upstream, server):
                await self._restore_checked(upstream, server, checked, restored)
        finally:
            self._release(checked)

    async def _restore_checked(self, upstream: Upstream, server: _Server, checked: _Candidates,
                               restored: Tally) -> None:
        model_id = upstream.model.id
        directory = server.directory
        entries = checked.entries
        mine = sorted((e for e in entries.values() if e.model == model_id), key=lambda e: (-e.saved_at, e.name))
        fitting = []
        for entry in mine:
            differences = server.identity.differences(entry.server) if server.identity else ["no identity"]
            if differences:
                log.info("slot cache: not restoring {name} into {model}: saved with {why}", name=entry.name,
                         model=model_id, why="; ".join(differences))
                self._count_skip(model_id, "mismatch")
            else:
                fitting.append(entry)
        slot_ids = list(server.slot_ids)
        if not fitting or not slot_ids:
            return
        planned = fitting[: len(slot_ids)]
        total = sum(e.size for e in planned)
        count = len(planned)
        label = (f"restoring {count} cached {'conversation' if count == 1 else 'conversations'},"
                 f" {_size_text(total)}")
        upstream.start_step = StartStep("restoring", label, 0.0)
        done = 0
        api = self._api(upstream)
        for entry in fitting:
            if not slot_ids:
                break
            if entry.name in checked.problems:
                problem = checked.problems[entry.name]
            else:
                problem = await self._in_thread(directory.problem, entry)
            if problem is not None:
                log.warn("slot cache: not restoring {name} into {model}: {problem}; removing it", name=entry.name,
                         model=model_id, problem=problem)
                self._count_skip(model_id, "corrupt")
                await self._remove(directory, entries, entry, "corrupt")
                continue
            slot_id = slot_ids[0]
            try:
                answer = await api.restore(slot_id, entry.name)
            except SlotsUnsupported as e:
                self._unsupported_server(upstream, e)
                return
            except SlotsError as e:
                log.warn("slot cache: llama-server refused {name} for {model}: {error}; removing it",
                         name=entry.name, model=model_id, error=str(e))
                self._count_skip(model_id, "refused")
                await self._remove(directory, entries, entry, "refused")
                continue
            slot_ids.pop(0)
            restored.add(1, entry.size, 0.0)
            done += entry.size
            upstream.start_step = StartStep("restoring", label, min(1.0, done / total) if total else None)
            log.debug("slot cache: restored {name} ({tokens} tokens) into slot {slot} of {model}", name=entry.name,
                      tokens=answer.get("n_restored", entry.tokens), slot=slot_id, model=model_id)

    # -- reports --------------------------------------------------------------------------------

    def _count_skip(self, model_id: str, reason: str) -> None:
        if self._metrics is not None:
            self._metrics.skipped(model_id, reason)

    def files_by_model(self) -> dict[str, list[SlotFile]]:
        """
        The recorded files of each model, as of the last scan or commit, newest first.
        """
        found: dict[str, list[SlotFile]] = {}
        for files in self._files.values():
            for entry in files.values():
                found.setdefault(entry.model, []).append(entry)
        for entries in found.values():
            entries.sort(key=lambda e: -e.saved_at)
        return found

    def report(self, upstream: Upstream) -> dict[str, Any] | None:
        """
        ``/running``'s ``slot_cache`` of a model: its files on disk, what was saved and restored
        since swapproxy started, and the last save and restore. ``None`` when it is off.
        """
        if not upstream.model.slot_cache:
            return None
        tally = self.tallies.get(upstream.model.id, ModelTally())
        files = self.files_by_model().get(upstream.model.id, [])
        return {
            "supported": (upstream.model.id, upstream.model.cmd) not in self._unsupported,
            "files": len(files),
            "bytes": sum(e.size for e in files),
            "saved": tally.saved.to_json(),
            "restored": tally.restored.to_json(),
            "last_save": None if tally.last_save is None else tally.last_save.to_json(),
            "last_restore": None if tally.last_restore is None else tally.last_restore.to_json(),
        }


def _settled(d: Deferred[_T]) -> Deferred[_T | None]:
    """
    A Deferred that fires with ``d``'s result once ``d`` has fired, or with ``None`` if that is a
    failure (handled where ``d`` is made); cancelling it does not cancel ``d``.
    """
    waiter: Deferred[_T | None] = Deferred()

    def fire(result: Any) -> Any:
        if not waiter.called:
            waiter.callback(None if isinstance(result, Failure) else result)
        return result

    d.addBoth(fire)
    return waiter


class _Metrics:
    """
    The slot cache's Prometheus metrics.
    """

    def __init__(self, cache: SlotCache, registry: CollectorRegistry) -> None:
        self._cache = cache
        r = registry
        self._saved = Counter("swapproxy_slot_cache_saved_slots", "llama-server slots saved before a stop",
                              ["model"], registry=r)
        self._saved_bytes = Counter("swapproxy_slot_cache_saved_bytes", "Bytes of llama-server slots saved",
                                    ["model"], registry=r)
        self._save_seconds = Counter("swapproxy_slot_cache_save_seconds",
                                     "Seconds stops waited for slots to be saved", ["model"], registry=r)
        self._restored = Counter("swapproxy_slot_cache_restored_slots", "llama-server slots restored at a start",
                                 ["model"], registry=r)
        self._restored_bytes = Counter("swapproxy_slot_cache_restored_bytes", "Bytes of llama-server slots restored",
                                       ["model"], registry=r)
        self._restore_seconds = Counter("swapproxy_slot_cache_restore_seconds",
                                        "Seconds starts spent restoring slots", ["model"], registry=r)
        self._skipped = Counter("swapproxy_slot_cache_skipped",
                                "Slots not saved or files not restored, by reason (unsupported, timeout, no_room,"
                                " corrupt, mismatch, refused)", ["model", "reason"], registry=r)
        self._removed = Counter("swapproxy_slot_cache_removed_files",
                                "Saved slot files removed, by reason (superseded, budget, too_large, corrupt,"
                                " refused)", ["model", "reason"], registry=r)
        registry.register(_FilesCollector(cache))

    def record(self, model: str, action: str, tally: Tally) -> None:
        """
        Count one stop's saves (``action`` ``saved``) or one start's restores (``restored``).
        """
        slots, size, seconds = (
            (self._saved, self._saved_bytes, self._save_seconds) if action == "saved"
            else (self._restored, self._restored_bytes, self._restore_seconds)
        )
        slots.labels(model).inc(tally.slots)
        size.labels(model).inc(tally.bytes)
        seconds.labels(model).inc(tally.seconds)

    def skipped(self, model: str, reason: str) -> None:
        self._skipped.labels(model, reason).inc()

    def removed(self, model: str, reason: str) -> None:
        self._removed.labels(model, reason).inc()


class _FilesCollector:
    """
    The files on disk per model, read from the cache's index when Prometheus scrapes.
    """

    def __init__(self, cache: SlotCache) -> None:
        self._cache = cache

    def collect(self) -> Iterator[Metric]:
        files = GaugeMetricFamily("swapproxy_slot_cache_files", "Saved slot files on disk", labels=["model"])
        size = GaugeMetricFamily("swapproxy_slot_cache_bytes", "Bytes of saved slot files on disk", labels=["model"])
        for model, entries in sorted(self._cache.files_by_model().items()):
            files.add_metric([model], len(entries))
            size.add_metric([model], sum(e.size for e in entries))
        yield files
        yield size

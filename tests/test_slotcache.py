"""
Tests for `swapproxy.slotcache`: saving llama-server's slots before a stop, restoring them at
the next start.

The unit tests drive a real `Upstream` with a fake child and a fake health probe on a clock
(`tests.support.reactors.ProcessReactor`), and a `FakeSlotServer` that stands for llama-server's
slot API and writes real files into a temporary directory. Disk work runs synchronously instead of in a
thread. `NoSlotAPITests` runs the fake upstream for real; the end-to-end tests with a real
llama-server are in ``tests/test_llama_server.py`` (``SlotCacheTests``).
"""

from __future__ import annotations

import json
import os
import signal
import stat
from typing import Any

from prometheus_client import CollectorRegistry
from twisted.internet import reactor
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.logger import capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase, TestCase

from swapproxy.config import SlotCacheConfig, parse_config
from swapproxy.slotcache import SlotCache, is_llama_server, save_path_in
from swapproxy.slotfiles import RECORD_SUFFIX, SlotFile
from swapproxy.supervisor import Supervisor
from swapproxy.testing.local import fake_command
from swapproxy.upstream import StartError, State, Upstream
from tests.support.doubles import FakeSlotServer, write_slot_file
from tests.support.live import config_yaml, start_proxy
from tests.support.reactors import ProcessReactor

#: When the health probe answers 200 after a start: the first probe goes out within this.
PROBE_BOUND = 0.25


class Threads:
    """
    Stands in for the thread pool: runs work at once, or when released if its name is in
    ``hold``.
    """

    def __init__(self) -> None:
        self.hold: set[str] = set()
        self.queued: list[tuple[Deferred[Any], Any, tuple[Any, ...]]] = []
        #: The name of each piece of work, as it was handed over.
        self.calls: list[str] = []

    def __call__(self, work: Any, *args: Any) -> Deferred[Any]:
        self.calls.append(work.__name__)
        if work.__name__ not in self.hold:
            return maybeDeferred(work, *args)
        d: Deferred[Any] = Deferred()
        self.queued.append((d, work, args))
        return d

    def release(self) -> None:
        self.hold = set()
        while self.queued:
            d, work, args = self.queued.pop(0)
            maybeDeferred(work, *args).chainDeferred(d)


class SlotCacheTestCase(SynchronousTestCase):
    """
    One model ``m`` whose command runs a (fake) ``llama-server`` found on ``PATH``.
    """

    def setUp(self) -> None:
        self.reactor = ProcessReactor().install(self)
        self.reactor.advance(1_800_000_000)
        self.bin = os.path.abspath(self.mktemp())
        os.makedirs(self.bin)
        llama = os.path.join(self.bin, "llama-server")
        with open(llama, "w", encoding="utf-8") as f:
            f.write("#!/bin/sh\n")
        os.chmod(llama, os.stat(llama).st_mode | stat.S_IXUSR)
        self.state = os.path.abspath(self.mktemp())
        self.slots_dir = os.path.join(self.state, "slots")
        self.settings = SlotCacheConfig(enabled=True)
        self.server = FakeSlotServer(self.slots_dir)
        self.cache = self.make_cache()
        self.healthy = True

    def make_cache(self, run: Any = None) -> SlotCache:
        return SlotCache(lambda: self.settings, self.reactor, self.slots_dir, api=self.server.api,
                         run=run or (lambda work, *args: maybeDeferred(work, *args)))

    def threads(self) -> Threads:
        """
        Disk work the test holds back (``hold``) and lets run (`Threads.release`).
        """
        threads = Threads()
        self.cache = self.make_cache(threads)
        return threads

    def upstream(self, cmd: str = "llama-server -m /models/m.gguf --port ${PORT}", **model: Any) -> Upstream:
        text = json.dumps({"models": {"m": {"cmd": cmd, "slotCache": True, **model}}})
        upstream = Upstream(parse_config(text, "test.yaml").models["m"], self.reactor,
                            environ={"PATH": self.bin}, health_probe=lambda up: maybeDeferred(self.probe))
        self.cache.follow(upstream)
        return upstream

    def probe(self) -> int:
        return 200 if self.healthy else 503

    def start(self, upstream: Upstream) -> Deferred[None]:
        d = upstream.start()
        self.reactor.advance(PROBE_BOUND)
        return d

    def started(self, upstream: Upstream) -> None:
        self.successResultOf(self.start(upstream))
        self.assertEqual(upstream.state, State.READY)

    def stopped(self, upstream: Upstream) -> None:
        """
        Stop a ready model; its child exits on SIGTERM.
        """
        process = self.reactor.spawned[-1]
        d = upstream.stop()
        self.assertEqual(process.signals, [signal.SIGTERM], "signalled once the saves are done")
        process.exit(0)
        self.server.exited()
        self.successResultOf(d)

    def files(self) -> list[str]:
        return sorted(os.listdir(self.slots_dir))

    def record(self, name: str) -> SlotFile:
        with open(os.path.join(self.slots_dir, name + ".json"), encoding="utf-8") as f:
            return SlotFile.from_json(json.load(f))

    def conversation(self, upstream: Upstream, slot: int, tokens: list[int]) -> None:
        """
        The server now holds ``tokens`` in ``slot`` (a request was served there).
        """
        self.server.serve(slot, tokens)


class CommandTests(SlotCacheTestCase):
    """
    ``--slot-save-path`` is added to a llama-server command that lacks it.
    """

    def test_added_to_a_llama_server_command(self) -> None:
        self.start(self.upstream())
        self.assertEqual(self.reactor.spawned[0].command[-2:], ["--slot-save-path", self.slots_dir])
        self.assertTrue(os.path.isdir(self.slots_dir), "llama-server refuses a missing directory")

    def test_the_configured_directory(self) -> None:
        self.settings = SlotCacheConfig(enabled=True, path=os.path.join(self.state, "elsewhere"))
        self.start(self.upstream())
        self.assertEqual(self.reactor.spawned[0].command[-1], os.path.join(self.state, "elsewhere"))

    def test_a_directory_that_cannot_be_made_leaves_the_command_alone(self) -> None:
        """
        When the configured directory cannot be created, the model starts as without the slot
        cache, with a warning: llama-server would refuse to start with a save path that is
        not a directory.
        """
        blocker = os.path.join(self.state, "a-file")
        os.makedirs(self.state, exist_ok=True)
        with open(blocker, "w", encoding="utf-8") as f:
            f.write("not a directory")
        self.settings = SlotCacheConfig(enabled=True, path=os.path.join(blocker, "slots"))
        upstream = self.upstream()
        with capturedLogs() as events:
            self.started(upstream)
        self.assertNotIn("--slot-save-path", self.reactor.spawned[0].command)
        self.assertIn(f"slot cache of m: cannot create {blocker}/slots", " ".join(formatEvent(e) for e in events))
        self.conversation(upstream, 0, [1, 2, 3])
        self.stopped(upstream)
        self.assertEqual(self.server.calls, [], "no save is asked of a server without a save path")

    def test_a_path_the_user_gave_is_kept_and_used(self) -> None:
        mine = os.path.join(self.state, "mine")
        upstream = self.upstream(f"llama-server -m /models/m.gguf --port ${{PORT}} --slot-save-path {mine}")
        self.server.directory = mine
        self.started(upstream)
        self.assertEqual(self.reactor.spawned[0].command.count("--slot-save-path"), 1)
        self.conversation(upstream, 0, [1, 2, 3])
        self.stopped(upstream)
        self.assertEqual(len([n for n in os.listdir(mine) if n.endswith(RECORD_SUFFIX)]), 1)

    def test_not_for_a_model_without_slot_cache(self) -> None:
        text = json.dumps({"models": {"m": {"cmd": "llama-server -m /models/m.gguf --port ${PORT}"}}})
        upstream = Upstream(parse_config(text, "t.yaml").models["m"], self.reactor, environ={"PATH": self.bin},
                            health_probe=lambda up: maybeDeferred(self.probe))
        self.cache.follow(upstream)
        self.started(upstream)
        self.assertNotIn("--slot-save-path", self.reactor.spawned[0].command)
        self.conversation(upstream, 0, [1, 2])
        self.stopped(upstream)
        self.assertEqual(self.server.calls, [])

    def test_what_counts_as_llama_server(self) -> None:
        self.assertTrue(is_llama_server(["/opt/llama/bin/llama-server", "-m", "x"]))
        self.assertTrue(is_llama_server(["nice", "-n", "5", "llama-server"]))
        self.assertFalse(is_llama_server(["python", "tests/fake_upstream.py"]))
        self.assertEqual(save_path_in(["x", "--slot-save-path=/a"]), "/a")


class SaveTests(SlotCacheTestCase):
    """
    Before a model is stopped on purpose, each slot that holds tokens is saved and recorded.
    """

    def test_each_slot_holding_tokens_is_saved_before_the_signal(self) -> None:
        upstream = self.upstream()
        self.started(upstream)
        self.conversation(upstream, 1, list(range(100)))
        self.reactor.advance(30)
        self.stopped(upstream)

        self.assertEqual([(action, slot) for action, slot, _ in self.server.calls], [("save", 1)])
        name = self.server.calls[0][2]
        self.assertEqual(self.files(), [name, name + ".json"])
        record = self.record(name)
        self.assertEqual((record.model, record.tokens, record.saved_at), ("m", 100, self.reactor.seconds()))
        self.assertEqual(record.server.build, "b1-test")
        self.assertEqual(record.server.model_path, "/models/m.gguf")
        self.assertNotIn("--slot-save-path", record.server.argv)

    def test_saved_when_the_ttl_unloads_an_idle_model_and_on_unload(self) -> None:
        """
        Through the supervisor: the TTL's stop and an unload save the slots as a swap does.
        """
        text = json.dumps({"models": {"m": {"cmd": "llama-server -m /models/m.gguf --port ${PORT}",
                                            "slotCache": True, "ttl": 60}}})
        config = parse_config(text, "test.yaml")

        def factory(model: Any) -> Upstream:
            upstream = Upstream(model, self.reactor, environ={"PATH": self.bin},
                                health_probe=lambda up: maybeDeferred(self.probe))
            self.cache.follow(upstream)
            return upstream

        supervisor = Supervisor(config, self.reactor, upstream_factory=factory)
        for stop in ("ttl", "unload"):
            lease = supervisor.request("m").wait()
            self.reactor.advance(PROBE_BOUND)
            self.successResultOf(lease).release()
            self.conversation(supervisor.upstreams["m"], 0, [len(stop)] * 8)
            process = self.reactor.spawned[-1]
            if stop == "ttl":
                self.reactor.advance(60)
                done = None
            else:
                done = supervisor.unload("m")
            self.assertEqual(self.server.calls[-1][:2], ("save", 0), stop)
            self.assertEqual(process.signals, [signal.SIGTERM])
            process.exit(0)
            self.server.exited()
            if done is not None:
                self.successResultOf(done)
        self.assertEqual(len([n for n in self.files() if n.endswith(RECORD_SUFFIX)]), 2)

    def test_nothing_to_save(self) -> None:
        upstream = self.upstream()
        self.started(upstream)
        self.stopped(upstream)
        self.assertEqual(self.server.calls, [])

    def test_a_crash_saves_nothing(self) -> None:
        upstream = self.upstream()
        self.started(upstream)
        self.conversation(upstream, 0, [1, 2, 3])
        self.reactor.spawned[-1].exit(None, signal.SIGSEGV)
        self.assertEqual(upstream.state, State.STOPPED)
        self.assertEqual(self.server.calls, [])

    def test_a_stop_waits_at_most_save_timeout(self) -> None:
        """
        A save that does not answer holds the stop for ``saveTimeout``, then the model is
        signalled anyway; what it was writing is not kept.
        """
        self.settings = SlotCacheConfig(enabled=True, save_timeout=4)
        upstream = self.upstream()
        self.started(upstream)
        self.conversation(upstream, 0, [1, 2, 3])
        self.server.hold = True
        process = self.reactor.spawned[-1]
        with capturedLogs() as events:
            d = upstream.stop()
            self.reactor.advance(3.9)
            self.assertEqual(process.signals, [])
            self.reactor.advance(0.1)
        self.assertEqual(process.signals, [signal.SIGTERM])
        self.assertIn("took longer than saveTimeout (4s)", " ".join(formatEvent(e) for e in events))
        process.exit(0)
        self.successResultOf(d)
        self.assertEqual(self.files(), [], "the file of the save cut short is removed")

    def test_never_fills_the_disk(self) -> None:
        self.settings = SlotCacheConfig(enabled=True, min_free=1 << 62)
        upstream = self.upstream()
        self.started(upstream)
        self.conversation(upstream, 0, [1, 2, 3])
        with capturedLogs() as events:
            self.stopped(upstream)
        self.assertEqual(self.server.calls, [])
        self.assertIn("the disk would keep less than minFree", " ".join(formatEvent(e) for e in events))

    def test_a_continued_conversation_replaces_its_earlier_file(self) -> None:
        upstream = self.upstream()
        self.started(upstream)
        self.conversation(upstream, 0, [1, 2, 3])
        self.stopped(upstream)
        first = self.server.calls[-1][2]
        self.started(upstream)
        self.conversation(upstream, 0, [1, 2, 3, 4, 5, 6])
        self.reactor.advance(1)
        self.stopped(upstream)
        second = self.server.calls[-1][2]
        self.assertEqual(self.files(), [second, second + ".json"])
        self.assertNotEqual(first, second)

    def test_the_oldest_files_go_past_max_size(self) -> None:
        upstream = self.upstream()
        names = []
        for turn in range(3):
            self.started(upstream)
            self.conversation(upstream, 0, [turn] * 50)
            self.reactor.advance(1)
            self.stopped(upstream)
            names.append(self.server.calls[-1][2])
            if turn == 0:
                size = self.record(names[0]).size
                self.settings = SlotCacheConfig(enabled=True, max_size=2 * size)
        self.assertEqual(self.files(), sorted([names[1], names[1] + ".json", names[2], names[2] + ".json"]))


class RestoreTests(SlotCacheTestCase):
    """
    When the model starts again, the saved slots are restored before it is READY.
    """

    def saved_conversations(self, upstream: Upstream, *conversations: list[int]) -> list[str]:
        """
        Save each conversation from slot 0 in a run of its own, a second apart; their file names.
        """
        names = []
        for tokens in conversations:
            self.started(upstream)
            self.conversation(upstream, 0, tokens)
            self.reactor.advance(1)
            self.stopped(upstream)
            names.append(self.server.calls[-1][2])
        return names

    def test_restored_before_the_first_request_is_let_through(self) -> None:
        upstream = self.upstream()
        [name] = self.saved_conversations(upstream, list(range(40)))
        self.server.hold = True
        d = self.start(upstream)
        self.assertEqual(self.server.calls[-1], ("restore", 0, name))
        self.assertEqual(upstream.state, State.STARTING)
        self.assertNoResult(d)
        step = upstream.start_step
        assert step is not None
        size = self.record(name).size
        self.assertEqual((step.stage, step.fraction), ("restoring", 0.0))
        self.assertEqual(step.label, f"restoring 1 cached conversation, {size} bytes")
        self.server.held[0].callback({"n_restored": 40})
        self.successResultOf(d)
        self.assertEqual(upstream.state, State.READY)
        self.assertEqual(self.server.tokens[0], list(range(40)))
        self.assertEqual(self.files(), [name, name + ".json"], "a restored file stays for the next time")

    def restores(self) -> list[tuple[str, int, str]]:
        """
        The restores since the last `mark`.
        """
        return [call for call in self.server.calls[self.marked:] if call[0] == "restore"]

    def mark(self) -> None:
        self.marked = len(self.server.calls)

    def test_the_files_are_checked_while_the_model_loads(self) -> None:
        """
        The CRC of the files to restore is computed as the model is spawned, not after it is
        healthy: the start then only asks llama-server to restore them.
        """
        threads = self.threads()
        upstream = self.upstream()
        [name] = self.saved_conversations(upstream, [1] * 10)
        self.healthy = False
        threads.calls.clear()
        d = self.start(upstream)
        self.assertEqual(threads.calls.count("problem"), 1, threads.calls)
        self.assertNotIn(("restore", 0, name), self.server.calls[-1:])
        self.healthy = True
        self.reactor.advance(PROBE_BOUND)
        self.successResultOf(d)
        self.assertEqual(self.server.calls[-1], ("restore", 0, name))
        self.assertEqual(threads.calls.count("problem"), 1)

    def test_the_most_recent_files_win_the_slots(self) -> None:
        upstream = self.upstream()
        names = self.saved_conversations(upstream, [1] * 10, [2] * 10, [3] * 10)
        self.mark()
        self.started(upstream)
        self.assertEqual(self.restores(), [("restore", 0, names[2]), ("restore", 1, names[1])])
        self.assertEqual(self.server.tokens, {0: [3] * 10, 1: [2] * 10})

    def test_a_corrupt_file_is_skipped_with_a_log_line(self) -> None:
        """
        A file whose bytes changed since it was saved never reaches llama-server (which aborts on
        a truncated one); it is removed, the next file takes the slot, and the start succeeds.
        """
        upstream = self.upstream()
        older, newer = self.saved_conversations(upstream, [1] * 10, [2] * 10)
        with open(os.path.join(self.slots_dir, newer), "r+b") as f:
            f.truncate(30)
        self.mark()
        with capturedLogs() as events:
            self.started(upstream)
        self.assertEqual(self.restores(), [("restore", 0, older)])
        self.assertIn(f"not restoring {newer} into m: it has 30 bytes", " ".join(formatEvent(e) for e in events))
        self.assertEqual(self.files(), [older, older + ".json"])

    def test_a_file_of_another_build_or_model_file_is_skipped(self) -> None:
        upstream = self.upstream()
        [name] = self.saved_conversations(upstream, [1] * 10)
        self.server.build = "b2-newer"
        self.mark()
        with capturedLogs() as events:
            self.started(upstream)
        self.assertEqual(self.restores(), [])
        self.assertIn(f"not restoring {name} into m: saved with llama-server build 'b1-test', not 'b2-newer'",
                      " ".join(formatEvent(e) for e in events))

    def test_a_file_llama_server_refuses_is_dropped(self) -> None:
        upstream = self.upstream()
        [name] = self.saved_conversations(upstream, [1] * 10)
        self.server.refuse.add(name)
        self.started(upstream)
        self.assertEqual(self.files(), [])

    def test_a_start_waits_at_most_restore_timeout(self) -> None:
        self.settings = SlotCacheConfig(enabled=True, restore_timeout=5)
        upstream = self.upstream()
        self.saved_conversations(upstream, [1] * 10)
        self.server.hold = True
        d = self.start(upstream)
        self.reactor.advance(4.5)
        self.assertNoResult(d)
        self.reactor.advance(0.5)
        self.successResultOf(d)
        self.assertEqual(upstream.state, State.READY)

    def test_a_start_waits_for_the_last_stop_to_be_recorded(self) -> None:
        """
        Recording a save runs after the stop (off the swap's path); a start that comes first
        waits for it, and restores what it recorded.
        """
        threads = self.threads()
        upstream = self.upstream()
        self.started(upstream)
        self.conversation(upstream, 0, [7] * 10)
        threads.hold = {"commit"}
        self.stopped(upstream)
        self.assertTrue(threads.queued, "recording goes on after the stop")
        again = self.start(upstream)
        self.assertNoResult(again)
        threads.release()
        self.successResultOf(again)
        self.assertEqual(self.server.tokens[0], [7] * 10)


class UnsupportedTests(SlotCacheTestCase):
    def test_a_server_without_slot_api_gets_one_warning(self) -> None:
        """
        A server whose ``/slots`` answers 501 starts and stops as without the slot cache, and
        is warned about once, not at each start and stop.
        """
        self.server.unsupported = True
        upstream = self.upstream()
        with capturedLogs() as events:
            for _ in range(2):
                self.started(upstream)
                self.conversation(upstream, 0, [1, 2])
                self.stopped(upstream)
        warnings = [formatEvent(e) for e in events if "has no slot API" in formatEvent(e)]
        self.assertEqual(len(warnings), 1, warnings)
        self.assertEqual(self.server.calls, [])


class ReportTests(SlotCacheTestCase):
    def test_running_and_metrics_show_saves_and_restores(self) -> None:
        registry = CollectorRegistry()
        self.cache.export(registry)
        upstream = self.upstream()
        self.started(upstream)
        self.conversation(upstream, 0, [1] * 20)
        self.conversation(upstream, 1, [2] * 30)
        self.stopped(upstream)
        self.started(upstream)
        sizes = sum(os.path.getsize(os.path.join(self.slots_dir, c[2])) for c in self.server.calls if c[0] == "save")

        report = upstream.reports["slot_cache"]()
        self.assertEqual(report["files"], 2)
        self.assertEqual(report["bytes"], sizes)
        self.assertEqual(report["saved"]["slots"], 2)
        self.assertEqual(report["saved"]["bytes"], sizes)
        self.assertEqual(report["restored"]["slots"], 2)
        self.assertEqual(report["last_restore"]["bytes"], sizes)

        def value(name: str, **labels: str) -> float | None:
            return registry.get_sample_value(name, {"model": "m", **labels})

        self.assertEqual(value("swapproxy_slot_cache_saved_slots_total"), 2)
        self.assertEqual(value("swapproxy_slot_cache_saved_bytes_total"), sizes)
        self.assertEqual(value("swapproxy_slot_cache_restored_slots_total"), 2)
        self.assertEqual(value("swapproxy_slot_cache_restored_bytes_total"), sizes)
        self.assertEqual(value("swapproxy_slot_cache_files"), 2)
        self.assertEqual(value("swapproxy_slot_cache_bytes"), sizes)


class ServiceTests(SlotCacheTestCase):
    def test_start_reads_the_directory_and_removes_left_overs(self) -> None:
        os.makedirs(self.slots_dir)
        write_slot_file(os.path.join(self.slots_dir, "m-1-s0-abc.slot"), [1, 2])
        self.upstream()
        self.cache.startService()
        self.addCleanup(self.cache.stopService)
        self.assertEqual(self.files(), [])

    def stopped_before_recording(self) -> Threads:
        """
        The cache runs, the model saved a slot and stopped; the recording of the file is held.
        """
        threads = self.threads()
        upstream = self.upstream()
        self.cache.startService()
        self.started(upstream)
        self.conversation(upstream, 0, [1, 2])
        threads.hold = {"commit"}
        self.stopped(upstream)
        return threads

    def test_stop_waits_for_the_last_saves_to_be_recorded(self) -> None:
        """
        swapproxy's stop waits (at most ``saveTimeout``) for the files the last stops saved to be
        recorded: a file without its record is removed at the next start.
        """
        threads = self.stopped_before_recording()
        stopping = self.cache.stopService()
        self.assertNoResult(stopping)
        threads.release()
        self.successResultOf(stopping)
        self.assertEqual(len([n for n in self.files() if n.endswith(RECORD_SUFFIX)]), 1)

    def test_stop_waits_no_longer_than_save_timeout(self) -> None:
        self.stopped_before_recording()
        stopping = self.cache.stopService()
        self.reactor.advance(self.settings.save_timeout)
        self.successResultOf(stopping)


class ExitTests(SlotCacheTestCase):
    def test_an_exit_during_restore_is_a_failed_start(self) -> None:
        upstream = self.upstream()
        self.started(upstream)
        self.conversation(upstream, 0, [1] * 5)
        self.stopped(upstream)
        self.server.hold = True
        d = self.start(upstream)
        self.reactor.spawned[-1].exit(1)
        self.failureResultOf(d, StartError)
        self.server.held[0].callback({})
        self.assertEqual(upstream.state, State.FAILED)


class NoSlotAPITests(TestCase):
    """
    A real server without a slot API: the fake upstream, whose ``/slots`` answers 501 as a
    llama-server started without ``--slot-save-path`` and with ``--no-slots`` does.
    """

    timeout = 30

    async def test_served_as_without_the_slot_cache_with_one_warning(self) -> None:
        config = parse_config(config_yaml({"fake": {"cmd": fake_command(), "slotCache": True},
                                           "other": {"cmd": fake_command()}}), "test.yaml")
        proxy = start_proxy(self, config)
        cache = SlotCache(lambda: proxy.supervisor.config.slot_cache, reactor, os.path.abspath(self.mktemp()))
        proxy.supervisor.each_upstream(cache.follow)
        commands = []
        for _ in range(2):
            for model in ("fake", "other"):
                status, answer = await proxy.chat(model)
                self.assertEqual((status, answer["model"]), (200, model))
                commands.append(proxy.supervisor.upstreams[model].command)
        self.assertEqual(len(proxy.logs.messages("has no slot API")), 1)
        self.assertEqual(len(proxy.logs.messages("starting model {model}")), 4, "a swap each time")
        self.assertNotIn("--slot-save-path", commands[0], "not a llama-server command")
        self.assertEqual(cache.report(proxy.supervisor.upstreams["fake"]),
                         {"supported": False, "files": 0, "bytes": 0, "saved": {"slots": 0, "bytes": 0, "seconds": 0},
                          "restored": {"slots": 0, "bytes": 0, "seconds": 0}, "last_save": None, "last_restore": None})

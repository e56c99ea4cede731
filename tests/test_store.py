"""
Tests for L{swapproxy.store}: the activity history in SQLite.
"""

from __future__ import annotations

import os
import sqlite3
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase

from swapproxy.store import COLUMNS, WRITE_DELAY, ActivityStore, activity_row


def row(n: int, model: str = "qwen", **extra: Any) -> dict[str, Any]:
    """
    The activity row of a request that ended at Unix time ``1000 + n``.
    """
    values = {
        "time": 1000.0 + n, "model": model, "path": "/v1/chat/completions", "status": 200,
        "duration_ms": 100 + n, "ttfb_ms": 10, "prompt_tokens": 5, "generated_tokens": n,
        "cached_tokens": None, "prompt_per_second": 50.0, "tokens_per_second": 20.5,
    }
    values.update(extra)
    return values


def in_this_thread(f: Any, *args: Any) -> Deferred[Any]:
    return maybeDeferred(f, *args)


class StoreTests(SynchronousTestCase):
    """
    The store with its database work run at once, in this thread.
    """

    def setUp(self) -> None:
        self.path = os.path.join(self.mktemp(), "state", "activity.sqlite")

    def store(self, max_rows: int = 100, recent: int = 10) -> ActivityStore:
        store = ActivityStore(self.path, reactor, max_rows, recent=recent, run=in_this_thread)
        store.startService()
        self.addCleanup(lambda: store.running and store.stopService())
        return store

    def test_survives_a_restart(self) -> None:
        """
        The requests recorded before a restart are the recent history after it, in order, and
        older ones can still be read, newest first.
        """
        store = self.store(recent=3)
        for n in range(5):
            store.record(row(n))
        self.successResultOf(store.stopService())
        again = self.store(recent=3)
        self.assertEqual(list(again.recent), [row(2), row(3), row(4)])
        self.assertEqual(self.successResultOf(again.older(10)), [row(n) for n in (4, 3, 2, 1, 0)])
        self.assertEqual(self.successResultOf(again.older(2, before=1003.0)), [row(2), row(1)])

    def test_bounded(self) -> None:
        """
        The database keeps the newest ``maxRows`` requests; the oldest go first.
        """
        store = self.store(max_rows=4)
        for n in range(10):
            store.record(row(n))
        self.assertEqual([r["time"] for r in self.successResultOf(store.older(100))], [1009.0, 1008.0, 1007.0, 1006.0])
        self.assertEqual(sqlite3.connect(self.path).execute("SELECT COUNT(*) FROM activity").fetchone(), (4,))

    def test_by_model(self) -> None:
        store = self.store()
        store.record(row(1, "qwen"))
        store.record(row(2, "llama"))
        store.record(row(3, "qwen"))
        self.assertEqual(self.successResultOf(store.older(10, model="qwen")), [row(3), row(1)])

    def test_subscribers(self) -> None:
        """
        Each recorded request is passed on; a subscriber that fails is dropped and logged.
        """
        store = self.store()
        seen: list[dict[str, Any]] = []
        unsubscribe = store.subscribe(seen.append)
        store.subscribe(lambda _: 1 / 0)
        store.record(row(1))
        self.assertEqual(seen, [row(1)])
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        unsubscribe()
        store.record(row(2))
        self.assertEqual(seen, [row(1)])

    def test_unusable_database(self) -> None:
        """
        A database that cannot be opened is reported once; the history goes on in memory.
        """
        blocker = self.mktemp()
        with open(blocker, "w") as f:
            f.write("a file, not a directory")
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        store = ActivityStore(os.path.join(blocker, "activity.sqlite"), reactor, run=in_this_thread)
        store.startService()
        store.record(row(1))
        store.record(row(2))
        self.assertEqual(self.successResultOf(store.older(10)), [row(2), row(1)])
        self.assertEqual(list(store.recent), [row(1), row(2)])
        errors = [e for e in events if "cannot use the activity database" in e.get("log_format", "")]
        self.assertEqual(len(errors), 1)
        self.successResultOf(store.stopService())

    def test_written_together(self) -> None:
        """
        The requests that end within WRITE_DELAY of each other go to the database in one write,
        WRITE_DELAY after the first; a reader of the history does not wait for it.
        """
        clock = Clock()
        writes: list[str] = []

        def run(f: Any, *args: Any) -> Deferred[Any]:
            writes.append(f.__name__)
            return maybeDeferred(f, *args)

        store = ActivityStore(self.path, clock, run=run)
        store.startService()
        self.addCleanup(lambda: store.running and store.stopService())

        def stored() -> int:
            return int(sqlite3.connect(self.path).execute("SELECT COUNT(*) FROM activity").fetchone()[0])

        for n in range(3):
            store.record(row(n))
            clock.advance(WRITE_DELAY / 4)
        self.assertEqual(stored(), 0)
        clock.advance(WRITE_DELAY / 4)
        self.assertEqual(stored(), 3)
        self.assertEqual(writes.count("insert"), 1)
        store.record(row(3))
        self.assertEqual(self.successResultOf(store.older(1)), [row(3)])
        self.assertEqual(writes.count("insert"), 2)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_in_memory_only(self) -> None:
        store = ActivityStore(None, reactor, recent=2)
        store.startService()
        for n in range(3):
            store.record(row(n))
        self.assertEqual(list(store.recent), [row(1), row(2)])
        self.assertEqual(self.successResultOf(store.older(10, before=1002.0)), [row(1)])
        self.successResultOf(store.stopService())


class ActivityRowTests(SynchronousTestCase):
    def test_from_request_event(self) -> None:
        """
        A metrics ``request`` event becomes a row; llama-swap's -1 ("unknown") becomes ``None``.
        """
        event = {
            "model": "qwen", "route": "/v1/chat/completions", "status": 200, "time": 1234.5,
            "duration_ms": 900, "ttfb_ms": 120, "metrics_id": 4,
            "tokens": {"cache_tokens": -1, "input_tokens": 25, "output_tokens": 10, "prompt_per_second": -1,
                       "tokens_per_second": 33.3, "duration_ms": 800},
        }
        self.assertEqual(
            activity_row(event),
            {"time": 1234.5, "model": "qwen", "path": "/v1/chat/completions", "status": 200, "duration_ms": 900,
             "ttfb_ms": 120, "prompt_tokens": 25, "generated_tokens": 10, "cached_tokens": None,
             "prompt_per_second": None, "tokens_per_second": 33.3},
        )
        self.assertEqual(list(activity_row(event)), list(COLUMNS))

    def test_without_tokens(self) -> None:
        event = {"model": "", "route": "/v1/chat/completions", "status": 400, "time": 1.0, "duration_ms": 1,
                 "ttfb_ms": None}
        self.assertEqual(activity_row(event)["generated_tokens"], None)


class ThreadTests(TestCase):
    """
    The store on its own thread, with the real reactor.
    """

    async def test_written_on_its_thread(self) -> None:
        """
        Requests recorded while the database opens and after are all written; a new store on the
        same file finds them.
        """
        path = os.path.join(self.mktemp(), "activity.sqlite")
        store = ActivityStore(path, reactor, recent=50)
        store.startService()
        for n in range(20):
            store.record(row(n))
        await store.flush()
        for n in range(20, 30):
            store.record(row(n))
        await store.stopService()
        again = ActivityStore(path, reactor, recent=50)
        again.startService()
        self.addCleanup(again.stopService)
        await again.flush()
        self.assertEqual(list(again.recent), [row(n) for n in range(30)])
        self.assertEqual(len(await again.older(100)), 30)

    async def test_stopped_at_once(self) -> None:
        """
        Requests recorded just before swapproxy stops, while the database is still opening, are
        written before it stops.
        """
        path = os.path.join(self.mktemp(), "activity.sqlite")
        store = ActivityStore(path, reactor)
        store.startService()
        for n in range(3):
            store.record(row(n))
        await store.stopService()
        again = ActivityStore(path, reactor)
        again.startService()
        self.addCleanup(again.stopService)
        self.assertEqual(await again.older(10), [row(2), row(1), row(0)])


class StoreConfigTests(SynchronousTestCase):
    """
    The ``store`` keys of the configuration (llama-swap's ``store.path``, and ``maxRows``).
    """

    def parse(self, store: str) -> Any:
        from swapproxy.config import parse_config

        return parse_config("models:\n  m:\n    cmd: server --port ${PORT}\n" + store, "config.yaml", {})

    def test_defaults(self) -> None:
        config = self.parse("")
        self.assertEqual((config.store_path, config.store_max_rows), ("", 10000))
        self.assertEqual(config.warnings, ())

    def test_keys(self) -> None:
        config = self.parse("store:\n  path: ~/activity.db\n  maxRows: 50\n")
        self.assertEqual((config.store_path, config.store_max_rows), (os.path.expanduser("~/activity.db"), 50))

    def test_bad_values(self) -> None:
        from swapproxy.config import ConfigError

        for store, message in [
            ("store:\n  maxRows: 0\n", "config.yaml: store.maxRows: must be an integer >= 1, got 0"),
            ("store:\n  path: 3\n", "config.yaml: store.path: must be a string, got 3"),
            ("store: here\n", "config.yaml: store: must be a mapping"),
        ]:
            with self.assertRaises(ConfigError) as raised:
                self.parse(store)
            self.assertTrue(str(raised.exception).startswith(message), str(raised.exception))

# -*- test-case-name: tests.test_store -*-
"""
The activity history: every model request swapproxy answered (time, model, path, status,
durations, token counts), kept in a SQLite database so that it survives a restart.

`ActivityStore` hears of each request from `swapproxy.metrics.Metrics` (its ``request`` events)
and costs the reactor O(1) per request: the row goes into a bounded in-memory list of the most
recent requests (what a dashboard is sent when it connects) and into a queue of rows to write.
The database is only ever touched by one thread of a pool of its own: the rows that waited are
inserted there in one batch, at most `WRITE_DELAY` after the first of them (one trip to the
thread and one transaction for however many requests ended meanwhile), the oldest rows beyond
``store.maxRows`` are deleted, and reads of older history (`ActivityStore.older`) run there too,
once every waiting row is written. The reactor never waits for the disk.

If the database cannot be opened or written, the store says so once in the log and goes on in
memory, so a full disk or a read-only state directory never stops swapproxy from serving.
"""

from __future__ import annotations

import os
import sqlite3
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from swapproxy.logs import proxy_logger
from swapproxy.reactors import IThreadClock
from swapproxy.subscribers import Subscribers

log = proxy_logger("swapproxy.store")

#: The file name of the database in the state directory.
DEFAULT_FILE = "activity.sqlite"
#: How many of the newest requests are kept in memory for a dashboard that connects.
RECENT = 200
#: The most rows waiting to be written; beyond it the oldest waiting rows are lost (the disk is
#: far behind, or the database failed).
PENDING_LIMIT = 10_000
#: Seconds a recorded request may wait to be written, so that the rows of the requests that end
#: meanwhile go with it: a trip to the database's thread per request cost as much CPU time as
#: the rest of recording it.
WRITE_DELAY = 1.0

#: The columns of a row, in order; each row is a dict of these keys. Unknown values are ``None``.
COLUMNS = (
    "time",  # Unix time the answer ended, seconds
    "model",  # the model id ("" when the request never got as far as choosing one)
    "path",  # the route: /v1/chat/completions, /upstream, ...
    "status",  # the HTTP status (499: the client hung up first)
    "duration_ms",  # from arrival to the end of the answer, queueing and loading included
    "ttfb_ms",  # from arrival to the model's first byte
    "prompt_tokens",
    "generated_tokens",
    "cached_tokens",
    "prompt_per_second",
    "tokens_per_second",
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS activity (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    time REAL NOT NULL,
    model TEXT NOT NULL,
    path TEXT NOT NULL,
    status INTEGER NOT NULL,
    duration_ms INTEGER,
    ttfb_ms INTEGER,
    prompt_tokens INTEGER,
    generated_tokens INTEGER,
    cached_tokens INTEGER,
    prompt_per_second REAL,
    tokens_per_second REAL
);
CREATE INDEX IF NOT EXISTS activity_time ON activity (time);
"""
_INSERT = f"INSERT INTO activity ({', '.join(COLUMNS)}) VALUES ({', '.join('?' for _ in COLUMNS)})"
_SELECT = f"SELECT {', '.join(COLUMNS)} FROM activity"

Row = dict[str, Any]
Subscriber = Callable[[Row], None]
T = TypeVar("T")


def _known(value: Any) -> Any:
    # llama-swap's token metrics say -1 for "unknown".
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        return None
    return value


def activity_row(event: Mapping[str, Any]) -> Row:
    """
    The activity row of one `swapproxy.metrics.Metrics` ``request`` event.
    """
    tokens = event.get("tokens") or {}
    return {
        "time": event["time"],
        "model": event["model"],
        "path": event["route"],
        "status": event["status"],
        "duration_ms": event.get("duration_ms"),
        "ttfb_ms": event.get("ttfb_ms"),
        "prompt_tokens": _known(tokens.get("input_tokens")),
        "generated_tokens": _known(tokens.get("output_tokens")),
        "cached_tokens": _known(tokens.get("cache_tokens")),
        "prompt_per_second": _known(tokens.get("prompt_per_second")),
        "tokens_per_second": _known(tokens.get("tokens_per_second")),
    }


class _Database:
    """
    The SQLite side; every method runs in the store's one thread.
    """

    def __init__(self, path: str, max_rows: int) -> None:
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        self._connection = sqlite3.connect(path, check_same_thread=False)
        self._connection.execute("PRAGMA journal_mode=WAL")
        self._connection.execute("PRAGMA synchronous=NORMAL")
        self._connection.executescript(_SCHEMA)
        self._prune(max_rows)
        self._connection.commit()

    def _prune(self, max_rows: int) -> None:
        self._connection.execute(
            "DELETE FROM activity WHERE id <= (SELECT MAX(id) FROM activity) - ?", (max_rows,)
        )

    def insert(self, rows: list[Row], max_rows: int) -> None:
        with self._connection:
            self._connection.executemany(_INSERT, [tuple(row[c] for c in COLUMNS) for row in rows])
            self._prune(max_rows)

    def newest(self, limit: int, before: float | None = None, model: str | None = None) -> list[Row]:
        clauses: list[str] = []
        arguments: list[object] = []
        if before is not None:
            clauses.append("time < ?")
            arguments.append(before)
        if model is not None:
            clauses.append("model = ?")
            arguments.append(model)
        where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
        cursor = self._connection.execute(f"{_SELECT}{where} ORDER BY id DESC LIMIT ?", (*arguments, limit))
        return [dict(zip(COLUMNS, values)) for values in cursor.fetchall()]

    def close(self) -> None:
        self._connection.close()


class ActivityStore(Service):
    """
    The recent model requests: in memory for dashboards, in SQLite for the long history.

    :param path: the database file; ``None`` keeps the history in memory only.
    :param reactor: provides ``callFromThread`` (what a thread pool needs) and ``callLater``.
    :param max_rows: the most rows the database keeps; a number, or a function that returns the
        current ``store.maxRows`` (read at each write, so that a reload takes effect).
    :param recent: how many of the newest rows `recent` keeps.
    :param run: runs ``f(*args)`` on the database's thread and returns a Deferred of its result;
        a one-thread pool of the store's own by default (tests may run it synchronously).
    """

    def __init__(
        self,
        path: str | None,
        reactor: IThreadClock,
        max_rows: int | Callable[[], int] = 10_000,
        recent: int = RECENT,
        run: Callable[..., Deferred[Any]] | None = None,
    ) -> None:
        self.path = path
        self._reactor = reactor
        self._max_rows = max_rows if callable(max_rows) else (lambda: max_rows)
        self.recent: deque[Row] = deque(maxlen=recent)
        self._pending: deque[Row] = deque(maxlen=PENDING_LIMIT)
        self._subscribers = Subscribers("activity")
        self._database: _Database | None = None
        self._busy: Deferred[Any] | None = None
        self._write_call: IDelayedCall | None = None
        self._flushed: list[Deferred[None]] = []
        self._pool: ThreadPool | None = None
        self._run = run

    # -- what the reactor calls -----------------------------------------------------------------

    def subscribe(self, subscriber: Subscriber) -> Callable[[], None]:
        """
        Call ``subscriber(row)`` for every request recorded from now on.

        :returns: a function that unsubscribes (calling it twice is harmless).
        """
        return self._subscribers.add(subscriber)

    def metrics_event(self, kind: str, payload: Any) -> None:
        """
        A `swapproxy.metrics.Metrics` subscriber: records each ``request`` event.
        """
        if kind == "request":
            self.record(activity_row(payload))

    def record(self, row: Row) -> None:
        """
        Remember one finished request; it is written to the database soon, on its own thread.
        """
        self.recent.append(row)
        if self.path is not None:
            self._pending.append(row)
            if self._write_call is None:
                self._write_call = self._reactor.callLater(WRITE_DELAY, self._write_soon)
        self._subscribers.publish(row)

    def older(self, limit: int, before: float | None = None, model: str | None = None) -> Deferred[list[Row]]:
        """
        The newest ``limit`` rows (newest first) that ended before ``before`` (Unix time), for
        one ``model`` or all, from the database once every waiting row is written.

        Without a database, from the rows kept in memory.
        """

        def query(_: object) -> list[Row] | Deferred[list[Row]]:
            if self._database is None:
                rows = [
                    row
                    for row in reversed(self.recent)
                    if (before is None or row["time"] < before) and (model is None or row["model"] == model)
                ]
                return rows[:limit]
            return self._in_thread(self._database.newest, limit, before, model)

        return self.flush().addCallback(query)

    def flush(self) -> Deferred[None]:
        """
        A Deferred that fires once the database is open and every row recorded so far is written
        (or given up on).
        """
        if self.path is None or (not self._pending and self._busy is None):
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._flushed.append(waiter)
        self._write_pending()
        return waiter

    def _write_soon(self) -> None:
        self._write_call = None
        self._write_pending()

    def _cancel_write_call(self) -> None:
        if self._write_call is not None and self._write_call.active():
            self._write_call.cancel()
        self._write_call = None

    # -- the database -----------------------------------------------------------------------------

    def _in_thread(self, f: Callable[..., T], *args: Any) -> Deferred[T]:
        if self._run is not None:
            return self._run(f, *args)
        assert self._pool is not None
        return deferToThreadPool(self._reactor, self._pool, f, *args)

    def startService(self) -> None:
        super().startService()
        if self.path is None:
            return
        if self._run is None:
            self._pool = ThreadPool(1, 1, name="swapproxy-activity")
            self._pool.start()
        self._busy = self._in_thread(_open, self.path, self._max_rows(), self.recent.maxlen or RECENT)
        self._busy.addCallbacks(self._opened, self._open_failed)

    def _opened(self, result: tuple[_Database, list[Row]]) -> None:
        self._busy = None
        self._database, rows = result
        # Oldest first, then whatever was recorded while the database opened.
        earlier = list(reversed(rows))
        self.recent = deque(earlier + list(self.recent), maxlen=self.recent.maxlen)
        log.info("activity history: {count} requests in {path}", count=len(earlier), path=self.path)
        self._write_pending()

    def _open_failed(self, failure: Failure) -> None:
        self._busy = None
        log.error(
            "cannot use the activity database {path}: {error}; the activity history is kept in memory only",
            path=self.path, error=failure.getErrorMessage(),
        )
        self.path = None
        self._pending.clear()
        self._cancel_write_call()
        self._notify_flushed()

    def _write_pending(self) -> None:
        self._cancel_write_call()
        if self._database is None or self._busy is not None or not self._pending:
            if self._busy is None:
                self._notify_flushed()
            return
        batch = list(self._pending)
        self._pending.clear()
        self._busy = self._in_thread(self._database.insert, batch, self._max_rows())
        self._busy.addCallbacks(self._written, self._write_failed, errbackArgs=(len(batch),))

    def _written(self, _: object) -> None:
        self._busy = None
        self._write_more()

    def _write_more(self) -> None:
        """
        After a write: rows recorded meanwhile wait for their own `WRITE_DELAY`, unless someone
        waits for them.
        """
        if self._pending and not self._flushed:
            if self._write_call is None:
                self._write_call = self._reactor.callLater(WRITE_DELAY, self._write_soon)
            return
        self._write_pending()

    def _write_failed(self, failure: Failure, count: int) -> None:
        self._busy = None
        log.error(
            "could not write {count} requests to the activity database {path}: {error}",
            count=count, path=self.path, error=failure.getErrorMessage(),
        )
        self._write_more()

    def _notify_flushed(self) -> None:
        waiters, self._flushed = self._flushed, []
        for waiter in waiters:
            waiter.callback(None)

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return self.flush().addCallback(self._close)

    def _close(self, _: object) -> None:
        self._cancel_write_call()
        database, self._database = self._database, None
        if self._pool is not None:
            if database is not None:
                # The pool's one thread runs this after any query still in progress.
                self._pool.callInThread(database.close)
            self._pool.stop()
            self._pool = None
        elif database is not None:
            database.close()


def _open(path: str, max_rows: int, recent: int) -> tuple[_Database, list[Row]]:
    database = _Database(path, max_rows)
    return database, database.newest(recent)

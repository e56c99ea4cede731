# -*- test-case-name: tests.test_reload -*-
"""
Reloading the configuration file: on SIGHUP, and with ``--watch-config`` when the file changes.

The new file is loaded and validated in full before anything changes; a file that fails is logged
with the same one-line message a failed start shows, and the configuration in force stays. A valid
one is handed to `Supervisor.reload`, which keeps unchanged models running and lets replaced
ones finish their requests. Models the new file preloads (``hooks.on_startup.preload``) that the
running config did not, or whose process the reload replaced, are then preloaded as at start-up.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Mapping
from typing import Any

from twisted.application.service import Service
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.task import LoopingCall

from swapproxy.config import Config, ConfigError, load_config
from swapproxy.logs import proxy_logger, set_log_level
from swapproxy.reactors import IThreadClock
from swapproxy.supervisor import ReloadResult, ShuttingDown, Supervisor

log = proxy_logger("swapproxy.reload")

#: Seconds between two looks at the config file with ``--watch-config`` (as llama-swap).
WATCH_INTERVAL = 2.0


def file_signature(path: str) -> tuple[int, int] | None:
    """
    The file's modification time (ns) and size, or ``None`` if it cannot be read.
    """
    try:
        status = os.stat(path)
    except OSError:
        return None
    return status.st_mtime_ns, status.st_size


class ConfigReloader(Service):
    """
    Reloads ``path`` into ``supervisor`` on request, on SIGHUP, and when the file changes.

    Requests that arrive together (a burst of signals, a signal and a file change) are coalesced
    into one reload on the next reactor turn. A reload is applied at once: a process it replaces
    finishes its requests in the background, and a later reload does not wait for it.

    :param path: the configuration file.
    :param supervisor: where a valid configuration goes.
    :param reactor: provides ``callLater``; and ``callFromThread`` when ``handle_sighup``.
    :param watch_interval: seconds between checks of the file's mtime and size; ``None`` does not
        watch it.
    :param handle_sighup: install a SIGHUP handler while the service runs.
    :param environ: where ``${env.NAME}`` is looked up (``os.environ`` by default).
    :param load: reads and validates the file; `load_config` by default.
    """

    name = "config-reloader"

    def __init__(
        self,
        path: str,
        supervisor: Supervisor,
        reactor: IThreadClock,
        watch_interval: float | None = None,
        handle_sighup: bool = True,
        environ: Mapping[str, str] | None = None,
        load: Callable[[str, Mapping[str, str] | None], Config] = load_config,
    ) -> None:
        self.path = path
        self._supervisor = supervisor
        self._reactor = reactor
        self._watch_interval = watch_interval
        self._handle_sighup = handle_sighup
        self._environ = environ
        self._load = load
        self._pending: IDelayedCall | None = None
        self._reasons: list[str] = []
        self._watch: LoopingCall | None = None
        self._signature = file_signature(path)
        #: Whether the watch found the file missing (and said so).
        self._missing = False
        self._previous_handler: Any = None
        #: How many reloads were applied and how many were rejected.
        self.applied = 0
        self.rejected = 0

    def startService(self) -> None:
        super().startService()
        self._signature = file_signature(self.path)
        if self._handle_sighup:
            self._previous_handler = signal.signal(signal.SIGHUP, self._on_sighup)
        if self._watch_interval is not None:
            self._watch = LoopingCall(self._check_file)
            self._watch.clock = self._reactor
            self._watch.start(self._watch_interval, now=False)
            log.info(
                "watching {path} for changes every {interval:g}s", path=self.path, interval=self._watch_interval
            )

    def stopService(self) -> None:
        super().stopService()
        if self._handle_sighup:
            signal.signal(signal.SIGHUP, self._previous_handler or signal.SIG_DFL)
            self._previous_handler = None
        if self._watch is not None and self._watch.running:
            self._watch.stop()
        self._watch = None
        if self._pending is not None and self._pending.active():
            self._pending.cancel()
        self._pending = None

    def _on_sighup(self, signum: int, frame: Any) -> None:
        # A signal handler runs between two bytecodes of whatever the main thread was doing:
        # only hand the work to the reactor (callFromThread also wakes it up).
        self._reactor.callFromThread(self.request_reload, "SIGHUP")

    def _check_file(self) -> None:
        signature = file_signature(self.path)
        if signature is None:
            # Most likely being replaced: wait for the new one, and say so once.
            if not self._missing:
                self._missing = True
                log.warn("{path} cannot be read (deleted or being replaced?); the running config stays in"
                         " force, and the file is read again once it is back", path=self.path)
            return
        if self._missing:
            self._missing = False
            log.info("{path} is back", path=self.path)
        if signature == self._signature:
            return
        self._signature = signature
        self.request_reload("the file changed")

    def request_reload(self, reason: str) -> None:
        """
        Reload on the next reactor turn; requests until then share that one reload.
        """
        if reason not in self._reasons:
            self._reasons.append(reason)
        if self._pending is None or not self._pending.active():
            self._pending = self._reactor.callLater(0, self._run_pending)

    def _run_pending(self) -> None:
        self._pending = None
        reasons, self._reasons = self._reasons, []
        try:
            self.reload(" and ".join(reasons))
        except Exception:
            log.failure("reloading {path} failed", path=self.path)

    def reload(self, reason: str = "requested") -> ReloadResult | None:
        """
        Load and validate the file now and, if it is valid, apply it.

        :returns: what changed, or ``None`` when the file was rejected (the old config stays).
        """
        self._signature = file_signature(self.path)
        log.info("reloading {path} ({reason})", path=self.path, reason=reason)
        try:
            config = self._load(self.path, self._environ)
        except ConfigError as e:
            self.rejected += 1
            log.error("config reload rejected, the running config stays in force: {error}", error=str(e))
            return None
        preloaded = self._supervisor.config.preload
        try:
            result = self._supervisor.reload(config)
        except ShuttingDown:
            log.info("not reloading {path}: swapproxy is shutting down", path=self.path)
            return None
        self.applied += 1
        set_log_level(config.log_level)
        for warning in config.warnings:
            log.warn("{config_warning}", config_warning=warning)
        log.info(
            "config reloaded: {summary}",
            summary=describe(result),
            added=result.added,
            changed=result.changed,
            removed=result.removed,
            updated=result.updated,
        )
        self._supervisor.preload(
            [model_id for model_id in config.preload if model_id not in preloaded or model_id in result.changed]
        )
        return result


def describe(result: ReloadResult) -> str:
    """
    One line saying what a reload did.
    """
    parts = []
    for label, ids in (
        ("added", result.added),
        ("replaced", result.changed),
        ("removed", result.removed),
        ("updated in place", result.updated),
    ):
        if ids:
            parts.append(f"{label}: {', '.join(ids)}")
    if not parts:
        return f"no model changed ({len(result.unchanged)} unchanged)"
    if result.unchanged:
        parts.append(f"unchanged: {len(result.unchanged)}")
    return "; ".join(parts)

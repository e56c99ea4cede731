# -*- test-case-name: tests.test_tap -*-
"""
``twistd swapproxy``: command-line options and the service tree.

This is the only module that touches the global reactor.

What a user reads when something is wrong is one line: a config error or an endpoint that cannot
be listened on stops twistd with that line and exit status 1 (`Options.postOptions`,
`Listener`), never a usage text or a traceback. A clean stop on SIGTERM exits 0 (`SwapproxyService`).
"""

from __future__ import annotations

import os
import signal
import sys
from typing import TYPE_CHECKING, Any, cast

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import IService, MultiService
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.error import CannotListenError, ReactorNotRunning
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.python import usage

from swapproxy import __version__
from swapproxy.config import Config, ConfigError, load_config
from swapproxy.logs import log_sink, proxy_logger, set_log_level

if TYPE_CHECKING:
    from swapproxy.reactors import ISwapproxyReactor

# The rest of swapproxy, and Twisted's endpoints, are imported by makeService: they import
# Twisted's TCP module, which loads pyOpenSSL if it is installed, and Options.postOptions decides
# first whether that is needed (`leave_out_tls`).

DEFAULT_LISTEN = "tcp:8080"

log = proxy_logger("swapproxy.tap")


class Options(usage.Options):
    """
    ``twistd swapproxy --config FILE [--listen ENDPOINT ...]``.
    """

    synopsis = "[-c config.yaml] [-l tcp:8080 ...]"
    longdesc = (
        "Serve one OpenAI-compatible endpoint that starts the model a request names, stops the "
        "others and unloads idle ones. The config file uses llama-swap's format."
    )
    optParameters = [
        ["config", "c", "config.yaml", "The llama-swap style YAML configuration file."],
        ["state-dir", None, None, "Where swapproxy keeps its small state files "
         "(default: $XDG_STATE_HOME/swapproxy or ~/.local/state/swapproxy)."],
    ]
    optFlags = [
        ["watch-config", None, "Reload the config file when it changes (its mtime and size are "
         "checked every 2 s). SIGHUP always reloads it."],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []
        self.loaded: Config | None = None

    def opt_listen(self, endpoint: str) -> None:
        """
        Listen on this Twisted server endpoint (default tcp:8080); may be given more than once.
        """
        self["listen"].append(endpoint)

    opt_l = opt_listen

    def opt_version(self) -> None:
        """
        Print swapproxy's version and exit.
        """
        sys.stdout.write(f"swapproxy {__version__}\n")
        sys.exit(0)

    def postOptions(self) -> None:
        """
        Load and check the config now, before anything starts.

        :raises SystemExit: with the one line that names the file, the key and the problem (exit
            status 1; not a usage error, after which twistd prints its whole usage text first).
        """
        if not self["listen"]:
            self["listen"] = [DEFAULT_LISTEN]
        try:
            self.loaded = load_config(self["config"])
        except ConfigError as e:
            raise SystemExit(str(e)) from None
        proxies = [model.proxy for model in self.loaded.models.values()]
        leave_out_tls(self["listen"], proxies + [peer.proxy for peer in self.loaded.peers.values()])


def leave_out_tls(listen: list[str], proxies: Any) -> bool:
    """
    Keep pyOpenSSL from being loaded when nothing needs TLS: no ``ssl:``/``tls:`` endpoint to
    listen on, no ``https://`` model. Twisted's TCP module loads pyOpenSSL (and ``cryptography``)
    whenever it is installed: 16 MB of memory, a quarter of swapproxy's.

    This works only before Twisted's TCP module is imported (in ``twistd``, while options are
    parsed); after, it does nothing. A model with an ``https://`` proxy that a reload adds then
    needs a restart of swapproxy.

    :param proxies: the URLs of the models and peers.
    :returns: whether TLS was left out.
    """
    wants_tls = any(endpoint.split(":", 1)[0].lower() in ("ssl", "tls") for endpoint in listen) or any(
        proxy.lower().startswith("https:") for proxy in proxies
    )
    if wants_tls or "twisted.internet.tcp" in sys.modules or "OpenSSL" in sys.modules:
        return False
    # Importing a module that is None in sys.modules raises ImportError: Twisted then does
    # without TLS, as when pyOpenSSL is not installed.
    sys.modules["OpenSSL"] = None  # type: ignore[assignment]
    return True


def server_endpoint(reactor: ISwapproxyReactor, description: str) -> IStreamServerEndpoint:
    """
    The endpoint of one ``--listen``.

    :raises SystemExit: with one line naming it and the problem, when it is not an endpoint.
    """
    from twisted.internet.endpoints import serverFromString

    try:
        endpoint: IStreamServerEndpoint = serverFromString(reactor, description)
        return endpoint
    except Exception as e:
        raise SystemExit(f"--listen {description}: not a usable endpoint: {e}") from None


class Listener(StreamServerEndpointService):
    """
    One ``--listen`` endpoint; one that cannot be listened on stops twistd with one line naming the
    endpoint and the cause (exit status 1), before any model starts.
    """

    def __init__(self, description: str, endpoint: IStreamServerEndpoint, factory: Any) -> None:
        super().__init__(endpoint, factory)
        # Imported here, as the rest of swapproxy is: it imports Twisted's TCP module.
        from swapproxy.twistedinternals import raise_listen_errors

        # As strports.service does: a failure to listen is raised by privilegedStartService.
        raise_listen_errors(self)
        self.description = description

    def privilegedStartService(self) -> None:
        try:
            super().privilegedStartService()
        except CannotListenError as e:
            cause = e.socketError
            text = getattr(cause, "strerror", None) or str(cause)
            raise SystemExit(f"cannot listen on {self.description}: {text}") from None


class SwapproxyService(MultiService):
    """
    The whole of swapproxy: its parts start in order and stop one after another in reverse order,
    each once the one after it has stopped, so that the log routing (the first part) still holds
    while the models stop.

    While it runs, SIGTERM stops the reactor as SIGINT does, but twistd then exits with status 0
    (a clean stop) rather than killing itself with the signal (status 143, which supervisord and
    systemd count as a failure).

    :param reactor: the reactor twistd runs (``callWhenRunning``, ``callFromThread``, ``stop``).
    """

    def __init__(self, reactor: ISwapproxyReactor) -> None:
        super().__init__()
        self._reactor = reactor
        self._previous_sigterm: Any = None

    def startService(self) -> None:
        super().startService()
        # After the reactor has installed its own handlers, which it does as it starts running.
        self._reactor.callWhenRunning(self._take_sigterm)

    def _take_sigterm(self) -> None:
        if self.running:
            self._previous_sigterm = signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        # Between two bytecodes of whatever the main thread was doing: hand over to the reactor.
        self._reactor.callFromThread(self._stop_reactor)

    def _stop_reactor(self) -> None:
        log.info("received SIGTERM: stopping every model, then exiting")
        try:
            self._reactor.stop()
        except ReactorNotRunning:
            pass  # already stopping

    def stopService(self) -> Deferred[None]:
        # Service's, not MultiService's: that one would stop every part at the same moment.
        super(MultiService, self).stopService()
        return Deferred.fromCoroutine(self._stop_children())

    async def _stop_children(self) -> None:
        for service in reversed(list(self)):
            try:
                await maybeDeferred(service.stopService)
            except Exception:
                log.failure("stopping {service!r}", service=service)
        if self._previous_sigterm is not None:
            signal.signal(signal.SIGTERM, self._previous_sigterm)
            self._previous_sigterm = None


def makeService(options: Options, reactor: ISwapproxyReactor | None = None) -> IService:
    """
    The swapproxy service: the model supervisor and one HTTP server per ``--listen``.

    The configuration was loaded and checked in `Options.postOptions`, before anything starts.
    Model processes that an earlier swapproxy with the same state directory left behind (it was
    killed with SIGKILL) are stopped here, before anything serves; this blocks for up to
    ``unloadTimeout`` seconds when there are any. What is logged here is in ``/logs`` too.
    """
    from swapproxy.children import STATE_FILE, ChildRecord
    from swapproxy.logbuffer import LogHistory, LogRouting
    from swapproxy.metrics import Metrics
    from swapproxy.peers import PeerSet
    from swapproxy.progress import LoadHistory
    from swapproxy.reload import WATCH_INTERVAL, ConfigReloader
    from swapproxy.requestlog import log_requests
    from swapproxy.slotcache import SLOTS_DIR, SlotCache
    from swapproxy.statefile import default_state_dir
    from swapproxy.store import DEFAULT_FILE, ActivityStore
    from swapproxy.supervisor import Supervisor
    from swapproxy.web.root import build_site

    if reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = cast("ISwapproxyReactor", global_reactor)
    config = options.loaded if options.loaded is not None else load_config(options["config"])
    endpoints = [(description, server_endpoint(reactor, description)) for description in options["listen"]]
    set_log_level(config.log_level)
    root = SwapproxyService(reactor)
    supervisor = Supervisor(config, reactor)
    # It reads the supervisor's config at each event, so that a reload takes effect.
    logs = LogHistory(lambda: supervisor.config.log_time_format)
    with log_sink(logs):
        for warning in config.warnings:
            # Not "warning=": legacy observers (trial's among them) read that key as a Python warning.
            log.warn("{config_warning}", config_warning=warning)
        for notice in config.notices:
            log.info("{config_notice}", config_notice=notice)
        # First in, last out: the log history and logToStdout apply from the first start to the
        # last stop.
        LogRouting(logs, lambda: supervisor.config.log_to_stdout).setServiceParent(root)
        state_dir = options["state-dir"] or default_state_dir()
        # Before the supervisor: it stops after it, once the slots saved by the last stops are recorded.
        slot_cache = SlotCache(lambda: supervisor.config.slot_cache, reactor, os.path.join(state_dir, SLOTS_DIR))
        slot_cache.setServiceParent(root)
        supervisor.setServiceParent(root)
        supervisor.each_upstream(slot_cache.follow)
        children = ChildRecord(os.path.join(state_dir, STATE_FILE))
        children.clean_up(grace=config.unload_timeout)
        supervisor.each_upstream(children.follow)
        ConfigReloader(
            options["config"],
            supervisor,
            reactor,
            watch_interval=WATCH_INTERVAL if options["watch-config"] else None,
        ).setServiceParent(root)
        history = LoadHistory(os.path.join(state_dir, "load-times.json"))
        metrics = Metrics(supervisor, reactor)
        slot_cache.export(metrics.registry)
        log_requests(metrics)
        peers = PeerSet(lambda: supervisor.config, reactor)
        peers.setServiceParent(root)
        supervisor.change_observers.append(peers.forget_removed)
        # Before the listeners: it stops after them, once the last requests are written.
        activity = ActivityStore(
            config.store_path or os.path.join(state_dir, DEFAULT_FILE),
            reactor,
            lambda: supervisor.config.store_max_rows,
        )
        activity.setServiceParent(root)
        site = build_site(supervisor, reactor, history, logs=logs, metrics=metrics, activity=activity, peers=peers)
        for description, endpoint in endpoints:
            Listener(description, endpoint, site).setServiceParent(root)
        count = len(config.models)
        log.info(
            "swapproxy {version}: {count} {models} from {source}",
            version=__version__,
            count=count,
            models="model" if count == 1 else "models",
            source=config.source,
        )
    return root

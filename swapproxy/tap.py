# -*- test-case-name: tests.test_tap -*-
"""
``twistd swapproxy``: command-line options and the service tree.

This is the only module that touches the global reactor.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from twisted.application import strports
from twisted.application.service import IService, MultiService
from twisted.python import usage

from swapproxy import __version__
from swapproxy.children import STATE_FILE, ChildRecord
from swapproxy.config import Config, ConfigError, load_config
from swapproxy.logbuffer import LogHistory, LogRouting
from swapproxy.logs import proxy_logger, set_log_level
from swapproxy.metrics import Metrics
from swapproxy.progress import LoadHistory
from swapproxy.reload import WATCH_INTERVAL, ConfigReloader
from swapproxy.statefile import default_state_dir
from swapproxy.store import DEFAULT_FILE, ActivityStore
from swapproxy.supervisor import Supervisor
from swapproxy.web.root import build_site

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
        if not self["listen"]:
            self["listen"] = [DEFAULT_LISTEN]
        try:
            self.loaded = load_config(self["config"])
        except ConfigError as e:
            raise usage.UsageError(str(e)) from None


def makeService(options: Options, reactor: Any = None) -> IService:
    """
    The swapproxy service: the model supervisor and one HTTP server per ``--listen``.

    The configuration was loaded and checked in `Options.postOptions`, before anything starts.
    Model processes that an earlier swapproxy with the same state directory left behind (it was
    killed with SIGKILL) are stopped here, before anything serves; this blocks for up to
    ``unloadTimeout`` seconds when there are any.
    """
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = global_reactor
    config = options.loaded if options.loaded is not None else load_config(options["config"])
    set_log_level(config.log_level)
    for warning in config.warnings:
        # Not "warning=": legacy observers (trial's among them) read that key as a Python warning.
        log.warn("{config_warning}", config_warning=warning)
    root = MultiService()
    # First in, last out: the log history and logToStdout apply from the first start to the last
    # stop. They read the supervisor's config at each event, so that a reload takes effect.
    logs = LogHistory(lambda: supervisor.config.log_time_format)
    LogRouting(logs, lambda: supervisor.config.log_to_stdout).setServiceParent(root)
    supervisor = Supervisor(config, reactor)
    supervisor.setServiceParent(root)
    state_dir = options["state-dir"] or default_state_dir()
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
    # Before the listeners: it stops after them, once the last requests are written.
    activity = ActivityStore(
        config.store_path or os.path.join(state_dir, DEFAULT_FILE), reactor, lambda: supervisor.config.store_max_rows
    )
    activity.setServiceParent(root)
    site = build_site(
        supervisor, reactor, history, logs=logs, metrics=Metrics(supervisor, reactor), activity=activity
    )
    for endpoint in options["listen"]:
        strports.service(endpoint, site, reactor=reactor).setServiceParent(root)
    log.info(
        "swapproxy {version}: {count} models from {source}",
        version=__version__,
        count=len(config.models),
        source=config.source,
    )
    return root

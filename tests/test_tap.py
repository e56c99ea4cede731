"""
Tests for L{swapproxy.tap} and the twistd plugin: the command line a user types.
"""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import IService, IServiceMaker, MultiService, Service
from twisted.internet.defer import Deferred
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import LogLevel, capturedLogs, formatEvent
from twisted.plugin import getPlugins
from twisted.trial.unittest import SynchronousTestCase

from swapproxy import __version__, tap
from swapproxy.logbuffer import LogRouting
from swapproxy.logs import set_log_level
from swapproxy.peers import PeerSet
from swapproxy.reload import ConfigReloader
from swapproxy.slotcache import SlotCache
from swapproxy.store import ActivityStore
from swapproxy.supervisor import Supervisor
from swapproxy.testing.local import TWISTD
from tests.support.live import ConfigFileMixin
from tests.support.reactors import ThreadedMemoryReactor

GOOD = """
    models:
      qwen:
        cmd: llama-server --port ${PORT} -m qwen.gguf
        aliases: [smart]
      llama:
        cmd: llama-server --port ${PORT} -m llama.gguf
"""

BAD = """
    models:
      qwen:
        cmd: llama-server --port ${PORT}
        ttl: ten
"""


class OptionsTests(ConfigFileMixin, SynchronousTestCase):
    """
    C{twistd swapproxy} options.
    """

    def test_defaults(self) -> None:
        """
        With only a config, swapproxy listens on tcp:8080; the config is loaded and checked.
        """
        path = self.write_config(GOOD)
        options = tap.Options()
        options.parseOptions(["-c", path])
        self.assertEqual(options["config"], path)
        self.assertEqual(options["listen"], ["tcp:8080"])
        self.assertIsNotNone(options.loaded)
        self.assertEqual(sorted(options.loaded.models), ["llama", "qwen"])

    def test_long_and_short_forms(self) -> None:
        """
        --config / -c and --listen / -l; --listen may be given more than once, in order.
        """
        path = self.write_config(GOOD)
        options = tap.Options()
        options.parseOptions(
            ["--config", path, "--listen", "tcp:9000:interface=127.0.0.1", "-l", "unix:/tmp/swapproxy.sock"]
        )
        self.assertEqual(options["config"], path)
        self.assertEqual(options["listen"], ["tcp:9000:interface=127.0.0.1", "unix:/tmp/swapproxy.sock"])

    def test_bad_config(self) -> None:
        """
        A config error ends the program with one line naming the file, the key path and the
        problem (Python prints a string exit code on stderr and exits 1).
        """
        path = self.write_config(BAD)
        with self.assertRaises(SystemExit) as raised:
            tap.Options().parseOptions(["-c", path])
        self.assertEqual(raised.exception.code, f'{path}: models.qwen.ttl: must be an integer >= 0, got "ten"')

    def test_missing_config(self) -> None:
        """
        A config file that does not exist ends the program with one line naming it.
        """
        path = os.path.abspath(os.path.join(self.mktemp(), "nope.yaml"))
        with self.assertRaises(SystemExit) as raised:
            tap.Options().parseOptions(["--config", path])
        self.assertIn(path, raised.exception.code)
        self.assertIn("cannot read", raised.exception.code)

    def test_version(self) -> None:
        """
        --version prints the version and exits with status 0, whatever else is on the line.
        """
        out = io.StringIO()
        self.patch(sys, "stdout", out)
        with self.assertRaises(SystemExit) as raised:
            tap.Options().parseOptions(["--version", "-c", "/does/not/exist.yaml"])
        self.assertIn(raised.exception.code, (0, None))
        self.assertEqual(out.getvalue(), f"swapproxy {__version__}\n")


class MakeServiceTests(ConfigFileMixin, SynchronousTestCase):
    """
    The service tree C{makeService} builds.
    """

    def setUp(self) -> None:
        self.addCleanup(set_log_level, "info")
        self.reactor = ThreadedMemoryReactor()
        self.state_dir = self.mktemp()

    def make(self, config_text: str, *listen: str) -> MultiService:
        options = tap.Options()
        args = ["-c", self.write_config(config_text), "--state-dir", self.state_dir]
        for endpoint in listen:
            args += ["-l", endpoint]
        options.parseOptions(args)
        service = tap.makeService(options, self.reactor)
        self.assertIsInstance(service, MultiService)
        return service

    def test_services(self) -> None:
        """
        The log routing first, the slot cache, one supervisor (after the slot cache, so that it
        stops first), one config reloader, the peers (whose connections are closed before the
        supervisor stops), the activity store and one listening service per --listen.
        """
        service = self.make(GOOD, "tcp:9001", "tcp:9002:interface=127.0.0.1")
        children = list(service)
        supervisors = [c for c in children if isinstance(c, Supervisor)]
        servers = [c for c in children if isinstance(c, StreamServerEndpointService)]
        reloaders = [c for c in children if isinstance(c, ConfigReloader)]
        self.assertEqual(len(supervisors), 1)
        self.assertEqual(len(servers), 2)
        self.assertEqual(len(reloaders), 1)
        self.assertIsInstance(children[0], LogRouting)
        self.assertIsInstance(children[1], SlotCache)
        self.assertIs(children[2], supervisors[0])
        self.assertEqual(len([c for c in children if isinstance(c, ActivityStore)]), 1)
        peers = [i for i, c in enumerate(children) if isinstance(c, PeerSet)]
        self.assertEqual(peers, [children.index(supervisors[0]) + 2])
        self.assertEqual(len(children), 8)
        self.assertEqual(sorted(supervisors[0].config.models), ["llama", "qwen"])
        for child in children:
            self.assertTrue(IService.providedBy(child))

    def test_default_listen(self) -> None:
        service = self.make(GOOD)
        service.startService()
        self.reactor.run_from_threads()  # the activity database is open
        self.addCleanup(self.reactor.stop_service, service)
        self.assertEqual([port for port, *_ in self.reactor.tcpServers], [8080])

    def test_listening_serves_swapproxy(self) -> None:
        """
        Started, the service listens where asked and answers swapproxy's routes there; no model
        is started until a request needs it.
        """
        service = self.make(GOOD, "tcp:9001", "tcp:9002:interface=127.0.0.1")
        service.startService()
        self.reactor.run_from_threads()  # the activity database is open
        ports = [(port, interface) for port, _, _, interface in self.reactor.tcpServers]
        self.assertEqual(ports, [(9001, ""), (9002, "127.0.0.1")])
        for _, factory, _, _ in self.reactor.tcpServers:
            address = IPv4Address("TCP", "127.0.0.1", 40000)
            protocol = factory.buildProtocol(address)
            transport = StringTransport(peerAddress=address)
            protocol.makeConnection(transport)
            protocol.dataReceived(b"GET /v1/models HTTP/1.1\r\nHost: localhost\r\n\r\n")
            response = transport.value()
            self.assertTrue(response.startswith(b"HTTP/1.1 200 "), response)
            self.assertIn(b'"id": "llama"', response)
        supervisor = next(c for c in service if isinstance(c, Supervisor))
        self.assertEqual(supervisor.running_upstreams(), [])
        self.reactor.stop_service(service)

    def test_unsupported_keys_warned(self) -> None:
        """
        Keys swapproxy does not support are named in one warning, and do not stop it.
        """
        with capturedLogs() as events:
            self.make(GOOD + "    newerFeature: true\n")
        warnings = [e for e in events if e.get("log_level") == LogLevel.warn and "newerFeature" in str(e)]
        self.assertEqual(len(warnings), 1)

    def test_start_up_line_counts_models(self) -> None:
        """
        The start-up line says how many models there are, in words that fit the number.
        """
        one = "models:\n  qwen:\n    cmd: llama-server --port ${PORT}\n"
        for text, expected in ((one, "1 model from"), (GOOD, "2 models from")):
            with capturedLogs() as events:
                self.make(text)
            (line,) = [formatEvent(e) for e in events if e.get("log_namespace") == "swapproxy.tap"]
            self.assertIn(expected, line)

    def test_watch_config(self) -> None:
        """
        --watch-config checks the config file every 2 s while the service runs; without it
        nothing is polled. Either way SIGHUP reloads while the service runs.
        """
        for flag, polls in (([], 0), (["--watch-config"], 1)):
            options = tap.Options()
            options.parseOptions(["-c", self.write_config(GOOD), "--state-dir", self.state_dir, *flag])
            reactor = ThreadedMemoryReactor()
            service = tap.makeService(options, reactor)
            before = signal.getsignal(signal.SIGHUP)
            service.startService()
            reactor.run_from_threads()  # the activity database is open
            self.assertNotEqual(signal.getsignal(signal.SIGHUP), before)
            self.assertEqual([call.getTime() for call in reactor.getDelayedCalls()], [2.0] * polls)
            reactor.stop_service(service)
            self.assertEqual(signal.getsignal(signal.SIGHUP), before)

    def test_state_file_names_this_process(self) -> None:
        """
        makeService takes over the state file of running models (cleaning up after an earlier
        run first).
        """
        self.make(GOOD)
        with open(os.path.join(self.state_dir, "children.json"), encoding="utf-8") as f:
            state = json.load(f)
        self.assertEqual((state["owner"]["pid"], state["children"]), (os.getpid(), []))


class SignalReactor(MemoryReactorClock):
    """
    A memory reactor that takes calls "from a thread" (a signal handler) on its clock, and runs
    its ``callWhenRunning`` hooks when told.
    """

    def callFromThread(self, f: Any, *args: Any, **kwargs: Any) -> None:
        self.callLater(0, f, *args, **kwargs)

    def run_hooks(self) -> None:
        """
        Run what was given to ``callWhenRunning``, as the reactor does once it runs.
        """
        self.running = True
        for f, args, kwargs in self.whenRunningHooks:
            f(*args, **kwargs)


class Part(Service):
    """
    A part of the service tree that records when it is told to stop; the test ends the stop.
    """

    def __init__(self, name: str, stops: list[str]) -> None:
        self.name = name
        self._stops = stops
        self.stopped: Deferred[None] = Deferred()

    def stopService(self) -> Deferred[None]:
        super().stopService()
        self._stops.append(self.name)
        return self.stopped


class SwapproxyServiceTests(SynchronousTestCase):
    """
    The root of the service tree: stop order and SIGTERM.
    """

    def test_parts_stop_one_after_another_in_reverse_order(self) -> None:
        """
        The last part stops first, and each part only once the one after it has stopped: the
        log routing (the first part) holds until the models (the supervisor) are gone.
        """
        stops: list[str] = []
        root = tap.SwapproxyService(SignalReactor())
        parts = [Part(name, stops) for name in ("logs", "supervisor", "listener")]
        for part in parts:
            part.setServiceParent(root)
        root.startService()
        stopped = root.stopService()
        self.assertEqual(stops, ["listener"])
        parts[2].stopped.callback(None)
        self.assertEqual(stops, ["listener", "supervisor"])
        self.assertNoResult(stopped)
        parts[1].stopped.callback(None)
        self.assertEqual(stops, ["listener", "supervisor", "logs"])
        parts[0].stopped.callback(None)
        self.successResultOf(stopped)

    def test_a_part_that_fails_to_stop_does_not_keep_the_others_running(self) -> None:
        stops: list[str] = []
        root = tap.SwapproxyService(SignalReactor())
        first, second = Part("first", stops), Part("second", stops)
        first.setServiceParent(root)
        second.setServiceParent(root)
        root.startService()
        stopped = root.stopService()
        second.stopped.errback(RuntimeError("stuck"))
        first.stopped.callback(None)
        self.successResultOf(stopped)
        self.assertEqual(stops, ["second", "first"])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_sigterm_stops_the_reactor_and_is_given_back(self) -> None:
        """
        Once the reactor runs, SIGTERM stops it through swapproxy's own handler (so that twistd
        exits 0 rather than with the signal); after the stop the previous handler is back.
        """
        before = signal.getsignal(signal.SIGTERM)
        reactor = SignalReactor()
        root = tap.SwapproxyService(reactor)
        root.startService()
        self.assertIs(signal.getsignal(signal.SIGTERM), before, "not before the reactor runs")
        reactor.run_hooks()
        handler = signal.getsignal(signal.SIGTERM)
        self.assertIsNot(handler, before)
        assert callable(handler)
        with capturedLogs() as events:
            handler(signal.SIGTERM, None)
            reactor.advance(0)
            handler(signal.SIGTERM, None)  # a second one while stopping changes nothing
            reactor.advance(0)
        self.assertTrue(reactor.hasStopped)
        self.assertEqual(len([e for e in events if "received SIGTERM" in e.get("log_format", "")]), 2)
        self.successResultOf(root.stopService())
        self.assertIs(signal.getsignal(signal.SIGTERM), before)


class PluginTests(SynchronousTestCase):
    """
    twistd finds swapproxy.
    """

    def test_discoverable(self) -> None:
        """
        The swapproxy service maker is among twistd's plugins and uses L{swapproxy.tap}.
        """
        makers = [p for p in getPlugins(IServiceMaker) if p.tapname == "swapproxy"]
        self.assertEqual(len(makers), 1)
        self.assertIs(makers[0].options, tap.Options)
        self.assertIs(makers[0].makeService, tap.makeService)
        self.assertTrue(makers[0].description)


class TwistdTests(ConfigFileMixin, SynchronousTestCase):
    """
    The real C{twistd} command line, in a child process.
    """

    def twistd(self, *args: str) -> subprocess.CompletedProcess[str]:
        cwd = self.mktemp()
        os.makedirs(cwd)
        env = dict(os.environ, XDG_STATE_HOME=os.path.abspath(cwd))
        return subprocess.run(
            [TWISTD, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
        )

    def test_bad_config_stops_startup(self) -> None:
        """
        A bad config makes twistd exit 1 with the config error as its only output (no usage
        text), before it binds the port: with the port already taken, nothing complains about it.
        """
        path = self.write_config(BAD)
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen(1)
            port = taken.getsockname()[1]
            result = self.twistd("-n", "--pidfile=", "swapproxy", "-c", path, "-l", f"tcp:{port}:interface=127.0.0.1")
        self.assertEqual(result.returncode, 1, result.stdout + result.stderr)
        self.assertEqual(result.stdout, "")
        self.assertEqual(result.stderr, f'{path}: models.qwen.ttl: must be an integer >= 0, got "ten"\n')

    def test_port_in_use(self) -> None:
        """
        An address already in use stops twistd with exit status 1 and one line that names the
        endpoint and the cause, not a traceback.
        """
        path = self.write_config(GOOD)
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen(1)
            endpoint = f"tcp:{taken.getsockname()[1]}:interface=127.0.0.1"
            result = self.twistd("-n", "--pidfile=", "swapproxy", "-c", path, "-l", endpoint)
        output = result.stdout + result.stderr
        self.assertEqual(result.returncode, 1, output)
        # twistd has started logging by then, and logs what is written on stderr.
        errors = [line for line in output.splitlines() if "error]" in line]
        self.assertEqual(len(errors), 1, output)
        self.assertTrue(errors[0].endswith(f" cannot listen on {endpoint}: Address already in use"), output)
        self.assertNotIn("Traceback", output)
        self.assertNotIn("starting model", output)

    def test_unusable_endpoint(self) -> None:
        """
        A ``--listen`` that is no endpoint is named in one line, exit status 1.
        """
        result = self.twistd("-n", "--pidfile=", "swapproxy", "-c", self.write_config(GOOD), "-l", "tcp:eighty")
        self.assertEqual(result.returncode, 1, result.stdout + result.stderr)
        self.assertEqual(result.stderr.splitlines(), ["--listen tcp:eighty: not a usable endpoint: "
                                                      "invalid literal for int() with base 10: 'eighty'"])

    def test_version(self) -> None:
        """
        C{twistd swapproxy --version} prints the version and exits 0.
        """
        result = self.twistd("swapproxy", "--version")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(result.stdout, f"swapproxy {__version__}\n")

    def test_help_lists_swapproxy(self) -> None:
        result = self.twistd("--help")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("swapproxy", result.stdout)


class TLSTests(SynchronousTestCase):
    """
    pyOpenSSL (16 MB of memory) is loaded only when something needs TLS. Each check runs in a
    fresh interpreter: in this one, Twisted's TCP module was loaded long ago.
    """

    def services_loaded(self, config: str, *listen: str) -> bool:
        """
        Whether pyOpenSSL is loaded once ``twistd swapproxy`` would have built its service.
        """
        path = os.path.join(self.mktemp() + ".yaml")
        with open(path, "w", encoding="utf-8") as f:
            f.write(textwrap.dedent(config))
        args = ["-c", path] + [arg for endpoint in listen for arg in ("-l", endpoint)]
        script = (
            "import sys\n"
            "from swapproxy import tap\n"
            f"options = tap.Options(); options.parseOptions({args!r})\n"
            "import twisted.internet.tcp\n"
            "print(sys.modules.get('OpenSSL') is not None)\n"
        )
        result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                                env=dict(os.environ, SWAPPROXY_STATE_DIR=self.mktemp()))
        self.assertEqual(result.returncode, 0, result.stderr)
        return result.stdout.strip() == "True"

    def test_left_out_without_tls(self) -> None:
        self.assertFalse(self.services_loaded("models:\n  a:\n    cmd: llama-server --port ${PORT}\n",
                                              "tcp:0:interface=127.0.0.1"))

    def test_kept_for_a_tls_endpoint(self) -> None:
        self.assertTrue(self.services_loaded("models:\n  a:\n    cmd: llama-server --port ${PORT}\n",
                                             "tcp:0", "ssl:8443:privateKey=key.pem"))

    def test_kept_for_an_https_model(self) -> None:
        self.assertTrue(self.services_loaded(
            "models:\n  a:\n    cmd: llama-server --port ${PORT}\n    proxy: https://127.0.0.1:${PORT}\n"))

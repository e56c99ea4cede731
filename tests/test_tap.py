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

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import IService, IServiceMaker, MultiService
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.logger import LogLevel, capturedLogs
from twisted.plugin import getPlugins
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from swapproxy import __version__, tap
from swapproxy.logbuffer import LogRouting
from swapproxy.logs import set_log_level
from swapproxy.reload import ConfigReloader
from swapproxy.store import ActivityStore
from swapproxy.supervisor import Supervisor
from tests.fakes import ThreadedMemoryReactor
from tests.helpers import TWISTD

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


class ConfigFileMixin:
    def write_config(self, text: str, name: str = "config.yaml") -> str:
        directory = self.mktemp()  # type: ignore[attr-defined]
        os.makedirs(directory)
        path = os.path.abspath(os.path.join(directory, name))
        with open(path, "w", encoding="utf-8") as f:
            f.write(textwrap.dedent(text))
        return path


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
        A config error is a usage error naming the file, the key path and the problem.
        """
        path = self.write_config(BAD)
        with self.assertRaises(usage.UsageError) as raised:
            tap.Options().parseOptions(["-c", path])
        self.assertEqual(str(raised.exception), f'{path}: models.qwen.ttl: must be an integer >= 0, got "ten"')

    def test_missing_config(self) -> None:
        """
        A config file that does not exist is a usage error naming it.
        """
        path = os.path.abspath(os.path.join(self.mktemp(), "nope.yaml"))
        with self.assertRaises(usage.UsageError) as raised:
            tap.Options().parseOptions(["--config", path])
        self.assertIn(path, str(raised.exception))
        self.assertIn("cannot read", str(raised.exception))

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
        The log routing first, one supervisor, one config reloader, the activity store and one
        listening service per --listen.
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
        self.assertEqual(len([c for c in children if isinstance(c, ActivityStore)]), 1)
        self.assertEqual(len(children), 6)
        self.assertEqual(sorted(supervisors[0].config.models), ["llama", "qwen"])
        for child in children:
            self.assertTrue(IService.providedBy(child))

    def test_default_listen(self) -> None:
        service = self.make(GOOD)
        service.startService()
        self.reactor.run_from_threads()  # the activity database is open
        self.addCleanup(service.stopService)
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
        self.successResultOf(service.stopService())

    def test_unsupported_keys_warned(self) -> None:
        """
        Keys swapproxy does not support are named in one warning, and do not stop it.
        """
        with capturedLogs() as events:
            self.make(GOOD + "    newerFeature: true\n")
        warnings = [e for e in events if e.get("log_level") == LogLevel.warn and "newerFeature" in str(e)]
        self.assertEqual(len(warnings), 1)

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
            self.successResultOf(service.stopService())
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
        A bad config makes twistd exit non-zero with the config error, before it binds the port:
        with the port already taken, nothing complains about it.
        """
        path = self.write_config(BAD)
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen(1)
            port = taken.getsockname()[1]
            result = self.twistd("-n", "--pidfile=", "swapproxy", "-c", path, "-l", f"tcp:{port}:interface=127.0.0.1")
        output = result.stdout + result.stderr
        self.assertNotEqual(result.returncode, 0, output)
        self.assertIn(f'{path}: models.qwen.ttl: must be an integer >= 0, got "ten"', output)
        self.assertNotIn("Address already in use", output)
        self.assertNotIn("starting on", output)
        self.assertNotIn("Traceback", output)

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

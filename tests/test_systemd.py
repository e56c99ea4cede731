"""
The systemd unit ``etc/swapproxy.service``: systemd accepts it, and its command line and stop
settings fit swapproxy.

``systemd-analyze verify`` checks the file as systemd would load it (it needs no running systemd);
only the path of ``twistd`` is changed, to this venv's, because it checks that the command exists.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess

from twisted.trial.unittest import SynchronousTestCase

from swapproxy import tap
from swapproxy.config import parse_config
from swapproxy.testing.local import REPO, TWISTD
from tests.support.live import config_yaml

SHIPPED = os.path.join(REPO, "etc", "swapproxy.service")
SHIPPED_TWISTD = "/opt/swapproxy/.venv/bin/twistd"
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")


def settings() -> dict[str, list[str]]:
    """
    The unit's ``Key=value`` settings (every value of a key, in order), continuation lines joined.
    """
    with open(SHIPPED, encoding="utf-8") as f:
        text = re.sub(r"\\\n\s*", " ", f.read())
    found: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line and not line.startswith(("#", ";", "[")) and "=" in line:
            key, _, value = line.partition("=")
            found.setdefault(key.strip(), []).append(value.strip())
    return found


class UnitTests(SynchronousTestCase):
    """
    What the unit asks of systemd.
    """

    def test_systemd_accepts_it(self) -> None:
        """
        ``systemd-analyze verify`` finds nothing wrong: not even a setting it would ignore.
        """
        if SYSTEMD_ANALYZE is None:
            raise self.skipTest("systemd-analyze is not installed (Debian: apt-get install systemd)")
        directory = self.mktemp()
        os.makedirs(directory)
        unit = os.path.join(directory, "swapproxy.service")
        with open(SHIPPED, encoding="utf-8") as f:
            text = f.read()
        self.assertIn(SHIPPED_TWISTD, text)
        with open(unit, "w", encoding="utf-8") as f:
            f.write(text.replace(SHIPPED_TWISTD, TWISTD))
        done = subprocess.run([SYSTEMD_ANALYZE, "verify", unit], capture_output=True, text=True, timeout=60)
        self.assertEqual((done.returncode, done.stdout + done.stderr), (0, ""))

    def test_stop_leaves_swapproxy_time_to_stop_the_models(self) -> None:
        """
        SIGTERM goes to swapproxy alone, which stops the models itself; systemd's SIGKILL of
        everything comes only after more than the default unloadTimeout.
        """
        unit = settings()
        self.assertEqual(unit["KillMode"], ["mixed"])
        self.assertEqual(unit["KillSignal"], ["SIGTERM"])
        default_unload = parse_config("models:\n  m:\n    cmd: llama-server --port ${PORT}\n").unload_timeout
        self.assertEqual(default_unload, 10)
        self.assertGreater(int(unit["TimeoutStopSec"][0]), default_unload + 5)
        self.assertEqual(unit["ExecReload"], ["/bin/kill -HUP $MAINPID"])

    def test_unprivileged_with_a_state_directory(self) -> None:
        self.assertEqual(settings()["DynamicUser"], ["yes"])
        self.assertEqual(settings()["StateDirectory"], ["swapproxy"])

    def test_command_line_is_swapproxy_s(self) -> None:
        """
        ExecStart runs twistd in the foreground without a pid file, and swapproxy accepts its
        options, with the state directory systemd provides.
        """
        (command,) = settings()["ExecStart"]
        argv = shlex.split(command)
        self.assertEqual(argv[:4], [SHIPPED_TWISTD, "--nodaemon", "--pidfile=", "swapproxy"])
        config = os.path.abspath(self.mktemp())
        with open(config, "w", encoding="utf-8") as f:
            f.write(config_yaml({"m": {"cmd": "llama-server --port ${PORT}"}}))
        state = os.path.abspath(self.mktemp())
        options = tap.Options()
        options.parseOptions(
            [arg.replace("/etc/swapproxy/config.yaml", config).replace("${STATE_DIRECTORY}", state) for arg in argv[4:]]
        )
        self.assertEqual((options["config"], options["state-dir"]), (config, state))
        self.assertEqual(options["listen"], ["tcp:8080:interface=127.0.0.1"])

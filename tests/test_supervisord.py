"""
swapproxy under a real supervisord, with the program section of ``etc/supervisord.conf``.

supervisord comes from the ``supervisor`` package in the test extra (``pip install -e '.[test]'``),
or from the system (Debian's ``supervisor``). The generated configuration changes only the paths of
the shipped program section: its own socket, pid file and logs in a temporary directory, this
venv's twistd, a config of fake upstreams, a loopback port.
"""

from __future__ import annotations

import configparser
import os
import shutil
import signal
import sys
import tempfile

import psutil
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.utils import getProcessOutputAndValue
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from swapproxy.testing.local import LOOPBACK, REPO, TWISTD, fake_command, free_port
from tests.support.live import config_yaml, make_client, post_chat, write_config
from tests.support.processes import alive, fake_upstream_descendants, kill_all, survivors, wait_until

SHIPPED = os.path.join(REPO, "etc", "supervisord.conf")
PROGRAM = "program:swapproxy"


def find_tool(name: str) -> str | None:
    """
    ``supervisord``/``supervisorctl`` of this venv, else of the system.
    """
    beside = os.path.join(os.path.dirname(sys.executable), name)
    return beside if os.access(beside, os.X_OK) else shutil.which(name)


SUPERVISORD = find_tool("supervisord")
SUPERVISORCTL = find_tool("supervisorctl")


def shipped_program() -> dict[str, str]:
    """
    The ``[program:swapproxy]`` section of etc/supervisord.conf.
    """
    parser = configparser.RawConfigParser(inline_comment_prefixes=(";",))
    with open(SHIPPED, encoding="utf-8") as f:
        parser.read_file(f)
    return dict(parser[PROGRAM])


def supervisord_conf(directory: str, config_path: str, port: int, state_dir: str) -> str:
    """
    A supervisord configuration of its own in ``directory``, running the shipped program section
    with the shipped command's paths replaced by the test's.
    """
    program = shipped_program()
    command = program["command"]
    for shipped, ours in (
        ("/opt/swapproxy/.venv/bin/twistd", TWISTD),
        ("/etc/swapproxy/config.yaml", config_path),
        ("-l tcp:8080", f"-l tcp:{port}:interface={LOOPBACK}"),
        ("/var/lib/swapproxy", state_dir),
    ):
        assert shipped in command, f"etc/supervisord.conf's command no longer has {shipped!r}: {command}"
        command = command.replace(shipped, ours)
    program.update(
        command=command,
        directory=REPO,
        stdout_logfile=os.path.join(directory, "swapproxy.log"),
    )
    sections = {
        "unix_http_server": {"file": os.path.join(directory, "supervisor.sock")},
        "supervisord": {
            "logfile": os.path.join(directory, "supervisord.log"),
            "pidfile": os.path.join(directory, "supervisord.pid"),
            "childlogdir": directory,
            "nodaemon": "true",
        },
        "rpcinterface:supervisor": {"supervisor.rpcinterface_factory": "supervisor.rpcinterface:make_main_rpcinterface"},
        "supervisorctl": {"serverurl": "unix://" + os.path.join(directory, "supervisor.sock")},
        PROGRAM: program,
    }
    return "".join(
        f"[{name}]\n" + "".join(f"{key}={value}\n" for key, value in keys.items()) + "\n"
        for name, keys in sections.items()
    )


class _Supervisord(ProcessProtocol):
    def __init__(self) -> None:
        self.output = bytearray()
        self.ended: Deferred[None] = Deferred()
        self.done = False

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        self.output += data

    def processEnded(self, reason: Failure) -> None:
        self.done = True
        self.ended.callback(None)


class ShippedConfTests(TestCase):
    def test_stop_wait_is_longer_than_our_grace(self) -> None:
        """
        The shipped section gives swapproxy longer to stop than the default unloadTimeout, and
        signals its whole group.
        """
        program = shipped_program()
        self.assertGreater(int(program["stopwaitsecs"]), 10 + 5)
        self.assertEqual(program["stopsignal"], "TERM")
        self.assertEqual((program["stopasgroup"], program["killasgroup"]), ("true", "true"))
        self.assertIn("-n --pidfile= swapproxy", program["command"])
        self.assertTrue(program["stdout_logfile"].startswith("/"))


class SupervisordTests(TestCase):
    """
    ``supervisorctl stop``/``start``/``restart`` with models loaded.
    """

    timeout = 120

    def setUp(self) -> None:
        if SUPERVISORD is None or SUPERVISORCTL is None:
            missing = "supervisord is not installed: pip install -e '.[test]' (or apt-get install supervisor)"
            if os.environ.get("CI"):
                self.fail(missing)
            raise self.skipTest(missing)
        # A short directory: the control socket's path must fit in 108 bytes.
        self.directory = tempfile.mkdtemp(prefix="swapproxy-sv-")
        self.addCleanup(shutil.rmtree, self.directory, True)
        self.port = free_port()
        self.url = f"http://{LOOPBACK}:{self.port}"
        models = {"parent": {"cmd": fake_command("--spawn-grandchild")}, "plain": {"cmd": fake_command()}}
        config = write_config(
            self, config_yaml(models, groups={"all": {"swap": False, "members": list(models)}})
        )
        self.conf = os.path.join(self.directory, "supervisord.conf")
        with open(self.conf, "w", encoding="utf-8") as f:
            f.write(supervisord_conf(self.directory, config, self.port, os.path.join(self.directory, "state")))
        self.seen: list[psutil.Process] = []

    async def ctl(self, *args: str) -> str:
        assert SUPERVISORCTL is not None
        out, err, code = await getProcessOutputAndValue(
            SUPERVISORCTL, ["-c", self.conf, *args], env=dict(os.environ), path=self.directory
        )
        text = (out + err).decode("utf-8", "replace")
        self.assertEqual(code, 0, f"supervisorctl {' '.join(args)}: {text}")
        return text

    async def swapproxy_pid(self) -> int:
        pid = int((await self.ctl("pid", "swapproxy")).strip())
        self.assertGreater(pid, 0)
        return pid

    async def serving(self) -> bool:
        try:
            response = await self.client.get(self.url + "/health", timeout=2)
            await response.content()
        except Exception:
            return False
        return bool(response.code == 200)

    async def load_models(self) -> tuple[psutil.Process, list[psutil.Process]]:
        """
        Wait until swapproxy serves, load both models; returns swapproxy and its children.
        """
        await wait_until(self.serving, timeout=30, what="swapproxy to serve under supervisord")
        swapproxy = psutil.Process(await self.swapproxy_pid())
        for model in ("parent", "plain"):
            status, answer = await post_chat(self.client, self.url, model, fake_tokens=1)
            self.assertEqual(status, 200, answer)
        children = fake_upstream_descendants(swapproxy.pid)
        self.assertEqual(len(children), 3, [c.cmdline() for c in children])
        self.seen += [swapproxy, *children]
        await self.pool.closeCachedConnections()
        return swapproxy, children

    def start_supervisord(self) -> _Supervisord:
        assert SUPERVISORD is not None
        supervisord = _Supervisord()
        transport = reactor.spawnProcess(
            supervisord, SUPERVISORD, [SUPERVISORD, "-n", "-c", self.conf], env=dict(os.environ), path=self.directory
        )
        self.addCleanup(self.shut_down, supervisord, transport.pid)
        return supervisord

    async def shut_down(self, supervisord: _Supervisord, pid: int) -> None:
        if not supervisord.done:
            leftovers = fake_upstream_descendants(pid)
            os.kill(pid, signal.SIGTERM)
            try:
                await wait_until(lambda: supervisord.done, timeout=40, what="supervisord to exit")
            finally:
                if not supervisord.done:
                    leftovers += fake_upstream_descendants(pid)
                    os.kill(pid, signal.SIGKILL)
                kill_all(leftovers)
            await supervisord.ended
        kill_all(self.seen)

    async def test_stop_start_restart_leave_nothing_behind(self) -> None:
        """
        ``supervisorctl stop`` ends swapproxy and every model process and grandchild; ``start``
        and ``restart`` bring swapproxy back serving, and a restart too leaves nothing behind.
        Its output goes to the program's log file.
        """
        supervisord = self.start_supervisord()
        self.client, self.pool = make_client(self)
        swapproxy, children = await self.load_models()

        self.assertIn("stopped", await self.ctl("stop", "swapproxy"))
        self.assertFalse(alive(swapproxy.pid))
        self.assertEqual(survivors(children), [], "models outlived supervisorctl stop")
        self.assertFalse(await self.serving())
        self.assertIn("STOPPED", await self.ctl_status())

        self.assertIn("started", await self.ctl("start", "swapproxy"))
        second, children = await self.load_models()
        self.assertNotEqual(second.pid, swapproxy.pid)

        await self.ctl("restart", "swapproxy")
        self.assertFalse(alive(second.pid))
        self.assertEqual(survivors(children), [], "models outlived supervisorctl restart")
        third, _ = await self.load_models()
        self.assertNotEqual(third.pid, second.pid)

        with open(os.path.join(self.directory, "swapproxy.log"), encoding="utf-8") as f:
            log = f.read()
        self.assertIn("starting model parent", log)
        self.assertIn("Server Shut Down.", log)
        self.assertNotIn("Traceback", log)
        self.assertFalse(supervisord.done, bytes(supervisord.output).decode("utf-8", "replace"))

    async def test_hup_reloads_through_supervisorctl(self) -> None:
        """
        ``supervisorctl signal HUP swapproxy`` reloads the config without a restart.
        """
        self.start_supervisord()
        self.client, self.pool = make_client(self)
        swapproxy, children = await self.load_models()
        await self.ctl("signal", "HUP", "swapproxy")

        def reloaded() -> bool:
            with open(os.path.join(self.directory, "swapproxy.log"), encoding="utf-8") as f:
                return "config reloaded" in f.read()

        await wait_until(reloaded, what="the reload in the log")
        self.assertEqual(await self.swapproxy_pid(), swapproxy.pid)
        self.assertEqual([c.pid for c in children if not alive(c.pid)], [])

    async def ctl_status(self) -> str:
        assert SUPERVISORCTL is not None
        # "status" exits 3 when a program is not running: read its output only.
        out, err, _ = await getProcessOutputAndValue(
            SUPERVISORCTL, ["-c", self.conf, "status", "swapproxy"], env=dict(os.environ), path=self.directory
        )
        return (out + err).decode("utf-8", "replace")

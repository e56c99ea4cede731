"""
Tests for `swapproxy.reload`: SIGHUP and ``--watch-config`` reload the config file; a bad file
leaves the running config in force.

The unit tests drive a `ConfigReloader` with a `Clock` and a `Supervisor` of fake upstreams.
`TwistdReloadTests` change the file under a real ``twistd swapproxy`` and send it SIGHUP.
"""

from __future__ import annotations

import json
import os
import signal
import textwrap
from collections.abc import Callable
from typing import Any

import psutil
from twisted.internet.task import Clock
from twisted.logger import LogLevel, capturedLogs
from twisted.trial.unittest import SynchronousTestCase, TestCase

from swapproxy.config import ConfigError, load_config
from swapproxy.logs import set_log_level
from swapproxy.reload import WATCH_INTERVAL, ConfigReloader
from swapproxy.supervisor import Supervisor
from swapproxy.testing.local import fake_command, free_port, free_port_range
from swapproxy.testing.upstreams import ScriptedUpstreams
from tests.support.live import config_yaml, make_client, post_chat, write_config
from tests.support.processes import alive, spawn_twistd, survivors, wait_for_http, wait_until

GOOD = """
    models:
      a:
        cmd: llama-server --port ${PORT} -m a.gguf
      b:
        cmd: llama-server --port ${PORT} -m b.gguf
"""

CHANGED = """
    models:
      a:
        cmd: llama-server --port ${PORT} -m a.gguf
      b:
        cmd: llama-server --port ${PORT} -m b-v2.gguf
      c:
        cmd: llama-server --port ${PORT} -m c.gguf
"""

BAD = """
    models:
      a:
        cmd: llama-server --port ${PORT} -m a.gguf
        ttl: ten
"""


class ThreadedClock(Clock):
    """
    A `Clock` with ``callFromThread``, as the SIGHUP handler needs.
    """

    def __init__(self) -> None:
        super().__init__()
        self.from_thread: list[Callable[..., Any]] = []

    def callFromThread(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        self.from_thread.append(f)
        self.callLater(0, f, *args, **kwargs)


class ReloaderTests(SynchronousTestCase):
    """
    `ConfigReloader` on a clock.
    """

    def setUp(self) -> None:
        self.addCleanup(set_log_level, "info")
        directory = self.mktemp()
        os.makedirs(directory)
        self.path = os.path.join(directory, "config.yaml")
        self.write(GOOD)
        self.clock = ThreadedClock()
        self.ups = ScriptedUpstreams()
        self.supervisor = Supervisor(load_config(self.path), self.clock, upstream_factory=self.ups)

    def write(self, text: str) -> None:
        with open(self.path, "w", encoding="utf-8") as f:
            f.write(textwrap.dedent(text))

    def make(self, watch: bool = False, sighup: bool = False) -> ConfigReloader:
        reloader = ConfigReloader(
            self.path,
            self.supervisor,
            self.clock,
            watch_interval=WATCH_INTERVAL if watch else None,
            handle_sighup=sighup,
        )
        reloader.startService()
        self.addCleanup(lambda: reloader.running and reloader.stopService())
        return reloader

    def test_reload_applies_a_valid_file(self) -> None:
        """
        A valid file replaces the config: the unchanged model keeps its upstream, the changed one
        gets a new one, the new one is added; one log line says so.
        """
        reloader = self.make()
        a, b = self.supervisor.upstreams["a"], self.supervisor.upstreams["b"]
        self.write(CHANGED)
        with capturedLogs() as events:
            result = reloader.reload("test")
        assert result is not None
        self.assertEqual((result.added, result.changed, result.unchanged), (("c",), ("b",), ("a",)))
        self.assertIs(self.supervisor.upstreams["a"], a)
        self.assertIsNot(self.supervisor.upstreams["b"], b)
        self.assertEqual(sorted(self.supervisor.config.models), ["a", "b", "c"])
        (done,) = [e for e in events if e.get("log_format", "").startswith("config reloaded")]
        self.assertEqual(done["summary"], "added: c; replaced: b; unchanged: 1")

    def test_reload_preloads_what_it_adds_to_preload(self) -> None:
        """
        ``hooks.on_startup.preload`` runs again for the models a reload adds to it (a new model,
        a model newly listed) and for a preloaded model whose process it replaced; a model that
        was preloaded and is unchanged is left as it is (here: unloaded meanwhile).
        """
        preloads = lambda *ids: f"    hooks:\n      on_startup:\n        preload: [{', '.join(ids)}]\n"  # noqa: E731
        self.write(GOOD + preloads("a"))
        self.supervisor = Supervisor(load_config(self.path), self.clock, upstream_factory=self.ups)
        self.supervisor.startService()
        self.addCleanup(self.supervisor.stopService)
        self.ups["a"].become_ready()
        self.supervisor.unload("a")
        self.ups["a"].exited()
        reloader = self.make()

        self.write(CHANGED + preloads("a", "b", "c"))
        reloader.reload("test")
        # One model at a time (the default group swaps): b loads, then makes room for c.
        self.assertEqual((self.ups["a"].start_count, self.ups["b"].start_count), (1, 1))
        self.ups["b"].become_ready()
        self.ups["b"].exited()
        self.ups["c"].become_ready()
        self.assertEqual(self.ups.running(), ["c"])
        self.assertEqual(self.ups["a"].start_count, 1)

        self.write(CHANGED.replace("b-v2", "b-v3") + preloads("a", "b", "c"))
        reloader.reload("test")
        self.ups["c"].exited()
        self.assertEqual(self.ups["b"].start_count, 1, "the new process of b")
        self.ups["b"].become_ready()
        self.assertEqual(self.ups.running(), ["b"])
        self.assertEqual((self.ups["a"].start_count, self.ups["c"].start_count), (1, 1))

    def test_invalid_file_is_rejected_and_old_config_stays(self) -> None:
        """
        A file that fails validation is rejected with the same one-line message as at start-up,
        logged as an error, and the running config stays in force.
        """
        reloader = self.make()
        before = self.supervisor.config
        self.write(BAD)
        with self.assertRaises(ConfigError) as raised:
            load_config(self.path)
        with capturedLogs() as events:
            self.assertIsNone(reloader.reload("test"))
        self.assertIs(self.supervisor.config, before)
        errors = [e for e in events if e["log_level"] == LogLevel.error]
        self.assertEqual(len(errors), 1)
        self.assertEqual(errors[0]["error"], str(raised.exception))
        self.assertIn(f'{self.path}: models.a.ttl: must be an integer >= 0, got "ten"', errors[0]["error"])
        self.assertEqual(reloader.rejected, 1)

    def test_reload_applies_log_level(self) -> None:
        """
        The new logLevel is in force after a reload.
        """
        reloader = self.make()
        self.write(GOOD.replace("    models:", "    logLevel: debug\n    models:"))
        reloader.reload("test")
        self.assertEqual(self.supervisor.config.log_level, "debug")

    def test_sighup_handler_installed_while_running(self) -> None:
        """
        The SIGHUP handler is installed by startService and the previous one is put back by
        stopService.
        """
        before = signal.getsignal(signal.SIGHUP)
        reloader = self.make(sighup=True)
        self.assertNotEqual(signal.getsignal(signal.SIGHUP), before)
        reloader.stopService()
        self.assertEqual(signal.getsignal(signal.SIGHUP), before)

    def test_sighup_reloads_once_per_burst(self) -> None:
        """
        The signal handler only hands the reload to the reactor; signals that arrive before it
        runs share one reload.
        """
        reloader = self.make(sighup=True)
        handler = signal.getsignal(signal.SIGHUP)
        assert callable(handler)
        self.write(CHANGED)
        handler(signal.SIGHUP, None)
        handler(signal.SIGHUP, None)
        self.assertEqual(len(self.clock.from_thread), 2)
        self.assertEqual(reloader.applied, 0, "nothing happens inside the signal handler")
        self.clock.advance(0)
        self.assertEqual(reloader.applied, 1)
        self.assertIn("c", self.supervisor.config.models)

    def test_watch_reloads_when_the_file_changes(self) -> None:
        """
        With --watch-config the file's mtime and size are checked every 2 s: a change reloads it,
        no change does nothing.
        """
        reloader = self.make(watch=True)
        self.clock.advance(WATCH_INTERVAL * 3)
        self.assertEqual(reloader.applied, 0)
        self.write(CHANGED)
        self.clock.advance(WATCH_INTERVAL)
        self.clock.advance(0)
        self.assertEqual(reloader.applied, 1)
        self.assertIn("c", self.supervisor.config.models)
        self.clock.advance(WATCH_INTERVAL * 3)
        self.assertEqual(reloader.applied, 1)

    def test_watch_bad_file_then_fixed(self) -> None:
        """
        A bad file is rejected once (not on every poll); fixing it reloads.
        """
        reloader = self.make(watch=True)
        self.write(BAD)
        for _ in range(4):
            self.clock.advance(WATCH_INTERVAL)
        self.assertEqual((reloader.applied, reloader.rejected), (0, 1))
        self.write(CHANGED)
        self.clock.advance(WATCH_INTERVAL)
        self.clock.advance(0)
        self.assertEqual((reloader.applied, reloader.rejected), (1, 1))

    def test_watch_ignores_a_missing_file(self) -> None:
        """
        While the file is missing (an editor replacing it) nothing is reloaded, and one warning
        says that the running config stays; the new file is reloaded.
        """
        reloader = self.make(watch=True)
        os.remove(self.path)
        with capturedLogs() as events:
            self.clock.advance(WATCH_INTERVAL * 3)
        self.assertEqual((reloader.applied, reloader.rejected), (0, 0))
        warnings = [e for e in events if e["log_level"] == LogLevel.warn]
        self.assertEqual(len(warnings), 1, warnings)
        self.assertIn(self.path, warnings[0]["path"])
        self.assertIn("running config stays", warnings[0]["log_format"])
        self.write(CHANGED)
        self.clock.advance(WATCH_INTERVAL)
        self.clock.advance(0)
        self.assertEqual(reloader.applied, 1)

    def test_watch_survives_an_unexpected_error(self) -> None:
        """
        An unexpected error in a reload is logged and the watch goes on.
        """
        self.make(watch=True)
        calls: list[Any] = []

        def broken(config: Any) -> Any:
            calls.append(config)
            raise RuntimeError("boom")

        self.patch(self.supervisor, "reload", broken)
        self.write(CHANGED)
        self.clock.advance(WATCH_INTERVAL)
        self.clock.advance(0)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.write(GOOD + "\n# again\n")
        self.clock.advance(WATCH_INTERVAL)
        self.clock.advance(0)
        self.assertEqual(len(calls), 2)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_stop_service_stops_watching(self) -> None:
        """
        No timer outlives the service.
        """
        reloader = self.make(watch=True)
        reloader.stopService()
        self.assertEqual(self.clock.getDelayedCalls(), [])


class TwistdReloadTests(TestCase):
    """
    A real ``twistd swapproxy``: the file changes, SIGHUP (or the watch) reloads it.
    """

    timeout = 90

    def models(self, b_respond: str) -> dict[str, dict[str, Any]]:
        return {
            "a": {"cmd": fake_command("--respond", "from a")},
            "b": {"cmd": fake_command("--respond", b_respond)},
        }

    async def test_sighup_reload_keeps_unchanged_model_and_rejects_bad_file(self) -> None:
        """
        After SIGHUP with a changed file, the unchanged model keeps its pid, the changed one is
        replaced (new pid, new answer) on its next request; a bad file then is rejected with an
        error in the log, and the last good config keeps serving.
        """
        # The same startPort in every version of the file, so that model a keeps its ${PORT}.
        top = {"startPort": free_port_range(3), "groups": {"all": {"swap": False, "members": ["a", "b"]}}}
        path = write_config(self, config_yaml(self.models("b one"), **top))
        port = free_port()
        process = spawn_twistd(self, path, port)
        client, pool = make_client(self)
        url = f"http://127.0.0.1:{port}"
        await wait_for_http(client, url + "/health", process)

        async def running() -> dict[str, Any]:
            response = await client.get(url + "/running")
            return {entry["model"]: entry for entry in json.loads(await response.content())["running"]}

        async def answer(model: str) -> str:
            status, body = await post_chat(client, url, model)
            self.assertEqual(status, 200, process.text)
            return str(body["choices"][0]["message"]["content"])

        self.assertEqual(await answer("a"), "from a")
        self.assertEqual(await answer("b"), "b one")
        pids = {model: entry["pid"] for model, entry in (await running()).items()}

        with open(path, "w", encoding="utf-8") as f:
            f.write(config_yaml(self.models("b two"), **top))
        process.signal(signal.SIGHUP)
        await wait_until(lambda: "config reloaded" in process.text, what="the reload", timeout=10)

        self.assertEqual(await answer("b"), "b two")
        self.assertEqual(await answer("a"), "from a")
        now = await running()
        self.assertEqual(now["a"]["pid"], pids["a"], "the unchanged model kept its process")
        self.assertNotEqual(now["b"]["pid"], pids["b"])
        await wait_until(lambda: not alive(pids["b"]), what="the replaced process to end")

        with open(path, "w", encoding="utf-8") as f:
            f.write(config_yaml(self.models("b three"), **top).replace("models:", "globalTTL: ten\nmodels:"))
        process.signal(signal.SIGHUP)
        await wait_until(lambda: "config reload rejected" in process.text, what="the rejection", timeout=10)
        rejected = [line for line in process.text.splitlines() if "config reload rejected" in line]
        self.assertEqual(len(rejected), 1, process.text)
        self.assertIn(path, rejected[0])
        self.assertEqual(await answer("b"), "b two")
        self.assertEqual((await running())["a"]["pid"], pids["a"])

        children = [p for p in (await running()).values()]
        await pool.closeCachedConnections()
        process.signal(signal.SIGTERM)
        await process.ended
        self.assertNotIn("Traceback", process.text)
        leftover = survivors([psutil.Process(entry["pid"]) for entry in children if alive(entry["pid"])])
        self.assertEqual(leftover, [])

    async def test_watch_config_reloads_changed_file(self) -> None:
        """
        With --watch-config, saving the file is enough: a new model appears in /v1/models.
        """
        path = write_config(self, config_yaml({"a": {"cmd": fake_command()}}))
        port = free_port()
        process = spawn_twistd(self, path, port, extra_args=("--watch-config",))
        client, pool = make_client(self)
        url = f"http://127.0.0.1:{port}"
        await wait_for_http(client, url + "/health", process)
        with open(path, "w", encoding="utf-8") as f:
            f.write(config_yaml({"a": {"cmd": fake_command()}, "new": {"cmd": fake_command("--respond", "new!")}}))

        async def listed() -> bool:
            response = await client.get(url + "/v1/models")
            return "new" in {m["id"] for m in json.loads(await response.content())["data"]}

        await wait_until(listed, timeout=15, what="the new model to be listed")
        status, body = await post_chat(client, url, "new")
        self.assertEqual((status, body["choices"][0]["message"]["content"]), (200, "new!"))
        await pool.closeCachedConnections()
        process.signal(signal.SIGTERM)
        await process.ended

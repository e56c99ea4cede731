"""
Tests for `swapproxy.children`: model processes left behind by a SIGKILL of swapproxy are found
and stopped on the next start, and a process that is not provably ours is never touched.

The unit tests record and clean up real ``sleep`` processes (psutil needs real ones).
`SigkillRestartTests` kill a real ``twistd swapproxy`` with SIGKILL and start it again.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from typing import Any

import psutil
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase, TestCase

from swapproxy.children import STATE_FILE, ChildEntry, ChildRecord, is_recorded_process, leftovers_of
from swapproxy.testing.local import fake_command, free_port
from tests.support.live import config_yaml, make_client, post_chat, write_config
from tests.support.processes import alive, fake_upstream_descendants, kill_all, spawn_twistd, survivors, wait_for_http

SLEEP = ("sleep", "120")


class _Upstream:
    """
    Just what `ChildRecord.follow` uses of an `Upstream`.
    """

    def __init__(self, model_id: str, command: tuple[str, ...]) -> None:
        self.model = type("Model", (), {"id": model_id, "cmd": command})()
        self.command = command
        self.process_observers: list[Any] = []


class ChildRecordTests(SynchronousTestCase):
    """
    The state file, and cleaning up after an earlier run.
    """

    def setUp(self) -> None:
        directory = self.mktemp()
        self.path = os.path.join(directory, STATE_FILE)

    def spawn(self, argv: tuple[str, ...] = SLEEP) -> subprocess.Popen[bytes]:
        """
        A real process in a session of its own, as swapproxy runs models; killed at the end.
        """
        process = subprocess.Popen(list(argv), start_new_session=True)
        self.addCleanup(process.wait)
        self.addCleanup(lambda: process.poll() is None and process.kill())
        # Until it has exec'd, the child shows this test runner's command line.
        wait_for(lambda: psutil.Process(process.pid).cmdline() == list(argv))
        return process

    def entry_for(self, pid: int, model: str = "m", **changes: Any) -> ChildEntry:
        proc = psutil.Process(pid)
        fields = {"model": model, "pid": pid, "create_time": proc.create_time(), "cmdline": tuple(proc.cmdline())}
        fields.update(changes)
        return ChildEntry(**fields)

    def write_state(self, entries: list[ChildEntry], owner: dict[str, Any] | None = None) -> None:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        dead_owner = {"pid": 4_999_999, "create_time": 1.0}
        with open(self.path, "w", encoding="utf-8") as f:
            json.dump({"owner": owner or dead_owner, "children": [e.to_json() for e in entries]}, f)

    def read_state(self) -> dict[str, Any]:
        with open(self.path, encoding="utf-8") as f:
            data: dict[str, Any] = json.load(f)
        return data

    def test_recorded_process_is_stopped(self) -> None:
        """
        A recorded process that still runs with the same start time and command line is stopped,
        and the clean-up names it in the log.
        """
        process = self.spawn()
        self.write_state([self.entry_for(process.pid, model="qwen")])
        with capturedLogs() as events:
            stopped = ChildRecord(self.path).clean_up(grace=5)
        self.assertEqual(process.wait(timeout=5), -signal.SIGTERM)
        self.assertEqual(stopped, [f"model qwen: pid {process.pid} (sleep 120)"])
        (line,) = [e for e in events if "left running" in e.get("log_format", "")]
        self.assertEqual(line["model"], "qwen")
        self.assertIn(f"pid {process.pid} (sleep 120)", line["processes"])
        self.assertEqual(self.read_state()["children"], [])

    def test_pid_reused_by_another_process_is_not_touched(self) -> None:
        """
        A process that has a recorded pid but started at another time, or runs another command,
        is not ours: it is left alone.
        """
        process = self.spawn()
        start = psutil.Process(process.pid).create_time()
        for entry in (
            self.entry_for(process.pid, create_time=start - 3600),
            self.entry_for(process.pid, create_time=start + 1),
            self.entry_for(process.pid, cmdline=("/opt/llama/llama-server", "--port", "5800")),
            self.entry_for(process.pid, cmdline=("300",) + SLEEP),
        ):
            self.assertFalse(is_recorded_process(psutil.Process(process.pid), entry), entry)
            self.assertEqual(leftovers_of(entry), [])
            self.write_state([entry])
            self.assertEqual(ChildRecord(self.path).clean_up(grace=5), [])
            self.assertIsNone(process.poll(), f"{entry} killed a process that was not ours")

    def test_interpreter_before_recorded_command(self) -> None:
        """
        The recorded argv may be preceded by an interpreter (a script's #! line) or by the
        launcher (setsid, before it has exec'd): the process is still ours.
        """
        script = os.path.abspath(self.mktemp())
        with open(script, "w") as f:
            f.write("#!/bin/sh\nsleep 120\necho done\n")
        os.chmod(script, 0o755)
        process = self.spawn(("/bin/sh", script, "--port", "5800"))
        entry = self.entry_for(process.pid, cmdline=(script, "--port", "5800"))
        self.assertTrue(is_recorded_process(psutil.Process(process.pid), entry))

    def test_descendants_and_session_are_stopped(self) -> None:
        """
        The recorded process's descendants go with it, also one that ignores SIGTERM (SIGKILL
        after the grace).
        """
        script = "import signal, subprocess, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); " \
                 "subprocess.Popen(['sleep', '120']); time.sleep(120)"
        process = self.spawn((sys.executable, "-c", script))
        leader = psutil.Process(process.pid)
        wait_for(lambda: len(leader.children()) == 1)
        (grandchild,) = leader.children()
        self.write_state([self.entry_for(process.pid)])
        stopped = ChildRecord(self.path).clean_up(grace=0.5)
        self.assertEqual(len(stopped), 2)
        self.assertEqual(process.wait(timeout=5), -signal.SIGKILL)
        self.assertEqual(survivors([grandchild]), [])

    def test_session_outlives_its_leader(self) -> None:
        """
        When the recorded process has exited but processes of its session live on, they are
        still provably its own (Linux does not reuse a pid that names a live session): stopped.
        """
        script = "import subprocess, sys; subprocess.Popen(['sleep', '120']); sys.stdin.read()"
        process = subprocess.Popen([sys.executable, "-c", script], start_new_session=True, stdin=subprocess.PIPE)
        self.addCleanup(lambda: process.poll() is None and process.kill())
        wait_for(lambda: psutil.Process(process.pid).cmdline() == [sys.executable, "-c", script])
        leader = psutil.Process(process.pid)
        wait_for(lambda: len(leader.children()) == 1)
        (orphan,) = leader.children()
        self.addCleanup(kill_all, [orphan])
        entry = self.entry_for(process.pid)
        assert process.stdin is not None
        process.stdin.close()
        process.wait(timeout=5)
        self.assertTrue(alive(orphan.pid))
        self.write_state([entry])
        stopped = ChildRecord(self.path).clean_up(grace=5)
        self.assertEqual(stopped, [f"model m: pid {orphan.pid} (sleep 120)"])
        self.assertEqual(survivors([orphan]), [])

    def test_live_owner_is_left_alone(self) -> None:
        """
        If the swapproxy that wrote the file still runs (two swapproxies, one state directory),
        its models are not touched, and this one records nothing there.
        """
        owner = self.spawn()
        child = self.spawn()
        owner_info = {"pid": owner.pid, "create_time": psutil.Process(owner.pid).create_time()}
        self.write_state([self.entry_for(child.pid)], owner=owner_info)
        record = ChildRecord(self.path)
        self.assertEqual(record.clean_up(grace=5), [])
        self.assertIsNone(child.poll())
        record._process_changed(_Upstream("x", SLEEP), child.pid, True)  # type: ignore[arg-type]
        self.assertEqual(self.read_state()["owner"], owner_info)

    def test_follow_records_running_children(self) -> None:
        """
        Each child is written to the file when it is spawned and removed once it has exited;
        the file names this process as its owner.
        """
        record = ChildRecord(self.path)
        record.clean_up(grace=5)
        upstream = _Upstream("qwen", SLEEP)
        record.follow(upstream)  # type: ignore[arg-type]
        (observer,) = upstream.process_observers
        process = self.spawn()
        observer(upstream, process.pid, True)
        state = self.read_state()
        self.assertEqual(state["owner"]["pid"], os.getpid())
        (entry,) = state["children"]
        self.assertEqual(
            (entry["model"], entry["pid"], entry["cmdline"]), ("qwen", process.pid, list(SLEEP))
        )
        self.assertAlmostEqual(entry["create_time"], psutil.Process(process.pid).create_time(), places=2)
        observer(upstream, process.pid, False)
        self.assertEqual(self.read_state()["children"], [])

    def test_unreadable_file_is_ignored(self) -> None:
        """
        A damaged state file is reported and replaced; nothing is stopped.
        """
        os.makedirs(os.path.dirname(self.path))
        with open(self.path, "w") as f:
            f.write("{not json")
        with capturedLogs() as events:
            self.assertEqual(ChildRecord(self.path).clean_up(grace=5), [])
        self.assertTrue(any("unreadable" in e.get("log_format", "") for e in events))
        self.assertEqual(self.read_state()["children"], [])


def wait_for(condition: Any, timeout: float = 5.0) -> None:
    """
    Poll a condition about a real process (no reactor involved).
    """
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.02)


class SigkillRestartTests(TestCase):
    """
    ``twistd swapproxy`` killed with SIGKILL leaves its models running; the next start stops them.
    """

    timeout = 90

    async def test_next_start_stops_what_a_sigkill_left(self) -> None:
        path = write_config(
            self,
            config_yaml({"parent": {"cmd": fake_command("--spawn-grandchild")}, "plain": {"cmd": fake_command()}},
                        groups={"all": {"swap": False, "members": ["parent", "plain"]}}),
        )
        state_dir = os.path.abspath(self.mktemp())
        port = free_port()
        first = spawn_twistd(self, path, port, state_dir=state_dir)
        client, pool = make_client(self)
        url = f"http://127.0.0.1:{port}"
        await wait_for_http(client, url + "/health", first)
        for model in ("parent", "plain"):
            status, _ = await post_chat(client, url, model, fake_tokens=1)
            self.assertEqual(status, 200, first.text)
        left = fake_upstream_descendants(first.pid)
        self.addCleanup(kill_all, left)
        self.assertEqual(len(left), 3, [p.cmdline() for p in left])
        await pool.closeCachedConnections()

        first.signal(signal.SIGKILL)
        await first.ended
        self.assertEqual([p.pid for p in left if not alive(p.pid)], [], "SIGKILL should leave the models running")

        second = spawn_twistd(self, path, port, state_dir=state_dir)
        await wait_for_http(client, url + "/health", second)

        self.assertEqual(survivors(left, grace=1), [])
        cleaned = [line for line in second.text.splitlines() if "left running" in line]
        self.assertEqual(len(cleaned), 2, second.text)
        for process in left:
            self.assertTrue(any(f"pid {process.pid} " in line for line in cleaned), (process.pid, cleaned))
        self.assertIn("cleaned up 3 left-over processes", second.text)
        # The new swapproxy serves, and starts the model afresh on its port.
        status, _ = await post_chat(client, url, "parent", fake_tokens=1)
        self.assertEqual(status, 200, second.text)
        restarted = fake_upstream_descendants(second.pid)
        await pool.closeCachedConnections()
        second.signal(signal.SIGTERM)
        await second.ended
        self.assertEqual(survivors(restarted), [])

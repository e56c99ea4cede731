"""
Tests for ``tests/fake_upstream.py``, the fake llama-server the real-process tests spawn.

Each test starts the script as a real child process on a free loopback port and talks to it with
the real reactor, so a broken fake fails here instead of somewhere confusing in the proxy tests.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys

import openai
import psutil
from treq.client import HTTPClient
from twisted.internet import reactor, threads
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.protocol import ProcessProtocol, Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool, ResponseFailed

from swapproxy.testing.local import FAKE_UPSTREAM, free_port

LOADING_BODY = {"error": {"code": 503, "message": "Loading model", "type": "unavailable_error"}}


class FakeUpstreamProcess(ProcessProtocol):
    """The fake upstream's side of the pipes: its stderr so far, and when it ended.

    :ivar ended: fires with the exit code once the process has exited and its pipes are closed.
    """

    def __init__(self) -> None:
        self.stderr = b""
        self.ended: Deferred[int | None] = Deferred()
        self._waiters: list[tuple[bytes, Deferred[bytes]]] = []

    def errReceived(self, data: bytes) -> None:
        self.stderr += data
        for needle, waiter in list(self._waiters):
            if needle in self.stderr:
                self._waiters.remove((needle, waiter))
                if not waiter.called:
                    waiter.callback(self.stderr)

    def processEnded(self, reason: Failure) -> None:
        for needle, waiter in self._waiters:
            if not waiter.called:
                waiter.errback(AssertionError(f"fake upstream exited before printing {needle!r}; "
                                              f"stderr:\n{self.stderr.decode(errors='replace')}"))
        self._waiters = []
        self.ended.callback(getattr(reason.value, "exitCode", None))

    def wait_for(self, needle: bytes, timeout: float = 5.0) -> Deferred[bytes]:
        """Fire with all of stderr once it contains ``needle``; fail after ``timeout`` seconds or at exit."""
        if needle in self.stderr:
            return succeed(self.stderr)
        waiter: Deferred[bytes] = Deferred()
        self._waiters.append((needle, waiter))
        waiter.addTimeout(timeout, reactor)
        return waiter


class HangUpAfterFirstData(Protocol):
    """A response body consumer that drops the connection as soon as the first bytes arrive."""

    def __init__(self) -> None:
        self.lost: Deferred[None] = Deferred()
        self._hung_up = False

    def dataReceived(self, data: bytes) -> None:
        if not self._hung_up:
            self._hung_up = True
            assert self.transport is not None
            self.transport.stopProducing()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost.callback(None)


class FakeUpstreamTests(TestCase):
    """The behaviour of the fake upstream that the other tests rely on."""

    def spawn(self, *args: str) -> tuple[FakeUpstreamProcess, str]:
        """Start the fake upstream with ``args``; it is SIGKILLed and reaped when the test ends.

        :returns: its protocol and base URL.
        """
        port = free_port()
        process = FakeUpstreamProcess()
        reactor.spawnProcess(process, sys.executable,
                             [sys.executable, FAKE_UPSTREAM, "--port", str(port), *args], env=os.environ.copy())
        self.addCleanup(self._kill, process)
        return process, f"http://127.0.0.1:{port}"

    def _kill(self, process: FakeUpstreamProcess) -> Deferred[int | None]:
        if not process.ended.called:
            try:
                process.transport.signalProcess("KILL")
            except ProcessExitedAlready:
                pass
        return process.ended

    def http(self) -> HTTPClient:
        pool = HTTPConnectionPool(reactor, persistent=False)
        self.addCleanup(pool.closeCachedConnections)
        return HTTPClient(Agent(reactor, pool=pool))

    async def test_health_is_503_while_loading_then_200(self) -> None:
        """
        During --load-time, /health and inference answer llama-server's 503 body; afterwards 200,
        and --stage-lines printed the loading lines, tensor dots included.
        """
        process, url = self.spawn("--load-time", "1", "--stage-lines")
        await process.wait_for(b"listening on")
        client = self.http()

        health = await client.get(url + "/health")
        self.assertEqual((health.code, await health.json()), (503, LOADING_BODY))
        chat = await client.post(url + "/v1/chat/completions", json={"messages": []})
        self.assertEqual((chat.code, await chat.json()), (503, LOADING_BODY))

        stderr = await process.wait_for(b"main: model loaded")
        health = await client.get(url + "/health")
        self.assertEqual((health.code, await health.json()), (200, {"status": "ok"}))
        self.assertIn(b"load_tensors: loading model tensors", stderr)
        # 50 tensor-loading dots, on lines of their own (our request log lines may split them).
        dot_lines = [line for line in stderr.split(b"\n") if line and line.strip(b".") == b""]
        self.assertEqual(sum(len(line) for line in dot_lines), 50)

    async def test_stream_parses_with_openai_sdk(self) -> None:
        """A streamed chat completion is what the openai SDK expects, from role chunk to usage."""
        process, url = self.spawn("--tokens", "5", "--model", "qwen")
        await process.wait_for(b"listening on")

        def stream_chat() -> list[openai.types.chat.ChatCompletionChunk]:
            with openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0) as sdk:
                return list(sdk.chat.completions.create(
                    model="qwen", stream=True, messages=[{"role": "user", "content": "say five words"}]))

        chunks = await threads.deferToThread(stream_chat)
        self.assertEqual(chunks[0].choices[0].delta.role, "assistant")
        self.assertEqual("".join(c.choices[0].delta.content or "" for c in chunks), "tok0 tok1 tok2 tok3 tok4 ")
        self.assertEqual(chunks[-1].choices[0].finish_reason, "stop")
        self.assertEqual((chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens), (3, 5))
        self.assertEqual({c.model for c in chunks}, {"qwen"})

    async def test_non_streaming_chat_is_small(self) -> None:
        """A plain answer is as small as llama-server's: no echo of the request, which the demo shows."""
        process, url = self.spawn()
        await process.wait_for(b"listening on")
        response = await self.http().post(url + "/v1/chat/completions", headers={"X-Test": "yes"},
                                          json={"model": "m", "messages": [{"role": "user", "content": "hi"}]})
        raw = await response.content()
        self.assertEqual(sorted(json.loads(raw)), ["choices", "created", "id", "model", "object",
                                                   "system_fingerprint", "timings", "usage"])
        self.assertLess(len(raw), 800)

    async def test_non_streaming_chat_echoes_the_request(self) -> None:
        """
        The answer carries the model asked for, max_tokens applied, and, with ``fake_echo``,
        what the fake received.
        """
        process, url = self.spawn()
        await process.wait_for(b"listening on")
        body = json.dumps({"model": "alias-1", "max_tokens": 3, "fake_echo": True,
                           "messages": [{"role": "user", "content": "hi"}]})

        response = await self.http().post(url + "/v1/chat/completions", data=body.encode(),
                                          headers={"X-Test": "yes", "Content-Type": "application/json"})
        answer = await response.json()
        self.assertEqual(response.code, 200)
        self.assertEqual(answer["model"], "alias-1")
        self.assertEqual(answer["choices"][0]["message"], {"role": "assistant", "content": "tok0 tok1 tok2 "})
        self.assertEqual(answer["timings"]["predicted_n"], 3)
        self.assertEqual(answer["echo"]["headers"]["x-test"], "yes")
        self.assertEqual((answer["echo"]["body"], answer["echo"]["content_length"]), (body, len(body)))

    async def test_fake_status_is_answered(self) -> None:
        """``fake_status`` in the body gets that status with an OpenAI-style error."""
        process, url = self.spawn()
        await process.wait_for(b"listening on")

        response = await self.http().post(url + "/v1/chat/completions", json={"fake_status": 500, "stream": True})
        self.assertEqual(response.code, 500)
        self.assertEqual(await response.json(),
                         {"error": {"message": "fake error 500", "type": "server_error", "code": 500}})

    async def test_sigterm_during_a_stream_exits_0(self) -> None:
        """SIGTERM ends the fake promptly with status 0 even while it is streaming."""
        process, url = self.spawn()
        await process.wait_for(b"listening on")
        response = await self.http().post(
            url + "/v1/chat/completions", unbuffered=True,
            json={"stream": True, "fake_tokens": 1000, "fake_token_delay": 0.01})
        body = response.content()

        process.transport.signalProcess("TERM")
        self.assertEqual(await process.ended, 0)
        with self.assertRaises(ResponseFailed):
            await body

    async def test_ignore_sigterm_keeps_serving(self) -> None:
        """With --ignore-sigterm, SIGTERM is logged and the fake still answers."""
        process, url = self.spawn("--ignore-sigterm")
        await process.wait_for(b"listening on")

        process.transport.signalProcess("TERM")
        await process.wait_for(b"ignoring SIGTERM")
        health = await self.http().get(url + "/health")
        self.assertEqual(health.code, 200)
        self.assertFalse(process.ended.called)

    async def test_spawn_grandchild_prints_its_pid(self) -> None:
        """--spawn-grandchild leaves a live child of the fake, in the fake's process group."""
        process, url = self.spawn("--spawn-grandchild")
        stderr = await process.wait_for(b"listening on")
        match = re.search(rb"grandchild pid=(\d+)", stderr)
        assert match is not None, stderr
        pid = int(match.group(1))
        # Cleanups run last-in first-out: the grandchild goes first, so the fake's pipes close.
        self.addCleanup(self._kill_pid, pid)

        grandchild = psutil.Process(pid)
        self.assertTrue(grandchild.is_running())
        self.assertEqual(grandchild.ppid(), process.transport.pid)
        self.assertEqual(os.getpgid(pid), os.getpgid(process.transport.pid))

    def _kill_pid(self, pid: int) -> None:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    async def test_exit_during_load(self) -> None:
        """--exit-during-load prints llama-server's failure lines and exits with the code given."""
        process, url = self.spawn("--load-time", "0.4", "--exit-during-load", "7")

        self.assertEqual(await process.ended, 7)
        self.assertIn(b"error: failed to load model 'fake.gguf'\n", process.stderr)

    async def test_client_hang_up_mid_stream_is_logged(self) -> None:
        """A client that leaves mid-stream is noticed and logged; the fake keeps serving."""
        process, url = self.spawn()
        await process.wait_for(b"listening on")
        client = self.http()
        response = await client.post(url + "/v1/chat/completions", unbuffered=True,
                                     json={"stream": True, "fake_tokens": 1000, "fake_token_delay": 0.01})
        consumer = HangUpAfterFirstData()
        response.deliverBody(consumer)
        await consumer.lost

        stderr = await process.wait_for(b"client went away after")
        self.assertRegex(stderr.decode(), r"client went away after \d+ chunks")
        health = await client.get(url + "/health")
        self.assertEqual(health.code, 200)

"""
Two ``twistd swapproxy`` processes on loopback, one a peer of the other: a streaming chat request
to the first for a model of the second, while that model loads, shows the second's loading
stream and then the model's answer; when the second stops, the first answers 502 and lists the
model as unreachable. Every process is stopped, and none is left behind.
"""

from __future__ import annotations

import json
import signal
from collections.abc import Callable
from typing import Any

import openai
import yaml
from twisted.internet import reactor
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from swapproxy.testing.local import LOOPBACK, fake_command, free_port, free_port_range
from tests.support.live import loading_status, make_client, openai_client, write_config
from tests.support.processes import fake_upstream_descendants, spawn_twistd, survivors, wait_for_http

TOKENS = 5
ANSWER = "".join(f"tok{i} " for i in range(TOKENS))


def stream_chat(url: str, model: str, key: str) -> list[Any]:
    client = openai_client(url)
    client.api_key = key
    try:
        return list(client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "hi"}], stream=True))
    finally:
        client.close()


def stream_until_error(
    url: str, model: str, after: int, then: Callable[[], None]
) -> tuple[list[str], BaseException | None]:
    """
    Stream a chat through ``url``; call ``then`` once ``after`` content chunks have arrived.
    Returns the content read, and the exception that ended the stream (``None`` if none did).
    """
    client = openai_client(url)
    content: list[str] = []
    try:
        for chunk in client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": "hi"}], stream=True):
            if chunk.choices and chunk.choices[0].delta.content:
                content.append(chunk.choices[0].delta.content)
                if len(content) == after:
                    then()
    except Exception as e:
        return content, e
    finally:
        client.close()
    return content, None


class TwoSwapproxiesTests(TestCase):
    timeout = 90

    async def test_remote_load_streams_through_the_peer(self) -> None:
        remote_port, local_port = free_port(), free_port()
        remote_config = write_config(self, yaml.safe_dump({
            "startPort": free_port_range(2),
            "healthCheckTimeout": 15,
            "unloadTimeout": 2,
            "sendLoadingState": True,
            "apiKeys": ["sk-remote"],
            "models": {"remote-model": {
                "cmd": fake_command("--load-time", "1.5", "--stage-lines", "--tokens", str(TOKENS))}},
        }))
        local_config = write_config(self, yaml.safe_dump({
            "startPort": free_port_range(2),
            "apiKeys": ["sk-local"],
            "peers": {"box": {"proxy": f"http://{LOOPBACK}:{remote_port}", "apiKey": "sk-remote",
                              "models": ["remote-model"]}},
        }))
        remote = spawn_twistd(self, remote_config, remote_port)
        local = spawn_twistd(self, local_config, local_port)
        client, pool = make_client(self)
        remote_url, local_url = f"http://{LOOPBACK}:{remote_port}", f"http://{LOOPBACK}:{local_port}"
        await wait_for_http(client, remote_url + "/health", remote)
        await wait_for_http(client, local_url + "/health", local)
        auth = {"Authorization": "Bearer sk-local"}

        async def listing() -> dict[str, Any]:
            response = await client.get(local_url + "/v1/models", headers=auth)
            return {r["id"]: r for r in json.loads(await response.content())["data"]}

        self.assertEqual((await listing())["box/remote-model"]["state"], "stopped")

        # By its bare id: the remote swapproxy's loading stream, then the model's own stream.
        chunks = await deferToThread(stream_chat, local_url, "remote-model", "sk-local")
        statuses = [loading_status(c) for c in chunks]
        loading = [s for s in statuses if s is not None]
        self.assertGreater(len(loading), 1)
        self.assertEqual(statuses[:len(loading)], loading, "the loading chunks come first")
        self.assertEqual(loading[-1]["stage"], "ready")
        self.assertTrue(any(s["stage"] == "loading" and s["progress"] for s in loading), loading)
        answer = "".join(c.choices[0].delta.content or "" for c in chunks[len(loading):] if c.choices)
        self.assertEqual(answer, ANSWER)
        self.assertEqual((await listing())["box/remote-model"]["state"], "ready")

        # The remote stops: a clear 502, and the model is listed as unreachable.
        remote_children = fake_upstream_descendants(remote.pid)
        remote.signal(signal.SIGTERM)
        self.assertEqual(await remote.ended, 0)
        self.assertEqual(survivors(remote_children), [])
        response = await client.post(
            local_url + "/v1/chat/completions", headers={**auth, "Content-Type": "application/json"},
            data=json.dumps({"model": "box/remote-model", "messages": []}).encode())
        error = json.loads(await response.content())["error"]
        self.assertEqual(response.code, 502)
        self.assertTrue(error["message"].startswith("peer proxy error: peer 'box'"), error)
        record = (await listing())["box/remote-model"]
        self.assertEqual((record["state"], record["peer"]["reachable"]), ("unreachable", False))

        await pool.closeCachedConnections()
        local.signal(signal.SIGTERM)
        self.assertEqual(await local.ended, 0)

    async def test_sigterm_ends_a_relayed_stream_with_an_error_event(self) -> None:
        """
        SIGTERM while a stream from a peer is being relayed: the client's stream ends as a local
        model's does at shutdown, with an error event (the SDK's ``APIError`` saying swapproxy
        is shutting down) and ``[DONE]``, not with the connection cut mid-stream.
        """
        remote_port, local_port = free_port(), free_port()
        remote_config = write_config(self, yaml.safe_dump({
            "startPort": free_port_range(2),
            "unloadTimeout": 2,
            "models": {"slow": {"cmd": fake_command("--tokens", "200", "--token-delay", "0.05")}},
        }))
        local_config = write_config(self, yaml.safe_dump({
            "startPort": free_port_range(2),
            "peers": {"box": {"proxy": f"http://{LOOPBACK}:{remote_port}", "models": ["slow"]}},
        }))
        remote = spawn_twistd(self, remote_config, remote_port)
        local = spawn_twistd(self, local_config, local_port)
        client, pool = make_client(self)
        await wait_for_http(client, f"http://{LOOPBACK}:{remote_port}/health", remote)
        await wait_for_http(client, f"http://{LOOPBACK}:{local_port}/health", local)
        await pool.closeCachedConnections()

        def stop_local() -> None:
            reactor.callFromThread(local.signal, signal.SIGTERM)

        content, error = await deferToThread(stream_until_error, f"http://{LOOPBACK}:{local_port}", "box/slow", 5,
                                             stop_local)
        self.assertEqual(await local.ended, 0)
        self.assertGreaterEqual(len(content), 5)
        self.assertLess(len(content), 200, "the stream was ended before the model's answer was")
        self.assertIsInstance(error, openai.APIError)
        self.assertNotIsInstance(error, openai.APIConnectionError)
        self.assertIn("swapproxy is shutting down", str(error))
        remote_children = fake_upstream_descendants(remote.pid)
        remote.signal(signal.SIGTERM)
        self.assertEqual(await remote.ended, 0)
        self.assertEqual(survivors(remote_children), [])

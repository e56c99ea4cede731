"""
End-to-end tests of hung models (issue 18) on the real reactor: a fake upstream frozen with
SIGSTOP, as a GPU hang or a deadlocked server looks from outside, mid-stream or before its
response head.

Every frozen process is sent SIGCONT and SIGKILL when the test ends, whatever swapproxy did to it.
The logic behind these tests is unit-tested on a Clock in `tests.test_stall`, `tests.test_relay`
(``HungModelTests``), `tests.test_upstream` (``HealthWhileReadyTests``) and `tests.test_supervisor`.
"""

from __future__ import annotations

import json
import time
from typing import Any

import treq
from twisted.internet.defer import Deferred
from twisted.trial.unittest import TestCase

from swapproxy.config import parse_config
from swapproxy.testing.local import fake_command
from tests.support.live import RunningProxy, config_yaml, start_proxy
from tests.support.processes import alive, freeze, wait_until

#: The limits these tests run with, in seconds: short, so that the tests are quick.
STALL = 1.5
UNLOAD = 2


def serve(testcase: TestCase, models: dict[str, dict[str, Any]], **top: Any) -> RunningProxy:
    top.setdefault("unloadTimeout", UNLOAD)
    return start_proxy(testcase, parse_config(config_yaml(models, **top), "test.yaml"))


class Stream:
    """
    A streaming chat completion through swapproxy, read as it arrives.

    :ivar body: what has arrived so far.
    :ivar done: fires when the body has ended (cleanly, or with the failure).
    """

    def __init__(self, proxy: RunningProxy, model: str, **fields: Any) -> None:
        self.proxy = proxy
        self.body = b""
        self.code: int | None = None
        self.done: Deferred[Any] = Deferred()
        body = dict({"model": model, "stream": True, "messages": [], "fake_tokens": 10_000}, **fields)
        self._request = proxy.client.post(
            proxy.url + "/v1/chat/completions",
            data=json.dumps(body).encode(),
            headers={b"content-type": [b"application/json"]},
            unbuffered=True,
        )
        self._request.addCallback(self._head)

    def _head(self, response: Any) -> None:
        self.code = response.code
        treq.collect(response, self._data).chainDeferred(self.done)

    def _data(self, data: bytes) -> None:
        self.body += data

    def events(self) -> list[bytes]:
        return [line[len(b"data: "):] for line in self.body.split(b"\n") if line.startswith(b"data: ")]

    def errors(self) -> list[dict[str, Any]]:
        return [json.loads(e)["error"] for e in self.events() if e.startswith(b'{"error"')]


def metric(text: str, name: str, **labels: str) -> float:
    """
    The value of one sample in the ``/metrics`` text (0 when absent).
    """
    wanted = name + "{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}"
    for line in text.splitlines():
        if line.startswith(wanted + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


class FrozenModelTests(TestCase):
    """
    A model frozen with SIGSTOP: its requests end properly, it is killed and started again, and
    nothing else waits on it beyond the bounds.
    """

    timeout = 60

    async def pid_of(self, proxy: RunningProxy, model: str) -> int:
        return int((await proxy.running())[model]["pid"])

    async def test_frozen_mid_stream(self) -> None:
        """
        A stream whose model freezes ends within about ``streamIdleTimeout`` with an error event
        and ``[DONE]``; the model is marked unhealthy, killed (SIGTERM cannot end a stopped
        process, SIGKILL does), the log says what happened, and the next request is served by
        a new process.
        """
        proxy = serve(self, {"a": {"cmd": fake_command(), "streamIdleTimeout": STALL, "healthCheckInterval": 0}})
        stream = Stream(proxy, "a", fake_token_delay=0.05)
        await wait_until(lambda: b"tok3" in stream.body, what="the first tokens")
        pid = await self.pid_of(proxy, "a")
        freeze(self, pid)
        frozen_at = time.monotonic()

        await stream.done

        self.assertLess(time.monotonic() - frozen_at, STALL * 1.25 + 5)
        self.assertEqual(stream.code, 200)
        [error] = stream.errors()
        self.assertEqual(error["code"], "gateway_timeout")
        self.assertIn("model 'a' stopped responding: it sent nothing for", error["message"])
        self.assertEqual(stream.events()[-1], b"[DONE]")
        self.assertEqual((await proxy.running())["a"]["state"], "unhealthy")
        await wait_until(lambda: not alive(pid), timeout=UNLOAD + 5, what="the frozen model to be killed")
        [logged] = proxy.logs.messages("stopped responding")
        self.assertEqual(logged["model"], "a")
        self.assertTrue(proxy.logs.messages("did not exit within {grace:g}s; sending SIGKILL"))

        status, answer = await proxy.chat("a", fake_tokens=2)
        self.assertEqual((status, answer["choices"][0]["message"]["content"]), (200, "tok0 tok1 "))
        self.assertNotEqual(await self.pid_of(proxy, "a"), pid)
        metrics = (await (await proxy.client.get(proxy.url + "/metrics")).content()).decode()
        self.assertEqual(metric(metrics, "swapproxy_model_unhealthy_total", model="a", cause="stream_idle"), 1)
        self.assertEqual(
            metric(metrics, "swapproxy_upstream_timeouts_total", model="a", route="/v1/chat/completions",
                   kind="stream_idle"),
            1,
        )

    async def test_frozen_before_its_head(self) -> None:
        """
        A streaming request to a model that is frozen before it answers gets a 504 JSON error;
        a non-streaming one gets it after ``timeouts.responseHeader``.
        """
        proxy = serve(
            self,
            {
                "a": {"cmd": fake_command(), "streamIdleTimeout": STALL, "healthCheckInterval": 0},
                "b": {"cmd": fake_command(), "timeouts": {"responseHeader": 1}, "streamIdleTimeout": 0,
                      "healthCheckInterval": 0},
            },
            groups={"all": {"swap": False, "members": ["a", "b"]}},
        )
        for model in ("a", "b"):
            self.assertEqual((await proxy.chat(model, fake_tokens=1))[0], 200)
            freeze(self, await self.pid_of(proxy, model))

        status, answer = await proxy.post_json(
            "/v1/chat/completions", {"model": "a", "stream": True, "messages": [], "fake_tokens": 3}
        )
        self.assertEqual(status, 504)
        self.assertIn("model 'a' stopped responding", answer["error"]["message"])

        status, answer = await proxy.chat("b")
        self.assertEqual(status, 504)
        self.assertIn("model 'b' sent no response head within 1s (timeouts.responseHeader)", answer["error"]["message"])
        self.assertEqual((await proxy.running())["b"]["state"], "ready")

    async def test_health_check_finds_a_frozen_model(self) -> None:
        """
        A ready model that freezes is found by its health check alone, within a few intervals:
        it shows unhealthy, the request that waited on it gets a 504, and it is killed.
        """
        interval = 0.5
        proxy = serve(self, {"a": {"cmd": fake_command(), "streamIdleTimeout": 0, "healthCheckInterval": interval}})
        self.assertEqual((await proxy.chat("a", fake_tokens=1))[0], 200)
        pid = await self.pid_of(proxy, "a")
        freeze(self, pid)

        status, answer = await proxy.chat("a")

        self.assertEqual(status, 504)
        self.assertIn(f"its health check (/health) failed 3 times in a row (last: no answer within {interval:g}s)",
                      answer["error"]["message"])
        models = {m["id"]: m for m in (await proxy.get_json("/v1/models"))["data"]}
        self.assertIn(models["a"]["state"], ("unhealthy", "stopped"))
        await wait_until(lambda: not alive(pid), timeout=UNLOAD + 5, what="the frozen model to be killed")

    async def test_swap_is_not_held_by_a_frozen_model(self) -> None:
        """
        A request for another model of the swap group is served within about the stall
        timeout plus ``unloadTimeout``, not when the frozen model's clients give up.
        """
        proxy = serve(
            self,
            {
                "a": {"cmd": fake_command(), "streamIdleTimeout": STALL, "healthCheckInterval": 0},
                "b": {"cmd": fake_command()},
            },
        )
        stream = Stream(proxy, "a", fake_token_delay=0.05)
        await wait_until(lambda: b"tok3" in stream.body, what="the first tokens")
        pid = await self.pid_of(proxy, "a")
        freeze(self, pid)
        asked_at = time.monotonic()

        status, answer = await proxy.chat("b", fake_tokens=1)

        self.assertEqual((status, answer["choices"][0]["message"]["content"]), (200, "tok0 "))
        self.assertLess(time.monotonic() - asked_at, STALL * 1.25 + UNLOAD + 5)
        self.assertFalse(alive(pid))
        await stream.done
        self.assertEqual(len(stream.errors()), 1)

    async def test_other_models_keep_streaming(self) -> None:
        """
        While one model is frozen, failed and killed, another model's stream flows on to its
        end.
        """
        proxy = serve(
            self,
            {
                "a": {"cmd": fake_command(), "streamIdleTimeout": STALL, "healthCheckInterval": 0},
                "b": {"cmd": fake_command()},
            },
            groups={"all": {"swap": False, "members": ["a", "b"]}},
        )
        hung = Stream(proxy, "a", fake_token_delay=0.05)
        flowing = Stream(proxy, "b", fake_tokens=120, fake_token_delay=0.05)
        await wait_until(lambda: b"tok3" in hung.body and b"tok3" in flowing.body, what="the first tokens")
        freeze(self, await self.pid_of(proxy, "a"))

        await hung.done
        self.assertEqual(len(hung.errors()), 1)
        self.assertNotIn(b"tok119", flowing.body, "b's stream ended before a was failed: no overlap tested")
        await flowing.done

        self.assertEqual(flowing.errors(), [])
        text = b"".join(flowing.events())
        self.assertEqual([f"tok{i} ".encode() in text for i in range(120)], [True] * 120)
        self.assertEqual(flowing.events()[-1], b"[DONE]")

"""
End-to-end tests on the real reactor: swapproxy starts, swaps, proxies and stops real fake-upstream
processes over loopback, and ``twistd swapproxy`` shuts down without leaving a process behind.

These are the behaviours only real processes and sockets can show; the logic behind them is
unit-tested with fake reactors in the other test modules.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from typing import Any

import attrs
import openai
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from swapproxy.config import parse_config
from swapproxy.testing.local import REPO, fake_command, free_port, free_port_range, port_is_free
from tests.support.live import RunningProxy, config_yaml, connect_raw, make_client, post_chat, start_proxy, write_config
from tests.support.processes import alive, fake_upstream_descendants, spawn_twistd, survivors, wait_for_http, wait_until


def serve(testcase: TestCase, models: dict[str, dict[str, Any]], **top: Any) -> RunningProxy:
    """
    Serve a config of ``models`` in this process.
    """
    return start_proxy(testcase, parse_config(config_yaml(models, **top), "test.yaml"))


def content_of(answer: dict[str, Any]) -> str:
    return str(answer["choices"][0]["message"]["content"])


def tokens(count: int) -> str:
    """
    The text the fake upstream generates for ``fake_tokens: count``.
    """
    return "".join(f"tok{i} " for i in range(count))


async def model_stopped(proxy: RunningProxy, model_id: str) -> bool:
    """
    Whether ``/v1/models`` shows the model stopped and ``/running`` does not list it.
    """
    models = {m["id"]: m for m in (await proxy.get_json("/v1/models"))["data"]}
    return models[model_id]["state"] == "stopped" and model_id not in await proxy.running()


def sse_events(body: bytes) -> list[bytes]:
    """
    The ``data:`` payloads of an SSE body, in order.
    """
    events = []
    for block in body.replace(b"\r\n", b"\n").split(b"\n\n"):
        for line in block.split(b"\n"):
            if line.startswith(b"data:"):
                events.append(line[5:].strip())
    return events


class InProcessTests(TestCase):
    """
    swapproxy's Supervisor and Site in this process, real children, real loopback sockets.
    """

    timeout = 60

    async def test_first_request_starts_model_and_is_answered(self) -> None:
        """
        Nothing runs until a request names a model; that request starts it and gets its answer.
        """
        proxy = serve(self, {"a": {"cmd": fake_command("--respond", "hello from a")}})
        self.assertEqual(await proxy.running(), {})

        status, answer = await proxy.chat("a")

        self.assertEqual(status, 200)
        self.assertEqual(content_of(answer), "hello from a")
        running = await proxy.running()
        self.assertEqual(list(running), ["a"])
        self.assertEqual(running["a"]["state"], "ready")
        self.assertTrue(alive(running["a"]["pid"]))

    async def test_request_for_another_model_swaps(self) -> None:
        """
        A request for B stops A first: A's process is gone when B answers, only B runs.
        """
        proxy = serve(
            self,
            {
                "a": {"cmd": fake_command("--respond", "from a")},
                "b": {"cmd": fake_command("--respond", "from b")},
            },
        )
        status, answer = await proxy.chat("a")
        self.assertEqual((status, content_of(answer)), (200, "from a"))
        pid_a = (await proxy.running())["a"]["pid"]

        status, answer = await proxy.chat("b")

        self.assertEqual((status, content_of(answer)), (200, "from b"))
        self.assertFalse(alive(pid_a), "model a's process survived the swap to b")
        running = await proxy.running()
        self.assertEqual(list(running), ["b"])
        self.assertEqual(running["b"]["state"], "ready")

    async def test_concurrent_requests_to_cold_model_share_one_start(self) -> None:
        """
        Five requests that arrive while the model loads all wait on one start and all succeed.
        """
        # Not --quiet: each fake upstream prints "fake upstream pid=N listening" once.
        proxy = serve(self, {"a": {"cmd": fake_command("--load-time", "0.5", quiet=False)}})

        results = await gatherResults([Deferred.fromCoroutine(proxy.chat("a", fake_tokens=3)) for _ in range(5)])

        self.assertEqual([status for status, _ in results], [200] * 5)
        self.assertEqual([content_of(answer) for _, answer in results], [tokens(3)] * 5)
        spawns = [e for e in proxy.logs.messages("starting model {model}") if e["model"] == "a"]
        self.assertEqual(len(spawns), 1, "each request started its own process")
        listening = [line for line in proxy.logs.lines("a") if "listening on" in line]
        self.assertEqual(len(listening), 1, f"expected one process for model a, got: {listening}")
        pid = (await proxy.running())["a"]["pid"]
        self.assertIn(f"pid={pid} ", listening[0])

    async def test_streaming_chat_through_openai_sdk_arrives_incrementally(self) -> None:
        """
        The openai SDK streams every token, and gets the first one long before the last one is
        generated (swapproxy relays the stream, it does not buffer it).
        """
        proxy = serve(self, {"a": {"cmd": fake_command()}})
        count, delay = 5, 0.2

        def consume() -> list[tuple[float, str]]:
            client = openai.OpenAI(base_url=proxy.url + "/v1", api_key="unused", max_retries=0, timeout=30)
            try:
                stream = client.chat.completions.create(
                    model="a",
                    messages=[{"role": "user", "content": "count"}],
                    stream=True,
                    extra_body={"fake_tokens": count, "fake_token_delay": delay},
                )
                arrivals = []
                for chunk in stream:
                    if chunk.choices and chunk.choices[0].delta.content:
                        arrivals.append((time.monotonic(), chunk.choices[0].delta.content))
                return arrivals
            finally:
                client.close()

        arrivals = await deferToThread(consume)

        self.assertEqual("".join(text for _, text in arrivals), tokens(count))
        self.assertEqual(len(arrivals), count)
        # The upstream sleeps `delay` before each token, so it produces the last one at least
        # (count - 1) * delay after the first. Buffered, they would all arrive together.
        spread = arrivals[-1][0] - arrivals[0][0]
        self.assertGreater(spread, (count - 1) * delay / 2, f"tokens arrived together: {arrivals}")

    async def test_idle_model_is_stopped_after_ttl(self) -> None:
        """
        A model with ``ttl: 1`` is stopped once it has had no request for a second.
        """
        proxy = serve(self, {"a": {"cmd": fake_command(), "ttl": 1}})
        status, _ = await proxy.chat("a")
        self.assertEqual(status, 200)
        pid = (await proxy.running())["a"]["pid"]

        async def unloaded() -> bool:
            return "a" not in await proxy.running()

        await wait_until(unloaded, timeout=10, what="model a to be unloaded after its ttl")
        await wait_until(lambda: not alive(pid), timeout=5, what=f"pid {pid} to exit")
        self.assertTrue(proxy.logs.messages("idle for its ttl"))

    async def test_crash_mid_stream_ends_stream_with_error_event_and_restarts(self) -> None:
        """
        An upstream that dies mid-stream: the client's stream ends cleanly with an SSE error
        event and ``[DONE]``, the model shows stopped, and the next request starts it again and succeeds.
        """
        proxy = serve(self, {"a": {"cmd": fake_command()}})
        status, _ = await proxy.chat("a", fake_tokens=1)
        self.assertEqual(status, 200)
        pid = (await proxy.running())["a"]["pid"]
        response = await proxy.client.post(
            proxy.url + "/v1/chat/completions",
            data=json.dumps(
                {"model": "a", "stream": True, "messages": [], "fake_tokens": 10, "fake_crash_after": 2}
            ).encode(),
            headers={b"content-type": [b"application/json"]},
        )
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders(b"x-accel-buffering"), [b"no"])

        body = await response.content()  # a clean end: no ResponseFailed

        events = sse_events(body)
        text = b"".join(events)
        self.assertIn(b"tok0", text)
        self.assertIn(b"tok1", text)
        self.assertNotIn(b"tok2", text)
        # The model's own [DONE] never came: swapproxy's error event, then its [DONE], end it.
        self.assertEqual(events.count(b"[DONE]"), 1)
        self.assertEqual(events[-1], b"[DONE]")
        error = json.loads(events[-2])["error"]
        self.assertIn("'a'", error["message"])
        self.assertEqual((error["type"], error["code"]), ("server_error", "bad_gateway"))

        await wait_until(lambda: model_stopped(proxy, "a"), what="model a to show stopped after its crash")

        status, answer = await proxy.chat("a", fake_tokens=2)
        self.assertEqual((status, content_of(answer)), (200, tokens(2)))
        self.assertNotEqual((await proxy.running())["a"]["pid"], pid)

    async def test_crash_before_answer_is_502_json(self) -> None:
        """
        A non-streaming request whose upstream dies before answering gets a 502 JSON error;
        the next request starts the model again.
        """
        proxy = serve(self, {"a": {"cmd": fake_command()}})

        status, answer = await proxy.chat("a", fake_crash_after=0)

        self.assertEqual(status, 502)
        self.assertEqual(answer["error"]["type"], "server_error")
        self.assertIn("'a'", answer["error"]["message"])
        await wait_until(lambda: model_stopped(proxy, "a"), what="model a to show stopped after its crash")
        status, answer = await proxy.chat("a", fake_tokens=1)
        self.assertEqual((status, content_of(answer)), (200, tokens(1)))

    async def test_exit_during_load_is_502_with_exit_code_and_last_line(self) -> None:
        """
        A model whose command exits while loading: 502 JSON naming the exit code and quoting
        the last line it printed, and the model is not left running.
        """
        proxy = serve(self, {"a": {"cmd": fake_command("--load-time", "0.2", "--exit-during-load", "7")}})

        status, answer = await proxy.chat("a")

        self.assertEqual(status, 502)
        message = answer["error"]["message"]
        self.assertIn("'a'", message)
        self.assertIn("exit code 7", message)
        self.assertIn("error: failed to load model 'fake.gguf'", message)
        self.assertEqual(await proxy.running(), {})

    async def test_health_check_timeout_is_502_and_stops_child(self) -> None:
        """
        A model that never becomes healthy within ``healthCheckTimeout``: 502 JSON saying so,
        and its process is stopped.

        The configured minimum is 15 s, so the timeout is lowered on the loaded config.
        """
        config = parse_config(config_yaml({"a": {"cmd": fake_command("--load-time", "60")}}), "test.yaml")
        model = attrs.evolve(config.models["a"], health_check_timeout=1, start_ceiling=10)
        proxy = start_proxy(self, attrs.evolve(config, health_check_timeout=1, models={"a": model}))

        status, answer = await proxy.chat("a")

        self.assertEqual(status, 502)
        self.assertIn("health check timed out after 1s", answer["error"]["message"])
        (started,) = proxy.logs.messages("starting model {model}")
        pid = started["pid"]
        await wait_until(lambda: not alive(pid), timeout=10, what=f"pid {pid} to be stopped")

        async def not_running() -> bool:
            return "a" not in await proxy.running()

        await wait_until(not_running, what="model a to leave /running")

    async def test_unload_while_loading_aborts_the_start(self) -> None:
        """
        ``POST /api/models/unload/<model>`` while the model loads stops its process at once; the
        request that waited for it gets a 502 saying the start was aborted.
        """
        proxy = serve(self, {"a": {"cmd": fake_command("--load-time", "30")}})
        chat = Deferred.fromCoroutine(proxy.chat("a"))

        async def loading() -> bool:
            return (await proxy.running()).get("a", {}).get("state") == "starting"

        await wait_until(loading, what="model a to be loading")
        pid = (await proxy.running())["a"]["pid"]

        response = await proxy.client.post(proxy.url + "/api/models/unload/a")
        self.assertEqual(response.code, 200)
        self.assertEqual(json.loads(await response.content())["unloaded"], "a")
        self.assertFalse(alive(pid), "the loading process is gone when the unload answers")

        status, answer = await chat
        self.assertEqual(status, 502)
        self.assertIn("unloaded while starting", answer["error"]["message"])
        self.assertEqual(await proxy.running(), {})

    async def test_client_hang_up_mid_stream_stops_upstream_transfer(self) -> None:
        """
        A client that hangs up mid-stream stops the upstream's transfer (the fake upstream sees
        the connection go away), and the model keeps serving the next request.
        """
        proxy = serve(self, {"a": {"cmd": fake_command()}})
        status, _ = await proxy.chat("a", fake_tokens=1)
        self.assertEqual(status, 200)
        pid = (await proxy.running())["a"]["pid"]
        body = json.dumps(
            {"model": "a", "stream": True, "messages": [], "fake_tokens": 200, "fake_token_delay": 0.02}
        ).encode()
        raw = (
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        client = await connect_raw(proxy.port, raw, hang_up_at=b"tok0", testcase=self)
        await client.done
        self.assertTrue(client.hung_up, client.received)

        def went_away() -> list[str]:
            return [line for line in proxy.logs.lines("a") if "client went away" in line]

        await wait_until(went_away, what="the fake upstream to see the client go away")
        sent = int(went_away()[0].split("after ")[1].split(" chunks")[0])
        self.assertLess(sent, 200, "the upstream streamed everything although the client had left")

        status, answer = await proxy.chat("a", fake_tokens=2)
        self.assertEqual((status, content_of(answer)), (200, tokens(2)))
        self.assertEqual((await proxy.running())["a"]["pid"], pid)

    async def test_swap_waits_for_in_flight_request(self) -> None:
        """
        A request for B while a slow request runs on A: A's response completes in full, and B
        is answered after it.
        """
        proxy = serve(self, {"a": {"cmd": fake_command()}, "b": {"cmd": fake_command("--respond", "from b")}})
        status, _ = await proxy.chat("a", fake_tokens=1)
        self.assertEqual(status, 200)
        finished: list[str] = []

        def track(name: str, d: Deferred[Any]) -> Deferred[Any]:
            def done(result: Any) -> Any:
                finished.append(name)
                return result

            return d.addCallback(done)

        slow = track("a", Deferred.fromCoroutine(proxy.chat("a", fake_delay=1, fake_tokens=4)))

        async def a_in_flight() -> bool:
            return (await proxy.running())["a"]["in_flight"] == 1

        await wait_until(a_in_flight, what="the slow request to reach model a")
        swap = track("b", Deferred.fromCoroutine(proxy.chat("b")))

        (status_a, answer_a), (status_b, answer_b) = await gatherResults([slow, swap])

        self.assertEqual((status_a, content_of(answer_a)), (200, tokens(4)))
        self.assertEqual((status_b, content_of(answer_b)), (200, "from b"))
        self.assertEqual(finished, ["a", "b"])
        self.assertEqual(list(await proxy.running()), ["b"])


class TwistdTests(TestCase):
    """
    ``twistd -n swapproxy`` as a child process, as supervisord or a terminal runs it.
    """

    timeout = 60

    async def _serve_all_together(self, models: dict[str, dict[str, Any]]) -> tuple[Any, str, Any, Any]:
        """
        Run twistd on ``models`` (one non-swapping group), start each model with a request.

        :returns: the twistd process, its URL and a treq client.
        """
        text = config_yaml(models, unloadTimeout=1, groups={"all": {"swap": False, "members": list(models)}})
        path = write_config(self, text)
        port = free_port()
        process = spawn_twistd(self, path, port)
        client, pool = make_client(self)
        url = f"http://127.0.0.1:{port}"
        await wait_for_http(client, url + "/health", process)
        for model_id in models:
            status, _ = await post_chat(client, url, model_id, fake_tokens=1)
            self.assertEqual(status, 200, process.text)
        return process, url, client, pool

    async def _assert_clean_shutdown(self, signum: int, models: dict[str, dict[str, Any]], expected: int) -> None:
        process, url, client, pool = await self._serve_all_together(models)
        children = fake_upstream_descendants(process.pid)
        self.assertEqual(len(children), expected, [c.cmdline() for c in children])
        await pool.closeCachedConnections()

        process.signal(signum)
        status = await process.ended

        # twistd stops the services (every child). A SIGTERM (supervisord's and systemd's stop)
        # that stopped everything is a clean exit, 0; after Ctrl-C twistd ends itself with the
        # signal, as an interactive Unix program does (130 in a shell).
        self.assertEqual(status, 0 if signum == signal.SIGTERM else -signum, process.text)
        self.assertIn("Server Shut Down.", process.text)
        self.assertNotIn("Traceback", process.text)
        # With logToStdout: proxy (the default), what the models print as they stop is kept out
        # of twistd's log to the end.
        self.assertNotIn("SIGTERM received", process.text)
        self.assertNotIn("ignoring SIGTERM", process.text)
        left = survivors(children)
        self.assertEqual(left, [], f"children outlived swapproxy: {[p.pid for p in left]}")

    async def test_sigterm_stops_every_child_and_grandchild(self) -> None:
        """
        SIGTERM (supervisord's stop): swapproxy exits only after every child is gone, including
        one that ignores SIGTERM and a grandchild.
        """
        await self._assert_clean_shutdown(
            signal.SIGTERM,
            {
                "plain": {"cmd": fake_command()},
                "stubborn": {"cmd": fake_command("--ignore-sigterm")},
                "parent": {"cmd": fake_command("--spawn-grandchild")},
            },
            expected=4,
        )

    async def test_sigint_stops_every_child_and_grandchild(self) -> None:
        """
        SIGINT (Ctrl-C) shuts down as cleanly as SIGTERM.
        """
        await self._assert_clean_shutdown(
            signal.SIGINT,
            {"stubborn": {"cmd": fake_command("--ignore-sigterm", "--spawn-grandchild")}},
            expected=2,
        )

    async def test_bad_config_exits_with_one_message_and_never_listens(self) -> None:
        """
        A config error stops twistd with a non-zero status and one message naming the file and
        the key, before it listens and before any model starts.
        """
        text = config_yaml(
            {"a": {"cmd": fake_command()}, "b": {"cmd": fake_command(), "ttl": "ten"}},
            hooks={"on_startup": {"preload": ["a"]}},
        )
        path = write_config(self, text)
        port = free_port()
        process = spawn_twistd(self, path, port)

        status = await process.ended

        self.assertNotEqual(status, 0)
        problem = [line for line in process.text.splitlines() if "models.b.ttl" in line]
        self.assertEqual(len(problem), 1, process.text)
        self.assertIn(path, problem[0])
        self.assertIn("ten", problem[0])
        self.assertNotIn("Site starting", process.text)
        self.assertNotIn("starting model", process.text)
        self.assertTrue(port_is_free(port))

    async def _run_demo(self) -> tuple[Any, str, Any, Any]:
        """
        Serve ``etc/demo.yaml`` from the checkout, as ``make run`` does; only the models' ports
        (``startPort``, 5800 in the file) are moved to free ones, so that whatever else runs on
        this machine cannot make the test skip.
        """
        with open(os.path.join(REPO, "etc", "demo.yaml"), encoding="utf-8") as f:
            demo = f.read()
        self.assertNotIn("startPort", demo)
        path = write_config(self, f"startPort: {free_port_range(4)}\n" + demo)
        port = free_port()
        process = spawn_twistd(self, path, port, cwd=REPO)
        client, pool = make_client(self)
        url = f"http://127.0.0.1:{port}"
        await wait_for_http(client, url + "/health", process)
        return process, url, client, pool

    async def _stop(self, process: Any, pool: Any) -> None:
        await pool.closeCachedConnections()
        process.signal(signal.SIGTERM)
        await process.ended

    async def test_demo_config_lists_its_models(self) -> None:
        """
        ``make run``'s config serves: ``/v1/models`` lists demo and demo-slow.
        """
        process, url, client, pool = await self._run_demo()
        response = await client.get(url + "/v1/models")
        listing = json.loads(await response.content())
        await self._stop(process, pool)

        self.assertEqual(response.code, 200)
        ids = {model["id"] for model in listing["data"]}
        self.assertEqual(ids, {"demo", "demo-slow"})

    async def test_demo_model_answers(self) -> None:
        """
        The demo model answers a chat request by its alias, with no model file anywhere.
        """
        if shutil.which("python3") is None:
            self.skipTest("etc/demo.yaml runs python3, which is not on PATH")
        process, url, client, pool = await self._run_demo()
        status, answer = await post_chat(client, url, "gpt-4o-mini")
        children = fake_upstream_descendants(process.pid)
        await self._stop(process, pool)

        self.assertEqual(status, 200, process.text)
        self.assertEqual(content_of(answer), "Hello from swapproxy's demo model.")
        self.assertEqual(survivors(children), [])

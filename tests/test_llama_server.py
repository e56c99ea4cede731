"""
The end-to-end tier: swapproxy with real ``llama-server`` children and tiny random-weight models.

The models are written once per cache (``swapproxy/testing/llama.py``); llama-server itself is never
built here. Without one (``$LLAMA_SERVER``, ``PATH``, or the cache of
``scripts/build_llama_server.sh``), the whole module is skipped with the reason; ``.ci/run``
builds it first, so CI always runs this tier.

swapproxy runs in this process, except for the shutdown test, which runs ``twistd swapproxy`` and
sends it SIGTERM. Every llama-server is a descendant of the process under test, which is how the
tests count them (psutil) without seeing anybody else's.
"""

from __future__ import annotations

import json
import os
import signal
from typing import Any

import openai
import yaml
from twisted.internet import reactor
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from swapproxy.config import parse_config
from swapproxy.metrics import Metrics
from swapproxy.progress import LoadHistory
from swapproxy.slotcache import SlotCache
from swapproxy.supervisor import Supervisor
from swapproxy.testing.llama import HOW_TO_GET_ONE, llama_command
from swapproxy.testing.local import free_port, free_port_range
from swapproxy.upstream import State
from swapproxy.web.root import build_site
from tests.support.live import (
    LogCapture,
    TrackingFactory,
    capture_logs,
    loading_status,
    make_client,
    openai_client,
    post_chat,
    write_config,
)
from tests.support.llama import LLAMA_SERVER, llama_servers_under, model_file
from tests.support.processes import spawn_twistd, survivors, wait_for_http


def config_text(models: dict[str, dict[str, Any]], **top: Any) -> str:
    document: dict[str, Any] = {
        "healthCheckTimeout": 30,
        "startPort": free_port_range(len(models) + 2),
        "unloadTimeout": 5,
    }
    document.update(top)
    document["models"] = models
    return yaml.safe_dump(document, sort_keys=False)


def chat(url: str, model_id: str) -> Any:
    """
    One greedy non-streaming chat completion of 4 tokens with the openai SDK (call in a thread).
    """
    client = openai_client(url)
    try:
        return client.chat.completions.create(
            model=model_id, messages=[{"role": "user", "content": "hi"}], max_tokens=4, temperature=0
        )
    finally:
        client.close()


def chat_stream(url: str, model_id: str, max_tokens: int = 4) -> list[Any]:
    """
    One greedy streaming chat completion with the openai SDK (call in a thread); every chunk.
    """
    client = openai_client(url)
    try:
        stream = client.chat.completions.create(
            model=model_id, messages=[{"role": "user", "content": "hi"}], max_tokens=max_tokens,
            temperature=0, stream=True,
        )
        return list(stream)
    finally:
        client.close()


def chat_error(url: str, model_id: str) -> openai.APIStatusError:
    """
    The error the openai SDK raises for a non-streaming chat completion that fails.
    """
    try:
        chat(url, model_id)
    except openai.APIStatusError as e:
        return e
    raise AssertionError(f"the request for {model_id} succeeded")


def sse_data(body: bytes) -> list[str]:
    """
    The ``data:`` payloads of an SSE body, in order.
    """
    return [
        line[5:].strip()
        for line in body.decode("utf-8").replace("\r\n", "\n").split("\n")
        if line.startswith("data:")
    ]


class LlamaServerTests(TestCase):
    """
    swapproxy in this process, real llama-server children over loopback.
    """

    timeout = 60
    skip = None if LLAMA_SERVER is not None else HOW_TO_GET_ONE

    def setUp(self) -> None:
        assert LLAMA_SERVER is not None
        self.llama_server = LLAMA_SERVER

    def serve(self, models: dict[str, dict[str, Any]], **top: Any) -> tuple[str, Supervisor]:
        """
        Serve ``models`` in this process; the cleanups stop everything.
        """
        config = parse_config(config_text(models, **top), "test.yaml")
        capture_logs(self)  # the children's output goes to the captured log, not the console
        supervisor = Supervisor(config, reactor)
        supervisor.startService()
        self.addCleanup(supervisor.stopService)
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        site = build_site(supervisor, reactor, LoadHistory(os.path.join(directory, "load-times.json")))
        factory = TrackingFactory(site)
        listening = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(listening.stopListening)
        self.addCleanup(factory.close_all)
        return f"http://127.0.0.1:{listening.getHost().port}", supervisor

    def assertOnlyServing(self, model_path: str) -> None:
        """
        Exactly one llama-server runs under this process, and it serves ``model_path``.
        """
        running = llama_servers_under(os.getpid())
        self.assertEqual(len(running), 1, [p.cmdline() for p in running])
        self.assertIn(model_path, running[0].cmdline())

    async def test_swap_between_two_models_streaming_and_not(self) -> None:
        """
        Two models with different weights in one swap group, through the openai SDK: each answer
        names the model asked for and carries its tokens, and after each swap only the requested
        model's llama-server is alive. Stopping the supervisor leaves none.
        """
        tiny_a, tiny_b = model_file("tiny", 0), model_file("tiny", 1)
        url, supervisor = self.serve({
            "tiny-a": {"cmd": llama_command(self.llama_server, tiny_a)},
            "tiny-b": {"cmd": llama_command(self.llama_server, tiny_b)},
        })

        first = await deferToThread(chat, url, "tiny-a")
        self.assertEqual(first.model, "tiny-a")
        self.assertEqual(first.usage.completion_tokens, 4)
        self.assertTrue(first.choices[0].message.content)
        self.assertOnlyServing(tiny_a)

        chunks = await deferToThread(chat_stream, url, "tiny-b")
        self.assertEqual({chunk.model for chunk in chunks}, {"tiny-b"})
        self.assertTrue(all(loading_status(chunk) is None for chunk in chunks), "no loading stream: it is off")
        # At most one chunk per token: llama-server holds back a token that ends inside a UTF-8
        # character until the character is complete.
        pieces = [chunk.choices[0].delta.content for chunk in chunks if chunk.choices and chunk.choices[0].delta.content]
        self.assertTrue(1 <= len(pieces) <= 4, pieces)
        self.assertEqual([c.choices[0].finish_reason for c in chunks if c.choices][-1], "length")
        self.assertOnlyServing(tiny_b)

        again = await deferToThread(chat, url, "tiny-a")
        self.assertEqual(again.model, "tiny-a")
        self.assertEqual(again.choices[0].message.content, first.choices[0].message.content,
                         "greedy decoding by the same weights gives the same answer")
        self.assertOnlyServing(tiny_a)
        streamed_b = "".join(pieces)
        self.assertNotEqual(streamed_b, first.choices[0].message.content, "the models have different weights")

        running = llama_servers_under(os.getpid())
        await supervisor.stopService()
        self.assertEqual(llama_servers_under(os.getpid()), [])
        self.assertEqual(survivors(running, grace=0), [])

    async def test_a_shared_api_key_reaches_llama_server(self) -> None:
        """
        A llama-swap setup that guards both doors with one key (``apiKeys`` and llama-server's
        ``--api-key``) works unchanged: the client's key passes swapproxy's check and llama-server's.
        A wrong key is refused by swapproxy before any model starts.
        """
        url, supervisor = self.serve(
            {"tiny-a": {"cmd": llama_command(self.llama_server, model_file("tiny", 0), "--api-key", "sk-shared")}},
            apiKeys=["sk-shared"],
        )

        def ask(key: str) -> Any:
            client = openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=60)
            try:
                return client.chat.completions.create(
                    model="tiny-a", messages=[{"role": "user", "content": "hi"}], max_tokens=4, temperature=0)
            finally:
                client.close()

        with self.assertRaises(openai.AuthenticationError):
            await deferToThread(ask, "sk-wrong")
        self.assertEqual(llama_servers_under(os.getpid()), [])
        answer = await deferToThread(ask, "sk-shared")
        self.assertEqual((answer.model, answer.usage.completion_tokens), ("tiny-a", 4))

    async def test_loading_stream_during_a_real_load(self) -> None:
        """
        A streaming request for a cold model that loads for a second or two (``-lv 4``, so the
        library prints its stages): the openai SDK parses every chunk, loading chunks come first,
        their progress rises to ready, then the model's tokens follow.
        """
        slow = model_file("slow")
        url, _ = self.serve(
            {"slow": {"cmd": llama_command(self.llama_server, slow, "-lv", "4", fit=True)}},
            sendLoadingState=True,
        )

        chunks = await deferToThread(chat_stream, url, "slow", 3)

        statuses = [loading_status(chunk) for chunk in chunks]
        loading = [s for s in statuses if s is not None]
        self.assertGreaterEqual(len(loading), 1)
        self.assertEqual(statuses[: len(loading)], loading, "the loading chunks all come first")
        self.assertEqual({chunk.model for chunk in chunks}, {"slow"})
        progress = [s["progress"] for s in loading if s["stage"] in ("loading", "ready")]
        self.assertEqual(progress, sorted(progress), "progress never goes back")
        self.assertTrue(any(0 < p < 1 for p in progress), loading)
        self.assertEqual(loading[-1]["stage"], "ready")
        self.assertEqual(loading[-1]["progress"], 1.0)
        tokens = [c.choices[0].delta.content for c in chunks[len(loading):] if c.choices and c.choices[0].delta.content]
        self.assertTrue(1 <= len(tokens) <= 3, tokens)
        self.assertEqual([c.choices[0].finish_reason for c in chunks if c.choices][-1], "length")

    async def prefill(self, url: str, model_id: str, words: int, seed: int) -> tuple[float, bytes]:
        """
        A streaming request with a prompt of about ``2 * words`` tokens to a model that is
        loaded; how long the client waited for the first byte, and the whole body.
        """
        client, _ = make_client(self)
        status, _ = await post_chat(client, url, model_id, max_tokens=1)
        self.assertEqual(status, 200)
        prompt = " ".join(f"w{(i * 7 + seed) % 89}" for i in range(words))
        body = {"model": model_id, "stream": True, "max_tokens": 3, "temperature": 0, "cache_prompt": False,
                "messages": [{"role": "user", "content": prompt}]}
        sent_at = reactor.seconds()
        response = await client.post(url + "/v1/chat/completions", data=json.dumps(body).encode(),
                                      headers={b"content-type": [b"application/json"]}, unbuffered=True)
        silence = reactor.seconds() - sent_at  # twisted.web sends the head with the first byte
        body_bytes = await response.content()
        self.assertEqual(response.code, 200)
        return silence, body_bytes

    def assertAnswered(self, body: bytes) -> None:
        events = sse_data(body)
        self.assertEqual(events[-1], "[DONE]")
        self.assertNotIn('"error"', body.decode("utf-8"))
        chunks = [json.loads(e) for e in events[:-1]]
        self.assertEqual([c["choices"][0]["finish_reason"] for c in chunks if c.get("choices")][-1], "length")

    async def test_long_prefill_is_not_cut(self) -> None:
        """
        llama-server sends the head of a streaming answer at once and then nothing, not even a
        log line, until it has processed the whole prompt (``python -m bench.prefill``). At the
        default settings, and even with ``streamIdleTimeout`` below the silence and a
        health check every half second, a prefill that sends nothing for seconds is answered in
        full, and the model is never taken for hung: its process burns CPU and its health check
        answers while it prefills.
        """
        assert LLAMA_SERVER is not None
        slow = model_file("slow")
        stall = 0.5
        logs = capture_logs(self)
        url, supervisor = self.serve({
            "default": {"cmd": llama_command(LLAMA_SERVER, slow)},
            "strict": {"cmd": llama_command(LLAMA_SERVER, slow), "streamIdleTimeout": stall,
                       "healthCheckInterval": 0.5},
        })

        # About 480 prompt tokens, near the model's 512: 2.8 to 5.6 s of prefill on an idle
        # 2-core machine (python -m bench.prefill --tokens 460 --ctx 512).
        _, body = await self.prefill(url, "default", 230, seed=0)
        self.assertAnswered(body)
        silence, body = await self.prefill(url, "strict", 230, seed=1)
        self.assertAnswered(body)

        self.assertGreater(silence, stall * 1.25, "the prefill was too quick to test anything")
        self.assertEqual(logs.messages("stopped responding"), [])
        self.assertEqual(supervisor.upstreams["strict"].state.value, "ready")

    test_long_prefill_is_not_cut.timeout = 180  # type: ignore[attr-defined]

    async def test_bad_model_path_is_502_naming_exit_code_and_error_line(self) -> None:
        """
        A llama-server that cannot open its model: the client gets a 502 JSON error with the exit
        code and llama-server's own last words.
        """
        missing = os.path.abspath(os.path.join(self.mktemp(), "missing.gguf"))
        url, _ = self.serve({"broken": {"cmd": llama_command(self.llama_server, missing)}})

        error = await deferToThread(chat_error, url, "broken")

        self.assertEqual(error.status_code, 502)
        self.assertEqual(error.response.headers["content-type"].split(";")[0], "application/json")
        message = error.body["message"] if isinstance(error.body, dict) else str(error.body)
        self.assertIn("model 'broken' failed to start", message)
        self.assertIn("exit code 1", message)
        self.assertIn("exiting due to model loading error", message)
        self.assertIn("failed to load model", message)
        self.assertEqual(llama_servers_under(os.getpid()), [])

    async def test_bad_model_path_in_the_loading_stream(self) -> None:
        """
        The same failure on a streaming request with the loading stream on: the last loading
        event says why, then comes an SSE error event, then ``[DONE]``.
        """
        missing = os.path.abspath(os.path.join(self.mktemp(), "missing.gguf"))
        url, _ = self.serve({"broken": {"cmd": llama_command(self.llama_server, missing)}}, sendLoadingState=True)
        client, _ = make_client(self)

        response = await client.post(
            url + "/v1/chat/completions",
            data=json.dumps({"model": "broken", "stream": True, "messages": [{"role": "user", "content": "hi"}]}).encode(),
            headers={b"content-type": [b"application/json"]},
        )
        body = await response.content()

        self.assertEqual(response.code, 200)
        events = sse_data(body)
        self.assertEqual(events[-1], "[DONE]")
        error = json.loads(events[-2])["error"]
        self.assertIn("exit code 1", error["message"])
        self.assertIn("exiting due to model loading error", error["message"])
        reason = json.loads(events[-3])
        self.assertEqual(reason["swapproxy"]["stage"], "failed")
        text = reason["choices"][0]["delta"]["reasoning_content"]
        self.assertIn("Model broken could not be started: process exited with exit code 1", text)
        self.assertIn("Last output: ", text)
        self.assertIn("exiting due to model loading error", text)


class TwistdShutdownTests(TestCase):
    """
    ``twistd swapproxy`` with llama-server children, stopped as supervisord stops it.
    """

    timeout = 60
    skip = None if LLAMA_SERVER is not None else HOW_TO_GET_ONE

    async def test_sigterm_leaves_no_llama_server(self) -> None:
        """
        Two models loaded side by side (a group that does not swap), then SIGTERM: twistd exits
        only after both llama-servers are gone.
        """
        assert LLAMA_SERVER is not None
        tiny_a, tiny_b = model_file("tiny", 0), model_file("tiny", 1)
        text = config_text(
            {"tiny-a": {"cmd": llama_command(LLAMA_SERVER, tiny_a)},
             "tiny-b": {"cmd": llama_command(LLAMA_SERVER, tiny_b)}},
            groups={"together": {"swap": False, "members": ["tiny-a", "tiny-b"]}},
        )
        port = free_port()
        process = spawn_twistd(self, write_config(self, text), port)
        client, pool = make_client(self)
        url = f"http://127.0.0.1:{port}"
        await wait_for_http(client, url + "/health", process)
        for model_id in ("tiny-a", "tiny-b"):
            status, answer = await post_chat(client, url, model_id, max_tokens=1)
            self.assertEqual(status, 200, process.text)
            self.assertEqual(answer["model"], model_id)
        assert process.pid is not None
        running = llama_servers_under(process.pid)
        self.assertEqual(len(running), 2, [p.cmdline() for p in running])
        await pool.closeCachedConnections()

        process.signal(signal.SIGTERM)
        status = await process.ended

        self.assertIn(status, (0, -signal.SIGTERM), process.text)
        self.assertNotIn("Traceback", process.text)
        left = survivors(running)
        self.assertEqual(left, [], f"llama-server outlived swapproxy: {[p.pid for p in left]}")


def words(count: int, seed: int) -> str:
    """
    A user message of ``count`` made-up words (about three tokens each), different per ``seed``.
    """
    return " ".join(f"w{seed}x{i}" for i in range(count))


class SlotCacheTests(TestCase):
    """
    ``slotCache`` with real llama-servers: a conversation's slot is saved when its model is
    swapped out and restored when it comes back, so that the next turn reuses the prompt.
    """

    timeout = 120
    skip = None if LLAMA_SERVER is not None else HOW_TO_GET_ONE

    def serve(self, models: dict[str, dict[str, Any]], **top: Any) -> tuple[str, Supervisor, LogCapture]:
        """
        swapproxy with a slot cache in ``self.slots``, in this process; the cleanups stop it all.
        """
        assert LLAMA_SERVER is not None
        self.slots = os.path.abspath(self.mktemp())
        config = parse_config(config_text(models, **top), "test.yaml")
        logs = capture_logs(self)
        supervisor = Supervisor(config, reactor)
        cache = SlotCache(lambda: supervisor.config.slot_cache, reactor, self.slots)
        supervisor.each_upstream(cache.follow)
        cache.startService()
        self.addCleanup(cache.stopService)  # after the supervisor's stop: cleanups run last first
        supervisor.startService()
        self.addCleanup(supervisor.stopService)
        metrics = Metrics(supervisor, reactor)
        cache.export(metrics.registry)
        site = build_site(supervisor, reactor, metrics=metrics)
        factory = TrackingFactory(site)
        listening = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(listening.stopListening)
        self.addCleanup(factory.close_all)
        self.client, _ = make_client(self)
        return f"http://127.0.0.1:{listening.getHost().port}", supervisor, logs

    def two_models(self, **top: Any) -> dict[str, dict[str, Any]]:
        """
        ``chat`` (slot cache on, one slot) and ``other``, in one swap group.
        """
        assert LLAMA_SERVER is not None
        return {
            "chat": {"cmd": llama_command(LLAMA_SERVER, model_file("tiny", 0)), "slotCache": True},
            "other": {"cmd": llama_command(LLAMA_SERVER, model_file("tiny", 1))},
        }

    async def turn(self, url: str, messages: list[dict[str, str]], model: str = "chat") -> dict[str, Any]:
        status, answer = await post_chat(self.client, url, model, messages=messages, max_tokens=4, temperature=0)
        self.assertEqual(status, 200, answer)
        return answer

    async def first_turn(self, url: str, seed: int) -> tuple[list[dict[str, str]], dict[str, Any]]:
        """
        A first turn of about 260 prompt tokens; the conversation so far, and the answer.
        """
        messages = [{"role": "user", "content": words(50, seed)}]
        answer = await self.turn(url, messages)
        self.assertLess(answer["timings"]["cache_n"], 20, "a new conversation: at most the template's first tokens")
        messages.append({"role": "assistant", "content": answer["choices"][0]["message"]["content"]})
        messages.append({"role": "user", "content": "and then?"})
        return messages, answer

    def saved_files(self) -> list[str]:
        return sorted(name for name in os.listdir(self.slots) if name.endswith(".slot"))

    async def get_json(self, url: str) -> Any:
        response = await self.client.get(url)
        return json.loads(await response.content())

    async def test_a_conversation_comes_back_after_a_swap_without_paying_its_prompt(self) -> None:
        """
        The conversation's slot is saved when ``chat`` is swapped out, and restored when it comes
        back: llama-server reports the whole first turn as cached tokens of the next one, and
        /running and /metrics show the save and the restore.
        """
        assert LLAMA_SERVER is not None
        url, supervisor, logs = self.serve(self.two_models())
        messages, first = await self.first_turn(url, 1)
        self.assertIn("--slot-save-path", supervisor.upstreams["chat"].command or ())
        await self.turn(url, [{"role": "user", "content": "hi"}], "other")
        self.assertEqual(len(self.saved_files()), 1, "the slot was saved as chat stopped")
        saves = [e for e in logs.messages("slot cache: {action} {count}") if e["action"] == "saved"]
        self.assertEqual(len(saves), 1)

        second = await self.turn(url, messages)

        held = first["usage"]["prompt_tokens"] + first["usage"]["completion_tokens"]
        self.assertGreaterEqual(second["timings"]["cache_n"], first["usage"]["prompt_tokens"])
        self.assertLessEqual(second["timings"]["cache_n"], held)
        self.assertLess(second["timings"]["prompt_n"], first["usage"]["prompt_tokens"] / 4, "only the new turn")
        running = {entry["model"]: entry for entry in (await self.get_json(url + "/running"))["running"]}
        report = running["chat"]["slot_cache"]
        self.assertEqual((report["restored"]["slots"], report["saved"]["slots"], report["files"]), (1, 1, 1))
        self.assertEqual(report["last_restore"]["bytes"], os.path.getsize(os.path.join(self.slots, self.saved_files()[0])))
        response = await self.client.get(url + "/metrics")
        text = (await response.content()).decode("utf-8")
        self.assertIn('swapproxy_slot_cache_restored_slots_total{model="chat"} 1.0', text)
        self.assertIn('swapproxy_slot_cache_saved_slots_total{model="chat"} 1.0', text)

    async def test_the_oldest_files_go_past_the_budget(self) -> None:
        """
        With room for one file, the second conversation's file replaces the first's.
        """
        url, _, logs = self.serve(self.two_models(), slotCache={"enabled": False, "maxSize": "250KiB"})
        await self.first_turn(url, 2)
        await self.turn(url, [{"role": "user", "content": "hi"}], "other")
        [first] = self.saved_files()
        await self.first_turn(url, 3)
        await self.turn(url, [{"role": "user", "content": "hi"}], "other")
        files = self.saved_files()
        self.assertEqual(len(files), 1, files)
        self.assertNotEqual(files, [first])
        self.assertEqual(len(logs.messages("to stay within maxSize and minFree")), 1)

    async def test_a_corrupt_file_is_skipped_and_the_model_starts(self) -> None:
        """
        A truncated file (this llama-server aborts when asked to restore one) is left out with a
        log line: the model starts, answers, and its prompt is processed in full.
        """
        url, supervisor, logs = self.serve(self.two_models())
        messages, _ = await self.first_turn(url, 4)
        await self.turn(url, [{"role": "user", "content": "hi"}], "other")
        [name] = self.saved_files()
        path = os.path.join(self.slots, name)
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)

        second = await self.turn(url, messages)

        self.assertLess(second["timings"]["cache_n"], 20, "the prompt is processed in full")
        self.assertEqual(len(logs.messages("not restoring {name} into {model}: {problem}")), 1)
        self.assertEqual(self.saved_files(), [])
        self.assertEqual(supervisor.upstreams["chat"].state, State.READY)
        self.assertEqual(len(llama_servers_under(os.getpid())), 1)

"""
The loading stream end to end: real clients (the openai and anthropic Python SDKs) stream through
a cold load of a real fake-upstream process, then the model's own stream, over loopback.

swapproxy runs in this process (a `Supervisor` and `build_site` with a `LoadHistory` in the test's
temporary directory); its children are ``tests/fake_upstream.py --load-time 1.5 --stage-lines``,
which prints llama-server's loading lines and tensor dots.
"""

from __future__ import annotations

import json
import os
from typing import Any

import anthropic
import openai
import treq
from twisted.internet import reactor
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool

from swapproxy.config import parse_config
from swapproxy.progress import LoadHistory
from swapproxy.supervisor import Supervisor
from swapproxy.testing.local import fake_command
from swapproxy.web.root import build_site
from tests.support.live import TrackingFactory, config_yaml, loading_status, openai_client, visible

LOAD_TIME = "1.5"
TOKENS = 6
#: The text the fake upstream generates.
ANSWER = "".join(f"tok{i} " for i in range(TOKENS))
FIELDS = ("reasoning_content", "reasoning", "content", "none")


class Proxy:
    """
    swapproxy on a loopback port of this process.
    """

    def __init__(self, supervisor: Supervisor, port: int, history_path: str) -> None:
        self.supervisor = supervisor
        self.url = f"http://127.0.0.1:{port}"
        self.history_path = history_path


def model(*args: str, **keys: Any) -> dict[str, Any]:
    """
    A model running the fake upstream with a loading time and stage lines.
    """
    entry: dict[str, Any] = {
        "cmd": fake_command("--load-time", LOAD_TIME, "--stage-lines", "--tokens", str(TOKENS), *args)
    }
    entry.update(keys)
    return entry


def chat_stream(url: str, model_id: str, **extra: Any) -> list[Any]:
    """
    Stream one chat completion with the openai SDK (in a thread); returns every chunk.
    """
    client = openai_client(url)
    try:
        stream = client.chat.completions.create(
            model=model_id, messages=[{"role": "user", "content": "hi"}], stream=True, **extra
        )
        return list(stream)
    finally:
        client.close()


def chat_stream_until_error(url: str, model_id: str) -> tuple[list[Any], BaseException | None]:
    """
    Like `chat_stream`, but returns the chunks read before the SDK raised, and what it raised.
    """
    client = openai_client(url)
    chunks: list[Any] = []
    try:
        for chunk in client.chat.completions.create(
            model=model_id, messages=[{"role": "user", "content": "hi"}], stream=True
        ):
            chunks.append(chunk)
    except Exception as e:
        return chunks, e
    finally:
        client.close()
    return chunks, None


class ServingTestCase(TestCase):
    """
    Serves configs in this process; everything is stopped by the test's cleanups.
    """

    timeout = 60

    def serve(self, models: dict[str, dict[str, Any]], config_text: str | None = None,
              history_path: str | None = None, **top: Any) -> tuple[Proxy, str]:
        """
        Serve ``models`` (or ``config_text``) with the loading stream on; returns the proxy and
        the config text (to serve the same config again).
        """
        text = config_text or config_yaml(models, sendLoadingState=True, **top)
        config = parse_config(text, "test.yaml")
        if history_path is None:
            directory = self.mktemp()
            os.makedirs(directory)
            history_path = os.path.join(directory, "load-times.json")
        supervisor = Supervisor(config, reactor)
        supervisor.startService()
        self.addCleanup(supervisor.stopService)
        factory = TrackingFactory(build_site(supervisor, reactor, LoadHistory(history_path)))
        listening = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(listening.stopListening)
        self.addCleanup(factory.close_all)
        return Proxy(supervisor, listening.getHost().port, history_path), text


class ChatEndToEndTests(ServingTestCase):
    """
    ``/v1/chat/completions`` through the openai SDK.
    """

    def assertLoadThenAnswer(self, chunks: list[Any], field: str, model_id: str,
                             requested: str | None = None) -> list[dict[str, Any]]:
        """
        The chunks are: loading chunks (text in ``field``, each naming the model as the client
        asked for it), then the model's own chunks, whose content is the whole answer, and
        nothing of the answer before. Returns the loading statuses.
        """
        statuses = [loading_status(chunk) for chunk in chunks]
        loading = [s for s in statuses if s is not None]
        count = len(loading)
        self.assertEqual(statuses[:count], loading, "the loading chunks all come first")
        self.assertTrue(all(chunk.object == "chat.completion.chunk" for chunk in chunks))
        loading_chunks, model_chunks = chunks[:count], chunks[count:]
        self.assertEqual({chunk.model for chunk in loading_chunks}, {requested or model_id} if count else set())
        self.assertEqual(len({chunk.id for chunk in loading_chunks}), min(1, count))
        texts = []
        for chunk in loading_chunks:
            delta = chunk.choices[0].delta
            texts.append(delta.content if field == "content" else (delta.model_extra or {}).get(field))
            self.assertIsNone(chunk.choices[0].finish_reason)
        self.assertTrue(all(isinstance(text, str) for text in texts), texts)
        answer = "".join(chunk.choices[0].delta.content or "" for chunk in model_chunks if chunk.choices)
        self.assertEqual(answer, ANSWER)
        if count:
            progress = [s["progress"] for s in loading if s["stage"] in ("loading", "ready")]
            self.assertEqual(progress, sorted(progress), "progress never goes back")
            self.assertEqual(loading[-1]["stage"], "ready")
            self.assertEqual(loading[-1]["progress"], 1.0)
            self.assertIn(f"Loading {model_id}: ", "".join(texts))
        return loading

    async def test_openai_sdk_streams_through_a_cold_load_in_every_field_mode(self) -> None:
        """
        For each ``loadingStateField``, the openai SDK parses every chunk of a cold load followed
        by the model's stream, and the model's tokens all arrive after the loading text.
        """
        proxy, _ = self.serve({field: model(loadingStateField=field) for field in FIELDS})
        for field in FIELDS:
            chunks = await deferToThread(chat_stream, proxy.url, field)
            loading = self.assertLoadThenAnswer(chunks, field, field)
            if field == "none":
                self.assertEqual(loading, [], "no loading chunk reaches the SDK in mode none")
            else:
                stages = [s["stage"] for s in loading]
                self.assertIn("loading", stages)
                percents = [s["progress"] for s in loading if s["stage"] == "loading"]
                self.assertTrue(any(0 < p < 1 for p in percents), loading)

    async def test_content_mode_text_then_answer(self) -> None:
        """
        With ``content``, a client that only reads ``delta.content`` sees the loading text and
        then, after it, the whole answer.
        """
        proxy, _ = self.serve({"qwen": model(loadingStateField="content")})
        chunks = await deferToThread(chat_stream, proxy.url, "qwen")
        content = visible("".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices))
        self.assertTrue(content.startswith("\nStarting qwen"), content)
        before, _, after = content.partition(").\n\n")
        self.assertIn("\nModel qwen is ready (waited ", before)
        self.assertIn("Loading qwen: ", before)
        self.assertEqual(after, ANSWER)

    async def test_none_mode_sends_comment_lines(self) -> None:
        """
        ``none`` puts the progress in SSE comment lines, which a raw reader can see.
        """
        proxy, _ = self.serve({"qwen": model(loadingStateField="none")})
        pool = HTTPConnectionPool(reactor, persistent=False)
        self.addCleanup(pool.closeCachedConnections)
        response = await treq.post(
            proxy.url + "/v1/chat/completions",
            data=json.dumps({"model": "qwen", "stream": True, "messages": [{"role": "user", "content": "hi"}]}).encode(),
            headers={b"content-type": [b"application/json"]},
            agent=Agent(reactor, pool=pool),
        )
        body = (await response.content()).decode("utf-8")
        loading, _, rest = body.partition("data: ")
        lines = [line for line in loading.split("\n") if line]
        self.assertTrue(lines)
        self.assertTrue(all(line.startswith(": ") for line in lines), lines)
        self.assertEqual(lines[0], ": Starting qwen.")
        self.assertTrue(any(line.startswith(": Loading qwen: ") for line in lines), lines)
        self.assertTrue(lines[-1].startswith(": Model qwen is ready"), lines)
        self.assertTrue(rest.rstrip().endswith("data: [DONE]"))

    async def test_alias_is_echoed(self) -> None:
        proxy, _ = self.serve({"qwen": model(aliases=["qwen-latest"])})
        chunks = await deferToThread(chat_stream, proxy.url, "qwen-latest")
        self.assertLoadThenAnswer(chunks, "reasoning_content", "qwen", requested="qwen-latest")

    async def test_failed_load_through_the_openai_sdk(self) -> None:
        """
        A model that exits while loading: the SDK yields the loading chunks, the last of them
        saying why, then raises an `openai.APIError` carrying swapproxy's message, which names the
        exit code and the model's last line.
        """
        proxy, _ = self.serve({"qwen": model("--exit-during-load", "3")})
        chunks, error = await deferToThread(chat_stream_until_error, proxy.url, "qwen")
        self.assertIsInstance(error, openai.APIError)
        assert isinstance(error, openai.APIError)
        self.assertIn("exit code 3", error.message)
        self.assertIn("error: failed to load model 'fake.gguf'", error.message)
        self.assertIsInstance(error.body, dict)
        self.assertTrue(chunks)
        last = loading_status(chunks[-1])
        assert last is not None
        self.assertEqual(last["stage"], "failed")
        text = (chunks[-1].choices[0].delta.model_extra or {})["reasoning_content"]
        self.assertIn("could not be started: process exited with exit code 3 while starting", text)
        self.assertIn("Last output: error: failed to load model 'fake.gguf'", text)
        self.assertTrue(all(loading_status(chunk) is not None for chunk in chunks))

    async def test_next_cold_load_knows_how_long_the_last_one_took(self) -> None:
        """
        The load durations are kept in the state file: after a restart of swapproxy, the next
        cold load of the model shows an estimate from the start.
        """
        proxy, text = self.serve({"qwen": model()})
        chunks = await deferToThread(chat_stream, proxy.url, "qwen")
        first = loading_status(chunks[0])
        assert first is not None
        self.assertIsNone(first["eta"])
        self.assertEqual(visible((chunks[0].choices[0].delta.model_extra or {})["reasoning_content"]), "\nStarting qwen.")
        await proxy.supervisor.stopService()
        with open(proxy.history_path, encoding="utf-8") as f:
            (took,) = json.load(f)["qwen"]["durations"]
        self.assertGreaterEqual(took, float(LOAD_TIME))

        again, _ = self.serve({}, config_text=text, history_path=proxy.history_path)
        chunks = await deferToThread(chat_stream, again.url, "qwen")
        first = loading_status(chunks[0])
        assert first is not None
        # The estimate counts down from the last duration as soon as the process is spawned.
        self.assertLessEqual(abs(first["eta"] - took), 0.2, (first, took))
        self.assertEqual(visible((chunks[0].choices[0].delta.model_extra or {})["reasoning_content"]),
                         f"\nStarting qwen (it took {took:.1f} s last time).")
        self.assertLoadThenAnswer(chunks, "reasoning_content", "qwen")


def messages_client(url: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=url, api_key="unused", max_retries=0, timeout=60)


def raw_message_events(url: str, model_id: str) -> list[Any]:
    """
    ``messages.create(stream=True)``: every raw event the anthropic SDK yields.
    """
    client = messages_client(url)
    try:
        stream = client.messages.create(
            model=model_id, max_tokens=64, messages=[{"role": "user", "content": "hi"}], stream=True
        )
        return list(stream)
    finally:
        client.close()


def stream_helper(url: str, model_id: str) -> tuple[list[str], list[str], Any]:
    """
    ``messages.stream()``: the text and thinking the helper reports, and its final message.
    """
    client = messages_client(url)
    try:
        texts: list[str] = []
        thinking: list[str] = []
        with client.messages.stream(
            model=model_id, max_tokens=64, messages=[{"role": "user", "content": "hi"}]
        ) as stream:
            for event in stream:
                if event.type == "text":
                    texts.append(event.text)
                elif event.type == "thinking":
                    thinking.append(event.thinking)
            return texts, thinking, stream.get_final_message()
    finally:
        client.close()


def messages_until_error(url: str, model_id: str) -> tuple[list[Any], BaseException | None]:
    client = messages_client(url)
    events: list[Any] = []
    try:
        for event in client.messages.create(
            model=model_id, max_tokens=64, messages=[{"role": "user", "content": "hi"}], stream=True
        ):
            events.append(event)
    except Exception as e:
        return events, e
    finally:
        client.close()
    return events, None


class MessagesEndToEndTests(ServingTestCase):
    """
    ``/v1/messages`` through the anthropic SDK.
    """

    async def test_raw_events_through_a_cold_load(self) -> None:
        """
        The anthropic SDK yields every raw event: the loading text as thinking deltas, then
        the model's text deltas, all of them, after the thinking.
        """
        proxy, _ = self.serve({"qwen": model()})
        events = await deferToThread(raw_message_events, proxy.url, "qwen")
        types = [event.type for event in events]
        self.assertEqual(types[:3], ["message_start", "content_block_start", "content_block_delta"])
        self.assertEqual(events[1].content_block.type, "thinking")
        thinking = [e for e in events if e.type == "content_block_delta" and e.delta.type == "thinking_delta"]
        text = [e for e in events if e.type == "content_block_delta" and e.delta.type == "text_delta"]
        self.assertIn("Loading qwen: ", "".join(e.delta.thinking for e in thinking))
        self.assertEqual("".join(e.delta.text for e in text), ANSWER)
        self.assertLess(events.index(thinking[-1]), events.index(text[0]))
        self.assertEqual(types[-1], "message_stop")

    async def test_content_block_indices_are_consistent(self) -> None:
        """
        In one Messages stream, each content block has its own index, and every delta goes to
        a block of its kind: the SDK's stream helpers rely on it.
        """
        proxy, _ = self.serve({"qwen": model()})
        events = await deferToThread(raw_message_events, proxy.url, "qwen")
        self.assertEqual([e.type for e in events].count("message_start"), 1, [e.type for e in events])
        blocks: dict[int, str] = {}
        for event in events:
            if event.type == "content_block_start":
                self.assertNotIn(event.index, blocks, "a content block index is used twice")
                blocks[event.index] = event.content_block.type
            elif event.type == "content_block_delta":
                kind = {"thinking_delta": "thinking", "text_delta": "text"}[event.delta.type]
                self.assertEqual(blocks[event.index], kind)

    async def test_stream_helper_final_message(self) -> None:
        """
        ``messages.stream()``: the helper reports the model's text, and the final message holds
        a thinking block with the loading text and a text block with the answer.
        """
        proxy, _ = self.serve({"qwen": model()})
        texts, thinking, final = await deferToThread(stream_helper, proxy.url, "qwen")
        self.assertIn("Loading qwen: ", "".join(thinking))
        self.assertEqual([block.type for block in final.content], ["thinking", "text"])
        self.assertIn("Loading qwen: ", final.content[0].thinking)
        self.assertEqual("".join(texts), ANSWER)
        self.assertEqual(final.content[1].text, ANSWER)
        # The usage is the model's, as a request to the loaded model reports it: not the 0 of
        # the loading stream's message_start.
        _, _, warm = await deferToThread(stream_helper, proxy.url, "qwen")
        self.assertEqual([block.type for block in warm.content], ["text"])
        self.assertGreater(warm.usage.input_tokens, 0)
        self.assertEqual((final.usage.input_tokens, final.usage.output_tokens),
                         (warm.usage.input_tokens, warm.usage.output_tokens))

    async def test_failed_load_is_an_anthropic_error(self) -> None:
        """
        A load that fails raises the SDK's API error with swapproxy's message, after the
        thinking deltas that said why.
        """
        proxy, _ = self.serve({"qwen": model("--exit-during-load", "3")})
        events, error = await deferToThread(messages_until_error, proxy.url, "qwen")
        self.assertIsInstance(error, anthropic.APIStatusError)
        assert isinstance(error, anthropic.APIStatusError)
        self.assertIn("exit code 3", str(error))
        thinking = "".join(e.delta.thinking for e in events
                           if e.type == "content_block_delta" and e.delta.type == "thinking_delta")
        self.assertIn("could not be started: process exited with exit code 3", thinking)

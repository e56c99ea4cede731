"""
Tests for the loading stream (L{swapproxy.web.loading}, L{swapproxy.web.sse}): what a client that
streams a request for a model that is not ready reads, byte by byte, on a `Clock`.

The whole route runs in memory (`tests.support.processharness`): the client's HTTP/1.1 request
goes through the real `Site` over a `StringTransport`, the `Supervisor` runs real `Upstream`
objects whose child processes are fakes (the test prints their llama-server lines and ends them),
their health probes answer what the test says, and their HTTP client is a fake whose responses the
test writes.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionLost, ConnectionRefusedError
from twisted.trial.unittest import SynchronousTestCase

from swapproxy.upstream import StartStep, State, Upstream
from swapproxy.web.filters import strip_loading_text
from swapproxy.web.sse import LOADING_TEXT_END, LOADING_TEXT_START
from tests.support.live import visible
from tests.support.processharness import (
    CHAT,
    EPOCH,
    FAILURE_LINES,
    MESSAGES,
    STAGE_LINES,
    ProcessHarness,
    UpstreamResponse,
    chat_body,
    config_text,
    messages_body,
)
from tests.support.rawhttp import Event, RawConnection, parse_events


def upstream_chat_chunks(words: list[str]) -> list[bytes]:
    """
    The events of an upstream chat stream: a role chunk, one chunk per word, a final chunk.
    """
    common = {"id": "chatcmpl-upstream", "object": "chat.completion.chunk", "created": EPOCH + 7, "model": "qwen"}
    chunks = [dict(common, choices=[{"index": 0, "delta": {"role": "assistant", "content": ""},
                                     "finish_reason": None}])]
    chunks += [dict(common, choices=[{"index": 0, "delta": {"content": word}, "finish_reason": None}])
               for word in words]
    chunks.append(dict(common, choices=[{"index": 0, "delta": {}, "finish_reason": "stop"}]))
    return [b"data: " + json.dumps(chunk).encode() + b"\n\n" for chunk in chunks] + [b"data: [DONE]\n\n"]


def upstream_messages_events(words: list[str]) -> list[bytes]:
    def event(name: str, payload: dict[str, Any]) -> bytes:
        return f"event: {name}\ndata: {json.dumps(payload)}\n\n".encode()

    message = {"id": "msg_upstream", "type": "message", "role": "assistant", "model": "qwen", "content": [],
               "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": 3, "output_tokens": 0}}
    out = [event("message_start", {"type": "message_start", "message": message}),
           event("content_block_start", {"type": "content_block_start", "index": 0,
                                         "content_block": {"type": "text", "text": ""}})]
    out += [event("content_block_delta", {"type": "content_block_delta", "index": 0,
                                          "delta": {"type": "text_delta", "text": word}}) for word in words]
    out += [event("content_block_stop", {"type": "content_block_stop", "index": 0}),
            event("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn",
                                                                      "stop_sequence": None},
                                    "usage": {"output_tokens": len(words)}}),
            event("message_stop", {"type": "message_stop"})]
    return out


# -- what the client reads ---------------------------------------------------------------------


def is_loading_chunk(event: Event) -> bool:
    return event.data is not None and event.data.startswith("{") and "swapproxy" in event.json()


def loading_lines(client: RawConnection) -> list[tuple[str, str]]:
    """
    (stage, text) of each chat loading chunk the client has read, in order.
    """
    lines = []
    for event in client.events():
        if is_loading_chunk(event):
            chunk = event.json()
            delta = chunk["choices"][0]["delta"]
            text = next(value for key, value in delta.items() if key != "role")
            lines.append((chunk["swapproxy"]["stage"], visible(text)))
    return lines


class LoadingTestCase(SynchronousTestCase):
    """
    One model ``qwen`` (alias ``qwen-alias``) unless a test builds its own harness.
    """

    def setUp(self) -> None:
        self.harness = ProcessHarness(self, config_text(qwen="aliases: [qwen-alias]"))

    def assertCompleteChunks(self, events: list[Event], model: str, field: str = "reasoning_content") -> str:
        """
        Every event is a complete ``chat.completion.chunk`` of one response; returns its id.
        """
        self.assertTrue(events, "no events")
        ids = set()
        for index, event in enumerate(events):
            self.assertIsNone(event.name)
            chunk = event.json()
            ids.add(chunk["id"])
            self.assertTrue(chunk["id"].startswith("chatcmpl-"), chunk)
            self.assertEqual(chunk["object"], "chat.completion.chunk")
            self.assertEqual(chunk["created"], EPOCH)
            self.assertEqual(chunk["model"], model)
            self.assertEqual(len(chunk["choices"]), 1)
            choice = chunk["choices"][0]
            self.assertEqual(choice["index"], 0)
            self.assertIsNone(choice["finish_reason"])
            expected_keys = {"role", field} if index == 0 else {field}
            self.assertEqual(set(choice["delta"]), expected_keys, chunk)
            if index == 0:
                self.assertEqual(choice["delta"]["role"], "assistant")
            self.assertIsInstance(choice["delta"][field], str)
            status = chunk["swapproxy"]
            self.assertIn(status["stage"], {"queued", "stopping", "starting", "loading", "ready", "failed"})
            self.assertLessEqual({"stage", "progress", "elapsed", "eta"}, set(status))
            for key in ("progress", "eta"):
                self.assertTrue(status[key] is None or isinstance(status[key], (int, float)), status)
            self.assertIsInstance(status["elapsed"], (int, float))
        self.assertEqual(len(ids), 1, "one id per response")
        return ids.pop()

    def cold_load(self, client: RawConnection, model_id: str = "qwen") -> None:
        """
        Take ``model_id`` through a load: stage lines, tensor dots, ready.
        """
        harness = self.harness
        harness.advance(1)
        harness.prints(model_id, STAGE_LINES)
        harness.advance(1)
        harness.prints(model_id, "." * 50)
        harness.advance(1)
        harness.prints(model_id, "." * 50 + "\nllama_context: constructing llama_context\n")
        harness.advance(1)
        harness.become_ready(model_id)


class ResponseStartTests(LoadingTestCase):
    """
    The 200, the SSE headers and the first event go out at once.
    """

    def test_headers_and_first_event_before_any_time_passes(self) -> None:
        client = self.harness.post(CHAT, chat_body(), turn=False)
        self.assertIn(b"Starting qwen.", client.value())
        self.assertEqual(len(self.harness.reactor.spawned), 0)
        self.harness.reactor.advance(0)
        status, headers = client.head()
        self.assertEqual(status, 200)
        self.assertEqual(headers.getRawHeaders(b"content-type"), [b"text/event-stream; charset=utf-8"])
        self.assertEqual(headers.getRawHeaders(b"cache-control"), [b"no-cache"])
        self.assertEqual(headers.getRawHeaders(b"x-accel-buffering"), [b"no"])
        self.assertIsNone(headers.getRawHeaders(b"content-length"))
        events = client.events()
        self.assertEqual(len(events), 1)
        self.assertCompleteChunks(events, "qwen")
        self.assertEqual(loading_lines(client), [("starting", "\nStarting qwen.")])
        self.assertFalse(client.finished)

    def test_first_tick_does_not_repeat_the_first_line(self) -> None:
        """
        Nothing new after the first event: the next event, a second later, is a dot, not the
        same sentence again.
        """
        client = self.harness.post(CHAT, chat_body())
        self.harness.advance(1)
        self.assertEqual(loading_lines(client), [("starting", "\nStarting qwen."), ("starting", ".")])


    def test_first_event_before_the_old_model_is_stopped(self) -> None:
        """
        A request that needs another model stopped (a swap) has its head and first event
        written before that model is signalled, and before its own model is spawned.
        """
        harness = self.harness = ProcessHarness(self, config_text(llama="", qwen=""))
        harness.lease("llama").release()
        old = harness.process("llama")
        client = harness.post(CHAT, chat_body(), turn=False)
        self.assertIn(b"Stopping llama to make room for qwen.", client.value())
        signals = [signal for process in harness.reactor.spawned for signal in process.signals]
        self.assertEqual((signals, len(harness.reactor.spawned)), ([], 1))
        harness.reactor.advance(0)
        self.assertEqual(old.signals, [15])
        old.exit(0)
        self.assertEqual(harness.process("qwen").command[-1], "/models/qwen.gguf")


class EventSequenceTests(LoadingTestCase):
    """
    What a client reads while its model waits, stops another model, starts, loads and is ready.
    """

    def test_queued_stopping_starting_loading_ready(self) -> None:
        harness = self.harness = ProcessHarness(self, config_text(llama="", qwen="aliases: [qwen-alias]"))
        busy = harness.lease("llama")
        client = harness.post(CHAT, chat_body("qwen-alias"))
        harness.advance(2)
        busy.release()
        harness.advance(1)
        self.assertEqual(harness.process("llama").signals, [15])
        harness.process("llama").exit(0)
        harness.advance(1)
        harness.prints("qwen", STAGE_LINES)
        harness.advance(1)
        harness.become_ready("qwen")

        self.assertEqual(
            loading_lines(client),
            [
                ("queued", "\nWaiting for a turn to load qwen: queue position 1; 1 request for llama finishes first,"
                           " then qwen starts."),
                ("queued", "."),
                ("queued", "."),
                ("stopping", "\nStopping llama to make room for qwen."),
                ("starting", "\nStarting qwen."),
                ("loading", "\nLoading qwen: 10% (loading weights, 1.2 s elapsed, no estimate yet)"),
                ("ready", "\nModel qwen is ready (waited 5.2 s).\n\n"),
            ],
        )
        chunks = [event.json() for event in client.events()]
        self.assertCompleteChunks(client.events(), "qwen-alias")
        twins = [chunk["swapproxy"] for chunk in chunks]
        self.assertEqual(twins[0], {"stage": "queued", "model": "qwen", "progress": None, "elapsed": 0.0,
                                    "eta": None, "position": 1, "waiting_for": ["llama"],
                                    "reason": "1 request for llama finishes first, then qwen starts"})
        self.assertEqual(twins[3]["waiting_for"], ["llama"])
        self.assertEqual(twins[5], {"stage": "loading", "model": "qwen", "progress": 0.1, "elapsed": 4.2,
                                    "eta": None, "label": "loading weights"})
        self.assertEqual(twins[6], {"stage": "ready", "model": "qwen", "progress": 1.0, "elapsed": 5.2,
                                    "eta": None})

    def test_model_stream_follows_unchanged(self) -> None:
        """
        Once ready, the request goes upstream and its events reach the client byte for byte,
        after the loading events and in the same response.
        """
        client = self.harness.post(CHAT, chat_body("qwen-alias"))
        self.cold_load(client)
        before = client.body()
        request = self.harness.last_request()
        self.assertEqual(request.url, "http://127.0.0.1:5800/v1/chat/completions")
        self.assertEqual(request.json(), chat_body("qwen-alias"))
        response = request.stream()
        upstream = upstream_chat_chunks(["Hello", ",", " world"])
        for chunk in upstream:
            response.send(chunk)
        self.assertFalse(client.finished)
        response.end()
        body, finished = client.body(), client.finished
        self.assertTrue(finished)
        self.assertEqual(body, before + b"".join(upstream))
        loading = [event for event in client.events() if is_loading_chunk(event)]
        self.assertCompleteChunks(loading, "qwen-alias")
        self.assertEqual(loading_lines(client)[-1][0], "ready")

    def test_ticker_and_relay_never_interleave(self) -> None:
        """
        From the moment the model is ready, only the model's stream is written: a slow model
        gets no dots in the middle of its answer.
        """
        client = self.harness.post(CHAT, chat_body())
        self.cold_load(client)
        response = self.harness.last_request().stream()
        response.send(upstream_chat_chunks(["Hello"])[0])
        before = client.value()
        self.assertEqual(self.harness.tickers(), [])
        self.harness.advance(10)
        self.assertEqual(client.value(), before)

    def test_relay_has_flow_control(self) -> None:
        """
        A client that cannot keep up pauses the model's stream instead of swapproxy buffering it.
        """
        client = self.harness.post(CHAT, chat_body())
        self.cold_load(client)
        response = self.harness.last_request().stream()
        client.transport.producer.pauseProducing()
        self.assertTrue(response.transport.paused)
        client.transport.producer.resumeProducing()
        self.assertFalse(response.transport.paused)

    def test_at_most_one_event_a_second_while_nothing_changes(self) -> None:
        """
        A start that shows no sign of progress is never silent and never floods: over 10 s,
        at most 11 events, and never 2 s without one.
        """
        client = self.harness.post(CHAT, chat_body())
        counts = []
        for _ in range(20):
            before = len(client.events())
            self.harness.advance(0.5)
            counts.append(len(client.events()) - before)
        self.assertLessEqual(sum(counts), 11)
        for window in range(len(counts) - 3):
            self.assertGreater(sum(counts[window:window + 4]), 0, counts)
        self.assertEqual({text for _, text in loading_lines(client)[1:]}, {"."})

    def test_progress_is_throttled_too(self) -> None:
        """
        Tensor dots arriving every tick change the percentage all the time; the client still
        gets about one event a second, each with a higher percentage than the last.
        """
        client = self.harness.post(CHAT, chat_body())
        self.harness.prints("qwen", STAGE_LINES)
        self.harness.advance(1)
        start = len(client.events())
        for _ in range(40):
            self.harness.prints("qwen", "..")
            self.harness.advance(0.25)
        self.assertLessEqual(len(client.events()) - start, 11)
        percents = [chunk["swapproxy"]["progress"] for chunk in (e.json() for e in client.events())
                    if chunk["swapproxy"]["stage"] == "loading"]
        self.assertGreater(len(percents), 5)
        self.assertEqual(percents, sorted(percents))

    def test_estimate_from_the_previous_load(self) -> None:
        """
        The second cold load of a model says how long the first took, and counts down.
        """
        harness = self.harness
        client = harness.post(CHAT, chat_body())
        harness.advance(6)
        harness.become_ready("qwen")
        harness.last_request().respond(UpstreamResponse(200, b"text/event-stream", b"data: [DONE]\n\n"))
        self.assertTrue(client.finished)
        harness.supervisor.unload("qwen")
        harness.process("qwen").exit(0)
        self.assertEqual(harness.upstream("qwen").state, State.STOPPED)

        harness.health["qwen"] = "refused"
        client = harness.post(CHAT, chat_body())
        harness.advance(2)
        chunks = [event.json() for event in client.events()]
        self.assertEqual(visible(chunks[0]["choices"][0]["delta"]["reasoning_content"]),
                         "\nStarting qwen (it took 6.2 s last time).")
        self.assertEqual(chunks[0]["swapproxy"]["eta"], 6.2)
        self.assertEqual(chunks[-1]["swapproxy"]["eta"], 4.2)
        self.assertEqual(chunks[-1]["swapproxy"]["progress"], round(2 / 6.25, 3))


class FieldModeTests(LoadingTestCase):
    """
    ``loadingStateField``: where the loading text goes, globally and per model.
    """

    def run_load(self, config: str, model: str = "qwen") -> tuple[ProcessHarness, RawConnection, bytes]:
        """
        A cold load and a short answer; returns what came before the model's own stream.
        """
        harness = self.harness = ProcessHarness(self, config)
        client = harness.post(CHAT, chat_body(model))
        harness.advance(1)
        harness.prints(model, STAGE_LINES)
        harness.advance(2)
        harness.become_ready(model)
        response = harness.last_request().stream()
        upstream = b"".join(upstream_chat_chunks(["Hi"]))
        response.send(upstream)
        response.end()
        self.assertTrue(client.finished)
        body = client.body()
        self.assertTrue(body.endswith(upstream))
        return harness, client, body[: -len(upstream)]

    def assertTextIn(self, loading: bytes, field: str) -> None:
        events = parse_events(loading)
        self.assertCompleteChunks(events, "qwen", field)
        texts = [visible(event.json()["choices"][0]["delta"][field]) for event in events]
        self.assertEqual(texts[0], "\nStarting qwen.")
        self.assertIn("\nLoading qwen: 10% (loading weights, 1.2 s elapsed, no estimate yet)", texts)
        self.assertTrue(texts[-1].startswith("\nModel qwen is ready"))

    def test_reasoning_content_is_the_default(self) -> None:
        _, _, loading = self.run_load(config_text(qwen=""))
        self.assertTextIn(loading, "reasoning_content")

    def test_reasoning(self) -> None:
        _, _, loading = self.run_load(config_text("loadingStateField: reasoning", qwen=""))
        self.assertTextIn(loading, "reasoning")

    def test_content(self) -> None:
        _, _, loading = self.run_load(config_text("loadingStateField: content", qwen=""))
        self.assertTextIn(loading, "content")

    def test_per_model_field_wins(self) -> None:
        _, _, loading = self.run_load(config_text("loadingStateField: content", qwen="loadingStateField: reasoning"))
        self.assertTextIn(loading, "reasoning")

    def test_none_sends_only_comments(self) -> None:
        """
        ``none``: nothing but SSE comment lines before the model's own stream, so nothing enters
        the conversation; the comments still say what is happening.
        """
        _, _, loading = self.run_load(config_text(qwen="loadingStateField: none"))
        self.assertNotIn(b"data:", loading)
        events = parse_events(loading)
        self.assertTrue(all(event.data is None and event.name is None and event.comments for event in events))
        comments = [line for event in events for line in event.comments]
        self.assertEqual(comments[0], "Starting qwen.")
        self.assertIn("loading", comments)
        self.assertIn("Loading qwen: 10% (loading weights, 1.2 s elapsed, no estimate yet)", comments)
        self.assertEqual(comments[-1], "Model qwen is ready (waited 3.2 s).")


class MarkerTests(LoadingTestCase):
    """
    The loading text is wrapped in invisible markers, so that swapproxy can take it out of the
    history a client sends back (`swapproxy.web.filters.strip_loading_text`).
    """

    run_load = FieldModeTests.run_load

    def marked_text(self, loading: bytes, field: str) -> str:
        return "".join(event.json()["choices"][0]["delta"][field] for event in parse_events(loading))

    def test_whole_text_between_the_markers(self) -> None:
        for field in ("reasoning_content", "reasoning", "content"):
            _, _, loading = self.run_load(config_text(f"loadingStateField: {field}", qwen=""))
            text = self.marked_text(loading, field)
            self.assertTrue(text.startswith(LOADING_TEXT_START + "\nStarting qwen."), text)
            self.assertTrue(text.endswith("ready (waited 3.2 s).\n\n" + LOADING_TEXT_END), text)
            self.assertEqual(strip_loading_text(json.dumps(
                {"messages": [{"role": "assistant", field: text + "Hi"}]}).encode()),
                json.dumps({"messages": [{"role": "assistant", field: "Hi"}]}).encode())

    def test_no_marker_in_comments(self) -> None:
        _, _, loading = self.run_load(config_text(qwen="loadingStateField: none"))
        self.assertNotIn(LOADING_TEXT_START.encode(), loading)
        self.assertNotIn(LOADING_TEXT_END.encode(), loading)

    def test_failed_load_closes_the_text(self) -> None:
        client = self.harness.post(CHAT, chat_body("qwen"))
        self.harness.prints("qwen", FAILURE_LINES)
        self.harness.process("qwen").exit(3)
        texts = [event.json()["choices"][0]["delta"]["reasoning_content"] for event in client.events()
                 if is_loading_chunk(event)]
        self.assertTrue(texts[0].startswith(LOADING_TEXT_START))
        self.assertTrue(texts[-1].endswith(LOADING_TEXT_END))


class FailureTests(LoadingTestCase):
    """
    A load that fails ends the stream with the reason, an error event and ``[DONE]``.
    """

    def test_exit_during_load(self) -> None:
        client = self.harness.post(CHAT, chat_body("qwen-alias"))
        self.harness.prints("qwen", STAGE_LINES)
        self.harness.advance(1)
        self.harness.prints("qwen", FAILURE_LINES)
        self.harness.process("qwen").exit(3)

        events = client.events()
        self.assertTrue(client.finished)
        *loading, error, done = events
        self.assertCompleteChunks(loading, "qwen-alias")
        self.assertEqual(
            loading_lines(client)[-1],
            ("failed", "\nModel qwen could not be started: process exited with exit code 3 while starting. "
                       "Last output: error: failed to load model '/models/qwen.gguf'\n"),
        )
        payload = error.json()
        self.assertEqual(set(payload), {"error"})
        self.assertIn("exit code 3", payload["error"]["message"])
        self.assertIn("error: failed to load model '/models/qwen.gguf'", payload["error"]["message"])
        self.assertEqual(payload["error"]["type"], "server_error")
        self.assertEqual(done.data, "[DONE]")
        self.assertEqual(self.harness.tickers(), [])
        self.assertEqual(self.harness.upstream_requests, [])
        before = client.value()
        self.harness.advance(5)
        self.assertEqual(client.value(), before)

    def test_health_check_timeout(self) -> None:
        harness = self.harness = ProcessHarness(self, config_text(qwen="").replace("healthCheckTimeout: 120",
                                                                            "healthCheckTimeout: 15"))
        client = harness.post(CHAT, chat_body())
        harness.advance(14.75)
        self.assertFalse(client.finished)
        harness.advance(0.25)
        self.assertTrue(client.finished)
        *_, error, done = client.events()
        self.assertEqual(loading_lines(client)[-1],
                         ("failed", "\nModel qwen could not be started: health check timed out after 15s: "
                                    "no output and no new health answer for 15s (healthCheckTimeout) "
                                    "(last answer: refused)\n"))
        self.assertIn("health check timed out after 15s", error.json()["error"]["message"])
        self.assertEqual(done.data, "[DONE]")


class UpstreamAnswerTests(LoadingTestCase):
    """
    After the loading events, whatever the model answers, the client reads valid SSE only.
    """

    def answer_after_load(
        self, response: UpstreamResponse | Exception, path: str = CHAT
    ) -> tuple[RawConnection, bytes]:
        client = self.harness.post(path, chat_body() if path == CHAT else messages_body())
        self.harness.advance(1)
        self.harness.become_ready("qwen")
        loading = client.body()
        request = self.harness.last_request()
        if isinstance(response, Exception):
            request.answer.errback(response)
        else:
            request.respond(response)
        self.assertTrue(client.finished)
        body = client.body()
        self.assertTrue(body.startswith(loading))
        return client, body[len(loading):]

    def test_error_status_becomes_one_error_event(self) -> None:
        body = b'{"error": {"code": 500, "message": "out of memory", "type": "server_error"}}'
        client, after = self.answer_after_load(UpstreamResponse(500, b"application/json", body))
        self.assertEqual(client.head()[0], 200)
        error, done = parse_events(after)
        self.assertEqual(error.json(), {"error": {"message": "model 'qwen' answered HTTP 500: out of memory",
                                                  "type": "server_error", "code": "internal_error"}})
        self.assertEqual(done.data, "[DONE]")
        self.assertNotIn(body, client.value())

    def test_plain_text_error_status(self) -> None:
        client, after = self.answer_after_load(UpstreamResponse(404, b"text/plain", b"File Not Found"))
        error, done = parse_events(after)
        self.assertEqual(error.json()["error"]["message"], "model 'qwen' answered HTTP 404: File Not Found")
        self.assertEqual(done.data, "[DONE]")

    def test_json_instead_of_a_stream_becomes_an_error_event(self) -> None:
        body = b'{"id": "x", "object": "chat.completion", "choices": []}'
        client, after = self.answer_after_load(UpstreamResponse(200, b"application/json", body))
        error, done = parse_events(after)
        self.assertEqual(error.json()["error"]["message"],
                         "model 'qwen' answered with application/json instead of an event stream")
        self.assertEqual(done.data, "[DONE]")
        self.assertNotIn(body, client.value())

    def test_no_answer_becomes_an_error_event(self) -> None:
        _, after = self.answer_after_load(ConnectionRefusedError("connection refused"))
        error, done = parse_events(after)
        self.assertIn("model 'qwen' did not answer", error.json()["error"]["message"])
        self.assertEqual(done.data, "[DONE]")

    def test_stream_cut_short_ends_with_an_error_event(self) -> None:
        client = self.harness.post(CHAT, chat_body())
        self.harness.advance(1)
        self.harness.become_ready("qwen")
        response = self.harness.last_request().stream()
        first = upstream_chat_chunks(["Hello"])[:2]
        for chunk in first:
            response.send(chunk)
        response.end(ConnectionLost("the model crashed"))
        self.assertTrue(client.finished)
        body = client.body()
        head, _, tail = body.partition(b"".join(first))
        self.assertTrue(tail)
        error, done = parse_events(tail)
        self.assertIn("model 'qwen' ended the stream early", error.json()["error"]["message"])
        self.assertEqual(done.data, "[DONE]")

    def test_messages_error_status_is_an_anthropic_error_event(self) -> None:
        body = b'{"error": {"code": 400, "message": "max_tokens is too large", "type": "invalid_request_error"}}'
        client, after = self.answer_after_load(UpstreamResponse(400, b"application/json", body), MESSAGES)
        (error,) = parse_events(after)
        self.assertEqual(error.name, "error")
        self.assertEqual(error.json(), {"type": "error", "error": {
            "type": "api_error", "message": "model 'qwen' answered HTTP 400: max_tokens is too large"}})
        self.assertNotIn(b"[DONE]", client.value())


class RestartTests(LoadingTestCase):
    """
    A model that died a moment ago, unnoticed, still looks ready: the request that finds its
    port closed restarts it, and the client's loading stream carries on through the new load.
    """

    def crash_after_ready(self, client: RawConnection) -> bytes:
        """
        Load the model; it dies before the request reaches it. Returns what the client read by
        the time the model is started again.
        """
        harness = self.harness
        harness.advance(1)
        harness.become_ready("qwen")
        first = harness.process("qwen")
        harness.crash_unreaped("qwen")
        harness.last_request().answer.errback(ConnectionRefusedError("connection refused"))
        self.assertEqual(first.signals, [15])
        self.assertFalse(client.finished)
        first.exit(None, signum=9)
        self.assertEqual(len(harness.reactor.spawned), 2)
        return client.body()

    def test_chat_stream_resumes_through_the_restart(self) -> None:
        harness = self.harness
        client = harness.post(CHAT, chat_body())
        self.crash_after_ready(client)
        self.assertEqual(harness.upstream("qwen").state, State.STARTING)
        harness.advance(1)
        harness.become_ready("qwen")
        self.assertEqual(len(harness.upstream_requests), 2)
        response = harness.last_request().stream()
        upstream = upstream_chat_chunks(["Hello"])
        for chunk in upstream:
            response.send(chunk)
        response.end()
        self.assertTrue(client.finished)
        body = client.body()
        self.assertTrue(body.endswith(b"".join(upstream)), body)
        loading = parse_events(body[: -len(b"".join(upstream))])
        self.assertCompleteChunks(loading, "qwen")
        stages = [stage for stage, _ in loading_lines(client)]
        self.assertEqual(stages[0], "starting")
        self.assertEqual(stages.count("ready"), 2)
        self.assertEqual(stages[-1], "ready")
        restarted = [text for _, text in loading_lines(client) if "exited before it answered" in text]
        self.assertEqual(restarted, ["\nModel qwen exited before it answered; starting it again."
                                     "\nStarting qwen (it took 1.2 s last time)."])
        self.assertEqual(harness.supervisor.in_flight["qwen"], 0)
        self.assertEqual(harness.tickers(), [])

    def test_messages_blocks_stay_consistent_through_the_restart(self) -> None:
        """
        The resumed loading text opens a second thinking block, and the model's own blocks are
        numbered after both.
        """
        harness = self.harness
        client = harness.post(MESSAGES, messages_body())
        self.crash_after_ready(client)
        harness.become_ready("qwen")
        response = harness.last_request().stream()
        for event in upstream_messages_events(["Hi"]):
            response.send(event)
        response.end()
        self.assertTrue(client.finished)
        events = client.events()
        self.assertEqual([event.name for event in events].count("message_start"), 1)
        starts = [event.json() for event in events if event.name == "content_block_start"]
        self.assertEqual([(e["index"], e["content_block"]["type"]) for e in starts],
                         [(0, "thinking"), (1, "thinking"), (2, "text")])
        opened: set[int] = set()
        for event in events:
            payload = event.json()
            index = payload.get("index")
            if event.name == "content_block_start":
                self.assertNotIn(index, opened)
                opened.add(index)
            elif event.name in ("content_block_delta", "content_block_stop"):
                self.assertIn(index, opened, event)
                if event.name == "content_block_stop":
                    opened.discard(index)
        self.assertEqual(opened, set())
        self.assertEqual(events[-1].name, "message_stop")

    def test_a_second_failure_is_an_error_event(self) -> None:
        """
        One restart only: a model that cannot be reached again ends the stream with an error event.
        """
        harness = self.harness
        client = harness.post(CHAT, chat_body())
        self.crash_after_ready(client)
        harness.become_ready("qwen")
        harness.crash_unreaped("qwen")
        harness.last_request().answer.errback(ConnectionRefusedError("connection refused"))
        self.assertTrue(client.finished)
        *_, error, done = client.events()
        self.assertIn("model 'qwen' did not answer", error.json()["error"]["message"])
        self.assertEqual(done.data, "[DONE]")
        self.assertEqual(len(harness.reactor.spawned), 2)


class StartStepTests(LoadingTestCase):
    """
    What a start hook does once the model is loaded (restoring saved slots) is a stage of its
    own, and the request reaches the model only after it.
    """

    def test_restoring_is_its_own_stage_before_the_request_goes_upstream(self) -> None:
        harness = self.harness
        restored: Deferred[None] = Deferred()
        label = "restoring 2 cached conversations, 1.1 GB"

        def restore(upstream: Upstream) -> Deferred[None]:
            upstream.start_step = StartStep("restoring", label, 0.0)
            return restored

        harness.upstream("qwen").start_hooks.append(restore)
        client = harness.post(CHAT, chat_body())
        harness.advance(1)
        harness.health["qwen"] = 200
        harness.advance(0.5)
        harness.upstream("qwen").start_step = StartStep("restoring", label, 0.5)
        harness.advance(1)
        self.assertEqual(harness.upstream("qwen").state, State.STARTING)
        self.assertEqual(harness.upstream_requests, [], "nothing reaches the model while it restores")
        restored.callback(None)
        harness.advance(0.25)

        self.assertEqual(harness.upstream("qwen").state, State.READY)
        self.assertEqual(len(harness.upstream_requests), 1)
        self.assertEqual(
            loading_lines(client),
            [
                ("starting", "\nStarting qwen."),
                ("starting", "."),
                ("restoring", f"\nLoaded qwen; {label}: 0% (1.2 s elapsed)"),
                ("restoring", f"\nLoaded qwen; {label}: 50% (1.8 s elapsed)"),
                ("ready", "\nModel qwen is ready (waited 2.5 s).\n\n"),
            ],
        )
        twins = [event.json()["swapproxy"] for event in client.events() if is_loading_chunk(event)]
        self.assertEqual(twins[3], {"stage": "restoring", "model": "qwen", "progress": 0.5, "elapsed": 1.8,
                                    "eta": None, "label": label})


class ErrorCodeTests(LoadingTestCase):
    """
    An error's ``code`` is a string (or null) wherever swapproxy writes one, as in OpenAI's API:
    a JSON error, an error event of a loading stream, an error event after a model's stream.
    """

    def codes(self, *clients: RawConnection) -> list[Any]:
        found = []
        for client in clients:
            status, headers = client.head()
            if headers.getRawHeaders(b"content-type") == [b"application/json"]:
                found.append(json.loads(client.body())["error"]["code"])
            else:
                found += [e.json()["error"]["code"] for e in client.events() if e.data and '"error"' in e.data]
        return found

    def test_every_error_code_is_a_string(self) -> None:
        harness = self.harness = ProcessHarness(self, config_text(qwen="concurrencyLimit: 2", broken=""))
        unknown = harness.post(CHAT, chat_body("nope"))
        failed = harness.post(CHAT, chat_body("broken"))
        harness.process("broken").exit(1)
        first, second = harness.post(CHAT, chat_body()), harness.post(CHAT, chat_body())
        refused = harness.post(CHAT, chat_body())
        harness.become_ready("qwen")
        harness.upstream_requests[0].respond(UpstreamResponse(503, b"application/json", b'{"error": "busy"}'))
        cut = harness.upstream_requests[1].stream()
        cut.end(ConnectionLost("the model crashed"))
        clients = [unknown, refused, failed, first, second]
        self.assertTrue(all(client.finished for client in clients))
        codes = self.codes(*clients)
        self.assertEqual(len(codes), 5, codes)
        self.assertEqual([type(code) for code in codes], [str] * 5, codes)


    def test_shutdown_during_load_has_one_code_streaming_or_not(self) -> None:
        """
        swapproxy stopping (SIGTERM) while a model loads: the stream ends with an error event
        whose code is the one a non-streaming request reads in its JSON answer.
        """
        streaming = self.harness.post(CHAT, chat_body())
        plain = self.harness.post(CHAT, chat_body(stream=False))
        self.harness.advance(1)
        self.harness.supervisor.stopService()
        self.harness.advance(10)
        self.assertTrue(streaming.finished and plain.finished)
        self.assertEqual(plain.head()[0], 503)
        self.assertEqual(self.codes(streaming), self.codes(plain))
        self.assertEqual(self.codes(plain), ["shutting_down"])


class DisconnectTests(LoadingTestCase):
    """
    A client that hangs up while its model loads.
    """

    def test_hang_up_while_loading(self) -> None:
        """
        The ticker stops, nothing more is written, the request leaves the queue, and the load
        carries on for the next request, which gets the model without a second start.
        """
        harness = self.harness
        client = harness.post(CHAT, chat_body())
        harness.prints("qwen", STAGE_LINES)
        harness.advance(2)
        client.close()
        self.assertEqual(harness.tickers(), [])
        self.assertEqual(harness.supervisor.queued("qwen"), 0)
        before = client.value()
        harness.advance(10)
        self.assertEqual(client.value(), before)
        self.assertEqual(harness.upstream("qwen").state, State.STARTING)

        second = harness.post(CHAT, chat_body())
        self.assertEqual(loading_lines(second)[0][0], "loading")
        harness.become_ready("qwen")
        self.assertEqual(len(harness.reactor.spawned), 1)
        self.assertEqual(len(harness.upstream_requests), 1)
        response = harness.last_request().stream()
        for chunk in upstream_chat_chunks(["Hi"]):
            response.send(chunk)
        response.end()
        self.assertTrue(second.finished)
        self.assertEqual(client.value(), before)

    def test_hang_up_while_relaying_stops_the_model_stream(self) -> None:
        harness = self.harness
        client = harness.post(CHAT, chat_body())
        harness.advance(1)
        harness.become_ready("qwen")
        response = harness.last_request().stream()
        response.send(upstream_chat_chunks(["Hi"])[0])
        client.close()
        self.assertTrue(response.transport.stopped)
        self.assertEqual(harness.supervisor.in_flight["qwen"], 0)

    def test_two_clients_share_one_load(self) -> None:
        """
        Each client reads its own response (its own id), from the same load.
        """
        harness = self.harness
        first = harness.post(CHAT, chat_body())
        harness.advance(1)
        second = harness.post(CHAT, chat_body("qwen-alias"))
        harness.advance(1)
        first.close()
        harness.advance(1)
        harness.become_ready("qwen")
        self.assertEqual(len(harness.reactor.spawned), 1)
        ids = {first.events()[0].json()["id"], second.events()[0].json()["id"]}
        self.assertEqual(len(ids), 2)
        self.assertEqual(loading_lines(second)[-1][0], "ready")


class MessagesTests(LoadingTestCase):
    """
    ``/v1/messages``: the loading text as an Anthropic ``thinking`` block.
    """

    def test_event_sequence(self) -> None:
        harness = self.harness
        client = harness.post(MESSAGES, messages_body("qwen-alias"))
        harness.advance(2)
        harness.prints("qwen", STAGE_LINES)
        harness.advance(1)
        harness.become_ready("qwen")
        loading = client.body()
        response = harness.last_request().stream()
        upstream = upstream_messages_events(["Hello", " there"])
        for event in upstream:
            response.send(event)
        response.end()
        self.assertTrue(client.finished)
        spliced = client.body()[len(loading):]
        # The model's message_start is dropped (the loading stream sent one), its content blocks
        # move up one index past the thinking block, its message_delta carries the usage of the
        # dropped message_start, and the other events pass byte for byte.
        model_events = parse_events(spliced)
        self.assertEqual([event.name for event in model_events],
                         ["content_block_start", "content_block_delta", "content_block_delta",
                          "content_block_stop", "message_delta", "message_stop"])
        self.assertEqual([event.json().get("index") for event in model_events], [1, 1, 1, 1, None, None])
        self.assertEqual([event.json() for event in model_events[:2]][1]["delta"],
                         {"type": "text_delta", "text": "Hello"})
        self.assertEqual(model_events[4].json(), {"type": "message_delta",
                                                  "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                                                  "usage": {"input_tokens": 3, "output_tokens": 2}})
        self.assertTrue(spliced.endswith(upstream[-1]))

        events = parse_events(loading)
        self.assertEqual([event.name for event in events],
                         ["message_start", "content_block_start", "content_block_delta", "ping", "ping",
                          "content_block_delta", "content_block_delta", "content_block_stop"])
        for event in events:
            self.assertEqual(event.json()["type"], event.name)
        start = events[0].json()["message"]
        self.assertTrue(start["id"].startswith("msg_"))
        self.assertEqual((start["type"], start["role"], start["model"], start["content"]),
                         ("message", "assistant", "qwen-alias", []))
        self.assertEqual(start["usage"], {"input_tokens": 0, "output_tokens": 0})
        self.assertEqual(events[1].json()["content_block"], {"type": "thinking", "thinking": "", "signature": ""})
        deltas = [event.json() for event in events if event.name == "content_block_delta"]
        self.assertEqual([delta["index"] for delta in deltas], [0, 0, 0])
        self.assertEqual([delta["delta"]["type"] for delta in deltas], ["thinking_delta"] * 3)
        self.assertEqual(
            [(delta["swapproxy"]["stage"], visible(delta["delta"]["thinking"])) for delta in deltas],
            [
                ("starting", "\nStarting qwen."),
                ("loading", "\nLoading qwen: 10% (loading weights, 2.2 s elapsed, no estimate yet)"),
                ("ready", "\nModel qwen is ready (waited 3.2 s).\n\n"),
            ],
        )
        self.assertEqual(events[-1].json(), {"type": "content_block_stop", "index": 0})

    def test_field_none(self) -> None:
        """
        With ``none``, no thinking block: comment lines and pings until the model's own stream.
        """
        harness = self.harness = ProcessHarness(self, config_text(qwen="loadingStateField: none"))
        client = harness.post(MESSAGES, messages_body())
        harness.advance(2)
        harness.become_ready("qwen")
        events = client.events()
        self.assertEqual([(event.name, event.comments) for event in events],
                         [("message_start", ()), (None, ("Starting qwen.",)), ("ping", ()), ("ping", ()),
                          (None, ("Model qwen is ready (waited 2.2 s).",))])
        self.assertEqual(events[2].json(), {"type": "ping"})

    def test_failed_load(self) -> None:
        harness = self.harness
        client = harness.post(MESSAGES, messages_body())
        harness.advance(1)
        harness.prints("qwen", FAILURE_LINES)
        harness.process("qwen").exit(3)
        self.assertTrue(client.finished)
        events = client.events()
        self.assertEqual([event.name for event in events[-3:]], ["content_block_delta", "content_block_stop", "error"])
        last = events[-3].json()
        self.assertEqual(last["swapproxy"]["stage"], "failed")
        self.assertIn("exit code 3", last["delta"]["thinking"])
        error = events[-1].json()
        self.assertEqual(error["type"], "error")
        self.assertEqual(error["error"]["type"], "api_error")
        self.assertIn("exit code 3", error["error"]["message"])
        self.assertNotIn(b"[DONE]", client.value())
        self.assertEqual(harness.tickers(), [])


class WhenTests(LoadingTestCase):
    """
    The loading stream is for streaming chat and messages requests to a model that is not ready,
    with ``sendLoadingState`` on; everything else waits quietly or is refused in plain JSON.
    """

    def assertWaitsSilently(self, client: RawConnection, model_id: str = "qwen") -> None:
        self.harness.advance(3)
        self.assertEqual(client.value(), b"")
        self.harness.become_ready(model_id)

    def test_non_streaming_request_waits(self) -> None:
        client = self.harness.post(CHAT, chat_body(stream=False))
        self.assertWaitsSilently(client)
        body = b'{"id": "chatcmpl-1", "object": "chat.completion", "choices": []}'
        self.harness.last_request().respond(UpstreamResponse(200, b"application/json", body))
        status, headers = client.head()
        self.assertEqual((status, headers.getRawHeaders(b"content-type")), (200, [b"application/json"]))
        self.assertEqual((client.body(), client.finished), (body, True))

    def test_send_loading_state_off(self) -> None:
        self.harness = ProcessHarness(self, config_text(qwen="").replace("sendLoadingState: true", "sendLoadingState: false"))
        client = self.harness.post(CHAT, chat_body())
        self.assertWaitsSilently(client)
        response = self.harness.last_request().stream()
        upstream = b"".join(upstream_chat_chunks(["Hi"]))
        response.send(upstream)
        response.end()
        self.assertEqual((client.body(), client.finished), (upstream, True))

    def test_send_loading_state_off_for_one_model(self) -> None:
        self.harness = ProcessHarness(self, config_text(qwen="sendLoadingState: false"))
        client = self.harness.post(CHAT, chat_body())
        self.assertWaitsSilently(client)

    def test_send_loading_state_on_for_one_model(self) -> None:
        text = config_text(qwen="sendLoadingState: true").replace("sendLoadingState: true\nmodels",
                                                                  "sendLoadingState: false\nmodels")
        self.harness = ProcessHarness(self, text)
        client = self.harness.post(CHAT, chat_body())
        self.assertEqual(loading_lines(client), [("starting", "\nStarting qwen.")])

    def test_ready_model_streams_directly(self) -> None:
        self.harness.lease("qwen").release()
        client = self.harness.post(CHAT, chat_body())
        response = self.harness.last_request().stream()
        upstream = b"".join(upstream_chat_chunks(["Hi"]))
        response.send(upstream)
        response.end()
        self.assertEqual((client.body(), client.finished), (upstream, True))

    def test_other_routes_wait(self) -> None:
        """
        ``/v1/completions`` with ``"stream": true`` has no loading stream: it waits.
        """
        client = self.harness.post("/v1/completions", {"model": "qwen", "stream": True, "prompt": "hi"})
        self.assertWaitsSilently(client)
        self.assertEqual(self.harness.last_request().url, "http://127.0.0.1:5800/v1/completions")

    def test_over_the_concurrency_limit_is_plain_json_429(self) -> None:
        self.harness = ProcessHarness(self, config_text(qwen="concurrencyLimit: 1"))
        first = self.harness.post(CHAT, chat_body())
        second = self.harness.post(CHAT, chat_body())
        status, headers = second.head()
        self.assertEqual(status, 429)
        self.assertEqual(headers.getRawHeaders(b"content-type"), [b"application/json"])
        self.assertEqual(headers.getRawHeaders(b"retry-after"), [b"1"])
        body, finished = second.body(), second.finished
        self.assertTrue(finished)
        self.assertIn("concurrencyLimit", json.loads(body)["error"]["message"])
        self.assertEqual(first.head()[0], 200)
        self.assertEqual(self.harness.supervisor.queued("qwen"), 1)

    def test_unknown_model_is_plain_json_404(self) -> None:
        client = self.harness.post(CHAT, chat_body("nope"))
        status, headers = client.head()
        self.assertEqual((status, headers.getRawHeaders(b"content-type")), (404, [b"application/json"]))
        self.assertEqual(self.harness.reactor.spawned, [])

    def test_accept_encoding_is_not_forwarded(self) -> None:
        """
        A gzip body could not follow the plain SSE text already sent, so the model is never
        asked for one.
        """
        client = self.harness.post(CHAT, chat_body(), {"Accept-Encoding": "gzip, br", "X-Custom": "kept"})
        self.harness.advance(1)
        self.harness.become_ready("qwen")
        headers = self.harness.last_request().headers
        self.assertIsNone(headers.getRawHeaders(b"accept-encoding"))
        self.assertEqual(headers.getRawHeaders(b"x-custom"), [b"kept"])
        self.assertEqual(loading_lines(client)[-1][0], "ready")

"""
Tests for L{swapproxy.metrics}: the usage scanner, token counts, ``GET /metrics``,
``GET /api/metrics`` and the live fields of ``/running``.
"""

from __future__ import annotations

import json
import textwrap
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from twisted.trial.unittest import SynchronousTestCase

from swapproxy.metrics import UsageScanner, token_counts
from swapproxy.upstream import StartError
from tests.support.harness import (
    CHAT_ANSWER,
    Harness,
    answer_event_stream,
    answer_later,
    answer_with,
    header,
    sample,
)

CONFIG = """
    healthCheckTimeout: 15
    metricsMaxInMemory: 2
    models:
      llama:
        cmd: llama-server --port ${PORT}
        ttl: 60
      qwen:
        cmd: llama-server --port ${PORT}
"""

LLAMA_TIMINGS = {
    "cache_n": 3,
    "prompt_n": 12,
    "prompt_ms": 40.0,
    "prompt_per_second": 300.0,
    "predicted_n": 8,
    "predicted_ms": 200.0,
    "predicted_per_second": 40.0,
}


def chunk(content: str, **extra: Any) -> bytes:
    payload = {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": content}}]}
    payload.update(extra)
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


def scan(*pieces: bytes) -> UsageScanner:
    scanner = UsageScanner()
    for piece in pieces:
        scanner.feed(piece)
    return scanner


class UsageScannerTests(SynchronousTestCase):
    """
    Usage and timings are found in whole bodies and in streams, however they are cut.
    """

    def test_json_body(self) -> None:
        body = json.dumps(dict(CHAT_ANSWER, timings=LLAMA_TIMINGS)).encode()
        scanner = scan(body)
        self.assertEqual(scanner.usage, CHAT_ANSWER["usage"])
        self.assertEqual(scanner.timings, LLAMA_TIMINGS)

    def test_any_split(self) -> None:
        """
        Cut anywhere, even one byte at a time, the body gives the same answer.
        """
        body = json.dumps(dict(CHAT_ANSWER, timings=LLAMA_TIMINGS), indent=1).encode()
        for size in (1, 2, 3, 5, 7, 8, 9, 10, 64):
            pieces = [body[i : i + size] for i in range(0, len(body), size)]
            scanner = scan(*pieces)
            self.assertEqual(scanner.usage, CHAT_ANSWER["usage"], size)
            self.assertEqual(scanner.timings, LLAMA_TIMINGS, size)

    def test_openai_stream(self) -> None:
        """
        ``"usage": null`` in every chunk and the counts in the last one (``include_usage``).
        """
        stream = (
            chunk("Hel", usage=None)
            + chunk("lo", usage=None)
            + b'data: {"choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": 2}}\n\n'
            + b"data: [DONE]\n\n"
        )
        self.assertEqual(scan(stream).usage, {"prompt_tokens": 4, "completion_tokens": 2})

    def test_llama_cpp_stream_timings(self) -> None:
        """
        With ``timings_per_token`` every chunk has timings: the last ones win.
        """
        first = dict(LLAMA_TIMINGS, predicted_n=1)
        stream = chunk("a", timings=first) + chunk("b", timings=LLAMA_TIMINGS) + b"data: [DONE]\n\n"
        self.assertEqual(scan(stream).timings, LLAMA_TIMINGS)

    def test_anthropic_stream_merges(self) -> None:
        """
        Input tokens come in ``message_start``, output tokens in ``message_delta``: both count.
        """
        stream = (
            b'event: message_start\ndata: {"type":"message_start","message":{"usage":'
            b'{"input_tokens":25,"output_tokens":1}}}\n\n'
            b'event: content_block_delta\ndata: {"type":"content_block_delta","delta":{"text":"the word \\"usage\\""}}\n\n'
            b'event: message_delta\ndata: {"type":"message_delta","usage":{"output_tokens":15}}\n\n'
        )
        self.assertEqual(scan(stream).usage, {"input_tokens": 25, "output_tokens": 15})

    def test_holds_little_of_a_long_stream(self) -> None:
        """
        A long answer is never kept: between chunks the scanner holds a few bytes, and at most
        its limit while an object is cut off.
        """
        scanner = UsageScanner(limit=4096)
        for i in range(5000):
            scanner.feed(chunk("word %d " % i + "x" * 200))
            self.assertLessEqual(scanner.buffered, 16)
        scanner.feed(b'data: {"choices":[],"usage":{"prompt_tokens":')
        self.assertLessEqual(scanner.buffered, 4096)
        scanner.feed(b'3,"completion_tokens":5000}}\n\n')
        self.assertEqual(scanner.usage, {"prompt_tokens": 3, "completion_tokens": 5000})
        scanner.feed(b'data: {"usage": {"prompt_tokens": "' + b"y" * 10000)
        self.assertLessEqual(scanner.buffered, 4096)

    def test_garbage_is_skipped(self) -> None:
        scanner = scan(b'{"usage": {oops}, "x": 1, "usage": {"prompt_tokens": 2}}')
        self.assertEqual(scanner.usage, {"prompt_tokens": 2})
        self.assertEqual(scan(b'"usage"; "timings": [1, 2]').usage, {})


class TokenCountTests(SynchronousTestCase):
    """
    llama-swap's token-metric fields.
    """

    def test_usage_only(self) -> None:
        self.assertEqual(
            token_counts({"prompt_tokens": 11, "completion_tokens": 7}, {}, 1234.4),
            {"cache_tokens": -1, "input_tokens": 11, "output_tokens": 7, "prompt_per_second": -1,
             "tokens_per_second": -1, "duration_ms": 1234},
        )

    def test_timings_win(self) -> None:
        self.assertEqual(
            token_counts({"prompt_tokens": 11, "completion_tokens": 7}, LLAMA_TIMINGS, 5000),
            {"cache_tokens": 3, "input_tokens": 12, "output_tokens": 8, "prompt_per_second": 300.0,
             "tokens_per_second": 40.0, "duration_ms": 240},
        )

    def test_cached_tokens_from_usage(self) -> None:
        counts = token_counts({"prompt_tokens": 10, "prompt_tokens_details": {"cached_tokens": 6}}, {}, 1)
        assert counts is not None
        self.assertEqual(counts["cache_tokens"], 6)
        counts = token_counts({"input_tokens": 10, "cache_read_input_tokens": 4}, {}, 1)
        assert counts is not None
        self.assertEqual(counts["cache_tokens"], 4)

    def test_nothing_known(self) -> None:
        self.assertIsNone(token_counts({}, {}, 10))
        self.assertIsNone(token_counts({"total_tokens": "many"}, {}, 10))


def families(body: bytes) -> dict[str, Any]:
    return {family.name: family for family in text_string_to_metric_families(body.decode("utf-8"))}


class MetricsEndpointTests(SynchronousTestCase):
    """
    ``GET /metrics`` after real traffic through the Resource tree.
    """

    def setUp(self) -> None:
        self.h = Harness(self, textwrap.dedent(CONFIG))
        self.h.server.respond = answer_with(CHAT_ANSWER)

    def scrape(self) -> bytes:
        response, body = self.h.call("GET", "/metrics")
        self.assertEqual(response.code, 200)
        self.assertEqual(header(response, b"content-type"), [b"text/plain; version=1.0.0; charset=utf-8"])
        return body

    def chat(self, model: str = "llama", **extra: Any) -> tuple[Any, bytes]:
        return self.h.post_json("/v1/chat/completions", dict({"model": model, "messages": []}, **extra))

    def test_families_and_labels(self) -> None:
        """
        Every family is there with its labels, and the text parses as Prometheus text.
        """
        self.chat()
        body = self.scrape()
        found = families(body)
        expected = {
            "swapproxy_requests": ["model", "route", "status"],
            "swapproxy_request_duration_seconds": ["model", "route"],
            "swapproxy_time_to_first_byte_seconds": ["model", "route"],
            "swapproxy_model_load_duration_seconds": ["model"],
            "swapproxy_prompt_tokens": ["model"],
            "swapproxy_generated_tokens": ["model"],
            "swapproxy_model_state": ["model", "state"],
            "swapproxy_requests_in_flight": ["model"],
            "swapproxy_requests_queued": ["model"],
        }
        for name, labels in expected.items():
            self.assertIn(name, found)
            label_sets = {tuple(sorted(set(s.labels) - {"le"})) for s in found[name].samples}
            self.assertEqual(label_sets, {tuple(sorted(labels))}, name)
        for name in ("swapproxy_model_load_failures", "swapproxy_model_swaps", "swapproxy_info",
                     "swapproxy_generation_tokens_per_second", "process_resident_memory_bytes"):
            self.assertIn(name, found)

    def test_request_counts_durations_and_tokens(self) -> None:
        """
        A completion is counted by model, route and status, timed, and its usage counted.
        """
        self.h.upstreams["llama"].auto_ready = False
        pending = self.h.request("POST", "/v1/chat/completions", b'{"model": "llama"}')
        self.h.clock.advance(3)
        self.h.upstreams["llama"].become_ready()
        self.h.flush()
        self.h.read(self.successResultOf(pending))
        self.chat()
        body = self.scrape()
        labels = {"model": "llama", "route": "/v1/chat/completions"}
        self.assertEqual(sample(body, "swapproxy_requests_total", status="200", **labels), 2)
        self.assertEqual(sample(body, "swapproxy_request_duration_seconds_count", **labels), 2)
        self.assertEqual(sample(body, "swapproxy_request_duration_seconds_sum", **labels), 3)
        self.assertEqual(sample(body, "swapproxy_time_to_first_byte_seconds_count", **labels), 2)
        self.assertEqual(sample(body, "swapproxy_time_to_first_byte_seconds_sum", **labels), 3)
        self.assertEqual(sample(body, "swapproxy_model_load_duration_seconds_count", model="llama"), 1)
        self.assertEqual(sample(body, "swapproxy_model_load_duration_seconds_sum", model="llama"), 3)
        self.assertEqual(sample(body, "swapproxy_prompt_tokens_total", model="llama"), 22)
        self.assertEqual(sample(body, "swapproxy_generated_tokens_total", model="llama"), 14)
        self.assertEqual(sample(body, "swapproxy_model_state", model="llama", state="ready"), 1)
        self.assertEqual(sample(body, "swapproxy_model_state", model="llama", state="stopped"), 0)
        self.assertEqual(sample(body, "swapproxy_model_state", model="qwen", state="stopped"), 1)

    def test_tokens_from_a_stream(self) -> None:
        """
        Usage and timings in a streamed answer are counted, as the stream passes.
        """
        self.h.server.respond = answer_event_stream
        pending = self.h.request("POST", "/v1/chat/completions", b'{"model": "llama", "stream": true}')
        upstream_request = self.h.received[-1].request
        self.h.clock.advance(0.5)
        upstream_request.write(chunk("Hel"))
        self.h.flush()
        response = self.successResultOf(pending)
        self.h.clock.advance(2)
        upstream_request.write(chunk("lo", usage={"prompt_tokens": 5, "completion_tokens": 2}))
        upstream_request.write(chunk("", timings=LLAMA_TIMINGS)[:30])
        self.h.flush()
        upstream_request.write(chunk("", timings=LLAMA_TIMINGS)[30:] + b"data: [DONE]\n\n")
        upstream_request.finish()
        self.h.flush()
        body = self.h.read(response)
        self.assertIn(b"[DONE]", body)
        metrics = self.scrape()
        self.assertEqual(sample(metrics, "swapproxy_prompt_tokens_total", model="llama"), 12)
        self.assertEqual(sample(metrics, "swapproxy_generated_tokens_total", model="llama"), 8)
        self.assertEqual(sample(metrics, "swapproxy_cached_prompt_tokens_total", model="llama"), 3)
        self.assertEqual(sample(metrics, "swapproxy_generation_tokens_per_second_sum", model="llama"), 40)
        self.assertEqual(sample(metrics, "swapproxy_generation_tokens_per_second_bucket", model="llama", le="50.0"), 1)
        self.assertEqual(sample(metrics, "swapproxy_prompt_tokens_per_second_sum", model="llama"), 300)
        labels = {"model": "llama", "route": "/v1/chat/completions"}
        self.assertEqual(sample(metrics, "swapproxy_time_to_first_byte_seconds_sum", **labels), 0.5)
        self.assertEqual(sample(metrics, "swapproxy_request_duration_seconds_sum", **labels), 2.5)

    def test_errors_and_hang_ups(self) -> None:
        """
        Statuses are counted as answered; a client that hangs up counts as 499; unknown model
        names never become labels.
        """
        self.h.server.respond = lambda request, received: (request.setResponseCode(500), b"{}")[1]
        self.chat()
        self.chat("no-such-model")
        self.h.server.respond = answer_later
        pending = self.h.request("POST", "/v1/chat/completions", b'{"model": "llama"}')
        pending.cancel()
        self.failureResultOf(pending)
        self.h.flush()
        body = self.scrape()
        route = "/v1/chat/completions"
        self.assertEqual(sample(body, "swapproxy_requests_total", model="llama", route=route, status="500"), 1)
        self.assertEqual(sample(body, "swapproxy_requests_total", model="", route=route, status="404"), 1)
        self.assertEqual(sample(body, "swapproxy_requests_total", model="llama", route=route, status="499"), 1)
        self.assertNotIn(b"no-such-model", body)
        self.assertIsNone(sample(body, "swapproxy_prompt_tokens_total", model="llama"))

    def test_routes_are_fixed_labels(self) -> None:
        """
        The route label is the mounted path, however the client spelled it.
        """
        self.h.post_json("/v1/chat/%63ompletions/", {"model": "llama"})
        self.h.call("GET", "/upstream/llama/health?x=1")
        body = self.scrape()
        self.assertEqual(
            sample(body, "swapproxy_requests_total", model="llama", route="/v1/chat/completions", status="200"), 1
        )
        self.assertEqual(sample(body, "swapproxy_requests_total", model="llama", route="/upstream", status="200"), 1)
        self.assertNotIn(b"%63", body)

    def test_in_flight_and_queued(self) -> None:
        self.h.server.respond = answer_later
        self.h.upstreams["qwen"].auto_ready = False
        self.h.request("POST", "/v1/chat/completions", b'{"model": "llama"}')
        self.h.request("POST", "/v1/chat/completions", b'{"model": "llama"}')
        body = self.scrape()
        self.assertEqual(sample(body, "swapproxy_requests_in_flight", model="llama"), 2)
        self.assertEqual(sample(body, "swapproxy_requests_queued", model="llama"), 0)
        self.h.request("POST", "/v1/chat/completions", b'{"model": "qwen"}')
        body = self.scrape()
        self.assertEqual(sample(body, "swapproxy_requests_queued", model="qwen"), 1)

    def test_swaps_and_failed_loads(self) -> None:
        """
        A swap is counted for the model that needed room, with the one stopped; a failed start
        is counted for its model.
        """
        self.chat("llama")
        self.chat("qwen")
        self.h.upstreams["llama"].start_error = StartError("llama", "exit code 1")
        response, _ = self.chat("llama")
        self.assertEqual(response.code, 502)
        body = self.scrape()
        self.assertEqual(sample(body, "swapproxy_model_swaps_total", model="qwen", stopped="llama"), 1)
        self.assertEqual(sample(body, "swapproxy_model_swaps_total", model="llama", stopped="qwen"), 1)
        self.assertEqual(sample(body, "swapproxy_model_load_failures_total", model="llama"), 1)
        self.assertEqual(sample(body, "swapproxy_model_state", model="llama", state="failed"), 1)

    def test_registries_are_separate(self) -> None:
        """
        Two swapproxy trees in one process count apart.
        """
        other = Harness(self, textwrap.dedent(CONFIG))
        other.server.respond = answer_with(CHAT_ANSWER)
        other.post_json("/v1/chat/completions", {"model": "llama"})
        body = self.scrape()
        self.assertIsNone(sample(body, "swapproxy_requests_total", model="llama"))


class ApiMetricsTests(SynchronousTestCase):
    """
    ``GET /api/metrics``: llama-swap's recent token metrics.
    """

    def setUp(self) -> None:
        self.h = Harness(self, textwrap.dedent(CONFIG))

    def test_records(self) -> None:
        """
        One record per answer with usage, newest last, at most ``metricsMaxInMemory``; answers
        without usage and failed answers leave none.
        """
        self.h.server.respond = answer_with({"choices": []})
        self.h.post_json("/v1/chat/completions", {"model": "llama"})
        for tokens in (1, 2, 3):
            self.h.server.respond = answer_with(dict(CHAT_ANSWER, usage={"prompt_tokens": tokens, "completion_tokens": 1}))
            self.h.post_json("/v1/chat/completions", {"model": "llama"})
        self.h.server.respond = lambda request, received: (request.setResponseCode(503), json.dumps(CHAT_ANSWER).encode())[1]
        self.h.post_json("/v1/chat/completions", {"model": "llama"})
        response, body = self.h.call("GET", "/api/metrics")
        self.assertEqual(response.code, 200)
        self.assertEqual(header(response, b"content-type"), [b"application/json"])
        records = json.loads(body)
        self.assertEqual([r["id"] for r in records], [1, 2])
        self.assertEqual([r["input_tokens"] for r in records], [2, 3])
        self.assertEqual(
            records[-1],
            {"id": 2, "timestamp": "2023-11-14T22:13:20.000000Z", "model": "llama", "cache_tokens": -1,
             "input_tokens": 3, "output_tokens": 1, "prompt_per_second": -1, "tokens_per_second": -1,
             "duration_ms": 0},
        )

    def test_empty(self) -> None:
        response, body = self.h.call("GET", "/api/metrics")
        self.assertEqual(json.loads(body), [])


class RunningTests(SynchronousTestCase):
    """
    ``/running`` tells port, uptime, in-flight requests and the idle time until the TTL.
    """

    def test_idle_until_ttl(self) -> None:
        h = Harness(self, textwrap.dedent(CONFIG))
        h.server.respond = answer_later
        pending = h.request("POST", "/v1/chat/completions", b'{"model": "llama"}')
        h.clock.advance(5)
        _, body = h.call("GET", "/running")
        (entry,) = json.loads(body)["running"]
        self.assertEqual(entry["in_flight"], 1)
        self.assertEqual(entry["uptime"], 5)
        self.assertEqual(entry["port"], h.config.models["llama"].port)
        self.assertIsNone(entry["ttl_remaining"])
        self.assertIsNone(entry["idle"])
        upstream_request = h.received[-1].request
        upstream_request.write(b"{}")
        upstream_request.finish()
        h.flush()
        self.successResultOf(pending)
        h.clock.advance(10)
        _, body = h.call("GET", "/running")
        (entry,) = json.loads(body)["running"]
        self.assertEqual(entry["in_flight"], 0)
        self.assertEqual(entry["idle"], 10)
        self.assertEqual(entry["ttl_remaining"], 50)
        self.assertEqual(entry["uptime"], 15)

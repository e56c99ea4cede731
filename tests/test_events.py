"""
Tests for ``GET /api/events``, the SSE stream for dashboards (L{swapproxy.web.monitor}).
"""

from __future__ import annotations

import json
import textwrap
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from swapproxy.logs import proxy_logger, upstream_logger
from swapproxy.web.monitor import HEARTBEAT
from tests.support.harness import CHAT_ANSWER, LLAMA_SWAP_FIELDS, Harness, answer_later, answer_with, routed
from tests.support.rawhttp import RawConnection, follow, parse_events

CONFIG = """
    models:
      llama:
        cmd: llama-server --port ${PORT}
        name: Llama
      qwen:
        cmd: llama-server --port ${PORT}
        unlisted: true
"""


class EventStreamTests(SynchronousTestCase):
    """
    What a dashboard sees on ``/api/events``.
    """

    def setUp(self) -> None:
        self.logs = routed(self, "proxy")
        self.h = Harness(self, textwrap.dedent(CONFIG), logs=self.logs)
        self.h.server.respond = answer_with(CHAT_ANSWER)

    def connect(self, path: str = "/api/events") -> RawConnection:
        client = follow(self.h.root, path)
        self.addCleanup(client.close)
        return client

    def messages(self, client: RawConnection) -> list[tuple[str, Any]]:
        """
        The (type, decoded data) of every message so far; each must be framed as llama-swap does.
        """
        result = []
        for event in parse_events(client.body()):
            if event.data is None:
                continue
            self.assertEqual(event.name, "message")
            envelope = event.json()
            self.assertEqual(sorted(envelope), ["data", "type"])
            self.assertIsInstance(envelope["data"], str)
            result.append((envelope["type"], json.loads(envelope["data"])))
        return result

    def states(self, client: RawConnection) -> list[dict[str, str]]:
        return [
            {model["id"]: model["state"] for model in data}
            for kind, data in self.messages(client)
            if kind == "modelStatus"
        ]

    def test_headers_and_snapshot(self) -> None:
        """
        The stream opens with SSE headers, every model's state (llama-swap's fields first, then
        the dashboard's) and the recent token metrics.
        """
        client = self.connect()
        status, headers = client.head()
        self.assertEqual(status, 200)
        self.assertEqual(headers.getRawHeaders(b"content-type"), [b"text/event-stream; charset=utf-8"])
        self.assertEqual(headers.getRawHeaders(b"cache-control"), [b"no-cache"])
        self.assertEqual(headers.getRawHeaders(b"x-accel-buffering"), [b"no"])
        (kind, models), metrics = self.messages(client)
        self.assertEqual((kind, metrics), ("modelStatus", ("metrics", [])))
        self.assertEqual(
            [{key: model[key] for key in LLAMA_SWAP_FIELDS} for model in models],
            [
                {"id": "llama", "name": "Llama", "description": "", "state": "stopped", "unlisted": False},
                {"id": "qwen", "name": "", "description": "", "state": "stopped", "unlisted": True},
            ],
        )
        self.assertEqual(list(models[0])[: len(LLAMA_SWAP_FIELDS)], list(LLAMA_SWAP_FIELDS))
        self.assertEqual(
            {key: models[0][key] for key in ("status", "group", "in_flight", "queued", "progress", "last_failure")},
            {"status": "stopped", "group": "(default)", "in_flight": 0, "queued": 0, "progress": None,
             "last_failure": None},
        )

    def test_sequence_on_a_load(self) -> None:
        """
        A request that loads a model shows it starting, then ready, then the request's end and
        its token metrics.
        """
        client = self.connect()
        self.h.upstreams["llama"].auto_ready = False
        pending = self.h.request("POST", "/v1/chat/completions", b'{"model": "llama"}')
        self.h.clock.advance(2)
        self.h.upstreams["llama"].become_ready()
        self.h.flush()
        self.h.read(self.successResultOf(pending))
        kinds = [kind for kind, _ in self.messages(client)]
        self.assertEqual(
            kinds, ["modelStatus", "metrics", "modelStatus", "modelStatus", "request", "metrics", "model"]
        )
        self.assertEqual(
            [states["llama"] for states in self.states(client)], ["stopped", "starting", "ready"]
        )
        messages = self.messages(client)
        starting = messages[2][1][0]
        self.assertEqual((starting["status"], starting["queued"], starting["uptime"]), ("starting", 1, 0.0))
        request = messages[4][1]
        tokens = request.pop("tokens")
        self.assertEqual(
            request,
            {"model": "llama", "route": "/v1/chat/completions", "status": 200, "time": 1_700_000_002.0,
             "duration_ms": 2000, "ttfb_ms": 2000, "client": "127.0.0.1", "metrics_id": 0},
        )
        self.assertEqual((tokens["input_tokens"], tokens["output_tokens"]), (11, 7))
        (record,) = messages[5][1]
        self.assertEqual((record["id"], record["model"], record["input_tokens"], record["output_tokens"]),
                         (0, "llama", 11, 7))
        # The request it waited for has gone: nothing queued or in flight any more.
        done = messages[6][1]
        self.assertEqual((done["id"], done["status"], done["queued"], done["in_flight"]), ("llama", "ready", 0, 0))

    def test_swap_and_failed_request(self) -> None:
        """
        A swap shows the old model stopping and the new one starting; a request that fails is
        reported with its status and no metrics.
        """
        self.h.post_json("/v1/chat/completions", {"model": "llama"})
        client = self.connect()
        self.h.server.respond = lambda request, received: (request.setResponseCode(500), b"oops")[1]
        self.h.post_json("/v1/chat/completions", {"model": "qwen"})
        self.assertEqual(
            self.states(client),
            [
                {"llama": "ready", "qwen": "stopped"},
                {"llama": "stopping", "qwen": "stopped"},
                {"llama": "stopped", "qwen": "stopped"},
                {"llama": "stopped", "qwen": "starting"},
                {"llama": "stopped", "qwen": "ready"},
            ],
        )
        requests = [data for kind, data in self.messages(client) if kind == "request"]
        self.assertEqual([(r["model"], r["status"]) for r in requests], [("qwen", 500)])
        self.assertNotIn("metrics_id", requests[0])

    def test_heartbeat(self) -> None:
        client = self.connect()
        self.h.clock.advance(HEARTBEAT - 0.1)
        self.assertNotIn(b": ping", client.body())
        self.h.clock.advance(0.1)
        self.assertTrue(client.body().endswith(b": ping\n\n"))
        self.h.clock.advance(HEARTBEAT)
        self.assertEqual(client.body().count(b": ping\n\n"), 2)

    def test_cleanup_on_disconnect(self) -> None:
        """
        A client that leaves stops its heartbeat and receives nothing more.
        """
        before = len(self.h.clock.getDelayedCalls())
        client = follow(self.h.root, "/api/events?logs")
        self.assertEqual(len(self.h.clock.getDelayedCalls()), before + 1)
        self.assertEqual(self.logs.proxy.subscribers, 1)
        client.close()
        self.assertEqual(len(self.h.clock.getDelayedCalls()), before)
        self.assertEqual(self.logs.proxy.subscribers, 0)
        self.assertEqual(self.logs.upstream.subscribers, 0)
        received = client.body()
        self.h.post_json("/v1/chat/completions", {"model": "llama"})
        self.assertEqual(client.body(), received)

    def test_log_data(self) -> None:
        """
        With ``?logs`` the stream carries the log histories, then each new log text.
        """
        proxy_logger("tests.events").info("earlier")
        client = self.connect("/api/events?logs")
        upstream_logger("llama").info("[{model}] {line}", model="llama", line="loaded")
        logs = [data for kind, data in self.messages(client) if kind == "logData"]
        self.assertEqual(
            logs,
            [{"source": "proxy", "data": "[INFO] earlier\n"}, {"source": "upstream", "data": "[llama] loaded\n"}],
        )

    def test_no_logs_unless_asked(self) -> None:
        client = self.connect()
        proxy_logger("tests.events").info("quiet")
        self.assertNotIn("logData", [kind for kind, _ in self.messages(client)])

    def test_slow_dashboard(self) -> None:
        """
        A dashboard that does not read loses whole messages, never the framing, and is told.
        """
        client = self.connect()
        client.pause()
        for _ in range(400):
            self.h.post_json("/v1/chat/completions", {"model": "llama"})
        client.resume()
        events = parse_events(client.body())
        self.assertTrue(any("bytes of events dropped" in c for e in events for c in e.comments))
        self.assertLess(len(client.body()), 100_000)
        self.messages(client)  # every message still parses

    def test_hung_model(self) -> None:
        """
        A model found hung shows ``unhealthy`` until its process has gone, and its failed request
        ends with a 504.
        """
        client = self.connect()
        self.h.server.respond = answer_later
        pending = self.h.request("POST", "/v1/chat/completions", b'{"model": "llama"}')
        llama = self.h.upstreams["llama"]
        llama.mark_unhealthy("its health check (/health) failed 3 times in a row", "health_check")
        self.h.flush()
        self.assertEqual(self.successResultOf(pending).code, 504)
        llama.exited()
        self.assertEqual(
            [states["llama"] for states in self.states(client)], ["stopped", "starting", "ready", "unhealthy", "stopped"]
        )
        [request] = [data for kind, data in self.messages(client) if kind == "request"]
        self.assertEqual((request["model"], request["status"]), ("llama", 504))

"""
Tests for L{swapproxy.board}: what ``/api/events``, ``/running`` and ``/v1/models`` say about each
model (its state, load progress, requests, TTL, last load and failure), with real L{Upstream}s
whose children are fake processes.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase

from swapproxy.board import TICK
from swapproxy.upstream import StartStep, Upstream
from tests.support.harness import LLAMA_SWAP_FIELDS
from tests.support.processharness import (
    CHAT,
    EPOCH,
    FAILURE_LINES,
    STAGE_LINES,
    ProcessHarness,
    UpstreamResponse,
    chat_body,
    config_text,
)
from tests.support.rawhttp import RawConnection, follow, parse_events


def get_json(harness: ProcessHarness, path: str) -> Any:
    """
    ``GET path`` from swapproxy's site; the decoded JSON answer (which must be a 200).
    """
    connection = RawConnection(harness.site)
    connection.request(b"GET", path.encode("ascii"), None)
    assert connection.status_line().startswith(b"HTTP/1.1 200 "), connection.value()
    return json.loads(connection.raw_body())


def restore_on_start(harness: ProcessHarness, step: StartStep) -> Deferred[None]:
    """
    Give qwen a start hook that says it does ``step`` (restoring saved slots) until the
    returned Deferred fires.
    """
    restored: Deferred[None] = Deferred()

    def restore(upstream: Upstream) -> Deferred[None]:
        upstream.start_step = step
        return restored

    harness.upstream("qwen").start_hooks.append(restore)
    return restored


def post(harness: ProcessHarness, path: str) -> tuple[bytes, Any]:
    """
    ``POST path`` with an empty JSON body; the status line and the decoded JSON answer.
    """
    connection = harness.post(path, b"{}")
    return connection.status_line(), json.loads(connection.raw_body())


class Dashboard:
    """
    A dashboard following ``/api/events``.
    """

    def __init__(self, testcase: SynchronousTestCase, harness: ProcessHarness) -> None:
        self.stream = follow(harness.site.resource, "/api/events")
        testcase.addCleanup(self.stream.close)

    def messages(self) -> list[tuple[str, Any]]:
        result = []
        for event in parse_events(self.stream.body()):
            if event.data is not None:
                envelope = event.json()
                result.append((envelope["type"], json.loads(envelope["data"])))
        return result

    def entries(self, model_id: str) -> list[dict[str, Any]]:
        """
        Every entry of ``model_id`` the dashboard was sent, whole lists and single ones, in order.
        """
        found = []
        for kind, data in self.messages():
            if kind == "modelStatus":
                found += [entry for entry in data if entry["id"] == model_id]
            elif kind == "model" and data["id"] == model_id:
                found.append(data)
        return found

    def latest(self, model_id: str) -> dict[str, Any]:
        return self.entries(model_id)[-1]


class ProgressTests(SynchronousTestCase):
    """
    A load's progress, as programs and the dashboard see it.
    """

    def setUp(self) -> None:
        self.harness = ProcessHarness(self, config_text(qwen="ttl: 60"))

    def test_same_numbers_as_the_loading_stream(self) -> None:
        """
        While a model loads, ``/running``, ``/v1/models`` and ``/api/events`` report the fraction,
        stage label and time left that the chat request's loading stream shows at that moment.
        """
        harness = self.harness
        dashboard = Dashboard(self, harness)
        chat = harness.post(CHAT, chat_body())
        harness.prints("qwen", STAGE_LINES + "." * 30)
        harness.advance(TICK)  # the stream sends the new stage at this tick
        shown = [event.json()["swapproxy"] for event in chat.events()][-1]
        self.assertEqual(shown["stage"], "loading")
        (running,) = get_json(harness, "/running")["running"]
        (listed,) = get_json(harness, "/v1/models")["data"]
        for progress in (running["progress"], listed["status"]["progress"], dashboard.latest("qwen")["progress"]):
            self.assertEqual(
                (progress["stage"], progress["fraction"], progress["label"], progress["eta"]),
                (shown["stage"], shown["progress"], shown["label"], shown["eta"]),
            )
            self.assertEqual(progress["percent"], int(shown["progress"] * 100))
        self.assertEqual((running["status"], listed["status"]["state"], listed["status"]["value"]),
                         ("loading", "loading", "loaded"))

    def test_progress_moves_on_the_event_stream(self) -> None:
        """
        The dashboard hears of each new percentage while the tensors load, then of the model
        ready, with how long the load took and no progress any more.
        """
        harness = self.harness
        dashboard = Dashboard(self, harness)
        harness.post(CHAT, chat_body())
        harness.prints("qwen", STAGE_LINES)
        for _ in range(10):
            harness.prints("qwen", "......")
            harness.advance(TICK)
        percents = [e["progress"]["percent"] for e in dashboard.entries("qwen") if e["progress"]
                    and e["progress"]["percent"] is not None]
        self.assertGreaterEqual(len(set(percents)), 8)
        self.assertEqual(percents, sorted(percents))
        self.assertEqual([e["status"] for e in dashboard.entries("qwen")][:3], ["stopped", "queued", "starting"])
        self.assertEqual({e["status"] for e in dashboard.entries("qwen") if e["progress"] and e["progress"]["percent"]},
                         {"loading"})
        harness.become_ready("qwen")
        ready = dashboard.latest("qwen")
        self.assertEqual((ready["status"], ready["state"], ready["progress"]), ("ready", "ready", None))
        self.assertEqual(ready["last_load"], 2.75)
        self.assertEqual(get_json(harness, "/v1/models")["data"][0]["status"], {"value": "loaded", "state": "ready"})

    def test_restoring_saved_slots_is_still_loading(self) -> None:
        """
        While a loaded model restores its saved slots (a start step), the dashboard, ``/running``
        and ``/v1/models`` say ``loading``, with the restore as its stage and label, as the
        loading stream does; not ``starting`` again after the load's last percent.
        """
        harness = self.harness
        label = "restoring 2 cached conversations, 1.1 GB"
        restored = restore_on_start(harness, StartStep("restoring", label, 0.5))
        dashboard = Dashboard(self, harness)
        harness.post(CHAT, chat_body())
        harness.prints("qwen", STAGE_LINES)
        harness.advance(1)
        self.assertEqual(dashboard.latest("qwen")["status"], "loading")
        harness.health["qwen"] = 200
        harness.advance(0.5)
        entry = dashboard.latest("qwen")
        self.assertEqual((entry["status"], entry["progress"]["stage"], entry["progress"]["label"]),
                         ("loading", "restoring", label))
        self.assertEqual(get_json(harness, "/running")["running"][0]["status"], "loading")
        self.assertEqual(get_json(harness, "/v1/models")["data"][0]["status"]["state"], "loading")
        restored.callback(None)
        harness.advance(0.25)
        self.assertEqual(dashboard.latest("qwen")["status"], "ready")

    def test_progress_never_goes_back_during_a_restore(self) -> None:
        """
        A load that got to 95 % (llama-server said the model is loaded), then restores saved
        slots: the dashboard, ``/running`` and llama.cpp's router API (``GET /models`` and
        ``/models/sse``) show its progress going on from there to 100 %, never back to the
        restore's own 0 %.
        """
        harness = self.harness
        label = "restoring 2 cached conversations, 1.1 GB"
        restored = restore_on_start(harness, StartStep("restoring", label, 0.0))
        dashboard = Dashboard(self, harness)
        router = follow(harness.site.resource, "/models/sse")
        self.addCleanup(router.close)

        def router_value() -> float:
            (model,) = get_json(harness, "/models")["data"]
            return float(model["status"]["progress"]["value"])

        def running_fraction() -> float:
            (model,) = get_json(harness, "/running")["running"]
            return float(model["progress"]["fraction"])

        harness.post(CHAT, chat_body())
        harness.prints("qwen", STAGE_LINES + "." * 100 + "\nllama_context: constructing\nmain: model loaded\n")
        harness.advance(TICK)
        looked = [(router_value(), running_fraction())]
        self.assertGreaterEqual(looked[0][0], 0.95)
        harness.health["qwen"] = 200
        harness.advance(0.5)
        self.assertEqual(dashboard.latest("qwen")["progress"]["stage"], "restoring")
        looked.append((router_value(), running_fraction()))
        harness.upstream("qwen").start_step = StartStep("restoring", label, 0.5)
        harness.advance(TICK)
        looked.append((router_value(), running_fraction()))
        restored.callback(None)
        harness.advance(TICK)

        self.assertEqual(looked, sorted(looked))
        self.assertLess(looked[0], looked[-1])
        fractions = [e["progress"]["fraction"] for e in dashboard.entries("qwen")
                     if e["progress"] and e["progress"]["fraction"] is not None]
        self.assertGreaterEqual(len(fractions), 3)
        self.assertEqual(fractions, sorted(fractions))
        self.assertEqual(dashboard.latest("qwen")["status"], "ready")
        events = [event.json() for event in parse_events(router.body()) if event.data is not None]
        values = [e["data"]["progress"]["value"] for e in events if "progress" in e["data"]]
        self.assertGreaterEqual(len(values), 4)
        self.assertEqual(values, sorted(values))
        self.assertEqual((values[-1], events[-1]["data"]["status"]), (1.0, "loaded"))

    def test_a_new_load_starts_from_nothing(self) -> None:
        """
        A model loaded once (to 95 %), unloaded, and loaded again, shows no stale stage or
        percentage at the start of its second load, on the dashboard or in a chat stream.
        """
        harness = self.harness
        harness.post(CHAT, chat_body(stream=False))
        harness.prints("qwen", STAGE_LINES + "." * 100 + "\nllama_context: constructing\nmain: model loaded\n")
        harness.become_ready("qwen")
        harness.last_request().respond(UpstreamResponse(200, b"application/json", b"{}"))
        harness.supervisor.unload("qwen")
        harness.process("qwen").exit(0)
        harness.health["qwen"] = "refused"
        dashboard = Dashboard(self, harness)
        chat = harness.post(CHAT, chat_body())
        starting = dashboard.latest("qwen")["progress"]
        # Only what the time taken by the first load says: nothing done yet.
        self.assertEqual((starting["stage"], starting["fraction"], starting["label"]), ("starting", 0.0, ""))
        self.assertEqual(starting["eta"], starting["expected"])
        first = chat.events()[0].json()
        self.assertEqual(first["swapproxy"]["stage"], "starting")


class EntryTests(SynchronousTestCase):
    """
    The rest of a model's entry: requests, TTL, failures.
    """

    def setUp(self) -> None:
        self.harness = ProcessHarness(
            self,
            config_text(
                "groups:\n  pair:\n    members: [qwen, llama]",
                qwen="ttl: 60\naliases: [q]\nname: Qwen\ndescription: chat",
                llama="",
            ),
        )

    def test_snapshot(self) -> None:
        """
        The first message lists every model with llama-swap's fields and the dashboard's.
        """
        dashboard = Dashboard(self, self.harness)
        kind, entries = dashboard.messages()[0]
        self.assertEqual(kind, "modelStatus")
        self.assertEqual([e["id"] for e in entries], ["llama", "qwen"])
        qwen = entries[1]
        self.assertEqual({key: qwen[key] for key in LLAMA_SWAP_FIELDS},
                         {"id": "qwen", "name": "Qwen", "description": "chat", "state": "stopped", "unlisted": False})
        self.assertEqual(
            {key: qwen[key] for key in ("status", "aliases", "group", "in_flight", "queued", "pid", "uptime", "ttl",
                                        "ttl_remaining", "progress", "last_load", "last_failure")},
            {"status": "stopped", "aliases": ["q"], "group": "pair", "in_flight": 0, "queued": 0, "pid": None,
             "uptime": None, "ttl": 60, "ttl_remaining": None, "progress": None, "last_load": None,
             "last_failure": None},
        )

    def test_requests_and_ttl(self) -> None:
        """
        A request in flight is counted; once it ends the TTL countdown starts, and its deadline
        is sent again when the next request resets it.
        """
        harness = self.harness
        lease = harness.lease("qwen")
        dashboard = Dashboard(self, harness)
        self.assertEqual(dashboard.latest("qwen")["in_flight"], 1)
        harness.advance(5)
        lease.release()
        idle = dashboard.latest("qwen")
        self.assertEqual((idle["in_flight"], idle["ttl_remaining"], idle["uptime"]), (0, 60.0, 5.2))
        sent = len(dashboard.messages())
        harness.advance(10)
        self.assertEqual(len(dashboard.messages()), sent, "the countdown is the reader's to count")
        self.assertEqual(get_json(harness, "/running")["running"][0]["ttl_remaining"], 50.0)
        harness.lease("qwen").release()
        self.assertEqual(dashboard.latest("qwen")["ttl_remaining"], 60.0)

    def test_queued_behind_another_model(self) -> None:
        """
        A model whose request waits for another model of its group to finish is ``queued``;
        when its turn comes it starts.
        """
        harness = self.harness
        lease = harness.lease("qwen")
        dashboard = Dashboard(self, harness)
        harness.supervisor.request("llama")
        llama = dashboard.latest("llama")
        self.assertEqual((llama["status"], llama["queued"]), ("queued", 1))
        lease.release()
        self.assertEqual(dashboard.latest("qwen")["status"], "stopping")
        harness.process("qwen").exit(0)
        self.assertEqual(dashboard.latest("llama")["status"], "starting")

    def test_a_load_is_not_a_waiting_request(self) -> None:
        """
        A load asked for with ``POST /api/models/load`` shows as the model loading, or waiting
        for its turn to load, and never as a request waiting: no one waits for its answer.
        """
        harness = self.harness
        dashboard = Dashboard(self, harness)
        status, _ = post(harness, "/api/models/load/qwen")
        self.assertEqual(status, b"HTTP/1.1 202 Accepted")
        qwen = dashboard.latest("qwen")
        self.assertEqual((qwen["status"], qwen["queued"]), ("starting", 0))
        self.assertEqual(get_json(harness, "/running")["running"][0]["queued"], 0)
        harness.become_ready("qwen")
        lease = harness.lease("qwen")
        # llama's turn comes once qwen's request has ended (they swap).
        post(harness, "/api/models/load/llama")
        llama = dashboard.latest("llama")
        self.assertEqual((llama["status"], llama["queued"]), ("queued", 0))
        harness.supervisor.request("llama")
        self.assertEqual(dashboard.latest("llama")["queued"], 1, "a request for it does wait")
        lease.release()
        harness.process("qwen").exit(0)
        self.assertEqual(dashboard.latest("llama")["status"], "starting")

    def test_failed_load(self) -> None:
        """
        A model whose process dies while loading is ``failed``, with the reason and its last
        output lines; they stay in its entry, no longer current, once a later load succeeds.
        """
        harness = self.harness
        dashboard = Dashboard(self, harness)
        harness.supervisor.request("llama").wait().addErrback(lambda _: None)
        harness.reactor.advance(0)
        harness.prints("llama", FAILURE_LINES)
        harness.process("llama").exit(3)
        failed = dashboard.latest("llama")
        self.assertEqual((failed["status"], failed["state"]), ("failed", "failed"))
        failure = failed["last_failure"]
        self.assertEqual(failure["reason"], "process exited with exit code 3 while starting")
        self.assertEqual(failure["exit_code"], 3)
        self.assertEqual(failure["last_lines"][-1], "error: failed to load model '/models/qwen.gguf'")
        self.assertEqual(failure["time"], EPOCH)
        self.assertEqual(get_json(harness, "/v1/models")["data"][0]["status"], {"value": "unloaded", "state": "failed"})
        harness.advance(1)
        harness.lease("llama").release()
        ready = dashboard.latest("llama")
        self.assertEqual((ready["status"], ready["last_failure"]), ("ready", failure))

    def test_crash_while_ready(self) -> None:
        """
        A ready model whose process dies by itself is stopped, and its entry says so with the
        last lines it printed.
        """
        harness = self.harness
        harness.lease("qwen").release()
        dashboard = Dashboard(self, harness)
        harness.prints("qwen", "GGML_ASSERT(n_tokens <= n_batch) failed\n")
        harness.process("qwen").exit(None, signum=6)
        stopped = dashboard.latest("qwen")
        self.assertEqual(stopped["status"], "stopped")
        self.assertEqual(stopped["last_failure"]["reason"], "the process exited unexpectedly while ready")
        self.assertEqual(stopped["last_failure"]["last_lines"][-1], "GGML_ASSERT(n_tokens <= n_batch) failed")

    def test_hung_model(self) -> None:
        """
        A ready model found hung is ``unhealthy`` with why as its current failure, and the
        failure stays in its entry once it has been killed, as a crash's does.
        """
        harness = self.harness
        harness.lease("qwen").release()
        dashboard = Dashboard(self, harness)
        what = "its health check (/health) failed 3 times in a row (last: no answer within 5s)"
        harness.upstream("qwen").mark_unhealthy(what, "health_check")
        hung = dashboard.latest("qwen")
        self.assertEqual(hung["status"], "unhealthy")
        self.assertEqual(hung["last_failure"]["reason"], "stopped responding: " + what)
        self.assertIsNone(hung["last_failure"]["exit_code"])
        harness.process("qwen").exit(None, signum=9)
        stopped = dashboard.latest("qwen")
        self.assertEqual(stopped["status"], "stopped")
        self.assertEqual(stopped["last_failure"], hung["last_failure"])

    def test_unload_is_no_failure(self) -> None:
        harness = self.harness
        harness.lease("qwen").release()
        dashboard = Dashboard(self, harness)
        harness.supervisor.unload("qwen")
        harness.process("qwen").exit(0)
        self.assertEqual([e["status"] for e in dashboard.entries("qwen")], ["ready", "stopping", "stopped"])
        self.assertIsNone(dashboard.latest("qwen")["last_failure"])

    def test_ticker_only_while_loading_and_watched(self) -> None:
        """
        The progress of a load is looked at only while someone watches and a model loads.
        """
        harness = self.harness

        def board_tickers() -> list[Any]:
            return [
                call for call in harness.reactor.getDelayedCalls()
                if getattr(getattr(call.func, "f", None), "__qualname__", "") == "ModelBoard.refresh"
            ]

        harness.supervisor.request("qwen")
        harness.reactor.advance(0)
        self.assertEqual(board_tickers(), [])
        dashboard = Dashboard(self, harness)
        self.assertEqual(len(board_tickers()), 1)
        harness.become_ready("qwen")
        self.assertEqual(board_tickers(), [])
        harness.supervisor.unload("qwen")
        harness.process("qwen").exit(0)
        harness.supervisor.request("llama")
        harness.reactor.advance(0)
        self.assertEqual(len(board_tickers()), 1)
        dashboard.stream.close()
        self.assertEqual(board_tickers(), [])

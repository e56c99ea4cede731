"""
Tests for L{swapproxy.web.router_api}: llama.cpp's router-mode API (``/models``, ``/models/load``,
``/models/unload``, ``/models/sse``, the router's ``/props``) over swapproxy's models, driven
with the in-memory upstreams of L{tests.support.harness}.
"""

from __future__ import annotations

import json
import textwrap
from typing import Any

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from swapproxy.config import parse_config
from swapproxy.peers import PeerSet
from swapproxy.upstream import StartError, State
from swapproxy.board import TICK
from swapproxy.web.router_api import HEARTBEAT
from tests.support.doubles import FakePeerClient, FakePeerResponse
from tests.support.harness import Harness, header
from tests.support.rawhttp import RawConnection, follow, parse_events

CONFIG = """
    healthCheckTimeout: 15
    models:
      llama:
        cmd: llama-server --port ${PORT} -m /models/llama.gguf
        name: Llama 3.2
        aliases: [fast]
      qwen:
        cmd: llama-server --port ${PORT} -m /models/qwen.gguf
      hidden:
        cmd: llama-server --port ${PORT}
        unlisted: true
"""

#: What llama-server prints while it loads, as the load tracker reads it.
LOAD_LINES = [
    "llama_model_loader: loaded meta data with 30 key-value pairs",
    "load_tensors: loading model tensors, this can take a while...",
]


def print_lines(upstream: Any, lines: list[str]) -> None:
    """
    Make a fake upstream print ``lines``, as its process would.
    """
    for line in lines:
        for observer in list(upstream.line_observers):
            observer(upstream, line)
        for output in list(upstream.output_observers):
            output(upstream, (line + "\n").encode())


def print_dots(upstream: Any, count: int) -> None:
    for output in list(upstream.output_observers):
        output(upstream, b"." * count)


class RouterApiCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.h = Harness(self, textwrap.dedent(CONFIG))

    def get_json(self, path: str) -> tuple[Any, Any]:
        response, body = self.h.call("GET", path)
        return response, json.loads(body)

    def post_json(self, path: str, payload: Any) -> tuple[Any, Any]:
        response, body = self.h.post_json(path, payload)
        return response, json.loads(body)

    def status_of(self, model_id: str) -> dict[str, Any]:
        _, listing = self.get_json("/models")
        return next(entry["status"] for entry in listing["data"] if entry["id"] == model_id)

    def assertLlamaError(self, response: Any, body: Any, status: int, error_type: str, fragment: str) -> None:
        """
        llama.cpp's error shape: ``{"error": {"code": <status as a number>, "message", "type"}}``.
        """
        self.assertEqual(response.code, status, body)
        self.assertEqual(sorted(body["error"]), ["code", "message", "type"])
        self.assertEqual(body["error"]["code"], status)
        self.assertEqual(body["error"]["type"], error_type)
        self.assertIn(fragment, body["error"]["message"])


class ModelListTests(RouterApiCase):
    """
    ``GET /models``: the router's model list with each model's status.
    """

    def test_shape_of_an_unloaded_model(self) -> None:
        response, listing = self.get_json("/models")
        self.assertEqual(response.code, 200)
        self.assertEqual(header(response, b"content-type"), [b"application/json; charset=utf-8"])
        self.assertEqual(listing["object"], "list")
        self.assertEqual([entry["id"] for entry in listing["data"]], ["llama", "qwen"],
                         "unlisted models are not listed")
        llama = listing["data"][0]
        self.assertEqual(
            {key: llama[key]
             for key in ("id", "aliases", "tags", "object", "created", "source", "can_remove", "name")},
            {"id": "llama", "aliases": ["fast"], "tags": [], "object": "model", "created": 1_700_000_000,
             "source": "preset", "can_remove": False, "name": "Llama 3.2"},
        )
        self.assertEqual(llama["architecture"], {"input_modalities": ["text"], "output_modalities": ["text"]})
        self.assertEqual(
            llama["status"],
            {"value": "unloaded", "args": ["llama-server", "--port", str(self.h.config.models["llama"].port),
                                           "-m", "/models/llama.gguf"]},
        )

    def test_loading_with_progress_then_loaded(self) -> None:
        """
        While a model starts, its status is ``loading`` with the load tracker's progress (the
        same numbers as the loading stream); then ``loaded``, without progress.
        """
        upstream = self.h.upstreams["llama"]
        upstream.auto_ready = False
        pending = self.h.request("POST", "/v1/chat/completions", b'{"model": "llama"}')
        status = self.status_of("llama")
        self.assertEqual(status["value"], "loading")
        self.assertEqual(status["progress"], {"stages": ["text_model"], "current": "text_model", "value": 0.0})
        print_lines(upstream, LOAD_LINES)
        print_dots(upstream, 50)
        self.assertEqual(self.status_of("llama")["progress"]["value"], 0.475)
        upstream.become_ready()
        self.h.flush()
        self.h.read(self.successResultOf(pending))
        status = self.status_of("llama")
        self.assertEqual(status["value"], "loaded")
        self.assertNotIn("progress", status)
        self.assertEqual(self.status_of("qwen")["value"], "unloaded")

    def test_failed_start(self) -> None:
        """
        A model whose start failed is ``unloaded`` with ``failed`` and the exit code, as the
        router reports it.
        """
        self.h.upstreams["qwen"].start_error = StartError("qwen", "process exited with exit code 3", exit_code=3)
        response, _ = self.h.post_json("/v1/chat/completions", {"model": "qwen"})
        self.assertEqual(response.code, 502)
        status = self.status_of("qwen")
        self.assertEqual((status["value"], status["failed"], status["exit_code"]), ("unloaded", True, 3))

    def test_a_hung_model_is_loaded_until_its_process_has_gone(self) -> None:
        """
        A ready model found hung is still listed (a 200, not a 500) as ``loaded`` while it is
        being stopped, as a stopping model is, then ``unloaded`` once its process has exited.
        """
        upstream = self.h.upstreams["llama"]
        response, _ = self.h.post_json("/v1/chat/completions", {"model": "llama"})
        self.assertEqual(response.code, 200)
        upstream.mark_unhealthy("its health check (/health) failed 3 times in a row", "health_check")
        response, listing = self.get_json("/models")
        self.assertEqual(response.code, 200)
        self.assertEqual(listing["data"][0]["status"]["value"], "loaded")
        upstream.exited()
        self.assertEqual(self.status_of("llama")["value"], "unloaded")

    def test_every_state_has_a_router_status(self) -> None:
        upstream = self.h.upstreams["qwen"]
        for state in State:
            upstream.state = state
            self.assertIn(self.router_status(upstream)["value"], ("unloaded", "loading", "loaded"), state)

    def router_status(self, upstream: Any) -> dict[str, Any]:
        response, listing = self.get_json("/models")
        self.assertEqual(response.code, 200)
        return next(entry["status"] for entry in listing["data"] if entry["id"] == upstream.model.id)

    def test_trailing_slash_and_unknown_child(self) -> None:
        response, listing = self.get_json("/models/")
        self.assertEqual(len(listing["data"]), 2)
        response, body = self.h.call("GET", "/models/nothing")
        self.assertEqual(response.code, 404)


class PeerModelTests(SynchronousTestCase):
    """
    ``GET /models`` lists the peers' models too, with the state their peer reports.
    """

    def test_peer_models_listed(self) -> None:
        clients: list[FakePeerClient] = []
        peer_clock = Clock()
        h: Harness | None = None
        peers = PeerSet(lambda: h.supervisor.config,  # type: ignore[union-attr]
                        peer_clock, FakePeerClient.factory(clients))
        text = CONFIG + '    peers:\n      box: {proxy: "http://10.0.0.9:8080", models: [big, small, gone]}\n'
        h = Harness(self, textwrap.dedent(text), peers=peers)
        asked = peers.refresh()
        progress = {"stage": "loading", "label": "loading weights", "fraction": 0.42, "percent": 42,
                    "elapsed": 2.0, "eta": 2.8, "expected": 4.8}
        clients[0].sent[0][3].callback(FakePeerResponse(200, json.dumps({"data": [
            {"id": "big", "state": "starting", "status": {"value": "loaded", "state": "loading", "progress": progress}},
            {"id": "small", "state": "ready", "status": {"value": "loaded", "state": "ready"}},
        ]}).encode()))
        self.successResultOf(asked)
        response, body = h.call("GET", "/models")
        self.assertEqual(response.code, 200)
        listing = json.loads(body)
        self.assertEqual([entry["id"] for entry in listing["data"]],
                         ["box/big", "box/gone", "box/small", "llama", "qwen"])
        records = {entry["id"]: entry for entry in listing["data"]}
        big = records["box/big"]
        progress = {"stages": ["text_model"], "current": "text_model", "value": 0.42}
        self.assertEqual(big["status"], {"value": "loading", "args": [], "progress": progress})
        self.assertEqual({key: big[key] for key in ("aliases", "tags", "object", "owned_by", "can_remove", "name", "peer")},
                         {"aliases": [], "tags": [], "object": "model", "owned_by": "box", "can_remove": False,
                          "name": "box: big", "peer": {"id": "box", "reachable": True}})
        self.assertEqual(records["box/small"]["status"], {"value": "loaded", "args": []})
        self.assertEqual(records["box/gone"]["status"], {"value": "unloaded", "args": []})
        self.assertEqual(len(clients[0].sent), 1, "what the peer said is fresh: not asked again")
        peers.unreachable(h.supervisor.config.peers["box"], "connection refused")
        _, body = h.call("GET", "/models")
        big = next(entry for entry in json.loads(body)["data"] if entry["id"] == "box/big")
        self.assertEqual((big["status"], big["peer"]), ({"value": "unloaded", "args": []},
                                                        {"id": "box", "reachable": False}))


class LoadUnloadTests(RouterApiCase):
    """
    ``POST /models/load`` and ``POST /models/unload``.
    """

    def test_load_answers_at_once_and_the_load_goes_on(self) -> None:
        upstream = self.h.upstreams["llama"]
        upstream.auto_ready = False
        response, body = self.post_json("/models/load", {"model": "fast"})
        self.assertEqual((response.code, body), (200, {"success": True}))
        self.assertEqual(upstream.state, State.STARTING)
        upstream.become_ready()
        self.assertEqual(self.status_of("llama")["value"], "loaded")
        self.assertEqual(self.h.supervisor.in_flight["llama"], 0, "the load holds no request slot once done")

    def test_load_swaps_like_a_request(self) -> None:
        self.post_json("/models/load", {"model": "llama"})
        self.post_json("/models/load", {"model": "qwen"})
        self.assertEqual(self.h.upstreams["llama"].state, State.STOPPED)
        self.assertEqual(self.h.upstreams["qwen"].state, State.READY)

    def test_load_errors(self) -> None:
        response, body = self.post_json("/models/load", {"model": "nope"})
        self.assertLlamaError(response, body, 404, "not_found_error",
                              "model 'nope' is not found; available models: llama, qwen")
        response, body = self.post_json("/models/load", {"nothing": 1})
        self.assertLlamaError(response, body, 400, "invalid_request_error", 'a "model" field')
        response, raw = self.h.call("POST", "/models/load", b"{oops", {"Content-Type": "application/json"})
        self.assertLlamaError(response, json.loads(raw), 400, "invalid_request_error", "not valid JSON")
        self.post_json("/models/load", {"model": "llama"})
        response, body = self.post_json("/models/load", {"model": "llama"})
        self.assertLlamaError(response, body, 400, "invalid_request_error", "model is already running")
        response, raw = self.h.call("GET", "/models/load")
        self.assertLlamaError(response, json.loads(raw), 405, "invalid_request_error", "use POST")
        self.assertEqual(self.h.upstreams["llama"].starts, 1)

    def test_failed_load_is_reported_not_raised(self) -> None:
        self.h.upstreams["qwen"].start_error = StartError("qwen", "process exited with exit code 1", exit_code=1)
        response, body = self.post_json("/models/load", {"model": "qwen"})
        self.assertEqual((response.code, body), (200, {"success": True}))
        self.assertTrue(self.status_of("qwen")["failed"])
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_unload(self) -> None:
        self.post_json("/models/load", {"model": "llama"})
        response, body = self.post_json("/models/unload", {"model": "llama"})
        self.assertEqual((response.code, body), (200, {"success": True}))
        self.assertEqual(self.h.upstreams["llama"].state, State.STOPPED)
        response, body = self.post_json("/models/unload", {"model": "llama"})
        self.assertLlamaError(response, body, 400, "invalid_request_error", "model is not running")
        response, body = self.post_json("/models/unload", {"model": "nope"})
        self.assertLlamaError(response, body, 400, "invalid_request_error", "model is not found")


class EventStreamTests(RouterApiCase):
    """
    ``GET /models/sse``: status changes and load progress in the router's event shapes.
    """

    def connect(self) -> RawConnection:
        client = follow(self.h.root, "/models/sse")
        self.addCleanup(client.close)
        return client

    def events(self, client: RawConnection) -> list[dict[str, Any]]:
        """
        Every event so far; each must be exactly one ``data:`` line of JSON, as the router sends.
        """
        found = []
        for event in parse_events(client.body()):
            if event.data is None:
                continue
            self.assertIsNone(event.name)
            payload = event.json()
            self.assertLessEqual(set(payload), {"model", "event", "data"})
            found.append(payload)
        return found

    def test_head_first_then_nothing_while_quiet(self) -> None:
        client = self.connect()
        status, headers = client.head()
        self.assertEqual(status, 200)
        self.assertEqual(headers.getRawHeaders(b"content-type"), [b"text/event-stream; charset=utf-8"])
        self.assertEqual(headers.getRawHeaders(b"x-accel-buffering"), [b"no"])
        self.assertEqual(self.events(client), [])
        self.assertEqual(self.h.clock.getDelayedCalls()[0].getTime(), self.h.clock.seconds() + HEARTBEAT,
                         "nothing but the heartbeat runs while nothing happens")
        self.h.clock.advance(HEARTBEAT)
        self.assertTrue(client.body().endswith(b": ping\n\n"))

    def test_a_load_and_an_unload(self) -> None:
        """
        Loading: ``model_status`` loading, progress that rises with the model's output (and with
        time), as the board sees it at each tick, 1.0, ``loaded`` with the model's info;
        unloading: ``unloaded`` with exit code 0.
        """
        client = self.connect()
        upstream = self.h.upstreams["llama"]
        upstream.auto_ready = False
        self.post_json("/models/load", {"model": "llama"})
        for line in LOAD_LINES:
            print_lines(upstream, [line])
            self.h.clock.advance(TICK)
        for _ in range(3):
            print_dots(upstream, 10)
            self.h.clock.advance(TICK)
        print_dots(upstream, 0)  # output that moves nothing sends nothing
        self.h.clock.advance(TICK)
        upstream.become_ready()
        self.post_json("/models/unload", {"model": "llama"})

        events = self.events(client)
        self.assertEqual({event["model"] for event in events}, {"llama"})
        self.assertEqual(events[0], {"model": "llama", "event": "model_status", "data": {"status": "loading"}})
        progress = [e["data"]["progress"]["value"] for e in events if e["data"].get("progress")]
        self.assertEqual(progress, [0.0, 0.03, 0.1, 0.175, 0.25, 0.325, 1.0])
        loading = next(e for e in events if e["data"].get("progress"))
        self.assertEqual(loading["event"], "status_change")
        self.assertEqual(loading["data"]["progress"]["stages"], ["text_model"])
        self.assertEqual(loading["data"]["progress"]["current"], "text_model")
        loaded, unloaded = events[-2:]
        self.assertEqual(loaded["event"], "status_change")
        self.assertEqual(loaded["data"]["status"], "loaded")
        self.assertEqual((loaded["data"]["info"]["id"], loaded["data"]["info"]["aliases"]), ("llama", ["fast"]))
        self.assertEqual(unloaded["data"], {"status": "unloaded", "exit_code": 0})

    def test_progress_from_time_alone(self) -> None:
        """
        A model that prints nothing, whose last load took 10 s: its progress moves with the
        clock, looked at by the board at each tick while it loads, and the looking stops with the
        load.
        """
        upstream = self.h.upstreams["qwen"]
        upstream.auto_ready = False
        self.post_json("/models/load", {"model": "qwen"})
        self.h.clock.advance(10)
        upstream.become_ready()
        self.post_json("/models/unload", {"model": "qwen"})
        client = self.connect()
        self.post_json("/models/load", {"model": "qwen"})
        for _ in range(8):
            self.h.clock.advance(TICK)
        progress = [e["data"]["progress"]["value"] for e in self.events(client) if e["data"].get("progress")]
        self.assertEqual(progress, [round(tick * TICK / 10, 3) for tick in range(9)])
        upstream.become_ready()
        # The supervisor's first measurement of the ready model's memory is not ours.
        ours = [call for call in self.h.clock.getDelayedCalls()
                if getattr(call.func, "__name__", "") != "_first_measure"]
        self.assertEqual([call.getTime() - self.h.clock.seconds() for call in ours],
                         [HEARTBEAT - 8 * TICK], "only the heartbeat is left")

    def test_failed_start(self) -> None:
        client = self.connect()
        self.h.upstreams["qwen"].start_error = StartError("qwen", "process exited with exit code 3", exit_code=3)
        self.post_json("/models/load", {"model": "qwen"})
        events = self.events(client)
        self.assertEqual(events[0]["event"], "model_status")
        self.assertEqual(events[-1], {"model": "qwen", "event": "status_change",
                                      "data": {"status": "unloaded", "exit_code": 3}})

    def test_a_model_a_reload_removes_or_replaces_is_unloaded(self) -> None:
        """
        A model that a reload removes while it loads ends with ``unloaded`` once its process
        has stopped, so that a router client does not show it loading for ever; a loaded model
        whose command a reload changed too, once its old process has stopped.
        """
        client = self.connect()
        config = textwrap.dedent(CONFIG)
        self.h.upstreams["qwen"].auto_ready = False
        self.post_json("/models/load", {"model": "qwen"})
        without_qwen = config.replace("  qwen:\n    cmd: llama-server --port ${PORT} -m /models/qwen.gguf\n", "")
        self.assertNotIn("qwen", without_qwen)
        self.h.supervisor.reload(parse_config(without_qwen, "config.yaml", {}))
        self.assertEqual(self.events(client)[-1], {"model": "qwen", "event": "status_change",
                                                   "data": {"status": "unloaded", "exit_code": 0}})

        self.post_json("/models/load", {"model": "llama"})
        self.assertEqual(self.events(client)[-1]["data"]["status"], "loaded")
        changed = without_qwen.replace("-m /models/llama.gguf", "-m /models/llama-2.gguf")
        self.h.supervisor.reload(parse_config(changed, "config.yaml", {}))
        self.assertEqual(self.events(client)[-1], {"model": "llama", "event": "status_change",
                                                   "data": {"status": "unloaded", "exit_code": 0}})
        self.assertEqual(self.status_of("llama")["value"], "unloaded")

    def test_unlisted_models_are_not_reported(self) -> None:
        client = self.connect()
        self.h.post_json("/v1/chat/completions", {"model": "hidden"})
        self.assertEqual(self.events(client), [])

    def test_reader_that_left_gets_nothing(self) -> None:
        client = self.connect()
        client.close()
        before = client.transport.value()
        self.post_json("/models/load", {"model": "llama"})
        self.h.clock.advance(HEARTBEAT)
        self.assertEqual(client.transport.value(), before)
        self.assertEqual(self.h.clock.getDelayedCalls(), [])


class PropsTests(RouterApiCase):
    """
    ``GET /props`` without a model, when there is no default model: the router's own props.
    """

    def test_router_props(self) -> None:
        response, props = self.get_json("/props")
        self.assertEqual(response.code, 200)
        self.assertEqual(props["role"], "router")
        self.assertEqual(props["max_instances"], 1, "all three models are in one swapping group")
        self.assertIs(props["models_autoload"], True)
        self.assertEqual(self.h.received, [])

"""
Tests for `swapproxy.peers`: what is known of each peer, learnt on demand, driven by a Clock and
fake peer clients; and `PeerClient`'s timeouts on a memory reactor.
"""

from __future__ import annotations

import json
import textwrap
from typing import Any

from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import capturedLogs
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers

from swapproxy.config import Config, parse_config
from swapproxy.peers import (
    FRESH_SECONDS,
    LIST_WAIT,
    LOADING_FRESH_SECONDS,
    POLL_TIMEOUT,
    PeerClient,
    PeerSet,
    PeerTimeout,
    model_states,
)
from swapproxy.supervisor import ShuttingDown
from swapproxy.web.listing import peer_records
from tests.support.doubles import FakePeerClient, FakePeerResponse

CONFIG = """
    peers:
      a: {proxy: "http://10.0.0.1:8080", apiKey: sk-a, models: [m1, m2]}
      b: {proxy: "http://10.0.0.2:8080", models: [n]}
"""


def listing(**states: str) -> bytes:
    return json.dumps({"object": "list", "data": [{"id": m, "state": s} for m, s in states.items()]}).encode()


class PeerSetTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.config: Config = parse_config(textwrap.dedent(CONFIG), "config.yaml", {})
        self.clients: list[FakePeerClient] = []
        self.peers = PeerSet(lambda: self.config, self.clock, FakePeerClient.factory(self.clients))
        self.peers.startService()

    def client(self, peer_id: str) -> FakePeerClient:
        return next(c for c in self.clients if c.peer.id == peer_id and not c.closed)

    def test_refresh_asks_each_peer_once(self) -> None:
        """
        A refresh asks every peer for /v1/models with the peer's key; a second refresh meanwhile
        asks nothing more; both fire when the answers are in.
        """
        first, second = self.peers.refresh(), self.peers.refresh()
        self.assertEqual([len(self.client(p).sent) for p in "ab"], [1, 1])
        method, path, headers, answer = self.client("a").sent[0]
        self.assertEqual((method, path), (b"GET", b"/v1/models"))
        self.assertEqual(headers.getRawHeaders(b"authorization"), [b"Bearer sk-a"])
        self.assertIsNone(self.client("b").sent[0][2].getRawHeaders(b"authorization"))
        answer.callback(FakePeerResponse(200, listing(m1="ready", m2="stopped")))
        self.assertNoResult(first)
        self.client("b").sent[0][3].callback(FakePeerResponse(200, json.dumps(
            {"data": [{"id": "n", "status": {"value": "loaded"}}, {"id": "x"}]}).encode()))
        self.successResultOf(first)
        self.successResultOf(second)
        self.assertEqual(self.peers.health["a"].states, {"m1": "ready", "m2": "stopped"})
        self.assertEqual(self.peers.health["b"].states, {"n": "loaded", "x": "available"})
        self.assertEqual(self.peers.health["a"].model_state("zz"), "not offered by the peer")

    def test_a_swapproxy_peer_shows_its_load_progress(self) -> None:
        """
        ``/v1/models`` lists a model that a swapproxy peer is loading with the peer's ``status``,
        its load progress among it; not once the peer is down.
        """
        progress = {"stage": "loading", "label": "loading weights", "fraction": 0.42, "percent": 42,
                    "elapsed": 2.0, "eta": 2.8, "expected": 4.8}
        self.peers.refresh()
        self.client("a").sent[0][3].callback(FakePeerResponse(200, json.dumps({"data": [
            {"id": "m1", "state": "starting", "status": {"value": "loaded", "state": "loading", "progress": progress}},
            {"id": "m2", "state": "stopped", "status": {"value": "unloaded", "state": "stopped"}},
        ]}).encode()))
        records = {r["id"]: r for r in peer_records(self.config, self.peers.health, 0)}
        self.assertEqual(records["a/m1"]["state"], "starting")
        self.assertEqual(records["a/m1"]["status"], {"value": "loaded", "state": "loading", "progress": progress})
        self.assertEqual(records["a/m2"]["status"]["state"], "stopped")
        self.assertNotIn("status", records["b/n"], "b has not answered")
        self.peers.unreachable(self.config.peers["a"], "connection refused")
        records = {r["id"]: r for r in peer_records(self.config, self.peers.health, 0)}
        self.assertEqual(records["a/m1"]["state"], "unreachable")
        self.assertNotIn("status", records["a/m1"])

    def test_fresh_for_a_while(self) -> None:
        """
        What a peer said is used for FRESH_SECONDS; a request relayed to it since makes the next
        refresh ask again.
        """
        self.peers.refresh()
        for p in "ab":
            self.client(p).sent[0][3].callback(FakePeerResponse(200, listing()))
        self.clock.advance(FRESH_SECONDS - 1)
        self.successResultOf(self.peers.refresh())
        self.assertEqual(len(self.client("a").sent), 1)
        self.peers.reached(self.config.peers["a"])
        self.peers.refresh()
        self.assertEqual([len(self.client(p).sent) for p in "ab"], [2, 1])
        self.clock.advance(1)
        self.peers.refresh()
        self.assertEqual(len(self.client("b").sent), 2)

    def test_refresh_waits_a_bounded_time(self) -> None:
        """
        A peer slow to answer holds a refresh for LIST_WAIT at most; its answer still counts.
        """
        waiting = self.peers.refresh()
        self.client("b").sent[0][3].callback(FakePeerResponse(200, listing(n="ready")))
        self.clock.advance(LIST_WAIT)
        self.successResultOf(waiting)
        self.assertEqual(self.peers.health["a"].model_state("m1"), "unknown")
        self.client("a").sent[0][3].callback(FakePeerResponse(200, listing(m1="starting")))
        self.assertEqual(self.peers.health["a"].model_state("m1"), "starting")

    def test_silent_or_refusing_peer_is_unreachable(self) -> None:
        self.peers.refresh()
        self.client("b").sent[0][3].errback(Failure(ConnectionRefusedError("refused")))
        self.assertEqual(self.peers.health["b"].model_state("n"), "unreachable")
        self.assertIn("refused", self.peers.health["b"].error)
        self.clock.advance(POLL_TIMEOUT)
        health = self.peers.health["a"]
        self.assertEqual((health.reachable, health.model_state("m1")), (False, "unreachable"))
        self.assertEqual(health.error, f"no answer to GET /v1/models within {POLL_TIMEOUT:g}s")
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_bad_list_keeps_the_peer_up(self) -> None:
        self.peers.refresh()
        self.client("a").sent[0][3].callback(FakePeerResponse(200, b"<html>"))
        self.client("b").sent[0][3].callback(FakePeerResponse(401, b"{}"))
        for p in "ab":
            self.assertEqual((self.peers.health[p].reachable, self.peers.health[p].states), (True, None))

    def test_reload_makes_a_new_client(self) -> None:
        old = self.peers.client(self.config.peers["a"])
        self.config = parse_config(textwrap.dedent(CONFIG.replace("sk-a", "sk-new")), "config.yaml", {})
        new = self.peers.client(self.config.peers["a"])
        self.assertIsNot(old, new)
        self.assertTrue(old.closed)
        self.assertIs(self.peers.client(self.config.peers["b"]), self.peers.client(self.config.peers["b"]))

    def test_a_removed_peer_is_forgotten(self) -> None:
        """
        After a reload that removes a peer, its connections are closed (a question in flight
        is withdrawn) and nothing is known of it any more; the other peers are kept.
        """
        self.peers.refresh()
        self.client("a").sent[0][3].callback(FakePeerResponse(200, listing(m1="ready")))
        b, question = self.client("b"), self.client("b").sent[0][3]
        self.peers.forget_removed()
        self.assertFalse(b.closed, "nothing changed")
        without_b = textwrap.dedent(CONFIG).replace('  b: {proxy: "http://10.0.0.2:8080", models: [n]}\n', "")
        self.config = parse_config(without_b, "config.yaml", {})
        self.assertEqual(list(self.config.peers), ["a"])
        with capturedLogs() as events:
            self.peers.forget_removed()
        self.assertEqual(events, [], "a peer removed is not unreachable")
        self.assertTrue(b.closed)
        self.assertTrue(question.called, "its question is withdrawn")
        self.assertEqual(list(self.peers.health), ["a"])
        self.assertFalse(self.client("a").closed)

    def test_stop_cancels_questions_and_closes(self) -> None:
        self.peers.refresh()
        answers = [self.client(p).sent[0][3] for p in "ab"]
        self.successResultOf(self.peers.stopService())
        for answer in answers:
            self.assertTrue(answer.called)
        self.assertTrue(all(c.closed for c in self.clients))
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertIsNone(self.peers.health["a"].reachable)


class StopTests(SynchronousTestCase):
    setUp = PeerSetTests.setUp

    def test_stop_ends_the_relays_first(self) -> None:
        """
        Stopping ends each relay of a peer's answer with `ShuttingDown` (its client's stream then
        ends with an error event), and is done only after a round of I/O has carried that out;
        a relay that has ended is not touched.
        """
        ended: list[BaseException] = []
        relay, finished = FakeRelay(ended), FakeRelay(ended)
        self.peers.relaying(relay)
        self.peers.relaying(finished)()
        stopping = self.peers.stopService()
        self.assertEqual([(type(e), str(e)) for e in ended], [(ShuttingDown, "swapproxy is shutting down")])
        self.assertNoResult(stopping)
        self.clock.advance(0)
        self.successResultOf(stopping)


class FakeRelay:
    def __init__(self, ended: list[BaseException]) -> None:
        self.ended = ended

    def abort(self, error: BaseException) -> None:
        self.ended.append(error)


class WatchedTests(SynchronousTestCase):
    """
    A dashboard watching the peers (`PeerSet.subscribe`): it is told of each change of their
    models' states, and its watching is the demand that asks the peers, at a bounded rate, and
    only while it watches.
    """

    setUp = PeerSetTests.setUp
    client = PeerSetTests.client

    def watch(self) -> tuple[list[list[dict[str, Any]]], Any]:
        told: list[list[dict[str, Any]]] = []

        def subscriber(kind: str, entries: list[dict[str, Any]]) -> None:
            self.assertEqual(kind, "peers")
            told.append(entries)

        return told, self.peers.subscribe(subscriber)

    def answer(self, peer_id: str, payload: dict[str, Any]) -> None:
        self.client(peer_id).sent[-1][3].callback(FakePeerResponse(200, json.dumps(payload).encode()))

    def test_told_of_states_and_progress(self) -> None:
        progress = {"stage": "loading", "label": "loading weights", "fraction": 0.42, "percent": 42,
                    "elapsed": 2.0, "eta": 2.8, "expected": 4.8}
        told, _ = self.watch()
        self.assertEqual([len(self.client(p).sent) for p in "ab"], [1, 1], "asked at once")
        self.answer("a", {"data": [
            {"id": "m1", "state": "starting", "status": {"value": "loaded", "state": "loading", "progress": progress}},
            {"id": "m2", "state": "stopped"},
        ]})
        self.client("b").sent[0][3].errback(Failure(ConnectionRefusedError("refused")))
        m1, m2, n = told[-1]
        self.assertEqual((m1["id"], m1["peer"], m1["model"], m1["state"], m1["status"], m1["reachable"]),
                         ("a/m1", "a", "m1", "starting", "loading", True))
        self.assertEqual(m1["progress"], {"stage": "loading", "label": "loading weights", "fraction": 0.42,
                                          "percent": 42, "elapsed": 2.0, "eta": 2.8})
        self.assertEqual((m2["status"], m2["progress"]), ("stopped", None))
        self.assertEqual((n["id"], n["status"], n["reachable"]), ("b/n", "unreachable", False))
        self.assertIn("refused", n["error"])
        self.assertEqual(self.peers.entries(), told[-1])

    def test_asked_while_watched_faster_while_a_model_loads(self) -> None:
        told, unsubscribe = self.watch()
        self.answer("a", {"data": [{"id": "m1", "state": "stopped"}, {"id": "m2", "state": "stopped"}]})
        self.answer("b", {"data": [{"id": "n", "state": "ready"}]})
        sent = len(told)
        self.clock.advance(FRESH_SECONDS - 0.5)
        self.assertEqual([len(self.client(p).sent) for p in "ab"], [1, 1])
        self.clock.advance(0.5)
        self.assertEqual([len(self.client(p).sent) for p in "ab"], [2, 2])
        self.answer("b", {"data": [{"id": "n", "state": "ready"}]})
        self.assertEqual(len(told), sent, "nothing changed, nothing told")
        # One of a's models starts loading: a is asked again sooner, while it loads.
        self.answer("a", {"data": [{"id": "m1", "state": "starting", "status": {"state": "loading", "progress": {
            "fraction": 0.1}}}, {"id": "m2", "state": "stopped"}]})
        self.assertEqual(told[-1][0]["status"], "loading")
        self.clock.advance(LOADING_FRESH_SECONDS)
        self.assertEqual([len(self.client(p).sent) for p in "ab"], [2, 2], "b was asked a moment ago")
        self.clock.advance(FRESH_SECONDS)
        self.assertEqual(len(self.client("a").sent), 3)
        self.answer("a", {"data": [{"id": "m1", "state": "starting", "status": {"state": "loading", "progress": {
            "fraction": 0.6}}}, {"id": "m2", "state": "stopped"}]})
        self.assertEqual(told[-1][0]["progress"]["percent"], 60)
        self.clock.advance(LOADING_FRESH_SECONDS)
        self.assertEqual(len(self.client("a").sent), 4)
        unsubscribe()
        self.answer("a", {"data": [{"id": "m1", "state": "ready"}, {"id": "m2", "state": "stopped"}]})
        self.answer("b", {"data": [{"id": "n", "state": "ready"}]})
        self.assertEqual(self.clock.getDelayedCalls(), [], "nothing is asked while nobody watches")
        unsubscribe()

    def test_a_relayed_request_is_news(self) -> None:
        """
        A request relayed to a peer may have started one of its models: a watched peer is asked
        again soon after, not at the next round.
        """
        _, _ = self.watch()
        self.answer("a", {"data": [{"id": "m1", "state": "stopped"}]})
        self.answer("b", {"data": [{"id": "n", "state": "ready"}]})
        self.clock.advance(1)
        self.peers.reached(self.config.peers["a"])
        self.clock.advance(LOADING_FRESH_SECONDS)
        self.assertEqual([len(self.client(p).sent) for p in "ab"], [2, 1])

    def test_a_peer_reports_anything(self) -> None:
        """
        What a peer reports is another server's: only the fields the dashboard draws, each of
        its type, and words of bounded length.
        """
        told, _ = self.watch()
        self.answer("a", {"data": [{"id": "m1", "state": "x" * 10_000, "status": {"state": 5, "progress": {
            "fraction": "half", "percent": "<b>", "label": ["no"], "eta": -3}}}]})
        m1, m2, _ = told[-1]
        self.assertEqual(len(m1["state"]), 200)
        self.assertEqual(m1["status"], m1["state"])
        self.assertEqual(m1["progress"], {"stage": "loading", "label": "", "fraction": None, "percent": None,
                                          "elapsed": 0.0, "eta": None})
        self.assertEqual(m2["state"], "not offered by the peer")


class ModelStatesTests(SynchronousTestCase):
    def test_not_a_list(self) -> None:
        for answer in ([], {"data": {}}, {"models": []}):
            self.assertRaises(ValueError, model_states, answer)


class PeerClientTests(SynchronousTestCase):
    def make(self, **timeouts: Any) -> tuple[PeerClient, MemoryReactorClock]:
        reactor = MemoryReactorClock()
        text = "peers: {p: {proxy: 'http://10.9.9.9:81/api', models: [m], timeouts: %s}}" % json.dumps(timeouts)
        return PeerClient(parse_config(text, "config.yaml", {}).peers["p"], reactor), reactor

    def test_connect_timeout(self) -> None:
        client, reactor = self.make(connect=7)
        client.send(b"GET", b"/v1/models", Headers(), None)
        [(host, port, _, timeout, _)] = reactor.tcpClients
        self.assertEqual((host, port, timeout), ("10.9.9.9", 81, 7))

    def test_response_header_timeout(self) -> None:
        """
        No answer within timeouts.responseHeader: the request fails with PeerTimeout and its
        connection attempt is given up.
        """
        client, reactor = self.make(responseHeader=2)
        sent = client.send(b"GET", b"/v1/models", Headers(), None)
        reactor.advance(1.9)
        self.assertNoResult(sent)
        reactor.advance(0.1)
        failure = self.failureResultOf(sent, PeerTimeout)
        self.assertEqual(str(failure.value), "no answer within 2s (timeouts.responseHeader)")
        self.assertEqual(reactor.getDelayedCalls(), [])

    def test_no_response_header_timeout(self) -> None:
        client, reactor = self.make(responseHeader=0)
        sent = client.send(b"GET", b"/x", Headers(), None)
        self.assertEqual(reactor.getDelayedCalls(), [])
        self.assertNoResult(sent)

    def test_url(self) -> None:
        client, _ = self.make()
        self.assertEqual(client.url_for(b"/v1/chat/completions?a=1"), b"http://10.9.9.9:81/api/v1/chat/completions?a=1")

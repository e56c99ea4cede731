"""
Tests for `swapproxy.web.peer_forward`: requests for a peer's model, relayed by swapproxy (served in
this process on loopback) to a peer server of the test's (a twisted.web Site on loopback that
records what it received and answers as the test says).
"""

from __future__ import annotations

import json
import textwrap
from collections.abc import Callable

import attrs
import treq
from twisted.internet import reactor
from twisted.trial.unittest import TestCase
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from swapproxy.config import parse_config
from swapproxy.testing.local import LOOPBACK, fake_command, free_port, free_port_range
from tests.support.live import RunningProxy, TrackingFactory, start_proxy
from tests.support.processes import wait_until


@attrs.define
class Seen:
    """
    One request as the peer saw it.
    """

    method: bytes
    uri: bytes
    headers: Headers
    body: bytes
    request: Request


class PeerServer(Resource):
    """
    A peer: records every request; answers ``/v1/models`` with a swapproxy-style list, and
    everything else with ``respond``.
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[Seen] = []
        self.states = {"m": "ready", "other": "stopped"}
        self.respond: Callable[[Request], bytes | int] = self.echo

    def echo(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        seen = self.seen[-1]
        return json.dumps({"uri": seen.uri.decode(), "body": json.loads(seen.body or b"null")}).encode()

    def render(self, request: Request) -> bytes | int:
        if request.path == b"/v1/models":
            request.setHeader(b"content-type", b"application/json")
            data = [{"id": m, "object": "model", "state": s} for m, s in self.states.items()]
            return json.dumps({"object": "list", "data": data}).encode()
        self.seen.append(Seen(request.method, request.uri, request.requestHeaders.copy(),
                              request.content.read(), request))
        return self.respond(request)


class PeerForwardTests(TestCase):
    timeout = 30

    def serve(self, peers: str, top: str = "", peer_port: int | None = None) -> tuple[RunningProxy, PeerServer]:
        """
        A peer server on loopback, and swapproxy with the ``peers`` section (``PEER`` in it is the
        peer's URL) and a local model ``local``.
        """
        server = PeerServer()
        site = Site(server)
        site.noisy = False
        if peer_port is None:
            factory = TrackingFactory(site)
            listening = reactor.listenTCP(0, factory, interface=LOOPBACK)
            self.addCleanup(listening.stopListening)
            self.addCleanup(factory.close_all)
            peer_port = listening.getHost().port
        self.peer_port = peer_port
        text = (f"startPort: {free_port_range(1)}\n" + textwrap.dedent(top)
                + "models:\n  local: {cmd: '%s'}\npeers:\n" % fake_command())
        text += textwrap.indent(textwrap.dedent(peers), "  ").replace("PEER", f"http://{LOOPBACK}:{peer_port}")
        proxy = start_proxy(self, parse_config(text, "test.yaml", {}))
        return proxy, server

    async def test_names_and_body(self) -> None:
        """
        ``peer/model`` and a bare id reach the peer, which sees its own model id in the body,
        the peer's filters applied, and the request's path and query.
        """
        proxy, server = self.serve("""
            p:
              proxy: PEER/base
              models: [m, org/big]
              filters:
                stripParams: "top_k"
                setParams: {provider: {zdr: true}}
                setParamsByID: {"p/org/big": {effort: high}}
        """)
        code, answer = await proxy.post_json("/v1/chat/completions?x=1", {"model": "p/m", "top_k": 3, "n": 1})
        self.assertEqual(code, 200)
        self.assertEqual(answer["uri"], "/base/v1/chat/completions?x=1")
        self.assertEqual(answer["body"], {"model": "m", "n": 1, "provider": {"zdr": True}})
        code, answer = await proxy.post_json("/v1/completions", {"model": "org/big"})
        self.assertEqual(answer["body"], {"model": "org/big", "provider": {"zdr": True}})
        code, answer = await proxy.post_json("/v1/completions", {"model": "p/org/big"})
        self.assertEqual(answer["body"], {"model": "org/big", "provider": {"zdr": True}, "effort": "high"})
        self.assertEqual(server.seen[0].headers.getRawHeaders(b"host"), [f"{LOOPBACK}:{self.peer_port}".encode()])

    async def test_local_wins(self) -> None:
        """
        A bare name that is also a local model goes to the local model; the peer's is reached
        as ``peer/model``.
        """
        proxy, server = self.serve("""
            p: {proxy: PEER, models: [local]}
        """)
        code, answer = await proxy.post_json("/v1/chat/completions", {"model": "p/local"})
        self.assertEqual((code, answer["body"]["model"]), (200, "local"))
        self.assertEqual(len(server.seen), 1)
        self.assertIsNone(proxy.supervisor.config.resolve_peer("local"))

    async def test_api_key_replaces_the_clients(self) -> None:
        """
        The peer's apiKey replaces whatever the client sent; swapproxy's own key (apiKeys) never
        reaches a peer, with or without an apiKey of the peer's.
        """
        proxy, server = self.serve("""
            p: {proxy: PEER, models: [m], apiKey: sk-peer}
            q: {proxy: PEER, models: [n]}
        """, top="apiKeys: [sk-local]\n")
        for model, key_header in (("p/m", "Authorization"), ("q/n", "x-api-key")):
            value = "Bearer sk-local" if key_header == "Authorization" else "sk-local"
            response = await proxy.client.post(
                proxy.url + "/v1/chat/completions", data=json.dumps({"model": model}).encode(),
                headers={"Content-Type": "application/json", key_header: value})
            self.assertEqual(response.code, 200, await response.text())
        with_key, without = server.seen
        self.assertEqual(with_key.headers.getRawHeaders(b"authorization"), [b"Bearer sk-peer"])
        self.assertEqual(with_key.headers.getRawHeaders(b"x-api-key"), [b"sk-peer"])
        self.assertIsNone(without.headers.getRawHeaders(b"authorization"))
        self.assertIsNone(without.headers.getRawHeaders(b"x-api-key"))
        for seen in server.seen:
            self.assertNotIn(b"sk-local", b"".join(v for _, vs in seen.headers.getAllRawHeaders() for v in vs))

    async def test_clients_own_peer_key_passes_without_api_key(self) -> None:
        proxy, server = self.serve("p: {proxy: PEER, models: [m]}\n")
        response = await proxy.client.post(
            proxy.url + "/v1/chat/completions", data=json.dumps({"model": "m"}).encode(),
            headers={"Content-Type": "application/json", "Authorization": "Bearer sk-theirs"})
        await response.content()
        self.assertEqual(server.seen[0].headers.getRawHeaders(b"authorization"), [b"Bearer sk-theirs"])

    async def test_stream_arrives_as_sent(self) -> None:
        """
        The peer's event stream reaches the client event by event, not at its end.
        """
        proxy, server = self.serve("p: {proxy: PEER, models: [m]}\n")

        def stream(request: Request) -> int:
            request.setHeader(b"content-type", b"text/event-stream")
            request.write(b'data: {"n": 1}\n\n')
            return NOT_DONE_YET

        server.respond = stream
        response = await proxy.client.post(
            proxy.url + "/v1/chat/completions", data=json.dumps({"model": "m", "stream": True}).encode(),
            headers={"Content-Type": "application/json"}, unbuffered=True)
        self.assertEqual(response.headers.getRawHeaders(b"x-accel-buffering"), [b"no"])
        received: list[bytes] = []
        done = treq.collect(response, received.append)
        await wait_until(lambda: received, what="the first event")
        self.assertEqual(b"".join(received), b'data: {"n": 1}\n\n')
        peer_request = server.seen[0].request
        peer_request.write(b"data: [DONE]\n\n")
        peer_request.finish()
        await done
        self.assertEqual(b"".join(received), b'data: {"n": 1}\n\ndata: [DONE]\n\n')

    async def test_stream_cut_short_ends_with_error_event(self) -> None:
        proxy, server = self.serve("p: {proxy: PEER, models: [m]}\n")

        def stream(request: Request) -> int:
            request.setHeader(b"content-type", b"text/event-stream")
            request.write(b'data: {"n": 1}\n\n')
            reactor.callLater(0.05, request.transport.abortConnection)
            return NOT_DONE_YET

        server.respond = stream
        response = await proxy.client.post(
            proxy.url + "/v1/chat/completions", data=json.dumps({"model": "m", "stream": True}).encode(),
            headers={"Content-Type": "application/json"})
        body = await response.content()
        first, error = body.split(b"\n\n")[:2]
        self.assertEqual(first, b'data: {"n": 1}')
        self.assertIn(b"peer 'p' ended the stream early", error)

    async def test_peer_down_is_502_and_listed_unreachable(self) -> None:
        """
        A peer nobody listens for: a clear 502, and its models listed as unreachable.
        """
        proxy, _ = self.serve("p: {proxy: PEER, models: [m]}\n", peer_port=free_port())
        listing = await proxy.get_json("/v1/models")
        [record] = [r for r in listing["data"] if r["id"] == "p/m"]
        self.assertEqual(record["state"], "unreachable")
        self.assertFalse(record["peer"]["reachable"])
        code, answer = await proxy.post_json("/v1/chat/completions", {"model": "p/m", "stream": True})
        self.assertEqual(code, 502)
        self.assertTrue(answer["error"]["message"].startswith("peer proxy error: peer 'p' (http://127.0.0.1:"),
                        answer)
        self.assertIn("refused", answer["error"]["message"])

    async def test_listed_with_live_state(self) -> None:
        """
        /v1/models lists each peer model as ``peer/model`` with the state the peer reports, and
        asks the peer again after a request may have changed it.
        """
        proxy, server = self.serve("p: {proxy: PEER, models: [m, other, gone]}\n")
        listing = await proxy.get_json("/v1/models")
        states = {r["id"]: r["state"] for r in listing["data"]}
        self.assertEqual(states, {"local": "stopped", "p/m": "ready", "p/other": "stopped",
                                  "p/gone": "not offered by the peer"})
        server.states["other"] = "starting"
        await proxy.post_json("/v1/chat/completions", {"model": "other"})
        listing = await proxy.get_json("/v1/models")
        self.assertEqual({r["id"]: r["state"] for r in listing["data"]}["p/other"], "starting")

    async def test_upstream_path(self) -> None:
        """
        ``/upstream/<peer>/<model>/<path>`` reaches the peer's ``<path>``, as it is.
        """
        proxy, server = self.serve("p: {proxy: PEER, models: [org/m]}\n")
        response = await proxy.client.get(proxy.url + "/upstream/p/org/m/props?a=b")
        answer = json.loads(await response.content())
        self.assertEqual((response.code, answer["uri"]), (200, "/props?a=b"))

    async def test_silent_peer_is_502_after_response_header_timeout(self) -> None:
        proxy, server = self.serve("p: {proxy: PEER, models: [m], timeouts: {responseHeader: 0.3}}\n")
        server.respond = lambda request: NOT_DONE_YET
        code, answer = await proxy.post_json("/v1/chat/completions", {"model": "m"})
        self.assertEqual(code, 502)
        self.assertIn("no answer within 0.3s (timeouts.responseHeader)", answer["error"]["message"])
        for seen in server.seen:
            seen.request.finish()

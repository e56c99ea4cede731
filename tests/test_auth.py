"""
Tests for L{swapproxy.web.auth}: C{apiKeys}, which routes they protect, how a key may be sent,
that it never reaches a peer, and that it never appears in a log.
"""

from __future__ import annotations

import base64
import json
from typing import Any

from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource

from swapproxy.web import auth
from swapproxy.web.auth import ApiKeys, presented_key
from swapproxy.web.root import build_site
from tests.support.harness import KEY, KEYS_CONFIG, ErrorAssertions, Harness, basic, header
from tests.support.rawhttp import RawConnection

def routes(node: Resource, prefix: bytes = b"") -> list[bytes]:
    """
    The path of every resource mounted under ``node``.
    """
    found = []
    for name, child in node.children.items():
        path = prefix + b"/" + name
        found.append(path)
        found += routes(child, path)
    return found


class KeyParsingTests(SynchronousTestCase):
    """
    Where a request carries its key.
    """

    def test_presented_key(self) -> None:
        self.assertEqual(presented_key(b"authorization", b"Bearer sk-1"), b"sk-1")
        self.assertEqual(presented_key(b"authorization", b"bearer   sk-1 "), b"sk-1")
        self.assertEqual(presented_key(b"authorization", basic("me", "sk:1").encode()), b"sk:1")
        self.assertEqual(presented_key(b"x-api-key", b"sk-1"), b"sk-1")
        for value in [b"Bearer", b"Basic !!!", basic("sk-1", "").encode(), b"Digest sk-1", b"sk-1", b""]:
            self.assertIsNone(presented_key(b"authorization", value), value)

    def test_every_key_compared_in_constant_time(self) -> None:
        """
        A candidate is compared with every key by C{hmac.compare_digest}, right or wrong, first
        key or last.
        """
        calls: list[tuple[bytes, bytes]] = []
        real = auth.hmac.compare_digest

        def compare(a: bytes, b: bytes) -> bool:
            calls.append((a, b))
            return real(a, b)

        self.patch(auth.hmac, "compare_digest", compare)
        keys = ApiKeys(lambda: ("k1", "k2", "k3"))
        for candidate, valid in [(b"k1", True), (b"k3", True), (b"nope", False), (b"k1k2", False)]:
            del calls[:]
            self.assertEqual(keys.valid(candidate), valid)
            self.assertEqual(len(calls), 3)

    def test_keys_read_for_each_request(self) -> None:
        """
        A new set of keys (a reloaded config) applies at once.
        """
        current = ("old",)
        keys = ApiKeys(lambda: current)
        self.assertTrue(keys.valid(b"old"))
        current = ("new",)
        self.assertFalse(keys.valid(b"old"))
        self.assertTrue(keys.valid(b"new"))


class ProtectedRouteTests(ErrorAssertions, SynchronousTestCase):
    """
    Which routes need a key.
    """

    def setUp(self) -> None:
        self.h = Harness(self, KEYS_CONFIG)

    def assertUnauthorized(self, response: Any, body: bytes) -> None:
        error = self.assertJSONError(
            response, body, 401, "invalid or missing API key", error_type="authentication_error"
        )
        self.assertEqual(error["code"], "unauthorized")
        self.assertEqual(header(response, b"www-authenticate"), [b'Basic realm="swapproxy"'])

    def test_every_mounted_route_needs_a_key(self) -> None:
        """
        Every route in the tree (including any mounted after this test was written), anything
        below it, and paths that match no route answer 401 without a key, whatever the method,
        and nothing reaches an upstream.
        """
        paths = [p for p in routes(self.h.root) if p not in (b"/health", b"/")]
        self.assertIn(b"/ui", paths)
        self.assertIn(b"/v1/chat/completions", paths)
        paths += [b"/upstream/llama/health", b"/no/such/route", b"/health/extra", b"/v1/models?x=1"]
        for path in paths:
            for method in ("GET", "POST", "DELETE"):
                response, body = self.h.call(method, path.decode(), b'{"model": "llama"}')
                self.assertUnauthorized(response, body)
        self.assertEqual(self.h.received, [])
        self.assertEqual(sum(u.starts for u in self.h.upstreams.values()), 0)

    def test_open_routes(self) -> None:
        """
        /health, /, /favicon.ico and CORS preflight need no key; / only says where the
        dashboard is, which needs one.
        """
        response, body = self.h.call("GET", "/health")
        self.assertEqual((response.code, body), (200, b"OK"))
        response, body = self.h.call("GET", "/")
        self.assertEqual((response.code, header(response, b"location")), (302, [b"/ui/"]))
        response, body = self.h.call("GET", "/ui/")
        self.assertUnauthorized(response, body)
        response, body = self.h.call("GET", "/favicon.ico")
        self.assertJSONError(response, body, 404)
        response, _ = self.h.call(
            "OPTIONS", "/v1/chat/completions", headers={"Access-Control-Request-Headers": "authorization"}
        )
        self.assertEqual(response.code, 204)
        self.assertEqual(header(response, b"access-control-allow-headers"), [b"authorization"])

    def test_key_forms(self) -> None:
        """
        A key is accepted as Bearer, as x-api-key and as the Basic password (any user name).
        """
        for headers in [
            {"Authorization": f"Bearer {KEY}"},
            {"Authorization": "Bearer sk-first-key"},
            {"x-api-key": KEY},
            {"Authorization": basic("anyone", KEY)},
            {"Authorization": basic("", KEY)},
            {"Authorization": "Bearer wrong", "x-api-key": KEY},
        ]:
            response, body = self.h.call("GET", "/v1/models", headers=headers)
            self.assertEqual(response.code, 200, (headers, body))

    def test_wrong_keys(self) -> None:
        """
        A wrong key, a key in the wrong place, or a near miss is a 401.
        """
        for headers in [
            {"Authorization": "Bearer sk-second-and-more"},
            {"Authorization": "Bearer sk-secon"},
            {"Authorization": f"Token {KEY}"},
            {"Authorization": KEY},
            {"Authorization": basic(KEY, "x")},
            {"x-api-key": f"Bearer {KEY}"},
            {"X-Api-Key": ""},
            {"Cookie": f"key={KEY}"},
        ]:
            response, body = self.h.call("GET", "/v1/models", headers=headers)
            self.assertUnauthorized(response, body)
        response, body = self.h.call("GET", f"/v1/models?api_key={KEY}")
        self.assertUnauthorized(response, body)

    def test_key_is_checked_before_the_model(self) -> None:
        """
        A request without a key and without a model is a 401, not a 400 about the model: a
        client learns first that it needs a key. With a key, the same request is the 400.
        """
        for path in ["/v1/chat/completions", "/chat/completions", "/tokenize", "/props", "/models/load"]:
            response, body = self.h.call("POST", path, b'{"messages": []}', {"Content-Type": "application/json"})
            self.assertUnauthorized(response, body)
        response, body = self.h.call("POST", "/v1/chat/completions", b'{"messages": []}',
                                     {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
        self.assertJSONError(response, body, 400, "missing or invalid 'model' field")

    def test_key_forwarded_to_local_models(self) -> None:
        """
        As in llama-swap, the headers that carried the key reach a local model unchanged, on
        inference routes and /upstream alike: a llama-server started with the same ``--api-key``
        accepts the request. Other credentials go on as well.
        """
        cases = [
            {"Authorization": f"Bearer {KEY}"},
            {"x-api-key": KEY, "Authorization": "Bearer upstream-token"},
            {"Authorization": basic("u", KEY), "x-api-key": "other"},
        ]
        for path in ["/v1/chat/completions", "/upstream/llama/v1/chat/completions"]:
            for sent in cases:
                headers = {"Content-Type": "application/json", **sent}
                response, body = self.h.call("POST", path, b'{"model": "llama"}', headers)
                self.assertEqual(response.code, 200, body)
                received = self.h.received[-1].headers
                for name, value in sent.items():
                    self.assertEqual(received.getRawHeaders(name.encode()), [value.encode()], (path, sent, name))

    def test_no_keys_configured(self) -> None:
        """
        Without apiKeys everything is open and Authorization is the upstream's business.
        """
        h = Harness(self)
        response, body = h.call("POST", "/v1/chat/completions", b'{"model": "llama"}',
                                {"Authorization": "Bearer for-the-upstream"})
        self.assertEqual(response.code, 200, body)
        self.assertEqual(h.received[-1].headers.getRawHeaders(b"authorization"), [b"Bearer for-the-upstream"])


class KeysNeverLoggedTests(SynchronousTestCase):
    """
    No log event, swapproxy's own or Twisted's access log, contains a key.
    """

    def test_no_key_in_logs(self) -> None:
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        h = Harness(self, KEYS_CONFIG)

        def connect() -> RawConnection:
            site = build_site(h.supervisor, h.clock)
            site.startFactory()  # turns the access log on
            self.addCleanup(site.stopFactory)
            return h.connect(site)

        wrong = "sk-wrong-but-secret"
        sends = [
            [f"Authorization: Bearer {KEY}".encode()],
            [f"x-api-key: {KEY}".encode()],
            [f"Authorization: {basic('me', KEY)}".encode()],
            [f"Authorization: Bearer {wrong}".encode()],
        ]
        for headers in sends:
            for path, body in [
                (b"/v1/chat/completions", b'{"model": "llama", "messages": []}'),
                (b"/v1/chat/completions", b'{"model": "nope"}'),
                (b"/v1/chat/completions", b"{broken"),
                (b"/upstream/llama/health", b""),
            ]:
                connect().request(b"POST", path, body, headers)
        # Requests that swapproxy refuses, and logs.
        for headers in sends:
            client = connect()
            client.protocol.dataReceived(b"POST /v1/chat/completions HTTP/1.1\r\n" + b"\r\n".join(headers)
                                         + b"\r\nContent-Length: 99999999999\r\n\r\n")
            self.assertIn(b"413", client.transport.value())
        self.assertTrue(events)
        access_lines = [formatEvent(e) for e in events if '"POST /v1/chat/completions HTTP/1.1"' in formatEvent(e)]
        self.assertTrue(access_lines, "the access log is on")
        self.assertTrue([e for e in events if "refused a request" in (e.get("log_format") or "")])
        base64_keys = [base64.b64encode(f"me:{k}".encode()).decode() for k in (KEY, wrong)]
        for event in events:
            text = formatEvent(event) + repr(event)
            for secret in [KEY, wrong, *base64_keys]:
                self.assertNotIn(secret, text)
        self.assertTrue(any(json.loads(r.body).get("model") == "llama" for r in h.received))

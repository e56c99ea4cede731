"""
Tests for L{swapproxy.web.cors}: the ``cors`` policy on preflights and on every answer, whoever
wrote it (swapproxy, the auth check, a model).
"""

from __future__ import annotations

import textwrap
from typing import Any

from twisted.trial.unittest import SynchronousTestCase
from twisted.web.server import Request

from swapproxy.config import CorsConfig
from swapproxy.web.cors import CorsPolicy
from tests.support.harness import CONFIG, Harness, Received, answer_json, header

POLICY = """
    cors:
      allowedOrigins: ["https://chat.example", "localhost"]
      allowCredentials: true
      allowedHeaders: [Content-Type, Authorization]
      maxAge: 600
"""


def with_policy(policy: str, config: str = CONFIG) -> str:
    return textwrap.dedent(config) + textwrap.dedent(policy)


def preflight(h: Harness, origin: str | None, path: str = "/v1/chat/completions", asked: str | None = None) -> Any:
    headers = {"Access-Control-Request-Method": "POST"}
    if origin is not None:
        headers["Origin"] = origin
    if asked is not None:
        headers["Access-Control-Request-Headers"] = asked
    response, body = h.call("OPTIONS", path, headers=headers)
    assert body == b"", body
    return response


def cors_headers(response: Any) -> dict[bytes, list[bytes]]:
    return {
        name.lower(): values
        for name, values in response.headers.getAllRawHeaders()
        if name.lower().startswith(b"access-control-")
    }


class DefaultPolicyTests(SynchronousTestCase):
    """
    Without a ``cors`` section: llama-server's default origins (any, echoed) and headers (any
    asked for), without credentials.
    """

    def setUp(self) -> None:
        self.h = Harness(self)

    def test_preflight(self) -> None:
        response = preflight(self.h, "https://anywhere.example", asked="content-type, authorization")
        self.assertEqual(response.code, 204)
        self.assertEqual(
            cors_headers(response),
            {
                b"access-control-allow-origin": [b"https://anywhere.example"],
                b"access-control-allow-methods": [b"GET, POST, PUT, PATCH, DELETE, OPTIONS"],
                b"access-control-allow-headers": [b"content-type, authorization"],
                b"access-control-max-age": [b"86400"],
            },
        )
        self.assertEqual(header(response, b"vary"), [b"Origin"])

    def test_every_answer_names_the_origin(self) -> None:
        """
        swapproxy's own answers, a 404, and a model's answer alike.
        """
        origin = {"Origin": "http://localhost:5173"}
        for method, path in [("GET", "/v1/models"), ("GET", "/health"), ("GET", "/nothing")]:
            response, _ = self.h.call(method, path, headers=origin)
            self.assertEqual(header(response, b"access-control-allow-origin"), [b"http://localhost:5173"], path)
            self.assertIsNone(header(response, b"access-control-allow-credentials"))
        response, _ = self.h.post_json("/v1/chat/completions", {"model": "llama"},
                                       {"Content-Type": "application/json", **origin})
        self.assertEqual(response.code, 200)
        self.assertEqual(header(response, b"access-control-allow-origin"), [b"http://localhost:5173"])

    def test_no_origin_no_cors_headers(self) -> None:
        response, _ = self.h.call("GET", "/v1/models")
        self.assertEqual(cors_headers(response), {})


class ConfiguredPolicyTests(SynchronousTestCase):
    """
    A ``cors`` section with origins, credentials, headers and a max age.
    """

    def setUp(self) -> None:
        self.h = Harness(self, with_policy(POLICY))

    def test_allowed_origins(self) -> None:
        for origin in ["https://chat.example", "https://CHAT.example", "http://localhost:3000", "http://127.0.0.1:8080",
                       "http://[::1]:5173"]:
            response = preflight(self.h, origin, asked="x-anything")
            self.assertEqual(response.code, 204)
            self.assertEqual(
                cors_headers(response),
                {
                    b"access-control-allow-origin": [origin.encode()],
                    b"access-control-allow-credentials": [b"true"],
                    b"access-control-allow-methods": [b"GET, POST, PUT, PATCH, DELETE, OPTIONS"],
                    b"access-control-allow-headers": [b"Content-Type, Authorization"],
                    b"access-control-max-age": [b"600"],
                },
                origin,
            )
            response, _ = self.h.call("GET", "/v1/models", headers={"Origin": origin})
            self.assertEqual(cors_headers(response), {b"access-control-allow-origin": [origin.encode()],
                                                      b"access-control-allow-credentials": [b"true"]})

    def test_other_origins_get_no_permission(self) -> None:
        """
        A page of an origin the policy does not list gets a preflight answer without any
        ``Access-Control-*`` header (its browser then refuses the request), and answers without
        one either.
        """
        for origin in ["https://evil.example", "https://chat.example.evil.example", "http://localhost.evil.example",
                       "null", "https://chat.example:8443"]:
            response = preflight(self.h, origin)
            self.assertEqual(response.code, 204)
            self.assertEqual(cors_headers(response), {}, origin)
            response, _ = self.h.call("GET", "/v1/models", headers={"Origin": origin})
            self.assertEqual(response.code, 200)
            self.assertEqual(cors_headers(response), {}, origin)
            self.assertEqual(header(response, b"vary"), [b"Origin"])

    def test_the_models_own_cors_headers_are_replaced(self) -> None:
        """
        A model that allows every origin (llama-server's default) does not widen the policy.
        """

        def permissive(request: Request, received: Received) -> bytes:
            request.setHeader(b"access-control-allow-origin", request.getHeader(b"origin") or b"*")
            request.setHeader(b"access-control-allow-credentials", b"true")
            return answer_json(request, received)

        self.h.server.respond = permissive
        for origin, expected in [("https://evil.example", {}),
                                 ("https://chat.example", {b"access-control-allow-origin": [b"https://chat.example"],
                                                           b"access-control-allow-credentials": [b"true"]})]:
            response, _ = self.h.post_json("/v1/chat/completions", {"model": "llama"},
                                           {"Content-Type": "application/json", "Origin": origin})
            self.assertEqual(response.code, 200)
            self.assertEqual(cors_headers(response), expected, origin)
            response, _ = self.h.call("GET", "/upstream/llama/props", headers={"Origin": origin})
            self.assertEqual(cors_headers(response), expected, origin)

    def test_401_carries_the_policy(self) -> None:
        """
        With API keys, a page still learns that its key was wrong (it can read the 401), and a
        preflight needs no key.
        """
        h = Harness(self, with_policy(POLICY).replace("healthCheckTimeout: 15", "healthCheckTimeout: 15\napiKeys: [k]"))
        response, _ = h.call("POST", "/v1/chat/completions", b"{}", {"Origin": "https://chat.example"})
        self.assertEqual(response.code, 401)
        self.assertEqual(header(response, b"access-control-allow-origin"), [b"https://chat.example"])
        self.assertEqual(preflight(h, "https://chat.example").code, 204)
        self.assertEqual(header(preflight(h, "https://chat.example"), b"access-control-allow-origin"),
                         [b"https://chat.example"])


class PolicyTests(SynchronousTestCase):
    """
    L{CorsPolicy} on its own.
    """

    def test_reads_the_config_each_time(self) -> None:
        current = [CorsConfig(allowed_origins=())]
        policy = CorsPolicy(lambda: current[0])
        self.assertFalse(policy.allows(b"https://a.example"))
        current[0] = CorsConfig(allowed_origins=("https://a.example",))
        self.assertTrue(policy.allows(b"https://a.example"))

    def test_origins_that_are_not_origins(self) -> None:
        policy = CorsPolicy(lambda: CorsConfig(allowed_origins=("localhost",)))
        for origin in [b"", b"null", b"\xff", b"http://[::1", b"localhost", b"file://"]:
            self.assertFalse(policy.allows(origin), origin)
        self.assertTrue(policy.allows(b"http://localhost"))

    def test_header_names_that_are_not_tokens_are_not_echoed(self) -> None:
        policy = CorsPolicy(CorsConfig)
        self.assertEqual(policy.allowed_headers(b"Content-Type, X-Api-Key, bad header, <script>,,"),
                         b"Content-Type, X-Api-Key")

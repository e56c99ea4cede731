# -*- test-case-name: tests.test_cors -*-
"""
Which browser pages may use swapproxy: the ``cors`` section of the config.

`Root` hands every ``OPTIONS`` request, whatever its path and before the ``apiKeys`` check, to
`Preflight`, and calls `CorsPolicy.apply` on every other request before it is routed, so that a
401, a 404, swapproxy's own answers and the answers relayed from a model all carry the same
policy. The relay leaves out a model's own ``Access-Control-*`` headers
(`swapproxy.web.relay.copy_response_head`), as llama.cpp's router does with its children.

The defaults follow llama-server's (``--cors-origins *``, ``--cors-headers *``): any page may call,
with any header it asks for, and its ``Origin`` is echoed. Unlike llama-server, credentials
(cookies, HTTP authentication) are off unless ``allowCredentials`` says otherwise: swapproxy
accepts an API key as the password of HTTP Basic authentication, which a browser would otherwise
send on behalf of any page.
"""

from __future__ import annotations

from collections.abc import Callable
from urllib.parse import urlsplit

from twisted.web.resource import Resource
from twisted.web.server import Request

from swapproxy.config import CorsConfig

#: The methods a preflight allows.
ALLOWED_METHODS = b"GET, POST, PUT, PATCH, DELETE, OPTIONS"
#: The headers a preflight allows, with ``allowedHeaders: ["*"]``, when the browser names none.
DEFAULT_HEADERS = b"Content-Type, Authorization, Accept, X-Requested-With"
_LOCAL_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})
_TOKEN_CHARS = frozenset(b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")


def _is_local(origin: str) -> bool:
    try:
        host = urlsplit(origin).hostname
    except ValueError:
        return False
    return host in _LOCAL_HOSTS


class CorsPolicy:
    """
    The CORS policy of the current configuration.

    :param config: returns the ``cors`` section (read per request, so that a reloaded
        configuration applies at once).
    """

    def __init__(self, config: Callable[[], CorsConfig]) -> None:
        self._config = config

    def allows(self, origin: bytes) -> bool:
        """
        Whether a page of ``origin`` may read swapproxy's answers.
        """
        try:
            text = origin.decode("ascii").strip().rstrip("/")
        except UnicodeDecodeError:
            return False
        if not text or text == "null":
            return False
        for allowed in self._config().allowed_origins:
            if allowed == "*":
                return True
            if allowed == "localhost":
                if _is_local(text):
                    return True
            elif allowed.lower() == text.lower():
                return True
        return False

    def apply(self, request: Request) -> bool:
        """
        Give ``request``'s response the headers that let its page read it, if the policy allows
        the page's origin.

        :returns: whether the origin is allowed.
        """
        origin = request.getHeader(b"origin")
        if origin is None:
            return False
        request.responseHeaders.addRawHeader(b"vary", b"Origin")
        if not self.allows(origin):
            return False
        request.setHeader(b"access-control-allow-origin", origin.strip())
        if self._config().allow_credentials:
            request.setHeader(b"access-control-allow-credentials", b"true")
        return True

    def allowed_headers(self, asked: bytes | None) -> bytes:
        """
        The ``Access-Control-Allow-Headers`` of a preflight that asked for ``asked``.
        """
        configured = self._config().allowed_headers
        if "*" not in configured:
            return ", ".join(configured).encode("ascii")
        if asked is None:
            return DEFAULT_HEADERS
        names = [name.strip() for name in asked.split(b",")]
        return b", ".join(name for name in names if name and set(name) <= _TOKEN_CHARS)

    def max_age(self) -> int:
        return self._config().max_age


class Preflight(Resource):
    """
    The answer to a CORS preflight (any ``OPTIONS`` request): 204, and for an allowed origin
    the methods and headers it may use; for an origin the policy does not allow, no
    ``Access-Control-*`` header, so that the browser refuses the request it asked about.

    A request without an ``Origin`` (not from a browser) gets the methods and headers, as
    llama-swap answers it.
    """

    isLeaf = True

    def __init__(self, policy: CorsPolicy) -> None:
        super().__init__()
        self._policy = policy

    def render(self, request: Request) -> bytes:
        request.setResponseCode(204)
        origin = request.getHeader(b"origin")
        if origin is not None and not self._policy.apply(request):
            return b""
        request.setHeader(b"access-control-allow-methods", ALLOWED_METHODS)
        asked = request.getHeader(b"access-control-request-headers")
        request.setHeader(b"access-control-allow-headers", self._policy.allowed_headers(asked))
        request.setHeader(b"access-control-max-age", str(self._policy.max_age()).encode("ascii"))
        return b""

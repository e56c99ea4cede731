# -*- test-case-name: tests.test_auth -*-
"""
Who may use swapproxy: the ``apiKeys`` check.

`Root` asks `ApiKeys.admit` before it looks up any child, so every route, including the ones
mounted later, is protected unless it is in `OPEN_PATHS`. As in llama-swap (reference section
5.4), a key is accepted as the password of HTTP Basic authentication, as
``Authorization: Bearer <key>`` or as ``x-api-key: <key>``. No key is ever logged.

As in llama-swap, the header that carried a valid key goes on to a local model unchanged: a
``llama-server --api-key`` started with the same key accepts the request. It never goes to a peer
(`key_headers` names it for `swapproxy.web.peer_forward`, which leaves it out): a peer is another
machine, with keys of its own.
"""

from __future__ import annotations

import binascii
import hashlib
import hmac
from base64 import b64decode
from collections.abc import Callable, Sequence
from weakref import WeakKeyDictionary

from twisted.web.resource import Resource
from twisted.web.server import Request

from swapproxy.web.errors import error_response

#: First path segments that need no key when nothing follows them: ``/``, ``/health``,
#: ``/wol-health`` and ``/favicon.ico``. CORS preflight (``OPTIONS``) is open as well.
OPEN_PATHS = frozenset({b"", b"health", b"wol-health", b"favicon.ico"})

REALM = b'Basic realm="swapproxy"'

_KEY_HEADERS = (b"authorization", b"x-api-key")

#: The headers that carried swapproxy's key, for each request admitted with one.
_carriers: WeakKeyDictionary[Request, frozenset[bytes]] = WeakKeyDictionary()


def key_headers(request: Request) -> frozenset[bytes]:
    """
    The names of the request headers that carried one of swapproxy's ``apiKeys`` (none without
    ``apiKeys``): what must not be forwarded to a peer.
    """
    return _carriers.get(request, frozenset())


def _digest(value: bytes) -> bytes:
    # Comparing digests of equal length: the time taken says nothing about a key's length.
    return hashlib.sha256(value).digest()


def presented_key(header: bytes, value: bytes) -> bytes | None:
    """
    The key a request header carries: the password of ``Basic``, the token of ``Bearer``, or the
    whole ``x-api-key`` value; ``None`` when the header carries none.
    """
    if header == b"x-api-key":
        return value.strip() or None
    scheme, _, credentials = value.strip().partition(b" ")
    credentials = credentials.strip()
    if scheme.lower() == b"bearer":
        return credentials or None
    if scheme.lower() == b"basic":
        try:
            decoded = b64decode(credentials, validate=True)
        except (binascii.Error, ValueError):
            return None
        user, colon, password = decoded.partition(b":")
        return password if colon and password else None
    return None


class ApiKeys:
    """
    The configured ``apiKeys``, checked in constant time.

    :param keys: returns the current keys (read per request, so that a reloaded configuration
        takes effect); no keys means everyone is let in.
    """

    def __init__(self, keys: Callable[[], Sequence[str]]) -> None:
        self._keys = keys
        self._cached: tuple[Sequence[str], tuple[bytes, ...]] | None = None

    def _digests(self) -> tuple[bytes, ...]:
        keys = self._keys()
        if self._cached is None or self._cached[0] != keys:
            self._cached = (keys, tuple(_digest(k.encode("utf-8")) for k in keys))
        return self._cached[1]

    def valid(self, candidate: bytes) -> bool:
        """
        Whether ``candidate`` is one of the keys; every key is compared, each in constant time.
        """
        digest = _digest(candidate)
        found = False
        for key in self._digests():
            found |= hmac.compare_digest(digest, key)
        return found

    def admit(self, request: Request, segment: bytes) -> bool:
        """
        Whether ``request`` may go on to the child ``segment`` of the root.

        The headers that carried a valid key are remembered (`key_headers`).
        """
        if not self._digests():
            return True
        if segment in OPEN_PATHS and not request.postpath:
            return True
        carriers = []
        for header in _KEY_HEADERS:
            for value in request.requestHeaders.getRawHeaders(header, []):
                key = presented_key(header, value)
                if key is not None and self.valid(key):
                    carriers.append(header)
                    break
        if carriers:
            _carriers[request] = frozenset(carriers)
        return bool(carriers)


class Unauthorized(Resource):
    """
    The 401 answer to a request without a valid key, with an OpenAI-style JSON error.
    """

    isLeaf = True

    def render(self, request: Request) -> bytes:
        request.setHeader(b"www-authenticate", REALM)
        return error_response(
            request,
            401,
            "unauthorized: invalid or missing API key; send it as 'Authorization: Bearer <key>',"
            " 'x-api-key: <key>' or the password of HTTP Basic authentication",
        )

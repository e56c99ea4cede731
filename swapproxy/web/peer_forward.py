# -*- test-case-name: tests.test_peer_forward -*-
"""
Forwarding a request to a peer's model: the forward pipeline (`swapproxy.web.forward`) without a
ticket, a loading head or a lease, since a peer starts and swaps its own models.

The request goes to the peer's ``proxy`` URL with the request's path appended, with the headers
the pipeline forwards to a local model. The peer's ``apiKey``, when it has one, replaces the
client's ``Authorization`` and ``x-api-key``. A swapproxy key (``apiKeys``) never reaches a peer:
the header that carried it (`swapproxy.web.auth.key_headers`) is left out. Other credentials are
passed on, so that a client can use a peer's own key.

The answer is relayed by the same code as a local model's (`swapproxy.web.forward.relay_answer`):
with flow control, and an SSE error event if an event stream breaks off, or when swapproxy shuts
down (`swapproxy.peers.PeerSet` ends the relays it was told of before the connections drop, as
a local model's stream ends when the model is stopped). When the peer is another swapproxy
loading the model, its loading stream is that event stream.

A peer that cannot be reached, or sends no answer within ``timeouts.responseHeader``, is answered
502 ``peer proxy error: ...`` and marked down (`swapproxy.peers.PeerSet`).
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import CancelledError
from twisted.web.http_headers import Headers
from twisted.web.server import Request

from swapproxy.config import PeerConfig, PeerModel
from swapproxy.logs import proxy_logger
from swapproxy.metrics import request_meter
from swapproxy.peers import PeerSet, auth_headers
from swapproxy.web.auth import key_headers
from swapproxy.web.errors import write_error
from swapproxy.web.filters import set_path, strip_path
from swapproxy.web.forward import relay_answer
from swapproxy.web.relay import describe_error, forward_headers
from swapproxy.web.render import ClientState
from swapproxy.web.sse import PlainEvents

log = proxy_logger("swapproxy.forward")

_CREDENTIALS = frozenset({b"authorization", b"x-api-key"})


def peer_headers(request: Request, peer: PeerConfig) -> Headers:
    """
    The request's headers as they go to ``peer``: the peer's ``apiKey`` in place of the client's
    credentials, and never the header that carried swapproxy's own key.
    """
    own = auth_headers(peer)
    headers = forward_headers(request, _CREDENTIALS if own else key_headers(request))
    for name, values in own.items():
        headers.setRawHeaders(name, values)
    return headers


class PeerForward:
    """
    Forwards requests to peers' models.

    :param peers: the peers, their clients and health.
    """

    def __init__(self, peers: PeerSet) -> None:
        self.peers = peers

    async def __call__(
        self,
        request: Request,
        client: ClientState,
        target: PeerModel,
        path: bytes,
        body: bytes | None,
        dialect: PlainEvents,
    ) -> None:
        """
        Forward ``request`` to the peer of ``target`` and relay the answer; the caller
        finishes the request.

        :param path: the path and query to request from the peer, starting with ``/``.
        :param body: the request body to send (its ``model`` already the peer's model id).
        """
        peer = target.peer
        meter = request_meter(request)
        if meter is not None:
            meter.model = target.fqn
        headers = peer_headers(request, peer)
        peer_client = self.peers.client(peer)
        try:
            response = await peer_client.send(request.method, path, headers, body)
        except CancelledError:
            raise
        except Exception as e:
            reason = describe_error(e)
            self.peers.unreachable(peer, reason)
            write_error(request, 502, f"peer proxy error: peer {peer.id!r} ({peer.proxy}): {reason}",
                        "server_error", "peer_unreachable")
            return
        self.peers.reached(peer)
        await relay_answer(request, client, response, f"peer {peer.id!r}", dialect, track=self.peers.relaying)



def rewrite_for_peer(target: PeerModel, name: str, payload: dict[str, Any]) -> bool:
    """
    A JSON body made ready for the peer, in place: ``model`` becomes the peer's own model id,
    then the peer's ``filters`` apply as a model's do (`swapproxy.web.filters`).

    :param name: the model name the request was for (after profile and selector), for
        ``setParamsByID``.
    :returns: whether anything changed.
    """
    peer = target.peer
    changed = payload.get("model") != target.model
    payload["model"] = target.model
    for path in peer.strip_params:
        changed = strip_path(payload, path) or changed
    for params in (peer.set_params, peer.set_params_by_id.get(name) or {}):
        for path in sorted(params):
            changed = set_path(payload, path, params[path]) or changed
    return changed

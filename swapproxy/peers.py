# -*- test-case-name: tests.test_peers -*-
"""
The other servers swapproxy relays to (``peers``): a connection pool for each, and what is known
of each one's health.

A peer's models are listed in ``/v1/models``, llama.cpp's router ``/models`` and on the
dashboard with their live state. That state is learnt on demand: when ``/v1/models`` or
``/models`` is asked for and what is known of a peer is older than `FRESH_SECONDS`, swapproxy asks
the peer for its own ``/v1/models`` (at most one such question to a peer at a time, for at most
`POLL_TIMEOUT` seconds), and waits a moment for the answer (`PeerSet.refresh`). While a dashboard
watches (`PeerSet.subscribe`), that is demand too: the peers are asked every `FRESH_SECONDS`, or
every `LOADING_FRESH_SECONDS` while one of their models loads, and never while nobody watches.
Every request relayed to a peer also tells: a peer that cannot be reached is marked down at once,
and one that answers is marked up.

A peer that is another swapproxy reports the state of each of its models (``state``), a
llama-swap reports ``status`` (``loaded``/``unloaded``); any other server is only up or down.
"""

from __future__ import annotations

import json
import math
import socket
from collections.abc import Callable, Mapping
from typing import Any

import attrs
from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, DeferredList, succeed
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.interfaces import IDelayedCall, IStreamClientEndpoint
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.task import deferLater
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.http_headers import Headers
from zope.interface import implementer

from swapproxy.config import Config, PeerConfig
from swapproxy.logs import proxy_logger
from swapproxy.reactors import IClientReactor, IStreamConnection
from swapproxy.relayclient import RelayPool
from swapproxy.httpclient import BytesProducer
from swapproxy.subscribers import Subscribers
from swapproxy.supervisor import ShuttingDown
from swapproxy.web.relay import describe_error

log = proxy_logger("swapproxy.peers")

#: Seconds for which what is known of a peer is fresh enough for ``/v1/models``.
FRESH_SECONDS = 5.0
#: Seconds between two questions to the peers while a dashboard watches and a peer model loads.
LOADING_FRESH_SECONDS = 1.0
#: Seconds a question to a peer about its models may take in all.
POLL_TIMEOUT = 5.0
#: Seconds ``/v1/models`` waits for the peers' answers before it answers with what it knows.
LIST_WAIT = 2.0
#: The most of a peer's model list that is read.
MAX_LIST_BYTES = 1 << 20
#: Idle connections kept per peer.
MAX_IDLE = 8
#: The state of a configured peer model that the peer does not list (a typo in ``models``, or
#: a model the peer no longer has).
NOT_OFFERED = "not offered by the peer"


class PeerTimeout(Exception):
    """
    A peer did not send the head of its answer within ``timeouts.responseHeader``.
    """


@attrs.define
class PeerHealth:
    """
    What is known of one peer.

    :ivar reachable: whether the last contact worked; ``None`` before any.
    :ivar error: why the last contact failed.
    :ivar checked_at: when the peer was last heard from or failed (the clock's seconds).
    :ivar asked_at: when the peer was last asked for its models; ``None`` when never, or
        when a request relayed since may have changed their states.
    :ivar states: each model the peer listed, with its state as the peer reported it;
        ``None`` when the peer never gave a readable list.
    :ivar statuses: the ``status`` object of each model the peer listed with one (a swapproxy's
        has its load ``progress``; a llama-swap's its ``value``).
    """

    reachable: bool | None = None
    error: str = ""
    checked_at: float | None = None
    asked_at: float | None = None
    states: dict[str, str] | None = None
    statuses: dict[str, dict[str, Any]] = attrs.Factory(dict)

    def model_state(self, model: str) -> str:
        """
        The state of one of the peer's models, for ``/v1/models``: the peer's own word for it
        (``ready``, ``stopped``, ``loaded``...), ``available`` when the peer lists it without a
        state, `NOT_OFFERED` when it does not list it, ``unreachable`` when the peer is down and
        ``unknown`` before swapproxy has heard from the peer.
        """
        if self.reachable is False:
            return "unreachable"
        if self.states is None:
            return "unknown"
        return self.states.get(model, NOT_OFFERED)

    def model_status(self, model: str) -> dict[str, Any] | None:
        """
        The ``status`` object the peer gave one of its models, while the peer is reachable.
        """
        return None if self.reachable is False else self.statuses.get(model)


def auth_headers(peer: PeerConfig) -> dict[bytes, list[bytes]]:
    """
    The headers that carry the peer's ``apiKey`` (none without one).
    """
    if not peer.api_key:
        return {}
    key = peer.api_key.encode("latin-1")
    return {b"authorization": [b"Bearer " + key], b"x-api-key": [key]}


@implementer(IStreamClientEndpoint)
class _KeepAliveEndpoint:
    """
    A client endpoint whose connections send TCP keep-alive probes after ``idle`` seconds.
    """

    def __init__(self, endpoint: IStreamClientEndpoint, idle: float) -> None:
        self._endpoint = endpoint
        self._idle = idle

    def connect(self, factory: Any) -> Deferred[Any]:
        def connected(protocol: Any) -> Any:
            set_keepalive(protocol.transport, self._idle)
            return protocol

        return self._endpoint.connect(factory).addCallback(connected)


def set_keepalive(transport: Any, idle: float) -> None:
    """
    Turn on TCP keep-alive probes after ``idle`` seconds of silence, where the platform allows.
    """
    set_keep_alive = getattr(transport, "setTcpKeepAlive", None)
    if set_keep_alive is None:
        return
    set_keep_alive(True)
    handle = getattr(transport, "getHandle", lambda: None)()
    for option in ("TCP_KEEPIDLE", "TCP_KEEPINTVL"):
        if handle is not None and hasattr(socket, option):
            try:
                handle.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), max(1, int(idle)))
            except OSError:
                pass


class PeerClient:
    """
    Sends requests to one peer, with its timeouts: swapproxy's relay pool for ``http://``,
    Twisted's `Agent` for ``https://``.
    """

    def __init__(self, peer: PeerConfig, reactor: IClientReactor) -> None:
        self.peer = peer
        self._reactor = reactor
        timeouts = peer.timeouts
        self._connect_timeout = timeouts.connect if timeouts.connect > 0 else 24 * 3600.0
        self._https = peer.proxy.lower().startswith("https:")
        self._agent: Agent | None = None
        self._pool: HTTPConnectionPool
        if self._https:
            self._pool = HTTPConnectionPool(reactor, persistent=True)
            self._pool.maxPersistentPerHost = MAX_IDLE
            self._pool.retryAutomatically = False
            if timeouts.idle_conn > 0:
                # Twisted annotates an int; the pool hands it to callLater, which takes any float.
                self._pool.cachedConnectionTimeout = timeouts.idle_conn  # type: ignore[assignment]
            self._agent = Agent(reactor, connectTimeout=self._connect_timeout, pool=self._pool)
        else:
            self._pool = RelayPool(reactor, MAX_IDLE, endpoint=self._endpoint)

    def _endpoint(self, address: tuple[str, int]) -> IStreamClientEndpoint:
        host, port = address
        endpoint: IStreamClientEndpoint
        if isIPAddress(host):
            endpoint = TCP4ClientEndpoint(self._reactor, host, port, timeout=self._connect_timeout)
        elif isIPv6Address(host):
            endpoint = TCP6ClientEndpoint(self._reactor, host, port, timeout=self._connect_timeout)
        else:
            endpoint = HostnameEndpoint(self._reactor, host.encode("idna"), port, timeout=self._connect_timeout)
        keepalive = self.peer.timeouts.keepalive
        return _KeepAliveEndpoint(endpoint, keepalive) if keepalive > 0 else endpoint

    def url_for(self, path: bytes) -> bytes:
        """
        The peer URL of a request path (which starts with ``/``): the path appended to ``proxy``.
        """
        return self.peer.proxy.rstrip("/").encode("ascii") + path

    def send(self, method: bytes, path: bytes, headers: Headers, body: bytes | None) -> Deferred[Any]:
        """
        Send one request; fires with the answer's head (the body follows through
        ``deliverBody``), or fails with `PeerTimeout` after ``timeouts.responseHeader``.

        :param headers: without ``Host``, ``Content-Length`` or hop-by-hop headers.
        """
        url = self.url_for(path)
        sent: Deferred[Any]
        if self._agent is not None:
            producer = BytesProducer(body) if body else None
            sent = self._agent.request(method, url, headers, producer)
        else:
            assert isinstance(self._pool, RelayPool)
            sent = self._pool.relay(method, url, headers, body)
        limit = self.peer.timeouts.response_header
        if limit <= 0:
            return sent
        timed_out = []

        def expire() -> None:
            timed_out.append(True)
            sent.cancel()

        timer = self._reactor.callLater(limit, expire)

        def done(result: Any) -> Any:
            if timer.active():
                timer.cancel()
            if timed_out and isinstance(result, Failure):
                return Failure(PeerTimeout(f"no answer within {limit:g}s (timeouts.responseHeader)"))
            return result

        return sent.addBoth(done)

    def close(self) -> Deferred[None]:
        """
        Close the idle connections; busy ones close when their answer ends.
        """
        closed: Deferred[None] = self._pool.closeCachedConnections()
        return closed


class _Collect(Protocol):
    """
    Reads a body of at most `MAX_LIST_BYTES`.
    """

    transport: IStreamConnection

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.size = 0
        self.done: Deferred[bytes] = Deferred(self._cancel)

    def _cancel(self, _: Deferred[bytes]) -> None:
        if self.transport is not None:
            self.transport.stopProducing()

    def dataReceived(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > MAX_LIST_BYTES:
            self.transport.stopProducing()
            return
        self.chunks.append(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if not self.done.called:
            self.done.callback(b"".join(self.chunks))


def model_states(listing: Any) -> dict[str, str]:
    """
    Each model of a ``/v1/models`` answer with its state: ``state`` (a swapproxy),
    ``status.value`` (a llama-swap), else ``available``.

    :raises ValueError: the answer is not a model list.
    """
    data = listing.get("data") if isinstance(listing, dict) else None
    if not isinstance(data, list):
        raise ValueError("not a model list (no 'data' list)")
    states = {}
    for record in data:
        if not isinstance(record, dict) or not isinstance(record.get("id"), str):
            continue
        state = record.get("state")
        status = record.get("status")
        if not isinstance(state, str) and isinstance(status, dict):
            state = status.get("value")
        states[record["id"]] = state if isinstance(state, str) and state else "available"
    return states


def model_statuses(listing: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """
    The ``status`` object of each model of a ``/v1/models`` answer that has one.
    """
    return {
        record["id"]: record["status"]
        for record in listing.get("data") or []
        if isinstance(record, dict) and isinstance(record.get("id"), str) and isinstance(record.get("status"), dict)
    }


def _shown_progress(status: Mapping[str, Any]) -> dict[str, Any] | None:
    """
    The load progress a swapproxy peer gave one of its models (its `swapproxy.board.ModelBoard`
    shape), with only the fields the dashboard draws, each of its type: it is another server's.
    """
    raw = status.get("progress")
    if not isinstance(raw, dict):
        return None

    def number(key: str, high: float) -> float | None:
        value = raw.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return None
        return float(value) if 0 <= value <= high else None

    def text(key: str) -> str:
        value = raw.get(key)
        return value[:MAX_WORD] if isinstance(value, str) else ""

    fraction = number("fraction", 1.0)
    return {
        "stage": text("stage") or "loading",
        "label": text("label"),
        "fraction": fraction,
        "percent": None if fraction is None else int(fraction * 100),
        "elapsed": number("elapsed", 1e9) or 0.0,
        "eta": number("eta", 1e9),
    }


#: The most characters of a word or label a peer reports that are shown.
MAX_WORD = 200


def _pass_to(result: Any, waiter: Deferred[None]) -> Any:
    if not waiter.called:
        waiter.callback(None)
    return result


class PeerSet(Service):
    """
    The peers of the current configuration: a `PeerClient` for each, and their `PeerHealth`.

    :param config: returns the configuration in force (it changes on reload).
    :param reactor: provides ``callLater``, ``seconds`` and TCP connections.
    :param client_factory: makes the client of a peer (`PeerClient` by default; tests pass
        fakes with the same ``send``, ``close`` and ``peer``).
    """

    name = "peers"

    def __init__(self, config: Callable[[], Config], reactor: IClientReactor,
                 client_factory: Callable[[PeerConfig, Any], Any] = PeerClient) -> None:
        self._config = config
        self._reactor = reactor
        self._client_factory = client_factory
        self._clients: dict[str, PeerClient] = {}
        self.health: dict[str, PeerHealth] = {}
        #: Per peer: fires when the question about its models in flight is answered.
        self._polls: dict[str, Deferred[None]] = {}
        self._questions: dict[str, Deferred[None]] = {}
        self._pruned_for: Config | None = None
        self._subscribers = Subscribers("peers")
        #: The entries the subscribers were last told of.
        self._sent: list[dict[str, Any]] = []
        #: The next question to the peers for the subscribers, while there are any.
        self._watch_call: IDelayedCall | None = None
        self._stopped = False
        #: The answers of peers being relayed to clients, each ended when swapproxy stops.
        self._relays: set[Any] = set()

    @property
    def peers(self) -> Mapping[str, PeerConfig]:
        return self._config().peers

    def client(self, peer: PeerConfig) -> Any:
        """
        The client of ``peer``, made anew when the peer's settings changed (a reload).
        """
        current = self._clients.get(peer.id)
        if current is None or current.peer != peer:
            if current is not None:
                current.close()
                self.health[peer.id] = PeerHealth()
            current = self._clients[peer.id] = self._client_factory(peer, self._reactor)
        return current

    def forget_removed(self) -> None:
        """
        Close the connections of the peers a reload removed, and forget what was known of them.

        Called after each scheduling pass of the supervisor (a reload ends with one); it does
        nothing until the configuration has changed.
        """
        config = self._config()
        if config is self._pruned_for:
            return
        self._pruned_for = config
        for peer_id in [p for p in self._clients if p not in config.peers]:
            self._clients.pop(peer_id).close()
            self.health.pop(peer_id, None)
            question = self._questions.get(peer_id)
            if question is not None:
                question.cancel()
        if self._subscribers and self._watch_call is None:
            self._watch()  # a reload added the first peers while a dashboard watches
        self._changed()

    def _health(self, peer_id: str) -> PeerHealth:
        return self.health.setdefault(peer_id, PeerHealth())

    def reached(self, peer: PeerConfig, relayed: bool = True) -> None:
        """
        ``peer`` answered a request.

        :param relayed: the request was a client's, which may have changed the state of the
            peer's models (it started one): the next `refresh` asks the peer again.
        """
        health = self._health(peer.id)
        if relayed:
            health.asked_at = None
            self._watch_soon()
        if health.reachable is not True:
            log.info("peer {peer} is reachable", peer=peer.id)
        health.reachable, health.error, health.checked_at = True, "", self._reactor.seconds()
        self._changed()

    def unreachable(self, peer: PeerConfig, error: str) -> None:
        """
        ``peer`` could not be reached (or sent no answer in time).
        """
        health = self._health(peer.id)
        if health.reachable is not False:
            log.warn("peer {peer} is unreachable: {error}", peer=peer.id, error=error)
        health.reachable, health.error, health.checked_at = False, error, self._reactor.seconds()
        self._changed()

    def refresh(self, wait: float = LIST_WAIT) -> Deferred[None]:
        """
        Ask each peer not asked within `FRESH_SECONDS` for its models; fires when all have
        answered, or after ``wait`` seconds, whichever is first. The questions go on after that:
        their answers are kept for the next caller.
        """
        pending = []
        for poll in self._ask(FRESH_SECONDS):
            # Each caller its own Deferred: its timeout must not cancel the question.
            mine: Deferred[None] = Deferred()
            poll.addBoth(_pass_to, mine)
            pending.append(mine)
        if not pending:
            return succeed(None)
        together: Deferred[Any] = DeferredList(pending)
        result: Deferred[None] = Deferred()
        def finished(_: Any) -> None:
            if timer.active():
                timer.cancel()
            if not result.called:
                result.callback(None)

        timer = self._reactor.callLater(wait, finished, None)

        together.addCallback(finished)
        return result

    def _ask(self, fresh: float) -> list[Deferred[None]]:
        """
        Ask each peer not asked within ``fresh`` seconds for its models.

        :returns: the questions in flight (new or not), each a Deferred that fires when answered.
        """
        now = self._reactor.seconds()
        pending = []
        for peer in self.peers.values():
            self.client(peer)
            health = self._health(peer.id)
            poll = self._polls.get(peer.id)
            if poll is None and (health.asked_at is None or now - health.asked_at >= fresh):
                health.asked_at = now
                poll = self._polls[peer.id] = Deferred()
                question = self._questions[peer.id] = Deferred.fromCoroutine(self._poll(peer))
                question.addBoth(self._polled, peer.id)
            if poll is not None and not poll.called:
                pending.append(poll)
        return pending

    def _polled(self, result: Any, peer_id: str) -> None:
        self._questions.pop(peer_id, None)
        poll = self._polls.pop(peer_id, None)
        if poll is not None:
            poll.callback(None)
        if isinstance(result, Failure) and not result.check(CancelledError):
            log.failure("asking peer {peer} for its models", result, peer=peer_id)
        self._changed()

    def relaying(self, relay: Any) -> Callable[[], None]:
        """
        A peer's answer is being relayed to a client by ``relay`` (a
        `swapproxy.web.relay.BodyRelay`): `stopService` aborts it with `ShuttingDown`, so that
        the client's stream ends with an error event rather than being cut.

        :returns: a function that forgets it, for when the relay has ended.
        """
        self._relays.add(relay)
        return lambda: self._relays.discard(relay)

    # -- what the dashboard shows -------------------------------------------------------------

    def entries(self) -> list[dict[str, Any]]:
        """
        Each model of each configured peer as the dashboard shows it, in id order: ``id``
        (``peer/model``), ``peer``, ``model``, ``state`` (`PeerHealth.model_state`), ``status``
        (a swapproxy peer's own word for what the model does, such as ``loading`` or
        ``queued``, else ``state``), ``progress`` (while a swapproxy peer loads it: ``stage``,
        ``label``, ``fraction``, ``percent``, ``elapsed``, ``eta``; else ``None``), and the peer's
        ``reachable`` and ``error``.
        """
        entries = []
        for peer in self.peers.values():
            known = self.health.get(peer.id) or PeerHealth()
            for model in peer.models:
                state = known.model_state(model)[:MAX_WORD]
                status = known.model_status(model) or {}
                word = status.get("state")
                entries.append({
                    "id": f"{peer.id}/{model}",
                    "peer": peer.id,
                    "model": model,
                    "state": state,
                    "status": word[:MAX_WORD] if isinstance(word, str) and word else state,
                    "progress": _shown_progress(status),
                    "reachable": known.reachable,
                    "error": known.error,
                })
        return sorted(entries, key=lambda entry: entry["id"])

    def subscribe(self, subscriber: Callable[[str, Any], None]) -> Callable[[], None]:
        """
        Call ``subscriber("peers", entries)`` with every `entries` from now on, each time they
        change; and while anyone is subscribed, ask the peers for their models every
        `FRESH_SECONDS` (every `LOADING_FRESH_SECONDS` while one of their models loads).

        :returns: a function that unsubscribes (calling it twice is harmless).
        """
        first = not self._subscribers
        remove = self._subscribers.add(subscriber)
        if first:
            self._sent = self.entries()
            self._watch()

        def unsubscribe() -> None:
            remove()
            if not self._subscribers and self._watch_call is not None:
                if self._watch_call.active():
                    self._watch_call.cancel()
                self._watch_call = None

        return unsubscribe

    def _watch(self) -> None:
        self._watch_call = None
        if not self._subscribers or not self.peers or self._stopped:
            return
        loading = any(entry["progress"] is not None or entry["status"] in ("starting", "loading")
                      for entry in self._sent)
        fresh = LOADING_FRESH_SECONDS if loading else FRESH_SECONDS
        self._ask(fresh)
        self._watch_call = self._reactor.callLater(fresh, self._watch)

    def _watch_soon(self) -> None:
        """
        A request relayed to a peer may have started one of its models: while a dashboard
        watches, ask within `LOADING_FRESH_SECONDS` rather than at the next round.
        """
        call = self._watch_call
        if not self._subscribers or self._stopped or call is None or not call.active():
            return
        soon = self._reactor.seconds() + LOADING_FRESH_SECONDS
        if call.getTime() > soon:
            call.reset(LOADING_FRESH_SECONDS)

    def _changed(self) -> None:
        if not self._subscribers:
            return
        entries = self.entries()
        if entries != self._sent:
            self._sent = entries
            self._subscribers.publish("peers", entries)

    async def _poll(self, peer: PeerConfig) -> None:
        """
        Ask ``peer`` for its ``/v1/models`` and note what it says.
        """
        client = self.client(peer)
        headers = Headers(auth_headers(peer))
        headers.setRawHeaders(b"accept", [b"application/json"])
        request = client.send(b"GET", b"/v1/models", headers, None)
        stage: list[Deferred[Any]] = [request]
        timer: IDelayedCall = self._reactor.callLater(POLL_TIMEOUT, lambda: stage[0].cancel())
        try:
            response = await request
            collect = _Collect()
            stage[0] = collect.done
            response.deliverBody(collect)
            body = await collect.done
        except CancelledError:
            if self.running and self._clients.get(peer.id) is client:
                self.unreachable(peer, f"no answer to GET /v1/models within {POLL_TIMEOUT:g}s")
            return
        except Exception as e:
            self.unreachable(peer, describe_error(e))
            return
        finally:
            if timer.active():
                timer.cancel()
        self.reached(peer, relayed=False)
        health = self._health(peer.id)
        if response.code != 200:
            log.info("peer {peer} answered GET /v1/models with HTTP {code}", peer=peer.id, code=response.code)
            return
        try:
            listing = json.loads(body)
            health.states = model_states(listing)
            health.statuses = model_statuses(listing)
        except (ValueError, UnicodeDecodeError) as e:
            log.info("peer {peer}: cannot read its /v1/models: {error}", peer=peer.id, error=e)

    def stopService(self) -> Deferred[Any]:
        """
        End the relays of peers' answers (each client's stream ends with an error event saying
        that swapproxy is shutting down), withdraw the questions, close the connections.
        """
        super().stopService()
        self._stopped = True
        if self._watch_call is not None and self._watch_call.active():
            self._watch_call.cancel()
        self._watch_call = None
        relays = list(self._relays)
        for relay in relays:
            relay.abort(ShuttingDown("swapproxy is shutting down"))
        for question in list(self._questions.values()):
            question.cancel()
        closing = [client.close() for client in self._clients.values()]
        self._clients.clear()
        done: Deferred[Any] = DeferredList(closing)
        if relays:
            # What was just written to those clients leaves with the next round of I/O, before
            # the reactor drops their connections.
            done.addCallback(lambda _: deferLater(self._reactor, 0, lambda: None))
        return done

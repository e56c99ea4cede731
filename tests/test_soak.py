"""
A soak test: many requests through swapproxy on the real reactor, with real fake-upstream
processes, and afterwards no file descriptor and no memory left behind.

The figures (time, open file descriptors, RSS, Python objects) are logged under the namespace
``tests.soak``; with trial they are in ``_trial_temp/test.log``.
"""

from __future__ import annotations

import gc
import json
import random
import time
from collections import Counter
from typing import Any

import psutil
from treq.client import HTTPClient
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool

from swapproxy.config import parse_config
from swapproxy.supervisor import Supervisor
from swapproxy.testing.local import LOOPBACK, fake_command
from swapproxy.web.root import build_site
from tests.support.live import config_yaml, connect_raw
from tests.support.processes import wait_until

log = Logger(namespace="tests.soak")

#: Requests in the measured run, after the warm-up.
REQUESTS = 10_000
WARM_UP = 1_000
CONCURRENCY = 16
#: Requests in a row for one model; the next phase asks for the other one, which swaps them.
PHASE = 500
MODELS = ("alpha", "beta")
#: File descriptors the measured run may leave open beyond the baseline.
FD_SLACK = 4


class Workload:
    """
    The soak's requests: request ``i`` is always the same one.

    Of every 20 requests: 10 chat completions, 4 streamed to the end, 2 streams the client drops
    after the first event, 1 upstream error (fake_status), 1 invalid JSON, 1 unknown model and
    1 GET through ``/upstream/<model>/health``, ``/v1/models`` or ``/running``.
    """

    def __init__(self, url: str, port: int, client: HTTPClient) -> None:
        self.url = url
        self.port = port
        self.client = client
        self.outcomes: Counter[str] = Counter()
        self.unexpected: list[str] = []

    def model(self, i: int) -> str:
        return MODELS[(i // PHASE) % len(MODELS)]

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        response = await self.client.post(
            self.url + path, data=body, headers={b"content-type": [b"application/json"]}, timeout=60
        )
        return response.code, await response.content()

    async def one(self, i: int) -> None:
        kind = i % 20
        model = self.model(i)
        rng = random.Random(i)
        chat: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": f"request {i}"}]}
        try:
            if kind < 10:
                chat["fake_tokens"] = rng.randrange(1, 20)
                status, body = await self.post("/v1/chat/completions", json.dumps(chat).encode())
                ok = status == 200 and json.loads(body)["choices"][0]["message"]["content"]
                self.tally("chat", ok, i, status, body)
            elif kind < 14:
                chat.update(stream=True, fake_tokens=rng.randrange(5, 40))
                status, body = await self.post("/v1/chat/completions", json.dumps(chat).encode())
                self.tally("stream", status == 200 and body.endswith(b"data: [DONE]\n\n"), i, status, body)
            elif kind < 16:
                chat.update(stream=True, fake_tokens=100, fake_token_delay=0.01)
                body = json.dumps(chat).encode()
                # Connection: close, so that an answer other than a stream also ends the connection.
                request = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: soak\r\nContent-Type: application/json\r\n"
                           b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
                hang_up = await connect_raw(self.port, request, hang_up_at=b"data:")
                received = await hang_up.done
                self.tally("hang-up", received.startswith(b"HTTP/1.1 200"), i, 0, received)
            elif kind == 16:
                wanted = rng.choice([400, 429, 500, 503])
                chat["fake_status"] = wanted
                status, body = await self.post("/v1/chat/completions", json.dumps(chat).encode())
                self.tally("upstream-error", status == wanted and "error" in json.loads(body), i, status, body)
            elif kind == 17:
                status, body = await self.post("/v1/chat/completions", b'{"model": "' + model.encode() + b'",')
                self.tally("bad-json", status == 400, i, status, body)
            elif kind == 18:
                status, body = await self.post("/v1/chat/completions", json.dumps(dict(chat, model="nope")).encode())
                self.tally("unknown-model", status == 404, i, status, body)
            else:
                path = rng.choice([f"/upstream/{model}/health", "/v1/models", "/running"])
                response = await self.client.get(self.url + path, timeout=60)
                body = await response.content()
                self.tally("get", response.code == 200, i, response.code, body)
        except Exception as e:
            self.tally("exception", False, i, 0, repr(e).encode())

    def tally(self, kind: str, ok: Any, i: int, status: int, body: bytes) -> None:
        self.outcomes[kind if ok else kind + " FAILED"] += 1
        if not ok:
            self.unexpected.append(f"#{i} {kind}: status {status}: {body[:300]!r}")

    async def run(self, first: int, count: int) -> None:
        """
        Requests ``first`` to ``first + count - 1``, `CONCURRENCY` at a time.
        """
        numbers = iter(range(first, first + count))

        async def worker() -> None:
            for i in numbers:
                await self.one(i)

        await gatherResults([Deferred.fromCoroutine(worker()) for _ in range(CONCURRENCY)])


def usage() -> tuple[int, int, int]:
    """
    This process's open file descriptors, RSS in bytes, and the number of Python objects gc tracks.
    """
    gc.collect()
    me = psutil.Process()
    return me.num_fds(), me.memory_info().rss, len(gc.get_objects())


class SoakTests(TestCase):
    """
    10,000 requests mixing two models (swapping 20 times), streams, hang-ups and errors.
    """

    timeout = 600

    async def test_soak(self) -> None:
        models = {m: {"cmd": fake_command("--model", m), "concurrencyLimit": 2 * CONCURRENCY} for m in MODELS}
        config = parse_config(config_yaml(models), "soak.yaml")
        supervisor = Supervisor(config, reactor)
        supervisor.startService()
        self.addCleanup(supervisor.stopService)
        site = build_site(supervisor, reactor)
        listening = reactor.listenTCP(0, site, interface=LOOPBACK)
        self.addCleanup(listening.stopListening)
        port = listening.getHost().port
        pool = HTTPConnectionPool(reactor, persistent=True)
        pool.maxPersistentPerHost = CONCURRENCY
        self.addCleanup(pool.closeCachedConnections)
        workload = Workload(f"http://{LOOPBACK}:{port}", port, HTTPClient(Agent(reactor, pool=pool)))

        async def quiesce() -> tuple[int, int, int]:
            """
            Close every connection and stop the models, then measure.
            """
            await pool.closeCachedConnections()
            await supervisor.unload()
            await wait_until(lambda: not site.connections and not site.refusals, what="client connections to close")
            await wait_until(lambda: not any(u.running for u in supervisor.upstreams.values()), what="models to stop")
            await deferLater(reactor, 0.5)
            return usage()

        await workload.run(0, WARM_UP)
        self.assertEqual(workload.unexpected[:20], [])
        fds_before, rss_before, objects_before = await quiesce()

        started = time.monotonic()
        await workload.run(WARM_UP, REQUESTS)
        seconds = time.monotonic() - started
        fds_after, rss_after, objects_after = await quiesce()

        mib = 1024 * 1024
        log.info(
            "soak: {requests} requests ({concurrency} at a time) in {seconds:.1f}s ({rate:.0f}/s);"
            " open fds {fds_before} -> {fds_after}; RSS {rss_before:.1f} MiB -> {rss_after:.1f} MiB"
            " ({growth:+.1f} MiB); gc objects {objects_before} -> {objects_after}; outcomes {outcomes}",
            requests=REQUESTS, concurrency=CONCURRENCY, seconds=seconds, rate=REQUESTS / seconds,
            fds_before=fds_before, fds_after=fds_after, rss_before=rss_before / mib, rss_after=rss_after / mib,
            growth=(rss_after - rss_before) / mib, objects_before=objects_before, objects_after=objects_after,
            outcomes=dict(workload.outcomes),
        )
        self.assertEqual(workload.unexpected[:20], [])
        self.assertEqual(sum(workload.outcomes.values()), REQUESTS + WARM_UP)
        self.assertEqual(sum(supervisor.in_flight.values()), 0)
        self.assertEqual(supervisor.queued(), 0)
        self.assertLessEqual(fds_after, fds_before + FD_SLACK)
        # Fewer than one leaked object per ten requests, and no more than 32 MiB of RSS.
        self.assertLess(objects_after - objects_before, REQUESTS // 10)
        self.assertLess(rss_after - rss_before, 32 * mib)

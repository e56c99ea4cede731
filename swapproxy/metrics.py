# -*- test-case-name: tests.test_metrics -*-
"""
What swapproxy measures: Prometheus metrics, the recent token metrics, and the events behind
``/api/events``.

`Metrics` owns a prometheus_client registry of its own (never the global one, so that two
instances, and two tests, never share counts). It learns of

* model state changes, load durations and failed loads from each `Upstream`'s ``state_observers``
  (following reloads through `Supervisor.each_upstream`), models found unhealthy from its
  ``hang_observers``, and of swaps from the supervisor's ``swap_observers``;
* model requests from a `RequestMeter` that the model routes attach to each request (`track`):
  the relay hands it every byte it copies (`RequestMeter.relayed`), which stamps the time to first
  byte and feeds a `UsageScanner`; when the response ends, the status, duration and token counts
  are recorded.

The live numbers (state, in-flight and queued requests per model) are read from the supervisor
when Prometheus scrapes, so they can never drift.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from datetime import datetime, timezone
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, Info
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.process_collector import ProcessCollector
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure
from twisted.web.server import Request
from zope.interface import Interface

from swapproxy import __version__
from swapproxy.logs import proxy_logger
from swapproxy.upstream import State

log = proxy_logger("swapproxy.metrics")

#: Request durations and times to first byte: from a cached answer to a long generation.
REQUEST_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)
#: Model load durations: a small model from the page cache to 100 GB from a slow disk.
LOAD_BUCKETS = (0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0)
#: Tokens per second, prompt processing and generation.
RATE_BUCKETS = (1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 50.0, 75.0, 100.0, 150.0, 200.0, 300.0, 500.0, 1000.0, 2000.0, 5000.0)
#: The status label of a request whose client hung up before the answer ended (nginx's 499).
CLIENT_CLOSED = "499"


# -- finding usage and timings in a relayed body ----------------------------------------------

_KEYS = (b'"usage"', b'"timings"')
_EDGE = max(len(key) for key in _KEYS) - 1
_WHITESPACE = b" \t\r\n"
_decoder = json.JSONDecoder()


class UsageScanner:
    """
    Finds the ``usage`` and llama.cpp ``timings`` objects in a body as it streams past.

    Works the same for a JSON answer and for an event stream: every ``"usage": {...}`` and
    ``"timings": {...}`` is parsed where it appears and merged into `usage` and `timings` (later
    values win, so an Anthropic stream's input tokens from ``message_start`` and output tokens
    from ``message_delta`` both count). A chunk without either key costs two substring searches;
    nothing is kept but the last few bytes, or an object cut off at the end of a chunk, up to
    ``limit`` bytes.
    """

    def __init__(self, limit: int = 16 * 1024) -> None:
        self.limit = limit
        self.usage: dict[str, Any] = {}
        self.timings: dict[str, Any] = {}
        self._tail = b""
        self._held = b""

    @property
    def buffered(self) -> int:
        """
        How many bytes of the body the scanner holds between two pieces.
        """
        return len(self._tail) + len(self._held)

    def feed(self, data: bytes) -> None:
        """
        Look at the next piece of the body.
        """
        if self._held:
            buffer = self._held + data
        elif _KEYS[0] in data or _KEYS[1] in data:
            buffer = self._tail + data
        else:
            edge = self._tail + data[:_EDGE]
            if _KEYS[0] in edge or _KEYS[1] in edge:
                buffer = self._tail + data
            else:
                self._tail = edge[-_EDGE:] if len(data) < _EDGE else data[-_EDGE:]
                return
        self._held = b""
        self._scan(buffer)
        self._tail = b"" if self._held else buffer[-_EDGE:]

    @staticmethod
    def _next_key(buffer: bytes, start: int) -> tuple[int, bytes]:
        found = [(index, key) for key in _KEYS if (index := buffer.find(key, start)) >= 0]
        return min(found) if found else (-1, b"")

    def _hold(self, buffer: bytes, start: int) -> None:
        held = buffer[start:]
        self._held = held if len(held) <= self.limit else b""

    def _scan(self, buffer: bytes) -> None:
        position = 0
        end = len(buffer)
        while True:
            hit, key = self._next_key(buffer, position)
            if hit < 0:
                return
            i = hit + len(key)
            while i < end and buffer[i] in _WHITESPACE:
                i += 1
            if i < end and buffer[i] != ord(":"):
                position = hit + 1
                continue
            i += 1
            while i < end and buffer[i] in _WHITESPACE:
                i += 1
            if i >= end:
                self._hold(buffer, hit)
                return
            if buffer[i] != ord("{"):
                position = i  # null, or a value that is not ours
                continue
            try:
                value, _ = _decoder.raw_decode(buffer[i : i + self.limit].decode("utf-8", "replace"))
            except ValueError:
                if end - i < self.limit and self._next_key(buffer, i)[0] < 0:
                    self._hold(buffer, hit)  # cut off by the end of the chunk: wait for more
                    return
                position = i
                continue
            (self.usage if key == _KEYS[0] else self.timings).update(value)
            position = i + 1


def _number(mapping: Mapping[str, Any], *keys: str) -> float | None:
    for key in keys:
        value = mapping.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return None


def _cached_tokens(usage: Mapping[str, Any]) -> float | None:
    cached = _number(usage, "cache_read_input_tokens")
    for details in ("prompt_tokens_details", "input_tokens_details"):
        nested = usage.get(details)
        if cached is None and isinstance(nested, Mapping):
            cached = _number(nested, "cached_tokens")
    return cached


def token_counts(usage: Mapping[str, Any], timings: Mapping[str, Any], wall_ms: float) -> dict[str, Any] | None:
    """
    llama-swap's token metrics from a response's ``usage`` and ``timings`` (reference 6.1).

    ``timings`` (llama.cpp) wins over ``usage`` where both say something. Unknown values are
    ``-1``, as in llama-swap.

    :param wall_ms: the request's duration, used when ``timings`` do not give one.
    :returns: ``None`` when neither says how many tokens there were.
    """
    input_tokens = _number(usage, "prompt_tokens", "input_tokens")
    output_tokens = _number(usage, "completion_tokens", "output_tokens")
    cache_tokens = _cached_tokens(usage)
    prompt_rate = generation_rate = None
    duration_ms = wall_ms
    if timings:
        input_tokens = _number(timings, "prompt_n") if "prompt_n" in timings else input_tokens
        output_tokens = _number(timings, "predicted_n") if "predicted_n" in timings else output_tokens
        cache_tokens = _number(timings, "cache_n") if "cache_n" in timings else cache_tokens
        prompt_rate = _number(timings, "prompt_per_second")
        generation_rate = _number(timings, "predicted_per_second")
        prompt_ms = _number(timings, "prompt_ms")
        predicted_ms = _number(timings, "predicted_ms")
        if prompt_ms is not None and predicted_ms is not None:
            duration_ms = prompt_ms + predicted_ms
    if input_tokens is None and output_tokens is None:
        return None
    return {
        "cache_tokens": int(cache_tokens) if cache_tokens is not None else -1,
        "input_tokens": int(input_tokens or 0),
        "output_tokens": int(output_tokens or 0),
        "prompt_per_second": prompt_rate if prompt_rate is not None else -1,
        "tokens_per_second": generation_rate if generation_rate is not None else -1,
        "duration_ms": int(round(duration_ms)),
    }


# -- one request -----------------------------------------------------------------------------


class IRequestMeter(Interface):
    """
    The measurements of one model request, kept as a component of its `Request`.
    """


class RequestMeter:
    """
    Times one model request and watches its body for token counts.

    :ivar model: the model id, once the route has chosen it (``""`` before, and for requests
        that never got that far).
    :ivar route: the route label (``/v1/chat/completions``, ``/upstream``...).
    :ivar client: the client's address (its host), or ``""``.
    """

    def __init__(self, metrics: Metrics, request: Request, route: str, started_at: float) -> None:
        self._metrics = metrics
        self.request = request
        self.route = route
        self.model = ""
        self.client = str(getattr(request.getClientAddress(), "host", "") or "")
        self.started_at = started_at
        self.first_byte_at: float | None = None
        self.scanner: UsageScanner | None = UsageScanner()

    def relayed(self, data: bytes) -> None:
        """
        The relay copied ``data`` from the model to the client. Never raises.
        """
        if self.first_byte_at is None:
            self.first_byte_at = self._metrics.clock.seconds()
            self._metrics._first_byte(self)
        if self.scanner is not None:
            try:
                self.scanner.feed(data)
            except Exception:
                self.scanner = None
                log.failure("scanning the answer of {model} for token counts", model=self.model)

    def timed_out(self, kind: str) -> None:
        """
        swapproxy gave up on the model's answer (`swapproxy.stall.Stalled`'s ``kind``).
        """
        self._metrics._labelled(self._metrics.timeouts, self.model, self.route, kind).inc()

    def _ended(self, result: object) -> None:
        status = CLIENT_CLOSED if isinstance(result, Failure) else str(self.request.code)
        try:
            self._metrics._request_done(self, status, self._metrics.clock.seconds())
        except Exception:
            log.failure("recording the metrics of a {route} request", route=self.route)


def request_meter(request: Request) -> RequestMeter | None:
    """
    The `RequestMeter` of ``request``, if it is being measured.
    """
    get_component = getattr(request, "getComponent", None)
    if get_component is None:
        return None
    meter: RequestMeter | None = get_component(IRequestMeter)
    return meter


def relay_tap(request: Request) -> Callable[[bytes], None] | None:
    """
    What the relay should call with each chunk it copies for ``request`` (``None`` if nothing).
    """
    meter = request_meter(request)
    return meter.relayed if meter is not None else None


# -- the whole ---------------------------------------------------------------------------------


class _LiveCollector:
    """
    Reads each model's state, in-flight and queued requests from the supervisor at scrape time.
    """

    def __init__(self, supervisor: Any) -> None:
        self._supervisor = supervisor

    def collect(self) -> Iterator[Metric]:
        state = GaugeMetricFamily(
            "swapproxy_model_state", "1 for the state each model is in, 0 for the others", labels=["model", "state"]
        )
        in_flight = GaugeMetricFamily(
            "swapproxy_requests_in_flight", "Requests being answered by each model", labels=["model"]
        )
        queued = GaugeMetricFamily(
            "swapproxy_requests_queued", "Requests waiting for each model to be ready", labels=["model"]
        )
        memory = GaugeMetricFamily(
            "swapproxy_model_memory_bytes", "Each model's memory: as declared (memory), and as measured once loaded"
            " (resident memory of its process tree plus GPU memory)", labels=["model", "source"]
        )
        supervisor = self._supervisor
        for model_id, upstream in sorted(supervisor.upstreams.items()):
            for candidate in State:
                state.add_metric([model_id, candidate.value], 1.0 if upstream.state is candidate else 0.0)
            in_flight.add_metric([model_id], float(supervisor.in_flight.get(model_id, 0)))
            queued.add_metric([model_id], float(supervisor.queued(model_id, requests_only=True)))
            for source, size in supervisor.memory_of(model_id).items():
                if size is not None:
                    memory.add_metric([model_id, source], float(size))
        yield state
        yield in_flight
        yield queued
        yield memory
        if supervisor.memory_budget is not None:
            yield GaugeMetricFamily("swapproxy_memory_budget_bytes", "memoryBudget: what the running models may use",
                                    value=float(supervisor.memory_budget))


EventSubscriber = Callable[[str, Any], None]


class Metrics:
    """
    swapproxy's metrics: the Prometheus registry, the recent token metrics, and live events.

    :param supervisor: the `Supervisor` whose models are measured.
    :param clock: provides ``seconds()``.
    :param registry: where the Prometheus metrics live; a new registry by default.
    :param max_in_memory: how many token-metric records `records` keeps; by default the
        supervisor's current ``metricsMaxInMemory``, which a reload may change.
    :param process_metrics: whether to add prometheus_client's ``process_*`` metrics (memory,
        CPU, open files) of swapproxy's own process.
    """

    def __init__(
        self,
        supervisor: Any,
        clock: IReactorTime,
        registry: CollectorRegistry | None = None,
        max_in_memory: int | None = None,
        process_metrics: bool = True,
    ) -> None:
        self.supervisor = supervisor
        self.clock = clock
        self.registry = registry if registry is not None else CollectorRegistry()
        self._max_in_memory = max_in_memory
        self.records: deque[dict[str, Any]] = deque(maxlen=self._records_limit())
        self._next_id = 0
        self._subscribers: list[EventSubscriber] = []
        #: Labelled children of the per-request metrics (`_labelled`); as bounded as their labels.
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        r = self.registry
        Info("swapproxy", "swapproxy's version", registry=r).info({"version": __version__})
        self.requests = Counter(
            "swapproxy_requests", "Model requests answered, by model, route and HTTP status "
            "(499: the client hung up first)", ["model", "route", "status"], registry=r,
        )
        self.request_duration = Histogram(
            "swapproxy_request_duration_seconds", "From a model request's arrival to the end of its answer, "
            "including queueing and loading", ["model", "route"], buckets=REQUEST_BUCKETS, registry=r,
        )
        self.time_to_first_byte = Histogram(
            "swapproxy_time_to_first_byte_seconds", "From a model request's arrival to the first byte of the "
            "model's answer, including queueing and loading", ["model", "route"], buckets=REQUEST_BUCKETS, registry=r,
        )
        self.load_duration = Histogram(
            "swapproxy_model_load_duration_seconds", "From starting a model's process to its first healthy answer",
            ["model"], buckets=LOAD_BUCKETS, registry=r,
        )
        self.load_failures = Counter(
            "swapproxy_model_load_failures", "Starts that failed (exit while loading, timeout, missing executable)",
            ["model"], registry=r,
        )
        self.hangs = Counter(
            "swapproxy_model_unhealthy", "Ready models found unhealthy and restarted, by cause: stream_idle (silent "
            "for streamIdleTimeout) or health_check", ["model", "cause"], registry=r,
        )
        self.timeouts = Counter(
            "swapproxy_upstream_timeouts", "Model responses swapproxy gave up on, by kind: stream_idle and "
            "health_check (their model stopped answering), response_header (timeouts.responseHeader)",
            ["model", "route", "kind"], registry=r,
        )
        self.swaps = Counter(
            "swapproxy_model_swaps", "Models stopped to make room for another: model is the one that needed room, "
            "stopped the one that was stopped", ["model", "stopped"], registry=r,
        )
        self.prompt_tokens = Counter(
            "swapproxy_prompt_tokens", "Prompt tokens processed, from the answers' usage or timings", ["model"], registry=r
        )
        self.generated_tokens = Counter(
            "swapproxy_generated_tokens", "Tokens generated, from the answers' usage or timings", ["model"], registry=r
        )
        self.cached_tokens = Counter(
            "swapproxy_cached_prompt_tokens", "Prompt tokens served from the model's cache", ["model"], registry=r
        )
        self.generation_rate = Histogram(
            "swapproxy_generation_tokens_per_second", "Generation speed of each answer (llama.cpp timings)",
            ["model"], buckets=RATE_BUCKETS, registry=r,
        )
        self.prompt_rate = Histogram(
            "swapproxy_prompt_tokens_per_second", "Prompt processing speed of each answer (llama.cpp timings)",
            ["model"], buckets=RATE_BUCKETS, registry=r,
        )
        r.register(_LiveCollector(supervisor))
        if process_metrics:
            ProcessCollector(registry=r)
        supervisor.each_upstream(self._watch_upstream)
        supervisor.swap_observers.append(self._swapped)

    def _records_limit(self) -> int:
        if self._max_in_memory is not None:
            return max(1, self._max_in_memory)
        return max(1, int(getattr(self.supervisor.config, "metrics_max_in_memory", 1000)))

    # -- events ---------------------------------------------------------------------------------

    def subscribe(self, subscriber: EventSubscriber) -> Callable[[], None]:
        """
        Call ``subscriber(kind, payload)`` for each event: ``metrics`` (a list of one new
        token-metric record) and ``request`` (one finished model request: its model, route,
        status, ``time``, ``duration_ms``, ``ttfb_ms``, ``client`` (the client's host) and, when
        the answer said, its ``tokens``).

        :returns: a function that unsubscribes.
        """
        self._subscribers.append(subscriber)
        return lambda: self._subscribers.remove(subscriber) if subscriber in self._subscribers else None

    def _publish(self, kind: str, payload: Any) -> None:
        for subscriber in list(self._subscribers):
            try:
                subscriber(kind, payload)
            except Exception:
                self._subscribers.remove(subscriber)
                log.failure("event subscriber {subscriber!r} failed; removed", subscriber=subscriber)

    # -- models -------------------------------------------------------------------------------

    def _watch_upstream(self, upstream: Any) -> None:
        # First in line: the change is reported before the supervisor acts on it (and, say,
        # grants a request that ends before the next observer would hear of the change).
        upstream.state_observers.insert(0, self._state_changed)
        upstream.hang_observers.append(self._hung)

    def _state_changed(self, upstream: Any, old: State, new: State) -> None:
        model_id = upstream.model.id
        if old is State.STARTING and new is State.READY and upstream.started_at is not None:
            ready_at = upstream.ready_at if upstream.ready_at is not None else self.clock.seconds()
            self.load_duration.labels(model_id).observe(max(0.0, ready_at - upstream.started_at))
        if new is State.FAILED:
            self.load_failures.labels(model_id).inc()

    def _hung(self, upstream: Any, cause: str, what: str) -> None:
        self.hangs.labels(upstream.model.id, cause).inc()

    def _swapped(self, stopped: str, model_id: str) -> None:
        self.swaps.labels(model_id, stopped).inc()

    # -- requests -------------------------------------------------------------------------------

    def track(self, request: Request, route: str) -> RequestMeter:
        """
        Measure a model request from now until its response ends (or its client leaves).

        :param route: the route label: a fixed path such as ``/v1/chat/completions``, never
            anything a client can vary.
        """
        meter = RequestMeter(self, request, route, self.clock.seconds())
        request.setComponent(IRequestMeter, meter)
        request.notifyFinish().addBoth(meter._ended)
        return meter

    def _labelled(self, metric: Any, *labels: str) -> Any:
        """
        ``metric.labels(*labels)``, remembered: prometheus_client looks the child up anew, with
        a lock and a validation of every label, on each call.
        """
        key = (id(metric), labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def _first_byte(self, meter: RequestMeter) -> None:
        assert meter.first_byte_at is not None
        self._labelled(self.time_to_first_byte, meter.model, meter.route).observe(meter.first_byte_at - meter.started_at)

    def _request_done(self, meter: RequestMeter, status: str, now: float) -> None:
        model, route = meter.model, meter.route
        duration = max(0.0, now - meter.started_at)
        self._labelled(self.requests, model, route, status).inc()
        self._labelled(self.request_duration, model, route).observe(duration)
        event: dict[str, Any] = {
            "model": model,
            "route": route,
            "status": int(status),
            "time": round(now, 3),
            "duration_ms": int(round(duration * 1000)),
            "ttfb_ms": None if meter.first_byte_at is None else int(round((meter.first_byte_at - meter.started_at) * 1000)),
            "client": meter.client,
        }
        scanner = meter.scanner
        counts = None
        if status == "200" and model and scanner is not None:
            counts = token_counts(scanner.usage, scanner.timings, duration * 1000)
        if counts is not None:
            record = self._record(model, now, counts)
            event["metrics_id"] = record["id"]
            event["tokens"] = counts
        self._publish("request", event)
        if counts is not None:
            self._publish("metrics", [record])

    def _record(self, model: str, now: float, counts: dict[str, Any]) -> dict[str, Any]:
        record: dict[str, Any] = {
            "id": self._next_id,
            "timestamp": datetime.fromtimestamp(now, timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z"),
            "model": model,
        }
        record.update(counts)
        self._next_id += 1
        limit = self._records_limit()
        if limit != self.records.maxlen:
            self.records = deque(self.records, maxlen=limit)
        self.records.append(record)
        if counts["input_tokens"] > 0:
            self._labelled(self.prompt_tokens, model).inc(counts["input_tokens"])
        if counts["output_tokens"] > 0:
            self._labelled(self.generated_tokens, model).inc(counts["output_tokens"])
        if counts["cache_tokens"] > 0:
            self._labelled(self.cached_tokens, model).inc(counts["cache_tokens"])
        if counts["tokens_per_second"] > 0:
            self._labelled(self.generation_rate, model).observe(counts["tokens_per_second"])
        if counts["prompt_per_second"] > 0:
            self._labelled(self.prompt_rate, model).observe(counts["prompt_per_second"])
        return record

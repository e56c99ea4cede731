# -*- test-case-name: tests.test_logbuffer -*-
"""
One proxy log line per model request, as it ends: the model, the route, the status, how long it
took and who asked, so that ``/logs`` and ``/logs/stream`` show what clients asked for between the
lines the models print.

This line is the access log of model requests: Twisted's own access log line, which said much the
same a second time, is kept for the other routes only (`swapproxy.web.site.SwapproxySite.log`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from swapproxy.logs import proxy_logger
from swapproxy.metrics import CLIENT_CLOSED, Metrics

log = proxy_logger("swapproxy.requests")


def log_request(request: Mapping[str, Any]) -> None:
    """
    Log one finished model request, as `Metrics` reports it (its ``request`` event).

    The line names the model (``model=``), so it is in that model's log too. Its text is made
    here, once, rather than by each log observer from a format with a field per part; the
    event keeps the parts as fields (``route``, ``model``, ``status``, ``duration_ms``,
    ``ttfb_ms``, ``client``).
    """
    model = str(request.get("model") or "")
    status = request.get("status")
    route = request.get("route", "?")
    duration_ms = request.get("duration_ms")
    first_byte = request.get("ttfb_ms")
    client = request.get("client")
    why = " (the client hung up)" if str(status) == CLIENT_CLOSED else ""
    text = f"{route} {model or '(no model)'}: {status}{why} in {duration_ms} ms"
    if first_byte is not None:
        text += f" (first byte after {first_byte} ms)"
    if client:
        text += f" from {client}"
    log.info("{request_line}", request_line=text, route=route, model=model, status=status,
             duration_ms=duration_ms, ttfb_ms=first_byte, client=client)


def log_requests(metrics: Metrics) -> Callable[[], None]:
    """
    Log a line for each model request ``metrics`` sees end.

    :returns: a function that stops it.
    """

    def on_event(kind: str, payload: Any) -> None:
        if kind == "request":
            log_request(payload)

    return metrics.subscribe(on_event)

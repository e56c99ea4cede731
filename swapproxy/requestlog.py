# -*- test-case-name: tests.test_logbuffer -*-
"""
One proxy log line per model request, as it ends: the model, the route, the status and how long
it took, so that ``/logs`` and ``/logs/stream`` show what clients asked for between the lines the
models print.
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

    The line names the model (``model=``), so it is in that model's log too.
    """
    model = str(request.get("model") or "")
    status = request.get("status")
    first_byte = request.get("ttfb_ms")
    log.info(
        "{route} {shown}: {status}{why} in {duration_ms} ms{first_byte}",
        route=request.get("route", "?"),
        shown=model or "(no model)",
        model=model,
        status=status,
        why=" (the client hung up)" if str(status) == CLIENT_CLOSED else "",
        duration_ms=request.get("duration_ms"),
        first_byte="" if first_byte is None else f" (first byte after {first_byte} ms)",
    )


def log_requests(metrics: Metrics) -> Callable[[], None]:
    """
    Log a line for each model request ``metrics`` sees end.

    :returns: a function that stops it.
    """

    def on_event(kind: str, payload: Any) -> None:
        if kind == "request":
            log_request(payload)

    return metrics.subscribe(on_event)

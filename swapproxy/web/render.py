# -*- test-case-name: tests.test_web -*-
"""
The one adapter through which every asynchronous ``render_*`` runs.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any
from urllib.parse import unquote

from twisted.internet.defer import CancelledError, Deferred
from twisted.python.failure import Failure
from twisted.web.server import NOT_DONE_YET, Request

from swapproxy.logs import proxy_logger
from swapproxy.web.errors import write_error

log = proxy_logger("swapproxy.web")


class ClientState:
    """
    Whether the client of one request is still connected.
    """

    def __init__(self) -> None:
        self.gone = False


def render_async(request: Request, handler: Callable[[ClientState], Coroutine[Any, Any, None]]) -> int:
    """
    Run ``handler(client)`` for ``request`` and finish the request when it returns.

    When the client hangs up, the handler's coroutine is cancelled and nothing more is written.
    An unexpected failure is logged once and answered with a 500 if no byte was sent yet.

    :returns: ``NOT_DONE_YET``, for ``render_*`` to return.
    """
    client = ClientState()
    work = Deferred.fromCoroutine(handler(client))

    def client_left(reason: Failure) -> None:
        client.gone = True
        work.cancel()

    def done(_: object) -> None:
        if not client.gone and not request.finished:
            request.finish()

    def failed(failure: Failure) -> None:
        if client.gone:
            if not failure.check(CancelledError):
                log.failure("while handling {method} {path} (client gone)", failure,
                            method=request.method, path=request.path)
            return
        log.failure("while handling {method} {path}", failure, method=request.method, path=request.path)
        if request.finished:
            return
        if not request.startedWriting:
            write_error(request, 500, f"internal error: {failure.getErrorMessage()}")
            request.finish()
        else:
            request.loseConnection()

    request.notifyFinish().addErrback(client_left)
    work.addCallbacks(done, failed)
    return NOT_DONE_YET


def request_body(request: Request) -> bytes:
    """
    The request's body as received (Twisted has it in a file once the request is complete).
    """
    return request.content.read() if request.content is not None else b""


def path_segments(path: list[bytes] | None) -> list[bytes]:
    """
    ``request.prepath`` or ``request.postpath``, which Twisted types as possibly missing.
    """
    return path or []


def rest_of_path(request: Request) -> str:
    """
    What follows the route in the request's path, decoded, without slashes at either end: the
    model of ``/api/models/unload/<model>`` (a model id may itself contain ``/``).
    """
    return unquote("/".join(s.decode("utf-8", "replace") for s in path_segments(request.postpath))).strip("/")

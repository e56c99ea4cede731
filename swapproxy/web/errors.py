# -*- test-case-name: tests.test_web -*-
"""
OpenAI-style JSON error responses.
"""

from __future__ import annotations

from typing import Any

import json

from twisted.web.resource import Resource
from twisted.web.server import Request

_TYPES = {
    400: ("invalid_request_error", "bad_request"),
    401: ("authentication_error", "unauthorized"),
    404: ("invalid_request_error", "not_found"),
    405: ("invalid_request_error", "method_not_allowed"),
    408: ("invalid_request_error", "request_timeout"),
    409: ("invalid_request_error", "conflict"),
    413: ("invalid_request_error", "request_too_large"),
    414: ("invalid_request_error", "uri_too_long"),
    429: ("rate_limit_error", "rate_limit_exceeded"),
    431: ("invalid_request_error", "headers_too_large"),
    502: ("server_error", "bad_gateway"),
    503: ("server_error", "service_unavailable"),
    504: ("server_error", "gateway_timeout"),
}


def error_object(status: int, message: str, error_type: str | None = None, code: str | None = None) -> dict[str, Any]:
    """
    The ``{"error": {...}}`` object for a status and message, typed as OpenAI types them.
    """
    default_type, default_code = _TYPES.get(status, ("server_error", "internal_error"))
    return {
        "error": {
            "message": message,
            "type": error_type or default_type,
            "code": code or default_code,
        }
    }


def error_response(
    request: Request,
    status: int,
    message: str,
    error_type: str | None = None,
    code: str | None = None,
) -> bytes:
    """
    Set ``request``'s status and JSON content type; return the OpenAI-style error body.

    For synchronous ``render_*`` methods, which return it.
    """
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    return json.dumps(error_object(status, message, error_type, code)).encode("utf-8")


def write_error(
    request: Request,
    status: int,
    message: str,
    error_type: str | None = None,
    code: str | None = None,
) -> None:
    """
    Answer ``request`` with an OpenAI-style JSON error (the caller finishes the request).

    :param status: the HTTP status.
    :param message: says what is wrong and, where it helps, what to do.
    """
    body = error_response(request, status, message, error_type, code)
    request.setHeader(b"content-length", str(len(body)).encode("ascii"))
    request.write(body)


class NotFound(Resource):
    """
    A JSON 404 for any path swapproxy does not serve.
    """

    isLeaf = True

    def render(self, request: Request) -> bytes:
        path = request.path.decode("utf-8", "replace")
        return error_response(request, 404, f"no route for {path}; see GET /v1/models for the models")

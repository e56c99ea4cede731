# -*- test-case-name: tests.test_targets -*-
"""
``GET /api/profiles`` and ``PUT /api/profiles/active``: the profiles of the configuration, and
which one is active (llama-swap head's API).
"""

from __future__ import annotations

import json
from collections.abc import Callable

from twisted.web.resource import Resource
from twisted.web.server import Request

from swapproxy.config import Config
from swapproxy.targets import ActiveProfile
from swapproxy.web.api import JSONResource, write_json
from swapproxy.web.errors import NotFound, error_response
from swapproxy.web.render import request_body


class Profiles(JSONResource):
    """
    ``GET /api/profiles``: ``{"active": name or null, "profiles": [{"id", "description", "pins"}]}``.
    """

    def __init__(self, profile: ActiveProfile, config: Callable[[], Config]) -> None:
        super().__init__()
        self._profile = profile
        self._config = config
        self.putChild(b"active", ActiveProfileResource(profile))

    def getChild(self, path: bytes, request: Request) -> Resource:
        return self if path == b"" else NotFound()

    def render_GET(self, request: Request) -> bytes:
        profiles = [
            {"id": p.id, "description": p.description, "pins": {pin: target or None for pin, target in p.pins.items()}}
            for _, p in sorted(self._config().profiles.items())
        ]
        return write_json(request, {"active": self._profile.name, "profiles": profiles})


class ActiveProfileResource(JSONResource):
    """
    ``PUT /api/profiles/active`` with ``{"name": "writing"}`` activates a profile, with
    ``{"name": null}`` none; answers ``{"active": ...}``. ``GET`` answers the same.
    """

    isLeaf = True

    def __init__(self, profile: ActiveProfile) -> None:
        super().__init__()
        self._profile = profile

    def render_GET(self, request: Request) -> bytes:
        return write_json(request, {"active": self._profile.name})

    def render_PUT(self, request: Request) -> bytes:
        try:
            body = json.loads(request_body(request) or b"null")
        except (ValueError, UnicodeDecodeError, RecursionError):
            return error_response(request, 400, 'the body must be JSON: {"name": "<profile>"} or {"name": null}')
        if not isinstance(body, dict) or "name" not in body:
            return error_response(request, 400, 'the body must name the profile: {"name": "<profile>"} or {"name": null}')
        name = body["name"]
        if name is not None and not isinstance(name, str):
            return error_response(request, 400, "name must be a string or null")
        try:
            self._profile.activate(name or None)
        except KeyError:
            return error_response(request, 404, f"profile {name!r} not found; see GET /api/profiles")
        return write_json(request, {"active": self._profile.name})

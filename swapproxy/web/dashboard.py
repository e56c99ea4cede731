# -*- test-case-name: tests.test_ui -*-
"""
The web dashboard at ``/ui/``: a page of plain HTML, CSS and JavaScript modules shipped in the
package (``swapproxy/web/ui/``), read once when swapproxy starts and served from memory.

The page fetches nothing from anywhere else (its Content-Security-Policy says so) and draws what
``/api/events`` tells it; see ``swapproxy/web/ui/app.js``.
"""

from __future__ import annotations

from importlib.resources import files

from twisted.web.resource import Resource
from twisted.web.server import Request

from swapproxy.web.api import JSONResource
from swapproxy.web.errors import NotFound

_CONTENT_TYPES = {
    ".html": b"text/html; charset=utf-8",
    ".js": b"text/javascript; charset=utf-8",
    ".css": b"text/css; charset=utf-8",
    ".svg": b"image/svg+xml",
    ".png": b"image/png",
}

_HEADERS = (
    # The page may be behind an API key: no cache keeps it for another user.
    (b"cache-control", b"no-store"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
    (
        b"content-security-policy",
        b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        b"connect-src 'self'; manifest-src 'self'; base-uri 'none'; form-action 'none'; "
        b"frame-ancestors 'none'",
    ),
)


def load_files(package: str = "swapproxy.web", directory: str = "ui") -> dict[bytes, tuple[bytes, bytes]]:
    """
    The dashboard's files: name -> (content type, bytes), from the package's data.

    :raises FileNotFoundError: when the package was installed without its ``ui`` files.
    """
    found: dict[bytes, tuple[bytes, bytes]] = {}
    for entry in files(package).joinpath(directory).iterdir():
        suffix = "." + entry.name.rpartition(".")[2]
        if entry.is_file() and suffix in _CONTENT_TYPES:
            found[entry.name.encode("utf-8")] = (_CONTENT_TYPES[suffix], entry.read_bytes())
    if b"index.html" not in found:
        raise FileNotFoundError(f"the dashboard's index.html is missing from {package}/{directory}")
    return found


class StaticFile(JSONResource):
    """
    One file of the dashboard, from memory.
    """

    isLeaf = True

    def __init__(self, content_type: bytes, body: bytes) -> None:
        super().__init__()
        self._content_type = content_type
        self._body = body

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", self._content_type)
        for name, value in _HEADERS:
            request.setHeader(name, value)
        return self._body


class Dashboard(JSONResource):
    """
    ``/ui/`` (the page) and ``/ui/<file>``; ``/ui`` redirects to ``/ui/``.

    :param ui_files: name -> (content type, bytes); `load_files` by default.
    """

    def __init__(self, ui_files: dict[bytes, tuple[bytes, bytes]] | None = None) -> None:
        super().__init__()
        self._files = {
            name: StaticFile(content_type, body)
            for name, (content_type, body) in (ui_files if ui_files is not None else load_files()).items()
        }

    def getChild(self, path: bytes, request: Request) -> Resource:
        if request.postpath:
            return NotFound()
        return self._files.get(path or b"index.html") or NotFound()

    def render_GET(self, request: Request) -> bytes:
        return redirect(request, b"/ui/", 301)


class Redirect(JSONResource):
    """
    ``GET /``: a redirect to the dashboard; nothing below it (``//host/path`` is no route).
    """

    def __init__(self, location: bytes) -> None:
        super().__init__()
        self._location = location

    def getChild(self, path: bytes, request: Request) -> Resource:
        return NotFound()

    def render_GET(self, request: Request) -> bytes:
        return redirect(request, self._location)


def redirect(request: Request, location: bytes, status: int = 302) -> bytes:
    """
    Answer with a redirect to ``location`` (the request's query kept).
    """
    query = request.uri.partition(b"?")[2]
    request.setResponseCode(status)
    request.setHeader(b"location", location + (b"?" + query if query else b""))
    request.setHeader(b"content-type", b"text/plain; charset=utf-8")
    return b"see " + location + b"\n"

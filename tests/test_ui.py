"""
Tests for the dashboard's server side: the page's files (L{swapproxy.web.dashboard}), loading a
model on request, ``/api/activity``, and the parts of ``/api/events`` that only the page asks for.

The page itself runs in a real browser in L{tests.test_ui_browser}.
"""

from __future__ import annotations

import json
import re
import textwrap
from importlib.resources import files
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from swapproxy.logs import proxy_logger, upstream_logger
from swapproxy.store import ActivityStore
from swapproxy.upstream import StartError
from tests.support.harness import (
    CHAT_ANSWER,
    KEY,
    KEYS_CONFIG,
    ErrorAssertions,
    Harness,
    answer_with,
    basic,
    header,
    routed,
)
from tests.support.rawhttp import RawConnection, follow, parse_events

CONFIG = """
    models:
      llama:
        cmd: llama-server --port ${PORT}
      qwen:
        cmd: llama-server --port ${PORT}
        aliases: [q]
        concurrencyLimit: 1
"""

UI = files("swapproxy.web").joinpath("ui")


def messages(client: RawConnection) -> list[tuple[str, Any]]:
    """
    The (type, decoded data) of every ``/api/events`` message so far.
    """
    found = []
    for event in parse_events(client.body()):
        if event.data is not None:
            envelope = event.json()
            found.append((envelope["type"], json.loads(envelope["data"])))
    return found


class PageTests(ErrorAssertions, SynchronousTestCase):
    """
    Where the dashboard is, and how its files are served.
    """

    def setUp(self) -> None:
        self.h = Harness(self, textwrap.dedent(CONFIG))

    def test_root_redirects(self) -> None:
        response, _ = self.h.call("GET", "/")
        self.assertEqual((response.code, header(response, b"location")), (302, [b"/ui/"]))
        response, _ = self.h.call("GET", "/ui?x=1")
        self.assertEqual((response.code, header(response, b"location")), (301, [b"/ui/?x=1"]))

    def test_page(self) -> None:
        """
        ``/ui/`` is the page, which no cache keeps and which may load nothing from elsewhere.
        """
        response, body = self.h.call("GET", "/ui/")
        self.assertEqual(response.code, 200)
        self.assertEqual(header(response, b"content-type"), [b"text/html; charset=utf-8"])
        self.assertEqual(body, UI.joinpath("index.html").read_bytes())
        self.assertEqual(header(response, b"cache-control"), [b"no-store"])
        policy = header(response, b"content-security-policy")[0]
        self.assertIn(b"default-src 'none'", policy)
        self.assertIn(b"connect-src 'self'", policy)
        self.assertIn(b"script-src 'self'", policy)

    def test_every_file_it_needs_is_served(self) -> None:
        """
        Every file the page and its modules refer to is served with its type, and none of them
        names anything outside swapproxy.
        """
        names = ["index.html"]
        served: set[str] = set()
        while names:
            name = names.pop()
            if name in served:
                continue
            response, body = self.h.call("GET", "/ui/" + name)
            self.assertEqual(response.code, 200, name)
            served.add(name)
            text = body.decode("utf-8")
            # (An SVG's namespace is a name, not an address.)
            self.assertNotRegex(text.replace('xmlns="http://www.w3.org/2000/svg"', ""), r"https?://|//[a-z]", name)
            names += re.findall(r'(?:src|href)="(?!#)([^"]+)"', text)
            names += [found.removeprefix("./") for found in re.findall(r'from "(\./[^"]+)"', text)]
        self.assertEqual(served, {"index.html", "style.css", "favicon.svg", "app.js", "models.js", "logs.js",
                                  "activity.js", "stream.js", "format.js", "peers.js"})
        response, _ = self.h.call("GET", "/ui/app.js")
        self.assertEqual(header(response, b"content-type"), [b"text/javascript; charset=utf-8"])

    def test_unknown_files(self) -> None:
        for path in ["/ui/nothing.js", "/ui/app.js/more", "/ui/../setup.py", "/ui/%2e%2e/setup.py"]:
            response, body = self.h.call("GET", path)
            self.assertJSONError(response, body, 404)
        response, body = self.h.call("POST", "/ui/", b"{}")
        self.assertJSONError(response, body, 405)


class LoadTests(ErrorAssertions, SynchronousTestCase):
    """
    ``POST /api/models/load/<model>``: the page's Load button.
    """

    def setUp(self) -> None:
        self.h = Harness(self, textwrap.dedent(CONFIG))

    def test_load(self) -> None:
        """
        The model starts; the answer comes at once; the model stays loaded once ready.
        """
        self.h.upstreams["qwen"].auto_ready = False
        response, body = self.h.call("POST", "/api/models/load/q")
        self.assertEqual((response.code, json.loads(body)),
                         (202, {"msg": "loading", "model": "qwen", "state": "starting"}))
        self.assertEqual(header(response, b"cache-control"), [b"no-store"])
        self.assertEqual(self.h.upstreams["qwen"].state.value, "starting")
        self.h.upstreams["qwen"].become_ready()
        self.assertEqual(self.h.supervisor.in_flight["qwen"], 0)
        self.assertEqual(self.h.supervisor.queued("qwen"), 0)
        self.assertEqual(self.h.upstreams["qwen"].state.value, "ready")
        response, body = self.h.call("POST", "/api/models/load/qwen")
        self.assertEqual((response.code, json.loads(body)["state"]), (200, "ready"))

    def test_load_that_fails(self) -> None:
        """
        A load that fails answers 202 all the same: the failure is the model's, shown with it.
        """
        self.h.upstreams["llama"].start_error = StartError("llama", "process exited with exit code 1 while starting")
        response, _ = self.h.call("POST", "/api/models/load/llama")
        self.assertEqual(response.code, 202)
        (running,) = [m for m in json.loads(self.h.call("GET", "/v1/models")[1])["data"] if m["id"] == "llama"]
        self.assertEqual(running["status"], {"value": "unloaded", "state": "failed"})

    def test_bad_requests(self) -> None:
        response, body = self.h.call("POST", "/api/models/load/nothing")
        self.assertJSONError(response, body, 404, "'nothing' not found")
        response, body = self.h.call("POST", "/api/models/load/")
        self.assertJSONError(response, body, 400, "name the model")
        response, body = self.h.call("GET", "/api/models/load/qwen")
        self.assertJSONError(response, body, 405)
        self.assertEqual(header(response, b"allow"), [b"POST"])
        self.h.upstreams["qwen"].auto_ready = False
        self.h.call("POST", "/api/models/load/qwen")
        response, body = self.h.call("POST", "/api/models/load/qwen")
        self.assertJSONError(response, body, 429, "concurrencyLimit")


class ActivityTests(ErrorAssertions, SynchronousTestCase):
    """
    The history of model requests, on ``/api/activity`` and ``/api/events?activity``.
    """

    def setUp(self) -> None:
        self.h = Harness(self, textwrap.dedent(CONFIG), activity=ActivityStore(None, None))
        self.h.server.respond = answer_with(CHAT_ANSWER)

    def chat(self, model: str, seconds: float = 0) -> None:
        self.h.clock.advance(seconds)
        self.h.post_json("/v1/chat/completions", {"model": model})

    def test_api_activity(self) -> None:
        """
        ``/api/activity`` lists the requests newest first, as the page's table shows them.
        """
        self.chat("llama", 1)
        self.chat("q", 1)
        self.h.post_json("/v1/chat/completions", {"model": "nothing"})
        response, body = self.h.call("GET", "/api/activity")
        self.assertEqual(header(response, b"cache-control"), [b"no-store"])
        rows = json.loads(body)["data"]
        self.assertEqual([(r["model"], r["status"]) for r in rows], [("", 404), ("qwen", 200), ("llama", 200)])
        self.assertEqual(
            {key: rows[1][key] for key in ("path", "prompt_tokens", "generated_tokens", "time")},
            {"path": "/v1/chat/completions", "prompt_tokens": 11, "generated_tokens": 7, "time": 1_700_000_002.0},
        )
        older = json.loads(self.h.call("GET", "/api/activity?before=1700000002&limit=5&model=llama")[1])["data"]
        self.assertEqual([r["model"] for r in older], ["llama"])

    def test_bad_queries(self) -> None:
        for query, message in [("limit=0", "between 1 and 1000"), ("limit=1001", "between 1 and 1000"),
                               ("limit=ten", "limit must be an integer, got 'ten'"),
                               ("before=yesterday", "before must be a Unix time in seconds, got 'yesterday'"),
                               ("before=nan", "before must be a Unix time"), ("before=inf", "before must be a Unix time"),
                               ("before=-Infinity", "before must be a Unix time")]:
            response, body = self.h.call("GET", "/api/activity?" + query)
            self.assertJSONError(response, body, 400, message)

    def test_event_stream(self) -> None:
        """
        ``?activity`` sends the recent requests first, then each new one.
        """
        self.chat("llama")
        client = follow(self.h.root, "/api/events?activity")
        self.addCleanup(client.close)
        self.chat("qwen")
        batches = [data for kind, data in messages(client) if kind == "activity"]
        self.assertEqual([[r["model"] for r in batch] for batch in batches], [["llama"], ["qwen"]])

    def test_not_unless_asked(self) -> None:
        client = follow(self.h.root, "/api/events")
        self.addCleanup(client.close)
        self.chat("qwen")
        self.assertNotIn("activity", [kind for kind, _ in messages(client)])


class ModelLogTests(ErrorAssertions, SynchronousTestCase):
    """
    ``/api/events?logs=models``: swapproxy's log and each model's, told apart.
    """

    def setUp(self) -> None:
        self.logs = routed(self, "proxy")
        self.h = Harness(self, textwrap.dedent(CONFIG), logs=self.logs)

    def test_model_logs(self) -> None:
        proxy_logger("tests.ui").info("earlier")
        client = follow(self.h.root, "/api/events?logs=models")
        self.addCleanup(client.close)
        upstream_logger("qwen").info("[{model}] {line}", model="qwen", line="load_tensors: loading")
        proxy_logger("tests.ui").info("later")
        logs = [data for kind, data in messages(client) if kind == "logData"]
        self.assertEqual(
            logs,
            [
                {"source": "proxy", "data": "[INFO] earlier\n"},
                {"source": "model", "model": "qwen", "data": "load_tensors: loading\n"},
                {"source": "proxy", "data": "[INFO] later\n"},
            ],
        )

    def test_unknown_choice(self) -> None:
        response, body = self.h.call("GET", "/api/events?logs=everything")
        self.assertJSONError(response, body, 400, "?logs=models")


class KeyTests(ErrorAssertions, SynchronousTestCase):
    """
    With ``apiKeys``, the page and what it reads need a key; the browser's Basic prompt gives one.
    """

    def setUp(self) -> None:
        self.h = Harness(self, KEYS_CONFIG)

    def test_page_needs_a_key(self) -> None:
        for path in ["/ui/", "/ui/app.js", "/api/events?logs=models&activity", "/api/activity"]:
            response, body = self.h.call("GET", path)
            self.assertJSONError(response, body, 401)
            self.assertEqual(header(response, b"www-authenticate"), [b'Basic realm="swapproxy"'])
            self.assertNotIn(b"llama", body)
        response, body = self.h.call("GET", "/ui/", headers={"Authorization": basic("me", KEY)})
        self.assertEqual(response.code, 200)
        self.assertEqual(header(response, b"cache-control"), [b"no-store"])

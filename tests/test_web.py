"""
Tests for L{swapproxy.web}: the routes a client talks to, driven in memory.

A request goes from a treq client through swapproxy's real Resource tree and L{Supervisor} to
in-memory upstreams (L{tests.support.harness}).
"""

from __future__ import annotations

import json
import textwrap
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from swapproxy.config import parse_config
from swapproxy.upstream import StartError, State
from tests.support.harness import CONFIG, ErrorAssertions, Harness, answer_json, answer_later, header


def multipart(boundary: bytes, fields: list[tuple[bytes, bytes, bytes | None]]) -> bytes:
    """
    A multipart/form-data body: (name, value, filename-or-None) per part.
    """
    out = b""
    for name, value, filename in fields:
        out += b"--" + boundary + b"\r\n"
        disposition = b'Content-Disposition: form-data; name="' + name + b'"'
        if filename is not None:
            disposition += b'; filename="' + filename + b'"'
            out += disposition + b"\r\nContent-Type: application/octet-stream\r\n\r\n"
        else:
            out += disposition + b"\r\n\r\n"
        out += value + b"\r\n"
    return out + b"--" + boundary + b"--\r\n"


# -- the tests -------------------------------------------------------------------------------


class ModelSelectionTests(ErrorAssertions, SynchronousTestCase):
    """
    The inference routes pick the model named in the request body.
    """

    def setUp(self) -> None:
        self.h = Harness(self)

    def test_json_model_reaches_its_upstream(self) -> None:
        """
        A chat completion naming a model starts that model and gets its answer.
        """
        response, body = self.h.post_json("/v1/chat/completions", {"model": "llama", "messages": []})
        self.assertEqual(response.code, 200)
        self.assertEqual(json.loads(body), {"served_by": "llama", "uri": "/v1/chat/completions"})
        self.assertEqual(self.h.upstreams["llama"].starts, 1)
        self.assertEqual([r.model for r in self.h.received], ["llama"])

    def test_model_from_json_whatever_the_content_type(self) -> None:
        """
        The body is read as JSON whether the client says text/plain, form-urlencoded or nothing.
        """
        payload = json.dumps({"model": "llama", "prompt": "a=b&c=d"}).encode()
        for content_type in ["text/plain", "application/x-www-form-urlencoded", None]:
            headers = {"Content-Type": content_type} if content_type else {}
            response, body = self.h.call("POST", "/v1/completions", payload, headers)
            self.assertEqual(response.code, 200, (content_type, body))
            self.assertEqual(self.h.received[-1].model, "llama")
            self.assertEqual(self.h.received[-1].body, payload)
        self.assertEqual(len(self.h.received), 3)

    def test_every_inference_route_is_forwarded_to_the_same_path(self) -> None:
        """
        Each OpenAI, Anthropic and llama.cpp route reaches the same path upstream, query kept.
        """
        routes = [
            "/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/rerank",
            "/v1/reranking", "/rerank", "/v1/audio/speech", "/v1/messages",
            "/v1/messages/count_tokens", "/v1/responses", "/completion", "/infill",
        ]
        for route in routes:
            response, _ = self.h.post_json(route + "?beta=true", {"model": "llama"})
            self.assertEqual(response.code, 200, route)
            self.assertEqual(self.h.received[-1].uri, (route + "?beta=true").encode())

    def test_image_and_voice_routes(self) -> None:
        """
        The image routes (OpenAI's and stable-diffusion.cpp's sd-server's) and the voice list,
        which llama-swap forwards, reach the model named in the body, or in ``?model=`` for a GET,
        at the same path: a llama-swap user's image and speech clients keep working.
        """
        for route in ["/v1/images/generations", "/sdapi/v1/txt2img", "/sdapi/v1/img2img", "/v1/audio/voices"]:
            response, body = self.h.post_json(route, {"model": "qwen", "prompt": "a cat"})
            self.assertEqual(response.code, 200, (route, body))
            self.assertEqual((self.h.received[-1].model, self.h.received[-1].uri), ("qwen", route.encode()))
        for route in ["/v1/audio/voices?model=fast", "/sdapi/v1/loras?model=fast"]:
            response, body = self.h.call("GET", route)
            self.assertEqual(response.code, 200, (route, body))
            self.assertEqual((self.h.received[-1].model, self.h.received[-1].uri), ("llama", route.encode()))

    def test_versionless_routes(self) -> None:
        """
        llama-swap's versionless routes (``/v/chat/completions``, ...) reach the model named in
        the body without the ``/v``, for a model whose ``proxy`` ends in its API's version.
        """
        for route in ["/chat/completions", "/responses", "/completions", "/messages", "/messages/count_tokens",
                      "/embeddings", "/rerank", "/reranking"]:
            response, body = self.h.post_json("/v" + route + "?beta=true", {"model": "qwen"})
            self.assertEqual(response.code, 200, (route, body))
            self.assertEqual((self.h.received[-1].model, self.h.received[-1].uri),
                             ("qwen", (route + "?beta=true").encode()))

    def test_audio_api_route(self) -> None:
        """
        llama-swap's ``/audioapi/v1/tasks/run`` reaches the model named in the body as
        ``/v1/tasks/run``.
        """
        response, body = self.h.post_json("/audioapi/v1/tasks/run", {"model": "qwen", "task": "tts"})
        self.assertEqual(response.code, 200, body)
        self.assertEqual((self.h.received[-1].model, self.h.received[-1].uri), ("qwen", b"/v1/tasks/run"))

    def test_invalid_json(self) -> None:
        """
        A body that is not JSON is a 400 that says so, and no model starts.
        """
        response, body = self.h.call(
            "POST", "/v1/chat/completions", b'{"model": "llama",', {"Content-Type": "application/json"}
        )
        error = self.assertJSONError(response, body, 400, "not valid JSON", error_type="invalid_request_error")
        self.assertEqual(error["code"], "bad_request")
        self.assertEqual(self.h.upstreams["llama"].starts, 0)
        self.assertEqual(self.h.received, [])

    def test_empty_body(self) -> None:
        """
        An empty body is a 400 saying a JSON object with a model is expected.
        """
        response, body = self.h.call("POST", "/v1/chat/completions", b"", {"Content-Type": "application/json"})
        self.assertJSONError(response, body, 400, "empty", "model")
        self.assertEqual(self.h.received, [])

    def test_body_not_an_object(self) -> None:
        """
        A JSON array or string is a 400 naming what was sent.
        """
        for payload, kind in [([{"model": "llama"}], "list"), ("llama", "str")]:
            response, body = self.h.post_json("/v1/chat/completions", payload)
            self.assertJSONError(response, body, 400, "JSON object", kind)
        self.assertEqual(self.h.received, [])

    def test_missing_model(self) -> None:
        """
        A JSON object without a usable model field is a 400 naming the field.
        """
        for payload in [{"messages": []}, {"model": ""}, {"model": None}, {"model": ["llama"]}]:
            response, body = self.h.post_json("/v1/chat/completions", payload)
            self.assertJSONError(response, body, 400, "'model'")
        self.assertEqual(self.h.received, [])

    def test_unknown_model(self) -> None:
        """
        An unknown model is a 404 naming the models that exist, but not the unlisted ones.
        """
        response, body = self.h.post_json("/v1/chat/completions", {"model": "gpt-5"})
        error = self.assertJSONError(response, body, 404, "'gpt-5'", "llama", "qwen", "org/model/big")
        self.assertEqual(error["code"], "not_found")
        self.assertNotIn("secret", error["message"])
        self.assertEqual(sum(u.starts for u in self.h.upstreams.values()), 0)

    def test_unlisted_model_can_be_used(self) -> None:
        """
        Unlisted models are hidden from lists, not refused.
        """
        response, body = self.h.post_json("/v1/chat/completions", {"model": "secret"})
        self.assertEqual(response.code, 200, body)
        self.assertEqual(self.h.received[-1].model, "secret")

    def test_alias(self) -> None:
        """
        An alias runs its model; without useModelName the body goes upstream byte for byte.
        """
        payload = b'{ "model" : "gpt-4o-mini",\n  "messages": [{"role": "user", "content": "h\\u00e9"}] }'
        response, body = self.h.call(
            "POST", "/v1/chat/completions", payload, {"Content-Type": "application/json"}
        )
        self.assertEqual(response.code, 200, body)
        received = self.h.received[-1]
        self.assertEqual(received.model, "llama")
        self.assertEqual(received.body, payload)
        self.assertEqual(received.headers.getRawHeaders(b"content-length"), [str(len(payload)).encode()])

    def test_use_model_name_rewrites_the_model(self) -> None:
        """
        With useModelName the upstream sees that name in C{model}, the rest of the body intact,
        with a Content-Length that matches the new body.
        """
        messages = [{"role": "user", "content": "héllo ✓"}]
        response, body = self.h.post_json(
            "/v1/chat/completions", {"model": "smart", "messages": messages, "stream": False}
        )
        self.assertEqual(response.code, 200, body)
        received = self.h.received[-1]
        self.assertEqual(received.model, "qwen")
        self.assertEqual(
            json.loads(received.body),
            {"model": "Qwen/Qwen2.5-7B-Instruct", "messages": messages, "stream": False},
        )
        self.assertEqual(received.headers.getRawHeaders(b"content-length"), [str(len(received.body)).encode()])

    def test_swaps_to_the_requested_model(self) -> None:
        """
        Asking for another model stops the one running (the default group runs one at a time).
        """
        self.h.post_json("/v1/chat/completions", {"model": "llama"})
        response, _ = self.h.post_json("/v1/chat/completions", {"model": "qwen"})
        self.assertEqual(response.code, 200)
        self.assertEqual(self.h.upstreams["llama"].state, State.STOPPED)
        self.assertEqual(self.h.upstreams["qwen"].state, State.READY)
        self.assertEqual([r.model for r in self.h.received], ["llama", "qwen"])


class MultipartTests(ErrorAssertions, SynchronousTestCase):
    """
    C{/v1/audio/transcriptions} takes the model from the multipart form field C{model}.
    """

    boundary = b"----swapproxy-test-boundary"
    # Bytes that would break a careless rewrite: CRLFs, a fake header block, non-UTF-8.
    audio = b"RIFF\x00\x01\xff\xfe\r\n\r\nname=\"model\"\r\n" + bytes(range(256)) + b"\r\n--not-the-boundary"

    def setUp(self) -> None:
        self.h = Harness(self)

    def send(self, fields: list[tuple[bytes, bytes, bytes | None]]) -> tuple[Any, bytes, bytes]:
        body = multipart(self.boundary, fields)
        headers = {"Content-Type": "multipart/form-data; boundary=" + self.boundary.decode()}
        response, answer = self.h.call("POST", "/v1/audio/transcriptions", body, headers)
        return response, answer, body

    def test_model_field(self) -> None:
        """
        The form field picks the model; the body arrives unchanged.
        """
        response, answer, body = self.send(
            [(b"file", self.audio, b"clip.wav"), (b"model", b"whisper", None), (b"language", b"en", None)]
        )
        self.assertEqual(response.code, 200, answer)
        received = self.h.received[-1]
        self.assertEqual(received.model, "whisper")
        self.assertEqual(received.body, body)
        self.assertEqual(received.headers.getRawHeaders(b"content-length"), [str(len(body)).encode()])
        self.assertEqual(
            received.headers.getRawHeaders(b"content-type"),
            [b"multipart/form-data; boundary=" + self.boundary],
        )

    def test_use_model_name_rewrites_the_field_only(self) -> None:
        """
        With useModelName the model field is replaced; the file's bytes are intact.
        """
        response, answer, _ = self.send(
            [(b"model", b"whisper-big", None), (b"file", self.audio, b"clip.wav"), (b"language", b"en", None)]
        )
        self.assertEqual(response.code, 200, answer)
        received = self.h.received[-1]
        self.assertEqual(received.model, "whisper-big")
        expected = multipart(
            self.boundary,
            [(b"model", b"large-v3", None), (b"file", self.audio, b"clip.wav"), (b"language", b"en", None)],
        )
        self.assertEqual(received.body, expected)
        self.assertEqual(received.headers.getRawHeaders(b"content-length"), [str(len(expected)).encode()])

    def test_image_edits(self) -> None:
        """
        C{/v1/images/edits} (multipart, as llama-swap forwards it) takes the model from its form.
        """
        body = multipart(self.boundary, [(b"model", b"whisper", None), (b"image", self.audio, b"cat.png")])
        headers = {"Content-Type": "multipart/form-data; boundary=" + self.boundary.decode()}
        response, answer = self.h.call("POST", "/v1/images/edits", body, headers)
        self.assertEqual(response.code, 200, answer)
        received = self.h.received[-1]
        self.assertEqual((received.model, received.uri, received.body), ("whisper", b"/v1/images/edits", body))

    def test_missing_model_field(self) -> None:
        """
        A form without a model field is a 400 naming the field.
        """
        response, answer, _ = self.send([(b"file", self.audio, b"clip.wav")])
        self.assertJSONError(response, answer, 400, "'model'")
        self.assertEqual(self.h.received, [])

    def test_unknown_model_field(self) -> None:
        """
        An unknown model in the form is a 404 naming the models that exist.
        """
        response, answer, _ = self.send([(b"model", b"whisper-tiny", None), (b"file", self.audio, b"a.wav")])
        self.assertJSONError(response, answer, 404, "'whisper-tiny'", "whisper")
        self.assertEqual(self.h.received, [])


class UpstreamPassthroughTests(ErrorAssertions, SynchronousTestCase):
    """
    C{/upstream/<model>/<path>} sends any request to C{<path>} on that model's server.
    """

    def setUp(self) -> None:
        self.h = Harness(self)

    def test_forwards_path_and_query(self) -> None:
        """
        The rest of the path and the query reach the model's server, for any method.
        """
        response, body = self.h.call("GET", "/upstream/llama/props?verbose=1&x=%20y")
        self.assertEqual(response.code, 200, body)
        received = self.h.received[-1]
        self.assertEqual((received.model, received.method, received.uri), ("llama", b"GET", b"/props?verbose=1&x=%20y"))
        response, body = self.h.call("DELETE", "/upstream/fast/slots/0")
        self.assertEqual(response.code, 200, body)
        self.assertEqual((self.h.received[-1].model, self.h.received[-1].method), ("llama", b"DELETE"))
        self.assertEqual(self.h.received[-1].uri, b"/slots/0")

    def test_body_forwarded_unchanged(self) -> None:
        """
        A body sent through /upstream is not parsed or rewritten, even with useModelName.
        """
        payload = b'{"model": "whatever", "x": 1}'
        response, _ = self.h.call("POST", "/upstream/qwen/v1/chat/completions", payload)
        self.assertEqual(response.code, 200)
        self.assertEqual(self.h.received[-1].model, "qwen")
        self.assertEqual(self.h.received[-1].body, payload)

    def test_model_names_with_slashes(self) -> None:
        """
        A model id may contain '/'; the longest configured name wins.
        """
        self.h.call("GET", "/upstream/org/model/health")
        self.assertEqual((self.h.received[-1].model, self.h.received[-1].uri), ("org/model", b"/health"))
        self.h.call("GET", "/upstream/org/model/big/health")
        self.assertEqual((self.h.received[-1].model, self.h.received[-1].uri), ("org/model/big", b"/health"))
        self.h.call("GET", "/upstream/org%2Fmodel%2Fbig/v1/models")
        self.assertEqual((self.h.received[-1].model, self.h.received[-1].uri), ("org/model/big", b"/v1/models"))

    def test_redirect_without_trailing_slash(self) -> None:
        """
        /upstream/<model> redirects to /upstream/<model>/: 301 for GET, 308 (keeps the method
        and body) for others, the query kept; nothing is started.
        """
        response, _ = self.h.call("GET", "/upstream/org/model/big?tab=1")
        self.assertEqual(response.code, 301)
        self.assertEqual(header(response, b"location"), [b"/upstream/org/model/big/?tab=1"])
        response, _ = self.h.call("POST", "/upstream/llama", b"{}")
        self.assertEqual(response.code, 308)
        self.assertEqual(header(response, b"location"), [b"/upstream/llama/"])
        self.assertEqual(self.h.received, [])
        self.assertEqual(sum(u.starts for u in self.h.upstreams.values()), 0)

    def test_trailing_slash_reaches_root(self) -> None:
        """
        /upstream/<model>/ is the root of the model's server.
        """
        response, _ = self.h.call("GET", "/upstream/llama/")
        self.assertEqual(response.code, 200)
        self.assertEqual(self.h.received[-1].uri, b"/")

    def test_dot_segments_rejected(self) -> None:
        """
        '..' and '.', plain or percent-encoded, cannot climb out of the model's path.
        """
        for path in [
            "/upstream/llama/../admin",
            "/upstream/llama/v1/%2e%2e/admin",
            "/upstream/llama/%2E%2E%2Fadmin",
            "/upstream/llama/./props",
            "/upstream/llama/..%5cadmin",
        ]:
            response, body = self.h.call("GET", path)
            self.assertJSONError(response, body, 400, "'..'")
        self.assertEqual(self.h.received, [])

    def test_unknown_model(self) -> None:
        """
        A path that names no model is a JSON 404 naming what was not found and saying how the
        path is built.
        """
        response, body = self.h.call("GET", "/upstream/nope/health")
        self.assertJSONError(response, body, 404, "model 'nope' not found", "/upstream/<model>/<path>")
        response, body = self.h.call("GET", "/upstream/")
        self.assertJSONError(response, body, 404, "/upstream/<model>/<path>")
        self.assertEqual(self.h.received, [])


class RoutingTests(ErrorAssertions, SynchronousTestCase):
    """
    Methods, unknown paths and CORS preflights.
    """

    def setUp(self) -> None:
        self.h = Harness(self)

    def test_get_on_post_route(self) -> None:
        """
        GET on an inference route is a JSON 405 with C{Allow: POST}.
        """
        response, body = self.h.call("GET", "/v1/chat/completions")
        self.assertJSONError(response, body, 405, "GET", "POST")
        self.assertEqual(header(response, b"allow"), [b"POST"])

    def test_unknown_path(self) -> None:
        """
        A path swapproxy does not serve is a JSON 404 naming it.
        """
        for path in [
            "/v2/chat/completions", "/nothing", "/v1", "/api/models",
            "/v1/chat/completions/extra", "/v1/messages/count_tokens/x",
        ]:
            for method in ["GET", "POST"]:
                response, body = self.h.call(method, path, b"{}")
                self.assertJSONError(response, body, 404, path)
        self.assertEqual(self.h.received, [])

    def test_wrong_method_on_api_route(self) -> None:
        """
        A method an API route does not take is a JSON 405 that lists the allowed ones.
        """
        for path in ["/v1/models", "/health", "/running"]:
            response, body = self.h.call("POST", path, b"{}")
            self.assertJSONError(response, body, 405, "POST")
            self.assertIn(b"GET", header(response, b"allow")[0])
        response, body = self.h.call("DELETE", "/unload")
        self.assertJSONError(response, body, 405, "DELETE")
        self.assertEqual(self.h.upstreams["llama"].stops, 0)

    def test_head(self) -> None:
        """
        HEAD works where GET does.
        """
        response, body = self.h.call("HEAD", "/health")
        self.assertEqual((response.code, body), (200, b""))

    def test_trailing_slash_on_inference_route(self) -> None:
        """
        /v1/chat/completions/ is the same route.
        """
        response, _ = self.h.post_json("/v1/chat/completions/", {"model": "llama"})
        self.assertEqual(response.code, 200)

    def test_preflight(self) -> None:
        """
        OPTIONS on any path is a 204 preflight allowing the page's origin (the default policy
        allows any) and the headers asked for, minus any name that is not a valid header token.
        """
        for path in ["/v1/chat/completions", "/upstream/llama/x", "/nothing"]:
            response, body = self.h.call(
                "OPTIONS",
                path,
                headers={
                    "Origin": "https://app.example",
                    "Access-Control-Request-Method": "POST",
                    "Access-Control-Request-Headers": "Content-Type, X-Api-Key, bad header, <script>,,",
                },
            )
            self.assertEqual(response.code, 204, path)
            self.assertEqual(body, b"")
            self.assertEqual(header(response, b"access-control-allow-headers"), [b"Content-Type, X-Api-Key"])
            self.assertEqual(header(response, b"access-control-allow-origin"), [b"https://app.example"])
            self.assertIn(b"POST", header(response, b"access-control-allow-methods")[0])
        self.assertEqual(self.h.received, [])

    def test_preflight_default_headers(self) -> None:
        """
        Without Access-Control-Request-Headers, the usual headers are allowed.
        """
        response, _ = self.h.call("OPTIONS", "/v1/models")
        self.assertEqual(response.code, 204)
        allowed = header(response, b"access-control-allow-headers")[0].lower()
        self.assertIn(b"content-type", allowed)
        self.assertIn(b"authorization", allowed)


class ApiTests(ErrorAssertions, SynchronousTestCase):
    """
    swapproxy's own endpoints.
    """

    def setUp(self) -> None:
        self.h = Harness(self)

    def test_models_list(self) -> None:
        """
        /v1/models lists the listed models in id order, with llama-swap's extra fields.
        """
        response, body = self.h.call("GET", "/v1/models")
        self.assertEqual(response.code, 200)
        self.assertEqual(header(response, b"content-type"), [b"application/json"])
        self.assertIsNone(header(response, b"access-control-allow-origin"))
        listing = json.loads(body)
        self.assertEqual(listing["object"], "list")
        ids = [m["id"] for m in listing["data"]]
        self.assertEqual(ids, ["limited", "llama", "org/model", "org/model/big", "qwen", "whisper", "whisper-big"])
        llama = listing["data"][1]
        self.assertEqual(llama["object"], "model")
        self.assertEqual(llama["created"], 1_700_000_000)
        self.assertIsInstance(llama["owned_by"], str)
        self.assertEqual(llama["name"], "Llama 3.2 3B")
        self.assertEqual(llama["description"], "small and quick")
        self.assertEqual(llama["meta"], {"llamaswap": {"context": 8192, "vision": False}})
        qwen = listing["data"][4]
        self.assertNotIn("name", qwen)
        self.assertNotIn("meta", qwen)

    def test_one_model(self) -> None:
        """
        ``GET /v1/models/<id>`` answers that model's record alone, as OpenAI's retrieve call
        does (an id with ``/`` too); an unknown id is a JSON 404.
        """
        _, body = self.h.call("GET", "/v1/models")
        records = {record["id"]: record for record in json.loads(body)["data"]}
        for model_id in ("llama", "org/model/big"):
            response, body = self.h.call("GET", "/v1/models/" + model_id)
            self.assertEqual((response.code, json.loads(body)), (200, records[model_id]))
        response, body = self.h.call("GET", "/v1/models/org%2Fmodel")
        self.assertEqual((response.code, json.loads(body)["id"]), (200, "org/model"))
        response, body = self.h.call("GET", "/v1/models/nothing")
        self.assertJSONError(response, body, 404, "model 'nothing' not found")
        self.assertEqual(json.loads(body)["error"]["code"], "model_not_found")
        response, body = self.h.call("GET", "/v1/models/")
        self.assertEqual(len(json.loads(body)["data"]), len(records))

    def test_models_list_echoes_origin(self) -> None:
        """
        A browser's Origin is echoed so a web UI on another origin can read the list.
        """
        response, _ = self.h.call("GET", "/v1/models", headers={"Origin": "http://localhost:5173"})
        self.assertEqual(header(response, b"access-control-allow-origin"), [b"http://localhost:5173"])

    def test_health(self) -> None:
        response, body = self.h.call("GET", "/health")
        self.assertEqual((response.code, body), (200, b"OK"))

    def test_running(self) -> None:
        """
        /running lists each model that has a process, with its state.
        """
        response, body = self.h.call("GET", "/running")
        self.assertEqual((response.code, json.loads(body)), (200, {"running": []}))
        self.h.post_json("/v1/chat/completions", {"model": "fast"})
        self.h.clock.advance(5)
        _, body = self.h.call("GET", "/running")
        running = json.loads(body)["running"]
        self.assertEqual([(r["model"], r["state"]) for r in running], [("llama", "ready")])
        self.assertEqual(running[0]["pid"], self.h.upstreams["llama"].pid)
        self.assertEqual(running[0]["uptime"], 5.0)
        self.assertEqual(running[0]["in_flight"], 0)

    def test_running_shows_a_replaced_process_until_it_ends(self) -> None:
        """
        After a reload changed a model's command, /running lists its old process, marked
        replaced, while it finishes its request in flight; then the old process is gone.
        """
        lease = self.successResultOf(self.h.supervisor.request("llama").wait())
        old = self.h.upstreams["llama"]
        old_pid = old.pid
        changed = textwrap.dedent(CONFIG).replace(
            "cmd: llama-server --port ${PORT}\n    name:", "cmd: llama-server -m other.gguf --port ${PORT}\n    name:"
        )
        self.assertNotEqual(changed, textwrap.dedent(CONFIG))
        self.h.supervisor.reload(parse_config(changed, "config.yaml", {}))
        _, body = self.h.call("GET", "/running")
        running = json.loads(body)["running"]
        self.assertEqual([(r["model"], r["state"], r["pid"], r.get("replaced")) for r in running],
                         [("llama", "ready", old_pid, True)])
        lease.release()
        self.assertEqual(old.state, State.STOPPED)
        _, body = self.h.call("GET", "/running")
        self.assertEqual(json.loads(body), {"running": []})

    def test_running_shows_starting(self) -> None:
        """
        A model that is loading shows as starting, with the request waiting on it.
        """
        self.h.upstreams["llama"].auto_ready = False
        pending = self.h.request("POST", "/v1/chat/completions", b'{"model": "llama"}')
        _, body = self.h.call("GET", "/running")
        self.assertEqual([(r["model"], r["state"]) for r in json.loads(body)["running"]], [("llama", "starting")])
        self.assertNoResult(pending)
        self.h.upstreams["llama"].become_ready()
        self.h.flush()
        self.assertEqual(self.successResultOf(pending).code, 200)

    def test_unload_all(self) -> None:
        """
        /unload stops every running model.
        """
        self.h.post_json("/v1/chat/completions", {"model": "llama"})
        response, body = self.h.call("GET", "/unload")
        self.assertEqual((response.code, body), (200, b"OK"))
        self.assertEqual(self.h.upstreams["llama"].state, State.STOPPED)
        _, body = self.h.call("GET", "/running")
        self.assertEqual(json.loads(body), {"running": []})

    def test_api_unload_one_by_alias(self) -> None:
        """
        POST /api/models/unload/<alias> stops that model.
        """
        self.h.post_json("/v1/chat/completions", {"model": "llama"})
        response, body = self.h.call("POST", "/api/models/unload/fast")
        self.assertEqual(response.code, 200, body)
        self.assertEqual(json.loads(body)["unloaded"], "llama")
        self.assertEqual(self.h.upstreams["llama"].state, State.STOPPED)
        self.assertEqual(self.h.upstreams["llama"].stops, 1)

    def test_api_unload_with_slash_in_name(self) -> None:
        self.h.call("GET", "/upstream/org/model/big/health")
        response, body = self.h.call("POST", "/api/models/unload/org/model/big")
        self.assertEqual(response.code, 200, body)
        self.assertEqual(self.h.upstreams["org/model/big"].state, State.STOPPED)

    def test_api_unload_all(self) -> None:
        self.h.post_json("/v1/chat/completions", {"model": "qwen"})
        response, body = self.h.call("POST", "/api/models/unload")
        self.assertEqual(response.code, 200, body)
        self.assertEqual(json.loads(body)["unloaded"], "all")
        self.assertEqual(self.h.upstreams["qwen"].state, State.STOPPED)

    def test_api_unload_unknown(self) -> None:
        """
        Unloading an unknown model is a JSON 404; nothing is stopped.
        """
        self.h.post_json("/v1/chat/completions", {"model": "llama"})
        response, body = self.h.call("POST", "/api/models/unload/nope")
        self.assertJSONError(response, body, 404, "'nope'")
        self.assertEqual(self.h.upstreams["llama"].state, State.READY)

    def test_api_unload_needs_post(self) -> None:
        response, body = self.h.call("GET", "/api/models/unload/llama")
        self.assertJSONError(response, body, 405, "GET")
        self.assertEqual(header(response, b"allow"), [b"POST"])


class ScheduleErrorTests(ErrorAssertions, SynchronousTestCase):
    """
    What a client sees when the model cannot take its request.
    """

    def setUp(self) -> None:
        self.h = Harness(self)

    def test_concurrency_limit(self) -> None:
        """
        Beyond concurrencyLimit a request is a 429 JSON error with Retry-After; once the running
        request ends, the next one is accepted.
        """
        self.h.server.respond = answer_later
        first = self.h.request("POST", "/v1/chat/completions", b'{"model": "limited"}')
        self.assertEqual(len(self.h.received), 1)
        response, body = self.h.call("POST", "/v1/chat/completions", b'{"model": "limited"}')
        error = self.assertJSONError(response, body, 429, "limited", "concurrencyLimit", error_type="rate_limit_error")
        self.assertEqual(error["code"], "concurrency_limit")
        self.assertEqual(header(response, b"retry-after"), [b"1"])
        self.assertEqual(len(self.h.received), 1)

        self.h.received[0].request.write(b"{}")
        self.h.received[0].request.finish()
        self.h.flush()
        self.assertEqual(self.h.read(self.successResultOf(first)), b"{}")
        self.h.server.respond = answer_json
        response, _ = self.h.call("POST", "/v1/chat/completions", b'{"model": "limited"}')
        self.assertEqual(response.code, 200)

    def test_start_failure(self) -> None:
        """
        A model that fails to start is a 502 JSON error carrying the reason and its last output.
        """
        self.h.upstreams["llama"].start_error = StartError(
            "llama", "process exited with exit code 1 while starting", 1, ("error: failed to load model 'x.gguf'",)
        )
        response, body = self.h.post_json("/v1/chat/completions", {"model": "llama"})
        error = self.assertJSONError(
            response, body, 502, "llama", "exit code 1", "failed to load model 'x.gguf'", error_type="server_error"
        )
        self.assertEqual(error["code"], "model_start_failed")
        self.assertEqual(self.h.received, [])

    def test_start_failure_while_waiting(self) -> None:
        """
        Requests waiting on a start that fails all get the 502.
        """
        upstream = self.h.upstreams["llama"]
        upstream.auto_ready = False
        waiting = [self.h.request("POST", "/v1/chat/completions", b'{"model": "llama"}') for _ in range(2)]
        for d in waiting:
            self.assertNoResult(d)
        upstream.fail_start(StartError("llama", "health check timed out after 15s"))
        self.h.flush()
        for d in waiting:
            response = self.successResultOf(d)
            self.assertJSONError(response, self.h.read(response), 502, "timed out after 15s")
        self.assertEqual(upstream.starts, 1)

    def test_client_leaves_while_model_starts(self) -> None:
        """
        A client that gives up while the model loads does not stop the start for the others.
        """
        upstream = self.h.upstreams["llama"]
        upstream.auto_ready = False
        leaving = self.h.request("POST", "/v1/chat/completions", b'{"model": "llama"}')
        staying = self.h.request("POST", "/v1/chat/completions", b'{"model": "llama"}')
        self.assertEqual(self.h.supervisor.queued("llama"), 2)
        leaving.cancel()
        self.failureResultOf(leaving)
        self.h.flush()
        self.assertEqual(self.h.supervisor.queued("llama"), 1)
        self.assertEqual(upstream.state, State.STARTING)
        upstream.become_ready()
        self.h.flush()
        self.assertEqual(self.successResultOf(staying).code, 200)
        self.assertEqual(len(self.h.received), 1)
        self.assertEqual(self.h.supervisor.in_flight["llama"], 0)

"""
Tests for the routes a client written for llama-server uses: llama-server's aliases of the
``/v1`` routes, its own endpoints (L{swapproxy.web.llamacpp}) and requests that name no model
(L{swapproxy.web.modelchoice}), driven with the in-memory upstreams of L{tests.support.harness}.
"""

from __future__ import annotations

import json
import textwrap
from typing import Any

from twisted.trial.unittest import SynchronousTestCase
from twisted.web.server import Request

from swapproxy.web.modelchoice import NO_MODEL
from swapproxy.web.root import INFERENCE_ROUTES
from tests.support.harness import CONFIG, TWO_MODELS, ErrorAssertions, Harness, Received, sample

ONE_MODEL = """
    models:
      only:
        cmd: llama-server --port ${PORT}
"""


class AliasTests(ErrorAssertions, SynchronousTestCase):
    """
    llama-server's ``/chat/completions``, ``/completions``, ``/responses``, ``/embeddings``, ...
    work as their ``/v1`` twins: the model named in the body, the same path upstream.
    """

    def setUp(self) -> None:
        self.h = Harness(self)

    def test_aliases_are_routed(self) -> None:
        aliases = ["/chat/completions", "/completions", "/responses", "/embeddings", "/embedding"]
        self.assertLessEqual(set(aliases), set(INFERENCE_ROUTES))
        for path in aliases:
            response, body = self.h.post_json(path, {"model": "fast", "prompt": "hi"})
            self.assertEqual(response.code, 200, (path, body))
            received = self.h.received[-1]
            self.assertEqual((received.model, received.uri.decode()), ("llama", path))
            self.assertEqual(json.loads(received.body), {"model": "fast", "prompt": "hi"})

    def test_unknown_model_is_the_same_404(self) -> None:
        response, body = self.h.post_json("/chat/completions", {"model": "nope"})
        self.assertJSONError(response, body, 404, "model 'nope' not found")

    def test_audio_transcriptions_alias(self) -> None:
        boundary = b"XyZ"
        form = (b"--XyZ\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nwhisper\r\n"
                b"--XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n"
                b"Content-Type: audio/wav\r\n\r\nRIFF\r\n--XyZ--\r\n")
        response, _ = self.h.call("POST", "/audio/transcriptions", form,
                                  {"Content-Type": "multipart/form-data; boundary=" + boundary.decode()})
        self.assertEqual(response.code, 200)
        self.assertEqual((self.h.received[-1].model, self.h.received[-1].uri), ("whisper", b"/audio/transcriptions"))


class LoadingStreamAliasTests(SynchronousTestCase):
    def test_chat_alias_has_the_loading_stream(self) -> None:
        """
        A streaming ``/chat/completions`` that names no model, for a model that is not ready,
        gets the loading stream as ``/v1/chat/completions`` does, then the model's own stream.
        """
        h = Harness(self, textwrap.dedent(ONE_MODEL) + "sendLoadingState: true\n")
        h.upstreams["only"].auto_ready = False

        def stream(request: Request, received: Received) -> bytes:
            request.setHeader(b"content-type", b"text/event-stream")
            return b"data: {\"choices\": []}\n\ndata: [DONE]\n\n"

        h.server.respond = stream
        pending = h.request("POST", "/chat/completions", json.dumps({"stream": True, "messages": []}).encode(),
                            {"Content-Type": "application/json"})
        response = self.successResultOf(pending)
        self.assertEqual(response.headers.getRawHeaders(b"content-type"), [b"text/event-stream; charset=utf-8"])
        h.clock.advance(1)
        h.upstreams["only"].become_ready()
        h.flush()
        events = [line[6:] for line in h.read(response).decode().split("\n") if line.startswith("data: ")]
        self.assertEqual(json.loads(events[0])["swapproxy"]["stage"], "starting")
        self.assertEqual(json.loads(events[-3])["swapproxy"]["stage"], "ready")
        self.assertEqual(events[-2:], ['{"choices": []}', "[DONE]"])
        self.assertEqual(h.received[-1].uri, b"/chat/completions")


class DefaultModelTests(ErrorAssertions, SynchronousTestCase):
    """
    A request that names no model: ``defaultModel``, else the only model configured, else the
    only model running, else a 400 that says what to do.
    """

    def chat_without_model(self, h: Harness, path: str = "/v1/chat/completions") -> tuple[Any, bytes]:
        return h.post_json(path, {"messages": [{"role": "user", "content": "hi"}]})

    def test_the_only_model(self) -> None:
        h = Harness(self, textwrap.dedent(ONE_MODEL))
        for path in ["/v1/chat/completions", "/chat/completions", "/completion", "/infill", "/v1/embeddings"]:
            response, _ = self.chat_without_model(h, path)
            self.assertEqual(response.code, 200, path)
            self.assertEqual(h.received[-1].model, "only")
            self.assertEqual(h.received[-1].body, b'{"messages": [{"role": "user", "content": "hi"}]}',
                             "the body goes as it was sent")

    def test_default_model_by_alias(self) -> None:
        h = Harness(self, textwrap.dedent(TWO_MODELS) + "defaultModel: fast\n")
        h.post_json("/v1/chat/completions", {"model": "qwen"})
        response, _ = self.chat_without_model(h)
        self.assertEqual(response.code, 200)
        self.assertEqual(h.received[-1].model, "llama", "defaultModel wins over the only running model")

    def test_the_only_running_model(self) -> None:
        h = Harness(self, textwrap.dedent(TWO_MODELS))
        response, body = self.chat_without_model(h)
        self.assertJSONError(response, body, 400, NO_MODEL)
        h.post_json("/v1/chat/completions", {"model": "qwen"})
        response, _ = self.chat_without_model(h)
        self.assertEqual(response.code, 200)
        self.assertEqual(h.received[-1].model, "qwen")

    def test_no_answer(self) -> None:
        h = Harness(self)
        for body in [{"messages": []}, {"model": None}, {"model": ""}]:
            response, raw = h.post_json("/v1/chat/completions", body)
            self.assertJSONError(response, raw, 400, "missing or invalid 'model' field", "set defaultModel")
        response, raw = h.post_json("/v1/chat/completions", {"model": ["llama"]})
        self.assertJSONError(response, raw, 400, "missing or invalid 'model' field")
        self.assertEqual(h.received, [])

    def test_multipart_without_model(self) -> None:
        h = Harness(self, textwrap.dedent(ONE_MODEL))
        form = b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n\r\nRIFF\r\n--b--\r\n"
        response, _ = h.call("POST", "/v1/audio/transcriptions", form,
                             {"Content-Type": "multipart/form-data; boundary=b"})
        self.assertEqual(response.code, 200)
        self.assertEqual(h.received[-1].body, form)


class LlamaServerEndpointTests(ErrorAssertions, SynchronousTestCase):
    """
    llama-server's own endpoints: the model from the body, then ``?model=``, then the default.
    """

    def setUp(self) -> None:
        self.h = Harness(self, textwrap.dedent(TWO_MODELS))

    def forwarded(self, method: str, path: str, body: bytes | None = None) -> tuple[str, str, bytes]:
        response, answer = self.h.call(method, path, body, {"Content-Type": "application/json"})
        self.assertEqual(response.code, 200, answer)
        received = self.h.received[-1]
        return received.model, received.uri.decode(), received.body

    def test_model_from_body_query_or_default(self) -> None:
        self.assertEqual(self.forwarded("POST", "/tokenize", b'{"model": "fast", "content": "hi"}'),
                         ("llama", "/tokenize", b'{"model": "fast", "content": "hi"}'))
        self.assertEqual(self.forwarded("POST", "/detokenize?model=qwen", b'{"tokens": [1]}')[:2],
                         ("qwen", "/detokenize?model=qwen"))
        self.assertEqual(self.forwarded("POST", "/apply-template?model=qwen", b'{"model": "llama", "messages": []}')[0],
                         "llama", "the body's model wins")
        self.assertEqual(self.forwarded("GET", "/props?model=fast")[:2], ("llama", "/props?model=fast"))
        # llama is the only one running now (the two swap): a request that names no model goes to it.
        self.assertEqual(self.forwarded("POST", "/tokenize", b'{"content": "hi"}')[0], "llama")

    def test_every_endpoint_is_routed(self) -> None:
        for method, path in [
            ("POST", "/tokenize"), ("POST", "/detokenize"), ("POST", "/apply-template"), ("GET", "/props"),
            ("POST", "/props"), ("GET", "/slots"), ("POST", "/slots/0?action=save"), ("GET", "/lora-adapters"),
            ("POST", "/lora-adapters"), ("POST", "/chat/completions/input_tokens"),
            ("POST", "/v1/chat/completions/input_tokens"), ("POST", "/responses/input_tokens"),
            ("POST", "/v1/responses/input_tokens"), ("POST", "/infill"), ("POST", "/completion"),
            ("POST", "/v1/messages/count_tokens"),
        ]:
            separator = "&" if "?" in path else "?"
            model, uri, _ = self.forwarded(method, path + separator + "model=qwen", b'{"model": "qwen"}')
            self.assertEqual((model, uri), ("qwen", path + separator + "model=qwen"))

    def test_bodies_that_are_not_json_objects_go_as_they_are(self) -> None:
        for body in [b'[{"id": 0, "scale": 0.5}]', b"not json", b""]:
            self.assertEqual(self.forwarded("POST", "/lora-adapters?model=qwen", body),
                             ("qwen", "/lora-adapters?model=qwen", body))

    def test_no_model(self) -> None:
        response, body = self.h.post_json("/tokenize", {"content": "hi"})
        self.assertJSONError(response, body, 400, NO_MODEL)
        response, body = self.h.call("GET", "/slots?model=nope")
        self.assertJSONError(response, body, 404, "model 'nope' not found")
        self.assertEqual(self.h.received, [])

    def test_slot_paths(self) -> None:
        for path in ["/slots/x?model=qwen", "/slots/0/1?model=qwen", "/tokenize/x?model=qwen"]:
            response, body = self.h.call("POST", path, b"{}")
            self.assertJSONError(response, body, 404, "no route")
        self.assertEqual(self.h.received, [])

    def test_autoload_false(self) -> None:
        """
        ``?autoload=false``, as the router takes it: a model that is not loaded is not started.
        """
        response, body = self.h.call("GET", "/props?model=qwen&autoload=false")
        self.assertJSONError(response, body, 400, "'qwen' is not loaded")
        self.assertEqual(self.h.upstreams["qwen"].starts, 0)
        self.h.post_json("/v1/chat/completions", {"model": "qwen"})
        self.assertEqual(self.forwarded("GET", "/props?model=qwen&autoload=false")[0], "qwen")

    def test_props_with_a_default_model_is_the_models(self) -> None:
        h = Harness(self, textwrap.dedent(ONE_MODEL))
        response, _ = h.call("GET", "/props")
        self.assertEqual(response.code, 200)
        self.assertEqual((h.received[-1].model, h.received[-1].uri), ("only", b"/props"))

    def test_metrics_label_of_a_slot(self) -> None:
        """
        A slot's number is not a label of its own: any client could make them endless.
        """
        for slot in ("0", "17"):
            self.h.call("POST", f"/slots/{slot}?model=qwen&action=save", b"{}")
        self.h.call("POST", "/tokenize?model=qwen", b"{}")
        _, body = self.h.call("GET", "/metrics")
        self.assertEqual(sample(body, "swapproxy_requests_total", model="qwen", route="/slots/<id>"), 2.0)
        self.assertEqual(sample(body, "swapproxy_requests_total", model="qwen", route="/tokenize"), 1.0)
        self.assertIsNone(sample(body, "swapproxy_requests_total", model="qwen", route="/slots/17"))


class RouterPropsTests(SynchronousTestCase):
    def test_props_without_a_default_is_the_routers(self) -> None:
        """
        Whatever runs: a client that asks ``/props`` to tell a router from a single server gets
        the same answer as models come and go.
        """
        h = Harness(self, textwrap.dedent(CONFIG))
        for running in (None, "qwen"):
            if running is not None:
                h.post_json("/v1/chat/completions", {"model": running})
            response, body = h.call("GET", "/props")
            self.assertEqual(response.code, 200)
            self.assertEqual(json.loads(body)["role"], "router")
        self.assertEqual([r.uri for r in h.received], [b"/v1/chat/completions"])

    def test_props_with_default_model_is_the_models(self) -> None:
        h = Harness(self, textwrap.dedent(CONFIG) + "defaultModel: qwen\n")
        response, _ = h.call("GET", "/props")
        self.assertEqual(response.code, 200)
        self.assertEqual((h.received[-1].model, h.received[-1].uri), ("qwen", b"/props"))

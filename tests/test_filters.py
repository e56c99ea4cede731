"""
Tests for L{swapproxy.web.filters}: C{useModelName}, C{filters.stripParams}, C{filters.setParams}
and C{filters.setParamsByID}, as functions and as an upstream sees their result.
"""

from __future__ import annotations

import json
import textwrap
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from swapproxy.config import ConfigError, parse_config
from swapproxy.web.filters import (
    encode_payload,
    rewrite_payload,
    set_path,
    split_path,
    strip_loading_text,
    strip_path,
)
from swapproxy.web.sse import LOADING_TEXT_END, LOADING_TEXT_START
from tests.support.harness import ErrorAssertions, Harness, header

CONFIG = """
    healthCheckTimeout: 15
    models:
      llama:
        cmd: llama-server --port ${PORT}
        filters:
          stripParams: "temperature, top_p, options.seed, model, stream_options"
          setParams:
            top_k: 40
            chat_template_kwargs.enable_thinking: false
            model: evil
            model.name: evil
          setParamsByID:
            llama-think:
              chat_template_kwargs.enable_thinking: true
              temperature: 0.6
            llama:
              min_p: 0.05
      qwen:
        cmd: llama-server --port ${PORT}
        useModelName: Qwen/Qwen2.5-7B-Instruct
        aliases: [smart]
        filters:
          stripParams: stream
          setParams:
            top_k: 20
      loader:
        cmd: llama-server --port ${PORT}
        sendLoadingState: true
        filters:
          setParamsByID:
            loader-streaming:
              stream: true
      quiet-loader:
        cmd: llama-server --port ${PORT}
        sendLoadingState: true
        filters:
          stripParams: stream
      plain:
        cmd: llama-server --port ${PORT}
"""


def model_config(text: str = CONFIG) -> Any:
    return parse_config(textwrap.dedent(text), "config.yaml", {})


class PathTests(SynchronousTestCase):
    """
    Dotted key paths, as llama-swap (sjson) reads them.
    """

    def test_split(self) -> None:
        """
        Dots separate keys; a backslash makes the next character literal.
        """
        self.assertEqual(split_path("a"), ["a"])
        self.assertEqual(split_path("a.b.c"), ["a", "b", "c"])
        self.assertEqual(split_path(r"a\.b.c"), ["a.b", "c"])
        self.assertEqual(split_path(r"a\\.b"), ["a\\", "b"])

    def test_strip_nested(self) -> None:
        """
        Stripping removes a nested key or array element and reports whether anything went.
        """
        payload = {"a": {"b": 1, "c": 2}, "list": [{"x": 1}, {"x": 2}], "s": "text"}
        self.assertTrue(strip_path(payload, "a.b"))
        self.assertTrue(strip_path(payload, "list.1.x"))
        self.assertFalse(strip_path(payload, "a.missing"))
        self.assertFalse(strip_path(payload, "s.inner"))
        self.assertFalse(strip_path(payload, "list.7"))
        self.assertEqual(payload, {"a": {"c": 2}, "list": [{"x": 1}, {}], "s": "text"})
        self.assertTrue(strip_path(payload, "list.0"))
        self.assertEqual(payload["list"], [{}])

    def test_set_nested(self) -> None:
        """
        Setting creates the objects on the way, replaces a scalar in the way, indexes arrays, and
        reports a change only when the JSON value differs (1 is not true, 1 is not 1.0).
        """
        payload: dict[str, Any] = {"n": 1, "flag": 1, "s": "text", "list": [{"x": 1}]}
        self.assertTrue(set_path(payload, "a.b.c", [1]))
        self.assertTrue(set_path(payload, "s.inner", 2))
        self.assertTrue(set_path(payload, "list.0.x", 3))
        self.assertTrue(set_path(payload, "list.-1", "end"))
        self.assertFalse(set_path(payload, "n", 1))
        self.assertTrue(set_path(payload, "flag", True))
        self.assertTrue(set_path(payload, "n", 1.0))
        self.assertFalse(set_path(payload, "list.x.y", 1))
        self.assertEqual(
            payload,
            {"n": 1.0, "flag": True, "s": {"inner": 2}, "list": [{"x": 3}, "end"], "a": {"b": {"c": [1]}}},
        )

    def test_set_copies_the_value(self) -> None:
        """
        A value from the config is copied into each body: changing one body changes no other.
        """
        value = {"k": [1]}
        first: dict[str, Any] = {}
        set_path(first, "p", value)
        first["p"]["k"].append(2)
        self.assertEqual(value, {"k": [1]})

    def test_model_is_protected(self) -> None:
        """
        Neither C{model} nor a path inside it can be stripped or set.
        """
        payload: dict[str, Any] = {"model": "llama"}
        self.assertFalse(strip_path(payload, "model"))
        self.assertFalse(set_path(payload, "model", "evil"))
        self.assertFalse(set_path(payload, "model.name", "evil"))
        self.assertEqual(payload, {"model": "llama"})

    def test_encode_keeps_lone_surrogates_escaped(self) -> None:
        """
        A string that cannot be UTF-8 (a lone surrogate sent as a JSON escape) is re-encoded as an
        escape, not a crash.
        """
        payload = json.loads('{"model": "m", "s": "\\ud800", "t": "é"}')
        self.assertEqual(json.loads(encode_payload(payload)), payload)
        self.assertEqual(encode_payload({"t": "é"}), '{"t": "é"}'.encode())


class RewriteTests(SynchronousTestCase):
    """
    L{rewrite_payload}: llama-swap's order and rules.
    """

    def setUp(self) -> None:
        self.config = model_config()

    def rewrite(self, requested: str, payload: dict[str, Any]) -> tuple[bool, dict[str, Any]]:
        model = self.config.resolve(requested)
        assert model is not None
        changed = rewrite_payload(model, requested, payload)
        return changed, payload

    def test_order(self) -> None:
        """
        stripParams, then setParams, then setParamsByID: a key stripped and set again by
        setParamsByID ends up with the setParamsByID value.
        """
        changed, payload = self.rewrite("llama-think", {
            "model": "llama-think", "temperature": 1.5, "top_p": 0.9, "options": {"seed": 1, "keep": 2},
        })
        self.assertTrue(changed)
        self.assertEqual(payload, {
            "model": "llama-think", "temperature": 0.6, "options": {"keep": 2}, "top_k": 40,
            "chat_template_kwargs": {"enable_thinking": True},
        })

    def test_set_params_by_id_needs_the_exact_name(self) -> None:
        """
        The parameters of a setParamsByID key apply only when the client used that name: the
        model's id gets its own entry, not the alias's.
        """
        _, payload = self.rewrite("llama", {"model": "llama", "temperature": 1.5})
        self.assertEqual(payload, {
            "model": "llama", "top_k": 40, "chat_template_kwargs": {"enable_thinking": False}, "min_p": 0.05,
        })

    def test_set_params_by_id_keys_are_aliases(self) -> None:
        """
        Each setParamsByID key names its model.
        """
        self.assertEqual(self.config.aliases["llama-think"], "llama")
        self.assertEqual(self.config.resolve("loader-streaming").id, "loader")

    def test_use_model_name_first(self) -> None:
        """
        useModelName replaces the model before the filters run; the filters cannot touch it.
        """
        changed, payload = self.rewrite("smart", {"model": "smart", "stream": True})
        self.assertTrue(changed)
        self.assertEqual(payload, {"model": "Qwen/Qwen2.5-7B-Instruct", "top_k": 20})

    def test_model_never_stripped_or_set(self) -> None:
        """
        "model" in stripParams and setParams (plain or as a path) is dropped by the config, with a
        warning for the ones that would have set it.
        """
        llama = self.config.models["llama"]
        self.assertNotIn("model", llama.strip_params)
        self.assertEqual(sorted(llama.set_params), ["chat_template_kwargs.enable_thinking", "top_k"])
        warnings = "\n".join(self.config.warnings)
        self.assertIn("models.llama.filters.setParams.model: ignored", warnings)
        self.assertIn("models.llama.filters.setParams.model.name: ignored", warnings)
        _, payload = self.rewrite("llama", {"model": "llama"})
        self.assertEqual(payload["model"], "llama")

    def test_nothing_to_do(self) -> None:
        """
        A body the filters would leave as it is counts as unchanged.
        """
        changed, _ = self.rewrite("llama", {
            "model": "llama", "top_k": 40, "chat_template_kwargs": {"enable_thinking": False}, "min_p": 0.05,
        })
        self.assertFalse(changed)
        changed, _ = self.rewrite("plain", {"model": "plain", "temperature": 2})
        self.assertFalse(changed)


class ConfigTests(SynchronousTestCase):
    """
    The config refuses filter values that have no JSON form.
    """

    def test_values_must_be_json(self) -> None:
        for value, fragment in [
            ("2024-01-01", "got a date"),
            ("!!binary aGk=", "got a bytes"),
            ("{1: 2}", "JSON object keys must be strings"),
        ]:
            text = f"""
                models:
                  m:
                    cmd: x ${{PORT}}
                    filters:
                      setParams:
                        key: {value}
            """
            with self.assertRaises(ConfigError) as caught:
                model_config(text)
            self.assertIn("models.m.filters.setParams.key", str(caught.exception))
            self.assertIn(fragment, str(caught.exception))

    def test_keys_must_be_strings(self) -> None:
        text = """
            models:
              m:
                cmd: x ${PORT}
                filters:
                  setParamsByID:
                    m2:
                      7: seven
        """
        with self.assertRaises(ConfigError) as caught:
            model_config(text)
        self.assertIn("models.m.filters.setParamsByID.m2.7: keys must be non-empty strings", str(caught.exception))


class UpstreamSeesTests(ErrorAssertions, SynchronousTestCase):
    """
    What the upstream receives once the filters ran.
    """

    def setUp(self) -> None:
        self.h = Harness(self, CONFIG)

    def test_rewritten_body_and_content_length(self) -> None:
        """
        A rewritten body reaches the upstream with a Content-Length that matches it.
        """
        response, body = self.h.post_json(
            "/v1/chat/completions", {"model": "llama-think", "messages": [{"role": "user", "content": "héllo ✓"}]}
        )
        self.assertEqual(response.code, 200, body)
        received = self.h.received[-1]
        self.assertEqual(received.model, "llama")
        self.assertEqual(json.loads(received.body), {
            "model": "llama-think", "messages": [{"role": "user", "content": "héllo ✓"}], "top_k": 40,
            "chat_template_kwargs": {"enable_thinking": True}, "temperature": 0.6,
        })
        self.assertEqual(received.headers.getRawHeaders(b"content-length"), [str(len(received.body)).encode()])

    def test_unchanged_body_forwarded_byte_for_byte(self) -> None:
        """
        A body the filters leave alone reaches the upstream exactly as the client wrote it:
        spacing, key order, escapes and number spellings.
        """
        for body in [
            b'{ "model" : "plain",\n  "b": 1.50, "a": "\\u00e9", "temperature": 1e0 }',
            b'{"top_k":40,"model":"llama","min_p":5e-2,"chat_template_kwargs":{"enable_thinking":false}}',
        ]:
            response, answer = self.h.call("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
            self.assertEqual(response.code, 200, answer)
            self.assertEqual(self.h.received[-1].body, body)
            self.assertEqual(self.h.received[-1].headers.getRawHeaders(b"content-length"), [str(len(body)).encode()])

    def test_filters_only_on_json_routes(self) -> None:
        """
        /upstream/<model>/... forwards the body untouched, filters or not.
        """
        body = b'{"model": "llama", "temperature": 1}'
        response, _ = self.h.call("POST", "/upstream/llama/v1/chat/completions", body)
        self.assertEqual(response.code, 200)
        self.assertEqual(self.h.received[-1].body, body)

    def test_stream_set_by_filter(self) -> None:
        """
        The loading stream follows the rewritten body: a setParamsByID that turns streaming on gets
        it for a client that did not ask.
        """
        self.h.upstreams["loader"].auto_ready = False
        response = self.successResultOf(self.h.request(
            "POST", "/v1/chat/completions", json.dumps({"model": "loader-streaming", "messages": []}).encode(),
            {"Content-Type": "application/json"},
        ))
        self.assertEqual(response.code, 200)
        self.assertTrue(header(response, b"content-type")[0].startswith(b"text/event-stream"))

    def test_stream_stripped_by_filter(self) -> None:
        """
        A stripParams of "stream" takes the loading stream away from a client that asked for it.
        """
        self.h.upstreams["quiet-loader"].auto_ready = False
        pending = self.h.request(
            "POST", "/v1/chat/completions", json.dumps({"model": "quiet-loader", "stream": True}).encode(),
            {"Content-Type": "application/json"},
        )
        # No loading stream: nothing is answered until the model is ready.
        self.assertNoResult(pending)
        self.h.upstreams["quiet-loader"].become_ready()
        self.h.flush()
        response = self.successResultOf(pending)
        self.assertEqual(header(response, b"content-type"), [b"application/json"])
        self.assertNotIn(b"stream", self.h.received[-1].body)


START, END = LOADING_TEXT_START, LOADING_TEXT_END
LOADING = START + "\nStarting qwen.\nLoading qwen: 40% (loading weights)\nModel qwen is ready (waited 2.0 s).\n\n" + END


def history(*messages: dict[str, Any], ensure_ascii: bool = False) -> bytes:
    return json.dumps({"model": "qwen", "messages": list(messages)}, ensure_ascii=ensure_ascii).encode("utf-8")


class StripLoadingTextTests(SynchronousTestCase):
    """
    L{strip_loading_text}: swapproxy's loading text leaves a conversation's history, and nothing
    else changes.
    """

    def assertStripped(self, before: bytes, after: bytes) -> None:
        self.assertEqual(strip_loading_text(before).decode("utf-8"), after.decode("utf-8"))

    def test_nothing_to_strip_is_the_same_bytes(self) -> None:
        for body in [
            history({"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}),
            history({"role": "assistant", "content": "a word\u2060joiner"}),
            b'{"messages": "\\u2060"}',
            b"not json \xe2\x81\xa0",
            b"[1, \"\\u2060\"]",
        ]:
            self.assertIs(strip_loading_text(body), body)

    def test_reasoning_content(self) -> None:
        """
        The model's own reasoning after the loading text stays; a field that held only loading
        text goes as a whole.
        """
        self.assertStripped(
            history({"role": "user", "content": "hi"},
                    {"role": "assistant", "reasoning_content": LOADING + "I think.", "content": "Hello."},
                    {"role": "user", "content": "more"}),
            history({"role": "user", "content": "hi"},
                    {"role": "assistant", "reasoning_content": "I think.", "content": "Hello."},
                    {"role": "user", "content": "more"}),
        )
        for field in ("reasoning_content", "reasoning"):
            self.assertStripped(
                history({"role": "assistant", "content": "Hello.", field: LOADING}),
                history({"role": "assistant", "content": "Hello."}),
            )
            self.assertStripped(
                history({"role": "assistant", field: LOADING, "content": "Hello."}),
                history({"role": "assistant", "content": "Hello."}),
            )
            self.assertStripped(
                history({"role": "assistant", field: LOADING}),
                history({"role": "assistant"}),
            )

    def test_content_mode(self) -> None:
        self.assertStripped(
            history({"role": "assistant", "content": LOADING + "Hello."}),
            history({"role": "assistant", "content": "Hello."}),
        )
        self.assertStripped(
            history({"role": "assistant", "content": [{"type": "text", "text": LOADING + "Hello."}]}),
            history({"role": "assistant", "content": [{"type": "text", "text": "Hello."}]}),
        )
        self.assertStripped(
            history({"role": "assistant",
                     "content": [{"type": "text", "text": LOADING}, {"type": "text", "text": "Hi"}]}),
            history({"role": "assistant", "content": [{"type": "text", "text": "Hi"}]}),
        )

    def test_anthropic_thinking_blocks(self) -> None:
        """
        The loading stream's thinking block goes; the model's own blocks stay, with their
        signatures.
        """
        own = {"type": "thinking", "thinking": "Let me see.", "signature": "c2ln"}
        text = {"type": "text", "text": "Hello."}
        ours = {"type": "thinking", "thinking": LOADING, "signature": ""}
        for before, after in [([ours, own, text], [own, text]), ([own, ours, text], [own, text]),
                              ([text, ours], [text]), ([ours, ours, text], [text]), ([text, ours, ours], [text]),
                              ([ours], [])]:
            self.assertStripped(history({"role": "assistant", "content": before}),
                                history({"role": "assistant", "content": after}))

    def test_only_assistant_messages(self) -> None:
        body = history({"role": "user", "content": LOADING}, {"role": "system", "content": LOADING})
        self.assertIs(strip_loading_text(body), body)

    def test_every_other_byte_as_sent(self) -> None:
        """
        Escapes, spacing, key order and number spellings around the loading text, and in the
        model's text next to it, stay as the client wrote them, whichever way the client wrote
        the markers.
        """
        raw, escaped = json.dumps(LOADING, ensure_ascii=False)[1:-1], json.dumps(LOADING)[1:-1]
        self.assertIn(START, raw)
        self.assertNotIn(START, escaped)
        for marker_text in (raw, escaped):
            before = ('{ "messages" : [ {"role":"user","content":"caf\\u00e9 \\ud83d\\ude00"} ,\n'
                      '  {"content": "ok", "reasoning_content" : "' + marker_text
                      + 'Th\\u00e9 \\"quoted\\" \U0001F600",'
                      ' "role": "assistant"}], "temperature": 1.50, "top_k": 4e1 }')
            after = ('{ "messages" : [ {"role":"user","content":"caf\\u00e9 \\ud83d\\ude00"} ,\n'
                     '  {"content": "ok", "reasoning_content" : "Th\\u00e9 \\"quoted\\" \U0001F600",'
                     ' "role": "assistant"}], "temperature": 1.50, "top_k": 4e1 }')
            self.assertStripped(before.encode("utf-8"), after.encode("utf-8"))

    def test_restarted_load_and_unfinished_load(self) -> None:
        """
        A load that restarted wrote two stretches of loading text; one whose stream was cut has
        no end marker: everything after its start is loading text.
        """
        self.assertStripped(
            history({"role": "assistant", "reasoning_content": LOADING + START + "\nStarting again." + END + "Mine."}),
            history({"role": "assistant", "reasoning_content": "Mine."}),
        )
        self.assertStripped(
            history({"role": "assistant", "content": "Mine.", "reasoning_content": START + "\nStarting qwen."}),
            history({"role": "assistant", "content": "Mine."}),
        )

    def test_through_the_route(self) -> None:
        """
        What a chat route sends upstream: the stripped body, with its own Content-Length.
        """
        h = Harness(self, CONFIG)
        body = history({"role": "user", "content": "hi"},
                       {"role": "assistant", "reasoning_content": LOADING, "content": "Hello."},
                       {"role": "user", "content": "and?"}).replace(b'"qwen"', b'"plain"')
        for path in ["/v1/chat/completions", "/chat/completions", "/apply-template",
                     "/v1/chat/completions/input_tokens"]:
            response, _ = h.call("POST", path, body, {"Content-Type": "application/json"})
            self.assertEqual(response.code, 200)
            received = h.received[-1]
            self.assertEqual(json.loads(received.body)["messages"][1], {"role": "assistant", "content": "Hello."})
            self.assertNotIn(START.encode(), received.body)
            self.assertEqual(received.headers.getRawHeaders(b"content-length"), [str(len(received.body)).encode()])


def _reference_strip(payload: Any) -> Any:
    """
    What stripping does, written the simple way on the parsed body (for the property test).
    """

    def cut(text: str) -> str:
        while START in text:
            head, _, rest = text.partition(START)
            _, found, tail = rest.partition(END)
            text = head + (tail if found else "")
        return text

    if not isinstance(payload, dict) or not isinstance(payload.get("messages"), list):
        return payload
    for message in payload["messages"]:
        if not isinstance(message, dict) or message.get("role") != "assistant":
            continue
        for field in ("reasoning_content", "reasoning"):
            if isinstance(message.get(field), str) and START in message[field]:
                message[field] = cut(message[field])
                if not message[field]:
                    del message[field]
        content = message.get("content")
        if isinstance(content, str):
            message["content"] = cut(content)
        elif isinstance(content, list):
            kept = []
            for part in content:
                key = {"text": "text", "thinking": "thinking"}.get(part.get("type")) if isinstance(part, dict) else None
                if key is not None and isinstance(part.get(key), str) and START in part[key]:
                    part[key] = cut(part[key])
                    if not part[key]:
                        continue
                kept.append(part)
            message["content"] = kept
    return payload


_texts = st.lists(st.sampled_from(["a", "é", "\U0001F600", "\n", '"', "\\", START, END, LOADING, "\u2060"]),
                  max_size=6).map("".join)
_parts = st.fixed_dictionaries({"type": st.sampled_from(["text", "thinking", "image_url"])},
                               optional={"text": _texts, "thinking": _texts, "signature": st.just("")})
_messages = st.fixed_dictionaries(
    {"role": st.sampled_from(["assistant", "assistant", "user", "system"])},
    optional={"content": _texts | st.lists(_parts, max_size=4) | st.none(), "reasoning_content": _texts,
              "reasoning": _texts, "tool_calls": st.just([])},
)
_bodies = st.fixed_dictionaries({"messages": st.lists(_messages, max_size=4)},
                                optional={"model": st.just("qwen"), "temperature": st.floats(0, 2)})


class StripPropertyTests(SynchronousTestCase):
    @settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(_bodies, st.booleans(), st.sampled_from([None, 0, 2]))
    def test_any_conversation(self, payload: dict[str, Any], ensure_ascii: bool, indent: int | None) -> None:
        """
        Any conversation, however the client encodes it: the result is valid JSON equal to the
        simple reference, and a body with nothing to strip comes back as it was.
        """
        body = json.dumps(payload, ensure_ascii=ensure_ascii, indent=indent).encode("utf-8")
        stripped = strip_loading_text(body)
        expected = _reference_strip(json.loads(body))
        self.assertEqual(json.loads(stripped), expected)
        if expected == json.loads(body):
            self.assertEqual(stripped, body)

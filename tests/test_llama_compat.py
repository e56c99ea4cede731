"""
The end-to-end tier for issue 15: clients written for llama-server and for llama.cpp's router,
pointed at swapproxy instead, see what they saw before.

Each test sends the requests such a client sends once to a real llama-server of its own and once
through swapproxy (whose model is the same llama-server binary and weights), and compares what the
client would notice (`tests.support.differential`). Skipped without a llama-server, as
``tests/test_llama_server.py`` is.

The last class needs no llama-server: a two-turn conversation through the openai SDK whose first
turn loaded the model, against the fake upstream with ``--echo-body``, shows that the loading
text the first answer carried never reaches the model.
"""

from __future__ import annotations

import json
import os
from typing import Any

import yaml
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from swapproxy.config import parse_config
from swapproxy.testing.llama import BASE_FLAGS, HOW_TO_GET_ONE, llama_command
from swapproxy.testing.local import fake_command, free_port_range
from swapproxy.web.sse import LOADING_TEXT_END, LOADING_TEXT_START
from tests.support.differential import Answer, Differential, LlamaServerProcess, cors_allows, preflight_allows, shape
from tests.support.live import config_yaml, loading_status, openai_client, start_proxy, visible
from tests.support.llama import LLAMA_SERVER, model_file
from tests.support.processes import wait_until

#: llama-server's flags for every server here (BASE_FLAGS without host and port, which differ).
FLAGS = ("-c", "512", "-ngl", "0", "--no-webui", "-np", "1", "-fit", "off")
assert set(FLAGS[:5]) <= set(BASE_FLAGS)

CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 0}

#: What clients written for llama-server send: no model anywhere, llama-server's own paths.
LLAMA_SERVER_CLIENT_REQUESTS: list[tuple[str, str, Any]] = [
    ("POST", "/chat/completions", CHAT),
    ("POST", "/v1/chat/completions", CHAT),
    ("POST", "/completions", {"prompt": "hi", "n_predict": 4, "temperature": 0}),
    ("POST", "/completion", {"prompt": "hi", "n_predict": 4, "temperature": 0}),
    ("POST", "/v1/completions", {"prompt": "hi", "max_tokens": 4, "temperature": 0}),
    ("POST", "/responses", {"input": "hi", "max_output_tokens": 4, "temperature": 0}),
    ("POST", "/embeddings", {"input": "hi"}),
    ("POST", "/tokenize", {"content": "hello world"}),
    ("POST", "/detokenize", {"tokens": [22172, 3186]}),
    ("POST", "/apply-template", {"messages": [{"role": "user", "content": "hi"}]}),
    ("POST", "/chat/completions/input_tokens", {"messages": [{"role": "user", "content": "hi"}]}),
    ("POST", "/v1/messages/count_tokens", {"messages": [{"role": "user", "content": "hi"}]}),
    ("POST", "/infill", {"input_prefix": "def f(", "input_suffix": "):", "n_predict": 2}),
    ("GET", "/props", None),
    ("GET", "/slots", None),
]


def one_model_config(model_path: str, *extra: str, **top: Any) -> str:
    assert LLAMA_SERVER is not None
    document: dict[str, Any] = {"healthCheckTimeout": 30, "startPort": free_port_range(3), "unloadTimeout": 5}
    document.update(top)
    document["models"] = {"tiny": {"cmd": llama_command(LLAMA_SERVER, model_path, *extra)}}
    return yaml.safe_dump(document, sort_keys=False)


class LlamaServerClientTests(TestCase):
    """
    A client written for llama-server (one model, no ``model`` field), against llama-server and
    against swapproxy with that one model.
    """

    timeout = 120
    skip = None if LLAMA_SERVER is not None else HOW_TO_GET_ONE

    async def setup(self, direct_args: tuple[str, ...] = (), model_args: tuple[str, ...] = (),
                    **top: Any) -> Differential:
        assert LLAMA_SERVER is not None
        path = model_file("tiny")
        proxy = start_proxy(self, parse_config(one_model_config(path, *model_args, **top), "test.yaml"))
        direct = LlamaServerProcess(self, LLAMA_SERVER, ["-m", path, *FLAGS, "--alias", "tiny", *direct_args])
        differential = Differential(self, direct.url, proxy.url)
        await direct.ready(differential.client)
        return differential

    async def test_llama_server_paths_without_a_model(self) -> None:
        """
        Every path such a client uses answers through swapproxy as llama-server answers it:
        same status, same content type, same JSON shape (and 501 where llama-server has 501).
        """
        differential = await self.setup()
        for method, path, body in LLAMA_SERVER_CLIENT_REQUESTS:
            direct, proxied = await differential.both(method, path, body)
            differential.assertSame(direct, proxied, f"{method} {path}")
        direct, proxied = await differential.both("POST", "/tokenize", {"content": "hello world"})
        self.assertEqual(proxied.json(), direct.json(), "the very same tokens")

    async def test_streaming_chat_without_a_model(self) -> None:
        differential = await self.setup()
        direct, proxied = await differential.both("POST", "/chat/completions", dict(CHAT, stream=True))
        differential.assertSame(direct, proxied, "streaming /chat/completions", body_shape=False)
        self.assertEqual(proxied.media_type, "text/event-stream")
        self.assertEqual([shape(e) for e in proxied.events()], [shape(e) for e in direct.events()])
        self.assertEqual(proxied.events()[-1], "[DONE]")

    async def test_key_before_model(self) -> None:
        """
        With a key required (``--api-key`` / ``apiKeys``), a request without key and model is a
        401 from both, an authentication error; with the key it is answered.
        """
        differential = await self.setup(direct_args=("--api-key", "sk-test"), apiKeys=["sk-test"])
        direct, proxied = await differential.both("POST", "/chat/completions", CHAT)
        self.assertEqual((proxied.status, direct.status), (401, 401))
        self.assertEqual(proxied.json()["error"]["type"], direct.json()["error"]["type"])
        direct, proxied = await differential.both("POST", "/chat/completions", CHAT,
                                                  {"Authorization": "Bearer sk-test"})
        differential.assertSame(direct, proxied, "with the key")
        self.assertEqual(proxied.status, 200)

    async def test_cors_policy(self) -> None:
        """
        llama-server's ``--cors-origins`` policy, written as swapproxy's ``cors`` section: a page of
        another origin may do nothing, in both; a page of the allowed origin may do through
        swapproxy all that it may do with llama-server, and more: with credentials, llama-server's
        ``Access-Control-Allow-Headers: *`` is taken literally by a browser and its answers lack
        ``Access-Control-Allow-Credentials``, where swapproxy names the headers asked for and
        allows credentials as configured.
        """
        good, evil = "http://good.example", "http://evil.example"
        differential = await self.setup(direct_args=("--cors-origins", good),
                                        cors={"allowedOrigins": [good], "allowCredentials": True})
        preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"}
        for origin in (good, evil):
            direct, proxied = await differential.both("OPTIONS", "/chat/completions", None,
                                                      {"Origin": origin, **preflight})
            for credentials in (False, True):
                allowed = preflight_allows(proxied, origin, "POST", ["content-type"], credentials)
                self.assertEqual(allowed, origin == good, (origin, credentials))
                if preflight_allows(direct, origin, "POST", ["content-type"], credentials):
                    self.assertTrue(allowed, (origin, credentials))
            for method, path, body in [("GET", "/props", None), ("POST", "/chat/completions", CHAT)]:
                direct, proxied = await differential.both(method, path, body, {"Origin": origin})
                self.assertEqual(proxied.status, direct.status)
                for credentials in (False, True):
                    allowed = cors_allows(proxied, origin, credentials)
                    self.assertEqual(allowed, origin == good, (origin, path, credentials))
                    if cors_allows(direct, origin, credentials):
                        self.assertTrue(allowed, (origin, path, credentials))
                self.assertEqual(cors_allows(proxied, origin, False), cors_allows(direct, origin, False))

    async def test_default_cors_for_pages_without_credentials(self) -> None:
        """
        Without any CORS setting, a page of any origin may call both (credentials are where
        swapproxy is stricter by default: see the README).
        """
        differential = await self.setup()
        origin = "http://localhost:5173"
        direct, proxied = await differential.both("POST", "/chat/completions", CHAT, {"Origin": origin})
        self.assertTrue(cors_allows(direct, origin, credentials=False))
        self.assertTrue(cors_allows(proxied, origin, credentials=False))
        self.assertFalse(cors_allows(proxied, origin, credentials=True))

    async def test_loading_text_in_the_history_never_reaches_the_model(self) -> None:
        """
        A history that carries swapproxy's loading text (here in ``content``, which every chat
        template renders) makes the same prompt through swapproxy as the history without it
        makes with llama-server directly; sent directly, the loading text would be in the prompt.
        """
        differential = await self.setup()
        loading = LOADING_TEXT_START + "\nStarting tiny.\nModel tiny is ready (waited 0.2 s).\n\n" + LOADING_TEXT_END

        def conversation(answer: str) -> dict[str, Any]:
            return {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": answer},
                                 {"role": "user", "content": "and then?"}]}

        proxied = await differential.send(differential.proxied + "/apply-template", "POST",
                                          conversation(loading + "Hello."))
        clean = await differential.send(differential.direct + "/apply-template", "POST", conversation("Hello."))
        marked = await differential.send(differential.direct + "/apply-template", "POST",
                                         conversation(loading + "Hello."))
        self.assertEqual(proxied.status, 200, proxied.body)
        self.assertEqual(proxied.json(), clean.json())
        self.assertIn("Starting tiny", marked.json()["prompt"])
        self.assertNotIn("Starting tiny", proxied.json()["prompt"])

    async def test_the_models_own_metrics_and_health(self) -> None:
        """
        swapproxy's ``/metrics`` and ``/health`` are its own; the model's are at
        ``/upstream/<model>/metrics`` and ``/upstream/<model>/health``.
        """
        differential = await self.setup(direct_args=("--metrics",), model_args=("--metrics",))
        await differential.both("POST", "/completion", {"prompt": "hi", "n_predict": 1})
        direct, proxied = await differential.both("GET", "/metrics", proxied_path="/upstream/tiny/metrics")
        differential.assertSame(direct, proxied, "metrics")
        families = [line.split()[2] for line in direct.body.decode().splitlines() if line.startswith("# TYPE")]
        self.assertIn("llamacpp:prompt_tokens_total", families)
        self.assertEqual([line.split()[2] for line in proxied.body.decode().splitlines() if line.startswith("# TYPE")],
                         families)
        direct, proxied = await differential.both("GET", "/health", proxied_path="/upstream/tiny/health")
        differential.assertSame(direct, proxied, "health")
        self.assertEqual(proxied.json(), direct.json())


class RouterClientTests(TestCase):
    """
    A client written for llama.cpp's router (model picker, load and unload buttons, progress
    bars), against llama-server in router mode and against swapproxy with the same model.
    """

    timeout = 120
    skip = None if LLAMA_SERVER is not None else HOW_TO_GET_ONE

    async def setup(self) -> Differential:
        assert LLAMA_SERVER is not None
        path = model_file("tiny")
        models_dir = os.path.abspath(self.mktemp())
        os.makedirs(models_dir)
        os.symlink(path, os.path.join(models_dir, "tiny.gguf"))
        document = {
            "healthCheckTimeout": 30,
            "startPort": free_port_range(4),
            "unloadTimeout": 5,
            "models": {
                "tiny": {"cmd": llama_command(LLAMA_SERVER, path)},
                "other": {"cmd": llama_command(LLAMA_SERVER, model_file("tiny", 1))},
            },
        }
        proxy = start_proxy(self, parse_config(yaml.safe_dump(document), "test.yaml"))
        router = LlamaServerProcess(self, LLAMA_SERVER, ["--models-dir", models_dir, *FLAGS])
        differential = Differential(self, router.url, proxy.url)
        await router.ready(differential.client)
        return differential

    def entry(self, answer: Answer, model_id: str) -> dict[str, Any]:
        return next(e for e in answer.json()["data"] if e["id"] == model_id)

    async def wait_for_event(self, readers: list[Any], status: str) -> None:
        def seen() -> bool:
            return all(any(e["model"] == "tiny" and e["data"].get("status") == status and e["event"] == "status_change"
                           for e in reader.answer().events()) for reader in readers)

        await wait_until(seen, timeout=30, what=f"a status_change {status} event on both streams")

    async def wait_for_status(self, differential: Differential, value: str) -> None:
        async def both_there() -> bool:
            direct, proxied = await differential.both("GET", "/models")
            values = {self.entry(answer, "tiny")["status"]["value"] for answer in (direct, proxied)}
            return values == {value}

        await wait_until(both_there, timeout=30, what=f"tiny to be {value} in both")

    def assertSameError(self, direct: Answer, proxied: Answer, what: str) -> None:
        self.assertEqual(proxied.status, direct.status, what)
        self.assertEqual(shape(proxied.json()), shape(direct.json()), what)
        self.assertEqual(proxied.json()["error"]["type"], direct.json()["error"]["type"], what)

    async def test_models_props_load_events_unload(self) -> None:
        differential = await self.setup()
        client_keys = {"id", "aliases", "tags", "object", "owned_by", "created", "status", "architecture", "source",
                       "can_remove"}

        # The picker: the list, and /props saying "router".
        direct, proxied = await differential.both("GET", "/models")
        differential.assertSame(direct, proxied, "GET /models", body_shape=False)
        for answer in (direct, proxied):
            self.assertEqual(answer.json()["object"], "list")
            tiny = self.entry(answer, "tiny")
            self.assertLessEqual(client_keys, set(tiny))
            self.assertEqual(tiny["status"]["value"], "unloaded")
            self.assertEqual(shape(tiny["status"]["args"]), ["string"])
            self.assertEqual(tiny["architecture"], {"input_modalities": ["text"], "output_modalities": ["text"]})
        self.assertEqual({k: shape(v) for k, v in self.entry(proxied, "tiny").items() if k in client_keys},
                         {k: shape(v) for k, v in self.entry(direct, "tiny").items() if k in client_keys
                          if k != "status"} | {"status": {"value": "string", "args": ["string"]}})
        direct, proxied = await differential.both("GET", "/props")
        differential.assertSame(direct, proxied, "GET /props", body_shape=False)
        props_keys = ["role", "max_instances", "models_autoload", "model_alias", "model_path",
                      "default_generation_settings", "build_info"]
        self.assertEqual({k: shape(proxied.json()[k]) for k in props_keys},
                         {k: shape(direct.json()[k]) for k in props_keys})
        self.assertEqual(proxied.json()["role"], "router")

        # The load button, with a progress bar fed by /models/sse.
        direct_events = await differential.events(differential.direct, "/models/sse")
        proxied_events = await differential.events(differential.proxied, "/models/sse")
        self.assertEqual((proxied_events.status, proxied_events.answer().media_type),
                         (direct_events.status, direct_events.answer().media_type))
        direct, proxied = await differential.both("POST", "/models/load", {"model": "tiny"})
        differential.assertSame(direct, proxied, "POST /models/load")
        self.assertEqual(proxied.json(), {"success": True})
        await self.wait_for_status(differential, "loaded")
        await self.wait_for_event([direct_events, proxied_events], "loaded")
        loaded_events = {}
        for name, reader in (("direct", direct_events), ("proxied", proxied_events)):
            events = [e for e in reader.answer().events() if e["model"] == "tiny"]
            kinds = [(e["event"], e["data"]["status"]) for e in events]
            self.assertEqual(kinds[0], ("model_status", "loading"), name)
            self.assertEqual(kinds[-1], ("status_change", "loaded"), name)
            progress = [e["data"]["progress"] for e in events if "progress" in e["data"]]
            self.assertTrue(progress, name)
            self.assertEqual({shape(p) == {"stages": ["string"], "current": "string", "value": "number"}
                              for p in progress}, {True}, name)
            values = [p["value"] for p in progress]
            self.assertEqual(values, sorted(values), name)
            self.assertEqual(values[-1], 1.0, name)
            self.assertEqual(events[-1]["data"]["info"]["id"], "tiny", name)
            loaded_events[name] = events
        self.assertEqual({key for e in loaded_events["proxied"] for key in e}, {"model", "event", "data"})

        # The loaded model's own props, and the errors a client may hit.
        direct, proxied = await differential.both("GET", "/props?model=tiny")
        differential.assertSame(direct, proxied, "GET /props?model=tiny")
        self.assertEqual(proxied.json()["model_alias"], direct.json()["model_alias"])
        direct, proxied = await differential.both("POST", "/models/load", {"model": "tiny"})
        self.assertSameError(direct, proxied, "loading a loaded model")
        self.assertEqual(proxied.json()["error"]["message"], "model is already running")

        # The unload button.
        direct, proxied = await differential.both("POST", "/models/unload", {"model": "tiny"})
        differential.assertSame(direct, proxied, "POST /models/unload")
        await self.wait_for_status(differential, "unloaded")
        await self.wait_for_event([direct_events, proxied_events], "unloaded")
        for name, reader in (("direct", direct_events), ("proxied", proxied_events)):
            last = [e for e in reader.answer().events() if e["model"] == "tiny"][-1]
            self.assertEqual((last["event"], last["data"]), ("status_change", {"status": "unloaded", "exit_code": 0}),
                             name)
        direct, proxied = await differential.both("POST", "/models/unload", {"model": "tiny"})
        self.assertSameError(direct, proxied, "unloading an unloaded model")
        direct, proxied = await differential.both("POST", "/models/load", {"model": "nope"})
        self.assertSameError(direct, proxied, "loading an unknown model")
        self.assertEqual(proxied.status, 404)

    async def test_autoload_through_props(self) -> None:
        """
        ``GET /props?model=`` loads the model and answers with its props, in both.
        """
        differential = await self.setup()
        direct, proxied = await differential.both("GET", "/props?model=tiny")
        differential.assertSame(direct, proxied, "GET /props?model=tiny while unloaded")
        self.assertIn("default_generation_settings", proxied.json())
        await self.wait_for_status(differential, "loaded")
        direct, proxied = await differential.both("GET", "/props?model=nope")
        self.assertEqual((proxied.status, direct.status), (404, 400),
                         "an unknown model: llama-server says 400, swapproxy its usual 404")


def _fake_history_config() -> str:
    return config_yaml({"echo": {"cmd": fake_command("--echo-body", "--load-time", "0.5", "--stage-lines")}},
                       sendLoadingState=True)


def two_turns(url: str) -> tuple[list[Any], Any]:
    """
    A streaming first turn (which loads the model), then a second turn that sends the first
    answer back, reasoning included, as agentic clients do. Runs in a thread.
    """
    client = openai_client(url)
    try:
        question = [{"role": "user", "content": "hi"}]
        chunks = list(client.chat.completions.create(model="echo", messages=question, stream=True))
        reasoning = "".join((c.choices[0].delta.model_extra or {}).get("reasoning_content") or ""
                            for c in chunks if c.choices)
        content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        history = question + [{"role": "assistant", "content": content, "reasoning_content": reasoning},
                              {"role": "user", "content": "and then?"}]
        second = client.chat.completions.create(model="echo", messages=history)
        return chunks, second
    finally:
        client.close()


class LoadingTextHistoryTests(TestCase):
    """
    The loading text swapproxy wrote never reaches a model, even when a client sends it back.
    """

    timeout = 60

    async def test_two_turn_conversation(self) -> None:
        proxy = start_proxy(self, parse_config(_fake_history_config(), "test.yaml"))
        chunks, second = await deferToThread(two_turns, proxy.url)
        loading = [c for c in chunks if loading_status(c) is not None]
        self.assertTrue(loading, "the first turn loaded the model with the loading stream")
        reasoning = "".join((c.choices[0].delta.model_extra or {}).get("reasoning_content") or "" for c in loading)
        self.assertIn("Starting echo", visible(reasoning))
        self.assertTrue(reasoning.startswith(LOADING_TEXT_START) and reasoning.endswith(LOADING_TEXT_END))

        received = second.choices[0].message.content  # the body the model got, as the fake echoes it
        for fragment in (LOADING_TEXT_START, LOADING_TEXT_END, "Starting echo", "is ready (waited"):
            self.assertNotIn(fragment, received)
        sent = json.loads(received)
        first_answer = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        self.assertEqual(sent["messages"][1], {"role": "assistant", "content": first_answer})
        self.assertEqual(sent["messages"][2], {"role": "user", "content": "and then?"})


"""
Tests for `swapproxy.web.listing`: the /v1/models records of capabilities, aliases, selectors and
profile pins, shaped as llama-swap head shapes them.
"""

from __future__ import annotations

import textwrap

from twisted.trial.unittest import SynchronousTestCase, TestCase

from swapproxy.config import Capabilities, parse_config
from swapproxy.web.listing import capability_fields
from tests.support.live import start_proxy


class CapabilityTests(SynchronousTestCase):
    def test_full(self) -> None:
        fields = capability_fields(Capabilities(("text", "audio", "image"), ("text", "audio", "image"), True, True, 32000))
        self.assertEqual(fields, {
            "architecture": {"input_modalities": ["text", "audio", "image"],
                             "output_modalities": ["text", "audio", "image"],
                             "modality": "text+audio+image->text+audio+image"},
            "capabilities": {"vision": True, "audio_transcriptions": True, "audio_speech": True,
                             "image_generation": True, "image_to_image": True, "function_calling": True,
                             "reranker": True},
            "supported_parameters": ["tools", "tool_choice"],
            "context_length": 32000,
        })

    def test_partial(self) -> None:
        self.assertEqual(capability_fields(Capabilities(inputs=("image",))),
                         {"architecture": {"input_modalities": ["image"]}, "capabilities": {"vision": True}})
        self.assertEqual(capability_fields(Capabilities(context=4096)), {"context_length": 4096})
        self.assertEqual(capability_fields(Capabilities()), {})


CONFIG = """
    includeAliasesInList: true
    models:
      a:
        cmd: "a ${PORT}"
        name: Model A
        aliases: [alpha]
        filters: {setParamsByID: {"a:hot": {temperature: 1.5}}}
        metadata: {context_length: 1, note: kept}
        capabilities: {in: [text], out: [text], tools: true, context: 8192}
      b: {cmd: "b ${PORT}", unlisted: true, aliases: [beta]}
    selectors:
      sel: {strategy: warm, targets: [a, b], name: Selector, metadata: {purpose: x}}
      hidden: {strategy: pin, targets: [b], unlisted: true}
    profiles:
      prof: {pins: {newname: a, a: b}}
"""


class ModelListTests(TestCase):
    timeout = 30

    async def test_records(self) -> None:
        proxy = start_proxy(self, parse_config(textwrap.dedent(CONFIG), "test.yaml", {}))
        records = {r["id"]: r for r in (await proxy.get_json("/v1/models"))["data"]}
        self.assertEqual(sorted(records), ["a", "a:hot", "alpha", "sel"])
        a = records["a"]
        self.assertEqual(a["meta"], {"llamaswap": {"note": "kept"}, "n_ctx": 8192})
        self.assertEqual(a["context_length"], 8192)
        self.assertEqual(a["supported_parameters"], ["tools", "tool_choice"])
        self.assertEqual(a["architecture"]["modality"], "text->text")
        alpha = records["alpha"]
        self.assertEqual(alpha["meta"]["llamaswap"], {"note": "kept", "type": "alias", "modelID": "a"})
        self.assertEqual((alpha["name"], alpha["context_length"], alpha["state"]), ("Model A", 8192, "stopped"))
        sel = records["sel"]
        self.assertEqual(sel["meta"]["llamaswap"],
                         {"purpose": "x", "type": "selector", "strategy": "warm", "targets": ["a", "b"]})
        self.assertEqual((sel["name"], sel["state"]), ("Selector", "stopped"))

        response = await proxy.client.put(proxy.url + "/api/profiles/active", data=b'{"name": "prof"}')
        self.assertEqual(response.code, 200)
        records = {r["id"]: r for r in (await proxy.get_json("/v1/models"))["data"]}
        # A pin that shadows a listed name adds no record of its own.
        self.assertEqual(sorted(records), ["a", "a:hot", "alpha", "newname", "sel"])
        self.assertEqual(records["newname"]["meta"]["llamaswap"], {"type": "profile", "target": "a"})

"""
Tests for `swapproxy.targets` (profiles and selectors choosing a model) and the profile API
(`swapproxy.web.profiles`).
"""

from __future__ import annotations

import json
import textwrap
from typing import Any

from twisted.trial.unittest import SynchronousTestCase, TestCase

from swapproxy.config import Config, parse_config
from swapproxy.targets import NoTarget, Targets
from swapproxy.testing.local import fake_command, free_port_range
from swapproxy.upstream import State
from tests.support.live import start_proxy

CONFIG = """
    models:
      a: {cmd: "a ${PORT}", aliases: [alpha]}
      b: {cmd: "b ${PORT}"}
      c: {cmd: "c ${PORT}"}
    groups:
      together: {swap: false, members: [a, b]}
    peers:
      p: {proxy: "http://127.0.0.1:9", models: [m]}
    selectors:
      pinned: {strategy: pin, targets: [b, a]}
      warm: {strategy: warm, targets: [a, b, c]}
      spill: {strategy: spillover, targets: [alpha, b, p/m], settings: {spillover: 2}}
    profiles:
      work: {pins: {chat: warm, a: c, gone: ""}}
      play: {pins: {chat: p/m}}
"""


class TargetsTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.config: Config = parse_config(textwrap.dedent(CONFIG), "config.yaml", {})
        self.states: dict[str, State] = {}
        self.targets = Targets(lambda: self.config, self.states.get)

    def find(self, name: str, **kwargs: Any) -> tuple[str, str]:
        target = self.targets.find(name, **kwargs)
        return target.name, target.model.id if target.model is not None else target.peer.fqn

    def test_plain_names(self) -> None:
        self.assertEqual(self.find("alpha"), ("alpha", "a"))
        self.assertEqual(self.find("m"), ("m", "p/m"))
        self.assertEqual(self.find("p/m"), ("p/m", "p/m"))
        with self.assertRaises(NoTarget) as caught:
            self.targets.find("zz")
        self.assertEqual(caught.exception.status, 404)

    def test_pin(self) -> None:
        self.states["a"] = State.READY
        self.assertEqual(self.find("pinned"), ("b", "b"))

    def test_warm(self) -> None:
        """
        The first ready target, else the first starting one, else the first.
        """
        self.assertEqual(self.find("warm"), ("a", "a"))
        self.states.update(b=State.STARTING, c=State.STARTING)
        self.assertEqual(self.find("warm"), ("b", "b"))
        self.states["c"] = State.READY
        self.assertEqual(self.find("warm"), ("c", "c"))

    def test_selectors_not_on_upstream_paths(self) -> None:
        self.assertRaises(NoTarget, self.targets.find, "warm", selectors=False)

    def test_spillover(self) -> None:
        """
        The first target takes ``spillover`` requests in flight, then the next one starts; the
        least busy active target gets the next request; releasing makes room again; a stopping
        target is skipped.
        """
        taken = [self.targets.find("spill") for _ in range(2)]
        self.assertEqual([t.name for t in taken], ["alpha", "alpha"])
        self.states["a"] = State.STARTING
        taken += [self.targets.find("spill") for _ in range(3)]
        # a full, so b; then b is the least busy; then both full, so the (cold) peer.
        self.assertEqual([t.name for t in taken[2:]], ["b", "b", "p/m"])
        taken[0].release()
        taken[0].release()  # once only
        self.assertEqual(self.targets.spillover.count("spill", "a"), 1)
        self.assertEqual(self.targets.find("spill").name, "alpha")
        self.states["b"] = State.STOPPING
        for t in taken:
            t.release()
        self.assertEqual([self.targets.find("spill").name for _ in range(2)], ["alpha", "p/m"])

    def test_spillover_skips_a_hung_target(self) -> None:
        """
        A target found hung (``unhealthy``, being killed) is skipped like a stopping one: a
        request sent to it would wait for the kill and a new start.
        """
        self.states.update(a=State.READY, b=State.UNHEALTHY)
        taken = [self.targets.find("spill") for _ in range(3)]
        self.assertEqual([t.name for t in taken], ["alpha", "alpha", "p/m"])

    def test_profile(self) -> None:
        profile = self.targets.profile
        self.assertEqual(self.find("a"), ("a", "a"))
        profile.activate("work")
        self.assertEqual(self.find("a"), ("c", "c"))
        self.assertEqual(self.find("chat"), ("a", "a"))  # the pin targets the warm selector
        with self.assertRaises(NoTarget) as caught:
            self.targets.find("gone")
        self.assertEqual(str(caught.exception), "model 'gone' is not available while profile 'work' is active")
        profile.activate("play")
        self.assertEqual(self.find("chat"), ("p/m", "p/m"))
        profile.activate(None)
        self.assertRaises(NoTarget, self.targets.find, "chat")
        self.assertRaises(KeyError, profile.activate, "nope")

    def test_reload_deactivates_the_profile(self) -> None:
        seen: list[str | None] = []
        self.targets.profile.observers.append(seen.append)
        self.targets.profile.activate("work")
        self.config = parse_config(textwrap.dedent(CONFIG), "config.yaml", {})
        self.assertIsNone(self.targets.profile.name)
        self.assertEqual(self.find("a"), ("a", "a"))
        self.assertEqual(seen, ["work"])


class ProfileApiTests(TestCase):
    timeout = 30

    async def test_switching(self) -> None:
        """
        GET /api/profiles lists them; PUT /api/profiles/active switches, and requests follow.
        """
        text = textwrap.dedent(CONFIG).replace('"a ${PORT}"', json.dumps(fake_command("--respond", "from a")))
        text = text.replace('"c ${PORT}"', json.dumps(fake_command("--respond", "from c")))
        # Ports of their own: the default startPort may be another program's.
        proxy = start_proxy(self, parse_config(f"startPort: {free_port_range(4)}\n" + text, "test.yaml", {}))
        listing = await proxy.get_json("/api/profiles")
        self.assertEqual(listing["active"], None)
        self.assertEqual([p["id"] for p in listing["profiles"]], ["play", "work"])
        self.assertEqual(listing["profiles"][1]["pins"], {"chat": "warm", "a": "c", "gone": None})

        async def put(body: bytes) -> tuple[int, Any]:
            response = await proxy.client.put(proxy.url + "/api/profiles/active", data=body)
            return response.code, json.loads(await response.content())

        self.assertEqual(await put(b'{"name": "work"}'), (200, {"active": "work"}))
        code, answer = await proxy.chat("a")
        self.assertIn("choices", answer, answer)
        self.assertEqual(answer["choices"][0]["message"]["content"].split()[:2], ["from", "c"])
        ids = {r["id"]: r for r in (await proxy.get_json("/v1/models"))["data"]}
        self.assertNotIn("gone", ids)
        code, answer = await proxy.chat("gone")
        self.assertEqual(code, 404)
        self.assertEqual(await put(b'{"name": null}'), (200, {"active": None}))
        code, answer = await proxy.chat("a")
        self.assertEqual(answer["choices"][0]["message"]["content"].split()[:2], ["from", "a"])
        self.assertEqual((await put(b'{"name": "nope"}'))[0], 404)
        self.assertEqual((await put(b'{"nome": 1}'))[0], 400)
        self.assertEqual((await put(b'{"name": 3}'))[0], 400)
        self.assertEqual((await put(b"{"))[0], 400)

    async def test_selector_requests(self) -> None:
        """
        A request for a selector reaches the target it chose, under the target's name.
        """
        text = textwrap.dedent(CONFIG).replace('"a ${PORT}"', json.dumps(fake_command("--respond", "from a")))
        text = text.replace('"b ${PORT}"', json.dumps(fake_command("--respond", "from b")))
        # Ports of their own: the default startPort may be another program's.
        proxy = start_proxy(self, parse_config(f"startPort: {free_port_range(4)}\n" + text, "test.yaml", {}))
        code, answer = await proxy.chat("pinned")
        self.assertEqual((code, answer.get("model")), (200, "b"), answer)
        self.assertEqual(answer["choices"][0]["message"]["content"].split()[:2], ["from", "b"])
        # warm: b is the one ready now.
        code, answer = await proxy.chat("warm")
        self.assertEqual(answer["model"], "b")
        # spillover: a running target with room comes before one that would have to start.
        code, answer = await proxy.chat("spill")
        self.assertEqual((code, answer["model"]), (200, "b"))

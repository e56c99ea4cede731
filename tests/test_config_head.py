"""
Tests for the llama-swap head keys of the configuration: peers, selectors, profiles, timeouts,
capabilities, compat, includeAliasesInList, upstream.ignorePaths, and a whole llama-swap head
style config that loads without a warning.
"""

from __future__ import annotations

import os
import textwrap
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from swapproxy.config import (
    PEER_TIMEOUTS,
    Capabilities,
    ConfigError,
    Timeouts,
    load_config,
    parse_config,
)

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "llama_swap_head.yaml")
FIXTURE_ENV = {"HOME": "/home/user", "OPENROUTER_KEY": "sk-or-1", "API_KEY_1": "sk-1", "API_KEY_2": "sk-2"}


def parse(text: str) -> Any:
    return parse_config(textwrap.dedent(text), "config.yaml", {})


def assert_errors(test: SynchronousTestCase, cases: dict[str, str], prefix: str = "") -> None:
    """
    Each config text (after ``prefix``) fails to load with exactly its message.
    """
    for text, message in cases.items():
        with test.assertRaises(ConfigError, msg=text) as caught:
            parse(prefix + text)
        test.assertEqual(str(caught.exception), message)


class HeadExampleTests(SynchronousTestCase):
    """
    A config with every key of llama-swap head's config.example.yaml.
    """

    def setUp(self) -> None:
        self.config = load_config(FIXTURE, FIXTURE_ENV)

    def test_no_warning(self) -> None:
        """
        It loads with no warning at all; the keys swapproxy has no use for are named in one
        notice.
        """
        self.assertEqual(self.config.warnings, ())
        self.assertEqual(len(self.config.notices), 1)
        for key in ("captureBuffer", "performance", "ui"):
            self.assertIn(key, self.config.notices[0])
        # The dashboard's activity history takes store.path.
        self.assertNotIn("store", self.config.notices[0])
        self.assertTrue(self.config.store_path)

    def test_every_key_took_effect(self) -> None:
        """
        Each of the newer keys is in the loaded config, not just tolerated.
        """
        c = self.config
        big = c.models["big-model"]
        self.assertEqual(big.timeouts, Timeouts(10, 15, 120, 5, 2, 60))
        self.assertEqual(big.capabilities, Capabilities(("text", "image"), ("text",), True, False, 32768))
        self.assertTrue(big.ignore_websockets)
        self.assertTrue(c.include_aliases_in_list)
        self.assertEqual([p.pattern for p in c.upstream_ignore_paths],
                         [r".*\.(js|css|png|svg|ico)$", r"^\/socket$|^\/api\/queue$"])
        self.assertEqual(c.profiles["writing"].pins, {"llm-draft": "big-model", "llm-review": "coder", "image-gen": ""})
        self.assertEqual({s.id: s.strategy for s in c.selectors.values()},
                         {"any-coder": "warm", "llm-review": "pin", "small": "spillover"})
        self.assertEqual(c.selectors["small"].spillover, 3)
        cloud = c.peers["cloud"]
        self.assertEqual(cloud.api_key, "sk-or-1")
        self.assertEqual(cloud.timeouts.response_header, 90)
        self.assertEqual(cloud.strip_params, ("top_k",))
        self.assertEqual(cloud.set_params, {"provider": {"data_collection": "deny"}})
        self.assertEqual(c.peers["lan-box"].timeouts, PEER_TIMEOUTS)
        self.assertEqual(c.groups["smalls"].members, ("container-model", "small-a", "small-b"))
        # The preloaded selector preloads its first local target.
        self.assertEqual(c.preload, ("container-model",))


class PeerConfigTests(SynchronousTestCase):
    def test_names(self) -> None:
        """
        ``peer/model`` always routes to the peer; a bare id routes to the one peer that serves it,
        unless a local model or alias has the name or two peers serve it.
        """
        config = parse("""
            models:
              a: {cmd: "a ${PORT}", aliases: [shared-alias]}
            peers:
              p1: {proxy: "http://10.0.0.1", models: [a, only1, twice, shared-alias, org/m]}
              p2: {proxy: "http://10.0.0.2:8080/base", models: [twice]}
        """)
        routes = {name: (t.peer.id, t.model) for name, t in config.peer_routes.items()}
        self.assertEqual(routes, {
            "p1/a": ("p1", "a"), "p1/only1": ("p1", "only1"), "p1/twice": ("p1", "twice"),
            "p1/shared-alias": ("p1", "shared-alias"), "p1/org/m": ("p1", "org/m"),
            "p2/twice": ("p2", "twice"), "only1": ("p1", "only1"), "org/m": ("p1", "org/m"),
        })
        self.assertIsNone(config.resolve_peer("a"))
        self.assertEqual(config.resolve("a").id, "a")

    def test_defaults(self) -> None:
        config = parse("""
            peers:
              p: {proxy: "http://h:1", models: [m, n]}
        """)
        peer = config.peers["p"]
        self.assertEqual((peer.api_key, peer.models, peer.timeouts), ("", ("m", "n"), PEER_TIMEOUTS))
        self.assertEqual(PEER_TIMEOUTS.response_header, 60)
        self.assertEqual(Timeouts().response_header, 0)

    def test_macros_and_env(self) -> None:
        config = parse_config(textwrap.dedent("""
            macros: {host: "10.1.1.1"}
            peers:
              p: {proxy: "http://${host}:9", apiKey: "${env.KEY}", models: [m]}
        """), "config.yaml", {"KEY": "sk-x"})
        self.assertEqual((config.peers["p"].proxy, config.peers["p"].api_key), ("http://10.1.1.1:9", "sk-x"))

    def test_errors(self) -> None:
        """
        Each mistake is one line naming the key.
        """
        cases = {
            'peers: {p: {models: [m]}}':
                "config.yaml: peers.p.proxy: missing: every peer needs the base URL of its server",
            'peers: {p: {proxy: "ftp://h", models: [m]}}':
                'config.yaml: peers.p.proxy: must be an http:// or https:// URL with a host, got "ftp://h"',
            'peers: {p: {proxy: "http://h"}}':
                "config.yaml: peers.p.models: missing: list the model ids this peer serves",
            'peers: {p: {proxy: "http://h", models: [m], timeouts: {connect: -1}}}':
                "config.yaml: peers.p.timeouts.connect: must be a number of seconds >= 0, got -1",
            'peers: {p: {proxy: "http://h", models: [m], apiKey: "a b"}}':
                "config.yaml: peers.p.apiKey: must not contain whitespace",
            'peers: {a/b: {proxy: "http://h", models: [c]}, a: {proxy: "http://i", models: [b/c]}}':
                "config.yaml: peers.a/b: a peer id must not contain '/': its models are named <peer>/<model>",
            'peers: {p: {proxy: "http://h", models: [m, n, m]}}':
                'config.yaml: peers.p.models[2]: "m" is listed twice',
            'peers: {p: {proxy: "http://user:secret@h:8080", models: [m]}}':
                "config.yaml: peers.p.proxy: must not contain a user name or password: set the peer's apiKey",
            'peers: {p: {proxy: "http://h@h2/", models: [m]}}':
                "config.yaml: peers.p.proxy: must not contain a user name or password: set the peer's apiKey",
            'peers: {p: {proxy: "http://h/v1?key=x", models: [m]}}':
                'config.yaml: peers.p.proxy: must not have a query or fragment (each request\'s path is appended'
                ' to it), got "http://h/v1?key=x"',
            'peers: {p: {proxy: "http://h/#top", models: [m]}}':
                'config.yaml: peers.p.proxy: must not have a query or fragment (each request\'s path is appended'
                ' to it), got "http://h/#top"',
            'peers: {p: {proxy: "http://h/?", models: [m]}}':
                'config.yaml: peers.p.proxy: must not have a query or fragment (each request\'s path is appended'
                ' to it), got "http://h/?"',
            'models: {p/m: {cmd: "x ${PORT}"}}\npeers: {p: {proxy: "http://h", models: [m]}}':
                "config.yaml: peers.p.models: peer model name 'p/m' is also a local model id",
        }
        assert_errors(self, cases)


class SelectorConfigTests(SynchronousTestCase):
    BASE = """
        models:
          a: {cmd: "a ${PORT}", aliases: [alpha]}
          b: {cmd: "b ${PORT}"}
          c: {cmd: "c ${PORT}"}
        groups:
          together: {swap: false, members: [a, b]}
        peers:
          p: {proxy: "http://h", models: [m]}
    """

    def test_targets(self) -> None:
        config = parse(self.BASE + """
        selectors:
          s1: {strategy: spillover, targets: [alpha, b, p/m], settings: {spillover: 2}, unlisted: true}
          s2: {strategy: pin, targets: [m]}
        """)
        self.assertEqual(config.selectors["s1"].targets, ("alpha", "b", "p/m"))
        self.assertEqual((config.selectors["s1"].spillover, config.selectors["s1"].unlisted), (2, True))
        self.assertEqual(config.selectors["s2"].spillover, 1)

    def test_errors(self) -> None:
        cases = {
            "s: {targets: [a]}": "config.yaml: selectors.s.strategy: missing: use pin, warm, spillover",
            "s: {strategy: best, targets: [a]}":
                'config.yaml: selectors.s.strategy: must be one of pin, warm, spillover, got "best"',
            "s: {strategy: pin}": "config.yaml: selectors.s.targets: missing: list at least one model",
            "s: {strategy: pin, targets: [zz]}": "config.yaml: selectors.s.targets[0]: unknown model 'zz'",
            "s: {strategy: warm, targets: [a, m]}":
                "config.yaml: selectors.s.targets[1]: 'm' is a peer model; warm selectors need local models",
            "s: {strategy: pin, targets: [t]}\n          t: {strategy: pin, targets: [a]}":
                "config.yaml: selectors.s.targets[0]: 't' is a selector; a selector cannot target another",
            "a: {strategy: pin, targets: [b]}": "config.yaml: selectors.a: 'a' is also a model id",
            "alpha: {strategy: pin, targets: [b]}": "config.yaml: selectors.alpha: 'alpha' is also an alias of model 'a'",
            "s: {strategy: spillover, targets: [a, alpha]}": "config.yaml: selectors.s.targets[1]: 'alpha' is model 'a' again",
            "s: {strategy: spillover, targets: [a, c]}":
                "config.yaml: selectors.s.targets: spillover targets that are local models must run together:"
                " put them in one group with swap: false",
            "s: {strategy: spillover, targets: [a], settings: {spillover: 0}}":
                "config.yaml: selectors.s.settings.spillover: must be an integer >= 1, got 0",
        }
        assert_errors(self, cases, self.BASE + "\n        selectors:\n          ")


class ProfileConfigTests(SynchronousTestCase):
    BASE = """
        models:
          a: {cmd: "a ${PORT}"}
        peers:
          p: {proxy: "http://h", models: [m]}
        selectors:
          s: {strategy: pin, targets: [a]}
    """

    def test_pins(self) -> None:
        config = parse(self.BASE + """
        profiles:
          one: {description: " first ", pins: {x: a, y: p/m, z: s, "off": ~, off2: ""}}
        """)
        profile = config.profiles["one"]
        self.assertEqual((profile.description, profile.pins),
                         ("first", {"x": "a", "y": "p/m", "z": "s", "off": "", "off2": ""}))

    def test_errors(self) -> None:
        cases = {
            "one: {pins: {x: nope}}":
                "config.yaml: profiles.one.pins.x: unknown model 'nope' (use \"\" or ~ to make 'x' unavailable)",
            "one: {description: d}": "config.yaml: profiles.one.pins: missing: pin at least one name to a model",
            "one: {pins: {p/m: a}}":
                "config.yaml: profiles.one.pins.p/m: 'p/m' is the name of a peer model; it cannot be pinned",
        }
        assert_errors(self, cases, self.BASE + "\n        profiles:\n          ")


class ModelKeysTests(SynchronousTestCase):
    def test_defaults(self) -> None:
        config = parse('models: {a: {cmd: "a ${PORT}"}}')
        model = config.models["a"]
        self.assertEqual((model.timeouts, model.capabilities, model.ignore_websockets),
                         (Timeouts(30, 30, 0, 10, 1, 90), Capabilities(), False))
        self.assertFalse(config.include_aliases_in_list)
        self.assertEqual([p.pattern for p in config.upstream_ignore_paths],
                         [r".*\.(js|json|css|png|gif|jpg|jpeg|ico|txt)$"])

    def test_errors(self) -> None:
        cases = {
            'models: {a: {cmd: "a ${PORT}", capabilities: {in: [video]}}}':
                'config.yaml: models.a.capabilities.in[0]: unknown modality "video"; use text, audio, image',
            'models: {a: {cmd: "a ${PORT}", capabilities: {context: -1}}}':
                "config.yaml: models.a.capabilities.context: must be an integer >= 0, got -1",
            'models: {a: {cmd: "a ${PORT}", compat: {ignoreWebsockets: 1}}}':
                "config.yaml: models.a.compat.ignoreWebsockets: must be true or false, got 1",
            'models: {a: {cmd: "a ${PORT}", timeouts: {responseHeader: "1m"}}}':
                'config.yaml: models.a.timeouts.responseHeader: must be a number of seconds >= 0, got "1m"',
            'upstream: {ignorePaths: ["(unclosed"]}':
                "config.yaml: upstream.ignorePaths[0]: not a regular expression: missing ), unterminated"
                " subpattern at position 0",
            "includeAliasesInList: yes please":
                'config.yaml: includeAliasesInList: must be true or false, got "yes please"',
        }
        assert_errors(self, cases)

    def test_preload_of_a_peer_model_warns(self) -> None:
        config = parse("""
            models: {a: {cmd: "a ${PORT}"}}
            peers: {p: {proxy: "http://h", models: [m]}}
            hooks: {on_startup: {preload: [p/m, a]}}
        """)
        self.assertEqual(config.preload, ("a",))
        self.assertEqual(config.warnings, (
            "config.yaml: hooks.on_startup.preload: 'p/m' is a peer model; only local models are preloaded",))

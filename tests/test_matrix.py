"""
Tests for `swapproxy.matrix` (llama-swap's swap matrix) and for the ``routing``, ``matrix`` and
``routing.scheduler`` configuration keys.
"""

from __future__ import annotations

import json
import textwrap
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from swapproxy.config import DEFAULT_GROUP, ConfigError, parse_config
from swapproxy.matrix import Matrix, MatrixError

MODELS = ("gemma", "qwen", "mistral", "voxtral", "llama70B", "reranker", "a", "b", "c", "target")


def compile_sets(*sets: tuple[str, str], costs: dict[str, int] | None = None,
                 names: dict[str, str] | None = None) -> Matrix:
    names = names or {}
    return Matrix(list(sets), lambda n: names.get(n) or (n if n in MODELS else None), costs)


class SolveTests(SynchronousTestCase):
    """
    Which running models a request evicts.
    """

    def test_running_target_evicts_nothing(self) -> None:
        matrix = compile_sets(("solo", "a"), ("other", "b"))
        self.assertEqual(matrix.solve("a", ["a", "b"]).evict, ())

    def test_model_joins_a_set_with_what_runs(self) -> None:
        """
        A model that may run with the running one is started beside it; one that may not evicts it.
        """
        matrix = compile_sets(("standard", "(gemma | qwen | mistral) & voxtral"), ("full", "llama70B"),
                              costs={"llama70B": 30, "voxtral": 50})
        decision = matrix.solve("gemma", ["voxtral"])
        self.assertEqual((decision.evict, decision.set_name, decision.members),
                         ((), "standard", ("gemma", "voxtral")))
        decision = matrix.solve("llama70B", ["voxtral"])
        self.assertEqual((decision.evict, decision.set_name, decision.cost), (("voxtral",), "full", 50))

    def test_alternatives_swap_among_themselves(self) -> None:
        matrix = compile_sets(("standard", "(gemma | qwen) & voxtral"))
        self.assertEqual(matrix.solve("qwen", ["gemma", "voxtral"]).evict, ("gemma",))

    def test_cheapest_set_wins(self) -> None:
        """
        The combination that leaves out the cheapest running models wins, whatever the order.
        """
        matrix = compile_sets(("a_with_c", "a & c"), ("a_with_b", "a & b"), costs={"b": 10})
        decision = matrix.solve("a", ["b", "c"])
        self.assertEqual((decision.set_name, decision.evict, decision.cost), ("a_with_b", ("c",), 1))

    def test_ties_go_to_the_set_defined_first(self) -> None:
        matrix = compile_sets(("first", "a & b"), ("second", "a & c"))
        self.assertEqual(matrix.solve("a", []).set_name, "first")
        self.assertEqual(matrix.solve("a", ["b", "c"]).set_name, "first")

    def test_referenced_set_counts_as_defined_before(self) -> None:
        """
        A set that another one references is considered first (llama-swap orders sets after
        the sets they reference).
        """
        matrix = compile_sets(("big", "a & +small"), ("small", "a | b"))
        self.assertEqual(matrix.order, ["small", "big"])
        self.assertEqual(matrix.solve("a", []).set_name, "small")

    def test_references_inline_other_sets(self) -> None:
        matrix = compile_sets(("llms", "gemma | qwen | mistral"), ("with_tts", "+llms & voxtral"),
                              ("mega", "+with_tts & reranker"))
        decision = matrix.solve("reranker", ["gemma", "voxtral"])
        self.assertEqual((decision.set_name, decision.evict, decision.members),
                         ("mega", (), ("gemma", "reranker", "voxtral")))

    def test_model_in_no_set_runs_alone(self) -> None:
        matrix = compile_sets(("known", "a & b"))
        decision = matrix.solve("c", ["a", "b"])
        self.assertEqual((decision.evict, decision.members, decision.set_name), (("a", "b"), ("c",), ""))
        self.assertEqual(matrix.solve("a", ["c"]).evict, ("c",))

    def test_precedence_and_duplicates(self) -> None:
        """
        ``&`` binds tighter than ``|``; a model named twice is one model.
        """
        matrix = compile_sets(("s", "a | b & c"), ("t", "a & a"))
        self.assertEqual(matrix.solve("b", ["a", "c"]).evict, ("a",))
        self.assertEqual(matrix.solve("a", ["b", "c"]).evict, ("b", "c"))

    def test_a_larger_combination_keeps_more(self) -> None:
        matrix = compile_sets(("preferred", "target & (a | (a & b))"))
        self.assertEqual(matrix.solve("target", ["a", "b"]).evict, ())

    def test_large_products_are_not_expanded(self) -> None:
        """
        Ten alternatives in each of six places (a million combinations) solve at once.
        """
        models = [f"m{d}-{c}" for d in range(6) for c in range(10)]
        expression = "target & " + " & ".join("(" + " | ".join(f"m{d}-{c}" for c in range(10)) + ")" for d in range(6))
        matrix = Matrix([("large", expression)], lambda n: n if n in models or n in ("target", "outside") else None)
        running = [f"m{d}-9" for d in range(6)] + ["outside"]
        decision = matrix.solve("target", running)
        self.assertEqual((decision.evict, len(decision.members)), (("outside",), 7))

    def test_vars_name_models(self) -> None:
        matrix = compile_sets(("combo", "g & v"), names={"g": "gemma", "v": "voxtral"})
        self.assertEqual(matrix.solve("gemma", ["voxtral"]).evict, ())


class ExpressionErrorTests(SynchronousTestCase):
    """
    Bad expressions name the problem and its position.
    """

    def error(self, *sets: tuple[str, str]) -> MatrixError:
        return self.assertRaises(MatrixError, compile_sets, *sets)

    def test_positions(self) -> None:
        cases = {
            "a & )": "expected a model, +set or '(' at position 5, found ')' in 'a & )'",
            "(a | b": "'(' at position 1 is never closed in '(a | b'",
            "a b": "unexpected 'b' at position 3 in 'a b'",
            "a @ b": "unexpected character '@' at position 3 in 'a @ b'",
            "a &": "expected a model, +set or '(' at position 4, found the end of the expression in 'a &'",
            "a & +": "'+' at position 5 must be followed by a set name in 'a & +'",
            "()": "expected a model, +set or '(' at position 2, found ')' in '()'",
            "a & nope": "unknown var or model 'nope' at position 5 in 'a & nope'",
            "a | +nope": "+nope at position 5: there is no set named 'nope' in 'a | +nope'",
        }
        for expression, message in cases.items():
            error = self.error(("s", expression))
            self.assertEqual((str(error), error.set_name), (message, "s"))

    def test_empty(self) -> None:
        self.assertIn("empty", str(self.error(("s", "  "))))

    def test_loop(self) -> None:
        error = self.error(("a", "+b"), ("b", "+c"), ("c", "+a | a"))
        self.assertEqual(str(error), "sets reference each other in a loop: a -> b -> c -> a")


def parse(text: str) -> Any:
    """
    A config of `MODELS_YAML` and ``text`` (indented as you like).
    """
    return parse_config(MODELS_YAML + textwrap.dedent(text), "config.yaml", {})


MODELS_YAML = """
models:
  gemma: {cmd: "g ${PORT}", aliases: [g-alias]}
  qwen: {cmd: "q ${PORT}"}
  voxtral: {cmd: "v ${PORT}"}
"""


class MatrixConfigTests(SynchronousTestCase):
    """
    ``matrix`` at the top level and under ``routing.router``.
    """

    def test_top_level_matrix(self) -> None:
        config = parse("""
            matrix:
              vars: {g: gemma, q: qwen}
              evict_costs: {voxtral: 50}
              sets:
                standard: "(g | q) & voxtral"
        """)
        self.assertIsNotNone(config.matrix)
        self.assertEqual(config.matrix.solve("qwen", ["gemma", "voxtral"]).evict, ("gemma",))
        self.assertEqual(config.matrix.evict_costs, {"voxtral": 50})
        self.assertEqual(list(config.groups), [DEFAULT_GROUP])
        self.assertEqual(config.warnings, ())

    def test_routing_router_matrix(self) -> None:
        config = parse("""
            routing:
              router:
                use: matrix
                settings:
                  matrix: {sets: {pair: "gemma & voxtral"}}
                  groups: {g: {members: [qwen]}}
        """)
        self.assertEqual(config.matrix.solve("gemma", ["voxtral"]).evict, ())
        # Both may be set, as in llama-swap's own example, to switch with `use`: no warning.
        self.assertEqual(config.warnings, ())

    def test_routing_router_groups(self) -> None:
        config = parse("""
            routing:
              router:
                settings:
                  groups: {pair: {swap: false, members: [gemma, qwen]}}
        """)
        self.assertIsNone(config.matrix)
        self.assertEqual(config.groups["pair"].members, ("gemma", "qwen"))

    def assertConfigError(self, text: str, message: str) -> None:
        error = self.assertRaises(ConfigError, parse, text)
        self.assertEqual(str(error), message)

    def test_unused_router_settings_are_not_an_error(self) -> None:
        """
        The router settings that ``use`` does not pick are not used, as in llama-swap, which
        starts with a mistake in them: here the config starts too, and a warning names the
        mistake, so that switching ``use`` later holds no surprise.
        """
        config = parse("""
            routing:
              router:
                use: group
                settings:
                  matrix: {sets: {pair: "gemma & nobody"}}
        """)
        self.assertIsNone(config.matrix)
        warning, = [w for w in config.warnings if "routing.router.settings.matrix.sets.pair" in w]
        self.assertIn("nobody", warning)
        self.assertIn("not used while routing.router.use is group", warning)

    def test_errors(self) -> None:
        self.assertConfigError(
            """
            matrix: {sets: {big: "gemma & (qwen | voxtral))"}}
            """,
            "config.yaml: matrix.sets.big: unexpected ')' at position 25 in 'gemma & (qwen | voxtral))'")
        self.assertConfigError(
            """
            routing: {router: {use: matrix, settings: {matrix: {sets: {s: "gemma & +t"}}}}}
            """,
            "config.yaml: routing.router.settings.matrix.sets.s: +t at position 9: there is no set"
            " named 't' in 'gemma & +t'")
        self.assertConfigError(
            """
            matrix: {sets: {s: gemma}}
            groups: {g: {members: [qwen]}}
            """, "config.yaml: matrix: cannot be used together with groups: use one or the other")
        self.assertConfigError(
            """
            groups: {g: {members: [qwen]}}
            routing: {router: {use: group}}
            """, "config.yaml: groups: cannot be used together with routing.router; move it to"
                 " routing.router.settings.groups")
        self.assertConfigError(
            """
            routing: {router: {use: matrix}}
            """, "config.yaml: routing.router.use: is matrix, but routing.router.settings.matrix is not set")
        self.assertConfigError(
            """
            routing: {router: {use: mesh}}
            """, 'config.yaml: routing.router.use: must be one of group, matrix, got "mesh"')
        self.assertConfigError(
            """
            matrix: {sets: {}}
            """, "config.yaml: matrix.sets: define at least one set, such as main: 'a & b'")
        self.assertConfigError(
            """
            matrix: {vars: {g_1: gemma}, sets: {s: gemma}}
            """, "config.yaml: matrix.vars.g_1: var names must be 1 to 32 letters, digits, '-' or '.'")
        self.assertConfigError(
            """
            matrix: {vars: {g: g-alias}, sets: {s: g}}
            """, "config.yaml: matrix.vars.g: unknown model \"g-alias\"; 'g-alias' is an alias of"
                 " 'gemma', vars need model ids")
        self.assertConfigError(
            """
            matrix: {evict_costs: {gemma: 0}, sets: {s: gemma}}
            """, "config.yaml: matrix.evict_costs.gemma: must be an integer >= 1, got 0")
        self.assertConfigError(
            """
            matrix: {evict_costs: {nobody: 2}, sets: {s: gemma}}
            """, "config.yaml: matrix.evict_costs.nobody: unknown var or model")
        self.assertConfigError(
            """
            matrix: {sets: {s: [gemma]}}
            """, "config.yaml: matrix.sets.s: must be a string, got a list")


class SchedulerConfigTests(SynchronousTestCase):
    """
    ``routing.scheduler``.
    """

    def test_defaults(self) -> None:
        scheduler = parse("").scheduler
        self.assertEqual((scheduler.priority, scheduler.max_overtakes, scheduler.max_wait, scheduler.linger),
                         ({}, 16, 60.0, 0.05))
        self.assertFalse(scheduler.strict)

    def test_settings(self) -> None:
        scheduler = parse("""
            routing:
              scheduler:
                use: fifo
                settings:
                  fifo: {priority: {g-alias: 10, qwen: -1}, maxOvertakes: 0, maxWait: 5, linger: 0}
        """).scheduler
        self.assertEqual((scheduler.priority, scheduler.max_wait, scheduler.linger), ({"gemma": 10, "qwen": -1}, 5, 0))
        self.assertTrue(scheduler.strict)

    def test_errors(self) -> None:
        cases = {
            "{use: lifo}": 'config.yaml: routing.scheduler.use: must be one of fifo, got "lifo"',
            "{settings: {fifo: {priority: {nobody: 1}}}}":
                "config.yaml: routing.scheduler.settings.fifo.priority.nobody: unknown model;"
                " models are: gemma, qwen, voxtral",
            "{settings: {fifo: {priority: {gemma: 1, g-alias: 2}}}}":
                "config.yaml: routing.scheduler.settings.fifo.priority.g-alias: model 'gemma' already has"
                " a priority (as 'gemma')",
            "{settings: {fifo: {priority: {gemma: high}}}}":
                'config.yaml: routing.scheduler.settings.fifo.priority.gemma: must be an integer, got "high"',
            "{settings: {fifo: {maxOvertakes: -1}}}":
                "config.yaml: routing.scheduler.settings.fifo.maxOvertakes: must be an integer >= 0, got -1",
            "{settings: {fifo: {maxWait: soon}}}":
                'config.yaml: routing.scheduler.settings.fifo.maxWait: must be a number of seconds >= 0, got "soon"',
        }
        for scheduler, message in cases.items():
            error = self.assertRaises(ConfigError, parse, f"routing: {{scheduler: {scheduler}}}\n")
            self.assertEqual(str(error), message)

    def test_json_config(self) -> None:
        """
        The keys work from any YAML style (the tests elsewhere build configs as JSON).
        """
        config = parse_config(json.dumps({
            "models": {"a": {"cmd": "a ${PORT}"}},
            "routing": {"scheduler": {"settings": {"fifo": {"priority": {"a": 3}}}}},
        }), "c.json")
        self.assertEqual(config.scheduler.priority, {"a": 3})

"""
Tests for L{swapproxy.config}: what a user sees when swapproxy reads their YAML file.
"""

from __future__ import annotations

import os
import textwrap
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from swapproxy.config import (
    DEFAULT_GROUP,
    Config,
    ConfigError,
    CorsConfig,
    HangLimits,
    SlotCacheConfig,
    load_config,
    parse_config,
    split_command,
)

EXAMPLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                       "etc", "config.example.yaml")
README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def parse(text: str, environ: dict[str, str] | None = None) -> Config:
    return parse_config(textwrap.dedent(text), "config.yaml", environ or {})


class ErrorAssertions(SynchronousTestCase):
    def assertConfigError(self, text: str, expected: str,
                          environ: dict[str, str] | None = None) -> str:
        """
        Parsing C{text} fails with a one-line message that contains C{expected}.
        """
        with self.assertRaises(ConfigError) as raised:
            parse(text, environ)
        message = str(raised.exception)
        self.assertNotIn("\n", message)
        self.assertIn(expected, message)
        return message


class DefaultsTests(SynchronousTestCase):
    def test_minimal(self) -> None:
        """
        A model with only C{cmd} gets llama-swap's defaults, a port and the default group.
        """
        config = parse("""
            models:
              m:
                cmd: server --port ${PORT}
        """)
        self.assertEqual(config.health_check_timeout, 120)
        self.assertEqual(config.log_level, "info")
        self.assertEqual(config.log_to_stdout, "proxy")
        self.assertEqual(config.start_port, 5800)
        self.assertEqual(config.global_ttl, 0)
        self.assertEqual(config.unload_timeout, 10)
        self.assertFalse(config.send_loading_state)
        self.assertEqual(config.loading_state_field, "reasoning_content")
        self.assertEqual(config.api_keys, ())
        self.assertEqual(config.preload, ())
        self.assertEqual(config.warnings, ())
        m = config.models["m"]
        self.assertEqual(m.cmd, ("server", "--port", "5800"))
        self.assertEqual(m.cmd_stop, ())
        self.assertEqual(m.proxy, "http://127.0.0.1:5800")
        self.assertEqual(m.port, 5800)
        self.assertEqual(m.check_endpoint, "/health")
        self.assertEqual((m.ttl, m.unload_timeout, m.concurrency_limit), (0, 10, 10))
        self.assertEqual((m.aliases, m.env, m.strip_params), ((), (), ()))
        self.assertEqual((m.use_model_name, m.name, m.description), ("", "", ""))
        self.assertEqual((dict(m.metadata), dict(m.set_params), dict(m.set_params_by_id)), ({}, {}, {}))
        self.assertFalse(m.unlisted)
        self.assertFalse(m.send_loading_state)
        self.assertEqual(m.loading_state_field, "reasoning_content")
        group = config.group_of("m")
        self.assertEqual((group.id, group.swap, group.exclusive, group.persistent, group.members),
                         (DEFAULT_GROUP, True, True, False, ("m",)))

    def test_global_values_flow_into_models(self) -> None:
        """
        globalTTL, unloadTimeout, sendLoadingState and loadingStateField are per-model defaults;
        a model's own value (ttl 0 = never) wins.
        """
        config = parse("""
            globalTTL: 60
            unloadTimeout: 2.5
            sendLoadingState: true
            loadingStateField: Reasoning
            models:
              a:
                cmd: a ${PORT}
              b:
                cmd: b ${PORT}
                ttl: 0
                unloadTimeout: 1
                sendLoadingState: false
                loadingStateField: content
                concurrencyLimit: 3
        """)
        a, b = config.models["a"], config.models["b"]
        self.assertEqual((a.ttl, a.unload_timeout, a.send_loading_state, a.loading_state_field),
                         (60, 2.5, True, "reasoning"))
        self.assertEqual((b.ttl, b.unload_timeout, b.send_loading_state, b.loading_state_field),
                         (0, 1, False, "content"))
        self.assertEqual(b.concurrency_limit, 3)

    def test_model_settings(self) -> None:
        """
        Per-model keys are read as written: env pairs in order, trimmed name, filters normalised.
        """
        config = parse("""
            models:
              m:
                cmd: srv
                proxy: http://gpu-box:9000/prefix
                checkEndpoint: none
                cmdStop: docker stop ${MODEL_ID}-${PID}
                aliases: [one, two]
                useModelName: real-name
                env: ["A=1", "B=x=y"]
                unlisted: true
                name: "  Nice  "
                filters:
                  stripParams: " top_p, model, temperature,,top_p"
                  strip_params: "a.b"
                  setParams:
                    model: nope
                    top_k: 4
                  setParamsByID:
                    m-hot: {temperature: 1.5}
        """)
        m = config.models["m"]
        self.assertEqual(m.proxy, "http://gpu-box:9000/prefix")
        self.assertIsNone(m.port)
        self.assertIsNone(m.check_endpoint)
        self.assertEqual(m.cmd_stop, ("docker", "stop", "m-${PID}"))
        self.assertEqual(m.env, (("A", "1"), ("B", "x=y")))
        self.assertEqual((m.use_model_name, m.name, m.unlisted), ("real-name", "Nice", True))
        self.assertEqual(m.strip_params, ("a.b", "temperature", "top_p"))
        self.assertEqual(dict(m.set_params), {"top_k": 4})
        self.assertEqual(dict(m.set_params_by_id), {"m-hot": {"temperature": 1.5}})
        self.assertEqual(dict(config.aliases), {"one": "m", "two": "m", "m-hot": "m"})
        self.assertIs(config.resolve("m-hot"), m)
        self.assertIs(config.resolve("m"), m)
        self.assertIsNone(config.resolve("nothing"))
        self.assertTrue(any("setParams.model" in w for w in config.warnings))

    def test_top_level_leniency(self) -> None:
        """
        A small healthCheckTimeout is raised to 15 and an unknown logLevel becomes info, each with a
        warning; logLevel is case-insensitive.
        """
        config = parse("""
            healthCheckTimeout: 3
            logLevel: verbose
            models: {}
        """)
        self.assertEqual(config.health_check_timeout, 15)
        self.assertEqual(config.log_level, "info")
        self.assertEqual(len(config.warnings), 3)  # timeout, level, no models
        self.assertEqual(parse("logLevel: ' DEBUG '").log_level, "debug")

    def test_empty_document(self) -> None:
        """
        An empty file loads, with a warning that there are no models.
        """
        config = parse("# nothing yet\n")
        self.assertEqual(dict(config.models), {})
        self.assertEqual(config.warnings, ("config.yaml: models: no models configured",))
        self.assertEqual(config.groups[DEFAULT_GROUP].members, ())


class CommandTests(ErrorAssertions):
    def test_llama_swap_example(self) -> None:
        """
        The multi-line command of llama-swap's TestConfig_SanitizeCommand splits the same way.
        """
        cmd = (
            "python model1.py \\\n"
            "\t\t-a \"double quotes\" \\\n"
            "\t\t--arg2 'single quotes'\n"
            "\t\t-s\n"
            "\t\t# comment 1\n"
            "\t\t--arg3 123 \\\n"
            "\n"
            "\t\t  # comment 2\n"
            "\t\t--arg4 '\"string in string\"'\n"
            "\n"
            "\n"
            "\t\t# this will get stripped out as well as the white space above\n"
            "\t\t-c \"'single quoted'\"\n"
            "\t\t")
        self.assertEqual(split_command(cmd), [
            "python", "model1.py",
            "-a", "double quotes",
            "--arg2", "single quotes",
            "-s",
            "--arg3", "123",
            "--arg4", '"string in string"',
            "-c", "'single quoted'",
        ])

    def test_posix_details(self) -> None:
        """
        Backslash escapes, double-quote escapes, empty quotes, no inline comments, no expansion.
        """
        self.assertEqual(split_command(r'a\ b "x\"y\n" \'q "" $HOME # not a comment'),
                         ["a b", 'x"y\\n', "'q", "", "$HOME", "#", "not", "a", "comment"])

    def test_unterminated_quote(self) -> None:
        """
        An unterminated quote does not fail: the rest of the text becomes one word.
        """
        self.assertEqual(split_command("run --x 'a b c"), ["run", "--x", "a b c"])
        self.assertEqual(split_command('run "a b'), ["run", "a b"])

    def test_carriage_return(self) -> None:
        """
        CRLF line ends do not leak a carriage return into the arguments.
        """
        self.assertEqual(split_command("srv \\\r\n  --port 1\r\n  -v\r\n"),
                         ["srv", "--port", "1", "-v"])

    def test_empty_command(self) -> None:
        """
        A cmd made only of comments is an error naming the key.
        """
        self.assertConfigError("""
            models:
              m:
                cmd: |
                  # just a comment
        """, "config.yaml: models.m.cmd: empty command")


class MacroTests(ErrorAssertions):
    def test_declared_before_chain(self) -> None:
        """
        llama-swap's LIFO rule: a macro may use macros declared before it, and ${MODEL_ID} works
        inside macros; a model macro overrides a global one for every macro that uses it.
        """
        config = parse("""
            macros:
              base: /srv
              path: ${base}/models
              full: ${path}/${MODEL_ID}.gguf
            models:
              a:
                cmd: run ${full} ${PORT}
              b:
                cmd: run ${full} ${PORT}
                macros:
                  base: /other
        """)
        self.assertEqual(config.models["a"].cmd, ("run", "/srv/models/a.gguf", "5800"))
        self.assertEqual(config.models["b"].cmd, ("run", "/other/models/b.gguf", "5801"))

    def test_declared_after(self) -> None:
        """
        Unlike llama-swap, a macro may also use one declared after it.
        """
        config = parse("""
            macros:
              full: ${dir}/x
              dir: /d
            models:
              a: {cmd: "run ${full}", proxy: "http://h:1"}
        """)
        self.assertEqual(config.models["a"].cmd, ("run", "/d/x"))

    def test_expanded_fields(self) -> None:
        """
        Macros are expanded in proxy, checkEndpoint, env values, name, description and filters.
        """
        config = parse("""
            macros:
              host: box
              ep: /ready
              key: top_p
            models:
              a:
                cmd: run
                proxy: http://${host}:9
                checkEndpoint: ${ep}
                env: ["WHO=${MODEL_ID}"]
                name: ${MODEL_ID} on ${host}
                description: at ${host}
                filters:
                  stripParams: ${key}
                  setParams: {n: "${MODEL_ID}"}
                  setParamsByID:
                    ${MODEL_ID}-x: {k: 1}
        """)
        a = config.models["a"]
        self.assertEqual((a.proxy, a.check_endpoint), ("http://box:9", "/ready"))
        self.assertEqual(a.env, (("WHO", "a"),))
        self.assertEqual((a.name, a.description), ("a on box", "at box"))
        self.assertEqual(a.strip_params, ("top_p",))
        self.assertEqual(dict(a.set_params), {"n": "a"})
        self.assertEqual(config.aliases["a-x"], "a")

    def test_every_model_value(self) -> None:
        """
        As in llama-swap, macros are expanded in every value of a model: a vLLM model's
        ``useModelName`` reaches vLLM as the name it serves (not as the text ``${served}``), its
        aliases are the names written, and a value that is exactly one macro takes the macro's
        type (``ttl: ${ttl}``).
        """
        config = parse("""
            macros:
              served: Qwen/Qwen3-30B-A3B
              ttl: 300
              limit: 4
              idle: 60
            models:
              qwen:
                cmd: vllm serve ${served} --port ${PORT}
                useModelName: ${served}
                aliases: ["${MODEL_ID}-fast", "${served}"]
                ttl: ${ttl}
                concurrencyLimit: ${limit}
                streamIdleTimeout: ${idle}
        """)
        qwen = config.models["qwen"]
        self.assertEqual(qwen.use_model_name, "Qwen/Qwen3-30B-A3B")
        self.assertEqual(qwen.aliases, ("qwen-fast", "Qwen/Qwen3-30B-A3B"))
        self.assertEqual(config.resolve("qwen-fast"), qwen)
        self.assertEqual((qwen.ttl, qwen.concurrency_limit), (300, 4))
        self.assertEqual(qwen.hang_limits.stream_idle_timeout, 60)

    def test_every_top_level_value(self) -> None:
        """
        As llama-swap documents ("global macros can be used in any configuration value"), the
        global macros are expanded in the top-level settings too.
        """
        config = parse("""
            macros:
              main: qwen
              patience: 300
            healthCheckTimeout: ${patience}
            defaultModel: ${main}
            hooks: {on_startup: {preload: ["${main}"]}}
            groups:
              solo: {members: ["${main}"]}
            models:
              qwen: {cmd: "serve --port ${PORT}"}
              other: {cmd: "serve --port ${PORT}"}
        """)
        self.assertEqual(config.health_check_timeout, 300)
        self.assertEqual((config.default_model, config.preload), ("qwen", ("qwen",)))
        self.assertEqual(config.groups["solo"].members, ("qwen",))

    def test_typed_metadata(self) -> None:
        """
        In metadata, a value that is exactly one macro keeps its type; inside text it is
        interpolated the way llama-swap prints it.
        """
        config = parse("""
            macros:
              ctx: 4096
              temp: 0.7
              vision: true
              label: small
            models:
              a:
                cmd: run --port ${PORT}
                metadata:
                  ctx: ${ctx}
                  temp: ${temp}
                  vision: ${vision}
                  port: ${PORT}
                  text: "${label} ${ctx} ${temp} ${vision} on ${PORT}"
                  nested: [{ctx: "${ctx}"}]
        """)
        self.assertEqual(dict(config.models["a"].metadata), {
            "ctx": 4096, "temp": 0.7, "vision": True, "port": 5800,
            "text": "small 4096 0.7 true on 5800", "nested": [{"ctx": 4096}]})

    def test_comment_lines_not_expanded(self) -> None:
        """
        A macro in a commented-out cmd line is neither expanded nor reported.
        """
        config = parse("""
            models:
              a:
                cmd: |
                  run --port ${PORT}
                  # --old ${gone}
        """)
        self.assertEqual(config.models["a"].cmd, ("run", "--port", "5800"))

    def test_undefined(self) -> None:
        """
        An unknown ${name} names the field; via a macro, it names that macro too.
        """
        self.assertConfigError("""
            models:
              a: {cmd: "run ${nope}"}
        """, "config.yaml: models.a.cmd: unknown macro '${nope}'")
        self.assertConfigError("""
            macros: {x: "${nope}"}
            models:
              a:
                cmd: run
                proxy: http://h:1
                metadata: {k: "${x}"}
        """, "config.yaml: models.a.metadata.k: unknown macro '${nope}' (used by macro 'x')")

    def test_loop(self) -> None:
        """
        Macros that refer to each other are reported as a loop, not expanded forever.
        """
        self.assertConfigError("""
            macros:
              a: "${b}"
              b: "x${c}"
              c: "${a}"
            models:
              m: {cmd: "run ${b}"}
        """, "config.yaml: models.m.cmd: macro loop: b -> c -> a -> b")

    def test_definition_errors(self) -> None:
        """
        Self-reference, reserved names, bad names and non-scalar values are rejected.
        """
        self.assertConfigError("macros: {a: 'x ${a}'}",
                               "config.yaml: macros.a: macro 'a' contains self-reference")
        self.assertConfigError("macros: {PORT: 1}", "config.yaml: macros.PORT: 'PORT' is a reserved")
        self.assertConfigError("macros: {'a b': 1}", "config.yaml: macros.a b: macro names must")
        self.assertConfigError("macros: {a: [1]}", "config.yaml: macros.a: must be a string, number or"
                                                   " boolean, got a list")
        self.assertConfigError("""
            models:
              m: {cmd: run, proxy: "http://h:1", macros: {x: {y: 1}}}
        """, "config.yaml: models.m.macros.x: must be a string")

    def test_pid_only_in_cmd_stop(self) -> None:
        """
        ${PID} is kept for cmdStop and refused elsewhere.
        """
        self.assertConfigError("""
            models:
              m: {cmd: "run ${PID}", proxy: "http://h:1"}
        """, "config.yaml: models.m.cmd: ${PID} is only available in cmdStop")


class EnvironmentTests(ErrorAssertions):
    def test_substitution(self) -> None:
        """
        ${env.NAME} is replaced in values (also inside macros); unquoted values are re-typed,
        quoted ones stay strings; comments are ignored.
        """
        config = parse("""
            # ${env.IN_COMMENT} is never looked up
            startPort: ${env.START}
            apiKeys: ["${env.KEY}"]
            macros:
              models: ${env.HOME_DIR}/models
            models:
              a:
                cmd: run ${models}/${env.FILE} --port ${PORT}
        """, {"START": "7000", "KEY": "1234", "HOME_DIR": "/h", "FILE": 'x "y".gguf'})
        self.assertEqual(config.start_port, 7000)
        self.assertEqual(config.api_keys, ("1234",))
        self.assertEqual(config.models["a"].cmd, ("run", "/h/models/x", "y.gguf", "--port", "7000"))

    def test_unset(self) -> None:
        """
        An unset variable is an error naming the variable and the key.
        """
        self.assertConfigError("""
            models:
              a: {cmd: "run ${env.MISSING_VAR}"}
        """, "config.yaml: models.a.cmd: environment variable 'MISSING_VAR' is not set")

    def test_defaults_to_os_environ(self) -> None:
        """
        Without an explicit environment, os.environ is used.
        """
        os.environ["SWAPPROXY_TEST_VAR"] = "from-env"
        self.addCleanup(os.environ.pop, "SWAPPROXY_TEST_VAR")
        config = parse_config("logTimeFormat: ${env.SWAPPROXY_TEST_VAR}\n")
        self.assertEqual(config.log_time_format, "from-env")


class PortTests(ErrorAssertions):
    def test_allocation_order(self) -> None:
        """
        Ports go in sorted model-id order from startPort, only to models whose cmd uses ${PORT}.
        """
        config = parse("""
            models:
              c: {cmd: "srv --port ${PORT}"}
              b: {cmd: "srv --port 9000", proxy: "http://127.0.0.1:9000"}
              a: {cmd: "srv --port ${PORT}"}
        """)
        self.assertEqual([(m.id, m.port) for m in config.models.values()],
                         [("a", 5800), ("b", None), ("c", 5801)])
        self.assertEqual(config.models["c"].proxy, "http://127.0.0.1:5801")

    def test_start_port(self) -> None:
        """
        startPort moves the first port; startPort < 1 is an error.
        """
        self.assertEqual(parse("""
            startPort: 9100
            models: {a: {cmd: "s ${PORT}"}}
        """).models["a"].port, 9100)
        self.assertConfigError("startPort: 0", "config.yaml: startPort: must be an integer >= 1")

    def test_port_in_proxy_only(self) -> None:
        """
        ${PORT} in proxy without ${PORT} in cmd is an error, also through the default proxy.
        """
        self.assertConfigError("""
            models:
              a: {cmd: "srv --port 9000", proxy: "http://127.0.0.1:${PORT}"}
        """, "config.yaml: models.a.proxy: uses ${PORT} but cmd does not")
        self.assertConfigError("""
            models:
              a: {cmd: "srv --port 9000"}
        """, "config.yaml: models.a.proxy: is not set, so it defaults to http://127.0.0.1:${PORT}")

    def test_port_in_text_fields(self) -> None:
        """
        ${PORT} is substituted in every expanded field, as text outside metadata.
        """
        config = parse("""
            models:
              a:
                cmd: run ${PORT}
                name: ${PORT}
                checkEndpoint: /health?port=${PORT}
                env: ["PORT=${PORT}"]
                cmdStop: stop ${PORT} ${PID}
        """)
        a = config.models["a"]
        self.assertEqual((a.name, a.check_endpoint, a.env), ("5800", "/health?port=5800", (("PORT", "5800"),)))
        self.assertEqual(a.cmd_stop, ("stop", "5800", "${PID}"))

    def test_port_elsewhere_without_cmd(self) -> None:
        """
        ${PORT} in metadata of a model whose cmd has no port is an error.
        """
        self.assertConfigError("""
            models:
              a:
                cmd: srv
                proxy: http://h:1
                metadata: {p: "${PORT}"}
        """, "config.yaml: models.a.metadata.p: ${PORT} is only available when cmd uses ${PORT}")


class ValidationTests(ErrorAssertions):
    def test_missing_file(self) -> None:
        """
        A missing file is named in the error.
        """
        path = self.mktemp()
        with self.assertRaises(ConfigError) as raised:
            load_config(path)
        self.assertEqual(str(raised.exception), f"{path}: cannot read config file: No such file or directory")

    def test_load_file(self) -> None:
        """
        load_config reads the file and uses its path in messages.
        """
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("models:\n  a: {cmd: run, proxy: 'http://h:1', ttl: ten}\n")
        with self.assertRaises(ConfigError) as raised:
            load_config(path)
        self.assertEqual(str(raised.exception), f'{path}: models.a.ttl: must be an integer >= 0, got "ten"')

    def test_yaml_syntax(self) -> None:
        """
        A YAML syntax error gives the line and column.
        """
        self.assertConfigError("models:\n  a: [unclosed\n  b: 1\n",
                               "config.yaml: line 3, column 4: invalid YAML: ")

    def test_duplicate_key(self) -> None:
        """
        A key written twice is an error with its path and both lines, not a silent overwrite.
        """
        self.assertConfigError("""
            models:
              a:
                cmd: run ${PORT}
                ttl: 1
                ttl: 2
        """, "config.yaml: models.a.ttl: duplicate key (first at line 5, again at line 6)")

    def test_wrong_types(self) -> None:
        """
        Wrong types name the key path and show the value; YAML strings are not booleans or ints.
        """
        self.assertConfigError("models: {qwen: {cmd: 'run ${PORT}', ttl: ten}}",
                               'config.yaml: models.qwen.ttl: must be an integer >= 0, got "ten"')
        self.assertConfigError("models: {qwen: {cmd: 'run ${PORT}', ttl: true}}",
                               "config.yaml: models.qwen.ttl: must be an integer >= 0, got true")
        self.assertConfigError("models: {q: {cmd: 'run ${PORT}', unlisted: 'yes'}}",
                               'config.yaml: models.q.unlisted: must be true or false, got "yes"')
        self.assertConfigError("models: {q: {cmd: [run]}}",
                               "config.yaml: models.q.cmd: must be a string, got a list")
        self.assertConfigError("models: [a]", "config.yaml: models: must be a mapping, got a list")
        self.assertConfigError("- a", "config.yaml: (top level): must be a mapping")
        self.assertConfigError("models: {1: {cmd: x}}", "config.yaml: models.1: model ids must be")
        self.assertConfigError("logToStdout: all", "config.yaml: logToStdout: must be one of proxy,")
        self.assertConfigError("unloadTimeout: .inf", "config.yaml: unloadTimeout: must be a number")
        self.assertConfigError("models: {q: {cmd: 'run ${PORT}', env: [NOEQUALS]}}",
                               "config.yaml: models.q.env[0]: must look like NAME=value")
        self.assertConfigError("apiKeys: ['a b']", "config.yaml: apiKeys[0]: must not contain whitespace")

    def test_missing_cmd(self) -> None:
        """
        A model without cmd is an error naming the model.
        """
        self.assertConfigError("models: {q: {proxy: 'http://h:1'}}", "config.yaml: models.q.cmd: missing")

    def test_bad_proxy(self) -> None:
        """
        proxy must be an http(s) URL with a host.
        """
        self.assertConfigError("models: {q: {cmd: run, proxy: 'localhost:8080'}}",
                               'config.yaml: models.q.proxy: must be an http:// or https:// URL')

    def test_duplicate_alias(self) -> None:
        """
        An alias used by two models names both.
        """
        message = self.assertConfigError("""
            models:
              a: {cmd: "a ${PORT}", aliases: [fast]}
              b: {cmd: "b ${PORT}", aliases: [fast]}
        """, "config.yaml: models.b.aliases: duplicate alias 'fast'")
        self.assertIn("model 'a'", message)

    def test_alias_is_model_id(self) -> None:
        """
        An alias equal to another model's id would be unreachable, so it is an error.
        """
        self.assertConfigError("""
            models:
              a: {cmd: "a ${PORT}", aliases: [b]}
              b: {cmd: "b ${PORT}"}
        """, "config.yaml: models.a.aliases: alias 'b' is also a model id")
        self.assertConfigError("""
            models:
              a: {cmd: "a ${PORT}", filters: {setParamsByID: {b: {x: 1}}}}
              b: {cmd: "b ${PORT}"}
        """, "config.yaml: models.a.filters.setParamsByID: alias 'b' is also a model id")


class GroupTests(ErrorAssertions):
    MODELS = """
        models:
          a: {cmd: "a ${PORT}", aliases: [alpha]}
          b: {cmd: "b ${PORT}"}
          c: {cmd: "c ${PORT}"}
    """

    def test_groups_and_default(self) -> None:
        """
        Configured groups keep their flags; models in no group form "(default)".
        """
        config = parse(self.MODELS + """
        groups:
          pair:
            swap: false
            persistent: true
            members: [b, a]
        """)
        self.assertEqual(list(config.groups), ["pair", DEFAULT_GROUP])
        pair = config.group_of("a")
        self.assertEqual((pair.id, pair.swap, pair.exclusive, pair.persistent, pair.members),
                         ("pair", False, True, True, ("b", "a")))
        self.assertEqual(config.group_of("c").id, DEFAULT_GROUP)
        self.assertEqual(config.groups[DEFAULT_GROUP].members, ("c",))

    def test_unknown_member(self) -> None:
        """
        An unknown member names it and lists the models; an alias gets a hint.
        """
        self.assertConfigError(self.MODELS + """
        groups: {g: {members: [zz]}}
        """, "config.yaml: groups.g.members: unknown model 'zz'; models are: a, b, c")
        self.assertConfigError(self.MODELS + """
        groups: {g: {members: [alpha]}}
        """, "'alpha' is an alias of 'a', groups need model ids")

    def test_member_twice(self) -> None:
        """
        A model in two groups, or twice in one, is an error.
        """
        self.assertConfigError(self.MODELS + """
        groups: {g: {members: [a]}, h: {members: [b, a]}}
        """, "config.yaml: groups.h.members: model 'a' is already in group 'g'")
        self.assertConfigError(self.MODELS + """
        groups: {g: {members: [a, a]}}
        """, "config.yaml: groups.g.members: duplicate member 'a'")


class WarningTests(SynchronousTestCase):
    def test_unsupported_keys(self) -> None:
        """
        Keys swapproxy does not know are listed in one warning and otherwise ignored.
        """
        config = parse("""
            futureKey: {x: 1}
            models:
              a:
                cmd: run ${PORT}
                newKey: true
                filters: {newFilter: 1}
            groups:
              g: {members: [a], priority: 2}
            hooks:
              on_startup: {preload: [], later: 1}
        """)
        self.assertEqual(config.warnings, (
            "config.yaml: unsupported keys ignored: futureKey, models.a.newKey,"
            " models.a.filters.newFilter, groups.g.priority, hooks.on_startup.later",))

    def test_deprecated_keys(self) -> None:
        """
        logRequests loads with a warning; the seed's list-shaped profiles are an error that says
        what replaced them.
        """
        config = parse("""
            logRequests: true
            models: {a: {cmd: "run ${PORT}"}}
        """)
        self.assertEqual(len(config.warnings), 1)
        self.assertIn("logRequests", config.warnings[0])
        with self.assertRaises(ConfigError) as caught:
            parse("""
                profiles: {p: [a]}
                models: {a: {cmd: "run ${PORT}"}}
            """)
        self.assertEqual(str(caught.exception), "config.yaml: profiles.p: must be a mapping with description"
                         " and pins; the old list of models is gone (llama-swap replaced it with groups)")

    def test_preload(self) -> None:
        """
        Preload names are trimmed, aliases resolve to ids, duplicates collapse, unknown names warn.
        """
        config = parse("""
            models:
              a: {cmd: "a ${PORT}", aliases: [alpha]}
              b: {cmd: "b ${PORT}"}
            hooks:
              on_startup:
                preload: [" b ", alpha, "", ghost, a]
        """)
        self.assertEqual(config.preload, ("b", "a"))
        self.assertEqual(config.warnings,
                         ("config.yaml: hooks.on_startup.preload: unknown model 'ghost' ignored",))


class CompatibilityKeyTests(ErrorAssertions):
    """
    ``defaultModel`` and ``cors``.
    """

    MODELS = textwrap.dedent("""
        models:
          a:
            cmd: run ${PORT}
            aliases: [alpha]
          b:
            cmd: run ${PORT}
    """)

    def test_defaults(self) -> None:
        config = parse(self.MODELS)
        self.assertEqual(config.default_model, "")
        self.assertEqual(config.cors, CorsConfig(("*",), False, ("*",), 86400))

    def test_default_model_by_id_or_alias(self) -> None:
        self.assertEqual(parse(self.MODELS + "defaultModel: b\n").default_model, "b")
        self.assertEqual(parse(self.MODELS + "defaultModel: alpha\n").default_model, "a")
        self.assertEqual(parse(self.MODELS + "defaultModel: ''\n").default_model, "")

    def test_unknown_default_model(self) -> None:
        message = self.assertConfigError(self.MODELS + "defaultModel: c\n", "defaultModel: unknown model")
        self.assertIn("models are: a, b", message)
        self.assertConfigError(self.MODELS + "defaultModel: [a]\n", "defaultModel: must be a string")

    def test_cors(self) -> None:
        config = parse(self.MODELS + textwrap.dedent("""
            cors:
              allowedOrigins: ["https://chat.example/", localhost, "http://10.0.0.2:3000", "*"]
              allowCredentials: true
              allowedHeaders: [Authorization, x-api-key]
              maxAge: 0
        """))
        self.assertEqual(config.cors, CorsConfig(("https://chat.example", "localhost", "http://10.0.0.2:3000", "*"),
                                                 True, ("Authorization", "x-api-key"), 0))
        self.assertEqual(parse(self.MODELS + "cors: {allowedOrigins: []}\n").cors.allowed_origins, ())

    def test_bad_cors(self) -> None:
        for section, expected in [
            ("cors: {allowedOrigins: ['https://a.example/path']}", "cors.allowedOrigins[0]: must be"),
            ("cors: {allowedOrigins: ['chat.example']}", 'got "chat.example"'),
            ("cors: {allowedOrigins: '*'}", "cors.allowedOrigins: must be a list of strings"),
            ("cors: {allowCredentials: maybe}", "cors.allowCredentials"),
            ("cors: {allowedHeaders: ['bad header']}", "cors.allowedHeaders[0]: must be"),
            ("cors: {maxAge: -1}", "cors.maxAge: must be an integer >= 0"),
            ("cors: [1]", "cors: must be a mapping"),
        ]:
            self.assertConfigError(self.MODELS + section + "\n", expected)
        self.assertIn("cors.origins", parse(self.MODELS + "cors: {origins: ['*']}\n").warnings[0])


class HangLimitsTests(ErrorAssertions):
    """
    ``streamIdleTimeout``, ``timeouts.responseHeader`` and ``healthCheckInterval``: global
    defaults, per-model overrides, 0 for off.
    """

    def test_defaults(self) -> None:
        config = parse("""
            models:
              m:
                cmd: server --port ${PORT}
        """)
        limits = HangLimits(stream_idle_timeout=600, response_header_timeout=0, health_check_interval=10)
        self.assertEqual((config.hang_limits, config.models["m"].hang_limits), (limits, limits))

    def test_global_and_per_model(self) -> None:
        """
        A model's own keys win over the global ones, key by key; 0 turns a limit off for it.
        """
        config = parse("""
            streamIdleTimeout: 120
            healthCheckInterval: 30
            timeouts:
              responseHeader: 60
            models:
              plain:
                cmd: server --port ${PORT}
              own:
                cmd: server --port ${PORT}
                streamIdleTimeout: 0
                timeouts:
                  responseHeader: 2.5
        """)
        self.assertEqual(config.models["plain"].hang_limits, HangLimits(120, 60, 30))
        self.assertEqual(config.models["own"].hang_limits, HangLimits(0, 2.5, 30))
        self.assertEqual(config.warnings, ())

    def test_llama_swap_timeouts_all_parsed(self) -> None:
        """
        A model's ``timeouts`` take every key llama-swap has, with no warning; the global
        ``timeouts`` are the defaults of each model's.
        """
        config = parse("""
            timeouts:
              connect: 5
            models:
              m:
                cmd: server --port ${PORT}
                timeouts:
                  keepalive: 20
                  responseHeader: 60
        """)
        model = config.models["m"]
        self.assertEqual(model.hang_limits.response_header_timeout, 60)
        self.assertEqual((model.timeouts.connect, model.timeouts.keepalive, model.timeouts.response_header),
                         (5, 20, 60))
        self.assertEqual(config.warnings, ())

    def test_errors(self) -> None:
        self.assertConfigError("""
            streamIdleTimeout: -1
        """, "config.yaml: streamIdleTimeout: must be a number of seconds >= 0, got -1")
        self.assertConfigError("""
            models:
              m:
                cmd: server --port ${PORT}
                timeouts:
                  responseHeader: soon
        """, 'config.yaml: models.m.timeouts.responseHeader: must be a number of seconds >= 0, got "soon"')
        self.assertConfigError("""
            models:
              m:
                cmd: server --port ${PORT}
                timeouts: 5
        """, "config.yaml: models.m.timeouts: must be a mapping, got 5")


class SlotCacheTests(SynchronousTestCase):
    """
    ``slotCache``: on or off globally and per model, and where and how much.
    """

    def test_off_unless_asked(self) -> None:
        config = parse_config('models: {a: {cmd: "run --port ${PORT}"}}')
        self.assertEqual((config.slot_cache.enabled, config.models["a"].slot_cache), (False, False))

    def test_true_for_every_model_unless_a_model_says_not(self) -> None:
        config = parse_config(textwrap.dedent("""\
            slotCache: true
            models:
              a: {cmd: "run --port ${PORT}"}
              b: {cmd: "run --port ${PORT}", slotCache: false}
        """))
        self.assertEqual((config.models["a"].slot_cache, config.models["b"].slot_cache), (True, False))

    def test_a_mapping_sets_where_and_how_much(self) -> None:
        config = parse_config(textwrap.dedent("""\
            slotCache:
              path: ~/slots
              maxSize: 1GiB
              minFree: 500MB
              saveTimeout: 2.5
              restoreTimeout: 60
            models:
              a: {cmd: "run --port ${PORT}"}
        """))
        self.assertEqual(config.slot_cache, SlotCacheConfig(
            enabled=True, path=os.path.expanduser("~/slots"), max_size=1024**3, min_free=500 * 1000**2,
            save_timeout=2.5, restore_timeout=60.0))
        self.assertTrue(config.models["a"].slot_cache)

    def test_a_mapping_can_leave_it_to_each_model(self) -> None:
        config = parse_config(textwrap.dedent("""\
            slotCache: {enabled: false, maxSize: 0}
            models:
              a: {cmd: "run --port ${PORT}"}
              b: {cmd: "run --port ${PORT}", slotCache: true}
        """))
        self.assertEqual((config.models["a"].slot_cache, config.models["b"].slot_cache), (False, True))
        self.assertEqual(config.slot_cache.max_size, 0)

    def test_errors_name_the_key(self) -> None:
        for text, message in (
            ("slotCache: yes please", "config.yaml: slotCache: must be true, false or a mapping of settings"),
            ("slotCache: {maxSize: lots}", "config.yaml: slotCache.maxSize: must be 0 (no limit) or a size"),
            ("slotCache: {saveTimeout: -1}", "config.yaml: slotCache.saveTimeout: must be a number of seconds"),
            ("models: {a: {cmd: x, proxy: 'http://h:1', slotCache: 1}}",
             "config.yaml: models.a.slotCache: must be true or false"),
        ):
            with self.subTest(text=text):
                with self.assertRaises(ConfigError) as caught:
                    parse_config(text)
                self.assertTrue(str(caught.exception).startswith(message), str(caught.exception))

    def test_unknown_keys_are_a_warning(self) -> None:
        config = parse_config("slotCache: {compress: true}\nmodels: {}")
        self.assertIn("slotCache.compress", config.warnings[0])


class ExampleTests(SynchronousTestCase):
    def test_example_loads(self) -> None:
        """
        etc/config.example.yaml loads without warnings and shows the documented defaults.
        """
        config = load_config(EXAMPLE, environ={})
        self.assertEqual(config.warnings, ())
        self.assertEqual(set(config.models), {"tiny", "qwen", "fixed"})
        self.assertEqual(config.resolve("gpt-4o-mini"), config.models["qwen"])
        self.assertEqual(config.preload, ("tiny",))
        self.assertEqual(config.slot_cache, SlotCacheConfig())

    def test_readme_tour_config(self) -> None:
        """
        The config of the README's tour gives llama-server only the arguments written in it: a
        user who copies it gets models that start (a "# ..." after an argument in a cmd block is
        not a YAML comment, it would reach llama-server as arguments and stop it).
        """
        with open(README, encoding="utf-8") as f:
            first_block = f.read().split("```yaml\n", 1)[1].split("```", 1)[0]
        config = parse_config(first_block, "README.md", {})
        server = ["/usr/local/bin/llama-server", "--host", "127.0.0.1", "--port"]
        self.assertEqual(list(config.models["gemma"].cmd),
                         server + ["5800", "-ngl", "99", "-m", "/models/gemma-3-12b-q4_k_m.gguf",
                                   "--ctx-size", "8192"])
        self.assertEqual(list(config.models["qwen"].cmd),
                         server + ["5801", "-ngl", "99", "-m", "/models/qwen3-8b-q4_k_m.gguf",
                                   "-c", "16384"])


yaml_keys = st.sampled_from([
    "models", "groups", "macros", "hooks", "cmd", "proxy", "ttl", "aliases", "members",
    "metadata", "filters", "env", "startPort", "on_startup", "preload", "a", "b",
]) | st.text(max_size=8)
yaml_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20) | \
    st.sampled_from(["run ${PORT}", "${PORT}", "${x}", "${env.HOME}", "http://h:1", "${PID}",
                     "${MODEL_ID}", "none", "-1", "a", "b=1"])
yaml_documents = st.recursive(
    yaml_scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(yaml_keys, children, max_size=5),
    max_leaves=30)
model_ids = st.sampled_from(["a", "b", "c"]) | st.text(max_size=3)
model_documents = st.dictionaries(
    st.sampled_from(["cmd", "cmdStop", "proxy", "checkEndpoint", "ttl", "aliases", "useModelName",
                     "env", "unlisted", "name", "description", "metadata", "concurrencyLimit",
                     "sendLoadingState", "loadingStateField", "macros", "filters", "unloadTimeout",
                     "capabilities", "streamIdleTimeout", "healthCheckInterval", "timeouts", "slotCache"]),
    yaml_documents | st.lists(yaml_scalars, max_size=3), max_size=8)
config_documents = st.fixed_dictionaries({}, optional={
    "models": st.dictionaries(model_ids, model_documents, max_size=4),
    "groups": st.dictionaries(yaml_keys, st.dictionaries(
        st.sampled_from(["swap", "exclusive", "persistent", "members"]),
        yaml_scalars | st.lists(model_ids, max_size=3)), max_size=3),
    "macros": st.dictionaries(st.sampled_from(["x", "y", "PORT"]) | yaml_keys, yaml_scalars),
    "hooks": st.fixed_dictionaries({"on_startup": st.fixed_dictionaries(
        {"preload": st.lists(model_ids, max_size=3)})}),
    "startPort": st.integers(min_value=-1, max_value=70000),
    "globalTTL": yaml_scalars,
    "slotCache": yaml_scalars | st.dictionaries(
        st.sampled_from(["enabled", "path", "maxSize", "minFree", "saveTimeout", "restoreTimeout", "x"]),
        yaml_scalars),
})


class PropertyTests(SynchronousTestCase):
    @settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(yaml_documents | config_documents)
    def test_any_yaml_loads_or_raises_config_error(self, document: Any) -> None:
        """
        Any YAML document either loads or raises ConfigError with a one-line message.
        """
        text = yaml.safe_dump(document)
        try:
            parse_config(text, "config.yaml", {"HOME": "/h"})
        except ConfigError as e:
            self.assertNotIn("\n", str(e))
            self.assertTrue(str(e).startswith("config.yaml: "))

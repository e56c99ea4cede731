# -*- test-case-name: tests.test_config -*-
"""
Reading the YAML document: its syntax errors, duplicate keys, recursive aliases and ``${env.NAME}``.

Unlike PyYAML's own loading (and llama-swap's), a key given twice in one mapping is an error, and
``${env.NAME}`` is substituted in parsed scalars rather than in the raw text: it cannot break the
YAML and needs no escaping, and an unquoted scalar is re-typed after substitution
(``startPort: ${env.P}`` is an int).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import yaml

from swapproxy.config.checker import Checker, ConfigError, join

_ENV_REF = re.compile(r"\$\{env\.([A-Za-z_][A-Za-z0-9_]*)\}")
_STR_TAG = "tag:yaml.org,2002:str"
_MERGE_TAG = "tag:yaml.org,2002:merge"


class _NodeChecker:
    """
    Walks the composed YAML graph before construction: rejects duplicate keys and recursive
    aliases with their key path, and substitutes ``${env.NAME}`` in scalars.
    """

    def __init__(self, loader: yaml.SafeLoader, checker: Checker,
                 environ: Mapping[str, str]) -> None:
        self.loader, self.checker, self.environ = loader, checker, environ
        self.active: set[int] = set()
        self.done: set[int] = set()

    def visit(self, node: yaml.Node, path: str) -> None:
        if id(node) in self.done:
            return
        if id(node) in self.active:
            raise self.checker.error(path or "(top level)", "recursive YAML aliases are not supported")
        self.active.add(id(node))
        if isinstance(node, yaml.ScalarNode):
            self.substitute_env(node, path)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                self.visit(item, f"{path}[{i}]")
        elif isinstance(node, yaml.MappingNode):
            seen: dict[Any, yaml.Node] = {}
            for key_node, value_node in node.value:
                child = path
                if key_node.tag != _MERGE_TAG:
                    self.visit(key_node, path)
                    if isinstance(key_node, yaml.ScalarNode):
                        key = self.loader.construct_object(key_node)
                        child = join(path, key)
                        first = seen.get(key)
                        if first is not None:
                            raise self.checker.error(child, (
                                f"duplicate key (first at line {first.start_mark.line + 1},"
                                f" again at line {key_node.start_mark.line + 1})"))
                        seen[key] = key_node
                self.visit(value_node, child)
        self.active.discard(id(node))
        self.done.add(id(node))

    def substitute_env(self, node: yaml.ScalarNode, path: str) -> None:
        def replace(match: re.Match[str]) -> str:
            if match.group(1) not in self.environ:
                raise self.checker.error(
                    path or "(top level)", f"environment variable '{match.group(1)}' is not set")
            return self.environ[match.group(1)]

        if "${env." not in node.value:
            return
        value = _ENV_REF.sub(replace, node.value)
        if node.style is None and node.tag == _STR_TAG:
            # An unquoted scalar is re-typed, as if the value had been written in the file.
            node.tag = self.loader.resolve(
                yaml.ScalarNode, value, (True, False))
        node.value = value


def read_yaml(text: str, checker: Checker, environ: Mapping[str, str]) -> Any:
    """
    The Python value of the YAML document ``text`` (``None`` for an empty one), ``${env.NAME}``
    looked up in ``environ``.

    :raises ConfigError: on invalid YAML, a duplicate key, a recursive alias or an unset variable.
    """
    source = checker.source
    loader = None
    try:
        loader = yaml.SafeLoader(text)
        node = loader.get_single_node()
        if node is None:
            return None
        _NodeChecker(loader, checker, environ).visit(node, "")
        return loader.construct_document(node)
    except yaml.reader.ReaderError as e:
        raise ConfigError(f"{source}: character {e.position + 1}: invalid YAML: {e.reason}") from None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ConfigError(f"{source}: {where}invalid YAML: {e.problem or e.context}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: invalid YAML: {e}") from None
    except (ValueError, TypeError, OverflowError) as e:
        raise ConfigError(f"{source}: invalid YAML value: {e}") from None
    finally:
        if loader is not None:
            loader.dispose()


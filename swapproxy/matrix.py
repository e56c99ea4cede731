# -*- test-case-name: tests.test_matrix -*-
"""
llama-swap's swap matrix: named sets of models that may run together, and what a request evicts.

A set is an expression over model ids (or ``vars``, short names for them): ``a & b`` runs together,
``a | b`` is either, parentheses group, and ``+name`` stands for another set's expression; ``&``
binds tighter than ``|``. A set allows any subset of one of its combinations to run.

When a model that is not running is requested, `Matrix.solve` looks at every combination, in every
set, that contains it; the cost of a combination is the sum of the ``evict_costs`` (default 1) of
the running models it leaves out. The cheapest wins (ties: the set defined first, a set that
another one references counting as defined before it), and the running models outside it are
stopped. A model in no set runs alone. This is llama-swap head's behaviour
(``internal/matrix``), written from its documentation and tests.

Combinations are never listed in full: each query projects them onto the models that matter (the
requested one and the running ones), so ``(a | b) & (c | d) & ...`` stays cheap.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

import attrs

#: What a var name may look like (llama-swap's rule).
VAR_NAME_CHARS = "letters, digits, '-' and '.'"


class MatrixError(ValueError):
    """
    A set expression that cannot be used; ``str()`` says what is wrong and where.

    :ivar set_name: the set whose expression is wrong (``None`` for problems between sets).
    """

    def __init__(self, message: str, set_name: str | None = None) -> None:
        super().__init__(message)
        self.set_name = set_name


def _is_name_char(char: str) -> bool:
    return char.isalnum() or char in "_-."


@attrs.frozen
class _Token:
    kind: str  # "name", "ref", "&", "|", "(", ")", "end"
    text: str
    position: int  # 1-based character position in the expression


def _tokens(expression: str) -> list[_Token]:
    tokens = []
    i, n = 0, len(expression)
    while i < n:
        char = expression[i]
        if char.isspace():
            i += 1
        elif char in "&|()":
            tokens.append(_Token(char, char, i + 1))
            i += 1
        elif char == "+" or _is_name_char(char):
            start = i + 1 if char == "+" else i
            end = start
            while end < n and _is_name_char(expression[end]):
                end += 1
            if end == start:
                raise MatrixError(f"'+' at position {i + 1} must be followed by a set name")
            tokens.append(_Token("ref" if char == "+" else "name", expression[start:end], i + 1))
            i = end
        else:
            raise MatrixError(f"unexpected character {char!r} at position {i + 1}")
    tokens.append(_Token("end", "", n + 1))
    return tokens


@attrs.frozen(eq=False)
class _Node:
    """
    One node of a parsed expression: ``model`` for a model, ``ref`` for ``+set``, or ``op`` ("&"
    or "|") over ``children``.
    """

    op: str | None = None
    children: tuple[_Node, ...] = ()
    model: str | None = None
    ref: str | None = None
    position: int = 0


class _Parser:
    def __init__(self, expression: str) -> None:
        self.tokens = _tokens(expression)
        self.at = 0

    def peek(self) -> _Token:
        return self.tokens[self.at]

    def take(self) -> _Token:
        token = self.tokens[self.at]
        if token.kind != "end":
            self.at += 1
        return token

    def parse(self) -> _Node:
        node = self.alternatives()
        token = self.peek()
        if token.kind != "end":
            raise MatrixError(f"unexpected {token.text!r} at position {token.position}")
        return node

    def alternatives(self) -> _Node:
        return self.chain("|", self.together)

    def together(self) -> _Node:
        return self.chain("&", self.atom)

    def chain(self, op: str, operand: Callable[[], _Node]) -> _Node:
        first = operand()
        children = [first]
        while self.peek().kind == op:
            self.take()
            children.append(operand())
        return first if len(children) == 1 else _Node(op=op, children=tuple(children))

    def atom(self) -> _Node:
        token = self.take()
        if token.kind == "name":
            return _Node(model=token.text, position=token.position)
        if token.kind == "ref":
            return _Node(ref=token.text, position=token.position)
        if token.kind == "(":
            node = self.alternatives()
            if self.peek().kind != ")":
                raise MatrixError(f"'(' at position {token.position} is never closed")
            self.take()
            return node
        found = "the end of the expression" if token.kind == "end" else repr(token.text)
        raise MatrixError(f"expected a model, +set or '(' at position {token.position}, found {found}")


def parse_expression(expression: str) -> _Node:
    """
    Parse one set expression (model names are not resolved).

    :raises MatrixError: naming the position of the problem.
    """
    if not expression.strip():
        raise MatrixError("the expression is empty")
    return _Parser(expression).parse()


@attrs.frozen
class Decision:
    """
    What a request for a model that is not running does.

    :ivar evict: the running models to stop, in the order they were given.
    :ivar members: the chosen combination (sorted), which may name models that are not running.
    :ivar set_name: the set it comes from; ``""`` when the model is in no set.
    :ivar cost: the sum of the evicted models' costs.
    """

    evict: tuple[str, ...]
    members: tuple[str, ...]
    set_name: str
    cost: int


# A projected combination: the bit mask over the query's models, and one full combination
# (a witness) that has it, for logs.
_State = tuple[int, frozenset[str]]


class Matrix:
    """
    A compiled swap matrix.

    :param sets: ``(name, expression)`` in definition order.
    :param resolve: a var or model id in an expression -> model id, or ``None`` if unknown.
    :param evict_costs: model id -> cost of stopping it (positive; default 1).
    :raises MatrixError: for a bad expression, an unknown name, an undefined or circular ``+set``.
    """

    def __init__(
        self,
        sets: Sequence[tuple[str, str]],
        resolve: Callable[[str], str | None],
        evict_costs: Mapping[str, int] | None = None,
    ) -> None:
        if not sets:
            raise MatrixError("define at least one set")
        self.evict_costs = dict(evict_costs or {})
        self.expressions = dict(sets)
        roots: dict[str, _Node] = {}
        for name, expression in sets:
            if not expression.strip():
                raise MatrixError("the expression is empty; write models joined by & and |", name)
            try:
                roots[name] = self._resolve(parse_expression(expression), resolve, self.expressions)
            except MatrixError as e:
                raise MatrixError(f"{e} in {expression!r}", name) from None
        self._roots = roots
        self.order = _dependency_order([name for name, _ in sets], {n: _refs(r) for n, r in roots.items()})
        self._members = {name: frozenset(self._models(root)) for name, root in roots.items()}

    @staticmethod
    def _resolve(node: _Node, resolve: Callable[[str], str | None], names: Mapping[str, str]) -> _Node:
        if node.model is not None:
            model = resolve(node.model)
            if model is None:
                raise MatrixError(f"unknown var or model {node.model!r} at position {node.position}")
            return attrs.evolve(node, model=model)
        if node.ref is not None:
            if node.ref not in names:
                raise MatrixError(f"+{node.ref} at position {node.position}: there is no set named {node.ref!r}")
            return node
        return attrs.evolve(node, children=tuple(Matrix._resolve(c, resolve, names) for c in node.children))

    def _models(self, node: _Node) -> Iterable[str]:
        if node.model is not None:
            yield node.model
        elif node.ref is not None:
            yield from self._models(self._roots[node.ref])
        else:
            for child in node.children:
                yield from self._models(child)

    def models(self) -> frozenset[str]:
        """
        Every model some set names.
        """
        return frozenset().union(*self._members.values())

    def cost(self, model_id: str) -> int:
        return self.evict_costs.get(model_id, 1)

    def solve(self, target: str, running: Sequence[str]) -> Decision:
        """
        Which of the ``running`` models to stop so that ``target`` can run.

        Nothing is evicted when ``target`` already runs. When ``target`` is in no set, every
        running model is.
        """
        if target in running:
            return Decision((), tuple(sorted(running)), "", 0)
        relevant = list(dict.fromkeys([target, *running]))
        bits = {model: 1 << i for i, model in enumerate(relevant)}
        memo: dict[int, list[_State]] = {}
        best: tuple[int, str, _State] | None = None
        for name in self.order:
            if target not in self._members[name]:
                continue
            for state in self._evaluate(self._roots[name], bits, memo):
                if not state[0] & bits[target]:
                    continue
                cost = sum(self.cost(model) for model in running if not state[0] & bits[model])
                if best is None or cost < best[0]:
                    best = (cost, name, state)
        if best is None:
            return Decision(tuple(running), (target,), "", sum(self.cost(model) for model in running))
        cost, name, (mask, witness) = best
        evict = tuple(model for model in running if not mask & bits[model])
        return Decision(evict, tuple(sorted(witness)), name, cost)

    def _evaluate(self, node: _Node, bits: Mapping[str, int], memo: dict[int, list[_State]]) -> list[_State]:
        """
        The combinations of ``node`` projected onto ``bits``, keeping only those not contained
        in another (a larger one keeps at least as much running, at no more cost), in order.
        """
        key = id(node)
        if key in memo:
            return memo[key]
        states: list[_State]
        if node.model is not None:
            states = [(bits.get(node.model, 0), frozenset((node.model,)))]
        elif node.ref is not None:
            states = self._evaluate(self._roots[node.ref], bits, memo)
        elif node.op == "|":
            states = []
            for child in node.children:
                for state in self._evaluate(child, bits, memo):
                    _keep_largest(states, state)
        else:
            states = [(0, frozenset())]
            for child in node.children:
                combined: list[_State] = []
                for left in states:
                    for right in self._evaluate(child, bits, memo):
                        _keep_largest(combined, (left[0] | right[0], left[1] | right[1]))
                states = combined
        memo[key] = states
        return states


def _keep_largest(states: list[_State], candidate: _State) -> None:
    """
    Add ``candidate`` to ``states`` unless one of them contains it; drop those it contains.
    """
    mask = candidate[0]
    if any(mask & other == mask for other, _ in states):
        return
    states[:] = [state for state in states if state[0] & mask != state[0]]
    states.append(candidate)


def _refs(node: _Node) -> list[str]:
    if node.ref is not None:
        return [node.ref]
    return [ref for child in node.children for ref in _refs(child)]


def _dependency_order(names: list[str], refs: Mapping[str, list[str]]) -> list[str]:
    """
    ``names`` with every set after the sets it references, otherwise in definition order.

    :raises MatrixError: when sets reference each other in a loop.
    """
    order: list[str] = []
    visiting: list[str] = []
    done: set[str] = set()

    def visit(name: str) -> None:
        if name in done:
            return
        if name in visiting:
            loop = " -> ".join(visiting[visiting.index(name):] + [name])
            raise MatrixError(f"sets reference each other in a loop: {loop}", name)
        visiting.append(name)
        for ref in dict.fromkeys(refs[name]):
            visit(ref)
        visiting.pop()
        done.add(name)
        order.append(name)

    for name in names:
        visit(name)
    return order

# -*- test-case-name: tests.test_targets -*-
"""
What a model name in a request reaches: a local model or a peer's model, through the active
profile and the selectors, in llama-swap head's order:

1. the active profile's pin for the name, if any, replaces it (a pin to ``""`` makes the name
   unavailable);
2. a selector id is replaced by one of the selector's targets, chosen by its strategy;
3. a local model id, then a local alias;
4. a peer model name: ``peer/model``, or a bare model id that one peer alone serves.

The name after steps 1 and 2 is the one the request goes on with: it is what the model's
``setParamsByID`` sees, and what the request body's ``model`` becomes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs

from swapproxy.config import Config, ModelConfig, PeerModel, SelectorConfig
from swapproxy.logs import proxy_logger
from swapproxy.upstream import State

log = proxy_logger("swapproxy.targets")


class NoTarget(Exception):
    """
    The name reaches no model; ``status`` is the HTTP status to answer.
    """

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _nothing() -> None:
    pass


@attrs.frozen
class Target:
    """
    Where one request goes.

    :ivar requested: the name the client sent.
    :ivar name: the name after the profile and the selector.
    :ivar model: the local model, or ``None`` for a peer's.
    :ivar peer: the peer's model, or ``None`` for a local one.
    :ivar selector: the selector that chose the target, if any.
    :ivar release: call once the request has ended (a spillover selector counts it until then).
    """

    requested: str
    name: str
    model: ModelConfig | None = None
    peer: PeerModel | None = None
    selector: str | None = None
    release: Callable[[], None] = _nothing


class ActiveProfile:
    """
    Which profile is active: none at start, and none again after a config reload.

    :param config: returns the configuration in force.
    """

    def __init__(self, config: Callable[[], Config]) -> None:
        self._config = config
        self._name: str | None = None
        self._chosen_in: Config | None = None
        #: Called with the new active profile's name (or ``None``) when it changes.
        self.observers: list[Callable[[str | None], None]] = []

    @property
    def name(self) -> str | None:
        """
        The active profile's name, or ``None``.
        """
        if self._name is not None and self._config() is not self._chosen_in:
            log.info("config reloaded: no profile is active now (was {profile})", profile=self._name)
            self._name = None
        return self._name

    def pins(self) -> dict[str, str]:
        """
        The active profile's pins (none when no profile is active).
        """
        name = self.name
        return dict(self._config().profiles[name].pins) if name is not None else {}

    def activate(self, name: str | None) -> None:
        """
        Make ``name`` the active profile, or none with ``None``.

        :raises KeyError: no profile has that name.
        """
        config = self._config()
        if name is not None and name not in config.profiles:
            raise KeyError(name)
        changed = name != self.name
        self._name, self._chosen_in = name, config
        if changed:
            log.info("active profile: {profile}", profile=name or "(none)")
            for observer in list(self.observers):
                observer(name)


class Spillover:
    """
    The requests in flight that each spillover selector sent to each of its targets.
    """

    def __init__(self) -> None:
        self._counts: dict[tuple[str, str], int] = {}
        self._turn: dict[str, int] = {}

    def count(self, selector: str, target: str) -> int:
        return self._counts.get((selector, target), 0)

    def choose(self, selector: SelectorConfig, resolved: list[str], states: dict[str, State | None]) -> int:
        """
        The index of the target for one more request, counted until its release.

        Targets whose model is loading or ready, or that have requests in flight, are active;
        the one with the fewest requests in flight gets the request while that is below
        ``spillover`` (ties go round in turn); else the first target that is not active (stopped
        local models, idle peers), else the least busy active one. A local model that is
        stopping (or found hung, and so being stopped) is skipped.

        :param resolved: each target's model id (``peer/model`` for a peer's).
        :param states: each local target's state (``None`` for peers).
        """
        active, cold = [], []
        for index, model in enumerate(resolved):
            state = states.get(model)
            busy = self.count(selector.id, model) > 0
            if state in (State.STOPPING, State.UNHEALTHY):
                continue
            if busy or state in (State.READY, State.STARTING):
                active.append(index)
            else:
                cold.append(index)
        if not active:
            return cold[0] if cold else 0
        least = min(self.count(selector.id, resolved[i]) for i in active)
        if least >= selector.spillover and cold:
            return cold[0]
        tied = [i for i in active if self.count(selector.id, resolved[i]) == least]
        turn = self._turn.get(selector.id, 0)
        self._turn[selector.id] = turn + 1
        return tied[turn % len(tied)]

    def reserve(self, selector: str, target: str) -> Callable[[], None]:
        """
        Count one request to ``target``; the returned function uncounts it (once).
        """
        key = (selector, target)
        self._counts[key] = self._counts.get(key, 0) + 1
        released: list[bool] = []

        def release() -> None:
            if not released:
                released.append(True)
                left = self._counts.get(key, 0) - 1
                if left > 0:
                    self._counts[key] = left
                else:
                    self._counts.pop(key, None)

        return release


class Targets:
    """
    Finds the `Target` of a requested name.

    :param config: returns the configuration in force.
    :param states: returns a local model's state by id (``None`` for an unknown id).
    :param profile: the active profile.
    """

    def __init__(self, config: Callable[[], Config], states: Callable[[str], State | None],
                 profile: ActiveProfile | None = None) -> None:
        self._config = config
        self._states = states
        self.profile = profile if profile is not None else ActiveProfile(config)
        self.spillover = Spillover()

    def find(self, requested: str, selectors: bool = True) -> Target:
        """
        The target of ``requested``; call its ``release`` once the request has ended.

        :param selectors: whether selector ids are looked up (``/upstream/`` paths do not).
        :raises NoTarget: 404 for a name that reaches no model (or that the active profile
            turned off).
        """
        config = self._config()
        name = requested
        pins = self.profile.pins()
        if name in pins:
            name = pins[name]
            if not name:
                raise NoTarget(404, f"model {requested!r} is not available while profile"
                                    f" {self.profile.name!r} is active")
        selector = config.selectors.get(name) if selectors else None
        release = _nothing
        if selector is not None:
            name, release = self._select(config, selector)
        model = config.resolve(name)
        if model is not None:
            return Target(requested, name, model=model, selector=selector.id if selector else None, release=release)
        peer = config.resolve_peer(name)
        if peer is not None:
            return Target(requested, name, peer=peer, selector=selector.id if selector else None, release=release)
        release()
        raise NoTarget(404, f"model {requested!r} not found; see GET /v1/models")

    def _select(self, config: Config, selector: SelectorConfig) -> tuple[str, Callable[[], None]]:
        targets = selector.targets
        if selector.strategy == "pin":
            return targets[0], _nothing
        resolved = [_model_id(config, t) for t in targets]
        states = {m: self._states(m) for m in resolved if m in config.models}
        if selector.strategy == "warm":
            for wanted in (State.READY, State.STARTING):
                for target, model in zip(targets, resolved):
                    if states.get(model) is wanted:
                        return target, _nothing
            return targets[0], _nothing
        index = self.spillover.choose(selector, resolved, states)
        return targets[index], self.spillover.reserve(selector.id, resolved[index])


def _model_id(config: Config, name: str) -> str:
    """
    A selector target's model: a local model id, or ``peer/model``.
    """
    model = config.resolve(name)
    if model is not None:
        return model.id
    peer = config.resolve_peer(name)
    return peer.fqn if peer is not None else name


def state_of(supervisor: Any) -> Callable[[str], State | None]:
    """
    A ``states`` function for `Targets` that reads the supervisor's upstreams.
    """

    def state(model_id: str) -> State | None:
        upstream = supervisor.upstreams.get(model_id)
        return upstream.state if upstream is not None else None

    return state

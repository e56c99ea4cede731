# -*- test-case-name: tests.test_supervisor -*-
"""
The supervisor's ``memoryBudget``: what each model is counted for, which idle models must stop for
another to fit, whether a model can ever fit, and the measurements of what the models use.

A model is counted for its ``memory``, else for what it was measured to use (the RSS of its process
tree plus its GPU memory, `swapproxy.memory.Footprints`, first `MEASURE_DELAY` after it is ready),
else for nothing. The choice of what to stop is `swapproxy.memory.make_room`'s; the running
processes, as the budget sees them, are the `Supervisor`'s to say.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.interfaces import IDelayedCall, IReactorTime

from swapproxy.config import Config, ModelConfig
from swapproxy.logs import proxy_logger
from swapproxy.memory import Footprints, Resident, available_memory, make_room, never_fits
from swapproxy.upstream import State, Upstream

#: Seconds after a model becomes ready that its footprint is first measured.
MEASURE_DELAY = 1.0

log = proxy_logger("swapproxy.supervisor")


class MemoryBudget:
    """
    One supervisor's memory budget.

    :param config: the configuration it starts with (``memoryBudget``).
    :param clock: times the first measurement of a ready model.
    :param footprints: measures what the models use.
    :param residents: the running processes but those leaving, as the budget sees them when a
        model must start: ``residents(model_id, leaving)``.

    :ivar limit: the bytes the running models may use together; ``None`` for no budget.
    """

    def __init__(
        self,
        config: Config,
        clock: IReactorTime,
        footprints: Footprints,
        residents: Callable[[str, list[Upstream]], list[Resident]],
    ) -> None:
        self._clock = clock
        self.footprints = footprints
        self._residents = residents
        self.limit: int | None = available_memory() if config.memory_budget_auto else config.memory_budget
        #: The first measurement of each ready model's footprint, due `MEASURE_DELAY` after ready.
        self._measure_calls: dict[Upstream, IDelayedCall] = {}

    def reconfigure(self, old: Config, new: Config) -> None:
        """
        Take a reloaded configuration's ``memoryBudget`` (``auto`` is not measured again).
        """
        if new.memory_budget_auto:
            if not old.memory_budget_auto:
                self.limit = available_memory()
        else:
            self.limit = new.memory_budget

    def need(self, model: ModelConfig) -> int:
        """
        What a model is counted for: its ``memory``, else what it was measured to use, else 0.
        """
        return model.memory or self.footprints.measured.get(model.id, 0)

    def memory_of(self, model: ModelConfig | None, model_id: str) -> dict[str, int | None]:
        """
        A model's declared (``memory``) and measured footprints in bytes; ``None`` when unknown.
        """
        return {"declared": model.memory if model is not None else None,
                "measured": self.footprints.measured.get(model_id)}

    def evictions(self, target: Upstream, placement: list[Upstream]) -> list[Upstream]:
        """
        The processes to stop, beyond ``placement`` (those in its way by group or matrix), for
        ``target``'s model to fit; none without a budget or when it already runs.
        """
        if self.limit is None or target.running:
            return []
        room = make_room(self.need(target.model), self.limit, self._residents(target.model.id, placement))
        return [resident.process for resident in room]

    def never_fits(self, model: ModelConfig) -> str | None:
        """
        Why ``model`` cannot fit even with every model stopped that may be; ``None`` when it can
        (or there is no budget).
        """
        if self.limit is None:
            return None
        return never_fits(model.id, self.need(model), "declared" if model.memory else "measured",
                          self.limit, self._residents(model.id, []))

    def state_changed(self, upstream: Upstream, new: State) -> None:
        """
        A current process changed state: a start begins a new measurement, and a ready model is
        measured `MEASURE_DELAY` later (not at once: it takes a millisecond or two, which its first
        requests should not wait for).
        """
        if new is State.STARTING:
            self.footprints.started(upstream.model.id)
        call = self._measure_calls.pop(upstream, None)
        if call is not None and call.active():
            call.cancel()
        if new is State.READY:
            self._measure_calls[upstream] = self._clock.callLater(MEASURE_DELAY, self._first_measure, upstream)

    def _first_measure(self, upstream: Upstream) -> None:
        del self._measure_calls[upstream]
        self.measure(upstream, force=True)

    def measure(self, upstream: Upstream, force: bool = False) -> None:
        """
        Measure what ``upstream`` uses now (at most once in a while, unless ``force``).
        """
        self.footprints.measure(upstream.model.id, upstream.pid, force).addErrback(
            lambda failure: log.failure("measuring the memory of {model}", failure, model=upstream.model.id))

    def stop(self) -> None:
        """
        Measure nothing more (swapproxy is shutting down).
        """
        for call in self._measure_calls.values():
            if call.active():
                call.cancel()
        self._measure_calls.clear()

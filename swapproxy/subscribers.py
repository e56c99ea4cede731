# -*- test-case-name: tests.test_board,tests.test_store -*-
"""
Who wants to hear of something: `Subscribers`, callbacks told of each event in turn.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from swapproxy.logs import proxy_logger

log = proxy_logger("swapproxy.subscribers")


class Subscribers:
    """
    Callbacks told of each event, in the order they subscribed.

    A callback that raises is dropped and its failure logged; whoever publishes never sees it.

    :param what: what is published, for that log message (``"activity"``, ``"model board"``).
    """

    def __init__(self, what: str) -> None:
        self._what = what
        self._callbacks: list[Callable[..., None]] = []

    def __len__(self) -> int:
        return len(self._callbacks)

    def add(self, callback: Callable[..., None]) -> Callable[[], None]:
        """
        Call ``callback`` with every event from now on.

        :returns: a function that unsubscribes it (calling it twice is harmless).
        """
        self._callbacks.append(callback)
        return lambda: self._remove(callback)

    def _remove(self, callback: Callable[..., None]) -> None:
        if callback in self._callbacks:
            self._callbacks.remove(callback)

    def publish(self, *event: Any) -> None:
        """
        Call every callback with ``event``.
        """
        for callback in list(self._callbacks):
            try:
                callback(*event)
            except Exception:
                self._remove(callback)
                log.failure("{what} subscriber {subscriber!r} failed; removed", what=self._what, subscriber=callback)

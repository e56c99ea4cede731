"""
The reactor a class is given, typed by what it needs of it.

A class that only keeps time takes an `IReactorTime`. zope interfaces cannot be intersected in an
annotation, so a class that needs more than one of the reactor's interfaces is given one of those
below, each the union of what it needs, as treq's ``_ITreqReactor`` is: they exist for the type
checker (nothing asks whether an object provides them), and the real reactor and the tests' fake
reactors are all of them.
"""

from __future__ import annotations

from twisted.internet.interfaces import IReactorProcess, IReactorTime

from swapproxy.twistedinternals import ITreqReactor


class IProcessClock(IReactorProcess, IReactorTime):
    """
    A reactor that spawns processes and keeps time: what a `swapproxy.child.ChildProcess` needs.
    """


class IUpstreamReactor(IProcessClock, ITreqReactor):
    """
    A reactor that spawns processes, keeps time and connects to servers by TCP: what an
    `swapproxy.upstream.Upstream` (and the supervisor that makes them) needs.
    """

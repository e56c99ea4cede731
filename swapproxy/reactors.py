"""
The reactor a class is given, typed by what it needs of it; and the transport of a connection.

A class that only keeps time takes an `IReactorTime`. zope interfaces cannot be intersected in an
annotation, so a class that needs more than one of the reactor's interfaces is given one of those
below, each the union of what it needs, as treq's own reactor type is: they exist for the type
checker (nothing asks whether an object provides them), and the real reactor is all of them.
Twisted types a protocol's transport as an `ITransport` or ``None``; a protocol of ours that
uses more of it declares ``transport: IStreamConnection``.
"""

from __future__ import annotations

from twisted.internet.interfaces import (
    IConsumer,
    IPushProducer,
    IReactorCore,
    IReactorProcess,
    IReactorThreads,
    IReactorTime,
    ITCPTransport,
)

from swapproxy.twistedinternals import ITreqReactor


class IProcessClock(IReactorProcess, IReactorTime):
    """
    A reactor that spawns processes and keeps time: what a `swapproxy.child.ChildProcess` needs.
    """


class IClientReactor(ITreqReactor):
    """
    A reactor that keeps time and connects by TCP, to host names too: what an HTTP client needs
    (treq's reactor).
    """


class IUpstreamReactor(IProcessClock, IClientReactor):
    """
    A reactor that spawns processes, keeps time and connects to servers: what an
    `swapproxy.upstream.Upstream` (and the supervisor that makes them) needs.
    """


class IThreadClock(IReactorThreads, IReactorTime):
    """
    A reactor that keeps time and runs work in its thread pool: what the activity store needs.
    """


class ISwapproxyReactor(IUpstreamReactor, IThreadClock, IReactorCore):
    """
    Everything swapproxy asks of the reactor: what `swapproxy.tap` gives the service tree and
    `swapproxy.web.root` gives the companions it makes.
    """


class IStreamConnection(ITCPTransport, IPushProducer, IConsumer):
    """
    The transport of a connected TCP protocol: it can abort, pause and resume reading (a push
    producer), and take a producer of what is written to it (a consumer).
    """

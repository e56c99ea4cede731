"""
Every private name of Twisted and treq that swapproxy uses, in one place.

Each is used because the public API has no way to do the same thing, and each is named here with
what it does for us. A Twisted (or treq) upgrade may rename or remove any of them without notice:
`tests.test_twistedinternals` checks each against the installed version and fails loudly, naming
the one that changed. Use them through this module, never from Twisted directly.
"""

from __future__ import annotations

from typing import Any

from treq._types import _ITreqReactor
from twisted.application.internet import StreamServerEndpointService
from twisted.internet.interfaces import IProtocol
from twisted.web.client import HTTPConnectionPool, _HTTP11ClientFactory
from twisted.web.http import HTTPChannel, Request

#: treq's reactor type: what `treq.client.HTTPClient.request` is typed to take as ``reactor``
#: (IReactorTCP, IReactorTime and IReactorPluggableNameResolver). For the type checker only.
ITreqReactor = _ITreqReactor


class QuietClientFactory(_HTTP11ClientFactory):
    """
    The factory of an `HTTPConnectionPool`'s connections, without a log line for every
    connection (Twisted's is private, and ``noisy``).
    """

    noisy = False


def quiet_pool(pool: HTTPConnectionPool) -> None:
    """
    Have ``pool`` make its connections with `QuietClientFactory` (its private ``_factory``).
    """
    pool._factory = QuietClientFactory


def raise_listen_errors(service: StreamServerEndpointService) -> None:
    """
    Have ``service`` raise a failure to listen from ``privilegedStartService``, as
    ``strports.service`` does (its private ``_raiseSynchronously``), instead of only logging it.
    """
    service._raiseSynchronously = True


def skip_form_parsing(request: Request) -> None:
    """
    Have ``request`` not parse its body as a form (its private ``_parsePOSTFormSubmission``).
    """
    request._parsePOSTFormSubmission = False


def handling_request(channel: HTTPChannel) -> bool:
    """
    Whether ``channel`` is in the middle of a request (its private ``_handlingRequest``).
    """
    return bool(channel._handlingRequest)


def unregister_channel(channel: HTTPChannel) -> None:
    """
    Unregister ``channel`` as its transport's producer, as Twisted registered it when the
    connection was made (through the channel's private ``_networkProducer``: the transport when
    it is a push producer, else a stand-in).
    """
    producer: Any = channel._networkProducer
    producer.unregisterProducer()


def hand_over(channel: HTTPChannel, protocol: IProtocol) -> None:
    """
    Give ``channel``'s connection to ``protocol``, as Twisted's own websocket support does
    (``HTTPChannel._protocolUpgradeForWebsockets``): the channel reads nothing more.
    """
    channel._protocolUpgradeForWebsockets(protocol)

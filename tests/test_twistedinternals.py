"""
Tests for L{swapproxy.twistedinternals}: the private names of Twisted and treq that swapproxy
uses still exist, and still do what it uses them for. A failure here after an upgrade names the
one that changed; fix its function in swapproxy/twistedinternals.py (and nothing else).
"""

from __future__ import annotations

from twisted.application.internet import StreamServerEndpointService
from twisted.internet.interfaces import IReactorTCP, IReactorTime
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import HTTPConnectionPool
from twisted.web.http import HTTPChannel, Request
from twisted.web.test.requesthelper import DummyChannel

from swapproxy import twistedinternals


class TwistedInternalsTests(SynchronousTestCase):
    """
    Each private name, on the installed Twisted and treq.
    """

    def changed(self, what: str) -> str:
        return (f"Twisted (or treq) changed {what}, which swapproxy uses: see "
                "swapproxy/twistedinternals.py")

    def test_treq_reactor(self) -> None:
        """
        treq's reactor type extends the reactor interfaces it is named for.
        """
        for interface in (IReactorTCP, IReactorTime):
            self.assertTrue(twistedinternals.ITreqReactor.extends(interface), self.changed("treq._types._ITreqReactor"))

    def test_quiet_pool(self) -> None:
        """
        A pool makes its connections with the factory in ``_factory``, which is quiet once set.
        """
        pool = HTTPConnectionPool(MemoryReactorClock())
        self.assertTrue(hasattr(pool, "_factory"), self.changed("HTTPConnectionPool._factory"))
        self.assertTrue(issubclass(twistedinternals.QuietClientFactory, pool._factory),
                        self.changed("twisted.web.client._HTTP11ClientFactory"))
        twistedinternals.quiet_pool(pool)
        self.assertIs(pool._factory, twistedinternals.QuietClientFactory)
        self.assertFalse(twistedinternals.QuietClientFactory(lambda protocol: None, "x").noisy)

    def test_raise_listen_errors(self) -> None:
        """
        ``_raiseSynchronously`` is a class attribute of the service, False unless set.
        """
        self.assertIs(getattr(StreamServerEndpointService, "_raiseSynchronously", None), False,
                      self.changed("StreamServerEndpointService._raiseSynchronously"))

    def test_skip_form_parsing(self) -> None:
        """
        A request parses form bodies unless ``_parsePOSTFormSubmission`` is cleared.
        """
        request = Request(DummyChannel())
        self.assertIs(getattr(request, "_parsePOSTFormSubmission", None), True,
                      self.changed("Request._parsePOSTFormSubmission"))
        twistedinternals.skip_form_parsing(request)
        self.assertIs(request._parsePOSTFormSubmission, False)

    def test_channel_internals(self) -> None:
        """
        A connected channel knows whether it handles a request, registered itself with its
        transport, and can hand its connection over.
        """
        channel = HTTPChannel()
        transport = StringTransport()
        channel.makeConnection(transport)
        self.assertIs(twistedinternals.handling_request(channel), False, self.changed("HTTPChannel._handlingRequest"))
        self.assertIs(transport.producer, channel)
        twistedinternals.unregister_channel(channel)
        self.assertIsNone(transport.producer, self.changed("HTTPChannel._networkProducer"))
        self.assertTrue(callable(getattr(channel, "_protocolUpgradeForWebsockets", None)),
                        self.changed("HTTPChannel._protocolUpgradeForWebsockets"))

    def test_hand_over(self) -> None:
        """
        After the hand-over, the connection's bytes go to the new protocol.
        """
        received: list[bytes] = []

        class Taker(Protocol):
            def dataReceived(self, data: bytes) -> None:
                received.append(data)

        channel = HTTPChannel()
        channel.makeConnection(StringTransport())
        taker = Factory.forProtocol(Taker).buildProtocol(None)
        twistedinternals.hand_over(channel, taker)
        channel.dataReceived(b"\x81\x00")
        self.assertEqual(received, [b"\x81\x00"], self.changed("HTTPChannel._protocolUpgradeForWebsockets"))

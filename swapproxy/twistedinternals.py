"""
Every private name of Twisted and treq that swapproxy uses, in one place.

Each is used because the public API has no way to do the same thing; a Twisted (or treq) upgrade
may rename or remove any of them without notice, and `tests.test_twistedinternals` fails loudly
when it does. Import them from here, never from Twisted directly.
"""

from __future__ import annotations

from treq._types import _ITreqReactor

#: treq's reactor type: what `treq.client.HTTPClient.request` is typed to take as ``reactor``
#: (IReactorTCP, IReactorTime and IReactorPluggableNameResolver). Typing only.
ITreqReactor = _ITreqReactor

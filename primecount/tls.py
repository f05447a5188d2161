"""The cipher suites an C{ssl:} port offers: Mozilla's "intermediate" profile by default (forward-secret AEAD
suites only for TLS 1.2), narrowed by C{--tls-ciphers}."""

from __future__ import annotations

from typing import Any, Optional

from twisted.internet.interfaces import IOpenSSLContextFactory
from twisted.protocols.policies import ProtocolWrapper
from zope.interface import implementer

from primecount.internals import withContextFactory

# https://ssl-config.mozilla.org/ "intermediate", version 5.7: the TLS 1.2 suites, in its order.
MOZILLA_INTERMEDIATE = ":".join([
    "ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-CHACHA20-POLY1305", "ECDHE-RSA-CHACHA20-POLY1305",
    "DHE-RSA-AES128-GCM-SHA256", "DHE-RSA-AES256-GCM-SHA384", "DHE-RSA-CHACHA20-POLY1305",
])


def cipherProblem(ciphers: str) -> str | None:
    """Why OpenSSL would refuse the cipher string C{ciphers} (none of it usable), or C{None}."""
    from OpenSSL import SSL

    try:
        SSL.Context(SSL.TLS_METHOD).set_cipher_list(ciphers.encode("ascii"))
    except (SSL.Error, UnicodeEncodeError) as error:
        return f"OpenSSL accepts none of it ({error})"
    return None


@implementer(IOpenSSLContextFactory)
class _RestrictedCiphers:
    """A TLS context factory (declared as one, so that Twisted does not warn of a legacy factory at every
    start): another one's context, with its TLS 1.2 cipher list replaced."""

    def __init__(self, contextFactory: Any, ciphers: str) -> None:
        self._contextFactory = contextFactory
        self._ciphers = ciphers.encode("ascii")
        self._context: Any = None

    def getContext(self) -> Any:
        """The wrapped factory's context (built once, as Twisted's own is), with the cipher list set."""
        if self._context is None:
            self._context = self._contextFactory.getContext()
            self._context.set_cipher_list(self._ciphers)
        return self._context


def withCiphers(endpoint: Any, ciphers: str) -> Any:
    """The C{ssl:} server endpoint C{endpoint} offering only C{ciphers} for TLS 1.2 (and before, if enabled)."""
    return withContextFactory(endpoint, lambda contextFactory: _RestrictedCiphers(contextFactory, ciphers))


def tlsLayer(transport: Any) -> Optional[Any]:
    """The TLS layer (Twisted's C{TLSMemoryBIOProtocol}) a connection's transport runs over, under any wrapping
    layers such as the PROXY-header reader; C{None} for plain TCP, at the cost of one C{isinstance}."""
    if not isinstance(transport, ProtocolWrapper):
        return None
    try:
        from twisted.protocols.tls import TLSMemoryBIOProtocol
    except ImportError:  # without pyOpenSSL no TLS port can exist
        return None
    layer = transport
    while isinstance(layer, ProtocolWrapper):
        if isinstance(layer, TLSMemoryBIOProtocol):
            return layer
        layer = layer.transport
    return None

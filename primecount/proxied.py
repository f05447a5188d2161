"""The PROXY protocol (v1 and v2) in front of the request protocol, for a primecount behind HAProxy.

Twisted's own C{haproxy:} wrapper builds the request protocol at connect time,
with the proxy's address, and learns the client's only later (Twisted issue
12501); it also gives up on a header split across reads. Here the request
protocol is built only once the header has been read, with the client address
it carries, so records, logs, metrics and C{--max-per-ip} all see the client.
Only connections from the listed proxies (C{--proxy-from}) may send a header;
any other is closed before a byte of it is read.
"""

from __future__ import annotations

import ipaddress
import struct
from typing import Any, Iterable, Optional, Sequence, Union

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IAddress, IDelayedCall, IHalfCloseableProtocol, IReactorTime
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.protocols.haproxy._exceptions import InvalidProxyHeader
from twisted.protocols.haproxy._v1parser import V1Parser
from twisted.protocols.haproxy._v2parser import V2Parser
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from zope.interface import directlyProvides, implementer, providedBy

from primecount.limits import peerKey
from primecount.metrics import NoMetrics

Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]
# Proxies on this host are trusted unless --proxy-from says otherwise: see docs/scaling.md.
LOOPBACK = "127.0.0.0/8,::1/128"
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V1_SIGNATURE = b"PROXY "
# HAProxy's own v2 headers in TCP mode are a few dozen bytes; TLVs add a few hundred at most.
MAX_HEADER = 4096


def parseNetworks(value: str) -> tuple[Network, ...]:
    """C{CIDR[,CIDR...]} as networks; a bare address is a network of one. Raises C{ValueError} if malformed."""
    networks = tuple(ipaddress.ip_network(part.strip(), strict=False) for part in value.split(",") if part.strip())
    if not networks:
        raise ValueError("no address given")
    return networks


def isTrusted(host: str, networks: Iterable[Network]) -> bool:
    """Whether the peer C{host} (IPv4-mapped IPv6 counts as IPv4) is inside one of C{networks}."""
    try:
        address = ipaddress.ip_address(peerKey(host))
    except ValueError:
        return False
    return any(address.version == network.version and address in network for network in networks)


def listensBeyondLoopback(interface: str) -> bool:
    """Whether a listener bound to C{interface} ('' is every interface) can be reached from other hosts."""
    try:
        return not ipaddress.ip_address(interface.split("%", 1)[0]).is_loopback
    except ValueError:
        return True


def _canonical(address: Union[IPv4Address, IPv6Address]) -> Union[IPv4Address, IPv6Address]:
    """The same address with its host written the usual way (C{2001:db8::5}, not the header's long form)."""
    host = str(ipaddress.ip_address(address.host))
    return type(address)(address.type, host, address.port)


class _HeaderReader:
    """Accumulates the first bytes of a connection until they hold a whole PROXY header, v1 or v2."""

    def __init__(self) -> None:
        self._held = b""  # until the header's version is known
        self._parser: Optional[Union[V1Parser, V2Parser]] = None

    def feed(self, data: bytes) -> tuple[Any, bytes]:
        """The parsed header and the bytes after it, or C{(None, b"")} while incomplete; raises if malformed."""
        if self._parser is None:
            self._held += data
            held = self._held
            if held.startswith(V2_SIGNATURE[: len(held)]) and len(held) < 16:
                return None, b""
            if V1_SIGNATURE.startswith(held[: len(V1_SIGNATURE)]) and len(held) < len(V1_SIGNATURE):
                return None, b""
            if held.startswith(V2_SIGNATURE):
                # The header says its own length; refuse one too long to be HAProxy's before buffering it.
                if struct.unpack("!H", held[14:16])[0] + 16 > MAX_HEADER:
                    raise InvalidProxyHeader()
                self._parser = V2Parser()
            elif held.startswith(V1_SIGNATURE):
                self._parser = V1Parser()  # it refuses a line of over 107 bytes itself
            else:
                raise InvalidProxyHeader()
            data, self._held = held, b""
        info, rest = self._parser.feed(data)
        if info is None:
            return None, b""
        return info, rest or b""


@implementer(IHalfCloseableProtocol)
class ProxyHeaderProtocol(ProtocolWrapper):
    """Reads the PROXY header, then hands the connection to a request protocol built for the client address.

    Until then nothing is answered: a missing or malformed header, or one not
    complete within the request deadline, closes the connection with one log
    line; a health check (a v2 C{LOCAL} header, v1 C{UNKNOWN}, or a connect and
    close) closes it quietly.
    """

    log = Logger()

    def __init__(self, factory: "ProxiedFactory") -> None:
        super().__init__(factory, None)  # type: ignore[arg-type]
        self._reader = _HeaderReader()
        self._client: Optional[IAddress] = None
        self._deadline: Optional[IDelayedCall] = None
        self._received = 0
        self._closing = False

    def makeConnection(self, transport: Any) -> None:
        """Take the transport; the request protocol comes later, once the header is read."""
        directlyProvides(self, providedBy(transport))
        Protocol.makeConnection(self, transport)
        self.factory.registerProtocol(self)

    def connectionMade(self) -> None:
        """The header must arrive within the request deadline."""
        self._deadline = self.factory.clock.callLater(self.factory.timeout, self._headerTooSlow)

    def dataReceived(self, data: bytes) -> None:
        """Bytes of the header, then of the requests."""
        if self.wrappedProtocol is not None:
            self.wrappedProtocol.dataReceived(data)
            return
        if self._closing:
            return
        self._received += len(data)
        try:
            info, rest = self._reader.feed(data)
        except InvalidProxyHeader:
            self._refuse("malformed", "no valid PROXY header")
            return
        if info is None:
            return
        self._cancelDeadline()
        if not isinstance(info.source, (IPv4Address, IPv6Address)):
            self._refuse("health_check", None)  # LOCAL or UNKNOWN: the proxy checking that we are up
            return
        self._client = _canonical(info.source)
        protocol = self.factory.wrappedFactory.buildProtocol(self._client)
        if protocol is None:
            self._refuse("refused", None)
            return
        self.wrappedProtocol = protocol
        protocol.makeConnection(self)
        if rest:
            protocol.dataReceived(rest)

    def getPeer(self) -> IAddress:
        """The client's address from the header once read; the proxy's before."""
        return self._client or self.transport.getPeer()

    def readConnectionLost(self) -> None:
        """The client half-closed: the request protocol decides; before the header there is nothing to do."""
        if self.wrappedProtocol is not None:
            self.wrappedProtocol.readConnectionLost()
        elif not self._closing:
            self._refuse("empty" if not self._received else "incomplete",
                         None if not self._received else "closed before its PROXY header was complete")

    def writeConnectionLost(self) -> None:
        """Our side finished writing."""
        if self.wrappedProtocol is not None:
            self.wrappedProtocol.writeConnectionLost()

    def connectionLost(self, reason: Any) -> None:
        """Tell the request protocol, if there is one; otherwise count how the connection ended."""
        self._cancelDeadline()
        if self.wrappedProtocol is not None:
            super().connectionLost(reason)
            return
        self.factory.unregisterProtocol(self)
        if not self._closing:
            self.factory.metrics.connectionWithoutRequest("empty" if not self._received else "incomplete")

    def _headerTooSlow(self) -> None:
        self._deadline = None
        self._refuse("timeout", f"no complete PROXY header within {self.factory.timeout:g} s")

    def _refuse(self, outcome: str, problem: Optional[str]) -> None:
        self._closing = True
        self._cancelDeadline()
        self.factory.metrics.connectionWithoutRequest(outcome)
        if problem is not None:
            self.log.warn("closed connection from proxy {proxy}: {problem}",
                          proxy=self.transport.getPeer().host, problem=problem)
        self.transport.loseConnection()

    def _cancelDeadline(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None


class ProxiedFactory(WrappingFactory):
    """Accepts connections only from the trusted proxies and reads a PROXY header on each before serving it."""

    protocol = ProxyHeaderProtocol  # type: ignore[assignment]
    noisy = False
    log = Logger()

    def __init__(
        self, wrappedFactory: Factory, trusted: Sequence[Network], clock: IReactorTime, timeout: float,
        metrics: NoMetrics = NoMetrics(),
    ) -> None:
        super().__init__(wrappedFactory)
        self.trusted = tuple(trusted)
        self.clock = clock
        self.timeout = timeout
        self.metrics = metrics
        self._lastRefusalLog = float("-inf")
        self._refusedSinceLog = 0

    def buildProtocol(self, addr: IAddress) -> Optional[Protocol]:
        """A header reader for a trusted proxy; C{None} (Twisted closes the socket at once) for anyone else."""
        host = getattr(addr, "host", "")
        if isTrusted(host, self.trusted):
            return self.protocol(self)
        self.metrics.connectionWithoutRequest("untrusted")
        self._refusedSinceLog += 1
        now = self.clock.seconds()
        if now - self._lastRefusalLog >= 1.0:  # one line a second at most, however many try
            self.log.warn(
                "refused {count} connections to the PROXY-protocol port from addresses not in --proxy-from "
                "(last from {peer})", count=self._refusedSinceLog, peer=host,
            )
            self._lastRefusalLog, self._refusedSinceLog = now, 0
        return None


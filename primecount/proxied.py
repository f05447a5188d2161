"""The PROXY protocol (v1 and v2) in front of the request protocol, for a primecount behind HAProxy: the request
protocol is built only once the header is read, with the client address it carries."""

from __future__ import annotations

import ipaddress
import struct
from typing import Any, Iterable, NamedTuple, Optional, Sequence, Union

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IAddress, IDelayedCall, IHalfCloseableProtocol, IReactorTime
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from zope.interface import directlyProvides, implementer, providedBy

from primecount.internals import proxyV2Parser
from primecount.limits import Throttle, canonicalHost
from primecount.metrics import NoMetrics

Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]
# Proxies on this host are trusted unless --proxy-from says otherwise: see docs/scaling.md.
LOOPBACK = "127.0.0.0/8,::1/128"
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V1_SIGNATURE = b"PROXY "
# HAProxy's own v2 headers in TCP mode are a few dozen bytes; TLVs add a few hundred at most.
MAX_HEADER = 4096
# The longest v1 header the protocol allows, CRLF included.
V1_MAX = 107


class MalformedHeader(Exception):
    """The first bytes of a connection are not a valid PROXY header; the message says why."""


def parseV1(line: bytes) -> Optional[tuple[str, int]]:
    """The client host (canonical, see L{canonicalHost}) and port of a whole v1 header line (CRLF included),
    or C{None} for C{UNKNOWN} (a health check); L{MalformedHeader} for anything else.

    Only literal addresses of the family the header names are taken: no host
    names, no IPv4 written with leading zeros, no IPv6 scope id; ports are
    plain decimal numbers up to 65535.
    """
    if not line.endswith(b"\r\n") or not line.isascii():
        raise MalformedHeader("v1 header not ASCII ending in CRLF")
    words = line[:-2].decode("ascii").split(" ")
    if words[0] != "PROXY" or len(words) < 2:
        raise MalformedHeader("v1 header does not start with 'PROXY '")
    if words[1] == "UNKNOWN":
        return None
    if len(words) != 6 or words[1] not in ("TCP4", "TCP6"):
        raise MalformedHeader("v1 header needs TCP4 or TCP6 and four fields")
    version = 4 if words[1] == "TCP4" else 6
    source, _ = (_literalAddress(text, version) for text in words[2:4])
    sourcePort, _ = (_port(text) for text in words[4:6])
    return canonicalHost(str(source)), sourcePort


def _literalAddress(text: str, version: int) -> Union[ipaddress.IPv4Address, ipaddress.IPv6Address]:
    if "%" in text:
        raise MalformedHeader("v1 header address has a scope id")
    try:
        address = ipaddress.ip_address(text)  # refuses names and IPv4 with leading zeros
    except ValueError:
        raise MalformedHeader("v1 header address is not a literal IP address") from None
    if address.version != version:
        raise MalformedHeader(f"v1 header address is not IPv{version}")
    return address


def _port(text: str) -> int:
    if not (text.isascii() and text.isdigit()) or (len(text) > 1 and text[0] == "0") or int(text) > 65535:
        raise MalformedHeader("v1 header port is not a number from 0 to 65535")
    return int(text)


def clientAddress(host: str, port: int) -> Union[IPv4Address, IPv6Address]:
    """A Twisted address for a canonical client C{host}."""
    return (IPv6Address if ":" in host else IPv4Address)("TCP", host, port)


def parseNetworks(value: str) -> tuple[Network, ...]:
    """C{CIDR[,CIDR...]} as networks; a bare address is a network of one. Raises C{ValueError} if malformed."""
    networks = tuple(ipaddress.ip_network(part.strip(), strict=False) for part in value.split(",") if part.strip())
    if not networks:
        raise ValueError("no address given")
    return networks


def isTrusted(host: str, networks: Iterable[Network]) -> bool:
    """Whether the peer C{host} (IPv4-mapped IPv6 counts as IPv4) is inside one of C{networks}."""
    try:
        address = ipaddress.ip_address(canonicalHost(host))
    except ValueError:
        return False
    return any(address.version == network.version and address in network for network in networks)


def listensBeyondLoopback(interface: str) -> bool:
    """Whether a listener bound to C{interface} ('' is every interface) can be reached from other hosts."""
    try:
        return not ipaddress.ip_address(interface.split("%", 1)[0]).is_loopback
    except ValueError:
        return True


class Header(NamedTuple):
    """A whole PROXY header: the client it names (C{None} for a health check) and the bytes that followed it."""

    client: Optional[Union[IPv4Address, IPv6Address]]
    rest: bytes


class _HeaderReader:
    """Accumulates the first bytes of a connection until they hold a whole PROXY header, v1 or v2."""

    def __init__(self) -> None:
        self._held = b""  # until the header's version is known, and a v1 header until its CRLF
        self._v2: Any = None  # a PROXY v2 parser, once the header says it is v2

    def feed(self, data: bytes) -> Optional[Header]:
        """The L{Header} once whole, C{None} while incomplete; L{MalformedHeader} if malformed."""
        if self._v2 is not None:
            return self._feedV2(data)
        held = self._held = self._held + data
        if held.startswith(V2_SIGNATURE[: len(held)]) and len(held) < 16:
            return None
        if held.startswith(V2_SIGNATURE):
            # The header says its own length; refuse one too long to be HAProxy's before buffering it.
            if struct.unpack("!H", held[14:16])[0] + 16 > MAX_HEADER:
                raise MalformedHeader("v2 header longer than any HAProxy sends")
            self._v2, self._held = proxyV2Parser(), b""
            return self._feedV2(held)
        if not V1_SIGNATURE.startswith(held[: len(V1_SIGNATURE)]):
            raise MalformedHeader("no valid PROXY header")
        end = held.find(b"\n", 0, V1_MAX)
        if end < 0:
            if len(held) >= V1_MAX:
                raise MalformedHeader(f"v1 header longer than {V1_MAX} bytes")
            return None
        parsed = parseV1(held[: end + 1])
        rest = held[end + 1:]
        self._held = b""
        return Header(None if parsed is None else clientAddress(*parsed), rest)

    def _feedV2(self, data: bytes) -> Optional[Header]:
        assert self._v2 is not None
        try:
            info, rest = self._v2.feed(data)
        except Exception as error:  # Twisted's parser raises more than InvalidProxyHeader on odd input
            raise MalformedHeader(f"v2 header: {error.__class__.__name__}") from None
        if info is None:
            return None
        source = info.source
        if not isinstance(source, (IPv4Address, IPv6Address)):
            return Header(None, rest or b"")  # LOCAL, or an address family other than TCP: a health check
        return Header(clientAddress(canonicalHost(source.host), source.port), rest or b"")


@implementer(IHalfCloseableProtocol)
class ProxyHeaderProtocol(ProtocolWrapper):
    """Reads the PROXY header, then hands the connection to a request protocol built for the client address; a bad
    or late header closes it with one log line, a health check (v2 C{LOCAL}, v1 C{UNKNOWN}) quietly."""

    log = Logger()

    def __init__(self, factory: "ProxiedFactory") -> None:
        super().__init__(factory, None)  # type: ignore[arg-type]
        self._reader = _HeaderReader()
        self._client: Optional[IAddress] = None
        self._deadline: Optional[IDelayedCall] = None
        self._received = 0
        self._closing = False
        self._counted = True  # holds a place in the connection total until the request protocol takes over

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
            header = self._reader.feed(data)
        except MalformedHeader as error:
            self._refuse("malformed", str(error))
            return
        if header is None:
            return
        self._cancelDeadline()
        client, rest = header
        if client is None:
            self._refuse("health_check", None)  # LOCAL or UNKNOWN: the proxy checking that we are up
            return
        self._client = client
        self._uncount()  # the request protocol counts the connection now, under the client's address
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
        self._uncount()
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
            count = self.factory.refusalLog.event(self.factory.clock.seconds())
            if count is not None:  # one line a second at most, however many bad headers arrive
                self.log.warn("closed {count} connections from proxies without a valid PROXY header "
                              "(last from {proxy}: {problem})",
                              count=count, proxy=self.transport.getPeer().host, problem=problem)
        self.transport.loseConnection()

    def _uncount(self) -> None:
        if self._counted:
            self._counted = False
            self.factory.wrappedFactory.connectionLimits.release(None)

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
        self.refusalLog = Throttle()  # bad headers from trusted proxies
        self._untrustedLog = Throttle()

    def buildProtocol(self, addr: IAddress) -> Optional[Protocol]:
        """A header reader for a trusted proxy, counted in the connection total while it reads (or, over the
        total, C{ERROR busy} for the proxy to pass on); C{None} (Twisted closes the socket at once) for anyone
        else."""
        host = getattr(addr, "host", "")
        if isTrusted(host, self.trusted):
            over = self.wrappedFactory.connectionLimits.tryAcquire(None)
            if over is not None:
                return self.wrappedFactory.refuse(canonicalHost(host), over)
            return self.protocol(self)
        self.metrics.connectionWithoutRequest("untrusted")
        count = self._untrustedLog.event(self.clock.seconds())
        if count is not None:  # one line a second at most, however many try
            self.log.warn(
                "refused {count} connections to the PROXY-protocol port from addresses not in --proxy-from "
                "(last from {peer})", count=count, peer=host,
            )
        return None


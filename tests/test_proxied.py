"""Tests for L{primecount.proxied}: the PROXY header read before the request protocol is built for the client."""

from __future__ import annotations

import socket
import struct

from twisted.internet.address import IPv4Address
from twisted.logger import Logger
from twisted.trial.unittest import SynchronousTestCase

from primecount.limits import ConnectionLimits
from primecount.protocol import PrimeCountFactory, RequestLimits
from primecount.proxied import (
    LOOPBACK,
    V2_SIGNATURE,
    ProxiedFactory,
    ProxyHeaderProtocol,
    isTrusted,
    listensBeyondLoopback,
    parseNetworks,
)
from primecount.responder import Responder
from tests.helpers import HalfCloseTransport, InlineThreads, MemoryRecords, RecordingMetrics, expectedReply
from twisted.internet.task import Clock


def v1(client: str, port: int = 40001) -> bytes:
    """A PROXY v1 header from C{client} to 127.0.0.1:5050."""
    family = "TCP6" if ":" in client else "TCP4"
    server = "::1" if ":" in client else "127.0.0.1"
    return f"PROXY {family} {client} {server} {port} 5050\r\n".encode()


def v2(client: str, port: int = 40001, local: bool = False) -> bytes:
    """A PROXY v2 header (PROXY command, or LOCAL as HAProxy's health checks send)."""
    if local:
        return V2_SIGNATURE + bytes([0x20, 0x00]) + struct.pack("!H", 0)
    family, kind, server = ((socket.AF_INET6, 0x21, "::1") if ":" in client else (socket.AF_INET, 0x11, "127.0.0.1"))
    addresses = socket.inet_pton(family, client) + socket.inet_pton(family, server) + struct.pack("!HH", port, 5050)
    return V2_SIGNATURE + bytes([0x21, kind]) + struct.pack("!H", len(addresses)) + addresses


class ProxiedHarness:
    """A request factory behind a L{ProxiedFactory}, one connection from C{proxy} on a L{HalfCloseTransport}."""

    def __init__(self, proxy: str = "127.0.0.1", trusted: str = LOOPBACK, maxPerPeer: int = 0,
                 limits: RequestLimits = RequestLimits(keepAlive=True)) -> None:
        self.clock, self.records, self.metrics = Clock(), MemoryRecords(), RecordingMetrics()
        self.requests = PrimeCountFactory(limits, self.clock, Responder(self.clock, InlineThreads(), self.records),
                                          self.metrics, ConnectionLimits(1000, maxPerPeer))
        self.factory = ProxiedFactory(self.requests, parseNetworks(trusted), self.clock, 5.0, self.metrics)
        self.events: list[dict] = []
        ProxyHeaderProtocol.log = Logger(observer=self.events.append)
        self.proxy = proxy

    def connect(self) -> tuple[object, HalfCloseTransport]:
        """A new connection from the proxy: its protocol (or None if refused) and its transport."""
        address = IPv4Address("TCP", self.proxy, 55555)
        protocol = self.factory.buildProtocol(address)
        transport = HalfCloseTransport(peerAddress=address)
        if protocol is not None:
            protocol.makeConnection(transport)
        return protocol, transport

    def send(self, protocol: object, *chunks: bytes) -> None:
        """Deliver C{chunks} one read each, then finish the turn."""
        for chunk in chunks:
            protocol.dataReceived(chunk)  # type: ignore[attr-defined]
        self.clock.advance(0)


class HeaderTests(SynchronousTestCase):
    """The client address in the header is the one recorded; the header may arrive in any pieces."""

    def tearDown(self) -> None:
        ProxyHeaderProtocol.log = Logger()

    def test_v1SplitAtEveryByte(self) -> None:
        """A v1 header and a request, cut in two anywhere, give one record with the client's address."""
        payload = v1("198.51.100.7") + b"abc2a\n"
        for cut in range(len(payload) + 1):
            harness = ProxiedHarness()
            protocol, transport = harness.connect()
            harness.send(protocol, payload[:cut], payload[cut:])
            self.assertEqual(transport.value(), expectedReply("abc2a"), f"cut at {cut}")
            self.assertEqual([r.client for r in harness.records.records], ["198.51.100.7"])

    def test_v2SplitAtEveryByte(self) -> None:
        """A v2 header (IPv4 and IPv6 clients), one byte per read, gives the client's address."""
        for client in ("203.0.113.9", "2001:db8::5"):
            harness = ProxiedHarness()
            protocol, transport = harness.connect()
            payload = v2(client) + b"aa\n"
            harness.send(protocol, *[payload[i:i + 1] for i in range(len(payload))])
            self.assertEqual(transport.value(), expectedReply("aa"))
            self.assertEqual([r.client for r in harness.records.records], [client])

    def test_headerAndManyRequestsInOneRead(self) -> None:
        """A v2 header arriving with 5,000 bytes of pipelined requests in the same read is not taken as oversized."""
        harness = ProxiedHarness()
        protocol, transport = harness.connect()
        messages = [f"request number {n}" for n in range(300)]
        harness.send(protocol, v2("198.51.100.8") + b"".join(m.encode() + b"\n" for m in messages))
        self.assertEqual(transport.value(), b"".join(expectedReply(m) for m in messages))

    def test_oversizedV2(self) -> None:
        """A v2 header announcing more than 4 KiB is refused at once."""
        harness = ProxiedHarness()
        protocol, transport = harness.connect()
        harness.send(protocol, V2_SIGNATURE + bytes([0x21, 0x11]) + struct.pack("!H", 5000))
        self.assertTrue(transport.disconnecting)
        self.assertEqual(transport.value(), b"")

    def test_perAddressLimitCountsClients(self) -> None:
        """With C{--max-per-ip 1} two clients behind one proxy are both served; a second from one is busy."""
        harness = ProxiedHarness(maxPerPeer=1)
        replies = []
        for client in ("198.51.100.1", "198.51.100.2", "198.51.100.1"):
            protocol, transport = harness.connect()
            harness.send(protocol, v1(client))
            replies.append(transport.value())
        self.assertEqual(replies, [b"", b"", b"ERROR busy\n"])

    def test_malformedClosesWithOneLogLine(self) -> None:
        """A connection that does not start with a PROXY header is closed, unanswered, with one log line."""
        harness = ProxiedHarness()
        protocol, transport = harness.connect()
        harness.send(protocol, b"GET / HTTP/1.0\r\n\r\n")
        self.assertEqual((transport.value(), transport.disconnecting), (b"", True))
        self.assertEqual(len(harness.events), 1)
        self.assertIn("no valid PROXY header", harness.events[0]["problem"])
        self.assertEqual(harness.records.records, [])
        self.assertIn(("connectionWithoutRequest", "malformed"), harness.metrics.events)

    def test_oversizedV1(self) -> None:
        """A v1 line longer than the protocol allows is malformed, not buffered for ever."""
        harness = ProxiedHarness()
        protocol, transport = harness.connect()
        harness.send(protocol, b"PROXY TCP4 " + b"1" * 200)
        self.assertTrue(transport.disconnecting)

    def test_headerDeadline(self) -> None:
        """A header not complete within the request deadline closes the connection."""
        harness = ProxiedHarness()
        protocol, transport = harness.connect()
        harness.send(protocol, b"PROXY TCP4 198.51")
        harness.clock.advance(4.9)
        self.assertFalse(transport.disconnecting)
        harness.clock.advance(0.2)
        self.assertTrue(transport.disconnecting)
        self.assertIn(("connectionWithoutRequest", "timeout"), harness.metrics.events)


class HealthCheckTests(SynchronousTestCase):
    """HAProxy's health checks are neither errors nor records."""

    def tearDown(self) -> None:
        ProxyHeaderProtocol.log = Logger()

    def test_v2Local(self) -> None:
        """A v2 LOCAL header closes quietly: no reply, no log line, no record, counted as a health check."""
        harness = ProxiedHarness()
        protocol, transport = harness.connect()
        harness.send(protocol, v2("", local=True))
        self.assertEqual((transport.value(), transport.disconnecting, harness.events), (b"", True, []))
        self.assertIn(("connectionWithoutRequest", "health_check"), harness.metrics.events)

    def test_connectAndClose(self) -> None:
        """A connect and close with no byte is counted as empty and not logged."""
        harness = ProxiedHarness()
        protocol, transport = harness.connect()
        protocol.readConnectionLost()  # type: ignore[attr-defined]
        protocol.connectionLost(None)  # type: ignore[attr-defined]
        self.assertEqual((transport.value(), harness.events), (b"", []))
        self.assertIn(("connectionWithoutRequest", "empty"), harness.metrics.events)


class TrustTests(SynchronousTestCase):
    """Only the listed proxies may send a header; the rest are refused before a byte is read."""

    def tearDown(self) -> None:
        ProxyHeaderProtocol.log = Logger()

    def test_untrustedRefusedAtConnect(self) -> None:
        """A connection from outside C{--proxy-from} gets no protocol (Twisted closes it) and is counted."""
        harness = ProxiedHarness(proxy="192.0.2.50", trusted="127.0.0.1/32,10.1.0.0/16")
        protocol, _ = harness.connect()
        self.assertIsNone(protocol)
        self.assertIn(("connectionWithoutRequest", "untrusted"), harness.metrics.events)

    def test_trustedNetwork(self) -> None:
        """A proxy inside a listed network is read."""
        harness = ProxiedHarness(proxy="10.1.2.3", trusted="127.0.0.1/32,10.1.0.0/16")
        protocol, _ = harness.connect()
        self.assertIsNotNone(protocol)

    def test_isTrusted(self) -> None:
        """Addresses match their own family's networks; IPv4-mapped IPv6 counts as IPv4; junk is not trusted."""
        networks = parseNetworks(LOOPBACK)
        self.assertEqual([isTrusted(h, networks) for h in ("127.0.0.9", "::1", "::ffff:127.0.0.1", "10.0.0.1", "x")],
                         [True, True, True, False, False])

    def test_parseNetworks(self) -> None:
        """Bare addresses are networks of one; an empty or malformed list is an error."""
        self.assertEqual([str(n) for n in parseNetworks("192.0.2.7, 10.0.0.0/8")], ["192.0.2.7/32", "10.0.0.0/8"])
        for bad in ("", "10.0.0.0/33", "proxy.example"):
            self.assertRaises(ValueError, parseNetworks, bad)

    def test_listensBeyondLoopback(self) -> None:
        """Every interface and public addresses are beyond loopback; 127.x and ::1 are not."""
        self.assertEqual([listensBeyondLoopback(i) for i in ("", "0.0.0.0", "::", "192.0.2.1", "127.0.0.1", "::1")],
                         [True, True, True, True, False, False])

"""Tests for L{primecount.proxied}: the PROXY header read before the request protocol is built for the client."""

from __future__ import annotations

import os
import socket
import struct
import time

from twisted.internet.address import IPv4Address
from twisted.logger import Logger
from twisted.trial.unittest import SynchronousTestCase

from primecount.limits import ConnectionLimits
from primecount.connection import RequestLimits
from primecount.proxied import (
    LOOPBACK,
    V2_SIGNATURE,
    ProxiedFactory,
    ProxyHeaderProtocol,
    isTrusted,
    listensBeyondLoopback,
    parseNetworks,
)
from primecount.records.formats import parseRecords
from primecount.responder import Responder
from primecount.tools.serverprocess import ServerProcess
from tests.helpers import (
    HalfCloseTransport, InlineThreads, MemoryRecords, RecordingMetrics, expectedReply, requestFactory, scrape, slow,
    waitUntil,
)
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
        self.requests = requestFactory(limits, self.clock, Responder(self.clock, InlineThreads(), self.records),
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

    def test_malformedV1NeverRaises(self) -> None:
        """Bad ports, host names, IPv4 with leading zeros, scope ids, mismatched families, missing fields:
        each is a counted malformed close, with no traceback and no request protocol built."""
        headers = [
            b"PROXY TCP4 1.2.3.4 5.6.7.8 x 1\r\n", b"PROXY TCP4 evil.example 5.6.7.8 1 2\r\n",
            b"PROXY TCP4 006.006.006.016 5.6.7.8 1 2\r\n", b"PROXY TCP6 fe80::1%evil ::1 1 2\r\n",
            b"PROXY TCP4 ::1 ::1 1 2\r\n", b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n", b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n", b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n",
            b"PROXY  TCP4 1.2.3.4 5.6.7.8 1 2\r\n", b"PROXY TCP4 1.2.3.4 5.6.7.8 \xd9\xa1 2\r\n", b"PROXY\r\n",
        ]
        for header in headers:
            harness = ProxiedHarness()
            protocol, transport = harness.connect()
            harness.send(protocol, header + b"abc2a\n")
            self.assertEqual((transport.value(), transport.disconnecting), (b"", True), header)
            self.assertEqual(harness.records.records, [], header)
            self.assertIn(("connectionWithoutRequest", "malformed"), harness.metrics.events, header)
            self.assertNotIn(("connectionWithoutRequest", "incomplete"), harness.metrics.events, header)

    def test_malformedLoggedOncePerSecond(self) -> None:
        """200 malformed headers in one second give one log line; the next one, a second later, logs the 199 held back with itself, and the two after it none."""
        harness = ProxiedHarness()
        for _ in range(200):
            protocol, _ = harness.connect()
            harness.send(protocol, b"PROXY TCP4 1.2.3.4 5.6.7.8 x 1\r\n")
        harness.clock.advance(1.0)
        for _ in range(3):
            protocol, _ = harness.connect()
            harness.send(protocol, b"PROXY TCP4 evil 5.6.7.8 1 1\r\n")
        self.assertEqual([event["count"] for event in harness.events], [1, 200])

    def test_oneNamePerClient(self) -> None:
        """IPv4-mapped IPv6 in a v1 or v2 header is recorded as the IPv4 address, and IPv6 in its RFC 5952
        form, so records and --max-per-ip see one name per client."""
        for header, expected in ((v1("::ffff:6.6.6.9"), "6.6.6.9"), (v2("::ffff:6.6.6.9"), "6.6.6.9"),
                                 (b"PROXY TCP6 2001:0DB8:0:0:0:0:0:5 ::1 1 2\r\n", "2001:db8::5"),
                                 (v2("2001:db8:0:0::5"), "2001:db8::5")):
            harness = ProxiedHarness()
            protocol, transport = harness.connect()
            harness.send(protocol, header + b"aa\n")
            self.assertEqual(transport.value(), expectedReply("aa"), header)
            self.assertEqual([r.client for r in harness.records.records], [expected], header)

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


class MalformedHeadersOverTCPTests(SynchronousTestCase):
    """A real C{twistd primecount --port haproxy:tcp:…} fed 200 malformed v1 headers from a trusted proxy."""

    @slow
    def test_twoHundredMalformedHeaders(self) -> None:
        """Each is closed unanswered and counted malformed; the log holds no traceback and at most a line a
        second; a good header still gets its client's record."""
        records = os.path.abspath(self.mktemp())
        server = ServerProcess(records, "--metrics", "tcp:0:interface=127.0.0.1", port="haproxy:tcp:0:interface=127.0.0.1")
        self.addCleanup(lambda: server.process.poll() is not None or server.stop())
        metricsPort = int(server.waitFor(rb"Site starting on (\d+)").group(1))
        bad = [b"PROXY TCP4 1.2.3.4 5.6.7.8 x 1\r\n", b"PROXY TCP4 evil.example 5.6.7.8 1 2\r\n",
               b"PROXY TCP4 006.006.006.016 5.6.7.8 1 2\r\n", b"PROXY TCP6 fe80::1%evil ::1 1 2\r\n"]
        started = time.monotonic()
        for n in range(200):
            with socket.create_connection(("127.0.0.1", server.port), timeout=10) as connection:
                connection.sendall(bad[n % len(bad)] + b"abc2a\n")
                self.assertEqual(connection.recv(100), b"", "closed without an answer")
        elapsed = time.monotonic() - started
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as connection:
            connection.sendall(v1("::ffff:6.6.6.9") + b"abc2a\n")
            self.assertEqual(connection.makefile("rb").read(), expectedReply("abc2a"))
        samples = scrape(metricsPort)
        self.assertEqual(server.stop(), 0, server.log)
        self.assertEqual(samples['primecount_connections_without_request_total{reason="malformed"}'], 200.0)
        self.assertNotIn("Traceback", server.log)
        self.assertNotIn("Unhandled", server.log)
        lines = server.log.count("without a valid PROXY header")
        self.assertLessEqual(lines, elapsed + 2, "at most one log line a second")
        with open(records, encoding="utf-8") as file:
            self.assertEqual([r.client for r in parseRecords(file)], ["6.6.6.9"])


class PendingHeaderLimitTests(SynchronousTestCase):
    """A proxy's connection still reading its PROXY header counts against C{--max-connections}."""

    def test_pendingHeadersHoldPlaces(self) -> None:
        """With a total of 3, three connections part-way through their header hold every place: the fourth
        gets C{ERROR busy} (for the proxy to pass on); once a header is whole its client takes the place in
        its stead, and once a connection goes, its place is free again."""
        harness = ProxiedHarness()
        harness.requests.connectionLimits = ConnectionLimits(3, 0)
        pending = [harness.connect() for _ in range(3)]
        for protocol, _ in pending:
            harness.send(protocol, b"PROXY TCP4 ")
        refused, refusedTransport = harness.connect()
        self.assertEqual(refusedTransport.value(), b"ERROR busy\n")
        self.assertEqual(harness.requests.connectionLimits.total, 3)
        protocol, transport = pending[0]
        harness.send(protocol, b"198.51.100.1 127.0.0.1 40000 5050\r\nabc2a\n")
        self.assertEqual(transport.value(), expectedReply("abc2a"))
        self.assertEqual(harness.requests.connectionLimits.total, 3)
        pending[1][0].connectionLost(None)  # type: ignore[attr-defined]
        self.assertEqual(harness.requests.connectionLimits.total, 2)
        self.assertIsInstance(harness.connect()[0], ProxyHeaderProtocol)


class PendingHeadersOverTCPTests(SynchronousTestCase):
    """The same against a real C{twistd primecount --port haproxy:tcp:…}."""

    def test_slowHeadersCannotExceedTheTotal(self) -> None:
        """Five connections trickling a PROXY header fill C{--max-connections 5}: a sixth reads C{ERROR busy};
        once they go, a whole header is served."""
        server = ServerProcess(os.path.abspath(self.mktemp()), "--max-connections", "5", "--timeout", "30",
                               "--metrics", "tcp:0:interface=127.0.0.1", port="haproxy:tcp:0:interface=127.0.0.1")
        self.addCleanup(lambda: server.process.poll() is not None or server.stop())
        metricsPort = int(server.waitFor(rb"Site starting on (\d+)").group(1))
        slowHeaders = []
        try:
            for _ in range(5):
                connection = socket.create_connection(("127.0.0.1", server.port), timeout=10)
                connection.sendall(b"PROXY TCP4 ")
                slowHeaders.append(connection)
            with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sixth:
                self.assertEqual(sixth.makefile("rb").readline(), b"ERROR busy\n")
        finally:
            for connection in slowHeaders:
                connection.close()
        waitUntil(lambda: scrape(metricsPort)['primecount_connections_without_request_total{reason="incomplete"}']
                  == 5, what="the server to see the five go")
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as connection:
            connection.sendall(v1("198.51.100.3") + b"abc2a\n")
            self.assertEqual(connection.makefile("rb").read(), expectedReply("abc2a"))
        self.assertEqual(server.stop(), 0, server.log)

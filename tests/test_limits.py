"""Tests for L{primecount.limits} and the factory's use of them: ERROR busy over a limit, IPv6 included."""

from __future__ import annotations

import resource
from typing import Any

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from primecount import limits as limitsModule
from primecount.limits import (
    BUSY_LINGER_MAX, FD_HEADROOM, MIN_CONNECTIONS, SUMMARY_SOURCES, ConnectionLimits, FileLimit, Summary, SummaryLine,
    Throttle, canonicalHost, enoughDescriptors, peerHost, raiseFileLimit, shownPeer,
)
from primecount.startup import StartFailed
from primecount.connection import RequestLimits
from primecount.protocol import BusyProtocol, PrimeCountProtocol
from primecount.responder import Responder
from tests.helpers import (
    HalfCloseTransport, InlineThreads, MemoryRecords, ProtocolHarness, RecordingMetrics, requestFactory,
)


class PeerKeyTests(SynchronousTestCase):
    """Addresses are counted by their canonical text."""

    def test_keys(self) -> None:
        """IPv4 stays, IPv6 is compressed, IPv4-mapped IPv6 counts as IPv4, a scope is dropped."""
        self.assertEqual(canonicalHost("127.0.0.1"), "127.0.0.1")
        self.assertEqual(canonicalHost("2001:0db8:0000::0001"), "2001:db8::1")
        self.assertEqual(canonicalHost("::ffff:192.0.2.1"), "192.0.2.1")
        self.assertEqual(canonicalHost("fe80::1%eth0"), "fe80::1")
        self.assertEqual(canonicalHost("not-an-ip"), "not-an-ip")

    def test_unixPeerHasNoAddress(self) -> None:
        """A UNIX-socket peer has no address: an empty client field (not a Python repr), named in words in logs."""
        from twisted.internet.address import UNIXAddress

        self.assertEqual(peerHost(UNIXAddress(None)), "")
        self.assertEqual(peerHost(UNIXAddress(b"/run/x.sock")), "")
        self.assertEqual((shownPeer(""), shownPeer("192.0.2.1")), ("a UNIX-socket peer", "192.0.2.1"))

    def test_protocolRecordsTheCanonicalName(self) -> None:
        """A connection from an IPv4-mapped peer is recorded, limited and logged as the IPv4 address."""
        harness = ProtocolHarness(peer="::ffff:6.6.6.9")
        harness.send(b"aa\n")
        self.assertEqual([r.client for r in harness.records.records], ["6.6.6.9"])


class ThrottleTests(SynchronousTestCase):
    """A client-triggered event is logged at most once per interval, with the count since the last line."""

    def test_counts(self) -> None:
        """The first event logs; those within the second wait; the next after it logs them all."""
        throttle = Throttle(1.0)
        self.assertEqual([throttle.event(t) for t in (0.0, 0.1, 0.5, 1.0, 1.2, 5.0)], [1, None, None, 3, None, 2])


class SummaryTests(SynchronousTestCase):
    """Events of each kind take at most one line per interval, and every event is told in some line."""

    def test_firstAtOnceRestWhenTheIntervalEnds(self) -> None:
        """The first event of a kind is told at once; the rest of its second as one line once it is over, with
        the count, the seconds, how many sources and the last one; another kind has its own second."""
        summary = Summary(1.0)
        self.assertEqual(summary.event("ERROR timeout", "a", 10.0), SummaryLine("ERROR timeout", 1, 0.0, 1, "a"))
        self.assertIsNone(summary.event("ERROR timeout", "b", 10.2))
        self.assertIsNone(summary.event("ERROR timeout", "b", 10.4))
        self.assertEqual(summary.event("ERROR busy", "c", 10.5), SummaryLine("ERROR busy", 1, 0.0, 1, "c"))
        self.assertEqual(summary.due(), 11.0)
        self.assertEqual(summary.flush(10.9), [])
        self.assertEqual(summary.flush(11.0), [SummaryLine("ERROR timeout", 2, 1.0, 1, "b")])
        self.assertIsNone(summary.due())
        self.assertIsNone(summary.event("ERROR timeout", "d", 11.5), "within a second of the last line")
        self.assertEqual(summary.flush(11.5, everything=True), [SummaryLine("ERROR timeout", 1, 0.5, 1, "d")])

    def test_everyEventToldOnce(self) -> None:
        """However events and flushes interleave, the counts of all lines add up to the events, and no kind
        gets two lines within an interval."""
        import random

        randomly = random.Random(7)
        summary, told, now = Summary(1.0), [], 0.0
        for _ in range(5000):
            now += randomly.random() * 0.01
            line = summary.event(randomly.choice("xyz"), str(randomly.randrange(50)), now)
            told += [(line, now)] if line else []
            if randomly.random() < 0.05:
                told += [(line, now) for line in summary.flush(now)]
        self.assertEqual(sum(line.count for line, _ in told + [(line, now) for line in summary.flush(now, True)]), 5000)
        for kind in "xyz":
            times = [at for line, at in told if line.kind == kind]
            self.assertTrue(all(later - earlier >= 1.0 for earlier, later in zip(times, times[1:])), kind)

    def test_sourcesBounded(self) -> None:
        """A flood from many sources keeps at most L{SUMMARY_SOURCES} of them apart."""
        summary = Summary(1.0)
        summary.event("k", "first", 0.0)
        for n in range(SUMMARY_SOURCES * 3):
            summary.event("k", str(n), 0.5)
        (line,) = summary.flush(1.0)
        self.assertEqual((line.count, line.sources), (SUMMARY_SOURCES * 3, SUMMARY_SOURCES))


class ConnectionLimitsTests(SynchronousTestCase):
    """Both limits hold, and closing frees a place."""

    def test_perPeer(self) -> None:
        """The third connection from one address is refused; another address still gets in."""
        limits = ConnectionLimits(maxTotal=10, maxPerPeer=2)
        self.assertEqual([limits.acquire("a"), limits.acquire("a"), limits.acquire("a")], [True, True, False])
        self.assertTrue(limits.acquire("b"))
        limits.release("a")
        self.assertTrue(limits.acquire("a"))
        self.assertEqual((limits.total, limits.openFrom("a"), limits.openFrom("b")), (3, 2, 1))

    def test_total(self) -> None:
        """Past the total, every address is refused."""
        limits = ConnectionLimits(maxTotal=2, maxPerPeer=0)
        self.assertEqual([limits.acquire(k) for k in "abc"], [True, True, False])

    def test_noPerPeerLimit(self) -> None:
        """A per-address limit of 0 means none."""
        limits = ConnectionLimits(maxTotal=1000, maxPerPeer=0)
        self.assertTrue(all(limits.acquire("a") for _ in range(500)))


class FileLimitTests(SynchronousTestCase):
    """The soft descriptor limit is raised to the hard one."""

    def test_raise(self) -> None:
        """From a lowered soft limit, C{raiseFileLimit} goes up to the hard limit and says so."""
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        self.addCleanup(resource.setrlimit, resource.RLIMIT_NOFILE, (soft, hard))
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
        raised = raiseFileLimit()
        self.assertEqual(raised.softBefore, 256)
        expected = hard if hard != resource.RLIM_INFINITY else 1 << 20
        self.assertEqual((raised.soft, resource.getrlimit(resource.RLIMIT_NOFILE)[0]), (expected, expected))

    def test_defaultMaxConnections(self) -> None:
        """Clients may use the soft limit less the headroom, less what refusals may linger on (an eighth of
        that, at most L{BUSY_LINGER_MAX}), and at least one."""
        self.assertEqual(FileLimit(1024, 4096, 4096).clientDescriptors, 4096 - FD_HEADROOM)
        self.assertEqual(FileLimit(1024, 4096, 4096).defaultMaxConnections, 3968 - 3968 // 8)
        self.assertEqual(FileLimit(1024, 65536, 65536).defaultMaxConnections, 65536 - FD_HEADROOM - BUSY_LINGER_MAX)
        self.assertEqual(FileLimit(10, 10, 10).defaultMaxConnections, 1)

    def test_tooFewDescriptorsStopTheStart(self) -> None:
        """A descriptor limit that leaves fewer than L{MIN_CONNECTIONS} connections, even raised to the hard
        limit, stops the start naming the limit and what would do; 201 is the least that does."""
        self.patch(limitsModule, "raiseFileLimit", lambda: FileLimit(100, 100, 100))
        failed = self.assertRaises(StartFailed, enoughDescriptors)
        self.assertEqual(str(failed), "primecount: the descriptor limit (RLIMIT_NOFILE) is 100 (hard 100), which "
                         "leaves room for 1 connections (128 descriptors are kept for everything else); at least "
                         "64 are needed: raise the limit to 201 or more (ulimit -n, systemd's LimitNOFILE=, "
                         "prlimit --nofile)")
        self.patch(limitsModule, "raiseFileLimit", lambda: FileLimit(201, 201, 201))
        self.assertEqual(enoughDescriptors().defaultMaxConnections, MIN_CONNECTIONS)

    def test_descriptorsNeverPassed(self) -> None:
        """Connections and lingering refusals together never hold more than the client descriptors: a refusal
        lingers only while one is free, and past them even a connection under --max-connections is refused."""
        limits = ConnectionLimits(maxTotal=10, maxPerPeer=0, descriptors=8)
        self.assertEqual([limits.tryAcquire(str(n)) for n in range(6)], [None] * 6)
        self.assertEqual([limits.tryLinger(), limits.tryLinger(), limits.tryLinger()], [True, True, False])
        self.assertEqual(limits.tryAcquire("x"), "descriptors")
        limits.lingerEnded()
        self.assertIsNone(limits.tryAcquire("x"))
        self.assertEqual(limits.total + limits.lingering, 8)

    def test_proxiedBeforeItsHeaderCountsInTheTotal(self) -> None:
        """A proxy's connection still reading its PROXY header (no client yet) takes a place in the total, not
        in any address's count."""
        limits = ConnectionLimits(maxTotal=2, maxPerPeer=1)
        self.assertIsNone(limits.tryAcquire(None))
        self.assertIsNone(limits.tryAcquire("a"))
        self.assertEqual(limits.tryAcquire("b"), "total")
        limits.release(None)
        self.assertIsNone(limits.tryAcquire("b"))
        self.assertEqual((limits.openFrom("a"), limits.openFrom("b")), (1, 1))


def connect(factory: Any, address: object) -> tuple[object, HalfCloseTransport]:
    """Build and connect a protocol for C{address}; return it with its transport."""
    protocol = factory.buildProtocol(address)
    transport = HalfCloseTransport(peerAddress=address)
    protocol.makeConnection(transport)
    return protocol, transport


class FactoryLimitTests(SynchronousTestCase):
    """Connections over a limit get C{ERROR busy} at once and their input is never read."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.metrics = RecordingMetrics()
        self.factory = requestFactory(
            RequestLimits(), self.clock, Responder(self.clock, InlineThreads(), MemoryRecords()),
            metrics=self.metrics, connectionLimits=ConnectionLimits(maxTotal=5, maxPerPeer=2),
        )

    def test_perIPv4(self) -> None:
        """From one IPv4 address the third connection is busy; 127.0.0.2 is still served."""
        first = [connect(self.factory, IPv4Address("TCP", "127.0.0.1", p)) for p in (1, 2)]
        busy, busyTransport = connect(self.factory, IPv4Address("TCP", "127.0.0.1", 3))
        self.assertIsInstance(busy, BusyProtocol)
        self.assertEqual(busyTransport.value(), b"ERROR busy\n")
        self.assertTrue(busyTransport.writeClosed)
        other, _ = connect(self.factory, IPv4Address("TCP", "127.0.0.2", 4))
        self.assertIsInstance(other, PrimeCountProtocol)
        self.assertIn(("busyRefusal", "per_address"), self.metrics.events)
        self.assertTrue(all(isinstance(p, PrimeCountProtocol) for p, _ in first))

    def test_perIPv6(self) -> None:
        """IPv6 peers are limited per address too, and an IPv4-mapped peer counts with its IPv4 address."""
        for port in (1, 2):
            connect(self.factory, IPv6Address("TCP", "2001:db8::7", port))
        self.assertIsInstance(connect(self.factory, IPv6Address("TCP", "2001:db8::7", 3))[0], BusyProtocol)
        connect(self.factory, IPv4Address("TCP", "192.0.2.1", 4))
        connect(self.factory, IPv6Address("TCP", "::ffff:192.0.2.1", 5))
        self.assertIsInstance(connect(self.factory, IPv4Address("TCP", "192.0.2.1", 6))[0], BusyProtocol)

    def test_closingFreesAPlace(self) -> None:
        """When a counted connection closes, its address may connect again."""
        protocols = [connect(self.factory, IPv4Address("TCP", "10.1.1.1", p))[0] for p in (1, 2)]
        protocols[0].connectionLost(None)
        self.assertIsInstance(connect(self.factory, IPv4Address("TCP", "10.1.1.1", 3))[0], PrimeCountProtocol)

    def test_totalLimit(self) -> None:
        """Past the total every address is busy, and busy connections are not counted."""
        for n in range(5):
            connect(self.factory, IPv4Address("TCP", f"10.0.0.{n}", 1))
        busy, transport = connect(self.factory, IPv4Address("TCP", "10.0.0.99", 1))
        self.assertIsInstance(busy, BusyProtocol)
        busy.dataReceived(b"abc2a\n")
        self.assertEqual(transport.value(), b"ERROR busy\n")
        busy.connectionLost(None)
        self.assertEqual(self.factory.connectionLimits.total, 5)
        self.assertEqual([e for e in self.metrics.events if e[0] == "busyRefusal"], [("busyRefusal", "total")])

    def test_busyLingerEnds(self) -> None:
        """A busy connection closes when the client closes, or after the linger time."""
        for n in range(5):
            connect(self.factory, IPv4Address("TCP", f"10.0.0.{n}", 1))
        busy, transport = connect(self.factory, IPv4Address("TCP", "10.0.0.99", 1))
        self.assertFalse(transport.disconnecting)
        self.clock.advance(RequestLimits().linger)
        self.assertTrue(transport.disconnecting)
        busy, transport = connect(self.factory, IPv4Address("TCP", "10.0.0.98", 1))
        busy.readConnectionLost()
        self.assertTrue(transport.disconnecting)

"""The send deadline: the protocol over a transport whose output never leaves, and a real twistd against
clients that never read (the core's own decisions are in C{tests/test_connection.py})."""

from __future__ import annotations

import os
import socket

from twisted.trial.unittest import SynchronousTestCase

from primecount.connection import RequestLimits
from primecount.responder import Responder
from primecount.tools.serverprocess import ServerProcess
from tests.helpers import HalfCloseTransport, InlineThreads, MemoryRecords, ProtocolHarness, RecordingMetrics, \
    expectedReply, requestFactory, scrape, slow, waitUntil


class NeverLeaves:
    """A C{queued} for the factory: every byte written to a transport stays queued unless the test sends it."""

    def __init__(self) -> None:
        self.sent: dict[int, int] = {}

    def __call__(self, transport: HalfCloseTransport) -> int:
        return len(transport.value()) - self.sent.get(id(transport), 0)


def harness(limits: RequestLimits, queued: NeverLeaves) -> ProtocolHarness:
    """A harness whose factory sees output as queued until the test says it left."""
    clock, records = ProtocolHarness().clock, MemoryRecords()
    factory = requestFactory(limits, clock, Responder(clock, InlineThreads(), records), RecordingMetrics(),
                                queued=queued)
    built = ProtocolHarness(limits, records=records, factory=factory)
    built.clock = clock
    return built


class ProtocolSendDeadlineTests(SynchronousTestCase):
    """Every way a connection can wait on its own output ends by the send deadline, counted."""

    def assertAbortedBy(self, built: ProtocolHarness, seconds: float) -> None:
        """Not aborted just before C{seconds}; aborted (and counted) within a sweep after."""
        built.clock.advance(0)
        built.clock.pump([0.25] * int((seconds - 0.5) / 0.25))
        self.assertFalse(built.transport.disconnected, "aborted too soon")
        built.clock.pump([0.25] * 8)
        self.assertTrue(built.transport.disconnected, "aborted")
        self.assertIn(("connectionAborted", "send_timeout"), built.factory.metrics.events)

    def test_keptConnectionWhoseRepliesNeverLeave(self) -> None:
        """A kept connection's replies that never leave (the client does not read) abort it, idle or not."""
        built = harness(RequestLimits(keepAlive=True, quiet=0, sendTimeout=2), NeverLeaves())
        built.send(b"aa\nbb\n")
        self.assertEqual(built.reply(), expectedReply("aa") + expectedReply("bb"))
        self.assertAbortedBy(built, 2)

    def test_oneShotReply(self) -> None:
        """A one-shot reply and its close that wait on a client who never reads are aborted."""
        built = harness(RequestLimits(quiet=0, sendTimeout=3), NeverLeaves())
        built.send(b"aa\n")
        self.assertTrue(built.transport.disconnecting)
        self.assertAbortedBy(built, 3)

    def test_lingeringErrorClose(self) -> None:
        """An ERROR reply's lingering close that never gets its output out is aborted too."""
        built = harness(RequestLimits(quiet=0, sendTimeout=2, maxLine=4), NeverLeaves())
        built.send(b"aaaaaaaa\n")
        self.assertEqual(built.reply(), b"ERROR line too long (max 4 bytes)\n")
        self.assertAbortedBy(built, 2)

    def test_busy(self) -> None:
        """An C{ERROR busy} that never leaves is aborted."""
        queued = NeverLeaves()
        built = harness(RequestLimits(quiet=0, sendTimeout=2), queued)
        built.factory.connectionLimits.maxTotal = 0
        busy = built.factory.buildProtocol(built.transport.getPeer())
        transport = HalfCloseTransport()
        busy.makeConnection(transport)
        self.assertEqual(transport.value(), b"ERROR busy\n")
        built.clock.pump([0.25] * 12)
        self.assertTrue(transport.disconnected)

    def test_readingClientIsNotAborted(self) -> None:
        """A kept connection whose client takes its replies, however slowly, is not aborted."""
        queued = NeverLeaves()
        built = harness(RequestLimits(keepAlive=True, quiet=0, sendTimeout=2, idleTimeout=0), queued)
        for n in range(20):
            built.send(b"aa\n")
            queued.sent[id(built.transport)] = len(built.transport.value()) - 3  # all but 3 bytes left
            built.clock.pump([0.25] * 4)
        self.assertFalse(built.transport.disconnected)

    def test_noSweepOnceTheListenerIsGone(self) -> None:
        """After the listener stops (draining), replies start no sweep: the drain's grace bounds them, and no
        timer outlives the service."""
        built = harness(RequestLimits(keepAlive=True, quiet=0, sendTimeout=2, idleTimeout=0), NeverLeaves())
        built.factory.doStart()
        built.factory.doStop()
        built.send(b"aa\n")
        self.assertEqual([call for call in built.clock.getDelayedCalls() if "_sweepSending" in repr(call.func)], [])

    def test_noDeadline(self) -> None:
        """C{sendTimeout} 0 watches nothing."""
        built = harness(RequestLimits(keepAlive=True, quiet=0, sendTimeout=0, idleTimeout=0), NeverLeaves())
        built.send(b"aa\n")
        built.clock.pump([1.0] * 100)
        self.assertFalse(built.transport.disconnected)


class NeverReadingClientsOverTCPTests(SynchronousTestCase):
    """A real twistd with every slot taken by keep-alive clients that send and never read."""

    @slow
    def test_slotsFreedBySendDeadline(self) -> None:
        """30 keep-alive clients take all 30 slots, each sending 400 KB of lines with a 4 KB receive buffer and
        reading nothing: their replies stop leaving, each is aborted within the send deadline and counted, and a
        new client is served again (before the deadline a newcomer got ERROR busy for minutes)."""
        records = os.path.abspath(self.mktemp())
        server = ServerProcess(records, "--keep-alive", "--idle-timeout", "3", "--timeout", "2",
                               "--max-connections", "30", "--max-per-ip", "0", "--send-timeout", "2",
                               "--metrics", "tcp:0:interface=127.0.0.1")
        self.addCleanup(lambda: server.process.poll() is not None or server.stop())
        metricsPort = int(server.waitFor(rb"Site starting on (\d+)").group(1))
        floods = []
        for _ in range(30):
            flood = socket.socket()
            flood.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            flood.connect(("127.0.0.1", server.port))
            flood.setblocking(False)
            floods.append(flood)
            self.addCleanup(flood.close)
        for flood in floods:
            try:
                flood.send(b"a\n" * 200_000)
            except BlockingIOError:
                pass

        waitUntil(lambda: scrape(metricsPort)['primecount_connections_aborted_total{reason="send_timeout"}'] == 30, seconds=60,
                  what="the never-reading clients to be aborted")
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as client:
            client.sendall(b"abc2a\n")
            self.assertEqual(client.makefile("rb").readline(), expectedReply("abc2a"))
        self.assertEqual(scrape(metricsPort)['primecount_busy_refusals_total{limit="total"}'], 0.0)
        self.assertEqual(server.stop(), 0, server.log)
        self.assertLessEqual(server.log.count("whose replies made no progress"), 5, "at most a line a second")

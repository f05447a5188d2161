"""Byte-level tests of L{primecount.protocol} over L{StringTransport} and a L{Clock}."""

from twisted.internet.task import Clock
from twisted.logger import Logger, formatEvent
from twisted.trial.unittest import SynchronousTestCase

from primecount.connection import Connection, RequestLimits
from primecount.metrics import NoMetrics
from primecount.responder import Responder
from tests.helpers import InlineThreads, MemoryRecords, ProtocolHarness, RecordingMetrics, requestFactory

ABC2A = "2 sí\n".encode()


class NewlineTests(SynchronousTestCase):
    """A newline ends the request."""

    def test_oneLine(self) -> None:
        """The seed's example gets C{2 sí}, then the server closes."""
        harness = ProtocolHarness()
        harness.send(b"abc2a\n")
        self.assertEqual(harness.reply(), ABC2A)
        self.assertTrue(harness.closed)

    def test_oneByteWrites(self) -> None:
        """A multi-byte message split into single bytes is reassembled: C{añoñ} gives C{2 sí}."""
        harness = ProtocolHarness()
        harness.send(*[bytes([b]) for b in "añoñ\n".encode()])
        self.assertEqual(harness.reply(), ABC2A)

    def test_crlf(self) -> None:
        """A CR before the newline is dropped."""
        harness = ProtocolHarness()
        harness.send(b"abc2a\r\n")
        self.assertEqual(harness.reply(), ABC2A)
        self.assertEqual(harness.records.records[0].message, "abc2a")

    def test_onlyFirstLineAnswered(self) -> None:
        """Bytes after the first line are read and ignored: one reply per connection."""
        harness = ProtocolHarness()
        harness.send(b"x\nyy\n", b"zzz\n")
        self.assertEqual(harness.reply(), b"1 no\n")
        self.assertEqual(len(harness.records.records), 1)

    def test_recordHoldsClient(self) -> None:
        """The record names the client's IP address, IPv6 included."""
        harness = ProtocolHarness(peer="::1")
        harness.send(b"abc2a\n")
        record = harness.records.records[0]
        self.assertEqual((record.client, record.message, record.count, record.isPrime), ("::1", "abc2a", 2, True))


class EndOfInputTests(SynchronousTestCase):
    """A half-close ends the request."""

    def test_eofEndsMessage(self) -> None:
        """C{abc2a} followed by EOF is answered like a line."""
        harness = ProtocolHarness()
        harness.send(b"abc2a")
        harness.endOfInput()
        self.assertEqual(harness.reply(), ABC2A)
        self.assertTrue(harness.closed)

    def test_eofWithNothing(self) -> None:
        """EOF before any byte is an empty message."""
        harness = ProtocolHarness()
        harness.endOfInput()
        self.assertEqual(harness.reply(), b"ERROR empty message\n")


class QuietGapTests(SynchronousTestCase):
    """Bytes followed by silence for C{quiet} seconds end the request."""

    def test_justBefore(self) -> None:
        """Just before the gap has passed, nothing is answered yet."""
        harness = ProtocolHarness(RequestLimits(quiet=0.2))
        harness.send(b"abc2a")
        harness.clock.advance(0.199)
        self.assertEqual(harness.reply(), b"")
        self.assertFalse(harness.closed)

    def test_justAfter(self) -> None:
        """Once the gap has passed, the bytes so far are the request."""
        harness = ProtocolHarness(RequestLimits(quiet=0.2))
        harness.send(b"abc2a")
        harness.clock.advance(0.201)
        self.assertEqual(harness.reply(), ABC2A)

    def test_gapRestartsOnEachByte(self) -> None:
        """Each new byte restarts the gap, so a message sent in pieces 0.15 s apart is whole."""
        harness = ProtocolHarness(RequestLimits(quiet=0.2))
        for piece in (b"ab", b"c2", b"a"):
            harness.send(piece)
            harness.clock.advance(0.15)
        self.assertEqual(harness.reply(), b"")
        harness.clock.advance(0.051)
        self.assertEqual(harness.reply(), ABC2A)

    def test_noBytesNoGap(self) -> None:
        """A silent client is not answered by the quiet gap; only the deadline ends it."""
        harness = ProtocolHarness(RequestLimits(timeout=5, quiet=0.2))
        harness.clock.advance(4.9)
        self.assertEqual(harness.reply(), b"")

    def test_disabled(self) -> None:
        """With C{quiet=0} only a newline, EOF or the deadline ends a request."""
        harness = ProtocolHarness(RequestLimits(timeout=5, quiet=0))
        harness.send(b"abc2a")
        harness.clock.advance(4.9)
        self.assertEqual(harness.reply(), b"")
        harness.clock.advance(0.2)
        self.assertEqual(harness.reply(), b"ERROR timeout\n")


class DeadlineTests(SynchronousTestCase):
    """The deadline runs from connect and is not extended by trickled bytes."""

    def test_justBefore(self) -> None:
        """A silent client is still connected just before the deadline."""
        harness = ProtocolHarness(RequestLimits(timeout=5))
        harness.clock.advance(4.999)
        self.assertEqual(harness.reply(), b"")
        self.assertFalse(harness.closed)

    def test_justAfter(self) -> None:
        """At the deadline a silent client gets C{ERROR timeout} and is closed."""
        harness = ProtocolHarness(RequestLimits(timeout=5))
        harness.clock.advance(5.001)
        self.assertEqual(harness.reply(), b"ERROR timeout\n")
        self.assertTrue(harness.closed)

    def test_tricklingDoesNotExtend(self) -> None:
        """A byte every 0.1 s (inside the quiet gap) does not move the deadline: timeout at 5 s."""
        harness = ProtocolHarness(RequestLimits(timeout=5, quiet=0.2))
        for _ in range(49):
            harness.send(b"x")
            harness.clock.advance(0.1)
        self.assertEqual(harness.reply(), b"")
        harness.send(b"x")
        harness.clock.advance(0.11)
        self.assertEqual(harness.reply(), b"ERROR timeout\n")
        self.assertEqual(harness.records.records, [])

    def test_noTimeoutAfterReply(self) -> None:
        """Once the request has ended the deadline is cancelled: no second reply."""
        harness = ProtocolHarness(RequestLimits(timeout=5))
        harness.send(b"aa\n")
        harness.clock.advance(10)
        self.assertEqual(harness.reply(), "2 sí\n".encode())
        self.assertEqual(harness.clock.getDelayedCalls(), [])


class LineLimitTests(SynchronousTestCase):
    """Requests over C{maxLine} bytes are refused while they arrive."""

    def test_exactlyAtLimit(self) -> None:
        """A line of exactly C{maxLine} bytes is answered."""
        harness = ProtocolHarness(RequestLimits(maxLine=10))
        harness.send(b"a" * 10 + b"\n")
        self.assertEqual(harness.reply(), b"10 no\n")

    def test_crBeforeNewlineDoesNotCount(self) -> None:
        """A CRLF line of exactly C{maxLine} bytes before its CR is answered, whole or split before the CR or
        between CR and LF, as the same line ending in LF is; one byte more is refused."""
        for pieces in ([b"a" * 10 + b"\r\n"], [b"a" * 10, b"\r\n"], [b"a" * 10 + b"\r", b"\n"]):
            harness = ProtocolHarness(RequestLimits(maxLine=10))
            harness.send(*pieces)
            self.assertEqual(harness.reply(), b"10 no\n", pieces)
        for pieces in ([b"a" * 11 + b"\r\n"], [b"a" * 11 + b"\r", b"\n"], [b"a" * 10 + b"\r", b"a\n"]):
            harness = ProtocolHarness(RequestLimits(maxLine=10))
            harness.send(*pieces)
            self.assertEqual(harness.reply(), b"ERROR line too long (max 10 bytes)\n", pieces)

    def test_overLimitWithNewline(self) -> None:
        """A line of C{maxLine + 1} bytes is refused."""
        harness = ProtocolHarness(RequestLimits(maxLine=10))
        harness.send(b"a" * 11 + b"\n")
        self.assertEqual(harness.reply(), b"ERROR line too long (max 10 bytes)\n")
        self.assertTrue(harness.closed)

    def test_overLimitWithoutNewline(self) -> None:
        """Chunks without a newline are refused as soon as they pass the limit, not at the newline."""
        harness = ProtocolHarness(RequestLimits(maxLine=10))
        harness.send(b"a" * 6)
        self.assertEqual(harness.reply(), b"")
        harness.send(b"a" * 5)
        self.assertEqual(harness.reply(), b"ERROR line too long (max 10 bytes)\n")

    def test_bufferNeverPastLimit(self) -> None:
        """However the bytes arrive, the line buffer never holds more than C{maxLine} bytes."""
        harness = ProtocolHarness(RequestLimits(maxLine=1000))
        sizes = []
        for chunk in [b"a" * 300, b"b" * 300, b"c" * 399, b"d" * 1, b"e" * 1_000_000]:
            harness.protocol.dataReceived(chunk)
            sizes.append(harness.protocol.bufferedBytes)
        self.assertEqual(sizes, [300, 600, 999, 1000, 0])
        self.assertEqual(harness.reply(), b"ERROR line too long (max 1000 bytes)\n")

    def test_chunksJoinedOnce(self) -> None:
        """A line sent in a thousand pieces is joined once, at its newline, not re-scanned per piece."""
        harness = ProtocolHarness(RequestLimits(quiet=0))
        joined = []
        original = Connection._takePartial
        self.patch(Connection, "_takePartial", lambda self: joined.append(self._partialSize) or original(self))
        for _ in range(1000):
            harness.protocol.dataReceived(b"ab")
        harness.send(b"b\n")
        self.assertEqual([size for size in joined if size], [2000])
        self.assertEqual(harness.reply(), b"1001 no\n")

    def test_noReplyAfterError(self) -> None:
        """After an ERROR, further bytes get no second reply."""
        harness = ProtocolHarness(RequestLimits(maxLine=4))
        harness.send(b"aaaaa", b"a\n")
        harness.endOfInput()
        self.assertEqual(harness.reply(), b"ERROR line too long (max 4 bytes)\n")


class BadInputTests(SynchronousTestCase):
    """Bad requests get one C{ERROR} line and no record."""

    def test_invalidUTF8(self) -> None:
        """Bytes that are not UTF-8 get C{ERROR invalid UTF-8}."""
        harness = ProtocolHarness()
        harness.send(b"\xc3\x28\n")
        self.assertEqual(harness.reply(), b"ERROR invalid UTF-8\n")
        self.assertEqual(harness.records.records, [])

    def test_empty(self) -> None:
        """A bare newline gets C{ERROR empty message}."""
        harness = ProtocolHarness()
        harness.send(b"\n")
        self.assertEqual(harness.reply(), b"ERROR empty message\n")

    def test_whitespaceOnly(self) -> None:
        """A line of whitespace is empty once stripped."""
        harness = ProtocolHarness()
        harness.send(b" \t \r\n")
        self.assertEqual(harness.reply(), b"ERROR empty message\n")
        self.assertTrue(harness.closed)


class RecordBeforeReplyTests(SynchronousTestCase):
    """No client hears an answer before its record is stored."""

    def test_replyWaitsForRecord(self) -> None:
        """While the record is not acknowledged, nothing is written to the client."""
        harness = ProtocolHarness()
        harness.records.hold = True
        harness.send(b"abc2a\n")
        self.assertEqual(len(harness.records.records), 1)
        self.assertEqual(harness.reply(), b"")
        harness.records.release()
        self.assertEqual(harness.reply(), ABC2A)

    def test_clientGoneBeforeReply(self) -> None:
        """A client that disconnects before its reply causes no error; its record is kept."""
        harness = ProtocolHarness()
        harness.records.hold = True
        harness.send(b"abc2a\n")
        harness.transport.loseConnection()
        harness.protocol.connectionLost(None)
        harness.records.release()
        self.assertEqual(len(harness.records.records), 1)


class LoggingTests(SynchronousTestCase):
    """Errors are always logged with the peer; connections and replies only with C{logRequests}."""

    def capture(self, harness: ProtocolHarness) -> list[dict]:
        """Route the protocol's and its factory's log events into a list."""
        events: list[dict] = []
        harness.protocol.log = harness.factory.log = Logger(observer=events.append)
        return events

    def test_errorLoggedWithPeer(self) -> None:
        """An ERROR reply is logged with the client's address."""
        harness = ProtocolHarness(peer="198.51.100.9")
        events = self.capture(harness)
        harness.send(b"\n")
        self.assertEqual([(e["reply"], e["peer"]) for e in events], [("ERROR empty message", "198.51.100.9")])

    def test_errorsSummarisedPerReply(self) -> None:
        """Without C{--log-requests} each ERROR reply is logged, as a summary: the first of a second at once,
        the others of that second as one line with their count, whether or not another comes; an answer is
        not logged; the same with or without metrics."""
        for metrics in (NoMetrics(), RecordingMetrics()):
            clock = Clock()
            factory = requestFactory(RequestLimits(), clock, Responder(clock, InlineThreads(), MemoryRecords()),
                                        metrics)
            events: list[dict] = []
            factory.log = Logger(observer=events.append)
            for peer, payload in [("192.0.2.1", b"\n"), ("192.0.2.2", b"\n"), ("192.0.2.3", b"abc\n"),
                                  ("192.0.2.2", b"\xff\n"), ("192.0.2.4", b"\n")]:
                ProtocolHarness(peer=peer, factory=factory).send(payload)
                clock.advance(0)  # the factory's own clock runs the responder's turn
            clock.advance(0.5)
            self.assertEqual([formatEvent(e) for e in events],
                             ["ERROR empty message to 192.0.2.1", "ERROR invalid UTF-8 to 192.0.2.2"])
            clock.advance(0.5)
            self.assertEqual([formatEvent(e) for e in events[2:]],
                             ["ERROR empty message to 2 requests in 1.0 s from 2 addresses (last 192.0.2.4)"])
            clock.advance(10)
            self.assertEqual(len(events), 3, "nothing more to tell")

    def test_quietByDefault(self) -> None:
        """By default an answered request logs nothing (the record is its trace)."""
        harness = ProtocolHarness()
        events = self.capture(harness)
        harness.send(b"abc2a\n")
        self.assertEqual(events, [])

    def test_logRequests(self) -> None:
        """With C{logRequests} the reply is logged with the peer (the connection event precedes capture here)."""
        harness = ProtocolHarness(RequestLimits(logRequests=True), peer="::1")
        events = self.capture(harness)
        harness.send(b"abc2a\n")
        self.assertEqual([(e["reply"], e["peer"]) for e in events], [("2 sí", "::1")])
        self.assertEqual(formatEvent(events[0]), "reply 2 sí to ::1")


class ConnectionTrackingTests(SynchronousTestCase):
    """The factory knows which connections are open, for draining and metrics."""

    def test_openAndClosed(self) -> None:
        """A connection counts as open until it is lost; waiters for idleness fire then."""
        harness = ProtocolHarness()
        self.assertEqual(harness.factory.openCount, 1)
        idle = harness.factory.whenIdle()
        self.assertNoResult(idle)
        harness.protocol.connectionLost(None)
        self.successResultOf(idle)
        self.assertEqual(harness.factory.openCount, 0)
        self.successResultOf(harness.factory.whenIdle())

    def test_abortAll(self) -> None:
        """Aborting closes every open connection at once."""
        harness = ProtocolHarness()
        harness.factory.abortAll()
        self.assertTrue(harness.transport.disconnecting)

    def test_metricsEvents(self) -> None:
        """Connect, reply and close are reported with the outcome and the time since connect."""
        harness = ProtocolHarness()
        harness.clock.advance(0.25)
        harness.send(b"\xff\n")
        harness.protocol.connectionLost(None)
        self.assertEqual(
            harness.metrics.events,
            [("connectionOpened",), ("requestFinished", "invalid_utf8", 0.25), ("connectionClosed", 1)],
        )


class LingeringCloseTests(SynchronousTestCase):
    """After an ERROR the server half-closes and discards input for a bounded time, so the reply is not lost."""

    def test_errorHalfCloses(self) -> None:
        """An ERROR reply is followed by FIN only; the connection stays open for reading."""
        harness = ProtocolHarness(RequestLimits(maxLine=4, linger=2))
        harness.send(b"toolong")
        self.assertEqual(harness.reply(), b"ERROR line too long (max 4 bytes)\n")
        self.assertTrue(harness.transport.writeClosed)
        self.assertFalse(harness.transport.disconnecting)

    def test_inputDiscardedThenClosedWhenClientCloses(self) -> None:
        """Input after the ERROR is read and dropped; the client's own close ends the linger."""
        harness = ProtocolHarness(RequestLimits(maxLine=4, linger=2))
        harness.send(b"toolong", b"more\n", b"and more")
        self.assertEqual(harness.reply(), b"ERROR line too long (max 4 bytes)\n")
        harness.endOfInput()
        self.assertTrue(harness.transport.disconnecting)

    def test_lingerBoundedInTime(self) -> None:
        """A client that never closes is closed after the linger time."""
        harness = ProtocolHarness(RequestLimits(timeout=5, linger=2))
        harness.clock.advance(5)
        self.assertEqual(harness.reply(), b"ERROR timeout\n")
        harness.clock.advance(1.9)
        self.assertFalse(harness.transport.disconnecting)
        harness.clock.advance(0.2)
        self.assertTrue(harness.transport.disconnecting)

    def test_lingerBoundedInBytes(self) -> None:
        """A client that keeps sending is closed once a megabyte has been thrown away."""
        harness = ProtocolHarness(RequestLimits(maxLine=4, linger=60))
        harness.send(b"toolong")
        for _ in range(16):
            harness.send(b"x" * 65536)
        self.assertFalse(harness.transport.disconnecting)
        harness.send(b"x")
        self.assertTrue(harness.transport.disconnecting)

    def test_noLingerAfterClientEOF(self) -> None:
        """If the client has already half-closed, the server closes at once after its ERROR."""
        harness = ProtocolHarness()
        harness.endOfInput()
        self.assertEqual(harness.reply(), b"ERROR empty message\n")
        self.assertTrue(harness.transport.disconnecting)

    def test_answersCloseAtOnce(self) -> None:
        """A normal answer closes the connection outright, without lingering."""
        harness = ProtocolHarness()
        harness.send(b"abc2a\n")
        self.assertTrue(harness.transport.disconnecting)
        self.assertFalse(harness.transport.writeClosed)


class EmptyConnectionTests(SynchronousTestCase):
    """A client that connects and closes without sending anything is counted, not logged."""

    def test_connectAndClose(self) -> None:
        """EOF with nothing sent: the empty-message reply still goes out, no log line, one 'empty' count."""
        harness = ProtocolHarness()
        events: list[dict] = []
        harness.protocol.log = Logger(observer=events.append)
        harness.endOfInput()
        harness.protocol.connectionLost(None)
        self.assertEqual(harness.reply(), b"ERROR empty message\n")
        self.assertEqual(events, [])
        self.assertEqual(harness.metrics.events,
                         [("connectionOpened",), ("connectionWithoutRequest", "empty"), ("connectionClosed", 1)])

    def test_resetBeforeAnything(self) -> None:
        """A connection lost without a byte or an EOF is counted as empty too."""
        harness = ProtocolHarness()
        harness.protocol.connectionLost(None)
        self.assertIn(("connectionWithoutRequest", "empty"), harness.metrics.events)

    def test_silentClientTimeoutIsLogged(self) -> None:
        """A client that stays silent until the deadline is still logged and counted as a timeout."""
        harness = ProtocolHarness(RequestLimits(timeout=1))
        events: list[dict] = []
        harness.factory.log = Logger(observer=events.append)
        harness.clock.advance(1.1)
        self.assertEqual([e["reply"] for e in events], ["ERROR timeout"])
        self.assertIn(("requestFinished", "timeout", 1.1), [e[:2] + (round(e[2], 3),) if len(e) == 3 else e
                                                           for e in harness.metrics.events])

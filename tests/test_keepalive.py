"""Byte-level tests of keep-alive and pipelining in L{primecount.protocol}, over L{StringTransport} and a L{Clock}."""

from __future__ import annotations

import platform
import signal
import socket
import time
from typing import Callable

from twisted.internet.defer import fail
from twisted.trial.unittest import SynchronousTestCase

from primecount import wire
from primecount.connection import RequestLimits
from primecount.records.formats import parseRecords
from primecount.responder import Requester
from primecount.tools.serverprocess import ServerProcess
from primecount.records.store import StorageUnavailable
from tests.helpers import ProtocolHarness, expectedReply, scrape, slow, waitUntil
from tests.test_endtoend import MESSAGES

KEEP = RequestLimits(keepAlive=True, quiet=0, timeout=5, idleTimeout=30, pipeline=64)
PIPELINE = b"abc2a\naa\n\xff\nx y z\n\n\xc3\xb1and\xc3\xba \xc3\xba\r\nzzzzz\n"
PIPELINE_REPLIES = (
    expectedReply("abc2a") + expectedReply("aa") + b"ERROR invalid UTF-8\n" + expectedReply("x y z")
    + b"ERROR empty message\n" + expectedReply("ñandú ú") + expectedReply("zzzzz")
)


def keepAlive(**changes: object) -> ProtocolHarness:
    """A harness whose protocol keeps connections open, with C{changes} to the limits."""
    return ProtocolHarness(KEEP._replace(**changes))


class PipelineTests(SynchronousTestCase):
    """Lines sent back to back are all answered, in order, and the connection stays open."""

    def test_splitAtEveryByte(self) -> None:
        """However the pipelined bytes are cut in two, the replies are the same, in order."""
        for cut in range(len(PIPELINE) + 1):
            harness = keepAlive()
            harness.send(PIPELINE[:cut], PIPELINE[cut:])
            self.assertEqual(harness.reply(), PIPELINE_REPLIES, f"cut at byte {cut}")
            self.assertFalse(harness.closed)

    def test_oneByteAtATime(self) -> None:
        """Every byte in its own read still gives every reply, in order."""
        harness = keepAlive()
        harness.send(*[PIPELINE[i:i + 1] for i in range(len(PIPELINE))])
        self.assertEqual(harness.reply(), PIPELINE_REPLIES)

    def test_oneByOne(self) -> None:
        """A client that waits for each reply before sending the next gets each on the same connection."""
        harness = keepAlive()
        for n in range(1, 6):
            harness.send(b"a" * n + b"\n")
        self.assertEqual(harness.reply(), b"1 no\n2 s\xc3\xad\n3 s\xc3\xad\n4 no\n5 s\xc3\xad\n")
        self.assertEqual([r.message for r in harness.records.records], ["a" * n for n in range(1, 6)])
        self.assertEqual(harness.protocol.requests, 5)

    def test_repliesInRequestOrder(self) -> None:
        """A later request answered first still waits for the earlier one's reply."""
        replies: list[Callable[[wire.Reply], None]] = []
        harness = ProtocolHarness(KEEP)
        harness.protocol._responder = _ManualResponder(replies)
        harness.send(b"first\nsecond\n")
        replies[1](wire.Reply(b"second\n", "ok"))
        self.assertEqual(harness.reply(), b"")
        replies[0](wire.Reply(b"first\n", "ok"))
        self.assertEqual(harness.reply(), b"first\nsecond\n")

    def test_oneShotAnswersOnlyTheFirst(self) -> None:
        """Without keep-alive the same pipeline gets one reply and a close."""
        harness = ProtocolHarness(KEEP._replace(keepAlive=False))
        harness.send(PIPELINE)
        self.assertEqual(harness.reply(), expectedReply("abc2a"))
        self.assertTrue(harness.transport.disconnecting)


class ErrorInPipelineTests(SynchronousTestCase):
    """Content errors answer in place; framing errors answer in order and then close."""

    def test_contentErrorsKeepConnection(self) -> None:
        """Empty and invalid UTF-8 requests are answered C{ERROR} and the next request is served."""
        harness = keepAlive()
        harness.send(b"\n\xff\nbb\n")
        self.assertEqual(harness.reply(), b"ERROR empty message\nERROR invalid UTF-8\n" + expectedReply("bb"))
        self.assertFalse(harness.closed)

    def test_storageUnavailableKeepsConnection(self) -> None:
        """A request whose record cannot be written gets C{ERROR storage unavailable}; the next one is served."""
        harness = keepAlive()
        records = harness.records
        working = records.write
        records.write = lambda batch: fail(StorageUnavailable("disk full"))  # type: ignore[method-assign]
        harness.send(b"aa\n")
        records.write = working  # type: ignore[method-assign]
        harness.send(b"bb\n")
        self.assertEqual(harness.reply(), b"ERROR storage unavailable\n" + expectedReply("bb"))
        self.assertFalse(harness.closed)

    def test_lineTooLongAfterAnswers(self) -> None:
        """The requests before an over-long line are answered, then its ERROR, then the lingering close."""
        harness = keepAlive(maxLine=10)
        harness.send(b"aa\nbb\n" + b"x" * 11 + b"\ncc\n")
        self.assertEqual(harness.reply(), expectedReply("aa") + expectedReply("bb")
                         + b"ERROR line too long (max 10 bytes)\n")
        self.assertTrue(harness.transport.writeClosed)
        self.assertEqual(len(harness.records.records), 2)

    def test_partialLineTooLong(self) -> None:
        """A partial line passing the limit is refused as it arrives, after the replies before it."""
        harness = keepAlive(maxLine=10)
        harness.send(b"aa\n" + b"x" * 8, b"x" * 3)
        self.assertEqual(harness.reply(), expectedReply("aa") + b"ERROR line too long (max 10 bytes)\n")
        self.assertTrue(harness.transport.writeClosed)

    def test_errorWaitsForEarlierReplies(self) -> None:
        """A framing error never overtakes the replies of requests sent before it."""
        harness = keepAlive(maxLine=10)
        harness.records.hold = True
        harness.send(b"aa\n" + b"x" * 11)
        self.assertEqual(harness.reply(), b"")
        harness.records.release()
        self.assertEqual(harness.reply(), expectedReply("aa") + b"ERROR line too long (max 10 bytes)\n")


class BackpressureTests(SynchronousTestCase):
    """At most C{pipeline} requests are unanswered; past that, and while writes are blocked, reading pauses."""

    def test_pipelineBoundPausesAndResumes(self) -> None:
        """With a bound of 3, five pipelined lines are taken three at a time; the rest wait unread."""
        harness = keepAlive(pipeline=3)
        harness.records.hold = True
        harness.send(b"a\nbb\nccc\ndddd\neeeee\n")
        self.assertEqual(len(harness.records.records), 3)
        self.assertEqual(harness.transport.producerState, "paused")
        harness.records.release()
        self.assertEqual(harness.transport.producerState, "producing")
        harness.clock.advance(0)
        self.assertEqual(len(harness.records.records), 5)
        harness.records.release()
        self.assertEqual(harness.reply(), b"".join(expectedReply(c * n) for n, c in enumerate("abcde", 1)))

    def test_fullWriteBufferPausesReading(self) -> None:
        """When the transport says its write buffer is full, reading stops until it has drained."""
        harness = keepAlive()
        self.assertIs(harness.transport.producer, harness.protocol)
        harness.protocol.pauseProducing()
        self.assertEqual(harness.transport.producerState, "paused")
        harness.protocol.resumeProducing()
        self.assertEqual(harness.transport.producerState, "producing")

    def test_bothReasonsMustClear(self) -> None:
        """A drained write buffer does not resume reading while the pipeline is still full."""
        harness = keepAlive(pipeline=1)
        harness.records.hold = True
        harness.send(b"a\nb\n")
        harness.protocol.pauseProducing()
        harness.protocol.resumeProducing()
        self.assertEqual((harness.transport.producerState, len(harness.records.records)), ("paused", 1))
        harness.records.release()
        harness.clock.advance(0)
        self.assertEqual(len(harness.records.records), 2, "the second line was read once the first was answered")

    def test_halfCloseWhilePaused(self) -> None:
        """A half-close that arrives with lines still unread answers them all before closing."""
        harness = keepAlive(pipeline=1)
        harness.records.hold = True
        harness.send(b"a\nbb\nccc")
        harness.endOfInput()
        for _ in range(3):
            harness.records.release()
            harness.clock.advance(0)
        self.assertEqual(harness.reply(), expectedReply("a") + expectedReply("bb") + expectedReply("ccc"))
        self.assertTrue(harness.transport.disconnecting)


class IdleTimeoutTests(SynchronousTestCase):
    """A kept connection waiting for its next request is closed after C{idleTimeout}; requests keep C{timeout}."""

    def test_justBefore(self) -> None:
        """Just before the idle timeout the connection is open."""
        harness = keepAlive()
        harness.send(b"aa\n")
        harness.clock.advance(29.999)
        self.assertFalse(harness.closed)

    def test_justAfter(self) -> None:
        """Just after it, the connection is closed without a reply or a record."""
        harness = keepAlive()
        harness.send(b"aa\n")
        harness.clock.advance(30.001)
        self.assertEqual(harness.reply(), expectedReply("aa"))
        self.assertTrue(harness.transport.disconnecting)
        self.assertEqual(len(harness.records.records), 1)

    def test_eachReplyRestartsIt(self) -> None:
        """The idle time counts from the last reply."""
        harness = keepAlive()
        harness.send(b"aa\n")
        harness.clock.advance(20)
        harness.send(b"bb\n")
        harness.clock.advance(20)
        self.assertFalse(harness.closed)

    def test_disabled(self) -> None:
        """With C{idleTimeout=0} a kept connection may wait for ever."""
        harness = keepAlive(idleTimeout=0)
        harness.send(b"aa\n")
        harness.clock.advance(3600)
        self.assertFalse(harness.closed)
        self.assertEqual(harness.clock.getDelayedCalls(), [])

    def test_requestDeadlineFromFirstByte(self) -> None:
        """A later request gets C{timeout} from its first byte, however idle the connection was before it."""
        harness = keepAlive()
        harness.send(b"aa\n")
        harness.clock.advance(25)
        harness.send(b"b")
        harness.clock.advance(4.9)
        for _ in range(5):
            harness.send(b"b")
        self.assertEqual(harness.reply(), expectedReply("aa"))
        harness.clock.advance(0.2)
        self.assertEqual(harness.reply(), expectedReply("aa") + b"ERROR timeout\n")
        self.assertTrue(harness.transport.writeClosed)

    def test_firstRequestFromConnect(self) -> None:
        """A kept connection that never sends gets C{ERROR timeout} at C{timeout}, as in one-shot mode."""
        harness = keepAlive()
        harness.clock.advance(5.001)
        self.assertEqual(harness.reply(), b"ERROR timeout\n")

    def test_slowReplyIsNotIdle(self) -> None:
        """While a reply is still being prepared (within the reply deadline) the connection is neither idle nor
        timed out."""
        harness = ProtocolHarness(KEEP, replyDeadline=120.0)
        harness.records.hold = True
        harness.send(b"aa\n")
        harness.clock.advance(60)
        self.assertFalse(harness.closed)
        harness.records.release()
        self.assertEqual(harness.reply(), expectedReply("aa"))

    def test_quietGapKeepsConnection(self) -> None:
        """A request ended by the quiet gap is answered and the connection stays for the next."""
        harness = keepAlive(quiet=0.2)
        harness.send(b"abc2a")
        harness.clock.advance(0.21)
        harness.send(b"bb\n")
        self.assertEqual(harness.reply(), expectedReply("abc2a") + expectedReply("bb"))
        self.assertFalse(harness.closed)


class HalfCloseTests(SynchronousTestCase):
    """On the client's half-close, what it sent is answered and then the server closes."""

    def test_partialLastLine(self) -> None:
        """A last line without newline is a request too."""
        harness = keepAlive()
        harness.send(b"aa\nbbb")
        harness.endOfInput()
        self.assertEqual(harness.reply(), expectedReply("aa") + expectedReply("bbb"))
        self.assertTrue(harness.transport.disconnecting)

    def test_nothingAfterLastLine(self) -> None:
        """After complete lines, the half-close asks nothing more: no C{ERROR empty message}."""
        harness = keepAlive()
        harness.send(b"aa\n")
        harness.endOfInput()
        self.assertEqual(harness.reply(), expectedReply("aa"))
        self.assertTrue(harness.transport.disconnecting)

    def test_closesAfterPendingReplies(self) -> None:
        """The close waits for replies still being prepared."""
        closesOnlyAfterItsReply(self, ProtocolHarness.endOfInput)

    def test_silentConnection(self) -> None:
        """A connection that half-closes having sent nothing asked an empty question, as in one-shot mode."""
        harness = keepAlive()
        harness.endOfInput()
        self.assertEqual(harness.reply(), b"ERROR empty message\n")
        self.assertTrue(harness.transport.disconnecting)


class DrainTests(SynchronousTestCase):
    """When the service stops, idle kept connections close at once and busy ones after their current request."""

    def test_idleClosesNow(self) -> None:
        """A kept connection between requests is closed at once."""
        harness = keepAlive()
        harness.send(b"aa\n")
        harness.factory.stopTakingRequests()
        self.assertTrue(harness.transport.disconnecting)

    def test_inFlightAnsweredThenClosed(self) -> None:
        """A request being prepared is answered, then the connection closes."""
        closesOnlyAfterItsReply(self, lambda harness: harness.factory.stopTakingRequests())

    def test_partialRequestIsTheLast(self) -> None:
        """A request half received is finished and answered; nothing after it is taken."""
        harness = keepAlive()
        harness.send(b"aa\nbb")
        harness.factory.stopTakingRequests()
        harness.send(b"b\ncc\n")
        self.assertEqual(harness.reply(), expectedReply("aa") + expectedReply("bbb"))
        self.assertTrue(harness.transport.disconnecting)

    def test_newConnectionStillAnswered(self) -> None:
        """A connection that has not sent its first request yet is served once, as in one-shot mode."""
        harness = keepAlive()
        harness.factory.stopTakingRequests()
        harness.send(b"aa\nbb\n")
        self.assertEqual(harness.reply(), expectedReply("aa"))
        self.assertTrue(harness.transport.disconnecting)


class MetricsTests(SynchronousTestCase):
    """Requests and connections are counted apart; a request's time runs from its own first byte."""

    def test_requestTimeFromFirstByte(self) -> None:
        """The second request's duration starts at its first byte, not at connect."""
        harness = keepAlive(quiet=0.5)
        harness.send(b"aa\n")
        harness.clock.advance(10)
        harness.send(b"bb")
        harness.clock.advance(0.5)
        harness.protocol.connectionLost(None)
        self.assertEqual(harness.metrics.events, [
            ("connectionOpened",), ("requestFinished", "ok", 0), ("requestFinished", "ok", 0.5),
            ("connectionClosed", 2),
        ])


def closesOnlyAfterItsReply(test: SynchronousTestCase, ending: Callable[[ProtocolHarness], None]) -> None:
    """A kept connection with one reply still being prepared is told to end: it closes only after that reply."""
    harness = keepAlive()
    harness.records.hold = True
    harness.send(b"aa\n")
    ending(harness)
    test.assertFalse(harness.transport.disconnecting)
    harness.records.release()
    test.assertEqual(harness.reply(), expectedReply("aa"))
    test.assertTrue(harness.transport.disconnecting)


class _ManualResponder:
    """A responder whose replies the test hands back by hand, in any order."""

    def __init__(self, replies: list[Callable[[wire.Reply], None]]) -> None:
        self._replies = replies

    def respond(self, raw: bytes, client: str, requester: Requester, sequence: int) -> None:
        """Keep a way to answer this request for the test."""
        self._replies.append(lambda reply: requester.answered([(sequence, reply)]))


class KeepAliveOverTCPTests(SynchronousTestCase):
    """A real C{twistd -n primecount --keep-alive} over loopback sockets."""

    def start(self, *options: str) -> ServerProcess:
        """A keep-alive server on a free loopback port, stopped (and checked to exit 0) after the test."""
        self.records = self.mktemp()
        server = ServerProcess(self.records, "--keep-alive", "--max-per-ip", "0", *options)
        self.addCleanup(lambda: self.assertEqual(server.stop(), 0, server.log))
        return server

    def recorded(self) -> list[str]:
        """The messages in the records file, in file order."""
        with open(self.records, encoding="utf-8") as file:
            return [r.message for r in parseRecords(file)]

    def test_pipeliningClientReadsRepliesInOrder(self) -> None:
        """A thousand lines sent in one go are answered in order on the same connection, each recorded."""
        messages = [f"{MESSAGES[i % len(MESSAGES)]} {i}" for i in range(1000)]
        with socket.create_connection(("127.0.0.1", self.start().port), timeout=20) as client:
            client.sendall(b"".join(m.encode() + b"\n" for m in messages))
            client.shutdown(socket.SHUT_WR)
            received = _readAll(client)
        self.assertEqual(received, b"".join(expectedReply(m) for m in messages))
        self.assertEqual(sorted(self.recorded()), sorted(messages))

    def test_oneByOneOnOneConnection(self) -> None:
        """A client that waits for each reply gets every one on the same connection, then the idle close."""
        with socket.create_connection(("127.0.0.1", self.start("--idle-timeout", "0.5").port), timeout=20) as client:
            lines = client.makefile("rb")
            for message in MESSAGES:
                client.sendall(message.encode() + b"\n")
                self.assertEqual(lines.readline(), expectedReply(message))
            started = time.monotonic()
            self.assertEqual(lines.read(), b"", "the server closes an idle kept connection")
            self.assertLess(time.monotonic() - started, 10)

    @slow
    def test_clientThatNeverReads(self) -> None:
        """A client sending lines without reading is stopped by backpressure once its replies fill the
        buffers: the server stops answering (and recording) its lines, holds no more of them than one read, its
        memory stays flat, and other clients are served meanwhile."""
        # No send deadline here: this is about backpressure alone (test_sending covers the deadline).
        server = self.start("--pipeline", "64", "--send-timeout", "0", "--metrics", "tcp:0:interface=127.0.0.1")
        metricsPort = int(server.waitFor(rb"Site starting on (\d+)").group(1))
        flood = socket.socket()
        self.addCleanup(flood.close)
        # A small receive window keeps the replies the client's kernel holds small, and a small segment size
        # keeps the server's kernel send buffer for this connection small too (Linux sizes it from the segment
        # size: on loopback's 64 KiB segments it grows to tcp_wmem's 4 MiB, some 800,000 replies, and filling
        # that took the flood longer than the test looked): so the server's writes block soon.
        flood.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        flood.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, 536)
        flood.connect(("127.0.0.1", server.port))
        flood.setblocking(False)
        chunk = b"a\n" * 30000

        def push() -> None:
            """Offer the flood's lines; the kernel takes what it has room for (how much says nothing about
            the server: the kernel grows its buffers on its own)."""
            try:
                flood.send(chunk)
            except BlockingIOError:
                pass

        other = socket.create_connection(("127.0.0.1", server.port), timeout=20)
        self.addCleanup(other.close)
        otherLines = other.makefile("rb")

        def servedWhileFloodStands(requests: int) -> bool:
            """Serve C{requests} on the other connection, the flood offering lines all along; whether the
            server answered none of the flood's lines meanwhile (each round trip is a reactor turn in which
            an unpaused flood would have been read and answered)."""
            before = self.floodAnswered()
            for message in (MESSAGES * requests)[:requests]:
                push()
                other.sendall(message.encode() + b"\n")
                self.assertEqual(otherLines.readline(), expectedReply(message))
            return self.floodAnswered() == before

        # The server answers the flood until the kernel's buffers for its replies are full, then stops reading
        # it. How long that takes is the kernel's business, so the stall is waited for, not assumed: a server
        # that kept reading would answer the flood in every window until the deadline.
        waitUntil(lambda: servedWhileFloodStands(200), seconds=90, what="the server to stop reading a client "
                                                                      "that never reads its replies")
        stalledKiB, answered = _residentKiB(server.process.pid), self.floodAnswered()
        self.assertGreater(answered, 0, "the flood was answered until its replies filled the buffers")
        servedWhileFloodStands(400)
        held = scrape(metricsPort)["primecount_buffered_request_bytes"]
        self.assertLessEqual(held, 65536, "no more of the flood held than one read's worth")
        if platform.python_implementation() == "CPython":
            # PyPy's RSS rises and falls with its GC's generations (the nursery, then the major collections), so
            # a few hundred requests say nothing about it there; what the server holds is checked above.
            self.assertLess(_residentKiB(server.process.pid) - stalledKiB, 4096, "memory stays flat while paused")

    def floodAnswered(self) -> int:
        """How many of the flood's lines (C{a}) the server has answered, as its records say."""
        with open(self.records, "rb") as file:
            return file.read().count(b"\t127.0.0.1\ta\t1\tno\n")

    def test_sigtermClosesIdleKeptConnections(self) -> None:
        """SIGTERM closes a kept connection between requests at once and the server exits 0 well before the
        idle timeout."""
        server = ServerProcess(self.mktemp(), "--keep-alive", "--idle-timeout", "300")
        self.addCleanup(server.stop)  # should the test fail before its own stop, leave no server behind
        with socket.create_connection(("127.0.0.1", server.port), timeout=20) as client:
            client.sendall(b"aa\n")
            self.assertEqual(client.makefile("rb").readline(), expectedReply("aa"))
            started = time.monotonic()
            server.signal(signal.SIGTERM)
            self.assertEqual(_readAll(client), b"")
            self.assertEqual(server.stop(), 0, server.log)
            self.assertLess(time.monotonic() - started, 10)


def _readAll(connection: socket.socket) -> bytes:
    received = b""
    while chunk := connection.recv(65536):
        received += chunk
    return received


def _residentKiB(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")

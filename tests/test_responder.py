"""Tests for L{primecount.responder}: one thread-pool call per turn, record before reply, failures."""

from __future__ import annotations

from twisted.internet.defer import Deferred, fail
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from primecount import wire
from primecount.records import Record
from primecount.responder import AnalysisBatcher, Responder
from primecount.storage import StorageUnavailable
from tests.helpers import InlineThreads, MemoryRecords


class AnalysisBatcherTests(SynchronousTestCase):
    """Requests that end in the same turn share one thread-pool call."""

    def test_oneCallPerTurn(self) -> None:
        """Fifty requests in one turn are one call; the next turn's request is another."""
        clock, threads = Clock(), InlineThreads()
        batcher = AnalysisBatcher(clock, threads)
        outcomes = [batcher.submit(b"a" * n) for n in range(1, 51)]
        self.assertEqual(threads.calls, [])
        clock.advance(0)
        self.assertEqual(len(threads.calls), 1)
        self.assertEqual(
            [self.successResultOf(o) for o in outcomes],
            [wire.Answer("a" * n, n, n in {2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47}) for n in range(1, 51)],
        )
        batcher.submit(b"b")
        clock.advance(0)
        self.assertEqual(len(threads.calls), 2)

    def test_afterBatchRunsOnceDelivered(self) -> None:
        """The after-batch hook runs once per batch, after every request has its outcome."""
        clock, seen = Clock(), []
        batcher = AnalysisBatcher(clock, InlineThreads(), afterBatch=lambda: seen.append(list(delivered)))
        delivered: list[wire.Outcome] = []
        for raw in (b"a", b"bb"):
            batcher.submit(raw).addCallback(delivered.append)
        clock.advance(0)
        self.assertEqual(seen, [[wire.Answer("a", 1, False), wire.Answer("bb", 2, True)]])

    def test_threadFailureReachesEveryRequest(self) -> None:
        """If the thread-pool call fails, every request in the batch sees the failure."""
        clock = Clock()
        batcher = AnalysisBatcher(clock, lambda f, *a: fail(RuntimeError("pool gone")))
        outcomes = [batcher.submit(b"x"), batcher.submit(b"y")]
        clock.advance(0)
        for outcome in outcomes:
            self.failureResultOf(outcome, RuntimeError)

    def test_resultsWaitForThread(self) -> None:
        """Nothing is delivered before the thread's result arrives."""
        clock = Clock()
        running: Deferred[list[wire.Outcome]] = Deferred()
        batcher = AnalysisBatcher(clock, lambda f, raws: running)
        outcome = batcher.submit(b"aa")
        clock.advance(0)
        self.assertNoResult(outcome)
        running.callback(wire.evaluateAll([b"aa"]))
        self.assertEqual(self.successResultOf(outcome), wire.Answer("aa", 2, True))


class ResponderTests(SynchronousTestCase):
    """The responder records answers before releasing their replies."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_771_322_400.7)
        self.records = MemoryRecords()
        self.responder = Responder(self.clock, InlineThreads(), self.records)

    def test_answerIsRecorded(self) -> None:
        """An answer is stored with its timestamp, client and analysis, and its reply released."""
        reply = self.responder.respond(b"abc2a", "198.51.100.4")
        self.clock.advance(0)
        self.assertEqual(self.successResultOf(reply), "2 sí\n".encode())
        self.assertEqual(
            self.records.records,
            [Record(1_771_322_400, "198.51.100.4", "abc2a", 2, True)],
        )

    def test_recordsFlushedOncePerBatch(self) -> None:
        """After a batch of answers the records are flushed once, not once per record."""
        for n in range(5):
            self.responder.respond(b"x" * (n + 1), "198.51.100.4")
        self.clock.advance(0)
        self.assertEqual((len(self.records.records), self.records.flushes), (5, 1))

    def test_rejectionIsNotRecorded(self) -> None:
        """A rejected request gets its ERROR line and leaves no record."""
        reply = self.responder.respond(b"\xff", "198.51.100.4")
        self.clock.advance(0)
        self.assertEqual(self.successResultOf(reply), b"ERROR invalid UTF-8\n")
        self.assertEqual(self.records.records, [])

    def test_storageFailure(self) -> None:
        """When the record cannot be stored the client gets C{ERROR storage unavailable}, not an answer."""
        self.records.append = lambda record: fail(StorageUnavailable("disk full"))  # type: ignore[method-assign]
        reply = self.responder.respond(b"abc2a", "198.51.100.4")
        self.clock.advance(0)
        self.assertEqual(self.successResultOf(reply), b"ERROR storage unavailable\n")

    def test_internalError(self) -> None:
        """An unexpected failure in analysis is logged and answered with C{ERROR internal error}."""
        responder = Responder(self.clock, lambda f, *a: fail(ZeroDivisionError()), self.records)
        reply = responder.respond(b"abc2a", "198.51.100.4")
        self.clock.advance(0)
        self.assertEqual(self.successResultOf(reply), b"ERROR internal error\n")
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)

"""Tests for L{primecount.responder}: one thread-pool call and one records write per turn, record before reply."""

from __future__ import annotations

from twisted.internet.defer import Deferred, fail
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from primecount import wire
from primecount.records import Record
from primecount.responder import Responder
from primecount.storage import StorageUnavailable
from tests.helpers import InlineThreads, MemoryRecords

PRIMES = {2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47}


class BatchTests(SynchronousTestCase):
    """Requests that end in the same turn share one thread-pool call and one records write."""

    def setUp(self) -> None:
        self.clock, self.threads, self.records = Clock(), InlineThreads(), MemoryRecords()
        self.responder = Responder(self.clock, self.threads, self.records)

    def test_oneCallAndOneWritePerTurn(self) -> None:
        """Fifty requests in one turn are one pool call and one write; the next turn's request is another of each."""
        replies = [self.responder.respond(b"a" * n, "192.0.2.1") for n in range(1, 51)]
        self.assertEqual((self.threads.calls, self.records.batches), ([], []))
        self.clock.advance(0)
        self.assertEqual((len(self.threads.calls), self.records.batches), (1, [50]))
        self.assertEqual(
            [self.successResultOf(reply).data for reply in replies],
            [f"{n} {'sí' if n in PRIMES else 'no'}\n".encode() for n in range(1, 51)],
        )
        self.responder.respond(b"b", "192.0.2.1")
        self.clock.advance(0)
        self.assertEqual((len(self.threads.calls), self.records.batches), (2, [50, 1]))

    def test_onlyAnswersRecorded(self) -> None:
        """In a mixed batch only the answers are written; the rejections keep their place and their reason."""
        replies = [self.responder.respond(raw, "192.0.2.1") for raw in (b"aa", b"\xff", b"", b"b")]
        self.clock.advance(0)
        self.assertEqual(self.records.batches, [2])
        self.assertEqual(
            [self.successResultOf(reply) for reply in replies],
            [wire.Reply("2 sí\n".encode(), "ok"), wire.Reply(b"ERROR invalid UTF-8\n", "invalid_utf8", True),
             wire.Reply(b"ERROR empty message\n", "empty_message", True), wire.Reply(b"1 no\n", "ok")],
        )

    def test_noWriteForRejectionsOnly(self) -> None:
        """A batch with no answer writes nothing."""
        self.successResultOf(self._answered(b"\n"))
        self.assertEqual(self.records.batches, [])

    def _answered(self, raw: bytes) -> Deferred[wire.Reply]:
        reply = self.responder.respond(raw, "192.0.2.1")
        self.clock.advance(0)
        return reply

    def test_repliesWaitForThePool(self) -> None:
        """Nothing is written or released before the thread's result arrives."""
        running: Deferred[list[wire.Outcome]] = Deferred()
        responder = Responder(self.clock, lambda f, raws: running, self.records)
        reply = responder.respond(b"aa", "192.0.2.1")
        self.clock.advance(0)
        self.assertNoResult(reply)
        self.assertEqual(self.records.records, [])
        running.callback(wire.evaluateAll([b"aa"]))
        self.assertEqual(self.successResultOf(reply).data, "2 sí\n".encode())


class RecordBeforeReplyTests(SynchronousTestCase):
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
        self.assertEqual(self.successResultOf(reply), wire.Reply("2 sí\n".encode(), "ok", False, False))
        self.assertEqual(self.records.records, [Record(1_771_322_400, "198.51.100.4", "abc2a", 2, True)])

    def test_releasedOnlyOnceStored(self) -> None:
        """While the batch's write is not acknowledged, no reply of the batch is released."""
        self.records.hold = True
        replies = [self.responder.respond(raw, "198.51.100.4") for raw in (b"aa", b"\xff")]
        self.clock.advance(0)
        for reply in replies:
            self.assertNoResult(reply)
        self.records.release()
        self.assertEqual([self.successResultOf(r).outcome for r in replies], ["ok", "invalid_utf8"])

    def test_storageFailure(self) -> None:
        """When the batch cannot be stored its answers become C{ERROR storage unavailable}; rejections stay."""
        self.records.write = lambda records: fail(StorageUnavailable("disk full"))  # type: ignore[method-assign]
        replies = [self.responder.respond(raw, "198.51.100.4") for raw in (b"abc2a", b"\n")]
        self.clock.advance(0)
        self.assertEqual(
            [self.successResultOf(r) for r in replies],
            [wire.Reply(b"ERROR storage unavailable\n", "storage_unavailable", True, False),
             wire.Reply(b"ERROR empty message\n", "empty_message", True, False)],
        )

    def test_internalError(self) -> None:
        """An unexpected failure in analysis is logged once per batch and answered C{ERROR internal error}."""
        responder = Responder(self.clock, lambda f, *a: fail(ZeroDivisionError()), self.records)
        replies = [responder.respond(b"abc2a", "198.51.100.4"), responder.respond(b"b", "198.51.100.4")]
        self.clock.advance(0)
        self.assertEqual([self.successResultOf(reply) for reply in replies],
                         [wire.Reply(b"ERROR internal error\n", "internal_error", True, True)] * 2)
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        self.assertEqual(self.records.records, [])

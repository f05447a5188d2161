"""Tests for L{primecount.responder}: one thread-pool call and one records write per turn, record before reply."""

from __future__ import annotations

from twisted.internet.defer import Deferred, fail
from twisted.internet.task import Clock
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool
from twisted.trial.unittest import SynchronousTestCase

from primecount import wire
from primecount.records.formats import Record
from primecount.responder import Responder
from primecount.records.store import StorageUnavailable
from primecount.threads import BatchThread, batchScheduledPool, deferringTo
from tests.helpers import InlineThreads, MemoryRecords

PRIMES = {2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47}


class Asker:
    """A requester that keeps each batch of replies it is handed."""

    def __init__(self) -> None:
        self.batches: list[list[tuple[int, wire.Reply]]] = []

    def answered(self, replies: list[tuple[int, wire.Reply]]) -> None:
        """Keep the batch."""
        self.batches.append(replies)

    def ask(self, responder: Responder, raws: list[bytes], client: str = "192.0.2.1") -> None:
        """Ask C{responder} each of C{raws}, numbered from 0 in order."""
        for sequence, raw in enumerate(raws):
            responder.respond(raw, client, self, sequence)

    @property
    def replies(self) -> list[wire.Reply]:
        """Every reply handed over, in sequence order."""
        return [reply for _, reply in sorted(pair for batch in self.batches for pair in batch)]


class BatchTests(SynchronousTestCase):
    """Requests that end in the same turn share one thread-pool call and one records write."""

    def setUp(self) -> None:
        self.clock, self.threads, self.records = Clock(), InlineThreads(), MemoryRecords()
        self.responder = Responder(self.clock, self.threads, self.records)

    def test_oneCallAndOneWritePerTurn(self) -> None:
        """Fifty requests in one turn are one pool call and one write; the next turn's request is another of each."""
        asker = Asker()
        asker.ask(self.responder, [b"a" * n for n in range(1, 51)])
        self.assertEqual((self.threads.calls, self.records.batches), ([], []))
        self.clock.advance(0)
        self.assertEqual((len(self.threads.calls), self.records.batches), (1, [50]))
        self.assertEqual(
            [reply.data for reply in asker.replies],
            [f"{n} {'sí' if n in PRIMES else 'no'}\n".encode() for n in range(1, 51)],
        )
        self.assertEqual(len(asker.batches), 1, "one call per connection per batch")
        self.responder.respond(b"b", "192.0.2.1", asker, 50)
        self.clock.advance(0)
        self.assertEqual((len(self.threads.calls), self.records.batches), (2, [50, 1]))

    def test_eachConnectionToldOncePerBatch(self) -> None:
        """Interleaved requests of two connections in one batch: each is handed its own replies, in order, once."""
        first, second = Asker(), Asker()
        for sequence in range(3):
            self.responder.respond(b"a" * (sequence + 1), "192.0.2.1", first, sequence)
            self.responder.respond(b"\xff", "192.0.2.2", second, sequence)
        self.clock.advance(0)
        self.assertEqual([[sequence for sequence, _ in batch] for batch in first.batches], [[0, 1, 2]])
        self.assertEqual([[sequence for sequence, _ in batch] for batch in second.batches], [[0, 1, 2]])
        self.assertEqual([reply.outcome for reply in second.replies], ["invalid_utf8"] * 3)
        self.assertEqual([record.client for record in self.records.records], ["192.0.2.1"] * 3)

    def test_onlyAnswersRecorded(self) -> None:
        """In a mixed batch only the answers are written; the rejections keep their place and their reason."""
        asker = Asker()
        asker.ask(self.responder, [b"aa", b"\xff", b"", b"b"])
        self.clock.advance(0)
        self.assertEqual(self.records.batches, [2])
        self.assertEqual(
            asker.replies,
            [wire.Reply("2 sí\n".encode(), "ok"), wire.Reply(b"ERROR invalid UTF-8\n", "invalid_utf8", True),
             wire.Reply(b"ERROR empty message\n", "empty_message", True), wire.Reply(b"1 no\n", "ok")],
        )

    def test_noWriteForRejectionsOnly(self) -> None:
        """A batch with no answer writes nothing."""
        asker = Asker()
        asker.ask(self.responder, [b"\n"])
        self.clock.advance(0)
        self.assertEqual([reply.outcome for reply in asker.replies], ["empty_message"])
        self.assertEqual(self.records.batches, [])

    def test_repliesWaitForThePool(self) -> None:
        """Nothing is written or released before the thread's result arrives."""
        running: Deferred[list[wire.Outcome]] = Deferred()
        responder = Responder(self.clock, lambda f, raws: running, self.records)
        asker = Asker()
        asker.ask(responder, [b"aa"])
        self.clock.advance(0)
        self.assertEqual(asker.batches, [])
        self.assertEqual(self.records.records, [])
        running.callback(wire.evaluateAll([b"aa"]))
        self.assertEqual([reply.data for reply in asker.replies], ["2 sí\n".encode()])


class GatheringTests(SynchronousTestCase):
    """The records sink is told while requests are in analysis, so that a database can wait for their records."""

    def setUp(self) -> None:
        self.clock, self.records = Clock(), MemoryRecords()
        self.running: list[tuple[Deferred[list[wire.Outcome]], list[bytes]]] = []
        self.responder = Responder(self.clock, self._held, self.records)

    def _held(self, function: object, raws: list[bytes]) -> Deferred[list[wire.Outcome]]:
        """A pool call that returns when the test says (L{_finish})."""
        self.running.append((Deferred(), raws))
        return self.running[-1][0]

    def _finish(self, index: int) -> None:
        """Return pool call C{index} with the analysis of its requests."""
        running, raws = self.running[index]
        running.callback(wire.evaluateAll(raws))

    def test_toldUntilTheLastCallReturns(self) -> None:
        """Two overlapping pool calls: C{True} when the first starts; after each returns and its records are
        written, whether another is still out."""
        asker = Asker()
        self.responder.respond(b"aa", "192.0.2.1", asker, 0)
        self.clock.advance(0)
        self.responder.respond(b"bbb", "192.0.2.1", asker, 1)
        self.clock.advance(0)
        self.assertEqual(self.records.told, [True])
        self._finish(0)
        self.assertEqual((self.records.told, self.records.batches), ([True, True], [1]))
        self._finish(1)
        self.assertEqual((self.records.told, self.records.batches), ([True, True, False], [1, 1]))
        self.responder.respond(b"c", "192.0.2.1", asker, 2)
        self.clock.advance(0)
        self.assertEqual(self.records.told[-1], True)

    def test_toldAfterRejectionsAndFailures(self) -> None:
        """A call with nothing to record, or one that failed, still tells the sink when analysis is over."""
        asker = Asker()
        self.responder.respond(b"\xff", "192.0.2.1", asker, 0)
        self.clock.advance(0)
        self._finish(0)
        self.assertEqual(self.records.told, [True, False])
        self.responder.respond(b"aa", "192.0.2.1", asker, 1)
        self.clock.advance(0)
        self.running[1][0].errback(ZeroDivisionError())
        self.assertEqual(self.records.told, [True, False, True, False])
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        self.assertEqual([reply.outcome for reply in asker.replies], ["invalid_utf8", "internal_error"])


class RecordBeforeReplyTests(SynchronousTestCase):
    """The responder records answers before releasing their replies."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_771_322_400.7)
        self.records = MemoryRecords()
        self.responder = Responder(self.clock, InlineThreads(), self.records)

    def test_answerIsRecorded(self) -> None:
        """An answer is stored with its timestamp, client and analysis, and its reply released."""
        asker = Asker()
        asker.ask(self.responder, [b"abc2a"], "198.51.100.4")
        self.clock.advance(0)
        self.assertEqual(asker.replies, [wire.Reply("2 sí\n".encode(), "ok", False, False)])
        self.assertEqual(self.records.records, [Record(1_771_322_400, "198.51.100.4", "abc2a", 2, True)])

    def test_releasedOnlyOnceStored(self) -> None:
        """While the batch's write is not acknowledged, no reply of the batch is released."""
        self.records.hold = True
        asker = Asker()
        asker.ask(self.responder, [b"aa", b"\xff"], "198.51.100.4")
        self.clock.advance(0)
        self.assertEqual(asker.batches, [])
        self.records.release()
        self.assertEqual([reply.outcome for reply in asker.replies], ["ok", "invalid_utf8"])

    def test_storageFailure(self) -> None:
        """When the batch cannot be stored its answers become C{ERROR storage unavailable}; rejections stay."""
        self.records.write = lambda records: fail(StorageUnavailable("disk full"))  # type: ignore[method-assign]
        asker = Asker()
        asker.ask(self.responder, [b"abc2a", b"\n"], "198.51.100.4")
        self.clock.advance(0)
        self.assertEqual(
            asker.replies,
            [wire.Reply(b"ERROR storage unavailable\n", "storage_unavailable", True, False),
             wire.Reply(b"ERROR empty message\n", "empty_message", True, False)],
        )

    def test_internalError(self) -> None:
        """An unexpected failure in analysis is logged once per batch and answered C{ERROR internal error}."""
        responder = Responder(self.clock, lambda f, *a: fail(ZeroDivisionError()), self.records)
        asker = Asker()
        asker.ask(responder, [b"abc2a", b"b"], "198.51.100.4")
        self.clock.advance(0)
        self.assertEqual(asker.replies,
                         [wire.Reply(b"ERROR internal error\n", "internal_error", True, True)] * 2)
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        self.assertEqual(self.records.records, [])


class NeverSilentTests(SynchronousTestCase):
    """Whatever fails between a complete request and its reply, the request is answered: a pool call that
    cannot start, an analysis that never returns, a store that never answers."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.records = MemoryRecords()
        self.events: list[dict] = []
        self.patch(Responder, "log", Logger(observer=self.events.append))

    def test_noThreadToAnalyse(self) -> None:
        """A pool that cannot start a thread (the call fails as L{deferringTo} hands it over): every request of
        each batch is answered C{ERROR internal error} in the same turn, logged at most once a second."""
        pool = batchScheduledPool(ThreadPool(0, 1), Unstartable)
        pool.start()
        self.addCleanup(pool.stop)
        responder = Responder(self.clock, deferringTo(self.clock, pool), self.records)
        askers = [Asker() for _ in range(3)]
        for asker in askers:
            asker.ask(responder, [b"abc2a", b"b"])
            self.clock.advance(0)
        self.assertEqual([asker.replies for asker in askers],
                         [[wire.errorReply(wire.INTERNAL_ERROR, closes=True)] * 2] * 3)
        failures = [event["log_failure"] for event in self.events if "log_failure" in event]
        self.assertEqual([failure.type for failure in failures], [RuntimeError], "one line for the three batches")
        self.assertEqual(pool.threads, [], "no unstarted thread left for stop() to join")

    def test_analysisNeverReturns(self) -> None:
        """A pool call that never returns: its requests get C{ERROR internal error} at the reply deadline, and
        the result, if it ever comes, is dropped."""
        calls: list[Deferred[list[wire.Outcome]]] = []
        responder = Responder(self.clock, lambda f, *a: calls.append(Deferred()) or calls[-1], self.records, 4.0)
        asker = Asker()
        asker.ask(responder, [b"abc2a"])
        self.clock.advance(0)
        self.clock.advance(3.9)
        self.assertEqual(asker.batches, [])
        self.clock.advance(0.1)
        self.assertEqual(asker.replies, [wire.errorReply(wire.INTERNAL_ERROR, closes=True)])
        calls[0].callback(wire.evaluateAll([b"abc2a"]))
        self.assertEqual(len(asker.batches), 1)
        self.assertEqual(self.records.records, [])
        self.assertIn("1 requests not analysed within 4 s", [e["log_format"].format(**e) for e in self.events][-1][:40])

    def test_storeNeverAnswers(self) -> None:
        """A store whose write never fires: answers get C{ERROR storage unavailable} at the deadline, rejections
        their own C{ERROR}; each batch's own deadline, one timer at a time."""
        self.records.hold = True
        responder = Responder(self.clock, InlineThreads(), self.records, 4.0)
        first, second = Asker(), Asker()
        first.ask(responder, [b"abc2a", b"\n"])
        self.clock.advance(0)
        self.clock.advance(2)
        second.ask(responder, [b"x"])
        self.clock.advance(0)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1, "one deadline timer for both batches")
        self.clock.advance(2)
        self.assertEqual(first.replies, [wire.errorReply(wire.STORAGE_UNAVAILABLE),
                                         wire.errorReply(wire.EMPTY_MESSAGE)])
        self.assertEqual(second.batches, [])
        self.clock.advance(2)
        self.assertEqual(second.replies, [wire.errorReply(wire.STORAGE_UNAVAILABLE)])
        self.records.release()
        self.assertEqual((len(first.batches), len(second.batches)), (1, 1), "late results dropped")
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_answeredInTimeLeavesNoTimer(self) -> None:
        """Batches answered within the deadline leave no timer behind."""
        responder = Responder(self.clock, InlineThreads(), self.records, 4.0)
        Asker().ask(responder, [b"abc2a"])
        self.clock.advance(0)
        self.assertEqual(self.clock.getDelayedCalls(), [])


class Unstartable(BatchThread):
    """A thread that cannot be started, as when memory or the process's thread limit is exhausted."""

    def start(self) -> None:
        """Fail as CPython does."""
        raise RuntimeError("can't start new thread")

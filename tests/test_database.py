"""Records in PostgreSQL (L{primecount.records.table}): the service over stand-in writers, then a real cluster of the
tests' own (Debian's PostgreSQL, C{tests/postgres.py}) written by real twistd processes."""

from __future__ import annotations

import gc
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from typing import Any, Callable, Optional, Sequence

from hypothesis import given, settings, strategies as st
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import Logger
from twisted.python import usage
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from primecount.records.table import (
    GATHER_MOST, NUL_STAND_IN, OVERLAP_AFTER, PROBE_LOOK_INTERVAL, RTO_MIN_US, TCP_RTO_MIN_US, TableStore,
    quickRetransmissions, DatabaseWriter, connect, driver, insertParameters,
)
from primecount.records.formats import Record
from primecount.records.store import StorageUnavailable
from primecount.options import Options
from primecount.tools.serverprocess import ServerProcess
from tests.helpers import (
    ClientThreads, FollowingProcess, RecordingMetrics, ask, expectedReply, scrape, slow, threadPolicies, waitUntil,
)
from tests.postgres import Cluster, freshTable, sharedCluster

STORAGE_UNAVAILABLE = b"ERROR storage unavailable\n"
INSERT_ROW = ('INSERT INTO "{}" (time, client, message, count, prime, host, pid)'
              " VALUES (now(), '192.0.2.9', %s, 1, false, 'test', 1)")


def record(message: str, client: str = "192.0.2.1") -> Record:
    """A record of C{message} from C{client} at a fixed time."""
    return Record(1_771_322_400, client, message, 1, False)


class HeldThread:
    """A stand-in for the database threads: each call waits until the test finishes it, with success or a
    failure; which writer it was on is kept (C{writers}), and when it began on C{clock} (C{times})."""

    def __init__(self, clock: Optional[Clock] = None) -> None:
        self.calls: list[tuple[list[Record], Deferred[None]]] = []
        self.writers: list[Any] = []
        self.times: list[float] = []
        self._clock = clock

    def __call__(self, function: Callable[..., Any], rows: Sequence[Record] = ()) -> Deferred[None]:
        done: Deferred[None] = Deferred()
        self.calls.append((list(rows), done))
        self.writers.append(getattr(function, "__self__", None))
        self.times.append(self._clock.seconds() if self._clock is not None else 0.0)
        return done

    def finish(self, index: int = 0, error: Optional[Exception] = None) -> None:
        """End call C{index}: committed, or failed with C{error}."""
        _, done = self.calls[index]
        if error is None:
            done.callback(None)
        else:
            done.errback(error)


class AbandonCountingWriter(DatabaseWriter):
    """A writer with no database: counts the times its connection was abandoned."""

    abandoned = 0

    def abandon(self) -> bool:
        """Count it."""
        self.abandoned += 1
        return True


class ServiceTests(SynchronousTestCase):
    """Group commit, release after commit, failures, backoff and the timeout, with no database."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.thread = HeldThread()
        self.metrics = RecordingMetrics()
        self.events: list[dict] = []
        self.patch(TableStore, "log", Logger(observer=self.events.append))
        self.writer = AbandonCountingWriter("postgresql:///x", "t", "always")
        self.service = TableStore("postgresql:///x", self.clock, metrics=self.metrics, table="t", timeout=2.0,
                                  runInThread=self.thread, writers=[self.writer])

    def test_releasedOnlyAfterCommit(self) -> None:
        """A batch's result fires only once its transaction has committed."""
        stored = self.service.write([record("a")])
        self.assertNoResult(stored)
        self.thread.finish()
        self.successResultOf(stored)
        self.assertEqual(self.service.commits, 1)

    def test_batchesWaitingAreCommittedTogether(self) -> None:
        """Batches that arrive while a transaction is in flight go together in the next one."""
        first = self.service.write([record("a")])
        later = [self.service.write([record(m)]) for m in "bcd"]
        self.assertEqual(len(self.thread.calls), 1)
        self.thread.finish(0)
        self.successResultOf(first)
        self.assertEqual([r.message for r in self.thread.calls[1][0]], ["b", "c", "d"])
        for stored in later:
            self.assertNoResult(stored)
        self.thread.finish(1)
        for stored in later:
            self.successResultOf(stored)

    def test_transactionWaitsForRecordsBeingAnalysed(self) -> None:
        """While the responder has requests in analysis, a batch waits for their records; once none are left,
        all go in one transaction."""
        self.service.gathering(True)
        first = self.service.write([record("a")])
        self.service.gathering(True)  # another pool call returned, one more is out
        second = self.service.write([record("b")])
        self.service.gathering(True)
        self.assertEqual(self.thread.calls, [])
        self.service.gathering(False)
        self.assertEqual([[r.message for r in rows] for rows, _ in self.thread.calls], [["a", "b"]])
        self.thread.finish()
        self.successResultOf(first)
        self.successResultOf(second)

    def test_waitForAnalysisIsBounded(self) -> None:
        """When analysis never stops, a waiting batch goes once it has waited GATHER_MOST, the next time the
        responder says how its analysis stands; a transaction in flight still comes first."""
        self.service.gathering(True)
        stored = self.service.write([record("a")])
        self.clock.advance(GATHER_MOST / 2)
        self.service.gathering(True)
        self.assertEqual(self.thread.calls, [])
        self.clock.advance(GATHER_MOST / 2)
        self.service.gathering(True)
        self.assertEqual([[r.message for r in rows] for rows, _ in self.thread.calls], [["a"]])
        later = self.service.write([record("b")])
        self.clock.advance(GATHER_MOST)
        self.service.gathering(True)
        self.assertEqual(len(self.thread.calls), 1, "one transaction in flight at a time")
        self.thread.finish(0)
        self.successResultOf(stored)
        self.assertEqual([[r.message for r in rows] for rows, _ in self.thread.calls[1:]], [["b"]])
        self.thread.finish(1)
        self.successResultOf(later)

    def test_failureRefusesUntilAProbeSucceeds(self) -> None:
        """A failed transaction fails its batches and those waiting; from then on batches are refused at once,
        with no database call, while the store's own probes (on the backoff's schedule, a probe row rolled
        back) find the database still gone, then back; one log line for the incident, one when it is over."""
        failed = self.service.write([record("a")])
        waiting = self.service.write([record("b")])
        self.thread.finish(0, OSError("connection refused"))
        self.failureResultOf(failed, StorageUnavailable)
        self.failureResultOf(waiting, StorageUnavailable)
        self.failureResultOf(self.service.write([record("c")]), StorageUnavailable)
        self.assertEqual(len(self.thread.calls), 1, "no database call for a refused batch")
        self.clock.advance(PROBE_LOOK_INTERVAL)  # past the first backoff (0.1 s)
        self.assertEqual(self.thread.calls[1][0], [], "a probe, with no batch")
        self.thread.finish(1, OSError("connection refused"))
        self.failureResultOf(self.service.write([record("d")]), StorageUnavailable)
        self.clock.advance(PROBE_LOOK_INTERVAL)  # past the second (0.2 s)
        self.thread.finish(2, OSError("connection refused"))
        self.clock.advance(PROBE_LOOK_INTERVAL)
        self.assertEqual(len(self.thread.calls), 3, "no probe before the third backoff (0.4 s) is over")
        self.clock.advance(PROBE_LOOK_INTERVAL)
        self.thread.finish(3)
        back = self.service.write([record("e")])
        self.thread.finish(4)
        self.successResultOf(back)
        self.assertEqual([e["log_level"].name for e in self.events], ["error", "info"])
        self.assertIn("4 records refused meanwhile", self._text(self.events[-1]))
        self.assertEqual([e for e in self.metrics.events if e[0] == "storeIncident"], [("storeIncident", "database")])
        self.assertEqual(sum(e[1] for e in self.metrics.events if e[0] == "recordWriteFailed"), 4)

    def test_readyOnlyOnceProven(self) -> None:
        """At start the store probes the database at once and is not healthy (not ready) until that probe, or a
        batch, has succeeded; a failed start probe is the incident, told once as unreachable since the start,
        and the probes go on until one succeeds."""
        self.assertFalse(self.service.healthy())
        self.service.startService()
        self.addCleanup(self.service.stopService)
        self.assertEqual((len(self.thread.calls), self.thread.calls[0][0]), (1, []), "a probe, at once")
        self.assertFalse(self.service.healthy())
        self.thread.finish(0, OSError("password authentication failed"))
        self.assertFalse(self.service.healthy())
        self.assertEqual([self._text(e) for e in self.events][1:],
                         ["records database not reachable since the start (OSError: password authentication failed);"
                          " answering ERROR storage unavailable until it is back"])
        self.failureResultOf(self.service.write([record("refused")]), StorageUnavailable)
        self.clock.advance(PROBE_LOOK_INTERVAL)
        self.thread.finish(1)
        self.assertTrue(self.service.healthy())
        fresh = TableStore("postgresql:///x", self.clock, table="t", runInThread=self.thread, writers=[self.writer])
        fresh.startService()
        self.addCleanup(fresh.stopService)
        self.assertFalse(fresh.healthy())
        self.thread.finish(2)
        self.assertTrue(fresh.healthy())

    def test_tooSlowIsNotAnsweredAsRecorded(self) -> None:
        """A commit that does not return within the timeout fails its batch and its connection is abandoned;
        batches written meanwhile are refused at once; the late commit ends the incident, and batches that
        timed out while waiting are not written at all."""
        slowOne = self.service.write([record("a")])
        timedOut = self.service.write([record("b")])
        self.clock.advance(2.0)
        self.failureResultOf(slowOne, StorageUnavailable)
        self.failureResultOf(timedOut, StorageUnavailable)
        self.assertEqual(self.writer.abandoned, 1)
        self.failureResultOf(self.service.write([record("refused")]), StorageUnavailable)
        self.thread.finish(0)
        fresh = self.service.write([record("c")])
        self.assertEqual([r.message for r in self.thread.calls[1][0]], ["c"], "the timed-out batch is dropped")
        self.thread.finish(1)
        self.successResultOf(fresh)

    def test_tooSlowWhicheverTimerRunsFirst(self) -> None:
        """The batch's deadline and its commit's abandonment fall due at the same moment; when the reactor runs
        the abandonment first, the batch is still answered as too slow (one incident, told as slow), not as a
        failed commit."""
        slowOne = self.service.write([record("a")])
        calls = self.clock.calls
        calls.sort(key=lambda call: call.func.__name__ != "abandon")  # the same time: abandon first
        self.assertEqual(calls[0].getTime(), calls[1].getTime())
        self.clock.advance(2.0)
        self.failureResultOf(slowOne, StorageUnavailable)
        self.thread.finish(0, OSError("server closed the connection unexpectedly"))  # what the abandon causes
        self.assertEqual([self._text(e) for e in self.events if e["log_level"].name == "error"],
                         ["records database slow: no commit within 2 s; answering ERROR storage unavailable until it "
                          "is back"])
        self.assertEqual([e for e in self.metrics.events if e[0] == "storeIncident"],
                         [("storeIncident", "slow_commit")])

    def test_hungProbeIsAbandoned(self) -> None:
        """A probe that gets no answer within the timeout has its connection abandoned too."""
        failed = self.service.write([record("a")])
        self.thread.finish(0, OSError("connection refused"))
        self.failureResultOf(failed, StorageUnavailable)
        self.clock.advance(PROBE_LOOK_INTERVAL)
        self.assertEqual(len(self.thread.calls), 2)
        self.clock.advance(2.0)
        self.assertEqual(self.writer.abandoned, 1)

    def test_oneTimerForEveryWaitingBatch(self) -> None:
        """However many batches wait, one timer bounds them all (the oldest's deadline), beside the one of the
        transaction in flight, and none is left once they are answered."""
        stored = [self.service.write([record(str(n))]) for n in range(100)]
        calls = sorted(repr(call.func) for call in self.clock.getDelayedCalls())
        self.assertEqual(len(calls), 2, "one deadline for the batches, one for the transaction in flight")
        self.assertEqual(sum("abandon" in call for call in calls), 1)
        self.thread.finish(0)
        self.thread.finish(1)
        for result in stored:
            self.successResultOf(result)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_eachBatchHasItsOwnDeadline(self) -> None:
        """A batch written a second after another fails a second after it, not with it; a later batch that
        committed in time is not failed by the earlier one's deadline."""
        first = self.service.write([record("a")])
        self.clock.advance(1.0)
        second = self.service.write([record("b")])
        self.clock.advance(1.0)
        self.failureResultOf(first, StorageUnavailable)
        self.assertNoResult(second)
        self.clock.advance(0.5)
        self.thread.finish(0)  # the first's commit, late: its batch is already failed; the second goes next
        self.thread.finish(1)
        self.successResultOf(second)
        self.clock.advance(5.0)
        self.successResultOf(second)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    @settings(max_examples=400, deadline=None)
    @given(st.lists(st.one_of(st.just(("write",)),
                              st.tuples(st.just("advance"), st.sampled_from([0.001, OVERLAP_AFTER, 0.3, 0.7, 1.1, 2.0])),
                              st.tuples(st.just("finish"), st.booleans(), st.integers(0, 2)),
                              st.tuples(st.just("gathering"), st.booleans())),
                    max_size=40))
    def test_deadlinesAgainstAModel(self, steps: list[tuple[Any, ...]]) -> None:
        """Random interleavings of writes, time passing, commits (on up to three connections) ending in any
        order or failing, and the responder saying whether it has requests in analysis: every batch is
        answered exactly once; it is answered as stored only if its transaction committed before its
        deadline, and it fails by its deadline otherwise; one deadline timer at most is armed, and none once
        every batch is answered; never more calls in flight than connections, nor two on one connection; with
        a connection free and every commit in flight OVERLAP_AFTER old (or none in flight), and only then, a
        batch goes: none waits
        once the responder has none in analysis, nor once it has waited GATHER_MOST and the responder has
        spoken."""
        clock = Clock()
        thread = HeldThread(clock)
        writers = [AbandonCountingWriter("postgresql:///x", "t", "always") for _ in range(3)]
        service = TableStore("postgresql:///x", clock, table="t", timeout=2.0, runInThread=thread, writers=writers)
        service.log = Logger(observer=lambda event: None)
        writtenAt: dict[str, float] = {}
        outcomes: dict[str, object] = {}  # None for stored, else the failure
        committedAt: dict[str, float] = {}
        finished: set[int] = set()
        analysing = False
        for step in steps:
            began = len(thread.calls)
            openBefore = [index for index in range(began) if index not in finished]
            if step[0] == "write":
                message = str(len(writtenAt))
                writtenAt[message] = clock.seconds()
                service.write([record(message)]).addBoth(lambda result, m=message: outcomes.__setitem__(m, result))
            elif step[0] == "advance":
                clock.advance(step[1])
            elif step[0] == "gathering":
                analysing = step[1]
                service.gathering(analysing)
            else:
                open_ = [index for index in range(len(thread.calls)) if index not in finished]
                if open_:
                    index = open_[step[2] % len(open_)]
                    rows, _ = thread.calls[index]
                    if step[1]:
                        committedAt.update((row.message, clock.seconds()) for row in rows)
                    finished.add(index)
                    thread.finish(index, None if step[1] else RuntimeError("refused"))
            now = clock.seconds()
            for message, at in writtenAt.items():
                inTime = committedAt.get(message, float("inf")) < at + 2.0
                if message not in outcomes:
                    self.assertLess(now, at + 2.0, "a batch outlived its deadline")
                elif outcomes[message] is None:
                    self.assertTrue(inTime, "answered as stored without a commit before its deadline")
                else:
                    outcomes[message].trap(StorageUnavailable)  # type: ignore[attr-defined]
                    self.assertFalse(inTime, "failed although committed in time")
            deadlineTimers = [call for call in clock.getDelayedCalls()
                              if "_tooSlow" in repr(call)]
            self.assertLessEqual(len(deadlineTimers), 1)
            if len(outcomes) == len(writtenAt):
                self.assertEqual(deadlineTimers, [])
            for new in range(began, len(thread.calls)):
                self.assertEqual([index for index in openBefore if thread.times[new] - thread.times[index]
                                  < OVERLAP_AFTER - 1e-9 and index not in finished], [],
                                 "a commit overlapped one younger than OVERLAP_AFTER")
                openBefore.append(new)
            open_ = [index for index in range(len(thread.calls)) if index not in finished]
            self.assertLessEqual(len(open_), len(writers), "more calls in flight than connections")
            self.assertEqual(len({id(thread.writers[index]) for index in open_}), len(open_),
                             "two calls at once on one connection")
            inCalls = {row.message for rows, _ in thread.calls for row in rows}
            stranded = [m for m in writtenAt if m not in outcomes and m not in inCalls]
            free = len(open_) < len(writers) and all(now - thread.times[index] >= OVERLAP_AFTER + 1e-9
                                                     for index in open_)
            if free:
                if not analysing:
                    self.assertEqual(stranded, [], "a batch waits with nothing in analysis and a connection free")
                elif step[0] == "gathering":
                    self.assertEqual([m for m in stranded if now - writtenAt[m] >= GATHER_MOST], [],
                                     "a batch waited past GATHER_MOST")

    def _text(self, event: dict) -> str:
        from twisted.logger import formatEvent

        return formatEvent(event)


class OverlappingCommitsTests(SynchronousTestCase):
    """Several connections: the next batch goes on another one only once every commit in flight is
    OVERLAP_AFTER old, so a stalled commit (a lost packet, a far database) holds only its own batch."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.thread = HeldThread(self.clock)
        self.writers = [AbandonCountingWriter("postgresql:///x", "t", "always") for _ in range(3)]
        self.service = TableStore("postgresql:///x", self.clock, table="t", timeout=2.0, runInThread=self.thread,
                                  writers=self.writers)
        self.service.log = Logger(observer=lambda event: None)

    def messages(self, index: int) -> list[str]:
        """The messages of call C{index}."""
        return [row.message for row in self.thread.calls[index][0]]

    def test_nearDatabaseKeepsOneConnection(self) -> None:
        """Commits that return within OVERLAP_AFTER never open a second connection."""
        for n in range(5):
            stored = self.service.write([record(str(n))])
            self.clock.advance(OVERLAP_AFTER / 2)
            self.thread.finish(n)
            self.successResultOf(stored)
        self.assertEqual({id(writer) for writer in self.thread.writers}, {id(self.writers[0])})

    def test_stalledCommitHoldsOnlyItsOwnBatch(self) -> None:
        """While the first commit stalls, the next batches go on the other connections, each once the commit
        before it is OVERLAP_AFTER old, and are answered as they commit; with every connection busy batches
        wait; the one freed first takes them at once; the stalled batch fails by its own deadline and only
        its connection is abandoned."""
        stalled = self.service.write([record("a")])
        second = self.service.write([record("b")])
        self.clock.advance(OVERLAP_AFTER / 2)
        self.assertEqual(len(self.thread.calls), 1)
        self.clock.advance(OVERLAP_AFTER / 2)
        self.assertEqual([self.messages(1), self.thread.writers[1]], [["b"], self.writers[1]])
        third = [self.service.write([record(m)]) for m in "cd"]
        self.clock.advance(OVERLAP_AFTER)
        self.assertEqual([self.messages(2), self.thread.writers[2]], [["c", "d"], self.writers[2]])
        waiting = self.service.write([record("e")])
        self.clock.advance(0.5)
        self.assertEqual(len(self.thread.calls), 3, "a fourth call with three connections")
        self.thread.finish(1)
        self.successResultOf(second)
        self.assertNoResult(stalled)
        self.assertEqual([self.messages(3), self.thread.writers[3]], [["e"], self.writers[1]])
        self.thread.finish(2)
        self.thread.finish(3)
        for result in [*third, waiting]:
            self.successResultOf(result)
        self.clock.advance(1.5)
        self.failureResultOf(stalled, StorageUnavailable)
        self.assertEqual([writer.abandoned for writer in self.writers], [1, 0, 0])

    def test_commitSentBeforeAFailureDoesNotEndIt(self) -> None:
        """A commit sent before another connection failed is answered as stored when it returns, but does not
        end the incident (a server shutting down serves its old sessions a moment longer): only a later probe
        does, and the incident is one error line and one line when it is over."""
        events: list[dict] = []
        self.patch(TableStore, "log", Logger(observer=events.append))
        self.service = TableStore("postgresql:///x", self.clock, table="t", timeout=2.0, runInThread=self.thread,
                                  writers=self.writers)
        sentBefore = self.service.write([record("a")])
        self.clock.advance(OVERLAP_AFTER)
        failing = self.service.write([record("b")])
        self.thread.finish(1, OSError("the database system is shutting down"))
        self.failureResultOf(failing, StorageUnavailable)
        self.thread.finish(0)
        self.successResultOf(sentBefore)
        self.assertFalse(self.service.healthy())
        self.failureResultOf(self.service.write([record("c")]), StorageUnavailable)
        self.clock.advance(PROBE_LOOK_INTERVAL)
        self.assertEqual(self.thread.calls[2][0], [], "a probe")
        self.thread.finish(2)
        self.assertTrue(self.service.healthy())
        self.assertEqual([e["log_level"].name for e in events], ["error", "info"])

    def test_stopWaitsForEveryCommit(self) -> None:
        """Stopping waits until every commit in flight has returned."""
        first = self.service.write([record("a")])
        self.clock.advance(OVERLAP_AFTER)
        second = self.service.write([record("b")])
        stopped = self.service.stopService()
        self.thread.finish(0)
        self.clock.advance(0.1)
        self.assertNoResult(stopped)
        self.thread.finish(1)
        self.clock.advance(0.1)
        self.successResultOf(stopped)
        self.successResultOf(first)
        self.successResultOf(second)


class ProbeConnectionTests(SynchronousTestCase):
    """A probe always asks on a new connection: an old session can outlive what new ones meet."""

    def test_probeAsksOnANewSession(self) -> None:
        """Each probe closes the writer's session and asks on a new one (a new server process); the table keeps
        no probe row, and the next batch is stored."""
        cluster = sharedCluster(self)
        table = freshTable(self, cluster)
        writer = DatabaseWriter(cluster.uri, table, "always")
        self.addCleanup(writer.close)
        writer.connectNow()
        sessions = [writer._connection.pgconn.backend_pid]
        for _ in range(2):
            writer.tryAppend()
            sessions.append(writer._connection.pgconn.backend_pid)
        self.assertEqual(len(set(sessions)), 3, sessions)
        writer.append([record("after the probes")])
        self.assertEqual(cluster.query(f'SELECT message FROM "{table}"'), [("after the probes",)])


class QuickRetransmissionsTests(SynchronousTestCase):
    """A database connection's least retransmission timeout is lowered where the kernel allows it."""

    def test_tcpSocketLowered(self) -> None:
        """A TCP socket's least timeout is set to about RTO_MIN_US (rounded up to the kernel's tick), far below
        the default 200 ms; an older kernel is told apart, not an error."""
        with socket.socket() as tcp:
            if not quickRetransmissions(tcp.fileno()):
                raise SkipTest("this kernel has no TCP_RTO_MIN_US (Linux 6.15)")
            least = tcp.getsockopt(socket.IPPROTO_TCP, TCP_RTO_MIN_US)  # type: ignore[arg-type]
        self.assertTrue(RTO_MIN_US <= least < 50_000, least)

    def test_unixSocketLeftAlone(self) -> None:
        """A UNIX socket (a database on the same host) retransmits nothing: left as it is."""
        with socket.socket(socket.AF_UNIX) as local:
            self.assertFalse(quickRetransmissions(local.fileno()))


class InsertParametersTests(SynchronousTestCase):
    """The batch as array literals, and what the database makes of them."""

    MESSAGES = ["plain", "tab\there", "new\nline", "back\\slash \\N", "cr\rlf", "nul\0x", "esc\x1b[31m",
                "nel\x85", "ls\u2028ps\u2029", "ñandú 日本", "it's", "\\.", "a\n\\.\nb", "\\\t\\n", 'say "hi"',
                "{a,b}", "NULL", " spaced ", "", "a,b", '\\"', "}{"]

    def test_parameters(self) -> None:
        """Seconds, clients as inet (NULL for a UNIX peer), every message quoted with backslash and double quote
        escaped and NUL stood in for, counts, verdicts, then the host and the process."""
        parameters = insertParameters([Record(1_771_322_400, "::1", 'a"b\\', 2, True),
                                       Record(1_771_322_401, "", "c", 1, False),
                                       Record(1_771_322_402, "192.0.2.7", "a\0b", 2, True)], "host", 9)
        self.assertEqual(parameters, [b"{1771322400,1771322401,1771322402}", b'{"::1",NULL,"192.0.2.7"}',
                                      ('{"a\\"b\\\\","c","a' + NUL_STAND_IN + 'b"}').encode(), b"{2,1,2}",
                                      b"{t,f,t}", b"host", b"9"])

    def test_escapingFoundByCharacter(self) -> None:
        """A batch whose only awkward character is one backslash, one double quote or one NUL is escaped as a
        whole batch of them would be; a batch with none is quoted as it is; an empty batch is empty arrays."""
        for awkward, written in [("\\", "\\\\"), ('"', '\\"'), ("\0", NUL_STAND_IN)]:
            parameters = insertParameters([record("plain"), record(f"x{awkward}y")], "h", 1)
            self.assertEqual(parameters[2], f'{{"plain","x{written}y"}}'.encode())
        self.assertEqual(insertParameters([record("a b"), record("ñ,{}")], "h", 1)[2], '{"a b","ñ,{}"}'.encode())
        self.assertEqual(insertParameters([], "h", 1), [b"{}"] * 5 + [b"h", b"1"])

    def test_roundTrip(self) -> None:
        """Every awkward message comes back from the table as it was analysed (NUL as U+2400)."""
        cluster = sharedCluster(self)
        table = freshTable(self, cluster)
        writer = DatabaseWriter(cluster.uri, table, "always")
        self.addCleanup(writer.close)
        writer.append([record(message) for message in self.MESSAGES])
        writer.append([Record(1_771_322_400, "", "unix", 1, False),
                       Record(1_771_322_401, "::ffff:192.0.2.7", "mapped", 3, True)])
        stored = [message for (message,) in cluster.query(f'SELECT message FROM "{table}" ORDER BY id')]
        self.assertEqual(stored, [message.replace("\0", NUL_STAND_IN) for message in self.MESSAGES] + ["unix", "mapped"])
        rows = cluster.query(f'SELECT extract(epoch FROM time)::int8, host(client), count, prime FROM "{table}" '
                             "WHERE message IN ('unix', 'mapped') ORDER BY id")
        self.assertEqual(rows, [(1_771_322_400, None, 1, False), (1_771_322_401, "::ffff:192.0.2.7", 3, True)])


class OptionTests(SynchronousTestCase):
    """The database options are checked like the others."""

    def parse(self, *arguments: str) -> Options:
        """Parse C{arguments} as C{twistd primecount} would."""
        options = Options()
        options.parseOptions(list(arguments))
        return options

    def test_uriAccepted(self) -> None:
        """A libpq URI is taken as the records store, with its table."""
        options = self.parse("--records", "postgresql://app@db.example/records", "--records-table", "pc.records")
        self.assertEqual((options["records"], options["records-table"]), ("postgresql://app@db.example/records",
                                                                           "pc.records"))

    def test_badURIs(self) -> None:
        """A URI libpq would refuse (an unknown parameter, a bad port, a bad sslmode, more ports than hosts) is a
        one-line UsageError naming --records, in libpq's words, found without connecting anywhere."""
        for uri, words in (("postgresql://app@db.example/records?foo=bar", 'invalid URI query parameter: "foo"'),
                           ("postgresql://app@db.example:99999/records", 'invalid port number: "99999"'),
                           ("postgresql://app@db.example:abc/records", 'invalid integer value "abc"'),
                           ("postgresql://app@db.example/records?sslmode=bogus", 'invalid sslmode value: "bogus"'),
                           ("postgresql://app@a,b/records?port=1,2,3", "could not match 3 port numbers to 2 hosts")):
            error = str(self.assertRaises(usage.UsageError, self.parse, "--records", uri))
            self.assertTrue(error.startswith("--records: not a usable libpq connection URI: "), error)
            self.assertIn(words, error)
            self.assertNotIn("\n", error)

    def test_goodURIsOfEveryShape(self) -> None:
        """Host names, sockets, several hosts with their ports and parameters pass, resolved by nobody."""
        for uri in ("postgresql://app@db.invalid/records", "postgresql:///records?host=/run/postgresql&port=5433",
                    "postgresql://app@a.invalid:5432,b.invalid:5433/records?sslmode=verify-full&connect_timeout=3"):
            self.assertEqual(self.parse("--records", uri)["records"], uri)

    def test_badTable(self) -> None:
        """A table name with too many parts is refused, naming the option."""
        error = self.assertRaises(usage.UsageError, self.parse, "--records", "postgresql:///db",
                                  "--records-table", "a.b.c")
        self.assertIn("--records-table", str(error))

    def test_databaseOptionsNeedADatabase(self) -> None:
        """--records-table and --records-timeout with a records file are refused."""
        error = self.assertRaises(usage.UsageError, self.parse, "--records-table", "x")
        self.assertIn("--records-table: only applies with a postgresql://", str(error))

    def test_formatIsForFiles(self) -> None:
        """--records-format jsonl with a database is refused."""
        error = self.assertRaises(usage.UsageError, self.parse, "--records", "postgresql:///db",
                                  "--records-format", "jsonl")
        self.assertIn("--records-format", str(error))


class SchemaTests(SynchronousTestCase):
    """The table is created when missing, by any number of writers at once."""

    def test_eightWritersCreateAtOnce(self) -> None:
        """Eight writers whose first appends race to create the same table all succeed; one table, eight rows."""
        cluster = sharedCluster(self)
        table = freshTable(self, cluster)
        barrier, errors = threading.Barrier(8), []

        def append(number: int) -> None:
            writer = DatabaseWriter(cluster.uri, table, "always")
            barrier.wait()
            try:
                writer.append([record(f"w{number}")])
            except Exception as error:  # pragma: no cover - the failure this test looks for
                errors.append(error)
            finally:
                writer.close()

        threads = [threading.Thread(target=append, args=(n,)) for n in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        self.assertEqual(errors, [])
        self.assertEqual(cluster.query(f'SELECT count(*) FROM "{table}"'), [(8,)])

    def test_connectionPastDescriptor1024(self) -> None:
        """A connection whose socket is numbered past 1024 (a loaded server holds thousands of client sockets)
        carries batch after batch: checking it is alive does not use select(), which raised ValueError there."""
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard != resource.RLIM_INFINITY and hard < 1300:
            raise SkipTest(f"the descriptor limit ({hard}) is too low to open 1,100 descriptors")
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1300), hard))
        self.addCleanup(resource.setrlimit, resource.RLIMIT_NOFILE, (soft, hard))
        gc.collect()  # on PyPy, sockets left to the collector free low descriptors when it runs
        fillers = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
        self.addCleanup(lambda: [os.close(fd) for fd in fillers])
        cluster = sharedCluster(self)
        table = freshTable(self, cluster)
        writer = DatabaseWriter(cluster.uri, table, "always")
        self.addCleanup(writer.close)
        writer.connectNow()
        for _ in range(10):  # a low descriptor the collector freed meanwhile: fill it and connect again
            if writer._connection.pgconn.socket > 1024:
                break
            writer.close()
            fillers.append(os.open(os.devnull, os.O_RDONLY))
            writer.connectNow()
        writer.append([record("first")])
        self.assertGreater(writer._connection.pgconn.socket, 1024)
        writer.append([record("second")])
        self.assertEqual(cluster.query(f'SELECT message FROM "{table}" ORDER BY id'), [("first",), ("second",)])

    def test_timeIndexIsBRIN(self) -> None:
        """The table's one secondary index is a BRIN index on time, and a query over a time range uses it."""
        psycopg = driver()

        cluster = sharedCluster(self)
        table = freshTable(self, cluster)
        writer = DatabaseWriter(cluster.uri, table, "always")
        self.addCleanup(writer.close)
        writer.append([record("first")])
        indexes = cluster.query("SELECT indexname, indexdef FROM pg_indexes WHERE tablename = %s ORDER BY 1", table)
        self.assertEqual([name for name, _ in indexes], [f"{table}_pkey", f"{table}_time"])
        self.assertIn("USING brin (\"time\")", indexes[1][1])
        with psycopg.connect(cluster.uri, autocommit=True) as connection:
            connection.execute("SET enable_seqscan = off")  # a one-row table would be scanned whole otherwise
            plan = "\n".join(row[0] for row in connection.execute(
                f'EXPLAIN (COSTS OFF) SELECT count(*) FROM "{table}" WHERE time >= now() - interval \'1 day\''))
        self.assertIn(f"Bitmap Index Scan on {table}_time", plan)


class Clients(ClientThreads):
    """Client threads sending short unique messages tagged C{tag}."""

    def __init__(self, ports: list[int], clients: int, keepAlive: bool, tag: str) -> None:
        self.tag = tag
        super().__init__(ports, clients, keepAlive)

    def message(self, number: int, sent: int) -> str:
        """C{<tag> c<number> m<sent>} and a few more characters."""
        return f"{self.tag} c{number} m{sent} " + "ab" * (sent % 7 + 1)


class DatabaseOverTCPTestCase(SynchronousTestCase):
    """Real twistd processes writing their records to a table of the tests' cluster."""

    def setUp(self) -> None:
        self.cluster = sharedCluster(self)
        self.table = freshTable(self, self.cluster)

    def server(self, *options: str, ready: bool = True) -> ServerProcess:
        """A twistd primecount writing to this test's table, once it is C{ready} (its probe of the database at
        start is over); stopped at the end of the test."""
        server = ServerProcess(self.cluster.uri, "--records-table", self.table, "--max-per-ip", "0", *options)
        self.addCleanup(server.stop)
        if ready:
            server.waitFor(rb"primecount readiness: ready", count=3 if "--workers" in options else 1)
        return server

    def rows(self) -> Counter[str]:
        """How many rows each message has."""
        return Counter(message for (message,) in self.cluster.query(f'SELECT message FROM "{self.table}"'))

    def assertEveryAnswerHasOneRow(self, clients: Clients, least: int = 50) -> None:
        """Every verified reply's message has exactly one row; no reply but answers and storage errors."""
        self.assertEqual(clients.other, [])
        self.assertGreater(len(clients.answered), least)
        rows = self.rows()
        self.assertEqual([(m, rows[m]) for m in clients.answered if rows[m] != 1], [],
                         "each answer recorded exactly once (message, rows)")
        self.assertEqual([m for m, n in rows.items() if n > 1], [], "no row twice")


class OneTableTests(DatabaseOverTCPTestCase):
    """One table, one process or several."""

    def test_oneProcess(self) -> None:
        """One-shot and kept clients of one process: every verified reply has exactly one row, which names
        the client, the host and the process."""
        server = self.server("--keep-alive")
        clients = [Clients([server.port], 4, keepAlive=False, tag="once"),
                   Clients([server.port], 4, keepAlive=True, tag="kept")]
        time.sleep(1.5)
        for group in clients:
            self.assertEveryAnswerHasOneRow(group.stop(), least=20)
        (client, host, pid), = self.cluster.query(f'SELECT DISTINCT host(client), host, pid FROM "{self.table}"')
        self.assertEqual((client, host, pid), ("127.0.0.1", socket.gethostname(), server.process.pid))
        if hasattr(os, "SCHED_BATCH"):  # the database thread, like the analysis pool's, never preempts the reactor
            policies = threadPolicies(server.process.pid)
            self.assertGreaterEqual(len(policies), 2)
            self.assertEqual(policies, dict.fromkeys(policies, os.SCHED_BATCH))

    @slow
    def test_twoWorkers(self) -> None:
        """C{--workers 2 --keep-alive}: both workers write, every verified reply has exactly one row."""
        server = self.server("--workers", "2", "--keep-alive")
        server.waitForWorkers(2)
        clients = Clients([server.port], 8, keepAlive=False, tag="w2")
        time.sleep(2)
        self.assertEveryAnswerHasOneRow(clients.stop())
        writers = self.cluster.query(f'SELECT count(DISTINCT pid) FROM "{self.table}"')
        self.assertEqual(writers, [(2,)])

    @slow
    def test_twoInstancesStartingAtOnce(self) -> None:
        """Two instances started at once on a table that does not exist yet: both create it without a clash,
        and every verified reply of either has exactly one row."""
        first, second = self.server("--keep-alive"), self.server("--keep-alive")
        clients = Clients([first.port, second.port], 8, keepAlive=True, tag="two")
        time.sleep(2)
        self.assertEveryAnswerHasOneRow(clients.stop())
        self.assertEqual(self.cluster.query(f'SELECT count(DISTINCT pid) FROM "{self.table}"'), [(2,)])


class TroubleTests(DatabaseOverTCPTestCase):
    """primecount killed, and the database stopped, under load."""

    @slow
    def test_killedUnderLoad(self) -> None:
        """SIGKILL of primecount under load, three times: every verified reply has its row."""
        ports: list[int] = [0]
        servers = []
        clients: Optional[Clients] = None
        for _ in range(3):
            server = self.server("--keep-alive")
            servers.append(server)
            ports[0] = server.port
            if clients is None:
                clients = Clients(ports, 8, keepAlive=True, tag="kill")
            time.sleep(1.0)
            ports[0] = 0  # no client reconnects to the dead server's port (L{ClientThreads})
            os.kill(server.process.pid, signal.SIGKILL)
            server.process.wait(10)
        assert clients is not None
        self.assertEveryAnswerHasOneRow(clients.stop())

    @slow
    def test_databaseStoppedAndStarted(self) -> None:
        """The database stopped under load: clients get ERROR storage unavailable, no answer lacks its row; once
        it is started again, service resumes without restarting primecount, and the incident is logged once."""
        cluster = Cluster(sharedCluster(self).binaries)  # its own cluster: this one is stopped
        self.addCleanup(cluster.destroy)
        cluster.start()
        self.cluster = cluster
        server = ServerProcess(cluster.uri, "--records-table", self.table, "--max-per-ip", "0", "--keep-alive")
        self.addCleanup(server.stop)
        clients = Clients([server.port], 6, keepAlive=True, tag="stop")
        waitUntil(lambda: len(clients.answered) > 50, 20, "answers before the stop")
        cluster.stop()
        waitUntil(lambda: clients.unavailable > 20, 20, "ERROR storage unavailable while stopped")
        answeredWhileDown = len(clients.answered)
        cluster.start()
        waitUntil(lambda: len(clients.answered) > answeredWhileDown + 100, 30, "answers once started again")
        self.assertEveryAnswerHasOneRow(clients.stop())
        server.waitFor(rb"records database back after", 10)
        self.assertEqual(server.log.count("records database unavailable"), 1, server.log)


class DatabaseCrashTests(DatabaseOverTCPTestCase):
    """A crash of the database's processes under load, with the default settings: PostgreSQL drops the WAL it
    had not flushed, so an answered row survives only if its commit waited for the flush. Every answer must
    have its row after each kind of crash."""

    def crashUnderLoad(self, crash: Callable[[Cluster], None]) -> None:
        """Clients on kept connections, C{crash} of this test's own cluster once answers flow, service again by
        itself: every verified reply has exactly one row."""
        cluster = Cluster(sharedCluster(self).binaries)
        self.addCleanup(cluster.destroy)
        cluster.start()
        self.cluster = cluster
        server = self.server("--keep-alive")
        clients = Clients([server.port], 8, keepAlive=True, tag="crash")
        waitUntil(lambda: len(clients.answered) > 300, 30, "answers before the crash")
        crash(cluster)
        answeredAfter = len(clients.answered)
        waitUntil(lambda: len(clients.answered) > answeredAfter + 300, 60, "answers after the crash")
        self.assertEveryAnswerHasOneRow(clients.stop())
        self.assertEqual(server.stop(), 0, server.log)

    @slow
    def test_idleSessionKilled(self) -> None:
        """SIGKILL of an idle session that has nothing to do with primecount: PostgreSQL restarts every
        backend, and no answered row is lost."""
        self.crashUnderLoad(Cluster.killIdleSession)

    @slow
    def test_postmasterKilledAndStarted(self) -> None:
        """SIGKILL of the postmaster, then a start once its backends have gone: no answered row is lost."""
        self.crashUnderLoad(Cluster.killPostmasterAndStart)

    @slow
    def test_immediateRestart(self) -> None:
        """C{pg_ctl restart -m immediate}: no answered row is lost."""
        self.crashUnderLoad(Cluster.restartImmediately)

    def test_defaultCommitWaitsForTheFlush(self) -> None:
        """A connection made with the default C{--fsync} commits with C{synchronous_commit=on}; only the
        explicit C{--fsync never} turns it off."""
        cluster = sharedCluster(self)
        default = Options()
        default.parseOptions(["--records", cluster.uri])
        for fsync, expected in ((default["fsync"], "on"), ("always", "on"), ("never", "off")):
            connection = connect(cluster.uri, fsync)
            self.addCleanup(connection.close)
            self.assertEqual(connection.execute("SHOW synchronous_commit").fetchall(), [(expected,)], fsync)


class RestartTests(DatabaseOverTCPTestCase):
    """A database restarted cleanly between requests, or unreachable when primecount starts."""

    def ownCluster(self) -> Cluster:
        """A running cluster of this test's own (it is stopped and started)."""
        cluster = Cluster(sharedCluster(self).binaries)
        self.addCleanup(cluster.destroy)
        cluster.start()
        self.cluster = cluster
        return cluster

    def test_firstRequestAfterARestartIsAnswered(self) -> None:
        """After C{pg_ctl restart -m fast}, the next request of one process, and of each of two idle workers,
        is answered and recorded: the dead connection is found before the batch is sent, and replaced."""
        cluster = self.ownCluster()
        for workers in ("1", "2"):
            server = ServerProcess(cluster.uri, "--records-table", self.table, "--max-per-ip", "0",
                                   "--workers", workers)
            self.addCleanup(server.stop)
            # Ready: each process's probe at start is over (a restart during one would fail it).
            server.waitFor(rb"primecount readiness: ready", count=3 if workers == "2" else 1)  # each worker, then all
            before = f"before restart, {workers} workers"
            self.assertEqual(ask(server.port, before.encode() + b"\n"), expectedReply(before))
            cluster.stop("fast")
            cluster.start()
            after = [f"after restart, {workers} workers, {n}" for n in range(10)]
            self.assertEqual([ask(server.port, m.encode() + b"\n") for m in after], [expectedReply(m) for m in after])
            self.assertEqual(server.stop(), 0, server.log)
            self.assertNotIn("records database unavailable", server.log)
            rows = self.rows()
            self.assertEqual([rows[m] for m in [before, *after]], [1] * 11)

    def test_unreachableAtStartIsSaidAtStart(self) -> None:
        """With the database down at start, primecount says so in one line before any client comes, listens
        but is not ready (C{/readyz} 503, the store gauge 0), answers ERROR storage unavailable, and is ready
        and records again once the database is up, by itself."""
        from tests.test_fleet import httpGet

        cluster = self.ownCluster()
        cluster.stop()
        server = self.server("--metrics", "tcp:0:interface=127.0.0.1", ready=False)
        server.waitFor(rb"records database not reachable since the start \(OperationalError: [^\n]+\); answering "
                       rb"ERROR storage unavailable until it is back")
        metrics = server.metricsPort
        self.assertEqual(httpGet(metrics, "/readyz"), (503, "not ready: records store unavailable\n"))
        self.assertEqual(scrape(metrics)["primecount_records_store_healthy"], 0.0)
        self.assertEqual(ask(server.port, b"while down\n"), STORAGE_UNAVAILABLE)
        cluster.start()
        attempts: list[str] = []

        def answered() -> bool:
            attempts.append(f"once up {len(attempts)}")
            return ask(server.port, attempts[-1].encode() + b"\n") == expectedReply(attempts[-1])

        waitUntil(answered, what="service once the database is up")
        self.assertEqual(httpGet(metrics, "/readyz"), (200, "ready\n"))
        self.assertEqual(server.log.count("not reachable since the start"), 1)
        self.assertEqual(self.rows()[attempts[-1]], 1)


class NeverReachedTests(DatabaseOverTCPTestCase):
    """A database primecount cannot use from the start (one that does not exist, a role it does not know): the
    host is never ready, from its first probe on, before any client comes."""

    def test_neverReadyWithABadDatabase(self) -> None:
        """For a missing database and an unknown role: C{/readyz} 503 and the store gauge 0 from the start, the
        reason logged once, requests answered ERROR storage unavailable."""
        from tests.test_fleet import httpGet

        for uri, reason in ((self.cluster.uri.replace("/postgres?", "/no_such_database?"), 'database "no_such_database" does not exist'),
                            (self.cluster.uri.replace("user=primecount", "user=no_such_role"), 'role "no_such_role" does not exist')):
            server = ServerProcess(uri, "--records-table", self.table, "--metrics", "tcp:0:interface=127.0.0.1")
            self.addCleanup(server.stop)
            server.waitFor(rb"records database not reachable since the start")
            metrics = server.metricsPort
            self.assertEqual(httpGet(metrics, "/readyz"), (503, "not ready: records store unavailable\n"))
            self.assertEqual(scrape(metrics)["primecount_records_store_healthy"], 0.0)
            self.assertEqual(ask(server.port, b"refused\n"), STORAGE_UNAVAILABLE)
            self.assertEqual(server.stop(), 0)
            self.assertIn(reason, server.log)
            self.assertEqual(server.log.count("not reachable since the start"), 1, server.log)


class ReadinessTests(DatabaseOverTCPTestCase):
    """C{/readyz} follows the records database: unready once a batch was refused, ready again by itself."""

    def test_databaseStoppedThenStarted(self) -> None:
        """Database stopped: the next request gets ERROR storage unavailable and C{/readyz} says 503 at once;
        started again, with no request sent, C{/readyz} says 200 by itself (its probes roll back their rows),
        and the next request is answered and recorded."""
        from tests.test_fleet import httpGet

        cluster = Cluster(sharedCluster(self).binaries)
        self.addCleanup(cluster.destroy)
        cluster.start()
        self.cluster = cluster
        server = self.server("--metrics", "tcp:0:interface=127.0.0.1")
        metrics = server.metricsPort
        self.assertEqual(ask(server.port, b"before\n"), expectedReply("before"))
        self.assertEqual(httpGet(metrics, "/readyz"), (200, "ready\n"))
        cluster.stop("fast")
        self.assertEqual(ask(server.port, b"while down\n"), STORAGE_UNAVAILABLE)
        self.assertEqual(httpGet(metrics, "/readyz"), (503, "not ready: records store unavailable\n"))
        cluster.start()
        startedAt = time.monotonic()
        waitUntil(lambda: httpGet(metrics, "/readyz")[0] == 200, seconds=20, what="/readyz to say ready again")
        Logger().info("database readiness figures: ready {seconds:.2f} s after the database started",
                      seconds=time.monotonic() - startedAt)
        self.assertEqual(ask(server.port, b"after\n"), expectedReply("after"))
        self.assertEqual(server.stop(), 0, server.log)
        self.assertEqual(self.rows(), Counter({"before": 1, "after": 1}))
        self.assertIn("records database back after", server.log)


class DriverTests(SynchronousTestCase):
    """psycopg's pure-Python libpq wrapper (the one PyPy runs) works on this interpreter once L{driver} has run,
    and still has the name L{driver} replaces."""

    def test_pureWrapperConnects(self) -> None:
        """A connection of the ctypes wrapper is made and answers, whichever wrapper the interpreter uses."""
        cluster = sharedCluster(self)
        driver()
        from psycopg.pq import pq_ctypes

        self.assertTrue(callable(pq_ctypes.ref), "psycopg's wrapper no longer takes a weak reference here")
        connection = pq_ctypes.PGconn.connect(cluster.uri.encode())
        self.addCleanup(connection.finish)
        self.assertEqual(connection.exec_(b"SELECT 41 + 1").get_value(0, 0), b"42")


class SchemaRepairTests(DatabaseOverTCPTestCase):
    """A records table renamed away is made again whole, its time index included."""

    def test_tableRenamedAway(self) -> None:
        """After the table is renamed under a writer, the next append makes a new table with a BRIN index on
        time (the old one keeps its own), and the rows go there."""
        writer = DatabaseWriter(self.cluster.uri, self.table, "always")
        self.addCleanup(writer.close)
        writer.append([record("first")])
        self.cluster.query(f'ALTER TABLE "{self.table}" RENAME TO "{self.table}_old"')
        self.addCleanup(self.cluster.query, f'DROP TABLE IF EXISTS "{self.table}_old"')
        writer.close()  # the next append connects again, as after a failure
        writer.append([record("second")])
        for table in (self.table, f"{self.table}_old"):
            indexes = [definition for (definition,) in self.cluster.query(
                "SELECT indexdef FROM pg_indexes WHERE tablename = %s", table)]
            self.assertEqual(len([d for d in indexes if 'USING brin ("time")' in d]), 1, (table, indexes))
        self.assertEqual(self.rows(), Counter(["second"]))
        writer.close()
        writer.append([record("third")])  # and nothing more is made when the index is there
        self.assertEqual(len(self.cluster.query("SELECT 1 FROM pg_indexes WHERE tablename = %s", self.table)), 2)


class SlowDatabaseTests(DatabaseOverTCPTestCase):
    """A database that stops answering (the table locked by another session) past --records-timeout."""

    def test_lockedTable(self) -> None:
        """While the table is locked, requests get ERROR storage unavailable after the timeout and requests
        that need no record are still answered at once; once unlocked, service resumes by itself, and the
        slowness was logged once."""
        psycopg = driver()

        server = self.server("--records-timeout", "1")
        self.assertEqual(ask(server.port, b"before\n"), expectedReply("before"))
        with psycopg.connect(self.cluster.uri) as blocker:
            blocker.execute(f'LOCK TABLE "{self.table}" IN ACCESS EXCLUSIVE MODE')
            self.assertEqual(ask(server.port, b"locked one\n"), STORAGE_UNAVAILABLE)
            self.assertEqual(ask(server.port, b"\n"), b"ERROR empty message\n")
            self.assertEqual(ask(server.port, b"locked two\n"), STORAGE_UNAVAILABLE)
        waitUntil(lambda: ask(server.port, b"after\n") == expectedReply("after"), 20, "service again")
        rows = self.rows()
        self.assertEqual((rows["before"], rows["after"] >= 1, rows["locked two"]), (1, True, 0))
        server.waitFor(rb"records database back after", 10)
        self.assertEqual(server.log.count("records database slow"), 1, server.log)


class RefusedBatchTests(DatabaseOverTCPTestCase):
    """A database that refuses a batch (here a CHECK constraint the rows break)."""

    def test_refusedBatch(self) -> None:
        """The batch the database refuses is answered ERROR storage unavailable and leaves no row; the next
        batches are written as usual once the backoff has passed."""
        server = self.server()
        self.assertEqual(ask(server.port, b"first\n"), expectedReply("first"))
        self.cluster.query(f'ALTER TABLE "{self.table}" ADD CONSTRAINT refuse CHECK (message <> \'refused\')')
        self.assertEqual(ask(server.port, b"refused\n"), STORAGE_UNAVAILABLE)
        waitUntil(lambda: ask(server.port, b"later\n") == expectedReply("later"), 20, "service again")
        rows = self.rows()
        self.assertEqual((rows["first"], rows["refused"], rows["later"]), (1, 0, 1))
        server.waitFor(rb"records database back after", 10)
        self.assertIn("CheckViolation", server.log)


class RecordsToolTests(FollowingProcess, DatabaseOverTCPTestCase):
    """primecount-records reads the table."""

    def tool(self, *arguments: str) -> str:
        """Run the records tool; its output."""
        result = subprocess.run([sys.executable, "-m", "primecount.records", *arguments], capture_output=True,
                                text=True, timeout=60)
        self.assertEqual(result.returncode, 0, result.stderr)
        return result.stdout

    def test_statsAndTail(self) -> None:
        """stats counts in SQL (with --since) and tail prints the last rows as records lines."""
        writer = DatabaseWriter(self.cluster.uri, self.table, "always")
        self.addCleanup(writer.close)
        writer.append([Record(1_771_322_400, "192.0.2.1", "aa", 2, True), Record(1_771_322_401, "192.0.2.2", "a", 1,
                                                                                  False),
                       Record(1_771_322_520, "192.0.2.1", "x\ty", 1, False)])
        stats = self.tool("stats", self.cluster.uri, "--table", self.table)
        self.assertIn("records      3\n", stats)
        self.assertIn("sí           1 (33.3%)\n", stats)
        self.assertIn("clients      2\n", stats)
        self.assertIn("           2  192.0.2.1\n", stats)
        since = self.tool("stats", self.cluster.uri, "--table", self.table, "--since", "1771322500")
        self.assertIn("records      1\n", since)
        tail = self.tool("tail", self.cluster.uri, "--table", self.table, "-n", "2").splitlines()
        self.assertEqual(len(tail), 2)
        self.assertEqual([line.split("\t")[1:] for line in tail],
                         [["192.0.2.2", "a", "1", "no"], ["192.0.2.1", "x\\ty", "1", "no"]])

    def waitUntilFollowing(self) -> None:
        """Wait until follow has read where the table ends: its session has committed the transaction that
        read it (a later write is after the start; a fixed sleep lost that race on a loaded machine)."""
        waitUntil(lambda: self.cluster.query(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'primecount-records'"
            " AND (query = 'COMMIT' OR query LIKE %s)", "%WHERE id > %")[0][0] > 0, 60,
            "follow to have read where the table ends")

    def followFromTheEnd(self) -> tuple[DatabaseWriter, "subprocess.Popen[str]"]:
        """A writer whose row "old" is in the table, and C{follow} started from the end, past it, once it has
        read where that is (so anything written later is after its start)."""
        writer = DatabaseWriter(self.cluster.uri, self.table, "always")
        self.addCleanup(writer.close)
        writer.append([record("old")])
        follower = self.startFollowing(self.cluster.uri, "--table", self.table)
        self.addCleanup(follower.kill)
        self.waitUntilFollowing()
        return writer, follower

    def insertHeld(self, message: str) -> Any:
        """Insert a row of C{message} in a transaction left open; the connection, to commit it."""
        psycopg = driver()

        held = psycopg.connect(self.cluster.uri)
        self.addCleanup(held.close)
        held.execute(INSERT_ROW.format(self.table), [message])
        return held

    def test_followPrintsRowsCommittedBelowPrintedOnes(self) -> None:
        """A writer still running holds a lower id than rows another writer commits meanwhile: follow prints
        the later ones, then the held one once it commits, and nothing twice (as a fleet's writers commit)."""
        writer, follower = self.followFromTheEnd()
        held = self.insertHeld("held")
        writer.append([record("after")])
        try:
            self.assertEqual(self.nextMessage(follower), "after")
            held.commit()
            self.assertEqual(self.nextMessage(follower), "held")
            writer.append([record("last")])
            self.assertEqual(self.nextMessage(follower), "last", "nothing printed twice")
        finally:
            self.interrupt(follower)

    @slow
    def test_followTwoWritersUnderLoad(self) -> None:
        """Two instances write at once under load while follow runs: it prints every row they commit exactly
        once, though their batches commit in no particular order of ids."""
        _, follower = self.followFromTheEnd()
        first, second = self.server("--keep-alive"), self.server("--keep-alive")
        clients = Clients([first.port, second.port], 8, keepAlive=True, tag="followed")
        time.sleep(2)
        self.assertGreater(len(clients.stop().answered), 50)
        for server in (first, second):  # a stopped server has committed or refused every batch it took
            self.assertEqual(server.stop(), 0)
        committed = self.rows() - Counter(["old"])
        printed: Counter[str] = Counter()
        try:
            while sum(printed.values()) < sum(committed.values()):
                printed[self.nextMessage(follower)] += 1
        finally:
            self.interrupt(follower)
        while not self.printed.empty():  # anything printed twice is still queued
            printed[self.printed.get().split("\t")[2]] += 1
        self.assertEqual(printed, committed)

    def test_pollFindsLateRowsInSQL(self) -> None:
        """One poll at a time (L{tablerecords._poll}, the SQL of L{FollowHorizon.isLate}): a row below the
        cursor is found late when its writer was running at the last poll, or began since; rows already
        visible then are not found again."""
        psycopg = driver()

        from primecount.tools.tablerecords import FollowHorizon, _poll, _snapshot

        writer = DatabaseWriter(self.cluster.uri, self.table, "always")
        self.addCleanup(writer.close)
        writer.append([record("old")])
        connection = psycopg.connect(self.cluster.uri, autocommit=True)
        self.addCleanup(connection.close)
        horizon = FollowHorizon(1, _snapshot(connection), 0.0)

        def poll() -> tuple[list[str], list[str]]:
            late, rows = _poll(connection, self.table, horizon, 0.0)
            return [values[3] for values in late], [values[3] for values in rows]

        held = self.insertHeld("held")  # id 2, its transaction running
        (reserved,), = self.cluster.query(f"SELECT nextval(pg_get_serial_sequence('\"{self.table}\"', 'id'))")
        writer.append([record("after")])  # id 4
        self.assertEqual(poll(), ([], ["after"]))
        held.commit()
        self.cluster.query(INSERT_ROW.replace("(time", "(id, time").replace("VALUES (", "VALUES (%s, ").format(
            self.table), reserved, "reserved")  # id 3, by a transaction begun after that poll
        self.assertEqual(poll(), (["held", "reserved"], []))
        self.assertEqual(poll(), ([], []))

    def test_follow(self) -> None:
        """follow prints the rows committed after it started, as records lines, until interrupted."""
        writer, follower = self.followFromTheEnd()
        writer.append([record("new one"), record("new two")])
        try:
            self.assertEqual([self.nextMessage(follower), self.nextMessage(follower)], ["new one", "new two"])
        finally:
            self.interrupt(follower)
        self.assertEqual(follower.returncode, 0)

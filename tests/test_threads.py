"""Tests for L{primecount.threads}: pool threads run under C{SCHED_BATCH}, the reactor thread does not, in a
pool of this process and in a real twistd."""

from __future__ import annotations

import os
import threading

from twisted.python.threadpool import ThreadPool
from twisted.trial.unittest import SynchronousTestCase

from primecount.threads import BatchThread, batchScheduled, batchScheduledPool
from primecount.tools.serverprocess import ServerProcess
from tests.helpers import ask, expectedReply, threadPolicies, waitUntil

BATCH = getattr(os, "SCHED_BATCH", None)


def policyOf(thread: int = 0) -> int:
    """The scheduling policy of the thread with id C{thread} (0: the calling one)."""
    return os.sched_getscheduler(thread)


class BatchThreadTests(SynchronousTestCase):
    """A L{BatchThread} changes its own policy and nobody else's."""

    skip = None if BATCH is not None else "no SCHED_BATCH on this system"

    def test_targetRunsUnderBatch(self) -> None:
        """The target sees C{SCHED_BATCH}; the thread that started it keeps its own policy."""
        before = policyOf()
        seen: list[int] = []
        thread = BatchThread(target=lambda: seen.append(policyOf()))
        thread.start()
        thread.join()
        self.assertEqual(seen, [BATCH])
        self.assertEqual(policyOf(), before)
        self.assertNotEqual(before, BATCH)

    def test_batchScheduledOnlyTheCaller(self) -> None:
        """L{batchScheduled} says it switched, and switched only the thread that called it."""
        results: list[tuple[bool, int]] = []
        thread = threading.Thread(target=lambda: results.append((batchScheduled(), policyOf())))
        thread.start()
        thread.join()
        self.assertEqual(results, [(True, BATCH)])
        self.assertNotEqual(policyOf(), BATCH)

    def test_poolThreads(self) -> None:
        """Every thread a batch-scheduled pool starts runs its work under C{SCHED_BATCH}."""
        pool = batchScheduledPool(ThreadPool(3, 3, "test-batch"))
        seen: list[int] = []
        done = threading.Event()

        def work() -> None:
            seen.append(policyOf())
            if len(seen) == 6:
                done.set()

        pool.start()
        try:
            for _ in range(6):
                pool.callInThread(work)
            self.assertTrue(done.wait(10))
            self.assertTrue(pool.threads)
            self.assertTrue(all(isinstance(thread, BatchThread) for thread in pool.threads))
        finally:
            pool.stop()
        self.assertEqual(seen, [BATCH] * 6)


class TwistdThreadsTests(SynchronousTestCase):
    """In a real twistd, the analysis pool's threads are batch-scheduled and the reactor thread is not."""

    skip = None if BATCH is not None else "no SCHED_BATCH on this system"

    def test_reactorThreadKeepsItsPolicy(self) -> None:
        """After requests were answered (so the pool has threads), every thread but the reactor's is under
        C{SCHED_BATCH}."""
        server = ServerProcess(self.mktemp())
        try:
            for message in ["abc2a", "añoñ", "x"]:
                self.assertEqual(ask(server.port, f"{message}\n".encode()), expectedReply(message))
            pid = server.process.pid
            waitUntil(lambda: threadPolicies(pid), what="a pool thread")
            self.assertNotEqual(policyOf(pid), BATCH)
            policies = threadPolicies(pid)
            self.assertEqual(policies, dict.fromkeys(policies, BATCH))
        finally:
            self.assertEqual(server.stop(), 0, server.log)

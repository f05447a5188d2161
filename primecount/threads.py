"""Threads that work for the reactor without taking the CPU from it: the analysis pool's and the database's,
under C{SCHED_BATCH}, which never preempts the reactor thread on wakeup (docs/protocol.md)."""

from __future__ import annotations

import os
import threading

from twisted.python.threadpool import ThreadPool


def batchScheduled() -> bool:
    """Put the calling thread under C{SCHED_BATCH}; whether it could (not on systems without it)."""
    policy = getattr(os, "SCHED_BATCH", None)
    if policy is None:
        return False
    try:
        os.sched_setscheduler(0, policy, os.sched_param(0))  # 0: the calling thread, on Linux
    except OSError:
        return False
    return True


class BatchThread(threading.Thread):
    """A thread that runs under C{SCHED_BATCH}: woken, it waits for the CPU instead of preempting."""

    def run(self) -> None:
        """Switch policy, then run the target."""
        batchScheduled()
        super().run()


def batchScheduledPool(pool: ThreadPool) -> ThreadPool:
    """C{pool}, with every thread it starts from now on a L{BatchThread}."""
    pool.threadFactory = BatchThread  # type: ignore[misc]
    return pool

"""Threads that work for the reactor without taking the CPU from it: the analysis pool's and the database's,
under C{SCHED_BATCH}, which never preempts the reactor thread on wakeup (docs/protocol.md); and calls handed to
them that fail as Deferreds when no thread can be started, rather than raising into the reactor."""

from __future__ import annotations

import os
import threading
from typing import Any, Callable

from twisted.internet.defer import Deferred, fail
from twisted.internet.threads import deferToThreadPool
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


def batchScheduledPool(pool: ThreadPool, threadClass: type[BatchThread] = BatchThread) -> ThreadPool:
    """C{pool}, with every thread it starts from now on a L{BatchThread} (or C{threadClass}); one that cannot be
    started (memory, the process's thread limit) leaves the pool's list of threads, which L{ThreadPool.stop}
    would otherwise try to join."""

    def startOrForget(*args: Any, **kwargs: Any) -> BatchThread:
        thread = threadClass(*args, **kwargs)
        start = thread.start

        def started() -> None:
            try:
                start()
            except BaseException:
                if thread in pool.threads:
                    pool.threads.remove(thread)
                raise

        thread.start = started  # type: ignore[method-assign]
        return thread

    pool.threadFactory = startOrForget  # type: ignore[misc,assignment]
    return pool


def deferringTo(reactor: Any, pool: ThreadPool) -> Callable[..., Deferred]:
    """C{deferToThreadPool} on C{pool}, except that a call that cannot be handed to a thread (none could be
    started) is a failed Deferred, like a call that raised, never an exception in the caller: the batch it
    carried is then answered (C{ERROR internal error}), not dropped."""

    def run(function: Callable[..., Any], *args: Any) -> Deferred:
        try:
            return deferToThreadPool(reactor, pool, function, *args)
        except Exception:
            return fail()

    return run

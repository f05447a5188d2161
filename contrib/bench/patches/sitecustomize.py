"""Bench-only, never installed: on C{PYTHONPATH}, changes a primecount server for a benchmark, each by its own
environment variable.

C{PRIMECOUNT_BENCH_COMMIT_SECONDS} (records_store.py C{--latency-only}) makes the database writer wait that long
instead of writing: a database that costs no CPU but answers each transaction after that long, to tell the cost of
waiting for commits from the cost of the database. C{PRIMECOUNT_BENCH_UNLOCKED_APPEND} (workers_scaling.py
C{--append-lock}) makes the records file writer skip its lock, to measure what the lock costs."""

import os

_seconds = os.environ.get("PRIMECOUNT_BENCH_COMMIT_SECONDS")
if _seconds:
    import time
    from typing import Any, Sequence

    import primecount.records.table

    def append(self: Any, records: Sequence[Any], seconds: float = float(_seconds)) -> None:
        """Wait as a commit would, off the GIL (C{time.sleep}), and store nothing."""
        time.sleep(seconds)

    primecount.records.table.DatabaseWriter.append = append  # type: ignore[method-assign]

if os.environ.get("PRIMECOUNT_BENCH_UNLOCKED_APPEND"):
    import primecount.records.file

    primecount.records.file.FileOperations.tryLock = lambda self, fd: None  # type: ignore[method-assign]
    primecount.records.file.FileOperations.unlock = lambda self, fd: None  # type: ignore[method-assign]


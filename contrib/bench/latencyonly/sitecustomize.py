"""Bench-only, never installed: on C{PYTHONPATH} (records_store.py C{--latency-only}), makes primecount's database
writer wait C{PRIMECOUNT_BENCH_COMMIT_SECONDS} instead of writing: a database that costs no CPU but answers
each transaction after that long, to tell the cost of waiting for commits from the cost of the database."""

import os

_seconds = os.environ.get("PRIMECOUNT_BENCH_COMMIT_SECONDS")
if _seconds:
    import time
    from typing import Any, Sequence

    import primecount.database

    def append(self: Any, records: Sequence[Any], seconds: float = float(_seconds)) -> None:
        """Wait as a commit would, off the GIL (C{time.sleep}), and store nothing."""
        time.sleep(seconds)

    primecount.database.DatabaseWriter.append = append  # type: ignore[method-assign]

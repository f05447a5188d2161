"""What the records lock costs one writer per batch, measured in-process: CPU time per append, lock on and off.

Steadier than req/s on a shared machine: the same batches are appended with
the multi-writer protocol (flock, fstat, write, unlock) and without it (fstat,
write), rounds interleaved, medians printed.
C{python contrib/bench/append_cost.py [--batches N] [--records K] [--rounds R]}.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from twisted.internet.task import Clock  # noqa: E402

from primecount.records.formats import Record  # noqa: E402
from primecount.records.file import FileOperations, FileStore  # noqa: E402


class Unlocked(FileOperations):
    """The file store's system calls without the lock: one writer alone, for comparison."""

    def tryLock(self, fd: int) -> None:
        """Take no lock."""

    def unlock(self, fd: int) -> None:
        """There is none to release."""


def perBatch(path: str, shared: bool, batches: int, records: int) -> float:
    """Microseconds of CPU per batch of C{records} records, over C{batches} appends."""
    service = FileStore(path, Clock(), "never", operations=FileOperations() if shared else Unlocked())
    service.startService()
    batch = [Record(1_795_000_000, "127.0.0.1", f"message number {n}", 2, True) for n in range(records)]
    started = time.process_time()
    for _ in range(batches):
        service.write(batch)
    used = time.process_time() - started
    service.stopService()
    return used / batches * 1e6


def main() -> None:
    """Interleaved rounds, medians, and the difference."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=50_000)
    parser.add_argument("--records", type=int, default=4, help="records per batch (a reactor turn's)")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    results: dict[bool, list[float]] = {True: [], False: []}
    with tempfile.TemporaryDirectory(prefix="primecount-append-") as folder:
        for round in range(args.rounds):
            for shared in (True, False):
                path = os.path.join(folder, f"records-{round}-{shared}.txt")
                results[shared].append(perBatch(path, shared, args.batches, args.records))
    on, off = statistics.median(results[True]), statistics.median(results[False])
    print(f"{args.records} records a batch, {args.batches} batches, medians of {args.rounds} rounds")
    print(f"lock on   {on:6.2f} us CPU per batch")
    print(f"lock off  {off:6.2f} us CPU per batch")
    print(f"the lock  {on - off:+6.2f} us per batch ({on / off:.2f}x)")


if __name__ == "__main__":
    main()

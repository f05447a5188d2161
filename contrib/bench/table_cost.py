"""Measure what one records batch costs the database itself, for the table primecount creates and its variants.

A throwaway PostgreSQL cluster (Debian's initdb/pg_ctl, pinned to one core) gets,
per variant and round (the order turning each round), a fresh table, a warm-up and
C{--batches} batches of C{--rows} rows, each the prepared C{INSERT} primecount sends
(L{insertStatement}), in autocommit mode with C{synchronous_commit=off} (C{--fsync
everysec}; C{--fsync always}: on, each commit waiting for its WAL flush to the cluster's disk). It prints the server backend's CPU per batch (from C{/proc/PID/schedstat},
to the nanosecond), the calling thread's CPU and the wall time per batch. Variants:
the schema primecount creates (a BRIN time index), the same partitioned by day
(C{--records-retention}), a B-tree time index instead, no time index, and no index at all (not even the key).
Run: C{python contrib/bench/table_cost.py} (needs PostgreSQL and C{primecount[postgres]}).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from primecount.records.schema import (  # noqa: E402
    dayStatements, partitionedTableStatements, schemaStatements, today,
)
from primecount.records.table import connect, insertParameters, insertStatement  # noqa: E402
from primecount.records.formats import Record  # noqa: E402
from tests.postgres import Cluster, postgresBinaries  # noqa: E402

PLAIN = ("CREATE TABLE {} (id bigserial{}, time timestamptz NOT NULL, client inet, message text NOT NULL, "
         "count integer NOT NULL, prime boolean NOT NULL, host text NOT NULL, pid integer NOT NULL)")
WARM_UP = 100  # batches before the measured ones: the connection's caches, the table's first pages
BATCH_TIME = 1_700_000_000  # the records' time, give or take their number over ten seconds
VARIANTS: dict[str, Callable[[str], list[Any]]] = {
    "primecount's (BRIN time)": schemaStatements,
    "partitioned by day (--records-retention)": lambda table: [
        *partitionedTableStatements(table), *schemaStatements(table), *dayStatements(table, today(BATCH_TIME))],
    "B-tree time": lambda table: [PLAIN.format(table, " PRIMARY KEY"), f"CREATE INDEX ON {table} (time)"],
    "no time index": lambda table: [PLAIN.format(table, " PRIMARY KEY")],
    "no index": lambda table: [PLAIN.format(table, "")],
}


def processSeconds(pid: int) -> float:
    """CPU seconds the (single-threaded) process C{pid} has run, to the nanosecond (C{/proc/PID/schedstat})."""
    with open(f"/proc/{pid}/schedstat") as schedstat:
        return int(schedstat.read().split()[0]) / 1e9


def measure(cluster: Cluster, table: str, statements: list[Any], rows: int, batches: int,
            fsync: str = "everysec") -> tuple[float, float, float]:
    """Backend CPU, client CPU and wall time per batch, in µs, for C{batches} batches into a new C{table}."""
    from psycopg import pq

    records = [Record(BATCH_TIME + n // 10, "127.0.0.1", f"hello world {n}", 2, True) for n in range(rows)]
    parameters = insertParameters(records, "bench", os.getpid())
    connection = connect(cluster.uri, fsync)
    try:
        for statement in statements:
            connection.execute(statement)
        pgconn = connection.pgconn
        prepared = pgconn.prepare(b"append", insertStatement(table).as_bytes(connection))
        assert prepared.status == pq.ExecStatus.COMMAND_OK, prepared.error_message
        backend = connection.execute("SELECT pg_backend_pid()").fetchone()[0]
        for _ in range(WARM_UP):
            pgconn.exec_prepared(b"append", parameters)
        backend0, client0, wall0 = processSeconds(backend), time.thread_time(), time.perf_counter()
        for _ in range(batches):
            result = pgconn.exec_prepared(b"append", parameters)
            assert result.status == pq.ExecStatus.COMMAND_OK, result.error_message
        return tuple(  # type: ignore[return-value]
            (end - start) / batches * 1e6 for start, end in
            [(backend0, processSeconds(backend)), (client0, time.thread_time()), (wall0, time.perf_counter())])
    finally:
        connection.close()


def main() -> None:
    """Run the rounds and print each variant's medians."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rows", type=int, default=30, help="rows per batch (about what keep-alive at 50 sees)")
    parser.add_argument("--batches", type=int, default=4000)
    parser.add_argument("--fsync", choices=["everysec", "always"], default="everysec",
                        help="primecount's --fsync: always waits for each commit's WAL flush (synchronous_commit=on)")
    parser.add_argument("--core", default="0", help="the core the database and this script run on")
    args = parser.parse_args()
    binaries = postgresBinaries()
    if binaries is None:
        raise SystemExit("PostgreSQL is not installed (apt-get install postgresql)")
    os.sched_setaffinity(0, {int(args.core)})
    cluster = Cluster(binaries, prefix=["taskset", "-c", args.core])
    cluster.start(durable=True)
    results: dict[str, list[tuple[float, float, float]]] = {name: [] for name in VARIANTS}
    try:
        for round in range(args.rounds):
            names = list(VARIANTS)
            for number, name in enumerate(names[round % len(names):] + names[:round % len(names)]):
                statements = VARIANTS[name]
                table = f"cost_{round}_{number}"
                results[name].append(measure(cluster, table, statements(table), args.rows, args.batches,
                                           args.fsync))
                backend, client, wall = results[name][-1]
                print(f"round {round + 1}: {name:26} backend {backend:5.0f}  client {client:4.0f}  "
                      f"wall {wall:5.0f} µs per {args.rows}-row batch", flush=True)
    finally:
        cluster.destroy()
    print(f"\nmedians of {args.rounds} rounds, µs per batch of {args.rows} rows:")
    for name, figures in results.items():
        backend, client, wall = (statistics.median(column) for column in zip(*figures))
        print(f"  {name:26} backend {backend:5.0f}  client {client:4.0f}  wall {wall:5.0f}")


if __name__ == "__main__":
    main()

"""Measure primecount writing its records to PostgreSQL beside the same server writing its file.

For each round, one-shot and keep-alive at 50 clients (loadgen, verifying every
reply), primecount is started fresh with its records file, then with a table
of a throwaway PostgreSQL cluster on this machine (Debian's initdb/pg_ctl, its
default durability; primecount's default C{--fsync everysec}, each commit waiting for its WAL flush; with
C{--also-lossy}, also with C{--fsync never}, i.e. C{synchronous_commit=off}, in the same rounds).
Pinned by default: primecount and the database on core 0, the load on core 1
(C{--database-core any} lets the kernel place the database).
Prints medians of the rounds: req/s, primecount's CPU per request, PostgreSQL's
(all its processes), and for the table the rows/s, commits/s and rows per
commit (from C{pg_stat_database}); then each row's table / file ratio, of the
medians and round by round, and, with the database on primecount's core, the
ratio that core allows at the table's CPU per request, primecount's and
PostgreSQL's together, if it were as busy as with the file.
With C{--latency-only SECONDS}, each round also runs a third store: the table's
code path, but the database writer only waits SECONDS per transaction and
stores nothing (C{patches/sitecustomize.py}): a database that costs no CPU,
to tell what waiting for commits costs from what the database costs.
Run: C{python contrib/bench/records_store.py} (needs taskset,
PostgreSQL and C{primecount[postgres]}).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from loadgen_compare import ROOT, pinned, prepare, runLoad, startServer, treeCpuSeconds  # noqa: E402
from tests.postgres import Cluster, postgresBinaries  # noqa: E402

TABLES = ("postgresql", "fsync never")  # the stores that write a table
ROWS = {"one-shot, 50 clients": (["--conns", "50"], []),
        "keep-alive, 50 clients": (["--conns", "50", "--keepalive"], ["--keep-alive"])}


def counters(cluster: Cluster, table: str, afterDisconnect: bool = False) -> tuple[int, int]:
    """Transactions committed in the database so far, and rows in C{table} (0 before it exists). A session
    reports its commits to C{pg_stat_database} only now and then while it lives, and in full as it ends: with
    C{afterDisconnect}, read once primecount's sessions have ended."""
    deadline = time.monotonic() + 10
    while afterDisconnect and cluster.query(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'primecount'")[0][0]:
        if time.monotonic() > deadline:
            raise SystemExit("primecount's database session outlived the server")
        time.sleep(0.05)
    (commits,), = cluster.query("SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()")
    exists = cluster.query("SELECT to_regclass(%s) IS NOT NULL", table)[0][0]
    rows = cluster.query(f'SELECT count(*) FROM "{table}"')[0][0] if exists else 0
    return commits, rows


def latencyOnly(seconds: float) -> dict[str, str]:
    """The environment that makes primecount's database writer only wait C{seconds} per transaction."""
    path = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parent / "patches"),
                                         os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, "PRIMECOUNT_BENCH_COMMIT_SECONDS": repr(seconds)}


def main() -> None:
    """Run the rounds and print the table of medians and the ratios."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=ROOT.parent / "shared")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--unpinned", action="store_true")
    parser.add_argument("--latency-only", type=float, metavar="SECONDS",
                        help="also run the table's path with a writer that only waits SECONDS per transaction")
    parser.add_argument("--database-core", default="0",
                        help="core the database runs on when pinned (default 0, beside primecount); 'any' leaves "
                             "it to the kernel")
    parser.add_argument("--also-lossy", action="store_true",
                        help="also run the table with --fsync never (synchronous_commit=off), in the same rounds")
    parser.add_argument("--table-option", action="append", default=[], metavar="OPTION",
                        help="a primecount option for the table's runs, e.g. --table-option=--records-connections=1")
    args = parser.parse_args()
    serverCore: Optional[str] = None if args.unpinned else "0"
    clientCore: Optional[str] = None if args.unpinned else "1"
    binaries = postgresBinaries()
    if binaries is None:
        raise SystemExit("PostgreSQL is not installed (apt-get install postgresql)")
    workdir, loadgen, messages = prepare("primecount-store-")
    databaseCore = None if args.unpinned or args.database_core == "any" else args.database_core
    cluster = Cluster(binaries, prefix=pinned(databaseCore))
    cluster.start(durable=True)
    postmaster = cluster.serverPid()
    results: dict[tuple[str, str], list[dict[str, float]]] = {}
    try:
        for round in range(1, args.rounds + 1):
            for row, (load, options) in ROWS.items():
                stores = (["file", "postgresql"] + (["fsync never"] if args.also_lossy else [])
                          + (["latency only"] if args.latency_only else []))
                for store in stores if round % 2 else stores[::-1]:
                    table = f"bench_{round}_{row.split(',')[0].replace('-', '_')}"
                    records = str(workdir / f"records-{round}.tsv") if store == "file" else cluster.uri
                    extra = [] if store == "file" else ["--records-table", table, *args.table_option]
                    if store == "fsync never":
                        extra += ["--fsync", "never"]
                    # A later --records wins over the file startServer names first.
                    environment = latencyOnly(args.latency_only) if store == "latency only" else None
                    server = startServer("primecount", workdir, args.shared, serverCore,
                                         options + extra + ["--records", records], environment=environment)
                    try:
                        commits0, rows0 = counters(cluster, table)
                        before, databaseBefore = treeCpuSeconds(server.process.pid), treeCpuSeconds(postmaster)
                        summary = runLoad(loadgen, server.port, load, args.duration, messages, clientCore)
                        time.sleep(0.2)
                        used = treeCpuSeconds(server.process.pid) - before
                        databaseUsed = treeCpuSeconds(postmaster) - databaseBefore
                    finally:
                        server.stop()
                    commits1, rows1 = counters(cluster, table, afterDisconnect=True)
                    if summary["mismatches"]:
                        raise SystemExit(f"{summary['mismatches']} wrong replies")
                    requests = summary["rps"] * args.duration
                    figures = {"rps": summary["rps"], "cpu": used / requests * 1e6 if requests else float("nan"),
                               "database": databaseUsed / requests * 1e6 if requests else float("nan"),
                               "errors": summary.get("errors_total", 0)}
                    if store in TABLES:
                        figures.update(rows=(rows1 - rows0) / args.duration,
                                       commits=(commits1 - commits0) / args.duration)
                    results.setdefault((row, store), []).append(figures)
                    print(f"round {round} {row:<24} {store:<10} {figures['rps']:>9.0f} req/s "
                          f"{figures['cpu']:>6.1f} µs CPU, PostgreSQL {figures['database']:>5.1f}"
                          + (f"  {figures['rows']:>8.0f} rows/s {figures['commits']:>7.0f} commits/s"
                             if store in TABLES else ""),
                          file=sys.stderr, flush=True)
    finally:
        cluster.destroy()
        shutil.rmtree(workdir, ignore_errors=True)
    placement = ("unpinned" if args.unpinned else
                 f"primecount on core 0, PostgreSQL on {'any core' if databaseCore is None else 'core ' + databaseCore}"
                 ", load on core 1")
    print(f"\nmedians of {args.rounds} rounds, {args.duration:g} s each; {placement}; every reply verified")
    print(f"{'row':<24} {'records':<11} {'req/s':>9} {'CPU µs/req':>11} {'PG µs/req':>10} {'rows/s':>9} "
          f"{'commits/s':>10} {'rows/commit':>12}")
    median = {key: {name: statistics.median(run[name] for run in runs) for name in runs[0]}
              for key, runs in results.items()}
    for (row, store), figures in median.items():
        line = f"{row:<24} {store:<11} {figures['rps']:>9.0f} {figures['cpu']:>11.1f} {figures['database']:>10.1f}"
        if store in TABLES:
            line += (f" {figures['rows']:>9.0f} {figures['commits']:>10.0f} "
                     f"{figures['rows'] / figures['commits'] if figures['commits'] else float('nan'):>12.1f}")
        print(line)
    print("\nratios of the medians; in brackets each round's own ratio (a round's two stores run one after the other,"
          " so its ratio is spared most of the machine's drift between rounds)")
    for row, target in (("keep-alive, 50 clients", 0.7), ("one-shot, 50 clients", 0.9)):
        for store, name in (("postgresql", "table"), ("fsync never", "table, fsync never"),
                            ("latency only", "latency only")):
            if (row, "file") in median and (row, store) in median:
                ratio = median[(row, store)]["rps"] / median[(row, "file")]["rps"]
                rounds = [other["rps"] / file["rps"] for other, file in zip(results[(row, store)],
                                                                              results[(row, "file")])]
                print(f"{row}: {name} / file req/s {ratio:.2f}x" + (f" (target >= {target})" if store == "postgresql" else "")
                      + f" (rounds {', '.join(f'{r:.2f}' for r in rounds)}; median {statistics.median(rounds):.2f})")
        if (row, "fsync never") in median and (row, "postgresql") in median:
            rounds = [durable["rps"] / lossy["rps"] for durable, lossy in zip(results[(row, "postgresql")],
                                                                             results[(row, "fsync never")])]
            print(f"{row}: table, default (commits wait for their WAL flush) / table, fsync never req/s "
                  f"{median[(row, 'postgresql')]['rps'] / median[(row, 'fsync never')]['rps']:.2f}x"
                  f" (rounds {', '.join(f'{r:.2f}' for r in rounds)})")
        if databaseCore == "0" and (row, "postgresql") in median and (row, "file") in median:
            file, table = median[(row, "file")], median[(row, "postgresql")]
            busy = {name: store["rps"] * (store["cpu"] + store["database"]) / 1e6
                    for name, store in (("file", file), ("table", table))}
            print(f"{row}: primecount + PostgreSQL µs per request, table {table['cpu']:.1f} + {table['database']:.1f},"
                  f" file {file['cpu']:.1f} + {file['database']:.1f}; core 0 busy {busy['table']:.0%} and"
                  f" {busy['file']:.0%}; as busy as with the file, the table's CPU per request allows"
                  f" {(file['cpu'] + file['database']) / (table['cpu'] + table['database']):.2f}x")


if __name__ == "__main__":
    main()

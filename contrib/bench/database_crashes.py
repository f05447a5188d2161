"""Count the answered rows a records table loses when the database's processes crash under load.

For each C{--fsync} policy given and each kind of crash (SIGKILL of an idle
session, which makes PostgreSQL restart every backend; SIGKILL of the
postmaster, then a start; C{pg_ctl restart -m immediate}), a throwaway
PostgreSQL cluster with its default durability (fsync on) is crashed
C{--crashes} times while kept-alive clients send unique messages to one
primecount writing to it (the tests' own code: C{tests.postgres.Cluster},
C{tests.test_database.Clients}). After each crash, once answers flow again,
every message whose correct reply a client got is looked up in the table.
Printed per policy and kind: the crashes, the answers in all, the answered
rows missing after each crash, and any row written twice.
Run: C{python contrib/bench/database_crashes.py --fsync everysec never} (needs PostgreSQL and
C{primecount[postgres]}).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from primecount.tools.serverprocess import ServerProcess  # noqa: E402
from tests.helpers import waitUntil  # noqa: E402
from tests.postgres import Cluster, postgresBinaries  # noqa: E402
from tests.test_database import Clients  # noqa: E402

CRASHES: dict[str, Callable[[Cluster], None]] = {
    "idle session killed": Cluster.killIdleSession,
    "postmaster killed": Cluster.killPostmasterAndStart,
    "restart -m immediate": Cluster.restartImmediately,
}


def run(binaries: str, fsync: str, kind: str, crashes: int, clients: int) -> tuple[int, list[int], int]:
    """One policy, one kind of crash, C{crashes} times: the answers, the answered rows missing after each crash,
    and the rows written more than once."""
    cluster = Cluster(binaries)
    cluster.start(durable=True)
    server = None
    try:
        server = ServerProcess(cluster.uri, "--fsync", fsync, "--keep-alive", "--max-per-ip", "0")
        load = Clients([server.port], clients, keepAlive=True, tag=f"{fsync} {kind}")
        lost: list[int] = []
        for _ in range(crashes):
            waitUntil(lambda: len(load.answered) > 500, 60, "answers before the crash")
            CRASHES[kind](cluster)
            answeredBefore = len(load.answered)
            waitUntil(lambda: len(load.answered) > answeredBefore + 500, 60, "answers after the crash")
            answered = list(load.answered)  # before the query: each of them was committed before its reply
            rows = Counter(m for (m,) in cluster.query("SELECT message FROM primecount_records"))
            missing = sum(1 for message in answered if not rows[message])
            lost.append(missing - sum(lost))
        load.stop()
        rows = Counter(m for (m,) in cluster.query("SELECT message FROM primecount_records"))
        return len(load.answered), lost, sum(1 for n in rows.values() if n > 1)
    finally:
        if server is not None:
            server.stop()
        cluster.destroy()


def main() -> None:
    """Run every policy and kind; print a line each."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fsync", nargs="+", default=["everysec", "never"], help="the --fsync policies to run")
    parser.add_argument("--kinds", nargs="+", default=list(CRASHES), choices=list(CRASHES))
    parser.add_argument("--crashes", type=int, default=5, help="crashes of each kind per policy")
    parser.add_argument("--clients", type=int, default=8, help="kept connections sending at once")
    arguments = parser.parse_args()
    binaries = postgresBinaries()
    if binaries is None:
        raise SystemExit("PostgreSQL is not installed (apt-get install postgresql)")
    print(f"{'--fsync':<9} {'crash':<21} {'crashes':>7} {'answers':>8} {'rows lost':>9}  {'lost per crash':<22} "
          f"{'twice':>5}")
    for fsync in arguments.fsync:
        for kind in arguments.kinds:
            started = time.monotonic()
            answers, lost, twice = run(binaries, fsync, kind, arguments.crashes, arguments.clients)
            print(f"{fsync:<9} {kind:<21} {len(lost):>7} {answers:>8} {sum(lost):>9}  "
                  f"{' '.join(map(str, lost)):<22} {twice:>5}   ({time.monotonic() - started:.0f} s)", flush=True)


if __name__ == "__main__":
    main()

"""How soon a host cut from its database answers again once the link heals, for cuts of several lengths, on the
tests' namespaced fleet (tests/netns.py, as root): the test C{test_network.DatabasePartitionTests} with the
cut's length chosen. Printed per cut: the refusals during it (count, median and longest time to the reply),
the seconds from the heal to the first answer, and whether every verified reply has its one row.
Run: C{python contrib/bench/partition_recovery.py --cuts 10 30 60} (needs root, ip netns, nftables, PostgreSQL).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from twisted.trial.unittest import SynchronousTestCase  # noqa: E402

from tests.test_network import cutFromTheDatabase  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cuts", type=float, nargs="+", default=[10.0, 30.0, 60.0], help="cut lengths, seconds")
    arguments = parser.parse_args()
    print(f"{'cut s':>6} {'refused':>8} {'median s':>9} {'longest s':>9} {'answering again s':>18} {'one row each':>12}")
    for seconds in arguments.cuts:
        harness = SynchronousTestCase()  # never run: the fleet harness registers its clean-ups on it
        try:
            cut = cutFromTheDatabase(harness, seconds)
        finally:
            harness.doCleanups()
        during = cut.refusalsDuringTheCut()
        oneRowEach = not [m for m in cut.clients.answered if cut.rows.get(m) != 1]
        print(f"{seconds:6g} {len(during):8} {statistics.median(during):9.3f} {max(during):9.2f} "
              f"{cut.recovered:18.2f} {str(oneRowEach):>12}", flush=True)


if __name__ == "__main__":
    main()

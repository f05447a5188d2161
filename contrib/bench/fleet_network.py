"""What the records table's distance and losses cost one primecount host, on the namespaced fleet of the tests
(tests/netns.py: a database host, a primecount host and a client host on a private bridge, as root).

For each database link (direct; through the delaying relay at 0, 1, 5 and 20 ms each way; direct with 1 % of
the packets dropped each way by nftables) a fresh fleet is built and primeload, on the client host, drives the
primecount host with kept connections, 50 and then 800 of them. Printed per run: requests per second, p99,
the rows per commit (records written over commits, from the host's /metrics), the relay's CPU time, and the
rate against the direct link's. Run: C{python contrib/bench/fleet_network.py} from the checkout (it uses the
tests' harness; needs root, ip netns, nftables, PostgreSQL, cc and make).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from loadgen_compare import prepare, treeCpuSeconds  # noqa: E402
from twisted.trial.unittest import SynchronousTestCase  # noqa: E402

from tests.helpers import scrape  # noqa: E402
from tests.test_network import Fleet  # noqa: E402


def run(primeload: Path, messages: Path, delay: float | None, loss: int, conns: int, seconds: float,
        options: list[str], databaseRtoMinMs: float | None = None) -> dict:
    """One fleet, one load: primeload's summary plus rows per commit and the relay's CPU seconds."""
    harness = SynchronousTestCase()  # never run: the fleet harness registers its clean-ups on it
    try:
        fleet = Fleet(harness, delay, *options, databaseRtoMinUs=None if databaseRtoMinMs is None
                      else int(databaseRtoMinMs * 1000))
        if loss:
            fleet.app.loseTo(fleet.db, loss)
        relayBefore = treeCpuSeconds(fleet.relay.pid) if delay is not None else 0.0
        result = subprocess.run(
            [*fleet.client.prefix, str(primeload), "--host", fleet.app.address, "--port", "5050", "--keepalive",
             "--conns", str(conns), "--duration", str(seconds), "--verify", "--json", "--messages", str(messages)],
            capture_output=True, text=True, timeout=seconds + 60)
        summary = json.loads(result.stdout)
        metrics = fleet.app.call(scrape, 5059, fleet.app.address)
        summary["rows_per_commit"] = (metrics["primecount_records_written_total"]
                                      / max(metrics["primecount_records_commit_duration_seconds_count"], 1))
        summary["relay_cpu_s"] = treeCpuSeconds(fleet.relay.pid) - relayBefore if delay is not None else 0.0
        return summary
    finally:
        harness.doCleanups()


# A database link: the relay's delay each way (None: no relay), and the per cent of packets lost each way.
LINKS: dict[str, tuple[float | None, int]] = {
    "direct": (None, 0), "relay-0ms": (0.0, 0), "relay-1ms": (0.001, 0), "relay-5ms": (0.005, 0),
    "relay-20ms": (0.020, 0), "loss-1%": (None, 1),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--conns", type=int, nargs="+", default=[50, 800])
    parser.add_argument("--links", nargs="+", choices=list(LINKS), default=list(LINKS),
                        help="which database links to measure (direct is always measured first, for the ratio)")
    parser.add_argument("--option", action="append", default=[], metavar="OPTION",
                        help="a primecount option for the host, e.g. --option=--records-connections=1 (repeatable)")
    parser.add_argument("--database-rto-min-ms", type=float, default=None,
                        help="set the database host's net.ipv4.tcp_rto_min_us (its own retransmissions)")
    arguments = parser.parse_args()
    workdir, primeload, messages = prepare("primecount-fleet-network-")
    links = [(name, *LINKS[name]) for name in LINKS if name == "direct" or name in arguments.links]
    try:
        print(f"{'database link':16} {'conns':>5} {'req/s':>8} {'p99 ms':>7} {'rows/commit':>11} "
              f"{'relay CPU s':>11} {'vs direct':>9}  (one run each, {arguments.seconds:g} s)")
        direct: dict[int, float] = {}
        for name, delay, loss in links:
            for conns in arguments.conns:
                summary = run(primeload, messages, delay, loss, conns, arguments.seconds, arguments.option,
                              arguments.database_rto_min_ms)
                if name == "direct":
                    direct[conns] = summary["rps"]
                ratio = summary["rps"] / direct[conns] if direct.get(conns) else float("nan")
                print(f"{name:16} {conns:5} {summary['rps']:8,.0f} {summary['latency_us']['p99'] / 1000:7.1f} "
                      f"{summary['rows_per_commit']:11.1f} {summary['relay_cpu_s']:11.2f} {ratio:9.2f}"
                      + (f"  ({summary['mismatches']} mismatches!)" if summary["mismatches"] else ""), flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()

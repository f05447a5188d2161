"""Real clients' throughput and latency with and without hostile ones, and the server's memory with 10,000 idle.

primecount runs pinned to core 0 with its defaults (no per-address limit, as
every client here is 127.0.0.1); loadgen drives 50 real connections from core 1
while a helper process, also on core 1, holds the hostile connections and
reconnects them as the server cuts them off. Medians of --rounds runs.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import resource
import selectors
import shutil
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loadgen_compare import ROOT, buildLoadgen, runLoad, startServer  # noqa: E402

# name: (silent connections, tricklers, server --timeout). The 10,000 idle ones are measured while they
# are held, so their deadline is set past the run; the slowloris ones are cut off and reconnect every 5 s.
SCENARIOS = {
    "50 real": (0, 0, "5"),
    "50 real + 100 silent + 20 tricklers (1 B / 0.1 s)": (100, 20, "5"),
    "50 real + 10,000 idle (--timeout 60)": (10_000, 0, "60"),
}


def hostile(port: int, silent: int, tricklers: int, ready: "multiprocessing.Event", stop: "multiprocessing.Event") -> None:
    """Hold C{silent} connections that send nothing and C{tricklers} that send a byte every 0.1 s, reconnecting."""
    os.sched_setaffinity(0, {1})
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, silent + tricklers + 1024), hard))
    selector = selectors.DefaultSelector()

    def open(trickle: bool) -> None:
        connection = socket.create_connection(("127.0.0.1", port))
        connection.setblocking(False)
        selector.register(connection, selectors.EVENT_READ, trickle)

    for n in range(silent + tricklers):
        open(n >= silent)
    ready.set()
    nextTrickle = time.monotonic()
    while not stop.is_set():
        if time.monotonic() >= nextTrickle:
            for key in list(selector.get_map().values()):
                if key.data:
                    try:
                        key.fileobj.send(b"x")
                    except OSError:
                        pass
            nextTrickle = time.monotonic() + 0.1
        for key, _ in selector.select(0.05):
            try:
                data = key.fileobj.recv(4096)
            except OSError:
                data = b""
            if not data:
                selector.unregister(key.fileobj)
                key.fileobj.close()
                open(key.data)


def rss(pid: int) -> float:
    """Resident memory of C{pid} in MB."""
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:")) / 1024


def main() -> None:
    """Run every scenario, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=ROOT.parent / "shared", help="the shared/ folder")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=5.0)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="primecount-hostile-"))
    loadgen, messages = buildLoadgen(workdir)
    results: dict[str, list[tuple[dict, float]]] = {}
    try:
        for round in range(1, args.rounds + 1):
            for name, (silent, tricklers, timeout) in SCENARIOS.items():
                server = startServer("primecount", workdir, args.shared, "0", ["--timeout", timeout])
                ready, stop = multiprocessing.Event(), multiprocessing.Event()
                helper = multiprocessing.Process(target=hostile, args=(server.port, silent, tricklers, ready, stop))
                try:
                    helper.start()
                    if not ready.wait(120):
                        raise SystemExit("hostile clients did not connect")
                    summary = runLoad(loadgen, server.port, ["--conns", "50"], args.duration, messages, "1")
                    memory = rss(server.process.pid)
                finally:
                    stop.set()
                    helper.join(30)
                    server.stop()
                results.setdefault(name, []).append((summary, memory))
                print(f"round {round} {name:<52} rps {summary['rps']:>9.1f}  RSS {memory:.1f} MB  "
                      f"errors {summary['errors_total']}", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"\nmedians of {args.rounds} runs, {args.duration:g} s each; server on core 0; loadgen and the hostile "
          "clients on core 1; --verify on")
    print(f"{'scenario':<52} {'req/s':>9} {'p50 ms':>7} {'p99 ms':>7} {'mismatch':>8} {'errors':>6} {'RSS MB':>7}")
    for name, runs in results.items():
        median = lambda values: statistics.median(values)  # noqa: E731
        print(f"{name:<52} {median(r['rps'] for r, _ in runs):>9.1f} "
              f"{median(r['latency_us']['p50'] for r, _ in runs) / 1000:>7.2f} "
              f"{median(r['latency_us']['p99'] for r, _ in runs) / 1000:>7.2f} "
              f"{sum(r['mismatches'] for r, _ in runs):>8} {sum(r['errors_total'] for r, _ in runs):>6} "
              f"{median(m for _, m in runs):>7.1f}")


if __name__ == "__main__":
    main()

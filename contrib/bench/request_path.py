"""Measure primecount's request path beside the original server, the framework's floor and the uvloop peers.

Three rows, each server started fresh per run, servers of a row interleaved
within each round (each round starting with the next one) so that all see the
same machine noise, pinned (server on one core, load on the other) unless
C{--unpinned}:

  - one-shot, 50 clients (loadgen): the original server, the uvloop one-shot
    peer, the Twisted floor (C{floor_server.py}: a minimal line server with
    primecount's pool hand-off and records write) and primecount;
  - keep-alive, 50 clients (loadgen C{--keepalive}): the uvloop keep-alive peer
    and C{primecount --keep-alive};
  - one connection pipelining 200,000 lines (bulk.py): the same two.

Each figure is the median of the rounds, with the server's CPU time (user +
system, its whole process tree, from C{/proc/PID/stat}) per request, which is
steadier than req/s on shared machines. The peers need uvloop: pass
C{--peer-python} a Python that has it (a scratch venv, never the project's).
Run: C{python contrib/bench/request_path.py --peer-python /tmp/venv/bin/python}.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loadgen_compare import (  # noqa: E402
    ROOT, freePort, pinned, prepare, runLoad, startServer, treeCpuSeconds, waitForPort,
)

ONE_SHOT = ["original server", "uvloop one-shot peer", "Twisted floor", "primecount"]
KEPT = ["uvloop keep-alive peer", "primecount --keep-alive"]
ROWS = {"one-shot, 50 clients": ONE_SHOT, "keep-alive, 50 clients": KEPT, "pipelined, 1 connection": KEPT}


class Started:
    """A server process on a port, and how to stop it."""

    def __init__(self, port: int, process: subprocess.Popen, stop: Callable[[], None]) -> None:
        self.port, self.process, self.stop = port, process, stop


def start(name: str, workdir: Path, shared: Path, core: Optional[str], peerPython: str,
          prefix: Optional[list[str]] = None, startupSeconds: float = 20.0) -> Started:
    """Start the server called C{name} on a free loopback port, pinned to C{core}, or run under C{prefix} when
    given (a profiler); C{startupSeconds} bounds the wait for it to listen."""
    if prefix is None:
        prefix = pinned(core)
    if name.startswith("primecount"):
        server = startServer("primecount", workdir, shared, core, ["--keep-alive"] if "keep" in name else [],
                             prefix=prefix, startupSeconds=startupSeconds)
        return Started(server.port, server.process, server.stop)
    port, records = freePort(), str(workdir / f"{name.replace(' ', '-')}.txt")
    command = {
        "original server": [sys.executable, str(shared / "tools/baseline/seed_server.py"), str(port), records],
        "uvloop one-shot peer": [peerPython, str(shared / "tools/peers/asyncio_oneshot.py"), str(port), records,
                                 "--uvloop"],
        "uvloop keep-alive peer": [peerPython, str(shared / "tools/peers/asyncio_keepalive.py"), str(port),
                                   records, "--uvloop"],
        "Twisted floor": [sys.executable, str(ROOT / "contrib/bench/floor_server.py"), str(port), records],
    }[name]
    process = subprocess.Popen([*prefix, *command], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               cwd=workdir)
    waitForPort(port, process, startupSeconds)
    time.sleep(0.3)  # the readiness probe was a request too: let it be answered or given up

    def stop() -> None:
        process.terminate()
        process.wait(timeout=30)

    return Started(port, process, stop)


def runBulk(shared: Path, port: int, lines: int, core: Optional[str]) -> dict:
    """One bulk.py run (verifying every reply); its JSON summary."""
    result = subprocess.run([*pinned(core), sys.executable, str(shared / "tools/bulk/bulk.py"), str(port),
                             "--lines", str(lines)], capture_output=True, text=True, timeout=600)
    summary = json.loads(result.stdout)
    if result.returncode or not summary.get("all_ok"):
        raise SystemExit(f"bulk failed: {result.stdout}{result.stderr}")
    return summary


def measure(row: str, name: str, args: argparse.Namespace, workdir: Path, loadgen: Path, messages: Path,
            serverCore: Optional[str], clientCore: Optional[str]) -> tuple[float, float]:
    """One run of C{name} in C{row}: requests per second and server CPU microseconds per request."""
    server = start(name, workdir, args.shared, serverCore, args.peer_python)
    try:
        before = treeCpuSeconds(server.process.pid)
        if row.startswith("pipelined"):
            summary = runBulk(args.shared, server.port, args.lines, clientCore)
            rate, requests = summary["lines_per_s"], args.lines
        else:
            load = ["--conns", "50"] + (["--keepalive"] if row.startswith("keep") else [])
            summary = runLoad(loadgen, server.port, load, args.duration, messages, clientCore)
            if summary.get("mismatches"):
                raise SystemExit(f"{name}: {summary['mismatches']} wrong replies")
            rate, requests = summary["rps"], summary["rps"] * args.duration
        used = treeCpuSeconds(server.process.pid) - before
        return rate, (used / requests * 1e6 if requests else float("nan"))
    finally:
        server.stop()


def main() -> None:
    """Run every row's servers in interleaved rounds; print medians and the ratios the targets are stated in."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=ROOT.parent / "shared", help="the shared/ folder")
    parser.add_argument("--peer-python", default=sys.executable, help="a Python with uvloop, for the peers")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per loadgen run")
    parser.add_argument("--lines", type=int, default=200_000, help="lines of the pipelined run")
    parser.add_argument("--unpinned", action="store_true", help="no taskset: servers and load share both cores")
    parser.add_argument("--row", action="append", choices=list(ROWS), help="run only these rows (repeatable)")
    parser.add_argument("--server", action="append", help="run only these servers (repeatable)")
    args = parser.parse_args()
    serverCore, clientCore = (None, None) if args.unpinned else ("0", "1")
    workdir, loadgen, messages = prepare(args.shared, "primecount-path-")
    rows = {row: names for row, names in ROWS.items() if not args.row or row in args.row}
    runs: dict[tuple[str, str], list[tuple[float, float]]] = {}
    try:
        for round in range(1, args.rounds + 1):
            for row, names in rows.items():
                shift = (round - 1) % len(names)  # each round starts the row with another server: no position wins
                for name in names[shift:] + names[:shift]:
                    if args.server and name not in args.server:
                        continue
                    figures = measure(row, name, args, workdir, loadgen, messages, serverCore, clientCore)
                    runs.setdefault((row, name), []).append(figures)
                    print(f"round {round} {row:<24} {name:<24} {figures[0]:>9.0f} req/s {figures[1]:>7.1f} µs CPU",
                          file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    placement = "unpinned" if args.unpinned else "server on core 0, load on core 1"
    print(f"\nmedians of {args.rounds} interleaved rounds; {placement}; every reply verified")
    print(f"{'row':<24} {'server':<24} {'req/s':>9} {'CPU µs/req':>11}")
    median: dict[tuple[str, str], tuple[float, float]] = {}
    for (row, name), values in runs.items():
        median[(row, name)] = (statistics.median(v[0] for v in values), statistics.median(v[1] for v in values))
        print(f"{row:<24} {name:<24} {median[(row, name)][0]:>9.0f} {median[(row, name)][1]:>11.1f}")
    ratios = [
        ("keep-alive 50: primecount / uvloop keep-alive peer (target >= 1.2)", "keep-alive, 50 clients",
         "primecount --keep-alive", "keep-alive, 50 clients", "uvloop keep-alive peer"),
        ("pipelined: primecount / original one-shot 50 (target >= 10)", "pipelined, 1 connection",
         "primecount --keep-alive", "one-shot, 50 clients", "original server"),
        ("pipelined: primecount / uvloop keep-alive peer", "pipelined, 1 connection", "primecount --keep-alive",
         "pipelined, 1 connection", "uvloop keep-alive peer"),
        ("one-shot 50: primecount / Twisted floor (target >= 0.95)", "one-shot, 50 clients", "primecount",
         "one-shot, 50 clients", "Twisted floor"),
        ("one-shot 50: primecount / original server", "one-shot, 50 clients", "primecount", "one-shot, 50 clients",
         "original server"),
        ("one-shot 50: primecount / uvloop one-shot peer", "one-shot, 50 clients", "primecount",
         "one-shot, 50 clients", "uvloop one-shot peer"),
    ]
    print("\nratios of the medians; in brackets each round's own ratio (a round's servers run one after the other,"
          " so its ratio is spared most of the machine's drift between rounds)")
    for label, row, name, otherRow, other in ratios:
        if (row, name) in median and (otherRow, other) in median:
            rounds = [a[0] / b[0] for a, b in zip(runs[(row, name)], runs[(otherRow, other)])]
            print(f"{label}: {median[(row, name)][0] / median[(otherRow, other)][0]:.2f}x"
                  f" (rounds {', '.join(f'{r:.2f}' for r in rounds)}; median {statistics.median(rounds):.2f})")


if __name__ == "__main__":
    main()

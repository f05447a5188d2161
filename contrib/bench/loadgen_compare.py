"""Measure primecount beside the original thread-pool server with the verifying loadgen, and print medians.

Servers run pinned to one core and the load generator to the other, alternating
server by server within each round so both see the same machine noise. Needs
../shared/tools (the loadgen source and the baseline server) beside the checkout,
and taskset. Figures on shared 2-core machines drift by 10% or more: compare the
ratio within one run, not absolute numbers across runs.
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from primecount.serverprocess import ServerProcess
from primecount.tap import BARE_PORT_BACKLOG

ROOT = Path(__file__).resolve().parents[2]
SCENARIOS = {
    "50 conns": ["--conns", "50"],
    "1 conn": ["--conns", "1"],
    "50 conns + 100 idle + 20 slow": ["--conns", "50", "--idle", "100", "--slow", "20"],
}


def freePort() -> int:
    """An unused loopback port chosen by the OS."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def waitForPort(port: int, process: subprocess.Popen, seconds: float = 20.0) -> None:
    """Wait until something accepts on C{port}, failing if C{process} exits first."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"server exited early with status {process.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listening on port {port} after {seconds} s")


class Baseline:
    """The original thread-pool server on a free port, pinned to C{core}."""

    def __init__(self, workdir: Path, shared: Path, core: str) -> None:
        self.port = freePort()
        self.process = subprocess.Popen(
            ["taskset", "-c", core, sys.executable, str(shared / "tools/baseline/seed_server.py"),
             str(self.port), str(workdir / "baseline-records.txt")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=workdir,
        )
        waitForPort(self.port, self.process)
        # The readiness probe was a request too; let the thread that took it give up on it.
        time.sleep(0.2)

    def stop(self) -> None:
        """Terminate it."""
        self.process.terminate()
        self.process.wait(timeout=30)


def startServer(kind: str, workdir: Path, shared: Path, core: str, options: list[str]) -> "Baseline | ServerProcess":
    """Start the baseline or primecount (defaults but no per-address limit, plus C{options}) pinned to C{core}."""
    if kind == "baseline":
        return Baseline(workdir, shared, core)
    return ServerProcess(
        str(workdir / "primecount-records.txt"),
        # Every loadgen connection comes from 127.0.0.1: lift the per-address limit (default 64).
        "--max-per-ip", "0",
        *options,
        port=f"tcp:0:interface=127.0.0.1:backlog={BARE_PORT_BACKLOG}",
        prefix=["taskset", "-c", core],
    )


def buildLoadgen(shared: Path, workdir: Path) -> tuple[Path, Path]:
    """Build the load generator from C{shared} into C{workdir}; return it and its messages file."""
    subprocess.run(["make", "--quiet", "-C", str(shared / "tools/loadgen"), f"OUT={workdir}"], check=True)
    return workdir / "loadgen", shared / "tools/loadgen/messages.txt"


def runLoad(loadgen: Path, port: int, scenario: list[str], duration: float, messages: Path, clientCore: str) -> dict:
    """One loadgen run; returns its JSON summary (rps 0 when nothing completed)."""
    result = subprocess.run(
        ["taskset", "-c", clientCore, str(loadgen), "--port", str(port), "--duration", str(duration),
         "--verify", "--json", "--messages", str(messages), *scenario],
        capture_output=True, text=True, timeout=duration + 60,
    )
    try:
        return json.loads(result.stdout)
    except json.JSONDecodeError:
        raise SystemExit(f"loadgen failed ({result.returncode}): {result.stdout}{result.stderr}")


def main() -> None:
    """Parse arguments, run every scenario for both servers, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=ROOT.parent / "shared", help="the shared/ folder")
    parser.add_argument("--rounds", type=int, default=3, help="runs per scenario and server (median taken)")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per run")
    parser.add_argument("--server-core", default="0")
    parser.add_argument("--client-core", default="1")
    parser.add_argument("--only", choices=["baseline", "primecount"], help="measure one server only")
    parser.add_argument("--scenario", action="append", choices=list(SCENARIOS), help="run only these (repeatable)")
    parser.add_argument("--option", action="append", default=[], metavar="OPTION",
                        help="extra primecount option, e.g. --option=--fsync=always (repeatable)")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="primecount-bench-"))
    loadgen, messages = buildLoadgen(args.shared, workdir)
    kinds = [args.only] if args.only else ["baseline", "primecount"]
    results: dict[tuple[str, str], list[dict]] = {}
    try:
        for round in range(1, args.rounds + 1):
            for name, scenario in SCENARIOS.items():
                if args.scenario and name not in args.scenario:
                    continue
                for kind in kinds:
                    server = startServer(kind, workdir, args.shared, args.server_core, args.option)
                    try:
                        summary = runLoad(loadgen, server.port, scenario, args.duration, messages, args.client_core)
                    finally:
                        server.stop()
                    results.setdefault((name, kind), []).append(summary)
                    print(f"round {round} {name:<32} {kind:<10} rps {summary['rps']:>9.1f}  "
                          f"mismatches {summary['mismatches']}", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    print(f"\nmedians of {args.rounds} runs, {args.duration:g} s each; server on core {args.server_core}, "
          f"loadgen on core {args.client_core}; --verify on")
    print(f"{'scenario':<32} {'server':<10} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'mismatch':>8} {'errors':>7}")
    medians: dict[tuple[str, str], float] = {}
    for (name, kind), runs in results.items():
        rps = statistics.median(r["rps"] for r in runs)
        medians[(name, kind)] = rps
        done = [r for r in runs if r["completed"]]
        p50 = statistics.median(r["latency_us"]["p50"] for r in done) / 1000 if done else float("nan")
        p99 = statistics.median(r["latency_us"]["p99"] for r in done) / 1000 if done else float("nan")
        print(f"{name:<32} {kind:<10} {rps:>9.1f} {p50:>8.2f} {p99:>8.2f} "
              f"{sum(r['mismatches'] for r in runs):>8} {sum(r['errors_total'] for r in runs):>7}")
    if args.option:
        print(f"primecount options: {' '.join(args.option)}")
    if len(kinds) == 2 and not args.scenario:
        base = medians[("50 conns", "baseline")]
        own = medians[("50 conns", "primecount")]
        hostile = medians[("50 conns + 100 idle + 20 slow", "primecount")]
        print(f"\nprimecount / baseline at 50 conns: {own / base:.2f}x")
        print(f"primecount with idle+slow clients / without: {hostile / own:.2f}x")


if __name__ == "__main__":
    main()

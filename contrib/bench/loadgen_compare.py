"""Measure primecount beside the original thread-pool server with the verifying loadgen, and print medians.

Servers run pinned to one core and the load generator to the other, alternating
server by server within each round so both see the same machine noise. The load
generator is the project's own (contrib/loadgen, built here with cc); the original
server is run when ../shared/tools/baseline is beside the checkout, and skipped
otherwise. Needs taskset. Figures on shared 2-core machines drift by 10% or more: compare the
ratio within one run, not absolute numbers across runs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

from primecount.tools.serverprocess import ServerProcess
from primecount.options import BARE_PORT_BACKLOG

ROOT = Path(__file__).resolve().parents[2]
# name: (loadgen arguments, primecount options, whether the original server runs it too). The original
# server closes after every reply, so the keep-alive scenarios are compared with its one-shot figures.
SCENARIOS = {
    "one-shot 50 conns": (["--conns", "50"], [], True),
    "one-shot 1 conn": (["--conns", "1"], [], True),
    "keep-alive 50 conns": (["--conns", "50", "--keepalive"], ["--keep-alive"], False),
    "keep-alive 1 conn": (["--conns", "1", "--keepalive"], ["--keep-alive"], False),
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

    def __init__(self, workdir: Path, shared: Path, core: Optional[str]) -> None:
        self.port = freePort()
        self.process = subprocess.Popen(
            [*pinned(core), sys.executable, str(shared / "tools/baseline/seed_server.py"),
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


def pinned(core: Optional[str]) -> list[str]:
    """The command prefix that runs on C{core}, or nothing when unpinned."""
    return ["taskset", "-c", core] if core is not None else []


def startServer(kind: str, workdir: Path, shared: Path, core: Optional[str], options: list[str],
                prefix: Optional[list[str]] = None, startupSeconds: float = 30.0,
                environment: Optional[dict[str, str]] = None, python: str = sys.executable) -> "Baseline | ServerProcess":
    """Start the baseline or primecount (defaults but no per-address limit, plus C{options}), pinned to C{core}
    (primecount: on the interpreter C{python}; run under C{prefix} instead, when given, e.g. a profiler; with
    C{environment}, when given)."""
    if kind == "baseline":
        return Baseline(workdir, shared, core)
    server = ServerProcess(
        str(workdir / "primecount-records.txt"),
        # Every loadgen connection comes from 127.0.0.1: lift the per-address limit (default 64).
        "--max-per-ip", "0",
        *options,
        port=f"tcp:0:interface=127.0.0.1:backlog={BARE_PORT_BACKLOG}",
        prefix=pinned(core) if prefix is None else prefix,
        startupSeconds=startupSeconds,
        environment=environment,
        python=python,
    )
    if "--workers" in options:  # the supervisor listens first; measure once every worker accepts too
        count = int(options[options.index("--workers") + 1])
        if count > 1:
            server.waitForWorkers(count)
    return server


def buildLoadgen(workdir: Path) -> tuple[Path, Path]:
    """Build primeload, the project's verifying load generator (contrib/loadgen), into C{workdir}; return it and
    its messages file."""
    subprocess.run(["make", "--quiet", "-C", str(ROOT / "contrib/loadgen"), f"OUT={workdir}"], check=True)
    return workdir / "primeload", ROOT / "contrib/loadgen/messages.txt"


def originalServer(shared: Path) -> Optional[Path]:
    """The original thread-pool server, if C{shared} (../shared beside the checkout) holds it."""
    path = shared / "tools/baseline/seed_server.py"
    if not path.exists():
        print(f"(no original server at {path}: its rows are skipped)", file=sys.stderr)
        return None
    return path


def runLoad(loadgen: Path, port: int, scenario: list[str], duration: float, messages: Path,
            clientCore: Optional[str]) -> dict:
    """One loadgen run; returns its JSON summary (rps 0 when nothing completed)."""
    result = subprocess.run(
        [*pinned(clientCore), str(loadgen), "--port", str(port), "--duration", str(duration),
         "--verify", "--json", "--messages", str(messages), *scenario],
        capture_output=True, text=True, timeout=duration + 60,
    )
    try:
        return json.loads(result.stdout)
    except json.JSONDecodeError:
        raise SystemExit(f"loadgen failed ({result.returncode}): {result.stdout}{result.stderr}")


def treeCpuSeconds(pid: int) -> float:
    """User + system CPU seconds used so far by process C{pid} and every live descendant (workers included),
    from C{/proc/PID/stat}."""
    parents: dict[int, int] = {}
    used: dict[int, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as file:
                fields = file.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(entry)] = int(fields[1])
        used[int(entry)] = (int(fields[11]) + int(fields[12])) / tick
    tree, frontier = {pid}, [pid]
    while frontier:
        parent = frontier.pop()
        children = [child for child, ppid in parents.items() if ppid == parent and child not in tree]
        tree.update(children)
        frontier += children
    return sum(used.get(member, 0.0) for member in tree)


def measure(kind: str, workdir: Path, shared: Path, serverCore: Optional[str], options: list[str], loadgen: Path,
            loadArgs: list[str], duration: float, messages: Path, clientCore: Optional[str]) -> dict:
    """Start a fresh server, drive it with loadgen once, stop it; loadgen's summary, plus C{cpu_us_per_request}:
    the server's CPU time (its whole process tree) per request answered during the load."""
    server = startServer(kind, workdir, shared, serverCore, options)
    try:
        before = treeCpuSeconds(server.process.pid)
        result = runLoad(loadgen, server.port, loadArgs, duration, messages, clientCore)
        used = treeCpuSeconds(server.process.pid) - before
        requests = result.get("rps", 0) * duration
        result["cpu_us_per_request"] = used / requests * 1e6 if requests else float("nan")
        return result
    finally:
        server.stop()


def prepare(prefix: str) -> tuple[Path, Path, Path]:
    """A temporary folder with the load generator built in it: the folder, loadgen and its messages file."""
    workdir = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        return (workdir, *buildLoadgen(workdir))
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise


def main() -> None:
    """Parse arguments, run every scenario for both servers, print the table and the ratios."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=ROOT.parent / "shared", help="the shared/ folder")
    parser.add_argument("--rounds", type=int, default=3, help="runs per scenario and server (median taken)")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per run")
    parser.add_argument("--server-core", default="0")
    parser.add_argument("--client-core", default="1")
    parser.add_argument("--unpinned", action="store_true",
                        help="no taskset: servers and loadgen share both cores, as deployed")
    parser.add_argument("--only", choices=["baseline", "primecount"], help="measure one server only")
    parser.add_argument("--scenario", action="append", choices=list(SCENARIOS), help="run only these (repeatable)")
    parser.add_argument("--option", action="append", default=[], metavar="OPTION",
                        help="extra primecount option, e.g. --option=--fsync=always (repeatable)")
    args = parser.parse_args()
    serverCore, clientCore = (None, None) if args.unpinned else (args.server_core, args.client_core)

    workdir, loadgen, messages = prepare("primecount-bench-")
    kinds = [args.only] if args.only else ["baseline", "primecount"]
    if "baseline" in kinds and originalServer(args.shared) is None:
        kinds.remove("baseline")
    results: dict[tuple[str, str], list[dict]] = {}
    try:
        for round in range(1, args.rounds + 1):
            for name, (loadArgs, options, baselineToo) in SCENARIOS.items():
                if args.scenario and name not in args.scenario:
                    continue
                for kind in kinds:
                    if kind == "baseline" and not baselineToo:
                        continue
                    summary = measure(kind, workdir, args.shared, serverCore, options + args.option, loadgen,
                                      loadArgs, args.duration, messages, clientCore)
                    results.setdefault((name, kind), []).append(summary)
                    print(f"round {round} {name:<40} {kind:<10} rps {summary['rps']:>9.1f}  "
                          f"mismatches {summary['mismatches']}", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    placement = ("unpinned: servers and loadgen share every core" if args.unpinned else
                 f"server on core {args.server_core}, loadgen on core {args.client_core}")
    print(f"\nmedians of {args.rounds} runs, {args.duration:g} s each; {placement}; --verify on")
    print(f"{'scenario':<40} {'server':<10} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'mismatch':>8} {'errors':>7}")
    medians: dict[tuple[str, str], dict[str, float]] = {}
    for (name, kind), runs in results.items():
        done = [r for r in runs if r["completed"]]
        figures = {
            "rps": statistics.median(r["rps"] for r in runs),
            "p50": statistics.median(r["latency_us"]["p50"] for r in done) / 1000 if done else float("nan"),
            "p99": statistics.median(r["latency_us"]["p99"] for r in done) / 1000 if done else float("nan"),
        }
        medians[(name, kind)] = figures
        print(f"{name:<40} {kind:<10} {figures['rps']:>9.1f} {figures['p50']:>8.3f} {figures['p99']:>8.3f} "
              f"{sum(r['mismatches'] for r in runs):>8} {sum(r['errors_total'] for r in runs):>7}")
    if args.option:
        print(f"primecount options: {' '.join(args.option)}")
    printRatios(medians)


def printRatios(medians: dict[tuple[str, str], dict[str, float]]) -> None:
    """The ratios the targets are stated in, for those scenarios that ran."""
    ratios = [
        ("one-shot 50 conns: primecount / baseline req/s", "one-shot 50 conns", "rps", "one-shot 50 conns", "rps"),
        ("keep-alive 50 conns / baseline one-shot 50 conns req/s", "keep-alive 50 conns", "rps",
         "one-shot 50 conns", "rps"),
        ("keep-alive 50 conns / baseline one-shot 50 conns p99", "keep-alive 50 conns", "p99",
         "one-shot 50 conns", "p99"),
        ("keep-alive 1 conn / baseline one-shot 1 conn p50", "keep-alive 1 conn", "p50", "one-shot 1 conn", "p50"),
    ]
    print()
    for label, ours, ourFigure, theirs, theirFigure in ratios:
        own, base = medians.get((ours, "primecount")), medians.get((theirs, "baseline"))
        if own and base and base[theirFigure]:
            print(f"{label}: {own[ourFigure] / base[theirFigure]:.2f}x")
    own = medians.get(("one-shot 50 conns", "primecount"))
    hostile = medians.get(("one-shot 50 conns + 100 idle + 20 slow", "primecount"))
    if own and hostile:
        print(f"primecount one-shot with idle+slow clients / without: {hostile['rps'] / own['rps']:.2f}x")


if __name__ == "__main__":
    main()

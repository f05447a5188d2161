"""Measure primecount's request path beside the original server, the framework's floor, the uvloop peers and a
minimal C server, on one or more interpreters.

Three rows, each server started fresh per run, servers of a row interleaved
within each round (each round starting with the next one) so that all see the
same machine noise, pinned (server on one core, load on the other) unless
C{--unpinned}:

  - one-shot, 50 clients (loadgen): the original server, the uvloop one-shot
    peer, the minimal C epoll server (C{../shared/tools/limit}: the physical
    limit of this machine and client), the Twisted floor (C{floor_server.py}: a
    minimal line server with primecount's pool hand-off and records write) and
    primecount on each interpreter;
  - keep-alive, 50 clients (loadgen C{--keepalive}): the uvloop keep-alive peer
    and C{primecount --keep-alive} on each interpreter;
  - one connection pipelining 200,000 lines (pipelined.py): the same.

The load generator is the project's own (C{contrib/loadgen}, built with cc);
the original server, the peers and the C server come from C{../shared/tools}
when it is beside the checkout, and their rows are skipped otherwise.

Each figure is the median of the rounds, with the server's CPU time (user +
system, its whole process tree, from C{/proc/PID/stat}) per request, which is
steadier than req/s on shared machines, and its resident memory after the run.
C{--python} names an interpreter for primecount (a venv's python, repeatable:
C{--python .venv/bin/python --python .venv-pypy3/bin/python} puts CPython and
PyPy side by side); C{--server-env KEY=VALUE} sets its environment (PyPy's GC
settings). The peers need uvloop: pass C{--peer-python} a Python that has it
(a scratch venv, never the project's). Run:
C{python contrib/bench/request_path.py --peer-python /tmp/venv/bin/python --python .venv-pypy3/bin/python}.
"""

from __future__ import annotations

import argparse
import json
import os
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

ONE_SHOT = ["original server", "uvloop one-shot peer", "C limit server", "Twisted floor", "primecount"]
KEPT = ["uvloop keep-alive peer", "primecount --keep-alive"]
ROWS = {"one-shot, 50 clients": ONE_SHOT, "keep-alive, 50 clients": KEPT, "pipelined, 1 connection": KEPT}
# Interpreters for primecount, by the label its server names carry ("primecount [PyPy]"): set by main().
INTERPRETERS: dict[str, str] = {}
SERVER_ENVIRONMENT: dict[str, str] = {}


def interpreterLabel(python: str) -> str:
    """C{CPython} or C{PyPy}, with the version: what C{python} is."""
    return subprocess.run([python, "-c", "import platform, sys; print(platform.python_implementation(), "
                           "'.'.join(map(str, sys.version_info[:2])))"], capture_output=True, text=True,
                          check=True).stdout.strip()


def primecountNames(base: str) -> list[str]:
    """C{base} ("primecount" or "primecount --keep-alive") on every interpreter asked for."""
    return [f"{base} [{label}]" for label in INTERPRETERS] or [base]


def rows() -> dict[str, list[str]]:
    """The servers of each row, primecount once per interpreter."""
    one = [name for name in ONE_SHOT if name != "primecount"] + primecountNames("primecount")
    kept = [name for name in KEPT if name != "primecount --keep-alive"] + primecountNames("primecount --keep-alive")
    return {"one-shot, 50 clients": one, "keep-alive, 50 clients": kept, "pipelined, 1 connection": kept}


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
        label = name.rsplit("[", 1)[1].rstrip("]") if "[" in name else None
        environment = {**os.environ, **SERVER_ENVIRONMENT} if SERVER_ENVIRONMENT else None
        server = startServer("primecount", workdir, shared, core, ["--keep-alive"] if "keep" in name else [],
                             prefix=prefix, startupSeconds=startupSeconds, environment=environment,
                             python=INTERPRETERS.get(label, sys.executable) if label else sys.executable)
        return Started(server.port, server.process, server.stop)
    port, records = freePort(), str(workdir / f"{name.replace(' ', '-')}.txt")
    command = {
        "original server": [sys.executable, str(shared / "tools/baseline/seed_server.py"), str(port), records],
        "uvloop one-shot peer": [peerPython, str(shared / "tools/peers/asyncio_oneshot.py"), str(port), records,
                                 "--uvloop"],
        "uvloop keep-alive peer": [peerPython, str(shared / "tools/peers/asyncio_keepalive.py"), str(port),
                                   records, "--uvloop"],
        "Twisted floor": [sys.executable, str(ROOT / "contrib/bench/floor_server.py"), str(port), records],
    }.get(name) or [str(buildLimitServer(shared, workdir)), str(port), records]  # the C limit server
    process = subprocess.Popen([*prefix, *command], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               cwd=workdir)
    waitForPort(port, process, startupSeconds)
    time.sleep(0.3)  # the readiness probe was a request too: let it be answered or given up

    def stop() -> None:
        process.terminate()
        process.wait(timeout=30)

    return Started(port, process, stop)


# Servers measured beside primecount that live outside the project, in ../shared/tools beside the checkout: each
# row of theirs is skipped, said once, where it is missing (a fresh clone alone), as are the peers without uvloop.
OUTSIDE = {"original server": "tools/baseline/seed_server.py", "uvloop one-shot peer": "tools/peers/asyncio_oneshot.py",
           "uvloop keep-alive peer": "tools/peers/asyncio_keepalive.py", "C limit server": "tools/limit"}


def unavailable(name: str, shared: Path, peerPython: str) -> Optional[str]:
    """Why the server C{name} cannot run here, or C{None}."""
    if name in OUTSIDE and not (shared / OUTSIDE[name]).exists():
        return f"{shared / OUTSIDE[name]} is not there"
    if "uvloop" in name and (not peerPython or subprocess.run([peerPython, "-c", "import uvloop"],
                                                              capture_output=True).returncode):
        return f"{peerPython} has no uvloop (--peer-python)"
    return None


def buildLimitServer(shared: Path, workdir: Path) -> Path:
    """The minimal C epoll server, built into C{workdir} once."""
    built = workdir / "limit_server"
    if not built.exists():
        subprocess.run(["make", "--quiet", "-C", str(shared / "tools/limit"), f"OUT={workdir}"], check=True)
    return built


def residentMiB(pid: int) -> float:
    """A process's resident memory now."""
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:")) / 1024


def runBulk(shared: Path, port: int, lines: int, core: Optional[str]) -> dict:
    """One run of the pipelining client (pipelined.py, verifying every reply); its JSON summary."""
    result = subprocess.run([*pinned(core), sys.executable, str(Path(__file__).with_name("pipelined.py")), str(port),
                             "--lines", str(lines)], capture_output=True, text=True, timeout=600)
    summary = json.loads(result.stdout)
    if result.returncode or not summary.get("all_ok"):
        raise SystemExit(f"bulk failed: {result.stdout}{result.stderr}")
    return summary


def measure(row: str, name: str, args: argparse.Namespace, workdir: Path, loadgen: Path, messages: Path,
            serverCore: Optional[str], clientCore: Optional[str]) -> tuple[float, float, float]:
    """One run of C{name} in C{row}: requests per second, server CPU microseconds per request, and its resident
    memory after the run in MiB."""
    server = start(name, workdir, args.shared, serverCore, args.peer_python)
    try:
        if args.warmup:  # the same load first, unmeasured: a JIT (PyPy's) compiles the request path meanwhile
            if row.startswith("pipelined"):
                runBulk(args.shared, server.port, args.lines, clientCore)
            else:
                runLoad(loadgen, server.port, ["--conns", "50"] + (["--keepalive"] if row.startswith("keep") else []),
                        args.warmup, messages, clientCore)
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
        return rate, (used / requests * 1e6 if requests else float("nan")), residentMiB(server.process.pid)
    finally:
        server.stop()


def main() -> None:
    """Run every row's servers in interleaved rounds; print medians and the ratios the targets are stated in."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=ROOT.parent / "shared", help="the shared/ folder")
    parser.add_argument("--peer-python", default=sys.executable, help="a Python with uvloop, for the peers")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per loadgen run")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds of the same load before each measured "
                        "run (pipelined: one whole run); 0 for none")
    parser.add_argument("--lines", type=int, default=200_000, help="lines of the pipelined run")
    parser.add_argument("--unpinned", action="store_true", help="no taskset: servers and load share both cores")
    parser.add_argument("--row", action="append", choices=list(ROWS), help="run only these rows (repeatable)")
    parser.add_argument("--server", action="append", help="run only these servers (repeatable)")
    parser.add_argument("--python", action="append", help="an interpreter for primecount (repeatable; default: this "
                        "one)")
    parser.add_argument("--server-env", action="append", default=[], metavar="KEY=VALUE",
                        help="environment for primecount's servers (repeatable), e.g. PYPY_GC_MAX=256MB")
    args = parser.parse_args()
    for python in args.python or []:
        INTERPRETERS[interpreterLabel(python)] = python
    SERVER_ENVIRONMENT.update(entry.split("=", 1) for entry in args.server_env)
    serverCore, clientCore = (None, None) if args.unpinned else ("0", "1")
    workdir, loadgen, messages = prepare("primecount-path-")
    chosen = {row: names for row, names in rows().items() if not args.row or row in args.row}
    for name in {name for names in chosen.values() for name in names}:
        why = unavailable(name, args.shared, args.peer_python)
        if why is not None:
            print(f"skipping {name}: {why}", file=sys.stderr)
            chosen = {row: [other for other in names if other != name] for row, names in chosen.items()}
    runs: dict[tuple[str, str], list[tuple[float, float, float]]] = {}
    try:
        for round in range(1, args.rounds + 1):
            for row, names in chosen.items():
                shift = (round - 1) % len(names)  # each round starts the row with another server: no position wins
                for name in names[shift:] + names[:shift]:
                    if args.server and name not in args.server:
                        continue
                    figures = measure(row, name, args, workdir, loadgen, messages, serverCore, clientCore)
                    runs.setdefault((row, name), []).append(figures)
                    print(f"round {round} {row:<24} {name:<34} {figures[0]:>9.0f} req/s {figures[1]:>7.1f} µs CPU "
                          f"{figures[2]:>6.0f} MiB", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    placement = "unpinned" if args.unpinned else "server on core 0, load on core 1"
    environment = f"; primecount's environment {' '.join(args.server_env)}" if args.server_env else ""
    print(f"\nmedians of {args.rounds} interleaved rounds, each run after {args.warmup:g} s of the same load; "
          f"{placement}; every reply verified{environment}")
    print(f"{'row':<24} {'server':<34} {'req/s':>9} {'CPU µs/req':>11} {'RSS MiB':>8}")
    median: dict[tuple[str, str], tuple[float, float, float]] = {}
    for (row, name), values in runs.items():
        median[(row, name)] = tuple(statistics.median(v[i] for v in values) for i in range(3))  # type: ignore
        print(f"{row:<24} {name:<34} {median[(row, name)][0]:>9.0f} {median[(row, name)][1]:>11.1f} "
              f"{median[(row, name)][2]:>8.0f}")
    first = next(iter(INTERPRETERS), None)
    one, kept = (f"primecount [{first}]", f"primecount --keep-alive [{first}]") if first else (
        "primecount", "primecount --keep-alive")
    ratios = [
        ("keep-alive 50: primecount / uvloop keep-alive peer", "keep-alive, 50 clients", kept,
         "keep-alive, 50 clients", "uvloop keep-alive peer"),
        ("pipelined: primecount / original one-shot 50", "pipelined, 1 connection", kept,
         "one-shot, 50 clients", "original server"),
        ("one-shot 50: primecount / Twisted floor", "one-shot, 50 clients", one, "one-shot, 50 clients",
         "Twisted floor"),
        ("one-shot 50: primecount / original server", "one-shot, 50 clients", one, "one-shot, 50 clients",
         "original server"),
        ("one-shot 50: primecount / C limit server", "one-shot, 50 clients", one, "one-shot, 50 clients",
         "C limit server"),
    ]
    pypy = next((label for label in INTERPRETERS if label.startswith("PyPy")), None)
    cpython = next((label for label in INTERPRETERS if label.startswith("CPython")), None)
    if pypy:
        ratios += [
            (f"one-shot 50: {pypy} / C limit server (target >= 0.9)", "one-shot, 50 clients",
             f"primecount [{pypy}]", "one-shot, 50 clients", "C limit server"),
            (f"keep-alive 50: {pypy} / uvloop keep-alive peer (target >= 2)", "keep-alive, 50 clients",
             f"primecount --keep-alive [{pypy}]", "keep-alive, 50 clients", "uvloop keep-alive peer"),
        ]
    if pypy and cpython:
        ratios += [(f"{row}: {pypy} / {cpython}{target}", row, f"{base} [{pypy}]", row, f"{base} [{cpython}]")
                   for row, base, target in (("one-shot, 50 clients", "primecount", ""),
                                             ("keep-alive, 50 clients", "primecount --keep-alive", " (target >= 1.8)"),
                                             ("pipelined, 1 connection", "primecount --keep-alive",
                                              " (target >= 2.2)"))]
    print("\nratios of the medians; in brackets each round's own ratio (a round's servers run one after the other,"
          " so its ratio is spared most of the machine's drift between rounds)")
    for label, row, name, otherRow, other in ratios:
        if (row, name) in median and (otherRow, other) in median:
            rounds = [a[0] / b[0] for a, b in zip(runs[(row, name)], runs[(otherRow, other)])]
            print(f"{label}: {median[(row, name)][0] / median[(otherRow, other)][0]:.2f}x"
                  f" (rounds {', '.join(f'{r:.2f}' for r in rounds)}; median {statistics.median(rounds):.2f})")


if __name__ == "__main__":
    main()

"""Measure what each speed-up of the request path buys, on every interpreter given: the server as it is against
the same server with that one speed-up taken back.

The speed-ups were made and measured on CPython; PyPy's JIT may make some of
them pointless or harmful. Each variant is the unchanged server started
through a launcher that swaps one function back to the plain way before twistd
runs (nothing in primecount knows of these variants):

  - plain write: replies go through C{transport.write} instead of L{sendNow}'s
    direct C{send} on the socket;
  - plain close: C{loseConnection} instead of L{closeNow}'s close in the call;
  - NamedTuple constructors: the core's actions made with the NamedTuple's own
    constructor instead of C{tuple.__new__};
  - a failure per close: L{closeNow} makes a new C{Failure} for each close
    instead of the shared one;
  - called check: L{sendNow} calls C{_idleTCP} instead of its inlined copy.

Pinned (server on core 0, loadgen on core 1), interleaved rounds, each run
after a warm-up of the same load; the figure is the server's CPU time per
request (steadier than req/s), and the change each variant makes to it. Run:
C{python contrib/bench/optimizations.py --python .venv/bin/python --python .venv-pypy3/bin/python}.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loadgen_compare import ROOT, prepare, runLoad, treeCpuSeconds  # noqa: E402
from request_path import interpreterLabel  # noqa: E402

sys.path.insert(0, str(ROOT))
from primecount.tools.serverprocess import ServerProcess  # noqa: E402

# Each variant: the code the launcher runs before twistd.
VARIANTS = {
    "as it is": "",
    "plain write": "import primecount.protocol as p; p.sendNow = lambda transport, data: transport.write(data)",
    "plain close": "import primecount.protocol as p; p.closeNow = lambda transport: transport.loseConnection()",
    "NamedTuple constructors": "import primecount.connection as c; c._make = lambda kind, fields: kind(*fields)",
    "a failure per close": (
        "import primecount.internals as i, primecount.protocol as p\n"
        "from twisted.internet import main\nfrom twisted.python.failure import Failure\n"
        "def closeNow(transport):\n"
        "    if i._idleTCP(transport) and transport.producer is None:\n"
        "        transport.stopReading(); transport.stopWriting()\n"
        "        transport.connectionLost(Failure(main.CONNECTION_DONE)); return\n"
        "    transport.loseConnection()\n"
        "p.closeNow = closeNow"),
    "called check": (
        "import primecount.internals as i, primecount.protocol as p\n"
        "def sendNow(transport, data):\n"
        "    if i._idleTCP(transport) and not transport._writeDisconnecting:\n"
        "        try:\n"
        "            sent = transport.socket.send(data)\n"
        "        except OSError:\n"
        "            sent = 0\n"
        "        if sent == len(data):\n"
        "            return\n"
        "        data = data[sent:]\n"
        "    transport.write(data)\n"
        "p.sendNow = sendNow"),
}
ROWS = {"one-shot, 50 clients": ["--conns", "50"], "keep-alive, 50 clients": ["--conns", "50", "--keepalive"]}


def launcher(python: str, variant: str) -> list[str]:
    """The command that runs twistd on C{python} after the variant's swap."""
    return [python, "-c", f"{VARIANTS[variant]}\nfrom twisted.scripts.twistd import run; run()"]


def measure(python: str, variant: str, row: str, args: argparse.Namespace, workdir: Path, loadgen: Path,
            messages: Path) -> float:
    """One run: the server's CPU microseconds per request."""
    environment = {**os.environ, **dict(entry.split("=", 1) for entry in args.server_env)}
    server = ServerProcess(str(workdir / "records.txt"), "--max-per-ip", "0",
                           *(["--keep-alive"] if "keep" in row else []), port="tcp:0:interface=127.0.0.1:backlog=1024",
                           prefix=["taskset", "-c", "0"], environment=environment, python=python,
                           launcher=launcher(python, variant))
    try:
        if args.warmup:  # 0: no warm-up
            runLoad(loadgen, server.port, ROWS[row], args.warmup, messages, "1")
        before = treeCpuSeconds(server.process.pid)
        summary = runLoad(loadgen, server.port, ROWS[row], args.duration, messages, "1")
        if summary.get("mismatches"):
            raise SystemExit(f"{variant}: wrong replies")
        return (treeCpuSeconds(server.process.pid) - before) / (summary["rps"] * args.duration) * 1e6
    finally:
        server.stop()


def main() -> None:
    """Every interpreter, row and variant in interleaved rounds; the medians and each variant's change."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=ROOT.parent / "shared", help="the shared/ folder")
    parser.add_argument("--python", action="append", help="an interpreter (repeatable; default: this one)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--server-env", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    pythons = {interpreterLabel(python): python for python in (args.python or [sys.executable])}
    workdir, loadgen, messages = prepare("primecount-optimizations-")
    runs: dict[tuple[str, str, str], list[float]] = {}
    names = list(VARIANTS)
    try:
        for round in range(args.rounds):
            for label, python in pythons.items():
                for row in ROWS:
                    for variant in names[round % len(names):] + names[:round % len(names)]:
                        figure = measure(python, variant, row, args, workdir, loadgen, messages)
                        runs.setdefault((label, row, variant), []).append(figure)
                        print(f"round {round + 1} {label:<13} {row:<24} {variant:<24} {figure:6.1f} µs CPU",
                              file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    environment = f"; servers' environment {' '.join(args.server_env)}" if args.server_env else ""
    print(f"\nserver CPU µs per request, medians of {args.rounds} interleaved rounds, pinned{environment}; "
          "the change is what taking the speed-up back costs (+) or saves (-)")
    for label in pythons:
        for row in ROWS:
            base = statistics.median(runs[(label, row, "as it is")])
            print(f"{label:<13} {row:<24} {'as it is':<24} {base:6.1f}")
            for variant in names[1:]:
                value = statistics.median(runs[(label, row, variant)])
                print(f"{label:<13} {row:<24} {variant:<24} {value:6.1f} {100 * (value / base - 1):+5.1f}%")


if __name__ == "__main__":
    main()

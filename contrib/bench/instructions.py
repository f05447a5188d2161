"""Count the instructions each server spends per request, under callgrind: a figure machine noise cannot move.

Req/s and CPU time on the shared 2-core machines drift by 1.5x between rounds
minutes apart; C{valgrind --tool=callgrind} counts the instructions a process
executes instead, whatever else the machine is doing. Each server runs under callgrind
(pinned to core 0), takes C{--warmup} verified requests from the loadgen (core 1),
then has its counters zeroed, serves C{--requests} more and dumps them. The
figure is the dump's total over every thread, divided by the requests: the
user-space instructions of one request, reactor, pool and records included,
system calls' kernel side not. A server without batches (the uvloop peer)
repeats within 1%; primecount and the floor share a pool call and a records
write among the requests that arrive together, which timing decides, so
their figure moves by up to 10% between rounds: the median of C{--rounds} is
printed with the range. Under callgrind a server runs some fifty times
slower, so its batches are smaller than at full speed; compare servers within
one run, not with req/s.
Needs valgrind (Debian's package); the peers and the original server need ../shared/tools. Run:
C{python contrib/bench/instructions.py [--peer-python /tmp/venv/bin/python]}.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loadgen_compare import ROOT, buildLoadgen, runLoad  # noqa: E402
from request_path import KEPT, start  # noqa: E402

# The servers, by their names in request_path.py: primecount and the floor one-shot, the two kept ones.
SERVERS = ["primecount", "Twisted floor", "primecount --keep-alive", "uvloop keep-alive peer"]


def callgrind(workdir: Path, name: str) -> list[str]:
    """The command prefix that runs a server pinned to core 0 under callgrind, its output in C{workdir}."""
    stem = workdir / name.replace(" ", "_")
    return ["taskset", "-c", "0", "valgrind", "--tool=callgrind", f"--callgrind-out-file={stem}.%p",
            f"--log-file={stem}.valgrind.log"]


def dumpedInstructions(workdir: Path, name: str, pid: int) -> int:
    """The instructions in the dump taken after the zeroing (the first part file of process C{pid})."""
    for line in Path(f"{workdir / name.replace(' ', '_')}.{pid}.1").read_text().splitlines():
        if line.startswith(("summary:", "totals:")):
            return int(line.split()[1])
    raise SystemExit(f"no totals in the callgrind dump of {name}")


def measure(name: str, workdir: Path, shared: Path, loadgen: Path, messages: Path, peerPython: Optional[str],
            warmup: int, requests: int, conns: int) -> Optional[float]:
    """Instructions per request of server C{name}, or C{None} when it cannot run here (no peer Python)."""
    if name.startswith("uvloop") and peerPython is None:
        return None
    server = start(name, workdir, shared, None, peerPython or "", prefix=callgrind(workdir, name),
                   startupSeconds=300)
    try:
        load = ["--conns", str(conns), *(["--keepalive"] if name in KEPT else [])]
        runLoad(loadgen, server.port, [*load, "--requests", str(warmup)], 600, messages, "1")
        subprocess.run(["callgrind_control", "--zero", str(server.process.pid)], check=True, capture_output=True)
        summary = runLoad(loadgen, server.port, [*load, "--requests", str(requests)], 600, messages, "1")
        subprocess.run(["callgrind_control", "--dump", str(server.process.pid)], check=True, capture_output=True)
        completed = summary["completed"]
        if completed < requests or summary["ok"] != completed:
            raise SystemExit(f"{name}: {summary['ok']} of {completed} replies verified, {requests} wanted")
        return dumpedInstructions(workdir, name, server.process.pid) / completed
    finally:
        server.stop()


def main() -> None:
    """Measure each server once and print instructions per request."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=ROOT.parent / "shared")
    parser.add_argument("--peer-python", help="a Python with uvloop, for the peer (a scratch venv)")
    parser.add_argument("--warmup", type=int, default=500)
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--conns", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--server", action="append", choices=SERVERS, help="only these (repeatable)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="primecount-instructions-") as directory:
        workdir = Path(directory)
        loadgen, messages = buildLoadgen(workdir)
        from request_path import unavailable

        names = []
        for name in args.server or SERVERS:
            why = unavailable(name, args.shared, args.peer_python or "")
            if why is None:
                names.append(name)
            else:
                print(f"skipping {name}: {why}", file=sys.stderr)
        figures: dict[str, list[float]] = {name: [] for name in names}
        for _ in range(args.rounds):
            for name in names:
                perRequest = measure(name, workdir, args.shared, loadgen, messages, args.peer_python, args.warmup,
                                     args.requests, args.conns)
                if perRequest is not None:
                    figures[name].append(perRequest)
        print(f"user-space instructions per verified request under callgrind, median of {args.rounds} rounds "
              f"[range] ({args.requests} requests after {args.warmup}, {args.conns} clients; server core 0, "
              f"loadgen core 1)")
        for name, values in figures.items():
            print(f"  {name:28s} " + (f"{statistics.median(values):10,.0f}  [{min(values):,.0f} - {max(values):,.0f}]"
                                      if values else "not run (no --peer-python)"))


if __name__ == "__main__":
    main()

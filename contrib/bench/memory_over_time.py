"""Run primecount under keep-alive load for a long while and print its resident memory as it goes: whether it
levels off, and where, on a given interpreter with given settings (PyPy's GC variables above all).

One server (pinned to core 0 unless C{--unpinned}), C{--conns} keep-alive
clients from the verifying loadgen (core 1) in runs of C{--step} seconds, for
C{--minutes} in all; after each run the server's RSS, its rate and its CPU per
request. Run, e.g.:
C{python contrib/bench/memory_over_time.py --python .venv-pypy3/bin/python --server-env PYPY_GC_NURSERY=16MB}.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loadgen_compare import ROOT, prepare, runLoad, treeCpuSeconds  # noqa: E402
from request_path import interpreterLabel, residentMiB  # noqa: E402

sys.path.insert(0, str(ROOT))
from primecount.tools.serverprocess import ServerProcess  # noqa: E402


def main() -> None:
    """Start the server, load it step by step, print a line per step and the summary."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=ROOT.parent / "shared", help="the shared/ folder")
    parser.add_argument("--python", default=sys.executable, help="the interpreter to run primecount on")
    parser.add_argument("--server-env", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--step", type=float, default=30.0, help="seconds per loadgen run")
    parser.add_argument("--conns", type=int, default=50)
    parser.add_argument("--unpinned", action="store_true")
    args = parser.parse_args()
    workdir, loadgen, messages = prepare("primecount-memory-")
    environment = {**os.environ, **dict(entry.split("=", 1) for entry in args.server_env)}
    serverCore, clientCore = (None, None) if args.unpinned else ("0", "1")
    server = ServerProcess(str(workdir / "records.txt"), "--max-per-ip", "0", "--keep-alive",
                           port="tcp:0:interface=127.0.0.1:backlog=1024", environment=environment,
                           prefix=["taskset", "-c", serverCore] if serverCore else [], python=args.python)
    print(f"{interpreterLabel(args.python)} {' '.join(args.server_env)}: {args.conns} keep-alive clients for "
          f"{args.minutes:g} min; RSS {residentMiB(server.process.pid):.0f} MiB before any request", flush=True)
    samples: list[float] = []
    try:
        started = time.monotonic()
        while time.monotonic() - started < args.minutes * 60:
            before = treeCpuSeconds(server.process.pid)
            summary = runLoad(loadgen, server.port, ["--conns", str(args.conns), "--keepalive"], args.step,
                              messages, clientCore)
            if summary.get("mismatches"):
                raise SystemExit("wrong replies")
            cpu = (treeCpuSeconds(server.process.pid) - before) / (summary["rps"] * args.step) * 1e6
            samples.append(residentMiB(server.process.pid))
            print(f"{(time.monotonic() - started) / 60:5.1f} min  {summary['rps']:8.0f} req/s  {cpu:5.1f} µs CPU/req  "
                  f"RSS {samples[-1]:6.0f} MiB", flush=True)
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    half = len(samples) // 2
    print(f"RSS: first step {samples[0]:.0f} MiB, highest {max(samples):.0f} MiB, highest in the first half "
          f"{max(samples[:half] or samples):.0f} MiB, in the second half {max(samples[half:]):.0f} MiB")


if __name__ == "__main__":
    main()

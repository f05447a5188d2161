"""Measure primecount with --workers 1, 2, 4, ... up to the CPUs, one-shot and keep-alive, beside the original server.

Everything runs unpinned, as deployed: the servers and loadgen share every
core, so on a small machine loadgen's own share of the CPU is part of the
picture. On a bigger machine the same command gives the scaling curve:
C{python contrib/bench/workers_scaling.py --max-workers 16 --conns 200}.
Medians of C{--rounds} runs; the original server comes from ../shared/tools.

C{--append-lock} measures instead what the multi-writer append protocol costs:
2 workers (C{--workers}), one-shot and keep-alive, with the records lock on
and off (C{PRIMECOUNT_BENCH_UNLOCKED_APPEND=1} with C{patches/} on C{PYTHONPATH}), rounds
interleaved, pinned to C{--server-core}/C{--client-core} unless C{--unpinned}.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loadgen_compare import ROOT, measure, originalServer, prepare  # noqa: E402

from primecount.workers import cpuCount  # noqa: E402


def workerCounts(maximum: int) -> list[int]:
    """1, 2, 4, ... and C{maximum} itself."""
    counts, n = [], 1
    while n < maximum:
        counts.append(n)
        n *= 2
    return counts + [maximum]


def main() -> None:
    """Run the grid and print req/s, p99 and the ratios to one worker and to the original server."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=ROOT.parent / "shared")
    parser.add_argument("--max-workers", type=int, default=cpuCount())
    parser.add_argument("--conns", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--append-lock", action="store_true", help="measure the records lock on against off")
    parser.add_argument("--workers", type=int, default=2, help="with --append-lock: workers per server")
    parser.add_argument("--unpinned", action="store_true", help="with --append-lock: no taskset")
    parser.add_argument("--server-core", default="0")
    parser.add_argument("--client-core", default="1")
    args = parser.parse_args()
    if args.append_lock:
        appendLockCost(args)
        return
    workdir, loadgen, messages = prepare("primecount-workers-")
    conns = ["--conns", str(args.conns)]
    rows: dict[tuple[str, int], list[dict]] = {}
    original = originalServer(args.shared) is not None
    try:
        for round in range(1, args.rounds + 1):
            if original:
                rows.setdefault(("original, one-shot", 0), []).append(
                    measure("baseline", workdir, args.shared, None, [], loadgen, conns, args.duration, messages, None))
            for workers in workerCounts(args.max_workers):
                for mode, options, load in (("one-shot", [], conns),
                                            ("keep-alive", ["--keep-alive"], [*conns, "--keepalive"])):
                    result = measure("primecount", workdir, args.shared, None, ["--workers", str(workers), *options],
                                     loadgen, load, args.duration, messages, None)
                    rows.setdefault((mode, workers), []).append(result)
                    print(f"round {round} {mode:<10} workers {workers:>2}  rps {result['rps']:>9.1f}  "
                          f"mismatches {result['mismatches']}", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    medians = {key: statistics.median(r["rps"] for r in runs) for key, runs in rows.items()}
    base = medians.get(("original, one-shot", 0), float("nan"))
    print(f"\nunpinned, {args.conns} clients, medians of {args.rounds} x {args.duration:g} s; "
          + (f"original server (one-shot): {base:,.0f} req/s" if original else "no original server (x original: nan)"))
    print(f"{'mode':<11} {'workers':>7} {'req/s':>9} {'p99 ms':>7} {'x 1 worker':>10} {'x original':>10} {'errors':>6}")
    for (mode, workers), runs in rows.items():
        if workers == 0:
            continue
        rps, single = medians[(mode, workers)], medians[(mode, 1)]
        p99 = statistics.median(r["latency_us"]["p99"] for r in runs) / 1000
        errors = sum(r["errors_total"] + r["mismatches"] for r in runs)
        print(f"{mode:<11} {workers:>7} {rps:>9.0f} {p99:>7.2f} {rps / single:>10.2f} {rps / base:>10.2f} {errors:>6}")


def appendLockCost(args: argparse.Namespace) -> None:
    """The records lock on and off, same run, interleaved rounds: req/s, p99, CPU per request and the ratio."""
    workdir, loadgen, messages = prepare("primecount-lock-")
    serverCore, clientCore = (None, None) if args.unpinned else (args.server_core, args.client_core)
    conns = ["--conns", str(args.conns)]
    rows: dict[tuple[str, str], list[dict]] = {}
    try:
        for round in range(1, args.rounds + 1):
            for mode, options, load in (("one-shot", [], conns),
                                        ("keep-alive", ["--keep-alive"], [*conns, "--keepalive"])):
                for lock in (("on", "off") if round % 2 else ("off", "on")):  # alternate: no order bias
                    saved = dict(os.environ)
                    if lock == "off":  # the server's records writer skips its lock (patches/sitecustomize.py)
                        os.environ["PRIMECOUNT_BENCH_UNLOCKED_APPEND"] = "1"
                        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [
                            str(Path(__file__).resolve().parent / "patches"), os.environ.get("PYTHONPATH")]))
                    try:
                        result = measure("primecount", workdir, args.shared, serverCore,
                                         ["--workers", str(args.workers), *options], loadgen, load, args.duration,
                                         messages, clientCore)
                    finally:
                        os.environ.clear()
                        os.environ.update(saved)
                    rows.setdefault((mode, lock), []).append(result)
                    print(f"round {round} {mode:<10} lock {lock:<3}  rps {result['rps']:>9.1f}  "
                          f"cpu/req {result['cpu_us_per_request']:.1f} us  mismatches {result['mismatches']}",
                          file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    where = "unpinned" if args.unpinned else f"server on core {args.server_core}, load on core {args.client_core}"
    print(f"\n{args.workers} workers, {args.conns} clients, {where}, medians of {args.rounds} x {args.duration:g} s")
    print(f"{'mode':<11} {'lock':<4} {'req/s':>9} {'p99 ms':>7} {'cpu us/req':>10} {'on/off':>7} {'errors':>6}")
    for (mode, lock), runs in rows.items():
        rps = statistics.median(r["rps"] for r in runs)
        off = statistics.median(r["rps"] for r in rows[(mode, "off")])
        p99 = statistics.median(r["latency_us"]["p99"] for r in runs) / 1000
        cpu = statistics.median(r["cpu_us_per_request"] for r in runs)
        errors = sum(r["errors_total"] + r["mismatches"] for r in runs)
        print(f"{mode:<11} {lock:<4} {rps:>9.0f} {p99:>7.2f} {cpu:>10.1f} {rps / off:>7.3f} {errors:>6}")


if __name__ == "__main__":
    main()

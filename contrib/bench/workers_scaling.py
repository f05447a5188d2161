"""Measure primecount with --workers 1, 2, 4, ... up to the CPUs, one-shot and keep-alive, beside the original server.

Everything runs unpinned, as deployed: the servers and loadgen share every
core, so on a small machine loadgen's own share of the CPU is part of the
picture. On a bigger machine the same command gives the scaling curve:
C{python contrib/bench/workers_scaling.py --max-workers 16 --conns 200}.
Medians of C{--rounds} runs; needs ../shared/tools.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loadgen_compare import ROOT, measure, prepare  # noqa: E402

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
    args = parser.parse_args()
    workdir, loadgen, messages = prepare(args.shared, "primecount-workers-")
    conns = ["--conns", str(args.conns)]
    rows: dict[tuple[str, int], list[dict]] = {}
    try:
        for round in range(1, args.rounds + 1):
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
    base = medians[("original, one-shot", 0)]
    print(f"\nunpinned, {args.conns} clients, medians of {args.rounds} x {args.duration:g} s; "
          f"original server (one-shot): {base:,.0f} req/s")
    print(f"{'mode':<11} {'workers':>7} {'req/s':>9} {'p99 ms':>7} {'x 1 worker':>10} {'x original':>10} {'errors':>6}")
    for (mode, workers), runs in rows.items():
        if workers == 0:
            continue
        rps, single = medians[(mode, workers)], medians[(mode, 1)]
        p99 = statistics.median(r["latency_us"]["p99"] for r in runs) / 1000
        errors = sum(r["errors_total"] + r["mismatches"] for r in runs)
        print(f"{mode:<11} {workers:>7} {rps:>9.0f} {p99:>7.2f} {rps / single:>10.2f} {rps / base:>10.2f} {errors:>6}")


if __name__ == "__main__":
    main()

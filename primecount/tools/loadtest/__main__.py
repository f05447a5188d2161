"""Command line: C{python -m primecount.tools.loadtest run|bench|gui} (also C{jmeter/run}, C{make bench}): run
the JMeter plan headless, at several thread counts, or in JMeter's GUI; see jmeter/README.md."""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Optional, Sequence, TextIO

from primecount.tools.loadtest.crosscheck import crossCheck
from primecount.tools.loadtest.jmeter import (
    DEFAULT_PLAN,
    JMeterInstall,
    JMeterMissing,
    findJMeter,
    launcherCommand,
    runPlan,
)
from primecount.tools.loadtest.jtl import Summary, formatSummary, readSamples, summarise
from primecount.tools.loadtest.report import writeReport
from primecount.records.formats import parseRecords
from primecount.tools.serverprocess import ServerProcess

EXIT_OK, EXIT_FAILED, EXIT_SETUP = 0, 1, 2
SHARED_CORES_NOTE = (
    "JMeter runs on the same machine as the server: its JVM and one Java thread per "
    "virtual user compete with the server for the CPU (2 cores here), so these figures "
    "are a lower bound of what the server can do; the loadgen figures in docs/benchmarks.md "
    "measure the server with a far lighter client."
)


class RunResult:
    """What one run produced: the summary, the problems found by the checks, where the files are."""

    def __init__(self, summary: Summary, problems: list[str], out: Path, jmeterStatus: int = 0) -> None:
        self.summary = summary
        self.problems = problems
        self.out = out
        self.jmeterStatus = jmeterStatus

    @property
    def jmeterFailed(self) -> bool:
        """JMeter itself exited with an error (so its console says why, not the results)."""
        return self.jmeterStatus != 0

    @property
    def passed(self) -> bool:
        """Every sample passed and every check held."""
        return self.summary.samples > 0 and self.summary.errors == 0 and not self.problems


def _pinning(core: str) -> list[str]:
    """A C{taskset} prefix for C{core} where the machine has it and more than one core."""
    return ["taskset", "-c", core] if shutil.which("taskset") and (os.cpu_count() or 1) > 1 else []


# The files a run writes in its folder (JMeter's console aside, which the command opens before the run).
RUN_FILES = ("results.jtl", "jmeter.log", "records.txt", "twistd.log", "report.html")


def runOnce(
    install: JMeterInstall,
    out: Path,
    properties: dict[str, object],
    plan: Path = DEFAULT_PLAN,
    startServer: bool = False,
    serverOptions: Sequence[str] = (),
    pin: bool = False,
    jmeterOutput: Optional[int] = None,
) -> RunResult:
    """Run the plan once (starting a server first if asked), summarise and check; write the report. What an
    earlier run left in C{out} (its results, logs, records, report) is removed first, so that nothing of it
    lies beside this run's report."""
    out.mkdir(parents=True, exist_ok=True)
    for leftover in RUN_FILES:
        (out / leftover).unlink(missing_ok=True)
    results, problems, server = out / "results.jtl", [], None
    if startServer:
        records = out / "records.txt"
        # All of JMeter's threads connect from 127.0.0.1: lift the per-address limit unless told otherwise.
        server = ServerProcess(str(records), "--max-per-ip", "0", *serverOptions, prefix=_pinning("0") if pin else ())
        properties = {**properties, "host": "127.0.0.1", "port": server.port}
    try:
        status = runPlan(install, plan, results, out / "jmeter.log", properties, output=jmeterOutput,
                         prefix=_pinning("1") if pin else ())
    finally:
        if server is not None:
            stopped = server.stop()
            (out / "twistd.log").write_text(server.log, encoding="utf-8")
    if status != 0:
        problems.append(f"JMeter exited with status {status} (see {out / 'jmeter.log'})")
    samples = []
    if results.exists():
        with results.open(encoding="utf-8") as file:
            samples = readSamples(file)
    summary = summarise(samples)
    if server is not None:
        if stopped != 0:
            problems.append(f"the server exited with status {stopped} (see {out / 'twistd.log'})")
        with open(server.records, encoding="utf-8", newline="\n") as file:
            problems += [f"records: {p}" for p in crossCheck(samples, parseRecords(file))]
    notes = [f"JMeter {install.version} at {install.home}", *[f"problem: {p}" for p in problems]]
    writeReport(out / "report.html", "primecount JMeter run", summary, samples, notes)
    return RunResult(summary, problems, out, status)


def _properties(args: argparse.Namespace) -> dict[str, object]:
    return {
        **_groups(args.threads, args.loops, args.keep_alive), "rampup": args.rampup,
        "quiet_threads": args.quiet_threads, "quiet_loops": args.quiet_loops,
        "host": args.host, "port": args.port,
    }


def _groups(threads: int, loops: int, keepAlive: bool) -> dict[str, object]:
    """The users go to the one-request-per-connection group, or with C{keepAlive} to the keep-alive group."""
    if keepAlive:
        return {"threads": 0, "loops": 0, "keepalive_threads": threads, "keepalive_loops": loops}
    return {"threads": threads, "loops": loops, "keepalive_threads": 0, "keepalive_loops": 0}


def _serverOptions(options: Sequence[str], keepAlive: bool) -> list[str]:
    return ["--keep-alive", *options] if keepAlive and "--keep-alive" not in options else list(options)


def _endOf(path: Path, name: str, lines: int = 10) -> str:
    """The last C{lines} lines of C{path}, indented under a heading naming it."""
    said = path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:]
    return f"{name} ended with ({path}):\n" + "".join(f"  {line}\n" for line in said)


def commandRun(args: argparse.Namespace, install: JMeterInstall, out: TextIO) -> int:
    """C{run}: one run, summary printed, exit status 1 on any failed sample or check."""
    if args.quiet:
        args.out.mkdir(parents=True, exist_ok=True)
        console = open(args.out / "jmeter-console.txt", "wb")
    with console if args.quiet else contextlib.nullcontext() as console:
        result = runOnce(install, args.out, _properties(args), args.plan, args.start_server,
                         _serverOptions(args.server_option, args.keep_alive), pin=False, jmeterOutput=console.fileno() if console else None)
    out.write(f"{formatSummary(result.summary)}\n")
    for problem in result.problems:
        out.write(f"PROBLEM: {problem}\n")
    if args.quiet and result.jmeterFailed:
        out.write(_endOf(args.out / "jmeter-console.txt", "JMeter's console"))
    if args.start_server and not result.problems:
        every = ", every message present" if not result.summary.errors else ""
        out.write(f"records      match: one correct record per successful sample{every}\n")
    out.write(f"report       {result.out / 'report.html'}\n")
    return EXIT_OK if result.passed else EXIT_FAILED


def commandBench(args: argparse.Namespace, install: JMeterInstall, out: TextIO) -> int:
    """C{bench}: both modes at each thread count, a fresh server per row, server and JMeter pinned apart."""
    rows, failed = [], False
    for mode in ("one-shot", "keep-alive"):
        keepAlive = mode == "keep-alive"
        for threads in args.threads_list:
            loops = max(1, args.samples // threads)
            properties = {**_groups(threads, loops, keepAlive), "rampup": 0, "quiet_threads": 0, "quiet_loops": 0}
            with open(os.devnull, "wb") as devnull:
                result = runOnce(install, args.out / f"{mode}-threads-{threads}", properties, args.plan,
                                 startServer=True, serverOptions=_serverOptions([], keepAlive), pin=True,
                                 jmeterOutput=devnull.fileno())
            failed |= not result.passed
            rows.append((mode, threads, result))
            sys.stderr.write(f"  {mode} {threads} threads done: {result.summary.samples} samples\n")
    where = "server on core 0, JMeter on core 1" if _pinning("0") else "no pinning (taskset or a second core missing)"
    out.write(f"JMeter {install.version}; fresh server per row; {where}\n")
    out.write(f"{'mode':<10} {'threads':>7} {'samples':>8} {'samples/s':>10} {'p50 ms':>7} {'p99 ms':>7} "
              f"{'errors':>7}\n")
    for mode, threads, result in rows:
        s = result.summary
        out.write(f"{mode:<10} {threads:>7} {s.samples:>8} {s.throughput:>10.1f} {s.latency['p50']:>7g} "
                  f"{s.latency['p99']:>7g} {s.errors:>7}\n")
        for problem in result.problems:
            out.write(f"        PROBLEM: {problem}\n")
    out.write(f"\nNote: {SHARED_CORES_NOTE}\n")
    return EXIT_FAILED if failed else EXIT_OK


def commandGui(args: argparse.Namespace, install: JMeterInstall, out: TextIO) -> int:
    """C{gui}: open the plan in JMeter's GUI, through the 2.13 launcher where needed."""
    return subprocess.run([*launcherCommand(install), "-t", str(args.plan)]).returncode


def _threadList(value: str) -> list[int]:
    try:
        numbers = [int(part) for part in value.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, got {value!r}") from None
    if not numbers or min(numbers) < 1:
        raise argparse.ArgumentTypeError("thread counts must be at least 1")
    return numbers


def parser() -> argparse.ArgumentParser:
    """The command-line parser."""
    top = argparse.ArgumentParser(
        prog="primecount-loadtest",
        description="Load-test primecount with its JMeter plan: run it, benchmark it, or open it in the GUI.",
    )
    commands = top.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run the JMeter plan once")
    run.add_argument("--threads", type=int, default=10,
                     help="virtual users of the newline group, or with --keep-alive of the keep-alive group (default 10)")
    run.add_argument("--keep-alive", action="store_true",
                     help="use the keep-alive group (one kept connection per user); with --start-server the "
                          "server gets --keep-alive")
    run.add_argument("--loops", type=int, default=100, help="requests per virtual user (default 100)")
    run.add_argument("--rampup", type=int, default=1, help="seconds to start all users (default 1)")
    run.add_argument("--quiet-threads", type=int, default=0, help="users sending without newline (default 0: off)")
    run.add_argument("--quiet-loops", type=int, default=10, help="requests per no-newline user (default 10)")
    run.add_argument("--host", default="127.0.0.1", help="server address (default 127.0.0.1)")
    run.add_argument("--port", type=int, default=5050, help="server port (default 5050)")
    run.add_argument("--start-server", action="store_true",
                     help="start twistd primecount on a free loopback port, stop it after, check its records")
    run.add_argument("--server-option", action="append", default=[], metavar="OPTION",
                     help="extra option for the started server, e.g. --server-option=--quiet=0.1 (repeatable)")
    run.add_argument("--quiet", action="store_true", help="send JMeter's console output to OUT/jmeter-console.txt")
    bench = commands.add_parser("bench", help="run the plan at several thread counts against fresh servers")
    bench.add_argument("--threads", dest="threads_list", type=_threadList, default=[1, 10, 50],
                       help="comma-separated thread counts (default 1,10,50)")
    bench.add_argument("--samples", type=int, default=20000, help="samples per row (default 20000)")
    gui = commands.add_parser("gui", help="open the plan in JMeter's GUI (needs a display)")
    for command in (run, bench, gui):
        command.add_argument("--plan", type=Path, default=DEFAULT_PLAN, help="the .jmx plan")
    for command in (run, bench):
        command.add_argument("--out", type=Path, default=Path("jmeter-results"),
                             help="folder for results.jtl, jmeter.log, report.html, records (default jmeter-results)")
    return top


def main(argv: Optional[Sequence[str]] = None, out: Optional[TextIO] = None) -> int:
    """Entry point; returns the exit status (0 passed, 1 failures, 2 set-up problem)."""
    out = out or sys.stdout
    args = parser().parse_args(argv)
    try:
        install = findJMeter()
    except JMeterMissing as error:
        sys.stderr.write(f"primecount-loadtest: {error}\n")
        return EXIT_SETUP
    if not args.plan.exists():
        sys.stderr.write(f"primecount-loadtest: no plan at {args.plan} (give --plan)\n")
        return EXIT_SETUP
    try:
        command = {"run": commandRun, "bench": commandBench, "gui": commandGui}[args.command]
        return command(args, install, out)
    except (subprocess.CalledProcessError, RuntimeError) as error:
        sys.stderr.write(f"primecount-loadtest: {error}\n")
        return EXIT_SETUP


if __name__ == "__main__":
    sys.exit(main())

"""Tests for C{--workers}: the supervisor's pieces with a fake reactor, then a real C{twistd --workers}."""

from __future__ import annotations

import os
import platform
import re
import signal
import subprocess
import sys
import threading
import time
from typing import Any

from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.task import Clock
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.usage import UsageError
from twisted.trial.unittest import SynchronousTestCase

from primecount import __version__
from primecount.records.formats import parseRecords
from primecount.tools.serverprocess import TWISTD, ServerProcess
from primecount.options import Options, workerArguments
from primecount.health import READINESS_EVENT
from primecount.lifecycle import LISTENING_EVENT
from primecount.health import WorkersHealth
from primecount.startup import StartFailed
from primecount.workers import (
    FIRST_DELAY, REPLACE_WAIT, STABLE_SECONDS, WORKER_FD, MetricsDirectory, WorkerPool, exitDescription,
)
from tests.helpers import answeredUnderLoad, ask, expectedReply, listeningInodes, scrape, slow, waitUntil


class FakeProcess:
    """A spawned process as the pool sees it: a pid and the signals it was sent."""

    def __init__(self, protocol: Any, pid: int) -> None:
        self.protocol = protocol
        self.pid = pid
        self.signals: list[str] = []

    def signalProcess(self, name: str) -> None:
        """Remember the signal."""
        self.signals.append(name)


class SpawningClock(Clock):
    """A clock that also records C{spawnProcess} calls."""

    def __init__(self) -> None:
        super().__init__()
        self.spawned: list[tuple[FakeProcess, list[str], dict]] = []
        self.environments: list[dict] = []

    def spawnProcess(self, protocol: Any, executable: str, args: list[str], env: dict, childFDs: dict) -> FakeProcess:
        """Make a fake process and connect C{protocol} to it."""
        process = FakeProcess(protocol, 1000 + len(self.spawned))
        protocol.makeConnection(process)
        self.spawned.append((process, args, childFDs))
        self.environments.append(env)
        return process


def listens(process: FakeProcess, version: str = "0.1.0") -> None:
    """C{process} says what it runs (primecount C{version}), that it listens, and that it is ready."""
    process.protocol.childDataReceived(1, f"info primecount {version} on CPython 3.11.7\n"
                                          f"info {LISTENING_EVENT} 127.0.0.1 port 5050\n"
                                          f"info {READINESS_EVENT} ready\n".encode())


class FakeSocket:
    """The shared listening socket, by its descriptor only."""

    fileno = 42


class WorkerPoolTests(SynchronousTestCase):
    """The pool starts, restarts with a growing delay, forwards SIGHUP and stops its workers."""

    def setUp(self) -> None:
        self.reactor = SpawningClock()
        self.ended: list[int] = []
        self.pool = WorkerPool(self.reactor, 2, lambda: ["--records=x"], FakeSocket(), {"LISTEN_FDS": "1", "A": "b"},
                               grace=5, onEnded=self.ended.append)
        self.pool.startService()

    def die(self, number: int, reason: Failure = Failure(ProcessTerminated(signal=9))) -> None:
        """Worker C{number} exits."""
        process = self.pool.workers[number]
        process.protocol.processEnded(reason)

    def test_startsEachWithTheSocketAsDescriptor3(self) -> None:
        """Two workers run twistd primecount with the socket as descriptor 3 and without systemd's variables."""
        self.assertEqual(len(self.reactor.spawned), 2)
        for process, args, childFDs in self.reactor.spawned:
            self.assertEqual(childFDs[WORKER_FD], 42)
            self.assertEqual(args[-2:], ["primecount", "--records=x"])
        self.assertEqual(self.reactor.environments, [{"A": "b"}] * 2)

    def test_restartWithGrowingDelay(self) -> None:
        """A worker that dies soon after its start is restarted after 0.5 s, then 1 s, then 2 s."""
        delays = []
        for _ in range(3):
            before = len(self.reactor.spawned)
            self.die(1)
            waited = 0.0
            while len(self.reactor.spawned) == before:
                self.reactor.advance(0.25)
                waited += 0.25
            delays.append(waited)
        self.assertEqual(delays, [FIRST_DELAY, 2 * FIRST_DELAY, 4 * FIRST_DELAY])
        self.assertEqual(self.ended, [1000, 1002, 1003])

    def test_stableWorkerRestartsAtOnce(self) -> None:
        """A worker that had run for a while is replaced at once, and its delay starts over."""
        self.reactor.advance(60)
        self.die(2)
        self.reactor.advance(0)
        self.assertEqual(len(self.reactor.spawned), 3)

    def test_hangUpReachesEveryWorker(self) -> None:
        """SIGHUP to the supervisor becomes SIGHUP to each worker."""
        self.pool.hangUp()
        self.assertEqual([p.signals for p, _, _ in self.reactor.spawned], [["HUP"], ["HUP"]])

    def test_stopWaitsForEveryWorker(self) -> None:
        """Stopping sends SIGTERM to each and fires only once all have exited; nothing is restarted."""
        stopped = self.pool.stopService()
        self.assertEqual([p.signals for p, _, _ in self.reactor.spawned], [["TERM"], ["TERM"]])
        self.die(1, Failure(ProcessDone(0)))
        self.assertNoResult(stopped)
        self.die(2, Failure(ProcessDone(0)))
        self.successResultOf(stopped)
        self.reactor.advance(60)
        self.assertEqual(len(self.reactor.spawned), 2)

    def test_stopKillsAfterGrace(self) -> None:
        """A worker still running after the grace is killed."""
        self.pool.stopService()
        self.reactor.advance(5)
        self.assertEqual([p.signals for p, _, _ in self.reactor.spawned], [["TERM", "KILL"], ["TERM", "KILL"]])

    def test_logLinesRelayedAtTheirLevel(self) -> None:
        """A worker's 'error ...' line is logged by the supervisor at error level, naming the worker."""
        events: list[dict] = []
        self.pool.log = Logger(observer=events.append)  # type: ignore[misc]
        process = self.pool.workers[2]
        process.protocol.childDataReceived(1, b"info hello\nerror cannot wri")
        process.protocol.childDataReceived(1, b"te\n")
        self.assertEqual([(e["log_level"].name, e["number"], e["message"]) for e in events],
                         [("info", 2, "hello"), ("error", 2, "cannot write")])


class DeathTests(SynchronousTestCase):
    """A worker that dies says how, and a place whose workers keep dying soon after starting is not counted
    ready until its worker has lasted."""

    def setUp(self) -> None:
        self.reactor = SpawningClock()
        self.events: list[dict] = []
        self.patch(WorkerPool, "log", Logger(observer=self.events.append))
        self.pool = WorkerPool(self.reactor, 2, lambda: ["--records=x"], FakeSocket(), {}, grace=5,
                               health=WorkersHealth(2))
        self.pool.startService()
        for process, _, _ in self.reactor.spawned:
            listens(process)

    def test_exitDescription(self) -> None:
        """An exit status, or a signal by name with what it usually means."""
        self.assertEqual(exitDescription(Failure(ProcessDone(0))), "exit status 0")
        self.assertEqual(exitDescription(Failure(ProcessTerminated(exitCode=1))), "exit status 1")
        self.assertTrue(exitDescription(Failure(ProcessTerminated(signal=signal.SIGBUS))).startswith(
            "killed by SIGBUS (a memory-mapped file could not be written"))
        self.assertEqual(exitDescription(Failure(ProcessTerminated(signal=signal.SIGTERM))),
                         f"killed by SIGTERM ({signal.strsignal(signal.SIGTERM)})")

    def test_crashLoopIsNotReady(self) -> None:
        """Worker 1 dies by SIGBUS before it listens, again and again: each death is logged with its signal;
        readiness counts out of the two places, and the restarted worker that says it is ready is not counted
        until it has run L{STABLE_SECONDS}."""
        bus = Failure(ProcessTerminated(signal=signal.SIGBUS))
        self.reactor.advance(60)  # both have run a while
        self.pool.workers[1].protocol.processEnded(bus)  # a stable worker's death: restarted at once
        self.reactor.advance(0)
        self.assertEqual(self.pool.health.ready().reason, "ready: 1 of 2 workers ready")
        self.pool.workers[1].protocol.processEnded(bus)  # the new one, before it listened
        self.reactor.advance(FIRST_DELAY)
        died = [e["log_format"].format(**e) for e in self.events if "died" in e["log_format"]]
        self.assertEqual(len(died), 2)
        self.assertIn("died after 0.0 s, before it listened: killed by SIGBUS (", died[1])
        listens(self.pool.workers[1])
        self.assertEqual(self.pool.health.counts(), (2, 1), "a worker of a crash loop counted ready")
        self.reactor.advance(STABLE_SECONDS)
        self.assertEqual(self.pool.health.counts(), (2, 2))
        self.assertEqual(self.pool.health.ready().reason, "ready: 2 of 2 workers ready")
        self.pool.workers[2].protocol.processEnded(bus)  # worker 2 quickly after a stable life: not suspect
        self.reactor.advance(0)
        listens(self.pool.workers[2])
        self.assertEqual(self.pool.health.counts(), (2, 2))

    def test_onlyWorkerInACrashLoop(self) -> None:
        """With every place's worker in a crash loop, the host is not ready, and says why."""
        pool = WorkerPool(SpawningClock(), 1, lambda: [], FakeSocket(), {}, health=WorkersHealth(1))
        pool.startService()
        pool.workers[1].protocol.processEnded(Failure(ProcessTerminated(signal=signal.SIGBUS)))
        pool.clock.advance(FIRST_DELAY)
        listens(pool.workers[1])
        verdict = pool.health.ready()
        self.assertFalse(verdict.ok)
        self.assertIn("worker 1 restarted after 1 deaths within 10 s of starting (the last: killed by SIGBUS",
                      verdict.reason)


class RollingReplacementTests(SynchronousTestCase):
    """SIGUSR2: each place gets a new worker that listens before the old one is told to stop, one place at a
    time; a replacement that fails leaves the old worker in its place."""

    def setUp(self) -> None:
        self.reactor = SpawningClock()
        self.pool = WorkerPool(self.reactor, 2, lambda: ["--records=x"], FakeSocket(), {}, grace=5)
        self.pool.startService()
        for process, _, _ in self.reactor.spawned:
            self.listens(process)

    def listens(self, process: FakeProcess) -> None:
        """C{process} says it listens, and that it is ready."""
        listens(process)

    def test_newBeforeOldOneAtATime(self) -> None:
        """The new worker of place 1 starts alone; the old one is sent TERM only once it listens; place 2 is
        replaced only once the old worker 1 has exited; the host stays ready throughout."""
        (old1, _, _), (old2, _, _) = self.reactor.spawned
        done = self.pool.replaceAll()
        self.assertEqual(len(self.reactor.spawned), 3)
        new1 = self.reactor.spawned[2][0]
        self.assertEqual((old1.signals, old2.signals), ([], []))
        self.listens(new1)
        self.assertEqual(old1.signals, ["TERM"])
        self.assertEqual(len(self.reactor.spawned), 3, "place 2 replaced before the old worker 1 exited")
        self.assertTrue(self.pool.health.ready().ok)
        old1.protocol.processEnded(Failure(ProcessDone(0)))
        self.assertEqual(len(self.reactor.spawned), 4)
        new2 = self.reactor.spawned[3][0]
        self.assertEqual(old2.signals, [])
        self.listens(new2)
        old2.protocol.processEnded(Failure(ProcessDone(0)))
        self.assertTrue(self.successResultOf(done))
        self.assertEqual(self.pool.workers, {1: new1, 2: new2})
        self.reactor.advance(60)
        self.assertEqual(len(self.reactor.spawned), 4, "a retired worker was restarted")
        self.assertEqual(self.pool.health.ready().reason, "ready: 2 of 2 workers ready")

    def test_failedReplacementKeepsTheOld(self) -> None:
        """A new worker that exits before it listens ends the replacement; the old one keeps its place and
        is not signalled, and nothing more is started."""
        (old1, _, _), _ = self.reactor.spawned
        done = self.pool.replaceAll()
        new1 = self.reactor.spawned[2][0]
        new1.protocol.processEnded(Failure(ProcessTerminated(exitCode=1)))
        self.assertFalse(self.successResultOf(done))
        self.assertEqual(old1.signals, [])
        self.assertIs(self.pool.workers[1], old1)
        self.reactor.advance(60)
        self.assertEqual(len(self.reactor.spawned), 3)

    def test_slowReplacementIsKilled(self) -> None:
        """A new worker that does not listen within REPLACE_WAIT is killed, and the old one stays."""
        (old1, _, _), _ = self.reactor.spawned
        done = self.pool.replaceAll()
        new1 = self.reactor.spawned[2][0]
        self.reactor.advance(REPLACE_WAIT)
        self.assertEqual(new1.signals, ["KILL"])
        new1.protocol.processEnded(Failure(ProcessTerminated(signal=9)))
        self.assertFalse(self.successResultOf(done))
        self.assertIs(self.pool.workers[1], old1)

    def replaceEach(self, version: str) -> None:
        """The replacement running goes through both places: each new worker runs C{version} and listens, then
        the old one it replaces (told to stop) exits."""
        for _ in range(2):
            new = self.reactor.spawned[-1][0]
            listens(new, version)
            (old,) = [process for process, _, _ in self.reactor.spawned
                      if process.signals == ["TERM"] and process.protocol.exited.called is False]
            old.protocol.processEnded(Failure(ProcessDone(0)))

    def test_secondSignalQueued(self) -> None:
        """A SIGUSR2 during a replacement (a second deploy) is not lost: one more replacement of every place
        starts when this one ends, however many came meanwhile, and the last line names what each place runs."""
        events: list[dict] = []
        self.patch(WorkerPool, "log", Logger(observer=events.append))
        first = self.pool.replaceAll()
        self.assertIs(self.pool.replaceAll(), first)
        self.pool.replaceAll()
        self.assertEqual(len(self.reactor.spawned), 3, "one place at a time")
        self.replaceEach("1.0")
        self.assertTrue(self.successResultOf(first))
        self.assertEqual(len(self.reactor.spawned), 5, "a second replacement started")
        self.replaceEach("2.0")
        self.assertEqual(len(self.reactor.spawned), 6, "and only one more, however many signals came")
        lines = [e["log_format"].format(**e) for e in events if "now worker" in e["log_format"].format(**e)]
        pids = {number: process.pid for number, process in self.pool.workers.items()}
        self.assertEqual(lines[-1], f"replaced every worker; now worker 1: primecount 2.0 on CPython 3.11.7 (pid "
                                    f"{pids[1]}), worker 2: primecount 2.0 on CPython 3.11.7 (pid {pids[2]})")
        self.assertEqual(len(lines), 2)


class MetricsDirectoryTests(SynchronousTestCase):
    """The workers' metrics folder is made when the service starts (after twistd's --uid), and removed at stop."""

    def test_madeAtStartAndGivenToWorkers(self) -> None:
        """Nothing exists before start; at start the folder exists and the workers' environment names it."""
        environ: dict[str, str] = {}
        folder = MetricsDirectory(environ)
        self.assertEqual((folder.path, environ), (None, {}))
        self.assertEqual(list(folder.collect()), [])
        folder.startService()
        self.assertTrue(os.path.isdir(folder.path))
        self.assertEqual(environ, {"PROMETHEUS_MULTIPROC_DIR": folder.path})
        folder.stopService()
        self.assertFalse(os.path.exists(folder.path))


class MetricsRoomTests(SynchronousTestCase):
    """Metrics storage that cannot be written stops the start, in one line."""

    def test_noFolderForMetrics(self) -> None:
        """A TMPDIR that does not exist: L{StartFailed} naming TMPDIR and the error, nothing left behind."""
        import tempfile

        self.patch(tempfile, "tempdir", os.path.join(self.mktemp(), "missing"))
        failed = self.assertRaises(StartFailed, MetricsDirectory({}, 2).startService)
        self.assertIn("(TMPDIR), which cannot take them: No such file or directory", str(failed))


class WorkerOptionsTests(SynchronousTestCase):
    """C{--workers} parses, refuses what it cannot serve, and hands each worker its options."""

    def parse(self, *argv: str) -> Options:
        """Parsed options with a temporary records file."""
        options = Options()
        options.parseOptions([*argv, "--records", self.mktemp()])
        return options

    def test_values(self) -> None:
        """A number, or auto for the CPUs this process may use; 0 and words are refused."""
        self.assertEqual(self.parse()["workers"], 1)
        self.assertEqual(self.parse("--workers", "3")["workers"], 3)
        pinned = subprocess.run(["taskset", "-c", "0", sys.executable, "-c",
                                 "from primecount.options import Options; o = Options(); "
                                 "o.parseOptions(['--workers', 'auto', '--records', '/dev/null']); print(o['workers'])"],
                                capture_output=True, text=True)
        self.assertEqual(pinned.stdout, "1\n", pinned.stderr)
        self.assertEqual(self.parse("--workers", "auto")["workers"], os.cpu_count())
        for bad in ("0", "many"):
            with self.assertRaises(UsageError) as caught:
                self.parse("--workers", bad)
            self.assertTrue(str(caught.exception).startswith("--workers:"))

    def test_needsTCP(self) -> None:
        """Workers share a TCP socket; a UNIX or TLS port is refused with a reason."""
        with self.assertRaises(UsageError) as caught:
            self.parse("--workers", "2", "--port", "unix:/tmp/primecount.sock")
        self.assertIn("--workers: needs a TCP --port", str(caught.exception))

    def test_workerArguments(self) -> None:
        """Each worker gets the same options, its share of --max-connections, the socket, and no --metrics."""
        options = self.parse("--workers", "3", "--max-connections", "100", "--keep-alive", "--metrics", "5059",
                             "--port", "haproxy:tcp:5050", "--proxy-from", "192.0.2.7")
        arguments = workerArguments(options)
        self.assertIn("--max-connections=34", arguments)
        self.assertIn("--keep-alive", arguments)
        self.assertIn("--port=haproxy:tcp:5050", arguments)
        self.assertIn("--proxy-from=192.0.2.7/32", arguments)
        self.assertEqual(arguments[-2:], ["--worker-fd=3", "--worker-metrics"])
        self.assertFalse([a for a in arguments if a.startswith(("--metrics", "--workers"))])
        again = Options()
        again.parseOptions(arguments)
        self.assertEqual((again["max-connections"], again["worker-fd"], again["worker-metrics"]), (34, 3, 1))


class BlockingModeWatch:
    """A thread reading, as often as it can, the blocking mode of a process's listening socket on C{port}: the mode
    of its open file, which the supervisor and every worker share (C{/proc/PID/fdinfo}); it counts the reads and
    those that found it blocking."""

    def __init__(self, pid: int, port: int) -> None:
        self.reads = self.blocking = 0
        self._info = f"/proc/{pid}/fdinfo/{self._descriptor(pid, port)}"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    @staticmethod
    def _descriptor(pid: int, port: int) -> str:
        """The descriptor of C{pid}'s socket listening on C{port}, found by its inode in C{/proc/net/tcp*}."""
        inodes = listeningInodes(port)
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:[") and link[8:-1] in inodes:
                return fd
        raise AssertionError(f"process {pid} has no socket listening on port {port}")

    def _watch(self) -> None:
        while not self._stop.is_set():
            with open(self._info) as info:
                flags = int(next(line for line in info if line.startswith("flags:")).split()[1], 8)
            self.reads += 1
            self.blocking += not flags & os.O_NONBLOCK

    def stop(self) -> None:
        """Stop reading."""
        self._stop.set()
        self._thread.join(10)


class TwistdWorkersTests(SynchronousTestCase):
    """A real C{twistd primecount --workers}: one records file, kill -9, SIGHUP, SIGTERM, summed metrics."""

    def start(self, *options: str) -> ServerProcess:
        """A supervisor with C{options} on a free loopback port, its workers up."""
        server = ServerProcess(os.path.abspath(self.mktemp()), "--max-per-ip", "0", *options)
        count = int(options[options.index("--workers") + 1])
        server.waitForWorkers(count)
        self.addCleanup(lambda: server.process.poll() is None and server.stop())
        return server

    def workerPids(self, server: ServerProcess) -> dict[int, int]:
        """Worker number to pid, latest start of each."""
        return {int(n): int(pid) for n, pid in re.findall(r"started worker (\d+) \(pid (\d+)\)", server.log)}

    def load(self, port: int, seconds: float, clients: int = 8) -> list[str]:
        """Requests from C{clients} threads for C{seconds}; the messages that were answered correctly."""
        return answeredUnderLoad([f"client {n}" for n in range(clients)], seconds,
                                 lambda name, payload: ask(port, payload, timeout=5))

    def recorded(self, path: str) -> list[str]:
        """Messages in a records file; the file must parse whole."""
        with open(path, encoding="utf-8") as file:
            return [r.message for r in parseRecords(file)]

    @slow
    def test_stalledSupervisorStopsNoWorker(self) -> None:
        """With C{--log-requests}, a supervisor stopped (SIGSTOP) for five seconds under load: its workers answer
        every request all along (their log never waits for the pipe); what the log could not keep is dropped,
        and once the supervisor reads again a line says how many; every request's two lines are relayed or
        counted as dropped."""
        server = self.start("--workers", "2", "--log-requests")
        answered: list[float] = []
        failed: list[str] = []
        stop = threading.Event()

        def client(number: int) -> None:
            sent = 0
            while not stop.is_set():
                message = f"stalled {number} {sent}"
                sent += 1
                try:
                    reply = ask(server.port, message.encode() + b"\n", timeout=3)
                except OSError as error:
                    failed.append(f"{message}: {error}")
                    continue
                if reply == expectedReply(message):
                    answered.append(time.monotonic())
                else:
                    failed.append(f"{message}: {reply!r}")

        clients = [threading.Thread(target=client, args=(n,)) for n in range(6)]
        for thread in clients:
            thread.start()
        try:
            waitUntil(lambda: len(answered) > 50, what="answers before the stop")
            os.kill(server.process.pid, signal.SIGSTOP)
            stoppedAt = time.monotonic()
            time.sleep(5)
            os.kill(server.process.pid, signal.SIGCONT)
            resumedAt = time.monotonic()
        finally:
            os.kill(server.process.pid, signal.SIGCONT)
            stop.set()
            for thread in clients:
                thread.join(30)
        self.assertEqual(failed, [])
        self.assertTrue([t for t in answered if resumedAt - 1 < t < resumedAt], "answers in the stop's last second")
        self.assertGreater(len([t for t in answered if stoppedAt < t < resumedAt]), 100)
        self.assertEqual(server.stop(), 0)
        relayed = len(re.findall(r"worker \d+: (?:connection from|reply \S+ \S+ to) 127\.0\.0\.1", server.log))
        dropped = sum(map(int, re.findall(r"worker \d+: (\d+) log lines dropped", server.log)))
        # Counted as dropped may also be a few lines of the stop itself, logged while the backlog still drained.
        self.assertTrue(0 <= relayed + dropped - 2 * len(answered) <= 20,
                        f"every request's two lines relayed or counted: {relayed} + {dropped}, {len(answered)} requests")

    @slow
    def test_metricsWithoutRoom(self) -> None:
        """C{--metrics} with TMPDIR on a full file system stops the start at once: one line naming TMPDIR, exit 1.
        With room at start, a worker started once it is full is killed by SIGBUS (its metrics file cannot
        grow): the supervisor says so, with what it means, and the place is restarted."""
        from tests.test_fleet import fill, smallDisk

        disk = smallDisk(self, "8m")
        filler = fill(disk)
        os.truncate(filler, filler.stat().st_size - 65536)  # room for Python's check that TMPDIR is usable
        environment = {**os.environ, "TMPDIR": str(disk)}
        result = subprocess.run(
            [*TWISTD, "-n", "--pidfile=", "primecount", "--port", "tcp:0:interface=127.0.0.1", "--workers", "2",
             "--metrics", "tcp:0:interface=127.0.0.1", "--records", os.path.abspath(self.mktemp())],
            capture_output=True, text=True, timeout=60, env=environment)
        self.assertEqual(result.returncode, 1, result.stdout + result.stderr)
        self.assertIn(f"--metrics with --workers keeps the workers' metrics in memory-mapped files under {disk} "
                      "(TMPDIR), which cannot take them: No space left on device", result.stdout + result.stderr)
        self.assertNotIn("primecount listening", result.stdout)
        filler.unlink()
        server = ServerProcess(os.path.abspath(self.mktemp()), "--workers", "2", "--metrics",
                               "tcp:0:interface=127.0.0.1", environment=environment)
        self.addCleanup(lambda: server.process.poll() is None and server.stop())
        server.waitForWorkers(2)
        self.assertEqual(ask(server.port, b"abc2a\n"), expectedReply("abc2a"))
        fill(disk)
        os.kill(self.workerPids(server)[1], signal.SIGKILL)
        server.waitFor(rb"worker 1 \(pid \d+\) died after [\d.]+ s, before it listened: killed by SIGBUS \(a "
                       rb"memory-mapped file could not be written")
        self.assertEqual(ask(server.port, b"still\n"), expectedReply("still"))  # worker 2 serves

    @slow
    def test_secondDeployDuringAReplacement(self) -> None:
        """Two SIGUSR2 in a row (two deploys): the second, arriving during the first replacement, starts another
        when it ends, so every place ends on a worker started after the second signal, and the last line names
        what each place runs, by pid."""
        server = self.start("--workers", "2")
        server.signal(signal.SIGUSR2)
        server.waitFor(rb"replacing 2 workers one at a time")
        server.signal(signal.SIGUSR2)
        server.waitFor(rb"replacing the workers again")
        server.waitFor(rb"replaced every worker; now", seconds=60, count=2)
        pids = self.workerPids(server)
        self.assertEqual(server.log.count("started worker"), 6, server.log)
        python = f"{platform.python_implementation()} {platform.python_version()}"
        self.assertIn(f"replaced every worker; now worker 1: primecount {__version__} on {python} (pid {pids[1]}), "
                      f"worker 2: primecount {__version__} on {python} (pid {pids[2]})", server.log)
        self.assertEqual(ask(server.port, b"abc2a\n"), expectedReply("abc2a"))

    @slow
    def test_sharedSocketNeverBlocking(self) -> None:
        """The shared listening socket is never in blocking mode while workers start, at first and in a rolling
        replacement: the mode is every worker's, and a worker's accept() on a blocking socket waits for the next
        connection, holding the replies of those it took (a PyPy worker asking the socket's family did that)."""
        server = ServerProcess(os.path.abspath(self.mktemp()), "--workers", "2")
        self.addCleanup(lambda: server.process.poll() is None and server.stop())
        watch = BlockingModeWatch(server.process.pid, server.port)
        self.addCleanup(watch.stop)
        server.waitForWorkers(2)
        server.signal(signal.SIGUSR2)
        server.waitFor(rb"replaced every worker", seconds=60)
        watch.stop()
        self.assertEqual(server.log.count("primecount listening"), 5, server.log)  # the supervisor and four workers
        self.assertGreater(watch.reads, 1000)
        self.assertEqual(watch.blocking, 0, f"found blocking in {watch.blocking} of {watch.reads} reads")
        self.assertEqual(server.stop(), 0, server.log)

    @slow
    def test_fourWorkersOneCleanRecordsFile(self) -> None:
        """Four workers under load write one records file that the records tool finds clean, one line per
        answer; SIGTERM drains them all and the supervisor exits 0."""
        server = self.start("--workers", "4")
        answered = self.load(server.port, 3)
        self.assertEqual(server.stop(), 0, server.log)
        self.assertGreater(len(answered), 500)
        check = subprocess.run([sys.executable, "-m", "primecount.records", "check", server.records],
                               capture_output=True, text=True)
        self.assertEqual(check.returncode, 0, check.stdout + check.stderr)
        self.assertEqual(sorted(self.recorded(server.records)), sorted(answered))
        self.assertEqual(server.log.count("Server Shut Down"), 5, "four workers and the supervisor")

    @slow
    def test_killedWorkerIsRestartedAndNothingAnsweredIsLost(self) -> None:
        """kill -9 of a worker mid-load: logged, restarted, the other keeps serving, every answer recorded."""
        server = self.start("--workers", "2")
        victim = self.workerPids(server)[1]
        threading.Timer(1.0, os.kill, (victim, signal.SIGKILL)).start()
        answered = self.load(server.port, 3)
        server.waitFor(rb"worker 1 \(pid \d+\) died")
        waitUntil(lambda: self.workerPids(server)[1] != victim, what="worker 1 to be started again")
        self.assertEqual(ask(server.port, b"after\n"), expectedReply("after"))
        self.assertEqual(server.stop(), 0, server.log)
        self.assertEqual(set(answered) - set(self.recorded(server.records)), set())
        self.assertGreater(len(answered), 200)

    @slow
    def test_hangUpReopensInEveryWorker(self) -> None:
        """After a rename and SIGHUP, every worker writes to the new file at the path."""
        server = self.start("--workers", "2")
        before = self.load(server.port, 0.5, clients=4)
        os.rename(server.records, server.records + ".1")
        server.process.send_signal(signal.SIGHUP)
        server.waitFor(rb"worker \d+: reopened records file", count=2)
        after = self.load(server.port, 1, clients=4)
        self.assertEqual(server.stop(), 0, server.log)
        self.assertEqual(sorted(self.recorded(server.records + ".1")), sorted(before))
        self.assertEqual(sorted(self.recorded(server.records)), sorted(after))

    @slow
    def test_metricsSummedOverWorkers(self) -> None:
        """The supervisor's /metrics counts every worker's requests."""
        server = self.start("--workers", "2", "--metrics", "tcp:0:interface=127.0.0.1")
        metricsPort = int(server.waitFor(rb"Site starting on (\d+)").group(1))
        answered = self.load(server.port, 1, clients=4)
        scraped: list[dict[str, float]] = []

        def everyCloseSeen() -> bool:
            # A client that has its reply has closed, but the worker may not have read that close yet.
            scraped[:] = [scrape(metricsPort)]
            return scraped[0]["primecount_open_connections"] == 0.0

        waitUntil(everyCloseSeen, what="the workers to see every client's close")
        self.assertEqual(server.stop(), 0, server.log)
        self.assertEqual(scraped[0]['primecount_requests_total{outcome="ok"}'], len(answered))
        self.assertEqual(scraped[0]["primecount_connections_total"], len(answered))
        self.assertTrue(0 < scraped[0]["primecount_records_commit_duration_seconds_count"] <= len(answered))
        self.assertEqual((scraped[0]["primecount_ready"], scraped[0]['primecount_workers{state="running"}'],
                          scraped[0]['primecount_workers{state="ready"}'], scraped[0]["primecount_worker_restarts_total"]),
                         (1.0, 2.0, 2.0, 0.0))



    @slow
    def test_deadSupervisorsWorkersLeaveThePort(self) -> None:
        """kill -9 of the supervisor under load: both workers drain and exit by themselves, every answer they
        gave is recorded, and a new server binds the same port at once."""
        server = self.start("--workers", "2")
        workers = self.workerPids(server).values()
        self.addCleanup(lambda: [os.kill(pid, signal.SIGKILL) for pid in workers if running(pid)])
        threading.Timer(0.5, server.process.kill).start()
        answered = self.load(server.port, 1.5, clients=4)
        server.process.wait(10)
        waitUntil(lambda: not any(map(running, workers)), seconds=10, what="the workers to exit")
        self.assertEqual(set(answered) - set(self.recorded(server.records)), set())
        self.assertGreater(len(answered), 50)
        again = ServerProcess(os.path.abspath(self.mktemp()), port=f"tcp:{server.port}:interface=127.0.0.1")
        self.addCleanup(again.stop)
        self.assertEqual(ask(again.port, b"again\n"), expectedReply("again"))


def running(pid: int) -> bool:
    """Whether process C{pid} exists and has not ended (a zombie waiting for its parent has ended)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


class SupervisorWatchTests(SynchronousTestCase):
    """A worker learns of its supervisor's death from the end of its standard input, and stops."""

    def test_stopsAtTheEndOfInput(self) -> None:
        """Bytes on the pipe change nothing; its end stops the worker once, and the pipe is no longer read."""
        from twisted.internet.main import CONNECTION_DONE
        from twisted.internet.testing import MemoryReactor

        from primecount.workers import SupervisorWatch

        reading, writing = os.pipe()
        self.addCleanup(os.close, reading)
        reactor, stops = MemoryReactor(), []
        watch = SupervisorWatch(reactor, stops.append, fd=reading, silence=lambda: None)
        watch.startService()
        (reader,) = reactor.getReaders()
        os.write(writing, b"anything")
        self.assertIsNone(reader.doRead())
        self.assertIsNone(reader.doRead())  # nothing left to read: not an end
        os.close(writing)
        self.assertIs(reader.doRead(), CONNECTION_DONE)  # the reactor then removes it and calls connectionLost
        self.assertEqual(stops, [])
        reader.connectionLost(Failure(CONNECTION_DONE))
        self.assertEqual(stops, ["the supervisor is gone (its pipe closed)"])
        self.assertEqual(reactor.getReaders(), [])

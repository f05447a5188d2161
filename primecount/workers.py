"""C{--workers N}: the twistd process supervises N worker processes, each a whole server accepting on the one
listening socket the supervisor binds; see docs/scaling.md."""

from __future__ import annotations

import os
import re
import shutil
import signal
import sys
import tempfile
from typing import Any, Callable, Optional, Sequence

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.endpoints import AdoptedStreamServerEndpoint
from twisted.internet import fdesc
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.interfaces import IDelayedCall, IReadDescriptor, IStreamServerEndpoint
from twisted.internet.main import CONNECTION_DONE
from twisted.internet.protocol import Factory, ProcessProtocol, Protocol
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure
from zope.interface import implementer

from primecount.descriptors import socketOn, socketsMadeIn
from primecount.health import READINESS_EVENT, WorkersHealth, parseVerdict
from primecount.internals import stopAccepting
from primecount.lifecycle import LISTENING_EVENT, announceListening, listenFailed
from primecount.startup import StartFailed

TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]
# The inherited listening socket's descriptor number in every worker.
WORKER_FD = 3
# A worker that ran this long before dying is restarted at once; one that died sooner waits, longer each time.
STABLE_SECONDS = 10.0
FIRST_DELAY, MAX_DELAY = 0.5, 30.0
# Room each worker's metrics files need in TMPDIR (prometheus_client's memory-mapped files start at 64 KiB each,
# a few per worker, and double as series are added): checked at start by writing it.
METRICS_ROOM = 1 << 20
# A new worker of a rolling replacement that does not listen within this is killed; the old one stays.
REPLACE_WAIT = 60.0
# Variables a worker must not inherit: the socket is handed over as descriptor 3, not by systemd, and systemd
# speaks with the supervisor alone (its readiness, its watchdog).
_NOT_INHERITED = ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", "NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")
_LEVELS = {level.name: level for level in LogLevel.iterconstants()}
# The first line a worker logs, which says what it runs (L{primecount.tap.makeService}).
STARTING = re.compile(r"primecount \S+ on \S+ \S+$")


def cpuCount() -> int:
    """The CPUs this process may run on (its affinity), for C{--workers auto}: from C{sched_getaffinity}, or
    where the interpreter has none (PyPy), from the kernel's C{Cpus_allowed_list}."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        pass
    try:
        with open("/proc/self/status") as status:
            allowed = next(line.split(":", 1)[1] for line in status if line.startswith("Cpus_allowed_list:"))
        return sum(int(end) - int(start) + 1 for start, _, end in
                   (part.strip().partition("-") if "-" in part else (part.strip(), "-", part.strip())
                    for part in allowed.split(",")))
    except (OSError, StopIteration, ValueError):
        return os.cpu_count() or 1


# What a signal that ends a worker usually means, beyond its name.
_SIGNAL_MEANINGS = {
    "SIGBUS": "a memory-mapped file could not be written: with --metrics, the workers' metrics files live in "
              "TMPDIR; is its file system full?",
    "SIGKILL": "by an operator, or by the kernel when memory ran out",
    "SIGSEGV": "a crash in native code",
    "SIGABRT": "an abort in native code",
}


def exitDescription(reason: Failure) -> str:
    """How a process ended, in words: its exit status, or the signal that killed it, by name, with what that
    usually means (C{killed by SIGBUS (...)}, C{exit status 1})."""
    status, number = getattr(reason.value, "exitCode", None), getattr(reason.value, "signal", None)
    if number:
        try:
            name = signal.Signals(number).name
        except ValueError:
            name = f"signal {number}"
        meaning = _SIGNAL_MEANINGS.get(name) or signal.strsignal(number) or ""
        return f"killed by {name}" + (f" ({meaning})" if meaning else "")
    return f"exit status {status if status is not None else 0}"


def socketFamily(fd: int) -> int:
    """The address family of the listening socket at C{fd} (asked without changing its blocking mode, which is
    every worker's: L{primecount.descriptors})."""
    with socketOn(fd) as probe:
        return probe.family


@implementer(IStreamServerEndpoint)
class SharedSocketEndpoint:
    """A worker's endpoint on the listening socket it inherited: Twisted's adopted-socket endpoint, listening
    while new socket objects are made non-blocking, so that the shared socket (non-blocking, as Twisted requires)
    is never blocking for a moment, under PyPy either (L{primecount.descriptors})."""

    def __init__(self, reactor: Any, fd: int) -> None:
        self._adopted = AdoptedStreamServerEndpoint(reactor, fd, socketFamily(fd))

    def listen(self, factory: Any) -> Deferred[Any]:
        """Adopt the socket and accept on it with C{factory}."""
        with socketsMadeIn(nonBlocking=True):
            return self._adopted.listen(factory)


class _Refuse(Protocol):
    """Never built: the supervisor does not accept on the shared socket."""


class SharedSocket(Service):
    """Binds the listening socket (or adopts systemd's) before privileges are dropped, and never accepts on it."""

    log = Logger()

    def __init__(self, endpoint: Any, reactor: Any) -> None:
        self._endpoint = endpoint
        self._reactor = reactor
        self._port: Any = None
        self.fileno = -1  # the listening socket's descriptor, once it listens

    def privilegedStartService(self) -> None:
        """Listen now, then stop reading at once: only the workers accept."""
        super().privilegedStartService()
        if self._port is not None:
            return
        refuse = Factory.forProtocol(_Refuse)
        refuse.noisy = False
        listening = self._endpoint.listen(refuse)
        failures: list[Failure] = []
        listening.addCallbacks(self._listened, failures.append)
        if failures:
            raise listenFailed(failures[0], "port")

    def _listened(self, port: Any) -> None:
        self.fileno = stopAccepting(port)
        self._port = port

    def startService(self) -> None:
        """Say that the service listens: now, in the started order, so that the signal handlers of the services
        before this one are asked for first (L{announceListening})."""
        super().startService()
        if self._port is not None:
            announceListening(self._reactor, self.log, self._port)

    def stopService(self) -> Any:
        """Close the socket (after the workers have stopped: this service starts before them)."""
        super().stopService()
        port, self._port = self._port, None
        return port.stopListening() if port is not None else None


class _WorkerProcess(ProcessProtocol):
    """One worker: relays its log lines into the supervisor's log (its readiness lines to the pool), and reports
    when it listens and when it exits."""

    def __init__(self, pool: "WorkerPool", number: int) -> None:
        self._pool = pool
        self.number = number
        self.exited: Deferred[None] = Deferred()
        # Fires when it listens; for a replacement (incoming), fails if it exits before that.
        self.listening: Deferred[None] = Deferred()
        self._partial = {1: b"", 2: b""}
        self.pid = 0
        self.incoming = False  # a replacement not yet listening: if it exits, the replacement keeps the old one
        self.transport: Any = None
        self.startedAt = pool.clock.seconds()
        self.ended = ""  # how it ended, once it has (L{exitDescription})
        self.version = ""  # what it said it runs, as it started (L{STARTING})

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        """Complete lines of the worker's log (stdout) or of a crash (stderr), each re-logged at its level."""
        lines = (self._partial.get(childFD, b"") + data).split(b"\n")
        self._partial[childFD] = lines.pop()
        for line in lines:
            self._relay(line)

    def _relay(self, raw: bytes) -> None:
        text = raw.decode("utf-8", errors="replace")
        name, _, message = text.partition(" ")
        level = _LEVELS.get(name)
        if level is None:
            level, message = LogLevel.info, text
        self._pool.log.emit(level, "worker {number}: {message}", number=self.number, message=message)
        if not self.version and STARTING.match(message):
            self.version = message
        if message.startswith(LISTENING_EVENT):
            self._pool.workerListening(self)
        elif message.startswith(READINESS_EVENT):
            verdict = parseVerdict(message[len(READINESS_EVENT):])
            if verdict is not None:
                self._pool.health.said(self.pid, verdict)

    def signal(self, name: str) -> None:
        """Send signal C{name} to this worker, if it still runs."""
        try:
            self.transport.signalProcess(name)
        except ProcessExitedAlready:
            pass

    def processEnded(self, reason: Failure) -> None:
        """Tell the pool, then anyone waiting for this worker to listen or to be gone."""
        for rest in self._partial.values():
            if rest:
                self._relay(rest)
        incoming = self.incoming  # a replacement whose listening is awaited (workerEnded reads it too)
        self.ended = exitDescription(reason)
        self._pool.workerEnded(self, reason)
        if incoming and not self.listening.called:
            self.listening.errback(reason)
        self.exited.callback(None)


class WorkerPool(Service):
    """Starts C{count} workers, restarts those that die, forwards SIGHUP, replaces them one at a time on
    SIGUSR2 (L{replaceAll}), and stops them all on stop."""

    log = Logger()

    def __init__(
        self, reactor: Any, count: int, arguments: Callable[[], Sequence[str]], listening: SharedSocket,
        environ: Optional[dict[str, str]] = None, grace: float = 10.0,
        onEnded: Callable[[int], None] = lambda pid: None, health: Optional[WorkersHealth] = None,
    ) -> None:
        self.reactor = reactor
        self.clock = reactor
        self._count = count
        self._arguments = arguments
        self._listening = listening
        self._environ = environ if environ is not None else dict(os.environ)
        self._grace = grace
        self._onEnded = onEnded
        self.health = health if health is not None else WorkersHealth()
        self._slots: dict[int, _WorkerProcess] = {}  # number -> the worker serving in that place
        self._running: set[_WorkerProcess] = set()  # every worker still running: in a place, or being retired
        self._delays: dict[int, float] = {}
        self._restarts: dict[int, IDelayedCall] = {}
        self._listeningWorkers: set[int] = set()
        # By place: how many of its workers in a row died within STABLE_SECONDS of starting, and how the last did;
        # and the timer that ends that count once the place's new worker has run that long.
        self._crashes: dict[int, tuple[int, str]] = {}
        self._stableCalls: dict[int, IDelayedCall] = {}
        self.allListening: Deferred[None] = Deferred()
        self.replacing: Optional[Deferred[bool]] = None  # while a rolling replacement runs: whether it completed
        self._replaceAgain = False  # SIGUSR2 came during a replacement: another starts when it ends
        self.restarts = 0  # workers that died and were started again

    @property
    def workers(self) -> dict[int, Any]:
        """The process of the worker in each place, by number."""
        return {number: protocol.transport for number, protocol in self._slots.items()}

    def startService(self) -> None:
        """Start every worker."""
        super().startService()
        for number in range(1, self._count + 1):
            self._start(number)

    def _start(self, number: int) -> _WorkerProcess:
        self._restarts.pop(number, None)
        protocol = _WorkerProcess(self, number)
        argv = [*TWISTD, "-n", "--pidfile=", "--logger=primecount.logs.workerLogObserver", "primecount",
                *self._arguments()]
        transport = self.reactor.spawnProcess(
            protocol, argv[0], argv, env={k: v for k, v in self._environ.items() if k not in _NOT_INHERITED},
            childFDs={0: "w", 1: "r", 2: "r", WORKER_FD: self._listening.fileno},
        )
        protocol.pid = transport.pid  # the transport forgets it once the process has ended
        protocol.transport = transport
        self._slots[number] = protocol
        self._running.add(protocol)
        crashes, last = self._crashes.get(number, (0, ""))
        self.health.started(protocol.pid, None if not crashes else (
            f"worker {number} restarted after {crashes} deaths within {STABLE_SECONDS:g} s of starting (the "
            f"last: {last}); counted ready once it has run {STABLE_SECONDS:g} s"))
        if crashes:
            self._stableCalls[number] = self.clock.callLater(STABLE_SECONDS, self._stable, protocol)
        self.log.info("started worker {number} (pid {pid})", number=number, pid=transport.pid)
        return protocol

    def _stable(self, protocol: _WorkerProcess) -> None:
        """C{protocol}'s worker, started after quick deaths in its place, has run L{STABLE_SECONDS}: the crash
        loop is over, and it counts as ready when it says it is."""
        self._stableCalls.pop(protocol.number, None)
        self._crashes.pop(protocol.number, None)
        self.health.stable(protocol.pid)

    def workerListening(self, protocol: _WorkerProcess) -> None:
        """C{protocol}'s worker accepts on the shared socket; once every place has, C{allListening} fires."""
        if not protocol.listening.called:
            protocol.listening.callback(None)
        self._listeningWorkers.add(protocol.number)
        if len(self._listeningWorkers) == self._count and not self.allListening.called:
            self.allListening.callback(None)

    def workerEnded(self, protocol: _WorkerProcess, reason: Failure) -> None:
        """A worker is gone: forget it and, if it was serving in its place and the pool is not stopping, start
        another in its place after a delay. One being retired, or a replacement that failed, is only
        forgotten (L{replaceAll} puts the old one back)."""
        number, pid = protocol.number, protocol.pid
        stable = self._stableCalls.get(number)
        if stable is not None and self._slots.get(number) is protocol:
            self._stableCalls.pop(number)
            if stable.active():
                stable.cancel()
        self._running.discard(protocol)
        self.health.ended(pid)
        self._onEnded(pid)
        if self._slots.get(number) is not protocol:
            return
        del self._slots[number]
        if not self.running or protocol.incoming:
            return
        ranFor = self.clock.seconds() - protocol.startedAt
        delay = 0.0 if ranFor >= STABLE_SECONDS else self._delays.get(number, FIRST_DELAY)
        self._delays[number] = FIRST_DELAY if ranFor >= STABLE_SECONDS else min(delay * 2, MAX_DELAY)
        self.restarts += 1
        how = exitDescription(reason)
        if ranFor < STABLE_SECONDS:
            self._crashes[number] = (self._crashes.get(number, (0, ""))[0] + 1, how)
        self.log.error("worker {number} (pid {pid}) died after {ranFor:.1f} s{listened}: {how}; restarting it in "
                       "{delay:g} s", number=number, pid=pid, how=how, ranFor=ranFor, delay=delay,
                       listened="" if protocol.listening.called else ", before it listened")
        self._restarts[number] = self.clock.callLater(delay, self._start, number)

    def replaceAll(self) -> Deferred[bool]:
        """SIGUSR2: replace every worker, one place at a time: a new worker (new code on disk, new certificate)
        starts and listens before the old one in its place is told to stop, and the old one drains before
        the next place is replaced, so that the socket never lacks a worker and no request is dropped. A new
        worker that exits before it listens, or does not listen within L{REPLACE_WAIT} seconds, ends the
        replacement, its place kept by the old worker. Fires with whether every place was replaced."""
        if self.replacing is not None:
            if not self._replaceAgain:
                self.log.info("already replacing the workers: another replacement of every worker will start when "
                              "this one ends (for code deployed meanwhile)")
            self._replaceAgain = True
            return self.replacing
        self.log.info("replacing {count} workers one at a time", count=len(self._slots))
        self.replacing = Deferred.fromCoroutine(self._replaceEach())
        self.replacing.addBoth(self._replaced)
        return self.replacing

    async def _replaceEach(self) -> bool:
        for number in sorted(self._slots):
            old = self._slots.get(number)
            if old is None or not self.running:
                continue
            new = self._start(number)
            new.incoming = True
            timer = self.clock.callLater(REPLACE_WAIT, new.signal, "KILL")
            try:
                await new.listening
            except Exception:
                if not self.running:
                    return False
                self.log.error("worker {number}'s replacement (pid {pid}) exited before it listened: {how}; the old "
                               "worker (pid {old}) keeps its place, and the replacement stops here",
                               number=number, pid=new.pid, old=old.pid, how=new.ended)
                if old in self._running:
                    self._slots[number] = old
                else:  # the old one died meanwhile: its place gets a new worker as after any death
                    self._restarts[number] = self.clock.callLater(FIRST_DELAY, self._start, number)
                return False
            finally:
                new.incoming = False
                if timer.active():
                    timer.cancel()
            await self._retire(old)
        return True

    async def _retire(self, old: _WorkerProcess) -> None:
        """Stop C{old} as on SIGTERM (it drains), killing it after the grace; return once it is gone."""
        if old not in self._running:
            return
        killer = self.clock.callLater(self._grace, old.signal, "KILL")
        old.signal("TERM")
        await old.exited
        if killer.active():
            killer.cancel()

    def _replaced(self, result: object) -> object:
        self.replacing = None
        if isinstance(result, Failure):
            self.log.failure("replacing the workers failed", result)
            result = False
        self.log.info("{outcome}; now {places}", outcome="replaced every worker" if result else
                      "the replacement stopped before every worker was replaced", places=self.versions())
        if self._replaceAgain and self.running:
            self._replaceAgain = False
            self.log.info("replacing the workers again, as asked for during that replacement")
            self.replaceAll()
        return result

    def versions(self) -> str:
        """What each place runs now, as its worker said when it started: C{worker 1: primecount 0.1.0 on CPython
        3.11.7 (pid 123), ...}."""
        return ", ".join(f"worker {number}: {protocol.version or 'version not said'} (pid {protocol.pid})"
                         for number, protocol in sorted(self._slots.items()))

    def signalAll(self, name: str) -> None:
        """Send signal C{name} (C{"HUP"}, C{"TERM"}) to every running worker, retiring ones included."""
        for protocol in list(self._running):
            protocol.signal(name)

    def hangUp(self) -> None:
        """Every worker reopens its records file."""
        self.log.info("asking {count} workers to reopen the records file", count=len(self._running))
        self.signalAll("HUP")

    def stopService(self) -> Deferred[Any]:
        """SIGTERM every worker (each drains), SIGKILL any still running after the grace; fire once all are gone."""
        super().stopService()
        for call in [*self._restarts.values(), *self._stableCalls.values()]:
            if call.active():
                call.cancel()
        self._restarts.clear()
        self._stableCalls.clear()
        if not self._running:
            return succeed(None)
        waiting = [protocol.exited for protocol in self._running]
        self.signalAll("TERM")
        killer = self.clock.callLater(self._grace, self._killRemaining)
        done = DeferredList(waiting)
        done.addBoth(lambda result: killer.cancel() if killer.active() else None)
        return done

    def _killRemaining(self) -> None:
        self.log.warn("killing {count} workers still running after {grace} s", count=len(self._running),
                      grace=self._grace)
        self.signalAll("KILL")


class MetricsDirectory(Service):
    """The workers' metrics folder (C{PROMETHEUS_MULTIPROC_DIR}), made in C{startService}, after twistd switched to
    C{--uid}, so that the workers can write in it, and removed on stop."""

    def __init__(self, environ: dict[str, str], workers: int = 1) -> None:
        self._environ = environ
        self._workers = workers
        self.path: Optional[str] = None

    def startService(self) -> None:
        """Make the folder, check that it takes the workers' metrics, and tell the workers' environment where it
        is. A folder that cannot be made or written, or whose file system has no room for them, stops the start
        (L{StartFailed}): a worker whose memory-mapped metrics file cannot grow is killed by SIGBUS."""
        super().startService()
        try:
            self.path = tempfile.mkdtemp(prefix="primecount-metrics-")
            with open(os.path.join(self.path, "room"), "wb") as room:
                room.write(b"\0" * (METRICS_ROOM * self._workers))
                room.flush()
            os.unlink(os.path.join(self.path, "room"))
        except OSError as error:
            if self.path is not None:
                shutil.rmtree(self.path, ignore_errors=True)
            raise StartFailed(f"primecount: --metrics with --workers keeps the workers' metrics in memory-mapped "
                              f"files under {tempfile.gettempdir()} (TMPDIR), which cannot take them: "
                              f"{error.strerror}; set TMPDIR to a folder with room") from None
        self._environ["PROMETHEUS_MULTIPROC_DIR"] = self.path

    def collect(self) -> Any:
        """The metrics summed over every worker, as of now (a collector for the supervisor's registry)."""
        from prometheus_client import multiprocess

        if self.path is None:
            return iter(())
        return multiprocess.MultiProcessCollector(None, path=self.path).collect()

    def workerEnded(self, pid: int) -> None:
        """Drop the live gauges of a worker that is gone."""
        from prometheus_client import multiprocess

        if pid and self.path is not None:
            multiprocess.mark_process_dead(pid, self.path)

    def stopService(self) -> None:
        """Remove the folder."""
        super().stopService()
        if self.path is not None:
            shutil.rmtree(self.path, ignore_errors=True)


@implementer(IReadDescriptor)
class _EndOfInput:
    """Reads a pipe only to learn that its writer is gone (the end of input); anything read is dropped."""

    def __init__(self, fd: int, ended: Callable[[], None]) -> None:
        self._fd = fd
        self._ended = ended

    def fileno(self) -> int:
        """The pipe's descriptor."""
        return self._fd

    def doRead(self) -> Any:
        """Drop what the pipe holds; at its end, say so (the reactor then stops reading it and calls
        L{connectionLost})."""
        try:
            if os.read(self._fd, 4096):
                return None
        except BlockingIOError:
            return None
        except OSError:
            pass
        return CONNECTION_DONE

    def connectionLost(self, reason: Failure) -> None:
        """The pipe ended (epoll reports a hang-up without calling L{doRead}): tell whoever waits."""
        self._ended()

    def logPrefix(self) -> str:
        """How the reactor names it in a log."""
        return "supervisor pipe"


class SupervisorWatch(Service):
    """In a worker: the supervisor holds the other end of the worker's standard input, which the kernel closes
    when the supervisor dies, however it dies. At that end of input the worker stops as on SIGTERM (drains,
    records, exits), within a reactor turn, so that a restart of the service can bind the port at once."""

    log = Logger()

    def __init__(self, reactor: Any, stop: Callable[[str], None], fd: int = 0,
                 silence: Callable[[], None] = lambda: _writeNowhere(1, 2)) -> None:
        self._reactor = reactor
        self._stop = stop
        self._silence = silence
        self._reader = _EndOfInput(fd, self._supervisorGone)

    def startService(self) -> None:
        """Watch the pipe."""
        super().startService()
        fdesc.setNonBlocking(self._reader.fileno())
        self._reactor.addReader(self._reader)

    def stopService(self) -> None:
        """Stop watching."""
        super().stopService()
        self._reactor.removeReader(self._reader)

    def _supervisorGone(self) -> None:
        self._reactor.removeReader(self._reader)  # gone already when the reactor reported the end
        self._silence()  # the log went to the supervisor's pipe, which is gone: write nowhere, not fail at each line
        self._stop("the supervisor is gone (its pipe closed)")


def _writeNowhere(*fds: int) -> None:
    """Point C{fds} at the null device."""
    with open(os.devnull, "wb") as nowhere:
        for fd in fds:
            os.dup2(nowhere.fileno(), fd)

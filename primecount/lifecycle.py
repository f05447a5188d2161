"""Process life cycle: SIGTERM and SIGINT stop the services in order, draining in-flight requests, and exit 0;
SIGHUP reopens the records file; SIGUSR2 replaces a supervisor's workers one at a time; the readiness that
C{/readyz} answers is logged as it changes."""

from __future__ import annotations

import signal
from types import FrameType
from typing import Any, Callable, Optional

from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger, LogLevel

from primecount.health import READINESS_EVENT, ProcessHealth, WorkersHealth
from primecount.internals import acceptQueued
from primecount.startup import StartFailed, saidOnTerminal


LISTENING_EVENT = "primecount listening on"


class ProcessSignals(Service):
    """Once the reactor runs: SIGTERM and SIGINT stop the reactor (so every service stops), SIGHUP calls
    C{onHangUp}, SIGUSR2 calls C{onReplace} (a supervisor's rolling replacement of its workers)."""

    log = Logger()

    def __init__(self, reactor: Any, onHangUp: Callable[[], None] = lambda: None,
                 onReplace: Optional[Callable[[], object]] = None) -> None:
        self._reactor = reactor
        self._onHangUp = onHangUp
        self._onReplace = onReplace
        self._stopping = False

    def startService(self) -> None:
        """Install the handlers when the reactor is running, after its own have been installed."""
        super().startService()
        self._reactor.callWhenRunning(self._install)

    def _install(self) -> None:
        signal.signal(signal.SIGTERM, self._stop)
        signal.signal(signal.SIGINT, self._stop)
        signal.signal(signal.SIGHUP, self._hangUp)
        signal.signal(signal.SIGUSR2, self._replace)

    def _stop(self, number: int, frame: Optional[FrameType]) -> None:
        self.stop(f"received {signal.Signals(number).name}")

    def stop(self, why: str) -> None:
        """Stop the reactor (every service stops in order: the drain, then the records) for the reason C{why},
        once; safe from a signal handler."""
        if self._stopping:
            return
        self._stopping = True
        self.log.info("{why}, draining and shutting down", why=why)
        self._reactor.callFromThread(self._reactor.stop)

    def _hangUp(self, number: int, frame: Optional[FrameType]) -> None:
        self.log.info("received SIGHUP, reopening the records file")
        self._reactor.callFromThread(self._onHangUp)

    def _replace(self, number: int, frame: Optional[FrameType]) -> None:
        if self._onReplace is None:
            self.log.info("received SIGUSR2, which replaces workers only with --workers: nothing to do")
            return
        self.log.info("received SIGUSR2, replacing the workers one at a time")
        self._reactor.callFromThread(self._onReplace)


class SequentialMultiService(MultiService):
    """A L{MultiService} that stops its children one at a time, last first, each after the previous has finished:
    the listener closes before in-flight requests drain, and they before the records are closed. A child's
    L{StartFailed} is also said on the terminal of a daemon's start (L{sayOnTerminal})."""

    def privilegedStartService(self) -> None:
        """Start the children's privileged part (listening), saying a failure on the terminal."""
        with saidOnTerminal():
            super().privilegedStartService()

    def startService(self) -> None:
        """Start the children, saying a failure on the terminal."""
        with saidOnTerminal():
            super().startService()

    def stopService(self) -> Deferred[None]:
        """Stop the children in reverse order, waiting for each."""
        Service.stopService(self)
        done: Deferred[None] = succeed(None)
        for child in reversed(list(self)):
            done.addBoth(lambda _, child=child: maybeDeferred(child.stopService))
        return done.addBoth(lambda _: None)


class Drain(Service):
    """On stop, closes kept connections between requests, waits for the others to answer their current
    request, then aborts any left after C{grace} seconds."""

    log = Logger()

    def __init__(self, connections: Any, clock: IReactorTime, grace: float) -> None:
        self._connections = connections
        self._clock = clock
        self._grace = grace

    def stopService(self) -> Deferred[None]:
        """Fire once no connection is open (every request answered or closed)."""
        super().stopService()
        self._connections.stopTakingRequests()
        open = self._connections.openCount
        if open:
            self.log.info("waiting up to {grace} s for {open} open connections", grace=self._grace, open=open)
        self._idle: Deferred[None] = Deferred()
        self._timer: Optional[IDelayedCall] = None
        self._connections.whenIdle().addCallback(self._finish)
        if not self._idle.called:
            self._timer = self._clock.callLater(self._grace, self._abortRemaining)
        return self._idle

    def _finish(self, _: object = None) -> None:
        """Stop waiting: cancel the pending timer, log what the connections' summaries still hold, and fire the
        stop, once."""
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        if not self._idle.called:
            self._connections.flushLogs(everything=True)
            self._idle.callback(None)

    def _abortRemaining(self) -> None:
        self.log.warn("aborting {open} connections still open after {grace} s",
                      open=self._connections.openCount, grace=self._grace)
        # Aborted connections report their loss on the next turns; do not wait for them forever.
        self._timer = self._clock.callLater(1.0, self._giveUp)
        self._connections.abortAll()

    def _giveUp(self) -> None:
        self.log.warn("stopping with {open} connections not yet closed", open=self._connections.openCount)
        self._finish()


def announceListening(reactor: Any, log: Logger, port: Any) -> None:
    """Log the listening line for C{port} once the reactor runs: after L{ProcessSignals} has installed its
    handlers (it asks for the same moment first), so that whoever waits for the line may send SIGTERM at once
    and get the drain."""

    def announce() -> None:
        address = port.getHost()
        # Tools and tests find the bound port from this event (its text is stable), not from Twisted's wording.
        if hasattr(address, "port"):
            log.info("{event} {host} port {port}", event=LISTENING_EVENT, host=address.host, port=address.port)
        else:  # a UNIX socket: its path
            name = getattr(address, "name", address)
            log.info("{event} {path}", event=LISTENING_EVENT,
                     path=name.decode("utf-8", "replace") if isinstance(name, bytes) else name)

    reactor.callWhenRunning(announce)


class Listener(Service):
    """Listens on an endpoint; on stop, first takes in the connections whose handshake the kernel has completed
    (Twisted accepts only a few per turn, and closing would leave them without a reply)."""

    log = Logger()

    def __init__(self, endpoint: Any, factory: Any, reactor: Any, option: str = "port",
                 announce: bool = True) -> None:
        """C{option}: the option that named C{endpoint}, for a failure to listen; C{announce}: whether this is the
        service's listener, which says L{LISTENING_EVENT} (not the metrics endpoint's)."""
        self._endpoint = endpoint
        self._factory = factory
        self._reactor = reactor
        self._option = option
        self._announces = announce
        self._listening: Optional[Deferred[Any]] = None
        self._port: Any = None

    def privilegedStartService(self) -> None:
        """Listen now (before privileges are dropped); a failure to listen is raised here."""
        super().privilegedStartService()
        self._listen()

    def startService(self) -> None:
        """Listen if not done yet, and say so.

        The listening line comes only once the services before this one
        (signals, records) have started as the service user and the reactor
        runs: a records file that user cannot open stops the start before
        primecount ever says it listens, with or without C{--uid}, and whoever
        waits for that line can rely on the records file and the signal
        handlers being in place (L{announceListening}).
        """
        super().startService()
        listenedBefore = self._port is not None
        self._listen()  # listening now (no privileged start) announces itself
        if listenedBefore:
            self._announce(self._port)

    def _listen(self) -> None:
        if self._listening is not None:
            return
        self._listening = self._endpoint.listen(self._factory)
        failures: list[Any] = []
        returned = False

        def failed(failure: Any) -> None:
            if returned:  # an endpoint that fails later: nothing to raise into, so say it loudly
                self.log.failure("cannot listen on {endpoint}", failure, endpoint=self._endpoint)
            failures.append(failure)

        self._listening.addCallbacks(self._listened, failed)
        returned = True
        if failures:
            raise listenFailed(failures[0], self._option)

    def _listened(self, port: Any) -> Any:
        self._port = port
        if self.running:  # an endpoint that listens late; otherwise startService announces it
            self._announce(port)
        return port

    def _announce(self, port: Any) -> None:
        if self._announces:
            announceListening(self._reactor, self.log, port)

    @property
    def listening(self) -> bool:
        """Whether the listener accepts (it has listened and not yet closed)."""
        return self._port is not None

    def stopService(self) -> Deferred[None]:
        """Accept what the kernel has queued, then stop listening."""
        super().stopService()
        port, self._port = self._port, None
        if port is None:
            return succeed(None)
        accepted = acceptQueued(port)
        if accepted:
            self.log.info("took in {count} connections queued before the listener closed", count=accepted)
        return maybeDeferred(port.stopListening)


def listenFailed(failure: Any, option: str = "port") -> BaseException:
    """What to raise when listening on the endpoint of C{--option} failed: a port in use or not allowed, or a
    UNIX socket's path that cannot be made, stops twistd with one line naming the option, no traceback."""
    if failure.check(CannotListenError):
        return StartFailed(f"primecount: --{option}: {failure.getErrorMessage()}")
    if failure.check(OSError):
        error = failure.value
        where = f": {error.filename}" if getattr(error, "filename", None) else ""
        return StartFailed(f"primecount: --{option}: cannot listen: {error.strerror or error}{where}")
    return failure.value



class HealthWatch(Service):
    """Logs the readiness of C{health} each time it changes (a supervisor reads its workers' lines), looking
    every L{LOOK_INTERVAL} seconds; on stop, the first thing to stop before the listener, turns unready
    (draining) and then waits C{drainDelay} seconds, for balancers that probe C{/readyz} to take the host out
    before the listener closes."""

    log = Logger()
    LOOK_INTERVAL = 0.25

    def __init__(self, health: ProcessHealth | WorkersHealth, clock: IReactorTime, drainDelay: float = 0.0) -> None:
        self._health = health
        self._clock = clock
        self._drainDelay = drainDelay
        self._said = ""
        self._loop = LoopingCall(self._look)
        self._loop.clock = clock

    def startService(self) -> None:
        """Say the readiness now, and again whenever it changes."""
        super().startService()
        self._loop.start(self.LOOK_INTERVAL, now=True)

    def _look(self) -> None:
        verdict = self._health.ready()
        line = verdict.line()
        if line != self._said:
            self._said = line
            level = LogLevel.info if verdict.ok or self._health.draining else LogLevel.warn
            self.log.emit(level, "{event} {verdict}", event=READINESS_EVENT, verdict=line)

    def stopService(self) -> Optional[Deferred[None]]:
        """Turn unready (draining), say so, and wait C{drainDelay} seconds before the listener closes."""
        super().stopService()
        if self._loop.running:
            self._loop.stop()
        self._health.draining = True
        self._look()
        if self._drainDelay <= 0:
            return None
        self.log.info("waiting {delay:g} s for balancers to take this host out before closing the listener",
                      delay=self._drainDelay)
        return deferLater(self._clock, self._drainDelay, lambda: None)

"""Tests for L{primecount.lifecycle}: signal handling, ordered stopping, draining open connections."""

from __future__ import annotations

import signal
from typing import Callable

from twisted.internet.address import IPv4Address

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from primecount.lifecycle import Drain, Listener, ProcessSignals, SequentialMultiService
from primecount.startup import StartFailed


class CallRecordingReactor(MemoryReactorClock):
    """A memory reactor that records C{callFromThread} calls instead of running them."""

    def __init__(self) -> None:
        super().__init__()
        self.fromThread: list[object] = []

    def callFromThread(self, callable, *args, **kwargs):  # type: ignore[no-untyped-def]
        """Record the call."""
        self.fromThread.append(callable)


class ProcessSignalsTests(SynchronousTestCase):
    """Handlers go in once the reactor runs; TERM and INT stop it once, HUP reopens."""

    def test_installedWhenRunning(self) -> None:
        """Starting the service installs nothing until the reactor runs, then handles TERM, INT and HUP."""
        reactor = CallRecordingReactor()
        service = ProcessSignals(reactor)
        for number in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR2):
            self.addCleanup(signal.signal, number, signal.getsignal(number))
        before = signal.getsignal(signal.SIGHUP)
        service.startService()
        self.assertIs(signal.getsignal(signal.SIGHUP), before)
        for hook, args, kwargs in reactor.whenRunningHooks:
            hook(*args, **kwargs)
        self.assertEqual(signal.getsignal(signal.SIGTERM), service._stop)
        self.assertEqual(signal.getsignal(signal.SIGINT), service._stop)
        self.assertEqual(signal.getsignal(signal.SIGHUP), service._hangUp)
        self.assertEqual(signal.getsignal(signal.SIGUSR2), service._replace)

    def test_stopsOnce(self) -> None:
        """A second signal while stopping does not ask the reactor to stop again."""
        reactor = CallRecordingReactor()
        service = ProcessSignals(reactor)
        service._stop(signal.SIGTERM, None)
        service._stop(signal.SIGINT, None)
        self.assertEqual(reactor.fromThread, [reactor.stop])

    def test_hangUpReopens(self) -> None:
        """SIGHUP hands the reopen callable to the reactor thread."""
        reactor = CallRecordingReactor()
        reopen = lambda: None  # noqa: E731
        ProcessSignals(reactor, onHangUp=reopen)._hangUp(signal.SIGHUP, None)
        self.assertEqual(reactor.fromThread, [reopen])

    def test_userSignal2Replaces(self) -> None:
        """SIGUSR2 hands the replacement to the reactor thread; without one (no --workers) it does nothing."""
        reactor = CallRecordingReactor()
        replace = lambda: None  # noqa: E731
        ProcessSignals(reactor, onReplace=replace)._replace(signal.SIGUSR2, None)
        ProcessSignals(reactor)._replace(signal.SIGUSR2, None)
        self.assertEqual(reactor.fromThread, [replace])


class SlowStop(Service):
    """A service whose stop finishes when the test fires C{stopping}."""

    def __init__(self, name: str, log: list[str]) -> None:
        self.name = name
        self.log = log
        self.stopping: Deferred[None] = Deferred()

    def stopService(self) -> Deferred[None]:
        """Note the call; finish later."""
        super().stopService()
        self.log.append(self.name)
        return self.stopping


class SequentialMultiServiceTests(SynchronousTestCase):
    """Children stop last first, each only after the one before it has finished."""

    def stopTwo(self) -> tuple[list[str], SlowStop, SlowStop, Deferred[None]]:
        """Start a parent of two slow children and ask it to stop: (log, first, last, stopped)."""
        log: list[str] = []
        parent = SequentialMultiService()
        first, last = SlowStop("first", log), SlowStop("last", log)
        first.setServiceParent(parent)
        last.setServiceParent(parent)
        parent.startService()
        return log, first, last, parent.stopService()

    def test_oneAtATime(self) -> None:
        """The second-to-last child is not asked to stop while the last one is still stopping."""
        log, first, last, stopped = self.stopTwo()
        self.assertEqual(log, ["last"])
        last.stopping.callback(None)
        self.assertEqual(log, ["last", "first"])
        self.assertNoResult(stopped)
        first.stopping.callback(None)
        self.successResultOf(stopped)

    def test_failureDoesNotBlock(self) -> None:
        """A child whose stop fails does not keep the others from stopping."""
        log, first, last, stopped = self.stopTwo()
        last.stopping.errback(RuntimeError("port would not close"))
        first.stopping.callback(None)
        self.successResultOf(stopped)
        self.assertEqual(log, ["last", "first"])


class FakeConnections:
    """Open connections as the factory reports them."""

    def __init__(self, openCount: int) -> None:
        self.openCount = openCount
        self.idle: Deferred[None] = Deferred()
        self.aborted = False
        self.told = False

    def stopTakingRequests(self) -> None:
        """Remember that the drain asked connections to finish."""
        self.told = True

    def whenIdle(self) -> Deferred[None]:
        """Fires when the test closes them all."""
        return succeed(None) if not self.openCount else self.idle

    def abortAll(self) -> None:
        """Close everything now."""
        self.aborted = True
        self.openCount = 0
        self.idle.callback(None)

    def flushLogs(self, everything: bool = False) -> None:
        """Remember that the drain asked for every summary still waiting."""
        self.flushed = everything


class DrainTests(SynchronousTestCase):
    """Stopping waits for open connections, at most C{grace} seconds."""

    def test_nothingOpen(self) -> None:
        """With no connection open, stopping is immediate."""
        self.successResultOf(Drain(FakeConnections(0), Clock(), grace=6).stopService())

    def test_waitsForConnections(self) -> None:
        """Open connections are waited for; once they finish, the stop completes and no abort is left pending."""
        clock, connections = Clock(), FakeConnections(3)
        stopped = Drain(connections, clock, grace=6).stopService()
        clock.advance(5)
        self.assertNoResult(stopped)
        connections.openCount = 0
        connections.idle.callback(None)
        self.successResultOf(stopped)
        self.assertEqual(clock.getDelayedCalls(), [])
        self.assertFalse(connections.aborted)
        self.assertTrue(connections.flushed, "the summaries still waiting are logged before the stop goes on")

    def test_abortsAfterGrace(self) -> None:
        """Connections still open after the grace period are aborted."""
        clock, connections = Clock(), FakeConnections(2)
        stopped = Drain(connections, clock, grace=6).stopService()
        clock.advance(6)
        self.assertTrue(connections.aborted)
        self.successResultOf(stopped)


class StuckConnections(FakeConnections):
    """Connections that do not report their close even when aborted."""

    def abortAll(self) -> None:
        """Abort, but never become idle."""
        self.aborted = True


class DrainGivesUpTests(SynchronousTestCase):
    """A drain never hangs the stop."""

    def test_givesUpAfterAbort(self) -> None:
        """If aborted connections never report their close, the stop still completes a second later."""
        clock, connections = Clock(), StuckConnections(2)
        stopped = Drain(connections, clock, grace=6).stopService()
        clock.advance(6)
        self.assertTrue(connections.aborted)
        self.assertNoResult(stopped)
        clock.advance(1)
        self.successResultOf(stopped)
        connections.idle.callback(None)  # a late close changes nothing


class QueuedPort:
    """A listening port with C{queued} connections waiting, accepting in batches as Twisted's TCP port does."""

    def __init__(self, queued: int) -> None:
        self.queued = queued
        self.numberAccepts = 1
        self.sessionno = 0
        self.listening = True

    def getHost(self) -> IPv4Address:
        """Where it listens."""
        return IPv4Address("TCP", "127.0.0.1", 5050)

    def doRead(self) -> None:
        """Accept up to C{numberAccepts}; grow the batch when it filled up, shrink it otherwise."""
        accepted = min(self.numberAccepts, self.queued)
        self.queued -= accepted
        self.sessionno += accepted
        self.numberAccepts = self.numberAccepts + 20 if accepted == self.numberAccepts else max(1, accepted)

    def stopListening(self) -> None:
        """Close."""
        self.listening = False


class ReadingPort(QueuedPort):
    """A port the supervisor stops reading from at once."""

    def __init__(self) -> None:
        super().__init__(0)

    def stopReading(self) -> None:
        """Stop accepting."""

    def fileno(self) -> int:
        """Its socket's descriptor."""
        return 3


class FakeEndpoint:
    """An endpoint whose listen gives C{port}, or fails with C{error}."""

    def __init__(self, port: object = None, error: Exception | None = None) -> None:
        self.port, self.error = port, error

    def listen(self, factory: object) -> Deferred:
        """The port, or the error."""
        from twisted.internet.defer import fail

        return fail(self.error) if self.error else succeed(self.port)


class RunningReactor(MemoryReactorClock):
    """A memory reactor that is running: what is asked for when it runs happens at once (on every Twisted; the
    memory reactor of older ones only keeps such calls)."""

    def callWhenRunning(self, callable, *args, **kwargs):  # type: ignore[no-untyped-def]
        """Call now."""
        callable(*args, **kwargs)


def runningReactor() -> MemoryReactorClock:
    """A memory reactor that has started."""
    return RunningReactor()


def listeningEvents(test: SynchronousTestCase) -> list[dict]:
    """The "primecount listening on" events logged from now until C{test} ends."""
    from twisted.logger import globalLogPublisher

    events: list[dict] = []

    def observe(event: dict) -> None:
        if event.get("event") == "primecount listening on":
            events.append(event)

    globalLogPublisher.addObserver(observe)
    test.addCleanup(globalLogPublisher.removeObserver, observe)
    return events


class ListenerTests(SynchronousTestCase):
    """The listener takes in queued connections before it closes, and reports a failure to listen at once."""

    def test_acceptsQueuedBeforeClosing(self) -> None:
        """57 connections waiting in the kernel's queue are all accepted, then the port closes."""
        port = QueuedPort(57)
        listener = Listener(FakeEndpoint(port), None, runningReactor())
        listener.privilegedStartService()
        listener.startService()
        self.successResultOf(listener.stopService())
        self.assertEqual((port.queued, port.sessionno, port.listening), (0, 57, False))

    def test_listenFailureRaises(self) -> None:
        """A port that cannot be bound (or a UNIX socket's path) stops the start with one line naming it and its
        option, before the service runs."""
        from twisted.internet.error import CannotListenError

        listener = Listener(FakeEndpoint(error=CannotListenError("", 5050, OSError("in use"))), None,
                            runningReactor())
        stopped = self.assertRaises(StartFailed, listener.privilegedStartService)
        self.assertEqual(str(stopped), "primecount: --port: Couldn't listen on any:5050: in use.")
        metrics = Listener(FakeEndpoint(error=CannotListenError("127.0.0.1", 9100, OSError("in use"))), None,
                           runningReactor(), option="metrics", announce=False)
        stopped = self.assertRaises(StartFailed, metrics.privilegedStartService)
        self.assertEqual(str(stopped), "primecount: --metrics: Couldn't listen on 127.0.0.1:9100: in use.")
        unix = Listener(FakeEndpoint(error=FileNotFoundError(2, "No such file or directory", "/gone/pc.sock.lock")),
                        None, runningReactor())
        stopped = self.assertRaises(StartFailed, unix.privilegedStartService)
        self.assertEqual(str(stopped), "primecount: --port: cannot listen: No such file or directory: "
                                       "/gone/pc.sock.lock")

    def test_saysItListensOnlyOnceStarted(self) -> None:
        """Bound before privileges drop, the listener says it listens only when started, after the services
        before it: a records file the service user cannot open stops the start before any listening line."""
        listening = listeningEvents(self)

        class FailingRecords(Service):
            """A records service whose file the service user cannot open."""

            def startService(self) -> None:
                """Stop the start as the records service does."""
                raise SystemExit("primecount: cannot open records file r: Permission denied")

        top = SequentialMultiService()
        FailingRecords().setServiceParent(top)
        Listener(FakeEndpoint(QueuedPort(0)), None, runningReactor()).setServiceParent(top)
        top.privilegedStartService()
        self.assertRaises(SystemExit, top.startService)
        self.assertEqual(listening, [])

    def test_saysItListensOnce(self) -> None:
        """Started with or without a privileged start, the listener says it listens exactly once."""
        for privileged in (True, False):
            listening = listeningEvents(self)
            listener = Listener(FakeEndpoint(QueuedPort(0)), None, runningReactor())
            if privileged:
                listener.privilegedStartService()
                self.assertEqual(listening, [])
            listener.startService()
            self.assertEqual(len(listening), 1, privileged)

    def test_saysItListensOnlyOnceSignalsAreHandled(self) -> None:
        """Started before the reactor runs (as under twistd), the listener says it listens only once the reactor
        runs, after the signal handlers are in: SIGTERM sent on seeing the line drains instead of killing."""
        self.assertAnnouncedAfterHandlers(lambda reactor: Listener(FakeEndpoint(QueuedPort(0)), None, reactor))

    def test_supervisorSaysItListensOnlyOnceSignalsAreHandled(self) -> None:
        """The supervisor's shared socket, bound in the privileged start (before any service has started), also
        says it listens only after the signal handlers are in."""
        from primecount.workers import SharedSocket

        self.assertAnnouncedAfterHandlers(lambda reactor: SharedSocket(FakeEndpoint(ReadingPort()), reactor))

    def assertAnnouncedAfterHandlers(self, listening: Callable[[CallRecordingReactor], Service]) -> None:
        """The service C{listening} makes, started after L{ProcessSignals} as under twistd, logs its listening
        line only once the reactor runs, and by then SIGTERM is handled."""
        reactor = CallRecordingReactor()
        for number in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR2):
            self.addCleanup(signal.signal, number, signal.getsignal(number))
        announced = listeningEvents(self)
        handlersWhenAnnounced: list[object] = []
        top = SequentialMultiService()
        signals = ProcessSignals(reactor)
        signals.setServiceParent(top)
        listening(reactor).setServiceParent(top)
        top.privilegedStartService()
        top.startService()
        self.assertEqual(announced, [])
        for hook, args, kwargs in reactor.whenRunningHooks:
            hook(*args, **kwargs)
            if announced and not handlersWhenAnnounced:
                handlersWhenAnnounced.append(signal.getsignal(signal.SIGTERM))
        self.assertEqual(len(announced), 1)
        self.assertEqual(handlersWhenAnnounced, [signals._stop])

"""Tests for L{primecount.lifecycle}: signals stop the reactor for a clean exit."""

from __future__ import annotations

import signal

from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from primecount.lifecycle import ExitCleanlyOnSignals


class StopRecordingReactor(MemoryReactorClock):
    """A memory reactor that records C{callFromThread} calls instead of running them."""

    def __init__(self) -> None:
        super().__init__()
        self.fromThread: list[object] = []

    def callFromThread(self, callable, *args, **kwargs):  # type: ignore[no-untyped-def]
        """Record the call."""
        self.fromThread.append(callable)


class ExitCleanlyOnSignalsTests(SynchronousTestCase):
    """The handlers are installed once the reactor runs and stop it exactly once."""

    def test_installedWhenRunning(self) -> None:
        """Starting the service installs nothing until the reactor runs, then handles the signals."""
        reactor = StopRecordingReactor()
        service = ExitCleanlyOnSignals(reactor, signals=[signal.SIGUSR2])
        previous = signal.getsignal(signal.SIGUSR2)
        self.addCleanup(signal.signal, signal.SIGUSR2, previous)
        service.startService()
        self.assertIs(signal.getsignal(signal.SIGUSR2), previous)
        for hook, args, kwargs in reactor.whenRunningHooks:
            hook(*args, **kwargs)
        self.assertEqual(signal.getsignal(signal.SIGUSR2), service._received)

    def test_stopsOnce(self) -> None:
        """A second signal while stopping does not ask the reactor to stop again."""
        reactor = StopRecordingReactor()
        service = ExitCleanlyOnSignals(reactor)
        service._received(signal.SIGTERM, None)
        service._received(signal.SIGINT, None)
        self.assertEqual(reactor.fromThread, [reactor.stop])

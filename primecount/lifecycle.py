"""Process life cycle: SIGTERM and SIGINT stop the service cleanly and the process exits with status 0.

twistd on its own re-raises the terminating signal after shutdown, so the
process dies "killed by SIGTERM"; an orderly, complete shutdown is a success
and is reported as one.
"""

from __future__ import annotations

import signal
from types import FrameType
from typing import Any, Optional, Sequence

from twisted.application.service import Service
from twisted.logger import Logger


class ExitCleanlyOnSignals(Service):
    """Once the reactor runs, handles SIGTERM and SIGINT by stopping the reactor, which stops every service."""

    log = Logger()

    def __init__(self, reactor: Any, signals: Sequence[int] = (signal.SIGTERM, signal.SIGINT)) -> None:
        self._reactor = reactor
        self._signals = tuple(signals)
        self._stopping = False

    def startService(self) -> None:
        """Install the handlers when the reactor is running, after its own have been installed."""
        super().startService()
        self._reactor.callWhenRunning(self._install)

    def _install(self) -> None:
        for number in self._signals:
            signal.signal(number, self._received)

    def _received(self, number: int, frame: Optional[FrameType]) -> None:
        if self._stopping:
            return
        self._stopping = True
        self.log.info("received {signal}, shutting down", signal=signal.Signals(number).name)
        self._reactor.callFromThread(self._reactor.stop)

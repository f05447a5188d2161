"""Readiness for systemd's C{Type=notify}: C{READY=1} once the service accepts, C{STOPPING=1} when it drains,
and C{WATCHDOG=1} while the reactor turns when the unit has C{WatchdogSec=}, sent to C{NOTIFY_SOCKET} when that
is set (C{sd_notify})."""

from __future__ import annotations

import os
import socket
from typing import Any, Mapping, Optional

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall
from twisted.logger import Logger


def notify(message: str, environ: Mapping[str, str] = os.environ) -> bool:
    """Send C{message} (e.g. C{"READY=1"}) to C{NOTIFY_SOCKET}; say whether there was one to send to."""
    path = environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    address = "\0" + path[1:] if path.startswith("@") else path  # "@" names an abstract socket
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as channel:
        channel.connect(address)
        channel.sendall(message.encode("utf-8"))
    return True


def watchdogInterval(environ: Mapping[str, str] = os.environ, pid: Optional[int] = None) -> Optional[float]:
    """Seconds between C{WATCHDOG=1} pings: half the C{WATCHDOG_USEC} systemd sets for a unit with
    C{WatchdogSec=}, as sd_watchdog_enabled(3) advises; C{None} without one, or when C{WATCHDOG_PID} names
    another process."""
    usec, owner = environ.get("WATCHDOG_USEC", ""), environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0 or (owner and owner != str(pid if pid is not None else os.getpid())):
        return None
    return int(usec) / 2e6


class Readiness(Service):
    """The last service of the tree: says C{READY=1} once C{ready} fires (with C{--workers}: every worker listens)
    or, without it, once the reactor runs; stops first, saying C{STOPPING=1}. With systemd's watchdog, pings
    C{WATCHDOG=1} from the reactor thread at half its interval, from the reactor's start to the process's
    end: a reactor that stops turning stops the pings, and systemd restarts the service."""

    log = Logger()

    def __init__(self, reactor: Any, ready: Optional[Deferred[None]] = None,
                 environ: Mapping[str, str] = os.environ) -> None:
        self._reactor = reactor
        self._ready = ready
        self._environ = environ
        self.watchdog: Optional[LoopingCall] = None

    def startService(self) -> None:
        """Announce readiness once the reactor runs and, if given, C{ready} has fired; ping the watchdog."""
        super().startService()
        self._reactor.callWhenRunning(self._whenReady)
        interval = watchdogInterval(self._environ)
        if interval is not None and self._environ.get("NOTIFY_SOCKET"):
            self.watchdog = LoopingCall(self._ping)
            self.watchdog.clock = self._reactor
            self._reactor.callWhenRunning(self.watchdog.start, interval, now=True)
            self.log.info("pinging systemd's watchdog every {interval:g} s", interval=interval)

    def _ping(self) -> None:
        try:
            notify("WATCHDOG=1", self._environ)
        except OSError as error:  # systemd away for a moment: the next ping may reach it
            self.log.warn("cannot ping systemd's watchdog: {error}", error=error)

    def _whenReady(self) -> None:
        if self._ready is None:
            self._announce()
        else:
            self._ready.addCallback(lambda _: self._announce())

    def _announce(self) -> None:
        if self.running and notify("READY=1\nSTATUS=accepting requests", self._environ):
            self.log.info("told systemd the service is ready")

    def stopService(self) -> None:
        """Say that the service is draining (the listeners close next)."""
        super().stopService()
        notify("STOPPING=1\nSTATUS=draining", self._environ)

"""Readiness for systemd's C{Type=notify}: C{READY=1} once the service accepts, C{STOPPING=1} when it drains,
sent to C{NOTIFY_SOCKET} when that is set (C{sd_notify})."""

from __future__ import annotations

import os
import socket
from typing import Any, Mapping, Optional

from twisted.application.service import Service
from twisted.internet.defer import Deferred
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


class Readiness(Service):
    """The last service of the tree: says C{READY=1} once C{ready} fires (with C{--workers}: every worker listens)
    or, without it, once the reactor runs; stops first, saying C{STOPPING=1}."""

    log = Logger()

    def __init__(self, reactor: Any, ready: Optional[Deferred[None]] = None,
                 environ: Mapping[str, str] = os.environ) -> None:
        self._reactor = reactor
        self._ready = ready
        self._environ = environ

    def startService(self) -> None:
        """Announce readiness once the reactor runs and, if given, C{ready} has fired."""
        super().startService()
        self._reactor.callWhenRunning(self._whenReady)

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

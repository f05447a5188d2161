"""The twistd plugin's options and service: C{twistd -n primecount --port 5050}."""

from __future__ import annotations

import math
import os
from functools import partial
from typing import Any, Callable, Optional

from twisted.application import strports
from twisted.application.service import IService, MultiService
from twisted.internet.endpoints import serverFromString
from twisted.internet.testing import MemoryReactor
from twisted.internet.threads import deferToThreadPool
from twisted.python import usage

from primecount.lifecycle import ExitCleanlyOnSignals
from primecount.protocol import PrimeCountFactory, RequestLimits
from primecount.responder import Responder
from primecount.storage import RecordsService, openRecordsFile

DEFAULTS = RequestLimits()
# Twisted listens with a backlog of 50; a burst of new clients beyond that waits
# a full second for the SYN retry. Load tests open hundreds of connections at once.
BARE_PORT_BACKLOG = 1024


def endpointDescription(value: str) -> str:
    """Turn a bare port number into C{tcp:N:backlog=1024}; pass any endpoint description through unchanged."""
    if value.isdigit():
        if int(value) > 65535:
            raise usage.UsageError(f"--port: {value} is not a TCP port number (0-65535)")
        return f"tcp:{value}:backlog={BARE_PORT_BACKLOG}"
    return value


def _number(option: str, kind: Callable[[str], Any], minimum: float, strict: bool) -> Callable[[str], Any]:
    """A coercer for C{--option} that names the option in its L{usage.UsageError}."""
    noun = "a whole number" if kind is int else "a number"
    bound = f"greater than {minimum}" if strict else f"at least {minimum}"

    def coerce(value: str) -> Any:
        try:
            number = kind(value)
        except ValueError:
            number = None
        if number is None or not math.isfinite(number) or (number <= minimum if strict else number < minimum):
            raise usage.UsageError(f"--{option}: must be {noun} {bound}, not {value!r}")
        return number

    coerce.coerceDoc = f"Must be {bound}."  # type: ignore[attr-defined]
    return coerce


class Options(usage.Options):
    """Command-line options of C{twistd primecount}; every bad value is a UsageError naming its option."""

    synopsis = "[options]"
    longdesc = (
        "Serve the primecount protocol: a client sends one line, the server replies "
        "'<count> sí' or '<count> no' (is the count of the line's last character prime?), "
        "appends a record and closes the connection."
    )
    optFlags = [
        ["log-requests", None, "Log every connection and reply, not only errors (costly under load)."],
    ]
    optParameters = [
        ["port", "p", endpointDescription("5050"), "Endpoint to listen on: a port number N (all IPv4 interfaces, "
         "tcp:N:backlog=1024) or an endpoint description (tcp:5050:interface=127.0.0.1, "
         "tcp6:5050, systemd:domain=INET:index=0, ssl:...).",
         endpointDescription],
        ["threads", "t", 10, "Size of the thread pool that runs the analysis.",
         _number("threads", int, 1, strict=False)],
        ["timeout", None, DEFAULTS.timeout, "Seconds from connect until the request must have ended.",
         _number("timeout", float, 0, strict=True)],
        ["quiet", None, DEFAULTS.quiet, "Seconds of silence after some bytes that end a request "
         "sent without a newline (0 disables).", _number("quiet", float, 0, strict=False)],
        ["max-line", None, DEFAULTS.maxLine, "Longest request accepted, in bytes.",
         _number("max-line", int, 1, strict=False)],
        ["records", "r", "server_log.txt", "File the records are appended to."],
    ]

    def postOptions(self) -> None:
        """Check what needs the options together: the endpoint parses, the records file can be opened."""
        try:
            serverFromString(MemoryReactor(), self["port"])
        except IndexError:
            raise usage.UsageError(
                f"--port: {self['port']!r} names an inherited socket this process was not given "
                "(start it with systemd socket activation)"
            ) from None
        except (ValueError, TypeError, KeyError, OSError) as error:
            raise usage.UsageError(f"--port: cannot use {self['port']!r}: {error}") from None
        try:
            os.close(openRecordsFile(self["records"]))
        except OSError as error:
            raise usage.UsageError(
                f"--records: cannot append to {self['records']!r}: {error.strerror}"
            ) from None


def makeService(options: Options, reactor: Optional[Any] = None) -> IService:
    """Build the service tree: the records service first (it starts before and stops after the listener)."""
    if reactor is None:
        from twisted.internet import reactor as globalReactor

        reactor = globalReactor
    top = MultiService()
    ExitCleanlyOnSignals(reactor).setServiceParent(top)
    records = RecordsService(options["records"], clock=reactor)
    records.setServiceParent(top)
    reactor.suggestThreadPoolSize(options["threads"])
    runInThread = partial(deferToThreadPool, reactor, reactor.getThreadPool())
    responder = Responder(reactor, runInThread, records)
    limits = RequestLimits(
        options["timeout"], options["quiet"], options["max-line"], bool(options["log-requests"])
    )
    factory = PrimeCountFactory(limits, reactor, responder)
    strports.service(options["port"], factory, reactor=reactor).setServiceParent(top)
    return top

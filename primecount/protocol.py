"""The thin network side: gathers one request's bytes until newline, EOF, a quiet gap or the deadline, then replies."""

from __future__ import annotations

from typing import NamedTuple, Optional

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IAddress, IDelayedCall, IHalfCloseableProtocol, IReactorTime
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols.basic import LineReceiver
from twisted.protocols.policies import TimeoutMixin
from zope.interface import implementer

from primecount import wire
from primecount.metrics import NoMetrics
from primecount.responder import Responder


class RequestLimits(NamedTuple):
    """How a request may arrive (deadline from connect, quiet gap that ends it or 0, maximum line bytes), and
    whether each connection and reply is logged, not only errors."""

    timeout: float = 5.0
    quiet: float = 0.2
    maxLine: int = 65536
    logRequests: bool = False


def peerHost(address: IAddress) -> str:
    """The client address as written in records and logs: the IP for TCP peers."""
    return getattr(address, "host", None) or str(address)


@implementer(IHalfCloseableProtocol)
class PrimeCountProtocol(LineReceiver, TimeoutMixin):
    """One connection, one request: collects bytes, hands the message to the responder, writes the reply, closes.

    The deadline (L{TimeoutMixin}) runs from connect and is never reset by
    incoming bytes, so a trickling client cannot hold the connection longer.
    """

    delimiter = b"\n"
    log = Logger()

    def __init__(self, limits: RequestLimits, clock: IReactorTime, responder: Responder) -> None:
        self.MAX_LENGTH = limits.maxLine
        self._limits = limits
        self._clock = clock
        self._responder = responder
        self._collecting = False
        self._buffered = 0
        self._chunks: list[bytes] = []
        self._quietCall: Optional[IDelayedCall] = None
        self._peer = "-"
        self._connectedAt = 0.0

    def callLater(self, period: float, func) -> IDelayedCall:  # type: ignore[no-untyped-def]
        """Schedule on the injected clock (used by L{TimeoutMixin})."""
        return self._clock.callLater(period, func)

    def connectionMade(self) -> None:
        """Start the request deadline."""
        self._peer = peerHost(self.transport.getPeer())
        self._connectedAt = self._clock.seconds()
        self.factory.connectionOpened(self)
        self._collecting = True
        self.setTimeout(self._limits.timeout)
        if self._limits.logRequests:
            self.log.info("connection from {peer}", peer=self._peer)

    def dataReceived(self, data: bytes) -> None:
        """Check the line limit before buffering; hand L{LineReceiver} the whole line once a newline is in."""
        if not self._collecting:
            return  # past the request; keep reading so closing does not reset the connection
        newline = data.find(b"\n")
        lineLength = self._buffered + (len(data) if newline < 0 else newline)
        if lineLength > self.MAX_LENGTH:
            self.clearLineBuffer()
            self._reject(wire.lineTooLong(self.MAX_LENGTH))
            return
        if newline < 0:
            # LineReceiver would copy and rescan its whole buffer for every chunk, which is
            # quadratic for a client sending a long line a few bytes at a time; keep the
            # chunks until the newline arrives instead.
            self._chunks.append(data)
            self._buffered = lineLength
            if self._limits.quiet:
                self._restartQuietGap()
            return
        if self._chunks:
            data = self.clearLineBuffer() + data
        super().dataReceived(data)

    def clearLineBuffer(self) -> bytes:
        """Take every byte held for the current line, clearing the buffer."""
        held = b"".join(self._chunks) + super().clearLineBuffer()
        self._chunks = []
        self._buffered = 0
        return held

    @property
    def bufferedBytes(self) -> int:
        """How many bytes of the current line are held."""
        return self._buffered

    def lineReceived(self, line: bytes) -> None:
        """A newline ended the request; a CR right before it is dropped."""
        self._messageEnded(line[:-1] if line.endswith(b"\r") else line)

    def rawDataReceived(self, data: bytes) -> None:
        """Bytes after the request are read and discarded."""

    def readConnectionLost(self) -> None:
        """The client half-closed: whatever it sent is the request."""
        if self._collecting:
            self._messageEnded(self.clearLineBuffer())

    def writeConnectionLost(self) -> None:
        """Our side finished writing; nothing more to do until the connection is gone."""

    def timeoutConnection(self) -> None:
        """The deadline passed before the request ended."""
        if self._collecting:
            self.clearLineBuffer()
            self._reject(wire.TIMEOUT)

    def connectionLost(self, reason=None) -> None:  # type: ignore[no-untyped-def]
        """Cancel timers; a reply still being prepared will find the transport closed."""
        self._stopCollecting()
        self.factory.connectionClosed(self)

    def _restartQuietGap(self) -> None:
        if self._quietCall is not None and self._quietCall.active():
            self._quietCall.reset(self._limits.quiet)
        else:
            self._quietCall = self._clock.callLater(self._limits.quiet, self._quietGapPassed)

    def _quietGapPassed(self) -> None:
        self._quietCall = None
        if self._collecting:
            self._messageEnded(self.clearLineBuffer())

    def _stopCollecting(self) -> None:
        self._collecting = False
        self.setRawMode()
        self.setTimeout(None)
        if self._quietCall is not None:
            if self._quietCall.active():
                self._quietCall.cancel()
            self._quietCall = None

    def _messageEnded(self, raw: bytes) -> None:
        self._stopCollecting()
        reply: Deferred[bytes] = self._responder.respond(raw, self._peer)
        reply.addCallback(self._sendAndClose)

    def _reject(self, reason: str) -> None:
        self._stopCollecting()
        self._sendAndClose(wire.errorLine(reason))

    def _sendAndClose(self, reply: bytes) -> None:
        if reply.startswith(b"ERROR "):
            self.log.info(
                "{reply} to {peer}", reply=reply.rstrip(b"\n").decode("utf-8"), peer=self._peer
            )
        elif self._limits.logRequests:
            self.log.info(
                "reply {reply} to {peer}", reply=reply.rstrip(b"\n").decode("utf-8"), peer=self._peer
            )
        self.factory.metrics.requestFinished(wire.outcomeLabel(reply), self._clock.seconds() - self._connectedAt)
        self.transport.write(reply)
        self.transport.loseConnection()


class PrimeCountFactory(Factory):
    """Builds one L{PrimeCountProtocol} per connection and keeps track of the open ones, for draining and metrics."""

    noisy = False

    def __init__(
        self, limits: RequestLimits, clock: IReactorTime, responder: Responder, metrics: NoMetrics = NoMetrics()
    ) -> None:
        self.limits = limits
        self.clock = clock
        self.responder = responder
        self.metrics = metrics
        self._open: set[PrimeCountProtocol] = set()
        self._idleWaiters: list[Deferred[None]] = []

    def buildProtocol(self, addr: IAddress) -> PrimeCountProtocol:
        """A protocol for the connection from C{addr}."""
        protocol = PrimeCountProtocol(self.limits, self.clock, self.responder)
        protocol.factory = self
        return protocol

    def connectionOpened(self, protocol: PrimeCountProtocol) -> None:
        """Count C{protocol} as open."""
        self._open.add(protocol)
        self.metrics.connectionOpened()

    def connectionClosed(self, protocol: PrimeCountProtocol) -> None:
        """C{protocol}'s connection is gone; wake those waiting for none to be open."""
        if protocol in self._open:
            self._open.discard(protocol)
            self.metrics.connectionClosed()
        if not self._open:
            waiters, self._idleWaiters = self._idleWaiters, []
            for waiter in waiters:
                waiter.callback(None)

    @property
    def openCount(self) -> int:
        """How many connections are open now."""
        return len(self._open)

    def whenIdle(self) -> Deferred[None]:
        """Fires once no connection is open (at once if none is)."""
        if not self._open:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._idleWaiters.append(waiter)
        return waiter

    def abortAll(self) -> None:
        """Close every open connection at once, without waiting for replies."""
        for protocol in list(self._open):
            protocol.transport.abortConnection()

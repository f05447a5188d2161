"""The thin network side: gathers one request's bytes until newline, EOF, a quiet gap or the deadline, then replies."""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IAddress, IDelayedCall, IHalfCloseableProtocol, IReactorTime, ITransport
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.protocols.basic import LineReceiver
from twisted.protocols.policies import TimeoutMixin
from zope.interface import implementer

from primecount import wire
from primecount.limits import ConnectionLimits, peerKey
from primecount.metrics import NoMetrics
from primecount.responder import Responder


class RequestLimits(NamedTuple):
    """How a request may arrive (deadline from connect, quiet gap that ends it or 0, maximum line bytes), and
    whether each connection and reply is logged, not only errors."""

    timeout: float = 5.0
    quiet: float = 0.2
    maxLine: int = 65536
    logRequests: bool = False
    linger: float = 2.0


# Input read and thrown away after an ERROR reply, at most, before closing regardless.
LINGER_MAX_BYTES = 1 << 20
# Busy connections linger too, but only this many at once: past it a flood is closed outright.
BUSY_LINGER_MAX = 1024


def peerHost(address: IAddress) -> str:
    """The client address as written in records and logs: the IP for TCP peers."""
    return getattr(address, "host", None) or str(address)


class LingeringClose:
    """Closes after an ERROR reply without losing it: half-close, read and discard, then close.

    Closing a socket that still has unread input makes the kernel send a reset,
    and a reset can make the client's kernel throw away the reply it has not read
    yet. So, as nginx's lingering close does, the server sends FIN after the reply,
    keeps reading (and discarding) until the client closes, C{seconds} pass or
    C{maxBytes} arrive, and only then closes.
    """

    def __init__(self, transport: ITransport, clock: IReactorTime, seconds: float, maxBytes: int = LINGER_MAX_BYTES) -> None:
        self._transport = transport
        self._clock = clock
        self._seconds = seconds
        self._maxBytes = maxBytes
        self._discarded = 0
        self._call: Optional[IDelayedCall] = None

    def start(self, readClosed: bool) -> None:
        """Begin lingering; a client that has already closed its side is simply closed."""
        halfClose = getattr(self._transport, "loseWriteConnection", None)
        if readClosed or halfClose is None or self._seconds <= 0:
            self._transport.loseConnection()
            return
        halfClose()
        self._call = self._clock.callLater(self._seconds, self.finish)

    def discard(self, data: bytes) -> None:
        """Input that arrives while lingering is dropped, up to the byte bound."""
        self._discarded += len(data)
        if self._discarded > self._maxBytes:
            self.finish()

    def finish(self) -> None:
        """Stop lingering and close."""
        self.cancel()
        self._transport.loseConnection()

    def cancel(self) -> None:
        """Forget the timer (the connection is gone)."""
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None


@implementer(IHalfCloseableProtocol)
class BusyProtocol(Protocol):
    """What a connection over a limit gets: C{ERROR busy}, no reading of its request, a lingering close."""

    def __init__(self, clock: IReactorTime, linger: float, onClosed: Callable[[], None]) -> None:
        self._clock = clock
        self._linger = linger
        self._onClosed = onClosed
        self._closing: Optional[LingeringClose] = None

    def connectionMade(self) -> None:
        """Refuse at once."""
        self.transport.write(wire.errorLine(wire.BUSY))
        self._closing = LingeringClose(self.transport, self._clock, self._linger)
        self._closing.start(readClosed=False)

    def dataReceived(self, data: bytes) -> None:
        """The request is not read, only discarded."""
        if self._closing is not None:
            self._closing.discard(data)

    def readConnectionLost(self) -> None:
        """The client is done: close."""
        if self._closing is not None:
            self._closing.finish()

    def writeConnectionLost(self) -> None:
        """Our FIN went out; wait for the client."""

    def connectionLost(self, reason: object = None) -> None:
        """Forget the linger timer and tell the factory."""
        if self._closing is not None:
            self._closing.cancel()
        self._onClosed()


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
        self._readClosed = False
        self._lingering: Optional[LingeringClose] = None

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
        if self._lingering is not None:
            self._lingering.discard(data)
            return
        if not self._collecting or not data:
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
        """The client half-closed: whatever it sent is the request (or, after an ERROR, it is done)."""
        self._readClosed = True
        if self._lingering is not None:
            self._lingering.finish()
        elif self._collecting:
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
        if self._lingering is not None:
            self._lingering.cancel()
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
        isError = reply.startswith(b"ERROR ")
        if isError or self._limits.logRequests:
            self.log.info("{kind}{reply} to {peer}", kind="" if isError else "reply ",
                          reply=reply.rstrip(b"\n").decode("utf-8"), peer=self._peer)
        self.factory.metrics.requestFinished(wire.outcomeLabel(reply), self._clock.seconds() - self._connectedAt)
        self.transport.write(reply)
        if isError:
            # The client may still be sending (a long line, a trickle): make sure it reads the reply.
            self._lingering = LingeringClose(self.transport, self._clock, self._limits.linger)
            self._lingering.start(self._readClosed)
        else:
            self.transport.loseConnection()


class PrimeCountFactory(Factory):
    """Builds one L{PrimeCountProtocol} per connection within the connection limits, and keeps track of the
    open ones, for draining and metrics."""

    noisy = False
    log = Logger()

    def __init__(
        self,
        limits: RequestLimits,
        clock: IReactorTime,
        responder: Responder,
        metrics: NoMetrics = NoMetrics(),
        connectionLimits: Optional[ConnectionLimits] = None,
    ) -> None:
        self.limits = limits
        self.clock = clock
        self.responder = responder
        self.metrics = metrics
        self.connectionLimits = connectionLimits or ConnectionLimits(maxTotal=1 << 30, maxPerPeer=0)
        self._open: dict[PrimeCountProtocol, str] = {}
        self._idleWaiters: list[Deferred[None]] = []
        self.busyLingering = 0
        self._lastBusyLog = float("-inf")
        self._refusedSinceLog = 0

    def buildProtocol(self, addr: IAddress) -> Protocol:
        """A protocol for the connection from C{addr}, or a L{BusyProtocol} if it is over a limit."""
        key = peerKey(peerHost(addr))
        if not self.connectionLimits.acquire(key):
            return self._busy(key)
        protocol = PrimeCountProtocol(self.limits, self.clock, self.responder)
        protocol.factory = self
        protocol.limitKey = key
        return protocol

    def _busy(self, key: str) -> Protocol:
        self.metrics.requestFinished("busy", 0.0)
        lingering = self.busyLingering < BUSY_LINGER_MAX
        if lingering:
            self.busyLingering += 1
        self._refusedSinceLog += 1
        now = self.clock.seconds()
        if now - self._lastBusyLog >= 1.0:  # at most one line a second, however hard the flood
            self.log.warn(
                "answered ERROR busy to {refused} connections (last from {peer}); {total} open, "
                "limits {maxTotal} in all and {maxPerPeer} per address",
                refused=self._refusedSinceLog, peer=key, total=self.connectionLimits.total,
                maxTotal=self.connectionLimits.maxTotal, maxPerPeer=self.connectionLimits.maxPerPeer or "no",
            )
            self._lastBusyLog, self._refusedSinceLog = now, 0

        def closed() -> None:
            if lingering:
                self.busyLingering -= 1

        return BusyProtocol(self.clock, self.limits.linger if lingering else 0.0, closed)

    def connectionOpened(self, protocol: PrimeCountProtocol) -> None:
        """Count C{protocol} as open."""
        self._open[protocol] = protocol.limitKey
        self.metrics.connectionOpened()

    def connectionClosed(self, protocol: PrimeCountProtocol) -> None:
        """C{protocol}'s connection is gone; wake those waiting for none to be open."""
        if protocol in self._open:
            self.connectionLimits.release(self._open.pop(protocol))
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

"""The thin network side: gathers one request's bytes until newline, EOF, a quiet gap or the deadline, then replies."""

from __future__ import annotations

import fcntl
import struct
import termios
from collections import deque
from typing import Callable, NamedTuple, Optional

from twisted.internet import abstract, tcp
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import (
    IAddress, IDelayedCall, IHalfCloseableProtocol, IPushProducer, IReactorTime, ITransport,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.protocols.basic import LineReceiver
from twisted.protocols.policies import TimeoutMixin
from zope.interface import implementer

from primecount import wire
from primecount.limits import ConnectionLimits, Throttle, canonicalHost
from primecount.metrics import NoMetrics
from primecount.responder import Responder
from primecount.sending import SendProgress


class RequestLimits(NamedTuple):
    """How requests may arrive (deadline from their first byte, quiet gap that ends one or 0, maximum line
    bytes), whether each connection and reply is logged, and whether a connection carries more than one request
    (how many unanswered at most, how long it may wait idle for the next)."""

    timeout: float = 5.0
    quiet: float = 0.2
    maxLine: int = 65536
    logRequests: bool = False
    linger: float = 2.0
    keepAlive: bool = False
    pipeline: int = 64
    idleTimeout: float = 30.0
    sendTimeout: float = 10.0


# Input read and thrown away after an ERROR reply, at most, before closing regardless.
LINGER_MAX_BYTES = 1 << 20
# Busy connections linger too, but only this many at once: past it a flood is closed outright.
BUSY_LINGER_MAX = 1024


def peerHost(address: IAddress) -> str:
    """The client address as written in records, logs and limits: the IP of a TCP peer, in its one canonical
    form (L{canonicalHost})."""
    host = getattr(address, "host", None)
    return canonicalHost(host) if host else str(address)


def queuedBytes(transport: ITransport) -> int:
    """How many bytes written to C{transport} its client has not taken yet: still in the process, or in the
    kernel's send queue unacknowledged (0 for transports it cannot see into).

    Twisted has no public way to ask. This reads, on the way down through any
    wrapping layers (the PROXY-header reader, TLS), a TLS layer's cleartext
    waiting for its handshake (C{_appSendBuffer}), the TCP connection's write
    buffers (C{dataBuffer} from C{offset}, and C{_tempDataLen} more), and the
    socket's send queue (C{SIOCOUTQ}, Linux); C{tests/test_sending.py} fails if
    those move. The kernel's part matters: a client that never reads leaves
    megabytes of replies in the server's socket buffer before any stay in
    Twisted's.
    """
    queued, layer = 0, transport
    while layer is not None:
        if isinstance(layer, abstract.FileDescriptor):
            return queued + len(layer.dataBuffer) - layer.offset + layer._tempDataLen + _kernelQueued(layer)
        queued += sum(map(len, getattr(layer, "_appSendBuffer", ())))
        layer = getattr(layer, "transport", None)
    return queued


def _kernelQueued(descriptor: abstract.FileDescriptor) -> int:
    """Bytes in a socket's send queue that its peer has not acknowledged (0 where that cannot be asked)."""
    try:
        return struct.unpack("i", fcntl.ioctl(descriptor.fileno(), termios.TIOCOUTQ, b"\0\0\0\0"))[0]
    except (OSError, ValueError, AttributeError):
        return 0


def sendNow(transport: ITransport, data: bytes) -> None:
    """Write C{data} to C{transport}, sending it in this call when nothing is queued before it.

    C{transport.write} only queues: the bytes go out on the reactor's next
    turn, after registering for writability and being told of it, two
    C{epoll_ctl} calls and a poll per reply. For a TCP connection with an
    empty write buffer this sends at once with the transport's own
    C{writeSomeData}; anything the kernel does not take, and every other
    transport (TLS, tests), goes through C{write} as usual, so the buffer
    limits and producer pausing still apply.
    """
    if (
        isinstance(transport, tcp.Connection)
        and not transport.dataBuffer
        and not transport._tempDataBuffer
        and transport.connected
        and not transport.disconnecting
        and not transport._writeDisconnecting
    ):
        sent = transport.writeSomeData(data)
        if isinstance(sent, int) and sent >= 0:
            data = data[sent:]
        if not data:
            return
    transport.write(data)


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

    def __init__(self, clock: IReactorTime, linger: float, onClosed: Callable[[], None],
                 wrote: Callable[[Protocol, int], None] = lambda protocol, size: None) -> None:
        self._clock = clock
        self._linger = linger
        self._onClosed = onClosed
        self._wrote = wrote
        self._closing: Optional[LingeringClose] = None

    def connectionMade(self) -> None:
        """Refuse at once."""
        refusal = wire.errorLine(wire.BUSY)
        self.transport.write(refusal)
        self._wrote(self, len(refusal))
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


class _Pending:
    """One request of a connection, from its end until its reply is written: when it began, and its reply once known."""

    __slots__ = ("startedAt", "reply")

    def __init__(self, startedAt: float, reply: Optional[wire.Reply] = None) -> None:
        self.startedAt = startedAt
        self.reply = reply


@implementer(IHalfCloseableProtocol, IPushProducer)
class PrimeCountProtocol(LineReceiver, TimeoutMixin):
    """One connection: reads requests, hands each to the responder, writes the replies in request order.

    One-shot (the default): the first request is the only one, and the
    connection closes after its reply. Keep-alive: any number of requests,
    at most C{pipeline} of them unanswered; past that, and while the
    transport's write buffer is full, the connection is not read. A request
    ends at a newline, a quiet gap or the client's half-close; C{timeout}
    bounds it from its first byte (the first one from connect) and trickled
    bytes never extend it; C{idleTimeout} closes a kept connection that
    waits too long for its next request.
    """

    delimiter = b"\n"
    log = Logger()

    def __init__(self, limits: RequestLimits, clock: IReactorTime, responder: Responder) -> None:
        self._maxLine = limits.maxLine
        self.MAX_LENGTH = limits.maxLine + 1  # room for the CR of a CRLF ending, which does not count
        self._limits = limits
        self._clock = clock
        self._responder = responder
        self._unanswered: deque[_Pending] = deque()
        self._chunks: list[bytes] = []  # the partial line, unjoined until its newline (joining per chunk is quadratic)
        self._buffered = 0
        self._quietCall: Optional[IDelayedCall] = None
        self._startedAt: Optional[float] = None  # when the request being read began; None between requests
        self._reading = True  # whether further requests are taken
        self._readClosed = False
        self._writesBlocked = False
        self._draining = False
        self._lingering: Optional[LingeringClose] = None
        self._peer = "-"
        self._heard = False  # whether any byte arrived
        self._replied = False
        self.requests = 0

    def callLater(self, period: float, func) -> IDelayedCall:  # type: ignore[no-untyped-def]
        """Schedule on the injected clock (used by L{TimeoutMixin})."""
        return self._clock.callLater(period, func)

    def connectionMade(self) -> None:
        """The first request's deadline runs from connect."""
        self._peer = peerHost(self.transport.getPeer())
        self.factory.connectionOpened(self)
        self._requestBegins()
        if self._limits.keepAlive:
            self.transport.registerProducer(self, True)
        if self._limits.logRequests:
            self.log.info("connection from {peer}", peer=self._peer)

    # Reading requests.

    def dataReceived(self, data: bytes) -> None:
        """Check the line limit before buffering; hand L{LineReceiver} whole lines only."""
        self._heard = self._heard or bool(data)
        if self._lingering is not None:
            self._lingering.discard(data)
            return
        if not self._reading:
            return  # past the last request: read and discard, so that closing does not reset the connection
        if b"\n" not in data and not self._buffer:
            if data:
                self._partialLine(data)
            return
        if self._startedAt is None:
            self._startedAt = self._clock.seconds()  # whole lines end at once: no deadline to arm
        LineReceiver.dataReceived(self, self._takeLine() + data)
        if self._reading and not self.paused:
            rest, self._buffer = self._buffer, b""
            if rest:
                self._partialLine(rest)
            if self._readClosed and self._reading:
                self._endOfInput()

    def _partialLine(self, data: bytes) -> None:
        self._buffered += len(data)
        if self._buffered > self._maxLine and not (self._buffered == self.MAX_LENGTH and data.endswith(b"\r")):
            self._refuse(wire.lineTooLong(self._maxLine))
            return
        if self._startedAt is None:
            self._requestBegins()
        self._chunks.append(data)
        if self._limits.quiet:
            if self._quietCall is not None and self._quietCall.active():
                self._quietCall.reset(self._limits.quiet)
            else:
                self._quietCall = self._clock.callLater(self._limits.quiet, self._quietGapPassed)

    def _takeLine(self) -> bytes:
        """Take every byte held for the current line."""
        held = b"".join(self._chunks)
        self._chunks, self._buffered = [], 0
        return held

    @property
    def bufferedBytes(self) -> int:
        """How many bytes of the current line are held."""
        return self._buffered

    def lineReceived(self, line: bytes) -> None:
        """A newline ended a request; a CR right before it is dropped (and not counted against the limit)."""
        if line.endswith(b"\r"):
            line = line[:-1]
        if len(line) > self._maxLine:
            self._refuse(wire.lineTooLong(self._maxLine))
            return
        self._requestEnded(line)

    def lineLengthExceeded(self, line: bytes) -> None:
        """A complete line over the limit: refused, and the connection closes after the replies before it."""
        self._refuse(wire.lineTooLong(self._maxLine))

    def rawDataReceived(self, data: bytes) -> None:
        """Bytes after the last request are read and discarded."""

    def _quietGapPassed(self) -> None:
        self._quietCall = None
        if self._reading and self._chunks:
            self._requestEnded(self._takeLine())

    def readConnectionLost(self) -> None:
        """The client half-closed: what it sent is answered, then the connection closes."""
        self._readClosed = True
        if self._lingering is not None:
            self._lingering.finish()
        elif self._reading and not self.paused:
            self._endOfInput()

    def writeConnectionLost(self) -> None:
        """Our side finished writing (lingering after an ERROR); nothing to do until the client closes."""

    def _endOfInput(self) -> None:
        partial = self._takeLine()
        if partial or not self.requests:
            self._requestEnded(partial)  # a connection that sent nothing at all asked an empty question
        self._stopReading()
        if not self._unanswered:
            self._close()

    def timeoutConnection(self) -> None:
        """A request passed its deadline (C{ERROR timeout}), or a kept connection was idle too long (closed)."""
        if self._startedAt is not None:
            self._takeLine()
            self._refuse(wire.TIMEOUT)
        elif self._unanswered:
            self.setTimeout(self._limits.timeout)  # waiting for our own replies, not for the client
        else:
            self._stopReading()
            self._close()

    def _requestBegins(self) -> None:
        self._startedAt = self._clock.seconds()
        self.setTimeout(self._limits.timeout)

    def _requestEnded(self, raw: bytes) -> None:
        pending = self._queue(None)
        self.requests += 1
        self._responder.respond(raw, self._peer).addCallback(self._replyReady, pending)
        if not self._limits.keepAlive or self._draining:
            self._stopReading()
        else:
            self._updateReading()

    def _refuse(self, reason: str) -> None:
        """A framing error: answered in order, after which the connection closes."""
        self._stopReading()
        self._queue(wire.errorReply(reason, closes=True))
        self._writeReady()

    def _queue(self, reply: Optional[wire.Reply]) -> _Pending:
        # The deadline timer is left armed: re-arming it for the next request or the idle wait is a cheap reset.
        self._cancelQuietGap()
        pending = _Pending(self._clock.seconds() if self._startedAt is None else self._startedAt, reply)
        self._startedAt = None
        self._unanswered.append(pending)
        return pending

    def _stopReading(self) -> None:
        self._reading = False
        self.setRawMode()
        self._takeLine()
        self.setTimeout(None)
        self._cancelQuietGap()

    def _cancelQuietGap(self) -> None:
        if self._quietCall is not None and self._quietCall.active():
            self._quietCall.cancel()
        self._quietCall = None

    # Writing replies, in request order.

    def _replyReady(self, reply: wire.Reply, pending: _Pending) -> None:
        pending.reply = reply
        self._writeReady()

    def _writeReady(self) -> None:
        while self._unanswered and self._unanswered[0].reply is not None:
            pending = self._unanswered.popleft()
            reply: wire.Reply = pending.reply  # type: ignore[assignment]
            if self._heard or not self._readClosed:  # a connect and close is counted when gone, not logged
                if reply.isError or self._limits.logRequests:
                    self.log.info("{kind}{reply} to {peer}", kind="" if reply.isError else "reply ",
                                  reply=reply.text, peer=self._peer)
                self.factory.metrics.requestFinished(reply.outcome, self._clock.seconds() - pending.startedAt)
                self._replied = True
            if reply.closes or not self._limits.keepAlive:
                # The reply and the close go out together on the next turn, in one write and a FIN.
                self.transport.write(reply.data)
                self.factory.wrote(self, len(reply.data))
                self._stopReading()
                self._close(lingering=reply.isError)
                return
            sendNow(self.transport, reply.data)
            self.factory.wrote(self, len(reply.data))  # the kernel may hold it as long as the client reads none
        if not self._unanswered and not self._reading:
            self._close()
            return
        self._updateReading()
        if not self._unanswered and self._startedAt is None:
            self.setTimeout(self._limits.idleTimeout or None)

    def _close(self, lingering: bool = False) -> None:
        if self._lingering is not None or self.transport.disconnecting:
            return
        if self._limits.keepAlive:
            self.transport.unregisterProducer()
            self.transport.resumeProducing()  # lingering and a clean close both read until the client is done
        if lingering:
            # The client may still be sending (a long line, a trickle): make sure it reads the reply.
            self._lingering = LingeringClose(self.transport, self._clock, self._limits.linger)
            self._lingering.start(self._readClosed)
        else:
            self.transport.loseConnection()

    # Flow control: the pipeline bound and the transport's write buffer both pause reading.

    def pauseProducing(self) -> None:
        """The transport's write buffer is full (the client is not reading its replies)."""
        self._writesBlocked = True
        self._updateReading()

    def resumeProducing(self) -> None:
        """The transport's write buffer has drained."""
        self._writesBlocked = False
        self._updateReading()

    def stopProducing(self) -> None:
        """The connection is going away."""
        self._reading = False

    def _updateReading(self) -> None:
        hold = self._writesBlocked or len(self._unanswered) >= self._limits.pipeline
        if hold and not self.paused:
            self.paused = True
            self.transport.pauseProducing()
        elif not hold and self.paused and self._reading:
            self.paused = False
            self.transport.resumeProducing()
            self.dataReceived(b"")
            if self._readClosed and self._reading and not self.paused:
                self._endOfInput()

    # Stopping.

    def stopTakingRequests(self) -> None:
        """The service is stopping: a kept connection between requests closes now; others after their request."""
        self._draining = True
        if self._reading and self.requests and not self._chunks and not self._buffer:
            self._stopReading()
            if not self._unanswered:
                self._close()

    def connectionLost(self, reason=None) -> None:  # type: ignore[no-untyped-def]
        """Cancel timers; replies still being prepared will find the transport closed."""
        self._stopReading()
        if self._lingering is not None:
            self._lingering.cancel()
        if not self._heard and not self._replied:
            self.factory.metrics.connectionWithoutRequest("empty")
        self.factory.connectionClosed(self)


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
        queued: Callable[[ITransport], int] = queuedBytes,
    ) -> None:
        self.limits = limits
        self.clock = clock
        self.responder = responder
        self.metrics = metrics
        self.connectionLimits = connectionLimits or ConnectionLimits(maxTotal=1 << 30, maxPerPeer=0)
        self._open: dict[PrimeCountProtocol, str] = {}
        self._idleWaiters: list[Deferred[None]] = []
        self.busyLingering = 0
        self._busyLog = Throttle()
        self._sending: SendProgress[Protocol] = SendProgress(limits.sendTimeout, lambda p: queued(p.transport))
        self._sendSweep: Optional[LoopingCall] = None
        self._listenerGone = False
        self._abortLog = Throttle()

    def buildProtocol(self, addr: IAddress) -> Protocol:
        """A protocol for the connection from C{addr}, or a L{BusyProtocol} if it is over a limit."""
        key = peerHost(addr)
        over = self.connectionLimits.tryAcquire(key)
        if over is not None:
            return self._busy(key, over)
        protocol = PrimeCountProtocol(self.limits, self.clock, self.responder)
        protocol.factory = self
        protocol.limitKey = key
        return protocol

    def _busy(self, key: str, limit: str) -> Protocol:
        self.metrics.requestFinished("busy", 0.0)
        self.metrics.busyRefusal(limit)
        lingering = self.busyLingering < BUSY_LINGER_MAX
        if lingering:
            self.busyLingering += 1
        refused = self._busyLog.event(self.clock.seconds())
        if refused is not None:  # at most one line a second, however hard the flood
            self.log.warn(
                "answered ERROR busy to {refused} connections (last from {peer}); {total} open, "
                "limits {maxTotal} in all and {maxPerPeer} per address",
                refused=refused, peer=key, total=self.connectionLimits.total,
                maxTotal=self.connectionLimits.maxTotal, maxPerPeer=self.connectionLimits.maxPerPeer or "no",
            )

        def closed() -> None:
            if lingering:
                self.busyLingering -= 1
            self._sending.forget(busy)

        busy = BusyProtocol(self.clock, self.limits.linger if lingering else 0.0, closed, self.wrote)
        return busy

    def wrote(self, protocol: Protocol, size: int) -> None:
        """C{protocol} wrote C{size} bytes: watch that its client takes them (L{SendProgress})."""
        if self.limits.sendTimeout <= 0 or self._listenerGone:
            return  # once the listener is gone, the drain's own grace bounds every connection
        self._sending.wrote(protocol, size, self.clock.seconds())
        if self._sendSweep is None:
            self._sendSweep = LoopingCall(self._sweepSending)
            self._sendSweep.clock = self.clock
            self._sendSweep.start(min(1.0, self.limits.sendTimeout / 4), now=False)

    def stopFactory(self) -> None:
        """The listener is gone: stop watching (connections still open are drained, and aborted past the grace)."""
        self._listenerGone = True
        if self._sendSweep is not None:
            self._sendSweep.stop()
            self._sendSweep = None

    def _sweepSending(self) -> None:
        now = self.clock.seconds()
        for protocol in self._sending.sweep(now):
            self.metrics.connectionAborted("send_timeout")
            aborted = self._abortLog.event(now)
            if aborted is not None:
                self.log.warn("aborted {aborted} connections whose replies made no progress for {seconds:g} s "
                              "(last to {peer}): their clients do not read", aborted=aborted,
                              seconds=self.limits.sendTimeout, peer=peerHost(protocol.transport.getPeer()))
            protocol.transport.abortConnection()
        if not len(self._sending) and self._sendSweep is not None:
            self._sendSweep.stop()
            self._sendSweep = None

    def connectionOpened(self, protocol: PrimeCountProtocol) -> None:
        """Count C{protocol} as open."""
        self._open[protocol] = protocol.limitKey
        self.metrics.connectionOpened()

    def connectionClosed(self, protocol: PrimeCountProtocol) -> None:
        """C{protocol}'s connection is gone; wake those waiting for none to be open."""
        self._sending.forget(protocol)
        if protocol in self._open:
            self.connectionLimits.release(self._open.pop(protocol))
            self.metrics.connectionClosed(protocol.requests)
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

    def stopTakingRequests(self) -> None:
        """Close kept connections that wait between requests; every other one closes after its current request."""
        for protocol in list(self._open):
            protocol.stopTakingRequests()

    def abortAll(self) -> None:
        """Close every open connection at once, without waiting for replies."""
        for protocol in list(self._open):
            protocol.transport.abortConnection()

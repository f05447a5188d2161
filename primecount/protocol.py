"""The Twisted side of a connection: turns transport callbacks into events for a L{Connection} and carries out
the actions it answers (bytes, timers, flow control); the connection's decisions are all in
L{primecount.connection}."""

from __future__ import annotations

import typing
from typing import Callable, Optional, Sequence

from twisted.internet.interfaces import (
    IDelayedCall, IHalfCloseableProtocol, IHandshakeListener, IPushProducer, IReactorTime, ITransport,
)
from twisted.internet.protocol import Protocol
from twisted.protocols.policies import ProtocolWrapper
from twisted.logger import Logger
from zope.interface import implementer

from primecount import wire
from primecount.connection import (
    CLOSE, HALF_CLOSE, PAUSE, RESUME, Abort, Action, Arm, Ask, BufferBudget, Connection, RequestLimits, Send, Timer,
)
from primecount.internals import closeNow, readWaiting, sendNow
from primecount.limits import peerHost, shownPeer
from primecount.metrics import NoMetrics
from primecount.responder import Responder
from primecount.tls import tlsLayer

__all__ = ["BusyProtocol", "ConnectionObserver", "Driven", "PrimeCountProtocol", "RequestLimits"]


class ConnectionObserver(typing.Protocol):
    """What a protocol tells of its connection's life, and asks, handed to it when it is built: the factory that
    keeps track of the open connections (L{primecount.factory}, which provides this without importing it)."""

    metrics: NoMetrics

    def connectionOpened(self, protocol: "PrimeCountProtocol") -> None:
        """C{protocol} is connected and takes requests."""

    def connectionClosed(self, protocol: "PrimeCountProtocol") -> None:
        """C{protocol}'s connection is gone."""

    def aborted(self, protocol: "Driven", reason: str) -> None:
        """C{protocol}'s connection is reset for C{reason} (a label of C{primecount_aborted_connections_total})."""

    def watchSending(self, protocol: "Driven") -> None:
        """C{protocol} has output queued: call its L{Driven.checkSending} now and then until it says to stop."""

    def errorReplied(self, reply: str, peer: str) -> None:
        """The C{ERROR} reply C{reply} went to C{peer} (for the log)."""

    def queued(self, transport: ITransport) -> int:
        """How many bytes written to C{transport} its client has not taken yet."""


@implementer(IHalfCloseableProtocol, IPushProducer, IHandshakeListener)
class Driven(Protocol):
    """A protocol that feeds a L{Connection} and carries out its actions on the transport and the clock; over TLS
    it bounds the handshake by the request deadline and the close by the linger time, and never half-closes."""

    _tls: object = None  # the TLS layer under the transport, if any
    _handshaking = False  # over TLS: the handshake is not over yet
    _closeAsked = False
    _gone = False
    _tlsTimer: Optional[IDelayedCall] = None

    def __init__(self, connection: Connection, clock: IReactorTime, observer: ConnectionObserver,
                 responder: Optional[Responder] = None) -> None:
        self._connection = connection
        self._clock = clock
        self._observer = observer
        self._responder = responder
        self._timers: dict[Timer, IDelayedCall] = {}
        self._running = False
        self._backlog: list[Action] = []
        self._producing = False
        self._counting = False  # whether replies sent are counted or logged (L{_finished})

    def _run(self, actions: Sequence[Action]) -> None:
        """Carry out C{actions} in order; actions of events they cause (a write that fills the buffer) wait for
        the ones before them. Sending and asking, one or two per request, are carried out here directly."""
        if self._running:
            self._backlog.extend(actions)
            return
        if not actions:
            return
        self._running = True
        try:
            while True:
                for action in actions:
                    kind = type(action)
                    if kind is Send:
                        sendNow(self.transport, action.data)
                        if action.errors or (self._counting and action.finished):
                            self._finished(action.finished)
                        if action.watch:
                            self._observer.watchSending(self)
                    elif kind is Ask:
                        self._responder.respond(action.raw, self._peer, self, action.sequence)  # type: ignore[union-attr]
                    else:
                        self._carryOut(action)
                if not self._backlog:
                    return
                actions, self._backlog = self._backlog, []
        finally:
            self._running = False

    def _carryOut(self, action: Action) -> None:
        """Carry out an action other than L{Send} and L{Ask}."""
        kind = type(action)
        if kind is Arm:
            call = self._timers.get(action.timer)
            if call is not None and call.active():
                call.reset(action.delay)
            else:
                self._timers[action.timer] = self._clock.callLater(action.delay, self._timerFired, action.timer)
        elif action is CLOSE:
            self._unregister()
            self._cancelTimers()
            closeNow(self.transport)  # at once if all was sent: connectionLost may run within this call
            if self._tls is not None:
                self._closeAsked = True
                self._boundTLSClose()
        elif action is PAUSE:
            self.transport.pauseProducing()
        elif action is RESUME:
            self.transport.resumeProducing()
        elif action is HALF_CLOSE:
            self._unregister()
            self.transport.loseWriteConnection()
        elif kind is Abort:
            self._abort(action.reason)

    def _abort(self, reason: str) -> None:
        """Reset the connection at once, counted and logged by the observer under C{reason}."""
        self._cancelTimers()
        self._cancelTLSTimer()
        self._observer.aborted(self, reason)
        self.transport.abortConnection()

    def _finished(self, replies: Sequence[tuple[wire.Reply, float]]) -> None:
        """Replies went out (with when their requests began)."""

    def _unregister(self) -> None:
        if self._producing:
            self._producing = False
            self.transport.unregisterProducer()

    def _cancelTimers(self) -> None:
        if self._timers:
            for call in self._timers.values():
                if call.active():
                    call.cancel()
            self._timers.clear()

    def _cancelTLSTimer(self) -> None:
        if self._tlsTimer is not None:
            if self._tlsTimer.active():
                self._tlsTimer.cancel()
            self._tlsTimer = None

    # Over TLS: the handshake within the request deadline, the close within the linger time.

    def _watchHandshake(self) -> None:
        """Note a TLS layer under the transport; if this protocol is connected before its handshake, the
        handshake must be over by the request deadline."""
        tls = self._tls = tlsLayer(self.transport)
        if tls is not None and tls.wrappedProtocol is self:  # type: ignore[attr-defined]
            self._handshaking = True
            self._tlsTimer = self._clock.callLater(self._connection.limits.timeout, self._tlsTimedOut,
                                                   "handshake_timeout")

    def handshakeCompleted(self) -> None:
        """The TLS handshake is over: what was written meanwhile goes out now; a close asked meanwhile starts."""
        self._handshaking = False
        self._cancelTLSTimer()
        if self._closeAsked:
            self._boundTLSClose()

    def _boundTLSClose(self) -> None:
        """The TLS layer closes once its writes are out and the client answers its close_notify: give that the
        linger time (the handshake's own deadline covers the wait before it); with no linger time (a flood of
        refusals), abort now."""
        if self._gone:
            return
        linger = self._connection.limits.linger
        if linger <= 0:
            self._tlsTimedOut("close_timeout")
        elif not self._handshaking and self._tlsTimer is None:
            self._tlsTimer = self._clock.callLater(linger, self._tlsTimedOut, "close_timeout")

    def _tlsTimedOut(self, reason: str) -> None:
        self._tlsTimer = None
        if not self._gone:
            self._abort(reason)

    def _timerFired(self, timer: Timer) -> None:
        del self._timers[timer]
        self._run(self._connection.timerFired(timer, self._clock.seconds()))

    def connectionMade(self) -> None:
        """The connection is open."""
        self._peer = peerHost(self.transport.getPeer())
        self._start()

    def _start(self, waiting: bytes = b"") -> None:
        if isinstance(self.transport, ProtocolWrapper):  # TLS, or the PROXY-header reader: not a bare socket
            self._watchHandshake()
        # A half-close under a TLS layer would end the TCP stream without TLS's close_notify, cutting the reply.
        canHalfClose = self._tls is None and hasattr(self.transport, "loseWriteConnection")
        self._run(self._connection.start(self._clock.seconds(), canHalfClose, waiting))

    def dataReceived(self, data: bytes) -> None:
        """Bytes from the client."""
        self._run(self._connection.received(data, self._clock.seconds()))

    def readConnectionLost(self) -> None:
        """The client half-closed."""
        self._run(self._connection.halfClosed(self._clock.seconds()))

    def writeConnectionLost(self) -> None:
        """Our FIN went out (a lingering close); nothing to do until the client closes."""

    def pauseProducing(self) -> None:
        """The transport's write buffer is full (the client is not reading its replies)."""
        self._run(self._connection.writesBlocked())

    def resumeProducing(self) -> None:
        """The transport's write buffer has drained."""
        self._run(self._connection.writesDrained(self._clock.seconds()))

    def stopProducing(self) -> None:
        """The connection is going away (L{connectionLost} follows)."""

    def checkSending(self, now: float) -> bool:
        """Tell the connection how much of its output is still queued; whether it wants to be asked again."""
        self._run(self._connection.sendChecked(self._observer.queued(self.transport), now))
        return self._connection.watchingSend

    def connectionLost(self, reason: object = None) -> None:
        """The connection is gone: nothing more is sent, and no timer is left."""
        self._gone = True
        self._connection.lost()
        self._cancelTimers()
        if self._tlsTimer is not None:
            self._cancelTLSTimer()


class BusyProtocol(Driven):
    """What a connection over a limit gets: C{ERROR busy}, no reading of its request, a lingering close."""

    def __init__(self, limits: RequestLimits, clock: IReactorTime, observer: ConnectionObserver,
                 onClosed: Callable[[], None]) -> None:
        super().__init__(Connection(limits, refusal=wire.BUSY), clock, observer)
        self._onClosed = onClosed

    def connectionLost(self, reason: object = None) -> None:
        """Forget the timers and say so."""
        super().connectionLost(reason)
        self._onClosed()


class PrimeCountProtocol(Driven):
    """One connection: reads requests, hands each to the responder, writes the replies in request order, as
    its L{Connection} says; counts and logs what it answers."""

    log = Logger()
    limitKey: Optional[str] = None  # the client's canonical address, as the factory counted it

    def __init__(self, limits: RequestLimits, clock: IReactorTime, observer: ConnectionObserver,
                 responder: Responder, budget: Optional[BufferBudget] = None) -> None:
        super().__init__(Connection(limits, budget=budget), clock, observer, responder)
        self._limits = limits

    @property
    def requests(self) -> int:
        """How many requests this connection has taken."""
        return self._connection.requests

    @property
    def bufferedBytes(self) -> int:
        """How many received bytes are held."""
        return self._connection.bufferedBytes

    def connectionMade(self) -> None:
        """The first request's deadline runs from connect."""
        self._peer = self.limitKey or peerHost(self.transport.getPeer())
        self._counting = self._limits.logRequests or type(self._observer.metrics) is not NoMetrics
        self._observer.connectionOpened(self)
        if self._limits.keepAlive:
            self.transport.registerProducer(self, True)
            self._producing = True
        if self._limits.logRequests:
            self.log.info("connection from {peer}", peer=shownPeer(self._peer))
        self._start(readWaiting(self.transport))

    def answered(self, replies: list[tuple[int, wire.Reply]]) -> None:
        """The responder's replies to some of this connection's requests."""
        self._run(self._connection.answered(replies, self._clock.seconds()))

    def _finished(self, replies: Sequence[tuple[wire.Reply, float]]) -> None:
        """Count the replies; log each with C{--log-requests}, otherwise only the C{ERROR}s, summarised."""
        metrics, now, logRequests = self._observer.metrics, self._clock.seconds(), self._limits.logRequests
        for reply, startedAt in replies:
            if logRequests:
                self.log.info("{kind}{reply} to {peer}", kind="" if reply.isError else "reply ",
                              reply=reply.text, peer=shownPeer(self._peer))
            elif reply.isError:
                self._observer.errorReplied(reply.text, self._peer)
            if reply.outcome == "busy":  # a connection already served is busy only past the buffer budget
                metrics.busyRefusal("buffered")
            metrics.requestFinished(reply.outcome, now - startedAt)

    def stopTakingRequests(self) -> None:
        """The service is stopping: a kept connection between requests closes now; others after their request."""
        self._run(self._connection.stopTakingRequests(self._clock.seconds()))

    def connectionLost(self, reason: object = None) -> None:
        """Cancel timers; replies still being prepared find the connection gone."""
        super().connectionLost(reason)
        if self._connection.silent:
            self._observer.metrics.connectionWithoutRequest("empty")
        self._observer.connectionClosed(self)

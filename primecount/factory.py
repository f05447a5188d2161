"""The listener's side of the connections: one protocol per connection within the connection limits, the open
ones tracked for draining and metrics, and the send-deadline sweep over those with output queued."""

from __future__ import annotations

from typing import Any, Callable, Optional

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IAddress, IDelayedCall, IReactorTime, ITransport
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from primecount.connection import BufferBudget, RequestLimits
from primecount.internals import queuedBytes
from primecount.limits import (
    SUMMARY_SOURCES, ConnectionLimits, Summary, SummaryLine, Throttle, peerHost, shownPeer,
)
from primecount.metrics import NoMetrics
from primecount.responder import Responder

# Why a connection was aborted, by its metrics label, as the log line says it.
_ABORT_REASONS = {
    "send_timeout": "their replies made no progress for {sendTimeout:g} s: their clients do not read",
    "handshake_timeout": "their TLS handshake was not over within {timeout:g} s",
    "close_timeout": "their TLS close was not over within {linger:g} s of the last reply",
}


class PrimeCountFactory(Factory):
    """Builds one C{protocol} per connection within the connection limits (a C{busyProtocol} past them), and
    keeps track of the open ones, for draining and metrics: each protocol is handed this factory as its
    observer (L{primecount.protocol.ConnectionObserver}), and tells it of its connection's life."""

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
        bufferBudget: Optional[BufferBudget] = None,
        *,
        protocol: Callable[..., Any],
        busyProtocol: Callable[..., Any],
    ) -> None:
        self.protocol = protocol  # type: ignore[assignment]
        self._busyProtocol = busyProtocol
        self.limits = limits
        self.clock = clock
        self.responder = responder
        self.metrics = metrics
        self.connectionLimits = connectionLimits or ConnectionLimits(maxTotal=1 << 30, maxPerPeer=0)
        self._open: dict[Any, str] = {}
        self._idleWaiters: list[Deferred[None]] = []
        self._busyLog = Throttle()
        self.queued = queued
        self.bufferBudget = bufferBudget
        self._watched: set[Any] = set()
        self._sendSweep: Optional[LoopingCall] = None
        self._listenerGone = False
        self._abortLogs: dict[str, Throttle] = {}
        self._errorReplies = Summary()
        self._errorFlush: Optional[IDelayedCall] = None

    def buildProtocol(self, addr: IAddress) -> Protocol:
        """A protocol for the connection from C{addr}, or a busy one if it is over a limit."""
        key = peerHost(addr)
        over = self.connectionLimits.tryAcquire(key)
        if over is not None:
            return self.refuse(key, over)
        protocol = self.protocol(self.limits, self.clock, self, self.responder, self.bufferBudget)
        protocol.limitKey = key
        return protocol

    def refuse(self, key: str, limit: str) -> Protocol:
        """The protocol of a connection from C{key} over C{limit}: it answers C{ERROR busy} and lingers to
        deliver it, or, past the descriptors lingering may take, closes at once."""
        self.metrics.requestFinished("busy", 0.0)
        self.metrics.busyRefusal(limit)
        lingering = self.connectionLimits.tryLinger()
        refused = self._busyLog.event(self.clock.seconds())
        if refused is not None:  # at most one line a second, however hard the flood
            self.log.warn(
                "answered ERROR busy to {refused} connections (last from {peer}); {total} open, "
                "limits {maxTotal} in all and {maxPerPeer} per address",
                refused=refused, peer=shownPeer(key), total=self.connectionLimits.total,
                maxTotal=self.connectionLimits.maxTotal, maxPerPeer=self.connectionLimits.maxPerPeer or "no",
            )

        def closed() -> None:
            if lingering:
                self.connectionLimits.lingerEnded()
            self._watched.discard(busy)

        busy = self._busyProtocol(self.limits._replace(linger=self.limits.linger if lingering else 0.0),
                                  self.clock, self, closed)
        return busy

    def watchSending(self, protocol: Any) -> None:
        """C{protocol} has output queued: ask it now and then whether its client takes it (the send deadline)."""
        if self._listenerGone:
            return  # once the listener is gone, the drain's own grace bounds every connection
        self._watched.add(protocol)
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
        for protocol in list(self._watched):
            if not protocol.checkSending(now):
                self._watched.discard(protocol)
        if not self._watched and self._sendSweep is not None:
            self._sendSweep.stop()
            self._sendSweep = None

    def aborted(self, protocol: Any, reason: str) -> None:
        """C{protocol} is aborted for C{reason} (a label of L{ABORTED}): counted, logged once a second per reason."""
        self._watched.discard(protocol)
        self.metrics.connectionAborted(reason)
        throttle = self._abortLogs.get(reason)
        if throttle is None:
            throttle = self._abortLogs[reason] = Throttle()
        aborted = throttle.event(self.clock.seconds())
        if aborted is not None:
            self.log.warn("aborted {aborted} connections (last to {peer}): " + _ABORT_REASONS[reason],
                          aborted=aborted, peer=shownPeer(peerHost(protocol.transport.getPeer())),
                          sendTimeout=self.limits.sendTimeout, timeout=self.limits.timeout, linger=self.limits.linger)

    def errorReplied(self, reply: str, peer: str) -> None:
        """The reply C{reply} (an C{ERROR}) went to C{peer}: logged at once if it is the first of its kind for
        a second, otherwise counted into one line per kind a second later (L{Summary})."""
        line = self._errorReplies.event(reply, peer, self.clock.seconds())
        if line is not None:
            self._logErrorReplies(line)
        if self._errorFlush is None:
            due = self._errorReplies.due()
            if due is not None:
                self._errorFlush = self.clock.callLater(max(0.0, due - self.clock.seconds()), self.flushLogs)

    def flushLogs(self, everything: bool = False) -> None:
        """Log the summaries whose second is over (C{everything}: all that wait, as the drain ends)."""
        if self._errorFlush is not None and self._errorFlush.active():
            self._errorFlush.cancel()
        self._errorFlush = None
        for line in self._errorReplies.flush(self.clock.seconds(), everything):
            self._logErrorReplies(line)
        due = self._errorReplies.due()
        if due is not None:
            self._errorFlush = self.clock.callLater(max(0.0, due - self.clock.seconds()), self.flushLogs)

    def _logErrorReplies(self, line: SummaryLine) -> None:
        if line.count == 1:
            self.log.info("{reply} to {peer}", reply=line.kind, peer=shownPeer(line.lastSource))
        else:
            self.log.info("{reply} to {count} requests in {seconds:.1f} s from {sources} addresses (last {peer})",
                          reply=line.kind, count=line.count, seconds=line.seconds,
                          sources=f"{line.sources}+" if line.sources >= SUMMARY_SOURCES else line.sources,
                          peer=shownPeer(line.lastSource))

    def connectionOpened(self, protocol: Any) -> None:
        """Count C{protocol} as open."""
        self._open[protocol] = protocol.limitKey
        self.metrics.connectionOpened()

    def connectionClosed(self, protocol: Any) -> None:
        """C{protocol}'s connection is gone; wake those waiting for none to be open."""
        self._watched.discard(protocol)
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

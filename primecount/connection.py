"""One connection's decisions without I/O, as h11 and hyper-h2 make HTTP's: events (bytes, half-close, timers,
replies, flow control, drain, send-queue checks) go in with their time, actions come out (docs/protocol.md).

The input side is in one of five phases; only the moves of L{TRANSITIONS} change it, all through
L{Connection._move}, which refuses any other (L{BadMove}):

    phase       move           next        when
    REQUEST     KEEP           BETWEEN     keep-alive: a request ended, more are taken
    REQUEST     STOP_TAKING    ANSWERING   one-shot request ended, end of input, drain,
                                           a framing error or refusal being answered
    BETWEEN     NEXT_REQUEST   REQUEST     the first bytes of a partial next request
    BETWEEN     STOP_TAKING    ANSWERING   end of input, drain, idle wait over, an error
    ANSWERING   LINGER         LINGERING   the closing ERROR is out: FIN, read until EOF
    any but CLOSED  CLOSE      CLOSED      close asked (every reply out)
    any         GONE           CLOSED      aborted (send deadline), or the transport lost

Everything else a connection keeps is fact, grouped in C{__slots__}: input side, output side, timers.
"""

from __future__ import annotations

import enum
from collections import deque
from typing import NamedTuple, Optional, Sequence, Union

from primecount import wire


class RequestLimits(NamedTuple):
    """How requests may arrive (deadline from their first byte, quiet gap that ends one or 0, maximum line
    bytes), whether each connection and reply is logged, how long an ERROR close lingers, whether a connection
    carries more than one request (how many unanswered at most, how long it may wait idle for the next), and
    how long queued replies may make no progress."""

    timeout: float = 5.0
    quiet: float = 0.2
    maxLine: int = 65536
    logRequests: bool = False
    linger: float = 2.0
    keepAlive: bool = False
    pipeline: int = 64
    idleTimeout: float = 30.0
    sendTimeout: float = 10.0


# Input read and thrown away while lingering after an ERROR, at most, before closing regardless.
LINGER_MAX_BYTES = 1 << 20


class BufferBudget:
    """How many request bytes every connection of a process may hold at once, in all (the parts of lines not
    yet ended, and lines received while reading is held), and how many they hold now. A connection whose new
    bytes would take the total past C{limit} is answered C{ERROR busy}; a line that arrives whole in one read
    is never held, so it never counts."""

    __slots__ = ("limit", "held")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0


class Phase(enum.IntEnum):
    """Where a connection's input stands (small integers: their hash is C's, for L{TRANSITIONS})."""

    REQUEST = 0  # a request is being read: its deadline runs (the first one's from connect)
    BETWEEN = 1  # keep-alive, no byte of the next request yet: idle wait once every reply is out
    ANSWERING = 2  # no more requests are taken: input is discarded, close once every reply is out
    LINGERING = 3  # the closing ERROR is out and FIN sent: discard input until the client closes
    CLOSED = 4  # close or abort asked: nothing more happens


class Move(enum.IntEnum):
    """What moves a connection from one phase to the next (see L{TRANSITIONS})."""

    KEEP = 0  # keep-alive: a request ended and more are taken
    NEXT_REQUEST = 1  # the first bytes of a next request that is not yet whole
    STOP_TAKING = 2  # no more requests are taken: answer those taken, then close
    LINGER = 3  # the closing ERROR is out: send FIN, read and discard until the client closes
    CLOSE = 4  # every reply is out: close
    GONE = 5  # aborted, or the transport is lost


class BadMove(Exception):
    """A change of phase that L{TRANSITIONS} does not list: a bug in the connection core."""


class Timer(enum.IntEnum):
    """The timers a connection asks for (small integers: they index the core's timer lists)."""

    DEADLINE = 0  # the request's deadline, or the idle wait between requests
    QUIET = 1  # the quiet gap that ends a request sent without a newline
    LINGER = 2  # how long a lingering close waits for the client


# The members as plain names: looking a member up on its enum class costs more than the comparison itself.
REQUEST, BETWEEN, ANSWERING, LINGERING, CLOSED = Phase
KEEP, NEXT_REQUEST, STOP_TAKING, LINGER_AFTER_ERROR, CLOSE_ASKED, GONE = Move
DEADLINE, QUIET, LINGER = Timer

# Every change of phase there is: from each phase, the moves it takes and where each leads.
TRANSITIONS: dict[Phase, dict[Move, Phase]] = {
    REQUEST: {KEEP: BETWEEN, STOP_TAKING: ANSWERING, CLOSE_ASKED: CLOSED, GONE: CLOSED},
    BETWEEN: {NEXT_REQUEST: REQUEST, STOP_TAKING: ANSWERING, CLOSE_ASKED: CLOSED, GONE: CLOSED},
    ANSWERING: {LINGER_AFTER_ERROR: LINGERING, CLOSE_ASKED: CLOSED, GONE: CLOSED},
    LINGERING: {CLOSE_ASKED: CLOSED, GONE: CLOSED},
    CLOSED: {GONE: CLOSED},
}
# The same as a tuple of tuples, indexed by phase then move (None: no such move), for L{Connection._move}.
_NEXT = tuple(tuple(TRANSITIONS[phase].get(move) for move in Move) for phase in Phase)


class Send(NamedTuple):
    """Write C{data}: the replies C{finished} (each with when its request began; those worth counting), in
    order. C{closing} when these are the last bytes: a close or a lingering close follows;
    C{watch} when output was not queued before: call L{Connection.sendChecked} now and then until it has left
    (the send deadline); C{errors} when one of C{finished} is an C{ERROR} (every one is logged)."""

    data: bytes
    finished: Sequence[tuple[wire.Reply, float]]
    closing: bool = False
    watch: bool = False
    errors: bool = False


class Ask(NamedTuple):
    """Answer the request C{raw}; hand the reply back to L{Connection.answered} with C{sequence}."""

    sequence: int
    raw: bytes


class Arm(NamedTuple):
    """Arrange for L{Connection.timerFired} with C{timer} in C{delay} seconds (moving it if already armed)."""

    timer: Timer
    delay: float


class Abort(NamedTuple):
    """Reset the connection at once, for C{reason} (a metrics label)."""

    reason: str


class _Signal(NamedTuple):
    """An action without arguments."""

    name: str


PAUSE = _Signal("pause")  # stop reading from the transport
RESUME = _Signal("resume")  # read from the transport again
HALF_CLOSE = _Signal("half-close")  # send FIN after what is queued, keep reading
CLOSE = _Signal("close")  # close once what is queued is sent

Action = Union[Send, Ask, Arm, Abort, _Signal]

# Made once or twice per request: the tuple constructor itself, as NamedTuple's _make uses, costs half what
# the generated __new__ that calls it does.
_make = tuple.__new__


class Connection:
    """Everything one client connection decides: framing, deadlines, the pipeline bound, reply order, closing
    (one-shot or keep-alive; docs/protocol.md says how each ends)."""

    __slots__ = (
        # what is settled at the start
        "limits", "_canHalfClose", "_refusal", "_lowWater", "_oneShot", "_pipeline", "_budget",
        # the input side: the phase, the request being read, what is held, what the client did
        "phase", "requests", "_nextSequence", "_partial", "_partialSize", "_unread", "_startedAt", "_paused",
        "_readClosed", "_heard", "_discarded", "_draining", "_gapSeen",
        # the output side: replies awaited and ready, in order; what was written and whether it moves
        "_startedAts", "_ready", "_firstSequence", "_writesBlocked", "_counted", "_written", "_watching",
        "_sentAtProgress", "_progressAt",
        # the timers, and the actions of the event being handled
        "_due", "_armed", "_actions",
    )

    def __init__(self, limits: RequestLimits, refusal: Optional[str] = None,
                 budget: Optional[BufferBudget] = None) -> None:
        """With C{refusal}, answer only C{ERROR <refusal>} at L{start}, read nothing, and close (a connection
        over a limit). With C{budget}, the bytes held count against it (shared with the process's other
        connections)."""
        self.limits = limits
        self._canHalfClose = True
        self._refusal = refusal
        self._lowWater = limits.pipeline // 2
        self._oneShot = not limits.keepAlive
        self._pipeline = limits.pipeline
        self._budget = budget
        # The input side.
        self.phase = REQUEST
        self.requests = 0  # requests taken
        self._nextSequence = 0  # the sequence number of the next request taken
        # The current line so far: a bytearray extended in place (amortised, never quadratic), so that it costs
        # about a byte per byte held however small the reads that brought it; empty bytes until a line is split.
        self._partial: bytes | bytearray = b""
        self._partialSize = 0
        self._unread = b""  # bytes received while framing was held (the pipeline bound), not yet framed
        self._startedAt = 0.0  # when the request being read began (phase REQUEST)
        self._paused = False  # whether reading is held (and the transport told so)
        self._readClosed = False
        self._heard = False  # whether any byte arrived
        self._discarded = 0  # bytes thrown away while lingering
        self._draining = False
        self._gapSeen = False  # the quiet gap was over once: it ends the request unless bytes came in the turn since
        # The output side. The requests taken and not yet sent, from _firstSequence on: when each began, and the
        # replies known.
        self._startedAts: deque[float] = deque()
        self._ready: dict[int, wire.Reply] = {}
        self._firstSequence = 0
        self._writesBlocked = False
        self._counted = False  # whether any reply was counted
        self._written = 0  # bytes handed to the transport in all
        self._watching = False  # whether the send deadline watches queued output
        self._sentAtProgress = 0
        self._progressAt = 0.0
        # The timers.
        self._due: list[Optional[float]] = [None, None, None]  # when each timer should fire, by Timer
        self._armed: list[Optional[float]] = [None, None, None]  # when the timer asked for will fire
        self._actions: list[Action] = []

    # Events in. Each returns the actions to carry out, in order.

    def start(self, now: float, canHalfClose: bool = True, waiting: bytes = b"") -> list[Action]:
        """The connection is open (on a transport that can send FIN and go on reading if C{canHalfClose}), with
        C{waiting} already received: the first request's deadline runs from now, or the refusal goes out. A
        request that C{waiting} holds whole needs no deadline, so none is armed for it."""
        self._canHalfClose = canHalfClose
        self._startedAt = now
        if self._refusal is not None:
            self._refuse(wire.errorReply(self._refusal, closes=True), now)
            return self._take()
        deadline = self._due[DEADLINE] = now + self.limits.timeout  # phase REQUEST since __init__
        if waiting:
            self._heard = True
            self._frame(waiting, now)
        if self.phase is REQUEST and self._armed[DEADLINE] is None:
            self._arm(DEADLINE, deadline, now)
        return self._take()

    def received(self, data: bytes, now: float) -> list[Action]:
        """The client sent C{data}."""
        if data:
            self._heard = True
        phase = self.phase
        if phase is REQUEST or phase is BETWEEN:
            if self._paused:
                self._keepUnread(self._unread + data, now)  # the transport delivered more after being asked to pause
            else:
                self._frame(data, now)
        elif phase is LINGERING:
            self._discarded += len(data)
            if self._discarded > LINGER_MAX_BYTES:
                self._close()
        actions, self._actions = self._actions, []  # _take, inline on the two events of every request
        return actions  # ANSWERING and CLOSED read and discard, so that closing does not reset

    def halfClosed(self, now: float) -> list[Action]:
        """The client half-closed: what it sent is answered, then the connection closes."""
        self._readClosed = True
        if self.phase is LINGERING:
            self._close()
        elif self.phase in (REQUEST, BETWEEN) and not self._paused:
            self._endOfInput(now)
        return self._take()

    def timerFired(self, timer: Timer, now: float) -> list[Action]:
        """C{timer} fired: act if its time has come, arm it again if its deadline moved on."""
        self._armed[timer] = None
        due = self._due[timer]
        if due is None or self.phase is CLOSED:
            return []
        if now < due:
            self._arm(timer, due, now)
            return self._take()
        self._due[timer] = None
        if timer is DEADLINE:
            if self.phase is REQUEST and self._gapSeen:
                # The quiet gap ended first, by the clock, and is looking once more: it decides, then this.
                self._due[DEADLINE] = now
                self._arm(DEADLINE, now, now)
            elif self.phase is REQUEST:
                self._takePartial()
                self._refuse(wire.errorReply(wire.TIMEOUT, closes=True), now)
            elif self.phase is BETWEEN and not self._startedAts:
                self._move(STOP_TAKING)  # idle too long: closed without a reply
                self._close()
        elif timer is QUIET:
            if self.phase is REQUEST and self._partialSize and not self._unread:  # unread bytes: no gap
                if self._gapSeen:
                    self._gapSeen = False
                    self._requestEnded(self._takePartial(), now)
                else:
                    # The gap is over by the clock, but bytes that came during it may not have been read yet (a
                    # reactor that fell behind runs its timers before it reads): look once more after the
                    # transport has read what has arrived. Bytes then restart the gap (L{_partialLine}).
                    self._gapSeen = True
                    self._due[QUIET] = now
                    self._arm(QUIET, now, now)
        elif self.phase is LINGERING:
            self._close()
        return self._take()

    def answered(self, replies: Sequence[tuple[int, wire.Reply]], now: float) -> list[Action]:
        """The replies to some of the L{Ask}ed requests, by sequence number, are ready."""
        if self.phase is CLOSED or self.phase is LINGERING:
            return []
        self._ready.update(replies)
        self._flush(now)
        actions, self._actions = self._actions, []
        return actions

    def writesBlocked(self) -> list[Action]:
        """The transport's write buffer is full (the client is not reading its replies)."""
        self._writesBlocked = True
        self._hold()
        return self._take()

    def writesDrained(self, now: float) -> list[Action]:
        """The transport's write buffer has drained."""
        self._writesBlocked = False
        self._release(now)
        return self._take()

    def stopTakingRequests(self, now: float) -> list[Action]:
        """The service is stopping: a kept connection between requests closes now, others after their request."""
        self._draining = True
        if self.phase is BETWEEN and not self._unread:
            self._move(STOP_TAKING)
            if not self._startedAts:
                self._close()
        return self._take()

    def sendChecked(self, queued: int, now: float) -> list[Action]:
        """The transport still holds C{queued} of the bytes written (since a L{Send} with C{watch}); past the send deadline
        without progress, give up on the client."""
        if not self._watching:
            return []  # the output has left, or the connection is gone
        if queued <= 0:
            self._watching = False
            return []
        sent = self._written - queued
        if sent > self._sentAtProgress:
            self._sentAtProgress, self._progressAt = sent, now
        elif now - self._progressAt >= self.limits.sendTimeout:
            self._watching = False
            self._move(GONE)
            return [Abort("send_timeout")]
        return []

    def lost(self) -> None:
        """The connection is gone (closed by either side, or reset): nothing more is done."""
        self._watching = False
        if self.phase is not CLOSED:
            self._move(GONE)
            self._due = [None, None, None]

    # What the adapter may ask.

    @property
    def watchingSend(self) -> bool:
        """Whether queued output is still watched (L{sendChecked} wanted)."""
        return self._watching

    @property
    def bufferedBytes(self) -> int:
        """How many received bytes are held: the current line's, and any not framed yet."""
        return self._partialSize + len(self._unread)

    @property
    def requestStartedAt(self) -> Optional[float]:
        """When the request being read began (from connect for the first), or C{None} outside L{REQUEST}."""
        return self._startedAt if self.phase is REQUEST else None

    @property
    def silent(self) -> bool:
        """Whether the client sent nothing and no reply was counted (a connect and close)."""
        return not self._heard and not self._counted

    def dueTimers(self) -> dict[Timer, float]:
        """The timers whose time has yet to come, and when it comes."""
        return {timer: at for timer, at in zip(Timer, self._due) if at is not None}

    # Transitions.

    def _move(self, move: Move) -> None:
        """The one place the phase changes, by C{move} along L{TRANSITIONS} (L{BadMove} for any other);
        leaving the reading phases drops what is held and their timers."""
        phase = _NEXT[self.phase][move]
        if phase is None:
            raise BadMove(f"{move.name} in {self.phase.name}")
        if phase is not REQUEST and phase is not BETWEEN:
            if self._partial:
                self._takePartial()
            if self._unread:
                self._keepUnread(b"", 0.0)
            due = self._due
            due[DEADLINE] = due[QUIET] = None
        self.phase = phase

    def _take(self) -> list[Action]:
        actions, self._actions = self._actions, []
        return actions

    def _want(self, timer: Timer, at: float, now: float) -> None:
        self._due[timer] = at
        armed = self._armed[timer]
        if armed is None or armed > at:
            self._arm(timer, at, now)

    def _arm(self, timer: Timer, at: float, now: float) -> None:
        self._armed[timer] = at
        self._actions.append(Arm(timer, at - now))

    def _startRequest(self, now: float) -> None:
        self._move(NEXT_REQUEST)
        self._startedAt = now
        self._want(DEADLINE, now + self.limits.timeout, now)

    def _frame(self, data: bytes, now: float) -> None:
        """Cut C{data}, after the line held so far, into requests, as far as the pipeline bound allows."""
        end = data.find(b"\n")
        if end < 0:
            if data:
                self._partialLine(data, now)
            return
        # Whole lines end at once: a request that starts and ends in this call needs no deadline.
        if self._partial:
            held = self._takePartial()  # holds no newline: the first one moves by its length
            data, end = held + data, end + len(held)
        maxLine, position, size = self.limits.maxLine, 0, len(data)
        while True:
            line = data[position:end]
            position = end + 1
            if line[-1:] == b"\r":
                line = line[:-1]
            if len(line) > maxLine:
                self._refuse(wire.errorReply(wire.lineTooLong(maxLine), closes=True), now)
                return
            self._requestEnded(line, now)
            if self.phase is not BETWEEN or position == size:
                return  # one-shot or draining: the rest is discarded; or nothing is left
            if self._paused:
                self._keepUnread(data[position:], now)
                return
            end = data.find(b"\n", position)
            if end < 0:
                break
        self._partialLine(data[position:], now)

    def _partialLine(self, data: bytes, now: float) -> None:
        size = self._partialSize + len(data)
        maxLine = self.limits.maxLine
        if size > maxLine and not (size == maxLine + 1 and data.endswith(b"\r")):  # a CRLF's CR does not count
            self._refuse(wire.errorReply(wire.lineTooLong(maxLine), closes=True), now)
            return
        budget = self._budget
        if budget is not None:
            if budget.held + len(data) > budget.limit:
                self._refuse(wire.errorReply(wire.BUSY, closes=True), now)
                return
            budget.held += len(data)
        if self.phase is BETWEEN:
            self._startRequest(now)
        if self._partial:
            self._partial += data  # type: ignore[operator]
        else:
            self._partial = bytearray(data)
        self._partialSize = size
        if self.limits.quiet:
            self._gapSeen = False
            self._want(QUIET, now + self.limits.quiet, now)

    def _takePartial(self) -> bytes:
        held = bytes(self._partial)
        if self._budget is not None:
            self._budget.held -= self._partialSize
        self._partial, self._partialSize = b"", 0
        return held

    def _keepUnread(self, unread: bytes, now: float) -> None:
        """Keep C{unread} (instead of what was kept) until reading resumes; past the budget, C{ERROR busy}."""
        budget = self._budget
        if budget is not None:
            grows = len(unread) - len(self._unread)
            if grows > 0 and budget.held + grows > budget.limit:
                self._refuse(wire.errorReply(wire.BUSY, closes=True), now)  # leaving the reading phases drops it
                return
            budget.held += grows
        self._unread = unread

    def _requestEnded(self, raw: bytes, now: float) -> None:
        self._startedAts.append(self._startedAt if self.phase is REQUEST else now)
        sequence = self._nextSequence
        self._nextSequence = sequence + 1
        self.requests += 1
        self._actions.append(_make(Ask, (sequence, raw)))
        due = self._due
        due[QUIET] = None
        if self._oneShot or self._draining:
            self._move(STOP_TAKING)
            return
        if self.phase is not BETWEEN:  # a whole line read between requests stays there
            self._move(KEEP)
        due[DEADLINE] = None  # the wait for our own replies is not the client's to bound
        if self._writesBlocked or len(self._startedAts) >= self._pipeline:
            self._hold()

    def _endOfInput(self, now: float) -> None:
        partial = self._takePartial() if self._partial else b""
        if partial or not self.requests:
            self._requestEnded(partial, now)  # a connection that sent nothing at all asked an empty question
        if self.phase is not ANSWERING:
            self._move(STOP_TAKING)
        if not self._startedAts:
            self._close()

    def _refuse(self, reply: wire.Reply, now: float) -> None:
        """A framing error (or a refusal): answered in order, after which the connection closes."""
        self._startedAts.append(self._startedAt if self.phase is REQUEST else now)
        self._move(STOP_TAKING)
        self._ready[self._nextSequence] = reply
        self._nextSequence += 1
        self._flush(now)

    def _flush(self, now: float) -> None:
        """Send every reply ready at the head of the queue, in one write; close after a closing one."""
        ready, startedAts, sequence = self._ready, self._startedAts, self._firstSequence
        data: list[bytes] = []
        finished: list[tuple[wire.Reply, float]] = []
        count = self._heard or not self._readClosed  # a connect and close is counted when gone, not logged
        oneShot, take, errors = self._oneShot, ready.pop, False
        while (reply := take(sequence, None)) is not None:
            startedAt = startedAts.popleft()
            sequence += 1
            data.append(reply.data)
            if count:
                finished.append((reply, startedAt))
                if reply.isError:
                    errors = True
            if reply.closes or oneShot:
                self._firstSequence = sequence
                self._send(data, finished, now, True, errors)
                if self.phase is not ANSWERING:
                    self._move(STOP_TAKING)
                startedAts.clear()
                ready.clear()
                if reply.isError:
                    self._linger(now)
                else:
                    self._close()
                return
        self._firstSequence = sequence
        if data:
            self._send(data, finished, now, False, errors)
        if startedAts:
            if self._paused:
                self._release(now)
        elif self.phase is ANSWERING:
            self._close()
        elif self.phase is BETWEEN:
            idleTimeout = self.limits.idleTimeout
            if idleTimeout:
                self._want(DEADLINE, now + idleTimeout, now)
            if self._paused:
                self._release(now)

    def _send(self, data: list[bytes], finished: list[tuple[wire.Reply, float]], now: float,
              closing: bool = False, errors: bool = False) -> None:
        joined = data[0] if len(data) == 1 else b"".join(data)
        if finished:
            self._counted = True
        watch = not self._watching and self.limits.sendTimeout > 0
        if watch:
            # Nothing was queued when the watch last ended: what was written before this has all left.
            self._watching = True
            self._sentAtProgress = self._written
            self._progressAt = now
        self._written += len(joined)
        self._actions.append(_make(Send, (joined, finished, closing, watch, errors)))

    # Reading held: at the pipeline bound until half of it has drained, and while writes are blocked.

    def _hold(self) -> None:
        if self._paused or (self.phase is not REQUEST and self.phase is not BETWEEN):
            return  # past the last request, input is read and discarded until the close
        if self._writesBlocked or len(self._startedAts) >= self._pipeline:
            self._paused = True
            self._actions.append(PAUSE)

    def _release(self, now: float) -> None:
        if not self._paused or self._writesBlocked or len(self._startedAts) > self._lowWater:
            return
        if self.phase is not REQUEST and self.phase is not BETWEEN:
            return
        self._paused = False
        self._actions.append(RESUME)
        unread = self._unread
        if unread:
            self._keepUnread(b"", now)
            self._frame(unread, now)
        if self._readClosed and not self._paused and self.phase in (REQUEST, BETWEEN):
            self._endOfInput(now)

    # Closing.

    def _linger(self, now: float) -> None:
        """After a closing ERROR: the client may still be sending (a long line, a trickle), and closing with
        unread input would reset the connection and can lose the reply; so send FIN, read and discard until
        the client closes, C{linger} seconds pass or L{LINGER_MAX_BYTES} arrive, and only then close."""
        if self._readClosed or not self._canHalfClose or self.limits.linger <= 0:
            self._close()
            return
        self._resumeIfPaused()
        self._move(LINGER_AFTER_ERROR)
        self._actions.append(HALF_CLOSE)
        self._want(LINGER, now + self.limits.linger, now)

    def _close(self) -> None:
        self._resumeIfPaused()  # read until the transport closes, so that closing does not reset
        self._move(CLOSE_ASKED)
        self._due = [None, None, None]
        self._actions.append(CLOSE)

    def _resumeIfPaused(self) -> None:
        if self._paused:
            self._paused = False
            self._actions.append(RESUME)

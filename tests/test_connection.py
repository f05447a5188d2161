"""The connection core alone (L{primecount.connection}): no transport, no reactor, no clock but the numbers given.

Example tests pin single behaviours; L{ConnectionMachine}, a hypothesis
state machine, drives the core with random interleavings of every event it
takes (bytes split anyhow, half-closes, timers, replies in any order, writes
blocked and drained, draining, send-queue checks) and checks it against a
small reference after every step.
"""

from __future__ import annotations

from typing import Optional

from hypothesis import HealthCheck, settings, strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine, initialize, invariant, precondition, rule, run_state_machine_as_test,
)
from twisted.trial.unittest import SkipTest, SynchronousTestCase

import primecount.connection
from primecount import wire
from primecount.connection import (
    CLOSE, HALF_CLOSE, LINGER_MAX_BYTES, PAUSE, RESUME, TRANSITIONS, Abort, Action, Arm, Ask, BadMove, BufferBudget,
    Connection, Move, Phase, RequestLimits, Send, Timer,
)

KEEP = RequestLimits(keepAlive=True, quiet=0, timeout=5, idleTimeout=30, pipeline=4, sendTimeout=10)


def asked(actions: list[Action]) -> list[bytes]:
    """The requests C{actions} ask to answer."""
    return [action.raw for action in actions if isinstance(action, Ask)]


def sent(actions: list[Action]) -> bytes:
    """What C{actions} send."""
    return b"".join(action.data for action in actions if isinstance(action, Send))


def watches(actions: list[Action]) -> bool:
    """Whether C{actions} start watching the send queue."""
    return any(isinstance(action, Send) and action.watch for action in actions)


def ok(sequence: int) -> wire.Reply:
    """A made-up answer for request C{sequence}."""
    return wire.Reply(b"r%d\n" % sequence, "ok")


class FramingTests(SynchronousTestCase):
    """Bytes in, requests out."""

    def test_linesAndTheRest(self) -> None:
        """Whole lines are asked at once, a CR before the newline dropped; the rest waits for its newline."""
        core = Connection(KEEP)
        core.start(0.0)
        self.assertEqual(asked(core.received(b"aa\r\nbb\ncc", 1.0)), [b"aa", b"bb"])
        self.assertEqual(core.bufferedBytes, 2)
        self.assertEqual(asked(core.received(b"c\n", 1.5)), [b"ccc"])

    def test_oneShotAsksOnce(self) -> None:
        """Without keep-alive only the first line is asked, and the rest is discarded."""
        core = Connection(RequestLimits())
        core.start(0.0)
        self.assertEqual(asked(core.received(b"a\nb\n", 0.1)), [b"a"])
        self.assertEqual((core.phase, core.bufferedBytes), (Phase.ANSWERING, 0))

    def test_tooLongWithoutNewline(self) -> None:
        """A partial line past the limit is refused at once; one byte more for a CRLF's CR is allowed."""
        core = Connection(RequestLimits(maxLine=4, quiet=0))
        core.start(0.0)
        self.assertEqual(core.received(b"abcd\r", 0.1), [])
        actions = core.received(b"x", 0.2)
        self.assertEqual(sent(actions), b"ERROR line too long (max 4 bytes)\n")
        self.assertIn(HALF_CLOSE, actions)


class QuietGapTests(SynchronousTestCase):
    """The quiet gap ends a request sent without a newline, but only once the bytes that came during it have been
    read: a reactor that fell behind runs its timers before it reads."""

    def test_gapOverLooksOnceMore(self) -> None:
        """The gap over by the clock asks for one more look in the next turn (a timer of no delay), and only
        that look, with no byte since, ends the request."""
        core = Connection(RequestLimits(quiet=0.2))
        core.start(0.0)
        core.received(b"abc2", 0.1)
        self.assertEqual(core.timerFired(Timer.QUIET, 0.5), [Arm(Timer.QUIET, 0.0)])
        self.assertEqual(asked(core.timerFired(Timer.QUIET, 0.5)), [b"abc2"])

    def test_bytesReadBeforeTheLookJoinTheRequest(self) -> None:
        """Bytes the transport reads before that look (they had arrived while the reactor lagged) are part of
        the same request, and the gap runs again from them."""
        core = Connection(RequestLimits(quiet=0.2))
        core.start(0.0)
        core.received(b"abc2", 0.1)
        core.timerFired(Timer.QUIET, 0.5)
        self.assertEqual(asked(core.received(b"a\n", 0.5)), [b"abc2a"])
        kept = Connection(KEEP._replace(quiet=0.25))
        kept.start(0.0)
        kept.received(b"ab", 0.125)
        kept.timerFired(Timer.QUIET, 0.5)
        self.assertEqual(kept.received(b"c", 0.5), [])
        self.assertEqual(kept.timerFired(Timer.QUIET, 0.5), [Arm(Timer.QUIET, 0.25)])
        self.assertEqual(kept.timerFired(Timer.QUIET, 0.75), [Arm(Timer.QUIET, 0.0)])
        self.assertEqual(asked(kept.timerFired(Timer.QUIET, 0.75)), [b"abc"])


class DeadlineTests(SynchronousTestCase):
    """Deadlines are asked for lazily, and act only once their time has come."""

    def test_firstRequestFromConnect(self) -> None:
        """The first deadline is armed at start; firing it answers C{ERROR timeout} and lingers."""
        core = Connection(RequestLimits(timeout=5))
        self.assertEqual(core.start(10.0), [Arm(Timer.DEADLINE, 5.0)])
        actions = core.timerFired(Timer.DEADLINE, 15.0)
        self.assertEqual(sent(actions), b"ERROR timeout\n")
        self.assertEqual(core.phase, Phase.LINGERING)

    def test_wholeRequestWaitingArmsNothing(self) -> None:
        """A request already waiting whole at start is asked at once, with no deadline armed for it."""
        core = Connection(RequestLimits(timeout=5, quiet=0))
        self.assertEqual(core.start(10.0, True, b"abc\n"), [Ask(0, b"abc")])
        self.assertEqual(core.dueTimers(), {})
        actions = core.answered([(0, ok(0))], 10.0)
        self.assertEqual((sent(actions), actions[-1]), (b"r0\n", CLOSE))

    def test_partRequestWaitingArmsTheDeadline(self) -> None:
        """Part of a request waiting at start: the deadline still runs from the connect, armed once."""
        core = Connection(RequestLimits(timeout=5, quiet=0))
        self.assertEqual(core.start(10.0, True, b"ab"), [Arm(Timer.DEADLINE, 5.0)])
        self.assertEqual(asked(core.received(b"c\n", 12.0)), [b"abc"])
        keep = Connection(KEEP)
        self.assertEqual(keep.start(10.0, True, b"a\nb"), [Ask(0, b"a"), Arm(Timer.DEADLINE, 5.0)])

    def test_tooLongWaitingIsRefused(self) -> None:
        """A line over the limit waiting at start is refused as if it had been received."""
        core = Connection(RequestLimits(timeout=5, quiet=0, maxLine=3))
        actions = core.start(10.0, True, b"abcdef")
        self.assertEqual(sent(actions), b"ERROR line too long (max 3 bytes)\n")
        self.assertEqual(core.phase, Phase.LINGERING)

    def test_pipelineArmsNothingPerRequest(self) -> None:
        """A thousand whole lines, answered as they come, ask for no timer: the idle wait moves lazily."""
        core = Connection(KEEP._replace(pipeline=2000))
        core.start(0.0)
        arms = []
        for sequence in range(1000):
            actions = core.received(b"a\n", 1.0 + sequence / 1000)
            actions += core.answered([(sequence, ok(sequence))], 1.0 + sequence / 1000)
            arms += [action for action in actions if isinstance(action, Arm)]
        self.assertEqual(arms, [])
        self.assertEqual(core.dueTimers(), {Timer.DEADLINE: 1.999 + 30})

    def test_earlyFireArmsAgain(self) -> None:
        """A timer that fires before its deadline (the deadline moved on) is armed again for the rest."""
        core = Connection(KEEP)
        core.start(0.0)
        core.received(b"a\n", 1.0)
        core.answered([(0, ok(0))], 1.0)
        self.assertEqual(core.timerFired(Timer.DEADLINE, 5.0), [Arm(Timer.DEADLINE, 26.0)])
        self.assertEqual(core.timerFired(Timer.DEADLINE, 31.0), [CLOSE])

    def test_trickleDoesNotExtend(self) -> None:
        """Bytes trickled one at a time never move a request's deadline."""
        core = Connection(RequestLimits(timeout=5, quiet=0))
        core.start(0.0)
        for second in range(1, 5):
            self.assertEqual(core.received(b"a", float(second)), [])
        self.assertEqual(sent(core.timerFired(Timer.DEADLINE, 5.0)), b"ERROR timeout\n")


class PipelineBoundTests(SynchronousTestCase):
    """Reading pauses at the bound and resumes only once half of it has drained."""

    def test_hysteresis(self) -> None:
        """With a bound of 4: paused at 4 unanswered; still paused at 3; resumed at 2, and the held lines framed."""
        core = Connection(KEEP._replace(sendTimeout=0))
        core.start(1.0)
        actions = core.received(b"".join(b"%d\n" % n for n in range(8)), 1.0)
        self.assertEqual((asked(actions), actions[-1]), ([b"0", b"1", b"2", b"3"], PAUSE))
        self.assertEqual(core.bufferedBytes, 8)
        self.assertEqual(core.answered([(0, ok(0))], 1.1), [Send(b"r0\n", [(ok(0), 1.0)])])
        actions = core.answered([(1, ok(1))], 1.2)
        self.assertEqual(actions[:2], [Send(b"r1\n", [(ok(1), 1.0)]), RESUME])
        self.assertEqual(asked(actions), [b"4", b"5"])
        self.assertEqual(actions[-1], PAUSE)

    def test_batchLeavesInOneWrite(self) -> None:
        """Replies made ready together leave in one L{Send}, in request order whatever order they came in."""
        core = Connection(KEEP)
        core.start(1.0)
        core.received(b"a\nb\nc\n", 1.0)
        actions = core.answered([(2, ok(2)), (0, ok(0)), (1, ok(1))], 1.5)
        self.assertEqual([action for action in actions if isinstance(action, Send)],
                         [Send(b"r0\nr1\nr2\n", [(ok(0), 1.0), (ok(1), 1.0), (ok(2), 1.0)], watch=True)])

    def test_writesBlockedUntilDrained(self) -> None:
        """A full write buffer pauses reading until it drains, even with nothing unanswered."""
        core = Connection(KEEP)
        core.start(0.0)
        self.assertEqual(core.writesBlocked(), [PAUSE])
        self.assertEqual(core.received(b"a\n", 1.0), [], "held, not framed")
        self.assertEqual(asked(core.writesDrained(2.0)), [b"a"])


class SendDeadlineTests(SynchronousTestCase):
    """Only output that makes no progress for the whole send deadline is given up."""

    def started(self) -> Connection:
        """A kept connection that has sent one 3-byte reply and is watching it."""
        core = Connection(KEEP)
        core.start(0.0)
        core.received(b"a\n", 0.0)
        self.assertTrue(watches(core.answered([(0, ok(0))], 0.0)))
        return core

    def test_stuck(self) -> None:
        """Output that stays queued from the write on is aborted once the deadline has passed, not before."""
        core = self.started()
        self.assertEqual(core.sendChecked(3, 9.9), [])
        self.assertEqual(core.sendChecked(3, 10.0), [Abort("send_timeout")])
        self.assertEqual((core.watchingSend, core.phase), (False, Phase.CLOSED))

    def test_slowButMoving(self) -> None:
        """A client that takes a byte every few seconds is never aborted, even while more is written."""
        core = self.started()
        queued = 3
        for sequence in range(1, 20):
            core.received(b"a\n", sequence * 5.0)
            core.answered([(sequence, ok(sequence))], sequence * 5.0)
            queued += len(ok(sequence).data) - 1
            self.assertEqual(core.sendChecked(queued, sequence * 5.0), [])

    def test_drainedIsForgotten(self) -> None:
        """Once the output has all left, the connection is no longer watched; the next write watches again."""
        core = self.started()
        self.assertEqual(core.sendChecked(0, 1.0), [])
        self.assertFalse(core.watchingSend)
        core.received(b"b\n", 2.0)
        self.assertTrue(watches(core.answered([(1, ok(1))], 2.0)))


class ClosingTests(SynchronousTestCase):
    """How each way of ending a connection ends."""

    def test_refusal(self) -> None:
        """A refusal sends its ERROR at start and lingers, reading nothing."""
        core = Connection(RequestLimits(linger=2), refusal=wire.BUSY)
        actions = core.start(0.0)
        self.assertEqual(sent(actions), b"ERROR busy\n")
        self.assertIn(HALF_CLOSE, actions)
        self.assertEqual(core.received(b"a\n", 0.5), [])
        self.assertEqual(core.timerFired(Timer.LINGER, 2.0), [CLOSE])

    def test_lingerBoundedInBytes(self) -> None:
        """Lingering ends once a megabyte has been discarded."""
        core = Connection(RequestLimits(linger=60), refusal=wire.BUSY)
        core.start(0.0)
        self.assertEqual(core.received(b"x" * LINGER_MAX_BYTES, 1.0), [])
        self.assertEqual(core.received(b"x", 1.0), [CLOSE])

    def test_noHalfCloseTransport(self) -> None:
        """On a transport that cannot half-close, an ERROR closes outright."""
        core = Connection(RequestLimits(maxLine=1))
        core.start(0.0, canHalfClose=False)
        self.assertEqual(core.received(b"abc", 0.1)[-1], CLOSE)

    def test_drainBetweenRequests(self) -> None:
        """Draining closes a kept connection between requests at once, and one mid-request after its reply."""
        between, midway = Connection(KEEP), Connection(KEEP)
        for core in (between, midway):
            core.start(0.0)
            core.received(b"a\n", 0.0)
            core.answered([(0, ok(0))], 0.0)
        midway.received(b"b", 1.0)
        self.assertEqual(between.stopTakingRequests(2.0), [CLOSE])
        self.assertEqual(midway.stopTakingRequests(2.0), [])
        self.assertEqual(asked(midway.received(b"\nc\n", 2.5)), [b"b"])
        self.assertEqual(midway.answered([(1, ok(1))], 3.0)[-1], CLOSE)

    def test_nothingAfterLost(self) -> None:
        """Once the connection is gone, late replies and timers do nothing."""
        core = Connection(KEEP)
        core.start(0.0)
        core.received(b"a\n", 0.0)
        core.lost()
        self.assertEqual(core.answered([(0, ok(0))], 1.0), [])
        self.assertEqual(core.timerFired(Timer.DEADLINE, 100.0), [])


ALPHABET = st.sampled_from([b"a", b"b", b"\n", b"\r", b"\r\n", b"\xff", b"aaaaaa", b"ab\nab\n", b"\n\n\n"])
CHUNKS = st.lists(ALPHABET, min_size=1, max_size=6).map(b"".join)


class BufferBudgetTests(SynchronousTestCase):
    """Connections share one budget of held request bytes: the one that would pass it is refused, and every
    byte is given back when its line ends or its connection goes."""

    def test_theConnectionThatWouldPassItIsBusy(self) -> None:
        """With 60 of 100 bytes held by one connection, another's 50-byte partial line gets C{ERROR busy}, while a
        whole line in one read is answered as ever; the first finishes its line and frees its bytes."""
        budget = BufferBudget(100)
        first, second, third = (Connection(RequestLimits(quiet=0), budget=budget) for _ in range(3))
        for connection in (first, second, third):
            connection.start(0.0)
        first.received(b"x" * 60, 0.1)
        refused = second.received(b"y" * 50, 0.2)
        self.assertEqual(refused[0], Send(b"ERROR busy\n", refused[0].finished, closing=True, watch=True,
                                          errors=True))
        self.assertEqual(budget.held, 60)
        self.assertIsInstance(third.received(b"z" * 50 + b"\n", 0.3)[0], Ask)
        first.received(b"\n", 0.4)
        self.assertEqual(budget.held, 0)

    def test_givenBackWhenGone(self) -> None:
        """A connection that goes away, or is refused for its line's length, holds nothing any more."""
        budget = BufferBudget(1000)
        gone, tooLong = Connection(RequestLimits(quiet=0), budget=budget), Connection(
            RequestLimits(quiet=0, maxLine=10), budget=budget)
        gone.start(0.0)
        tooLong.start(0.0)
        gone.received(b"abc", 0.1)
        tooLong.received(b"12345", 0.1)
        self.assertEqual(budget.held, 8)
        gone.lost()
        tooLong.received(b"6789012", 0.2)
        self.assertEqual(budget.held, 0)

    def test_heldWhileReadingPausedCounts(self) -> None:
        """Lines a pipelining client sent past the pipeline bound count while they wait to be framed."""
        budget = BufferBudget(16)
        connection = Connection(KEEP._replace(pipeline=1), budget=budget)
        connection.start(0.0)
        connection.received(b"one\ntwo\nthree\n", 0.1)
        self.assertEqual(budget.held, len(b"two\nthree\n"))
        self.assertEqual(connection.received(b"four\n", 0.2), [])  # within the budget: kept for its turn
        self.assertEqual(budget.held, len(b"two\nthree\nfour\n"))
        connection.received(b"xx", 0.3)  # past it: the connection answers what it took, then ERROR busy
        self.assertEqual((budget.held, connection.phase), (0, Phase.ANSWERING))
        sent = connection.answered([(0, wire.countReply(1, False))], 0.4)
        self.assertEqual([a.data for a in sent if isinstance(a, Send)], [b"1 no\nERROR busy\n"])

    def test_aByteHeldCostsAboutAByte(self) -> None:
        """10,000 bytes of a line in two-byte reads cost about 10 KB of memory, not an object per read."""
        try:
            import tracemalloc
        except ImportError:
            raise SkipTest("this interpreter has no tracemalloc (PyPy); probe_quiet_failures.py measures RSS")

        connection = Connection(RequestLimits(quiet=0, maxLine=100_000), budget=BufferBudget(1 << 20))
        connection.start(0.0)
        tracemalloc.start()
        try:
            before = tracemalloc.take_snapshot()
            for n in range(5_000):
                connection.received(b"%02d" % (n % 100), 0.1)  # a new object per read, as a socket's are
            grown = sum(stat.size_diff for stat in tracemalloc.take_snapshot().compare_to(before, "filename"))
        finally:
            tracemalloc.stop()
        self.assertEqual(connection.bufferedBytes, 10_000)
        self.assertLess(grown, 2 * 10_000)


class TransitionTableTests(SynchronousTestCase):
    """The table of phases and moves, in code and in the module's docstring."""

    def test_docstringIsTheTable(self) -> None:
        """The table in connection.py's docstring lists exactly the moves of L{TRANSITIONS}."""
        documented = set()
        for line in primecount.connection.__doc__.splitlines():
            words = line.split()
            if words[:3] == ["any", "but", "CLOSED"]:
                starts, words = [phase for phase in Phase if phase is not Phase.CLOSED], words[3:]
            elif words[:1] == ["any"]:
                starts, words = list(Phase), words[1:]
            elif words[:1] and words[0] in Phase.__members__:
                starts, words = [Phase[words[0]]], words[1:]
            else:
                continue
            if len(words) >= 2 and words[0] in Move.__members__ and words[1] in Phase.__members__:
                documented.update((start, Move[words[0]], Phase[words[1]]) for start in starts)
        inCode = {(phase, move, after) for phase, moves in TRANSITIONS.items() for move, after in moves.items()}
        self.assertEqual(documented, inCode)

    def test_moveNotInTheTable(self) -> None:
        """A move the table does not list from the current phase is refused, and the phase stays."""
        core = Connection(RequestLimits())
        with self.assertRaises(BadMove):
            core._move(Move.LINGER)
        self.assertIs(core.phase, Phase.REQUEST)
        core.lost()
        with self.assertRaises(BadMove):
            core._move(Move.NEXT_REQUEST)
        self.assertIs(core.phase, Phase.CLOSED)


class RecordingConnection(Connection):
    """The connection core, remembering every move it makes (for the model's checks)."""

    __slots__ = ("moves",)

    def _move(self, move: Move) -> None:
        before = self.phase
        super()._move(move)
        self.moves.append((before, move, self.phase))


class ConnectionMachine(RuleBasedStateMachine):
    """Random interleavings of every event, checked against a reference of what the core may do."""

    @initialize(keepAlive=st.booleans(), pipeline=st.integers(1, 4), maxLine=st.integers(3, 10),
                quiet=st.sampled_from([0.0, 0.2]), canHalfClose=st.booleans(),
                waiting=st.one_of(st.just(b""), CHUNKS),
                budget=st.one_of(st.none(), st.tuples(st.integers(1, 24), st.integers(0, 24))))
    def open(self, keepAlive: bool, pipeline: int, maxLine: int, quiet: float, canHalfClose: bool,
             waiting: bytes, budget: Optional[tuple[int, int]]) -> None:
        """A connection opens at time 0, with C{waiting} already received; with C{budget} (a limit, and how
        much of it other connections hold), the bytes it holds count against a shared buffer budget."""
        self.limits = RequestLimits(timeout=1.0, quiet=quiet, maxLine=maxLine, linger=0.5, keepAlive=keepAlive,
                                    pipeline=pipeline, idleTimeout=3.0, sendTimeout=2.0)
        self.budget, self.others = None, 0
        if budget is not None:
            self.budget, self.others = BufferBudget(budget[0]), min(budget)
            self.budget.held = self.others
        self.heldBefore, self.lastReceived, self.stoppedOverBudget = 0, len(waiting), False
        self.core = RecordingConnection(self.limits, budget=self.budget)
        self.core.moves = []
        self.checkedMoves = 0
        self.lastSent = b""
        self.now = 0.0
        self.armed: dict[Timer, float] = {}
        self.asked: dict[int, bytes] = {}
        self.given: dict[int, bytes] = {}  # the replies handed to the core
        self.outstanding: list[int] = []  # asked, not yet answered
        self.nextSent = 0  # the sequence number whose reply must come next
        self.pending = b""  # bytes received and not yet part of an asked request (while the core reads)
        self.reading = True
        self.stopped: tuple[bytes, Optional[float], float] = (b"", None, 0.0)
        self.requestStart: Optional[float] = 0.0
        self.paused = False
        self.sincePause = 0
        self.clientClosed = False
        self.serverClosed = False  # CLOSE or Abort carried out
        self.finSent = False
        self.aborted = False
        self.closingSequence: Optional[int] = None
        self.written = 0
        self.left = 0
        self.progressAt = 0.0
        self.pending = waiting
        self.carryOut(self.core.start(0.0, canHalfClose, waiting), received=len(waiting))

    # Carrying out the core's actions, checking each against the reference.

    def carryOut(self, actions: list[Action], received: Optional[int] = None) -> None:
        """Check and apply C{actions}; C{received}: the size of the bytes this event delivered."""
        wasPaused = self.paused
        for action in actions:
            if self.serverClosed:  # only the send deadline may still act: a close waits for the output to leave
                assert isinstance(action, Abort) and not self.aborted, f"{action} after the connection was closed"
            if isinstance(action, Send):
                assert not self.finSent, "bytes sent after FIN"
                self.checkSend(action)
                if action.watch:
                    self.progressAt = self.now
            elif isinstance(action, Ask):
                self.checkAsk(action)
            elif isinstance(action, Arm):
                assert action.delay >= 0
                self.armed[action.timer] = self.now + action.delay
            elif action is PAUSE:
                assert not self.paused, "paused twice"
                self.paused = True
            elif action is RESUME:
                assert self.paused, "resumed while reading"
                self.paused = False
            elif action is HALF_CLOSE:
                self.finSent = True
            elif action is CLOSE or isinstance(action, Abort):
                self.serverClosed, self.armed = True, {}
                self.aborted = isinstance(action, Abort)
        if self.paused:
            self.sincePause = (self.sincePause if wasPaused else 0) + (received or 0)
        if self.reading and self.core.phase not in (Phase.REQUEST, Phase.BETWEEN):
            self.reading = False  # what was left unasked, and when, for checking a refusal sent later
            self.stopped = (self.pending, self.requestStart, self.now)
            self.pending = b""
            self.stoppedOverBudget = self.overBudget()

    def checkAsk(self, action: Ask) -> None:
        """A request asked is exactly the next line of the input, or all of it at a quiet gap or half-close."""
        raw = action.raw
        if self.pending.startswith(raw + b"\r\n") and (raw + b"\r\n").count(b"\n") == 1:
            self.pending = self.pending[len(raw) + 2:]
        elif self.pending.startswith(raw + b"\n") and b"\n" not in raw:
            self.pending = self.pending[len(raw) + 1:]
        else:
            assert raw == self.pending and b"\n" not in raw, f"asked {raw!r}, input was {self.pending!r}"
            self.pending = b""
        assert len(raw) <= self.limits.maxLine + 1
        self.asked[action.sequence] = raw
        self.outstanding.append(action.sequence)
        self.requestStart = self.now if self.pending else None

    def checkSend(self, action: Send) -> None:
        """A write holds the next replies in request order; a refusal is the last thing sent."""
        data = self.lastSent = action.data
        self.written += len(data)
        while data:
            sequence = self.nextSent
            if sequence in self.asked:
                reply = self.given.get(sequence)
                assert reply is not None and data.startswith(reply), f"reply {sequence} out of order: {data!r}"
                data = data[len(reply):]
                if reply.startswith(b"ERROR internal"):
                    self.closingSequence = sequence
            else:
                tooLong = f"ERROR line too long (max {self.limits.maxLine} bytes)\n".encode()
                pending, requestStart, stoppedAt = self.stopped if not self.reading else (
                    self.pending, self.requestStart, self.now)  # stopped by this very event
                if data == b"ERROR timeout\n":
                    assert requestStart is not None and stoppedAt >= requestStart + self.limits.timeout
                elif data == b"ERROR busy\n":
                    assert self.budget is not None, "busy without a budget"
                    assert (self.stoppedOverBudget if not self.reading else self.overBudget()), "busy within it"
                else:
                    assert data == tooLong, f"unexpected {data!r}"
                    line = pending.split(b"\n")[0]
                    if b"\n" in pending:
                        assert len(line.removesuffix(b"\r")) > self.limits.maxLine
                    else:
                        assert len(line) > self.limits.maxLine + (line.endswith(b"\r") and 1)
                assert action.closing, "a refusal closes"
                self.closingSequence = sequence
                data = b""
            self.nextSent += 1

    def overBudget(self) -> bool:
        """Whether the bytes held before the last receive, and those it brought, would pass the budget."""
        return self.budget is not None and self.others + self.heldBefore + self.lastReceived > self.budget.limit

    # Events.

    @precondition(lambda self: not self.clientClosed and not self.serverClosed)
    @rule(data=CHUNKS)
    def receive(self, data: bytes) -> None:
        """The client sends some bytes."""
        if self.core.phase in (Phase.REQUEST, Phase.BETWEEN):
            if not self.pending and self.requestStart is None:
                self.requestStart = self.now
            self.pending += data
        self.heldBefore, self.lastReceived = self.core.bufferedBytes, len(data)
        self.carryOut(self.core.received(data, self.now), received=len(data))

    @precondition(lambda self: not self.clientClosed and not self.serverClosed)
    @rule()
    def halfClose(self) -> None:
        """The client half-closes."""
        self.clientClosed = True
        self.carryOut(self.core.halfClosed(self.now))

    @rule(seconds=st.sampled_from([0.0, 0.1, 0.2, 0.3, 0.5, 1.0, 2.5, 4.0]))
    def advance(self, seconds: float) -> None:
        """Time passes; timers fire in order, as a reactor's would."""
        target = self.now + seconds
        while self.armed and min(self.armed.values()) <= target:
            timer = min(self.armed, key=self.armed.__getitem__)
            self.now = max(self.now, self.armed.pop(timer))
            self.carryOut(self.core.timerFired(timer, self.now))
            self.checkDeadlines()
        self.now = target

    @precondition(lambda self: self.outstanding)
    @rule(data=st.data())
    def answer(self, data: st.DataObject) -> None:
        """Some of the outstanding requests are answered together, in any order."""
        chosen = data.draw(st.lists(st.sampled_from(self.outstanding), min_size=1, unique=True))
        replies = []
        for sequence in chosen:
            kind = data.draw(st.sampled_from(["ok", "ok", "ok", "empty", "internal"]))
            reply = {"ok": ok(sequence), "empty": wire.errorReply(wire.EMPTY_MESSAGE),
                     "internal": wire.errorReply(wire.INTERNAL_ERROR, closes=True)}[kind]
            self.given[sequence] = reply.data
            self.outstanding.remove(sequence)
            replies.append((sequence, reply))
        self.carryOut(self.core.answered(replies, self.now))

    @rule()
    def writesBlocked(self) -> None:
        """The transport's write buffer fills."""
        self.carryOut(self.core.writesBlocked())

    @rule()
    def writesDrained(self) -> None:
        """The transport's write buffer drains."""
        self.carryOut(self.core.writesDrained(self.now))

    @rule()
    def stopTakingRequests(self) -> None:
        """The service starts draining."""
        self.carryOut(self.core.stopTakingRequests(self.now))

    @rule(taken=st.integers(0, 8))
    def sendChecked(self, taken: int) -> None:
        """The client takes some of the output, and the send queue is checked."""
        if taken and self.left < self.written:
            self.left = min(self.written, self.left + taken)
            self.progressAt = self.now
        was = self.core.watchingSend
        actions = self.core.sendChecked(self.written - self.left, self.now)
        if actions:
            assert was and self.now - self.progressAt >= self.limits.sendTimeout, "aborted while progressing"
        self.carryOut(actions)

    # Invariants.

    @invariant()
    def buffersBounded(self) -> None:
        """The current line never holds more than the limit (and a CR); unframed bytes only while paused."""
        assert self.core._partialSize <= self.limits.maxLine + 1
        unread = self.core.bufferedBytes - self.core._partialSize
        assert unread <= (self.sincePause + self.limits.maxLine + 1 if self.paused else 0), "held too much"

    @invariant()
    def budgetKept(self) -> None:
        """The shared budget counts exactly what this connection holds (and the others' share), never more
        than its limit; once the connection is gone, none of it."""
        if self.budget is not None:
            assert self.budget.held == self.others + self.core.bufferedBytes, "the budget lost count"
            assert self.budget.held <= max(self.budget.limit, self.others)
            if self.serverClosed:
                assert self.core.bufferedBytes == 0

    @invariant()
    def checkDeadlines(self) -> None:
        """A request being read is still within its deadline, and a timer is armed no later than it."""
        started = self.core.requestStartedAt
        if started is not None:
            assert self.now < started + self.limits.timeout, "a request outlived its deadline"
        for timer, due in self.core.dueTimers().items():
            assert timer in self.armed and self.armed[timer] <= due, f"{timer} due at {due}, not armed by then"

    @invariant()
    def somethingEndsIt(self) -> None:
        """An open connection always has a timer to end it, replies on their way, or output under watch."""
        if self.serverClosed:
            return
        assert self.core.dueTimers() or self.outstanding or self.core.watchingSend, f"stuck in {self.core.phase}"

    @invariant()
    def movesAlongTheTable(self) -> None:
        """Every change of phase was a move of the table, made by C{_move} (the phase is the last one's end),
        and agrees with what the model saw: one-shot connections never keep or start another request, a
        lingering close follows an ERROR, and the phase is CLOSED exactly when a close or abort went
        out, LINGERING exactly when FIN went out before that."""
        moves = self.core.moves
        for before, move, after in moves[self.checkedMoves:]:
            assert TRANSITIONS[before].get(move) is after, f"{move.name} from {before.name} to {after.name}"
            if move in (Move.KEEP, Move.NEXT_REQUEST):
                assert self.limits.keepAlive, f"{move.name} on a one-shot connection"
            if move is Move.LINGER:
                assert self.lastSent.rstrip(b"\n").split(b"\n")[-1].startswith(b"ERROR"), "lingering after no ERROR"
        self.checkedMoves = len(moves)
        phase = self.core.phase
        assert phase is (moves[-1][2] if moves else Phase.REQUEST), f"{phase.name} set outside _move"
        assert (phase is Phase.CLOSED) == self.serverClosed, f"{phase.name}, closed: {self.serverClosed}"
        if not self.serverClosed:
            assert (phase is Phase.LINGERING) == self.finSent, f"{phase.name}, FIN sent: {self.finSent}"

    def teardown(self) -> None:
        """Let everything finish: every request asked before a closing reply has had its reply, exactly once."""
        if not hasattr(self, "core"):
            return
        for _ in range(200):
            if self.serverClosed:
                break
            if self.outstanding:
                sequence = self.outstanding[0]
                self.given[sequence] = ok(sequence).data
                self.outstanding.remove(sequence)
                self.carryOut(self.core.answered([(sequence, ok(sequence))], self.now))
            elif not self.clientClosed:
                self.halfClose()
            else:
                self.writesDrained()
                self.left = self.written
                self.advance(4.0)
        assert self.serverClosed, f"never closed: {self.core.phase}"
        if not self.aborted:
            end = self.closingSequence if self.closingSequence is not None else max(self.asked, default=-1)
            assert self.nextSent > end, f"replies up to {end} owed, {self.nextSent} sent"


class ConnectionMachineTests(SynchronousTestCase):
    """The connection core under random interleavings of all its events."""

    def test_randomInterleavings(self) -> None:
        """400 random runs of up to 40 events each keep every invariant, and every connection ends owing nothing."""
        run_state_machine_as_test(ConnectionMachine, settings=settings(
            max_examples=400, stateful_step_count=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]))

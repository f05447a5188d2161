"""C{follow}'s bookkeeping for a table many writers commit to (L{FollowHorizon}), without a database.

L{FollowMachine}, a hypothesis state machine, plays writers that take row ids,
get their transaction ids late, and commit or abort in any order, with polls
between any two steps, answering each poll's queries from its own model of
what the snapshot sees; every committed row must be printed exactly once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from hypothesis import HealthCheck, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule, run_state_machine_as_test
from twisted.trial.unittest import SynchronousTestCase

from primecount.tools.tablerecords import XID_SPACE, FollowHorizon, Snapshot

READ_MOST = 2  # rows a modelled poll reads past the cursor, small so that polls fall behind


@dataclass
class Writer:
    """One writer's transaction: its transaction id once it has one, the row ids it took, and how many polls
    had been made when it took its first id without a transaction id."""

    xid: Optional[int] = None
    ids: list[int] = field(default_factory=list)
    waitingSincePoll: Optional[int] = None


class FollowMachine(RuleBasedStateMachine):
    """A table's writers and one follower, stepped in any order."""

    def __init__(self) -> None:
        super().__init__()
        self.nextId, self.nextXid = 1, XID_SPACE - 3  # transaction ids wrap around modulo 2**32 in xmin
        self.writers: list[Writer] = []
        self.committed: dict[int, int] = {}  # row id -> the transaction that inserted it
        self.polls = 0
        self.printed: list[int] = []
        self.horizon = FollowHorizon(0, self.snapshot(), 0.0, settleMost=float("inf"))

    def snapshot(self) -> Snapshot:
        """What a snapshot taken now says of the writers."""
        return Snapshot(frozenset(w.xid for w in self.writers if w.xid is not None), self.nextXid)

    def commit(self, writer: Writer) -> None:
        """The writer commits: its rows, inserted under its transaction id, become visible at once."""
        self.writers.remove(writer)
        if writer.ids:
            self.giveXid(writer)
            self.committed.update((rowId, writer.xid) for rowId in writer.ids)  # type: ignore[misc]

    def giveXid(self, writer: Writer) -> None:
        """The writer's first row reaches the heap: it gets its transaction id."""
        if writer.xid is None:
            writer.xid, self.nextXid = self.nextXid, self.nextXid + 1
        writer.waitingSincePoll = None

    @rule(data=st.data(), newWriter=st.booleans(), getsXidAtOnce=st.booleans())
    def takeId(self, data: st.DataObject, newWriter: bool, getsXidAtOnce: bool) -> None:
        """A writer, new or running, takes the next row id (nextval); its transaction id may come later."""
        if newWriter or not self.writers:
            self.writers.append(Writer())
        writer = self.writers[-1] if newWriter else data.draw(st.sampled_from(self.writers))
        writer.ids.append(self.nextId)
        self.nextId += 1
        if getsXidAtOnce:
            self.giveXid(writer)
        elif writer.xid is None and writer.waitingSincePoll is None:
            writer.waitingSincePoll = self.polls

    @precondition(lambda self: self.writers)
    @rule(data=st.data(), commits=st.sampled_from([True, True, False]))
    def end(self, data: st.DataObject, commits: bool) -> None:
        """A writer commits (its rows become visible at once) or aborts."""
        writer = data.draw(st.sampled_from(self.writers))
        if commits:
            self.commit(writer)
        else:
            self.writers.remove(writer)  # its ids are never seen

    @rule()
    def poll(self) -> None:
        """follow polls: the late rows and the rows past the cursor, as L{tablerecords._poll} asks for them."""
        for writer in self.writers:  # the bound the horizon relies on: a transaction id by the second poll after
            if writer.waitingSincePoll is not None and writer.waitingSincePoll < self.polls:
                self.giveXid(writer)
        self.polls += 1
        snapshot, horizon = self.snapshot(), self.horizon
        late: list[int] = []
        lateRange = horizon.lateRange()
        if lateRange is not None:
            above, upTo = lateRange
            late = [i for i in sorted(self.committed)
                    if above < i <= upTo and horizon.isLate(self.committed[i] % XID_SPACE)]
        rows = [i for i in sorted(self.committed) if i > horizon.cursor][:READ_MOST]
        self.printed += late + rows
        horizon.polled(snapshot, rows[-1] if rows else None, float(self.polls))

    @invariant()
    def eachCommittedRowPrintedAtMostOnce(self) -> None:
        """Nothing printed twice, nothing printed that was not committed."""
        assert len(self.printed) == len(set(self.printed)), self.printed
        assert set(self.printed) <= set(self.committed), (self.printed, self.committed)

    def teardown(self) -> None:
        """Once every writer has ended and follow has caught up, every committed row has been printed."""
        for writer in list(self.writers):
            self.commit(writer)
        for _ in range(len(self.committed) // READ_MOST + 3):
            self.poll()
        self.eachCommittedRowPrintedAtMostOnce()
        assert sorted(self.printed) == sorted(self.committed), (sorted(self.printed), sorted(self.committed))


class FollowHorizonTests(SynchronousTestCase):
    """The horizon, example by example and as a state machine."""

    def test_rowCommittedBelowThePrintedOnesIsLate(self) -> None:
        """A writer running at a poll commits a row below the cursor: the next poll looks for it, by its xid."""
        horizon = FollowHorizon(0, Snapshot(frozenset(), 10), 0.0)
        horizon.polled(Snapshot(frozenset({10}), 12), 2, 1.0)  # row 2 (xid 11) read; xid 10 holds row 1
        self.assertEqual(horizon.lateRange(), (0, 2))
        self.assertTrue(horizon.isLate(10))
        self.assertFalse(horizon.isLate(9), "finished before the last poll: already visible then")
        self.assertTrue(horizon.isLate(12), "began since the last poll")

    def test_writerWithoutXidAtAPollIsWaitedFor(self) -> None:
        """A writer took row 1 but had no transaction id yet when a poll read row 2: the horizon stays below 2
        while it runs, and its row is late once it commits, whatever id it got."""
        horizon = FollowHorizon(0, Snapshot(frozenset(), 10), 0.0)
        horizon.polled(Snapshot(frozenset(), 11), 2, 1.0)  # xid 10 committed row 2; the writer of row 1 has no xid
        self.assertTrue(horizon.isLate(11), "its transaction id came after the poll")
        horizon.polled(Snapshot(frozenset({11}), 12), None, 2.0)  # now it has one, and still runs
        self.assertEqual(horizon.lateRange(), (0, 2))
        self.assertTrue(horizon.isLate(11), "running at the last poll")

    def test_lowWaitsForTheNextPollsWriters(self) -> None:
        """The horizon moves past a poll's cursor only once the writers running at it and at the next poll
        have all ended."""
        horizon = FollowHorizon(0, Snapshot(frozenset(), 10), 0.0)
        horizon.polled(Snapshot(frozenset({10}), 11), 5, 1.0)
        horizon.polled(Snapshot(frozenset({10}), 11), 5, 2.0)
        self.assertEqual(horizon.low, 0)
        horizon.polled(Snapshot(frozenset({11}), 12), 7, 3.0)
        self.assertEqual(horizon.low, 5, "10 has ended; 11 began after the cursor was 5")
        horizon.polled(Snapshot(frozenset(), 12), None, 4.0)
        self.assertEqual(horizon.low, 7)

    def test_writerRunningTooLongIsNoLongerWaitedFor(self) -> None:
        """Past C{settleMost} seconds a writer still running no longer holds the horizon back."""
        horizon = FollowHorizon(0, Snapshot(frozenset({5}), 6), 0.0, settleMost=60.0)
        horizon.polled(Snapshot(frozenset({5}), 6), 3, 30.0)
        self.assertEqual(horizon.low, 0)
        horizon.polled(Snapshot(frozenset({5}), 6), 4, 95.0)
        self.assertEqual(horizon.low, 3, "the poll of 30 s is 65 s old; the one of 95 s is not")

    def test_isLateAcrossWraparound(self) -> None:
        """Transaction ids compare modulo 2**32, as PostgreSQL's own do: one begun since is late after a wrap."""
        horizon = FollowHorizon(0, Snapshot(frozenset(), XID_SPACE - 1), 0.0)
        horizon.polled(Snapshot(frozenset(), XID_SPACE - 1), 1, 1.0)
        self.assertTrue(horizon.isLate((XID_SPACE + 3) % XID_SPACE))
        self.assertFalse(horizon.isLate(XID_SPACE - 2))

    def test_machine(self) -> None:
        """Writers committing in any order, polls anywhere between: every committed row printed exactly once."""
        run_state_machine_as_test(FollowMachine, settings=settings(
            max_examples=300, stateful_step_count=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]))

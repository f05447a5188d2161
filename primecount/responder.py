"""Turns finished requests into typed replies, one reactor turn's requests at a time: one pool call analyses
them, one write stores their records, and only then are the replies released; a batch that is not through
within its deadline is answered C{ERROR} all the same, never left without a reply."""

from __future__ import annotations

from collections import deque
from typing import Any, Mapping, Optional, Protocol

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from primecount import wire
from primecount.limits import Throttle
from primecount.records.formats import Record
from primecount.records.store import IRecordsStore, RunInThread, StorageUnavailable
from primecount.records.table import isDatabaseURI

# Seconds a request, once it has ended, may wait for its analysis and its record before it is answered ERROR
# all the same (a pool that cannot start a thread, a store stuck past its own bounds). The stores' own bounds
# (--records-timeout, the file lock's wait) come first; this is the last resort.
REPLY_DEADLINE = 10.0


def replyDeadline(options: Mapping[str, Any]) -> float:
    """The reply deadline for these options: L{REPLY_DEADLINE}, or a second past C{--records-timeout} when that is
    longer (a table's own bound comes first)."""
    if isDatabaseURI(options["records"]):
        return max(REPLY_DEADLINE, options["records-timeout"] + 1.0)
    return REPLY_DEADLINE


class Requester(Protocol):
    """Who asked: a connection, told once per batch of the replies to its requests in that batch."""

    def answered(self, replies: list[tuple[int, wire.Reply]]) -> None:
        """The replies to the requests asked with these sequence numbers, in the order asked."""


class _Batch:
    """One pool call's requests on their way to their replies: when they are too late, what analysis found
    (once it has returned), and whether they have been answered."""

    __slots__ = ("entries", "due", "outcomes", "answered")

    def __init__(self, entries: list[tuple[bytes, str, Requester, int]], due: float) -> None:
        self.entries = entries
        self.due = due
        self.outcomes: Optional[list[wire.Outcome]] = None
        self.answered = False


class Responder:
    """Answers finished requests: analysis off the reactor thread, every record written, then the replies,
    handed to each connection once per batch (no Deferred per request); a batch past C{replyDeadline} seconds is
    answered C{ERROR internal error} (not analysed) or C{ERROR storage unavailable} (not stored)."""

    log = Logger()

    def __init__(self, clock: IReactorTime, runInThread: RunInThread, records: IRecordsStore,
                 replyDeadline: float = REPLY_DEADLINE) -> None:
        self._clock = clock
        self._runInThread = runInThread
        self._records = records
        self._replyDeadline = replyDeadline
        self._pending: list[tuple[bytes, str, Requester, int]] = []
        self._dispatchCall: Optional[IDelayedCall] = None
        self._analysing = 0  # pool calls not yet returned
        self._inFlight: deque[_Batch] = deque()  # batches not yet answered, oldest first
        self._deadlineCall: Optional[IDelayedCall] = None  # for the oldest of them
        self._failureLog = Throttle()
        self._lateLog = Throttle()

    def respond(self, raw: bytes, client: str, requester: Requester, sequence: int) -> None:
        """Answer the request C{raw} from C{client} at the end of this turn: C{requester.answered} gets its
        reply, with C{sequence}, once its record (if it is an answer) is stored."""
        self._pending.append((raw, client, requester, sequence))
        if self._dispatchCall is None:
            self._dispatchCall = self._clock.callLater(0, self._dispatch)

    def _dispatch(self) -> None:
        self._dispatchCall = None
        entries, self._pending = self._pending, []
        batch = _Batch(entries, self._clock.seconds() + self._replyDeadline)
        self._inFlight.append(batch)
        if self._deadlineCall is None:
            self._deadlineCall = self._clock.callLater(self._replyDeadline, self._tooLate)
        self._analysing += 1
        if self._analysing == 1:
            self._records.gathering(True)
        evaluated: Deferred[list[wire.Outcome]] = self._runInThread(wire.evaluateAll, [entry[0] for entry in entries])
        evaluated.addBoth(self._analysed)
        evaluated.addCallback(self._record, batch)
        evaluated.addErrback(self._internalError, len(entries))
        evaluated.addCallback(self._release, batch)

    def _analysed(self, result: object) -> object:
        """A pool call returned (whatever its result)."""
        self._analysing -= 1
        return result

    def _settled(self) -> None:
        """After a returned call's write: tell the sink whether more records are on their way (told after every
        call, so that a sink bounding its wait sees the time pass even when analysis never stops)."""
        self._records.gathering(self._analysing > 0)

    def _record(self, outcomes: list[wire.Outcome], batch: _Batch) -> Deferred[list[wire.Reply]] | list[wire.Reply]:
        """Append the answers' records in one write; answers whose records failed become C{storage unavailable}.
        A batch answered already (its analysis came past the deadline) is not recorded: its clients got an
        C{ERROR}."""
        batch.outcomes = outcomes
        if batch.answered:
            self._settled()
            return []
        now = int(self._clock.seconds())
        records = [
            Record(now, entry[1], outcome.message, outcome.count, outcome.isPrime)
            for outcome, entry in zip(outcomes, batch.entries)
            if isinstance(outcome, wire.Answer)
        ]
        if not records:
            self._settled()
            return _replies(outcomes)
        stored = self._records.write(records)
        self._settled()
        return stored.addCallbacks(lambda _: _replies(outcomes), lambda failure: _storageFailed(failure, outcomes))

    def _internalError(self, failure: Failure, size: int) -> list[wire.Reply]:
        """Analysis failed, or could not be started (no thread): each request is answered C{ERROR internal
        error}, logged with the failure at most once a second, with the count since."""
        self._settled()  # told twice if _record failed after telling: harmless
        count = self._failureLog.event(self._clock.seconds())
        if count is not None:
            self.log.failure("analysing a batch of {size} requests failed (batches failed since the last such line: "
                             "{count}); answering ERROR internal error", failure, size=size, count=count)
        return [wire.errorReply(wire.INTERNAL_ERROR, closes=True)] * size

    def _release(self, replies: list[wire.Reply], batch: _Batch) -> None:
        """Hand each connection its replies of the batch in one call, so that they leave in one write; a batch
        answered already at its deadline gets nothing more."""
        if batch.answered:
            return
        batch.answered = True
        inFlight = self._inFlight
        while inFlight and inFlight[0].answered:
            inFlight.popleft()
        if not inFlight and self._deadlineCall is not None:
            self._deadlineCall.cancel()
            self._deadlineCall = None
        byRequester: dict[Requester, list[tuple[int, wire.Reply]]] = {}
        for reply, (_, _, requester, sequence) in zip(replies, batch.entries):
            answered = byRequester.get(requester)
            if answered is None:
                byRequester[requester] = [(sequence, reply)]
            else:
                answered.append((sequence, reply))
        for requester, answered in byRequester.items():
            requester.answered(answered)

    def _tooLate(self) -> None:
        """The oldest batches are past their deadline: answer them C{ERROR} now (their analysis or their record,
        if it comes later, is dropped; a record may still be stored, as after a commit that took too long), then
        wait for the next oldest."""
        self._deadlineCall = None
        now = self._clock.seconds()
        while self._inFlight and self._inFlight[0].due <= now:  # the oldest is never answered (L{_release})
            batch = self._inFlight[0]
            if batch.outcomes is None:
                why, replies = "not analysed", [wire.errorReply(wire.INTERNAL_ERROR, closes=True)] * len(batch.entries)
            else:
                why, replies = "records not stored", _replies(batch.outcomes, wire.errorReply(wire.STORAGE_UNAVAILABLE))
            count = self._lateLog.event(now)
            if count is not None:
                self.log.error("{size} requests {why} within {deadline:g} s of their end (such batches since the "
                               "last such line: {count}); answering them ERROR", size=len(batch.entries), why=why,
                               deadline=self._replyDeadline, count=count)
            self._release(replies, batch)
        if self._inFlight:
            self._deadlineCall = self._clock.callLater(max(0.0, self._inFlight[0].due - now), self._tooLate)


def _replies(outcomes: list[wire.Outcome], unavailable: Optional[wire.Reply] = None) -> list[wire.Reply]:
    """The replies to C{outcomes}, in order: a rejection's C{ERROR}, an answer's own reply or, when the
    answers' records could not be stored, C{unavailable}."""
    countReply, Answer = wire.countReply, wire.Answer
    return [
        (countReply(outcome.count, outcome.isPrime) if unavailable is None else unavailable)  # type: ignore[union-attr]
        if type(outcome) is Answer else wire.errorReply(outcome.reason)  # type: ignore[union-attr]
        for outcome in outcomes
    ]


def _storageFailed(failure: Failure, outcomes: list[wire.Outcome]) -> list[wire.Reply]:
    failure.trap(StorageUnavailable)
    return _replies(outcomes, wire.errorReply(wire.STORAGE_UNAVAILABLE))

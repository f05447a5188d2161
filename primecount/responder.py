"""Turns finished requests into typed replies, one reactor turn's requests at a time: one pool call analyses
them, one write stores their records, and only then are the replies released."""

from __future__ import annotations

from typing import Optional, Protocol

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from primecount import wire
from primecount.records.formats import Record
from primecount.records.store import IRecordsStore, RunInThread, StorageUnavailable


class Requester(Protocol):
    """Who asked: a connection, told once per batch of the replies to its requests in that batch."""

    def answered(self, replies: list[tuple[int, wire.Reply]]) -> None:
        """The replies to the requests asked with these sequence numbers, in the order asked."""


class Responder:
    """Answers finished requests: analysis off the reactor thread, every record written, then the replies,
    handed to each connection once per batch (no Deferred per request)."""

    log = Logger()

    def __init__(self, clock: IReactorTime, runInThread: RunInThread, records: IRecordsStore) -> None:
        self._clock = clock
        self._runInThread = runInThread
        self._records = records
        self._pending: list[tuple[bytes, str, Requester, int]] = []
        self._dispatchCall: Optional[IDelayedCall] = None
        self._analysing = 0  # pool calls not yet returned

    def respond(self, raw: bytes, client: str, requester: Requester, sequence: int) -> None:
        """Answer the request C{raw} from C{client} at the end of this turn: C{requester.answered} gets its
        reply, with C{sequence}, once its record (if it is an answer) is stored."""
        self._pending.append((raw, client, requester, sequence))
        if self._dispatchCall is None:
            self._dispatchCall = self._clock.callLater(0, self._dispatch)

    def _dispatch(self) -> None:
        self._dispatchCall = None
        batch, self._pending = self._pending, []
        self._analysing += 1
        if self._analysing == 1:
            self._records.gathering(True)
        evaluated: Deferred[list[wire.Outcome]] = self._runInThread(wire.evaluateAll, [entry[0] for entry in batch])
        evaluated.addBoth(self._analysed)
        evaluated.addCallback(self._record, batch)
        evaluated.addErrback(self._internalError, len(batch))
        evaluated.addCallback(self._release, batch)

    def _analysed(self, result: object) -> object:
        """A pool call returned (whatever its result)."""
        self._analysing -= 1
        return result

    def _settled(self) -> None:
        """After a returned call's write: tell the sink whether more records are on their way (told after every
        call, so that a sink bounding its wait sees the time pass even when analysis never stops)."""
        self._records.gathering(self._analysing > 0)

    def _record(self, outcomes: list[wire.Outcome], batch: list) -> Deferred[list[wire.Reply]] | list[wire.Reply]:
        """Append the answers' records in one write; answers whose records failed become C{storage unavailable}."""
        now = int(self._clock.seconds())
        records = [
            Record(now, entry[1], outcome.message, outcome.count, outcome.isPrime)
            for outcome, entry in zip(outcomes, batch)
            if isinstance(outcome, wire.Answer)
        ]
        if not records:
            self._settled()
            return _replies(outcomes)
        stored = self._records.write(records)
        self._settled()
        return stored.addCallbacks(lambda _: _replies(outcomes), lambda failure: _storageFailed(failure, outcomes))

    def _internalError(self, failure: Failure, size: int) -> list[wire.Reply]:
        self._settled()  # told twice if _record failed after telling: harmless
        self.log.failure("analysing a batch of {size} requests failed", failure, size=size)
        return [wire.errorReply(wire.INTERNAL_ERROR, closes=True)] * size

    @staticmethod
    def _release(replies: list[wire.Reply], batch: list) -> None:
        """Hand each connection its replies of the batch in one call, so that they leave in one write."""
        byRequester: dict[Requester, list[tuple[int, wire.Reply]]] = {}
        for reply, (_, _, requester, sequence) in zip(replies, batch):
            answered = byRequester.get(requester)
            if answered is None:
                byRequester[requester] = [(sequence, reply)]
            else:
                answered.append((sequence, reply))
        for requester, answered in byRequester.items():
            requester.answered(answered)


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

"""Turns a finished request into its reply: batched analysis on the thread pool, then the record, then the reply bytes."""

from __future__ import annotations

from typing import Callable, Optional, Protocol

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from primecount import wire
from primecount.records import Record
from primecount.storage import RunInThread, StorageUnavailable



class RecordSink(Protocol):
    """Where records go: anything with the records service's C{append} and C{flush}."""

    def append(self, record: Record) -> Deferred[None]:
        """Store C{record}; fire once stored, fail with L{StorageUnavailable} otherwise."""

    def flush(self) -> None:
        """Store what was appended so far without waiting for the end of the turn."""


class AnalysisBatcher:
    """Gathers the requests that end within one reactor turn and evaluates them with a single thread-pool call.

    One C{deferToThread} per request costs more than the analysis itself;
    one per turn keeps the thread pool in use without paying that per request.
    """

    def __init__(
        self, clock: IReactorTime, runInThread: RunInThread, afterBatch: Callable[[], None] = lambda: None
    ) -> None:
        self._clock = clock
        self._runInThread = runInThread
        self._afterBatch = afterBatch
        self._pending: list[tuple[bytes, Deferred[wire.Outcome]]] = []
        self._dispatchCall: Optional[IDelayedCall] = None

    def submit(self, raw: bytes) -> Deferred[wire.Outcome]:
        """Queue C{raw} for evaluation at the end of this turn; the result fires with its outcome."""
        outcome: Deferred[wire.Outcome] = Deferred()
        self._pending.append((raw, outcome))
        if self._dispatchCall is None:
            self._dispatchCall = self._clock.callLater(0, self._dispatch)
        return outcome

    def _dispatch(self) -> None:
        self._dispatchCall = None
        pending, self._pending = self._pending, []
        evaluated = self._runInThread(wire.evaluateAll, [raw for raw, _ in pending])

        def deliver(outcomes: list[wire.Outcome]) -> None:
            for (_, outcome), result in zip(pending, outcomes):
                outcome.callback(result)
            self._afterBatch()

        def failAll(failure: Failure) -> None:
            for _, outcome in pending:
                outcome.errback(failure)

        evaluated.addCallbacks(deliver, failAll)


class Responder:
    """Answers finished requests: analysis off the reactor thread, the record written, then the reply."""

    log = Logger()

    def __init__(self, clock: IReactorTime, runInThread: RunInThread, records: RecordSink) -> None:
        # Every answer of a batch has appended its record once the batch is delivered.
        self._batcher = AnalysisBatcher(clock, runInThread, afterBatch=records.flush)
        self._clock = clock
        self._records = records

    def respond(self, raw: bytes, client: str) -> Deferred[bytes]:
        """Reply bytes for the request C{raw} from C{client}; an answer is recorded before it is returned."""
        reply = self._batcher.submit(raw)
        reply.addCallback(self._recordAnswer, client)
        reply.addErrback(self._internalError, client)
        return reply

    def _recordAnswer(self, outcome: wire.Outcome, client: str) -> bytes | Deferred[bytes]:
        if isinstance(outcome, wire.Rejection):
            return wire.errorLine(outcome.reason)
        record = Record(int(self._clock.seconds()), client, outcome.message, outcome.count, outcome.isPrime)
        stored = self._records.append(record)
        stored.addCallbacks(lambda _: wire.replyLine(outcome), self._storageFailed)
        return stored

    @staticmethod
    def _storageFailed(failure: Failure) -> bytes:
        failure.trap(StorageUnavailable)
        return wire.errorLine(wire.STORAGE_UNAVAILABLE)

    def _internalError(self, failure: Failure, client: str) -> bytes:
        self.log.failure("analysing a request from {client} failed", failure, client=client)
        return wire.errorLine(wire.INTERNAL_ERROR)

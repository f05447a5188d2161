"""Where records are kept: what every records store promises (L{IRecordsStore}), the error a refused batch fails
with, and what the two stores share (the incident told once, the backoff of retries). The stores themselves are
L{primecount.records.file}, the default, and L{primecount.records.table} (PostgreSQL)."""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

from twisted.application.service import IService
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from zope.interface import Attribute

from primecount.logs import plural
from primecount.records.formats import Record

# Runs a blocking call off the reactor thread: deferToThreadPool bound to a reactor and pool.
RunInThread = Callable[..., Deferred]
FSYNC_POLICIES = ("always", "everysec", "never")
# How often an unhealthy store checks by itself whether it can take records again (L{SelfProbe}).
PROBE_INTERVAL = 1.0
_log = Logger()


class StorageUnavailable(Exception):
    """Records could not be stored, so the requests they belong to must not get a normal answer."""


def runInline(function: Callable[..., Any], *args: Any) -> Deferred:
    """Run C{function} at once in this thread (for callers without a thread pool)."""
    try:
        return succeed(function(*args))
    except BaseException:
        return fail()


class IRecordsStore(IService):
    """A records store: a service that stores each batch of records before the replies it belongs to go out."""

    location = Attribute("Where the records go (a path, or a database URI), for logs.")

    def write(records: Sequence[Record]) -> Deferred[None]:
        """Store C{records} together; fire once they are stored (and as durable as C{--fsync} asks), fail with
        L{StorageUnavailable} if they were not (their clients then get C{ERROR storage unavailable})."""

    def gathering(analysing: bool) -> None:
        """Whether requests are being analysed, whose records will be written soon: a store may hold a
        transaction for them while C{analysing}. Told C{True} when analysis starts, then after each returned
        pool call's write whether any other is still out."""

    def reopen() -> None:
        """SIGHUP: continue at the same location afresh (a file renamed by logrotate); nothing where that
        means nothing."""

    def healthy() -> bool:
        """Whether a batch written now is expected to be stored: no incident of this store is going on."""

    def probe() -> Deferred[None]:
        """Check, without storing a record, whether a batch written now would be stored, and if so end the
        incident going on (C{healthy()} is true again); fail with L{StorageUnavailable} if not. Called by the
        store itself while it is unhealthy (L{SelfProbe}): a host its balancer took out gets no batch to find
        out with."""


class SelfProbe:
    """Once its store has failed, probes it every C{interval} seconds, one probe at a time, until it is healthy
    again, so that its health comes back without traffic; nothing runs while the store is healthy."""

    def __init__(self, store: IRecordsStore, clock: IReactorTime, interval: float = PROBE_INTERVAL) -> None:
        self._store = store
        self._loop = LoopingCall(self._tick)
        self._loop.clock = clock
        self._interval = interval
        self._probing = False
        self._stopped = False
        self.probes = 0

    def watch(self) -> None:
        """The store has just failed: probe it every interval from now on, until it is healthy."""
        if not self._loop.running and not self._stopped:
            self._loop.start(self._interval, now=False)

    def stop(self) -> None:
        """Stop probing, for good (the store is stopping)."""
        self._stopped = True
        if self._loop.running:
            self._loop.stop()

    def _tick(self) -> None:
        if self._store.healthy():
            self._loop.stop()
            return
        if self._probing:
            return
        self._probing = True
        self.probes += 1
        probed = self._store.probe()
        probed.addErrback(lambda failure: failure.trap(StorageUnavailable))  # the store has told its incident
        probed.addErrback(lambda failure: _log.failure("probing the records store failed", failure))
        probed.addBoth(self._done)

    def _done(self, _: object) -> None:
        self._probing = False


class Incident:
    """Trouble with a store, told in one line when it starts and one when it is over, however many batches it
    refuses meanwhile, and counted."""

    def __init__(self, log: Logger, clock: IReactorTime, began: Callable[[], None] = lambda: None) -> None:
        """C{began} is called as each incident begins (to count it)."""
        self._log = log
        self._clock = clock
        self._began = began
        self.since: Optional[float] = None  # when the incident going on began
        self.failures = 0
        self.refused = 0

    @property
    def going(self) -> bool:
        """Whether an incident is going on."""
        return self.since is not None

    def failed(self, count: int, begins: str, **fields: object) -> None:
        """A failure that refused C{count} records; the first of an incident is logged (an error) as
        C{begins}."""
        if self.since is None:
            self.since, self.failures, self.refused = self._clock.seconds(), 0, 0
            self._log.error(begins, **fields)
            self._began()
        self.failures += 1
        self.refused += count

    def refusedMeanwhile(self, count: int) -> None:
        """C{count} records refused without a new failure (while the store waits to try again)."""
        self.refused += count

    def recovered(self, ends: str, **fields: object) -> None:
        """The store works again: if an incident was going on, log C{ends}, which may name its C{seconds}, its
        C{failures} and the records it C{refused} (each as words: C{1 failure}, C{12 records})."""
        if self.since is None:
            return
        self._log.info(ends, seconds=self._clock.seconds() - self.since, failures=plural(self.failures, "failure"),
                       refused=plural(self.refused, "record"), **fields)
        self.since = None


class Backoff:
    """The delays between retries: C{first}, then each twice the one before, up to C{most}; C{first} again once
    reset."""

    def __init__(self, first: float, most: float) -> None:
        self._first = first
        self._most = most
        self.delay = first

    def next(self) -> float:
        """The delay to wait now; the next one doubles."""
        delay, self.delay = self.delay, min(self.delay * 2, self._most)
        return delay

    def reset(self) -> None:
        """Start again from C{first}."""
        self.delay = self._first


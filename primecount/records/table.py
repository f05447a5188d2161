"""Records in a PostgreSQL table (C{--records postgresql://...}) with the file's promise: each batch is one
transaction, group-committed, its replies released once it committed; see docs/records.md."""

from __future__ import annotations

import ipaddress
import os
import re
import socket
import sys
import threading
from collections import deque
from datetime import date
from functools import lru_cache, partial
from typing import Any, Callable, Optional, Sequence

from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from primecount.descriptors import socketOn
from primecount.metrics import NoMetrics
from primecount.records.formats import Record
from primecount.records.schema import createSchema, tableIdentifier, today
from primecount.records.store import Backoff, Incident, IRecordsStore, RunInThread, SelfProbe, StorageUnavailable
from primecount.threads import batchScheduledPool, deferringTo

SCHEMES = ("postgresql://", "postgres://")
DEFAULT_TABLE = "primecount_records"
DEFAULT_TIMEOUT = 2.0  # seconds a batch may wait for its commit (--records-timeout)
# Seconds a new connection may take (libpq's least): while the database is cut off, each try of a probe ends
# this soon, so the first one after the link heals comes within a couple of seconds.
CONNECT_TIMEOUT = 2
# How often a table store that failed looks whether its next probe is due (the backoff says when it is).
PROBE_LOOK_INTERVAL = 0.25
# The probes' backoff while the database is unavailable: at most 2 s between a failed probe and the next, which
# itself may take CONNECT_TIMEOUT to fail; so a host answers again within about 4 s of its database coming back,
# however long it was away (at 5 s, a 30 s cut took 6 s to answer again).
BACKOFF_FIRST, BACKOFF_MOST = 0.1, 2.0
# How long the next transaction may wait for the records of requests still being analysed (the pool's turn
# around is well under a millisecond; this bounds the wait when analysis never stops, under steady load).
GATHER_MOST = 0.002
# Connections a store may commit on at once (--records-connections), and how long the youngest commit in flight
# is given before the next batch goes on another connection: a commit stalled by a lost packet (a 200 ms
# retransmission) or a far database no longer holds every client of the host, while on a near, healthy
# database commits return well within it and batches stay few, big and in order on one connection.
DEFAULT_CONNECTIONS = 4
OVERLAP_AFTER = 0.002
# The least retransmission timeout of a database connection, where the kernel lets a socket set it: a lost
# packet of a commit is sent again after about this long (rounded up to the kernel's tick) rather than after
# the default 200 ms. The link to a records database is a data centre's, with round trips well under it;
# the timeout still grows with the measured round trip on a longer one (docs/scaling.md).
RTO_MIN_US = 10_000
TCP_RTO_MIN_US: Optional[int] = getattr(socket, "TCP_RTO_MIN_US", 45 if sys.platform == "linux" else None)
# What each --fsync asks of a commit. PostgreSQL keeps a commit's WAL in shared memory until it is flushed, and a
# crash of any of its processes (even of an idle session) restarts them all and drops that memory: only a commit
# that waited for its WAL flush ("on") survives it. So the default, like "always", waits (commits in flight together
# share one flush); "never" is the explicit lossy mode, which loses the last moments' answered rows in such a crash.
SYNCHRONOUS_COMMIT = {"always": "on", "everysec": "on", "never": "off"}
# PostgreSQL text cannot hold NUL; a message's NUL is stored as U+2400 SYMBOL FOR NULL.
NUL_STAND_IN = "\u2400"
COLUMNS = ("time", "client", "message", "count", "prime", "host", "pid")


def driver() -> Any:
    """The C{psycopg} module, made ready for this interpreter: call it before the first connection.

    On PyPy psycopg runs its pure-Python libpq wrapper (ctypes, with the
    system's libpq5). That wrapper keeps a weak reference to each connection
    in a C{ctypes.py_object}, which PyPy 7.3.11 (Debian 12's) refuses: its
    ctypes keeps a weak reference to what a C{py_object} holds, and a weak
    reference cannot be weakly referenced (PyPy issue 3882). Where that is so,
    the wrapper's reference becomes an object that can be: it calls back to the
    same connection. A test fails if psycopg's wrapper changes under it.
    """
    import psycopg

    if psycopg.pq.__impl__ == "python" and not _pyObjectTakesWeakReferences():
        from psycopg.pq import pq_ctypes

        pq_ctypes.ref = _Reference  # type: ignore[attr-defined]
    return psycopg


class _Reference:
    """A weak reference to a psycopg connection that can itself be weakly referenced (see L{driver})."""

    __slots__ = ("_referent", "__weakref__")

    def __init__(self, referent: Any) -> None:
        import weakref

        self._referent = weakref.ref(referent)

    def __call__(self) -> Any:
        return self._referent()


def _pyObjectTakesWeakReferences() -> bool:
    """Whether this interpreter's C{ctypes.py_object} can hold a weak reference."""
    import ctypes
    import weakref

    try:
        ctypes.py_object(weakref.ref(_Reference))
    except TypeError:
        return False
    return True


def isDatabaseURI(value: str) -> bool:
    """Whether a C{--records} value names a PostgreSQL database rather than a file."""
    return value.startswith(SCHEMES)


# A Unix socket folder that cannot exist: libpq checks a URI's options, then fails to connect there at once.
_NOWHERE = "/nonexistent/primecount-uri-check"


def uriProblem(uri: str) -> Optional[str]:
    """Why libpq would refuse C{uri} before connecting (its syntax, an unknown parameter, a bad port or
    C{sslmode}, ports that do not match the hosts), in libpq's words, or C{None}. Connects to nothing: the same
    options are handed to libpq with every host replaced by a socket that cannot exist."""
    pq = driver().pq
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    try:
        parameters = conninfo_to_dict(uri)
    except Exception as error:
        return str(error).strip()
    hosts = str(parameters.get("host") or "").split(",")
    parameters["host"] = ",".join([_NOWHERE] * len(hosts))
    parameters.pop("hostaddr", None)
    probe = pq.PGconn.connect_start(make_conninfo(**parameters).encode("utf-8"))
    try:
        message = probe.error_message.decode("utf-8", "replace").strip()
        if probe.status == pq.ConnStatus.BAD and not message.startswith("connection to server on socket"):
            return message.splitlines()[0]
        return None
    finally:
        probe.finish()


@lru_cache(maxsize=4096)
def inetOrNone(client: str) -> Optional[str]:
    """A client address as the C{inet} column takes it, or C{None} for a peer without one (a UNIX socket)."""
    try:
        return str(ipaddress.ip_address(client))
    except ValueError:
        return None


# An element of a PostgreSQL array literal, quoted: backslash and double quote escaped; NUL, which text cannot
# hold, stood in for. Most batches hold none of them, which one search of the whole batch finds.
_ARRAY_ESCAPES = str.maketrans({"\\": "\\\\", '"': '\\"', "\0": NUL_STAND_IN})
_NEEDS_ESCAPE = re.compile(r'[\\"\x00]')
_ARRAY_BOOLEANS = {True: "t", False: "f"}
APPEND_STATEMENT = b"primecount_append"  # the name the prepared INSERT has on each connection
# What a probe of an unhealthy table store appends, then rolls back.
PROBE_RECORD = Record(0, "127.0.0.1", "primecount probe", 1, False)


@lru_cache(maxsize=4096)
def _arrayClient(client: str) -> str:
    address = inetOrNone(client)
    return "NULL" if address is None else f'"{address}"'


def insertParameters(records: Sequence[Record], host: str, pid: int) -> list[bytes]:
    """C{records} as the parameters of L{insertStatement}, formatted once per batch instead of adapted value by
    value: one array literal per column (seconds, clients as C{inet} or NULL, messages with NUL stood in for,
    counts, verdicts), then C{host} and C{pid}."""
    seconds, clients, messages, counts, verdicts = zip(*records) if records else ((),) * 5
    if _NEEDS_ESCAPE.search("".join(messages)) is not None:
        messages = tuple([message.translate(_ARRAY_ESCAPES) for message in messages])
    columns = (
        ",".join(map(str, seconds)),
        ",".join(map(_arrayClient, clients)),
        '"' + '","'.join(messages) + '"' if messages else "",
        ",".join(map(str, counts)),
        ",".join(map(_ARRAY_BOOLEANS.__getitem__, verdicts)),
    )
    return [("{" + column + "}").encode("utf-8") for column in columns] + [host.encode("utf-8"), b"%d" % pid]


def insertStatement(table: str) -> Any:
    """The one INSERT a batch is: its rows from the arrays of L{insertParameters}, in the batch's order."""
    from psycopg import sql

    return sql.SQL(
        "INSERT INTO {} ({}) SELECT to_timestamp(u.t), u.c, u.m, u.n, u.p, $6, $7"
        " FROM unnest($1::int8[], $2::inet[], $3::text[], $4::int4[], $5::bool[]) WITH ORDINALITY"
        " AS u(t, c, m, n, p, i) ORDER BY u.i"
    ).format(tableIdentifier(table), sql.SQL(", ").join(map(sql.Identifier, COLUMNS)))


def _checked(result: Any, expected: Any) -> None:
    """Raise the error a libpq result carries (as psycopg's exception for its SQLSTATE) unless its status is
    C{expected}."""
    from psycopg import errors, pq

    if result.status != expected:
        state = result.error_field(pq.DiagnosticField.SQLSTATE)
        message = (result.error_message or b"no result").decode("utf-8", "replace").strip()
        raise (errors.lookup(state.decode()) if state else errors.OperationalError)(message)


def connect(conninfo: str, fsync: str) -> Any:
    """A new connection to the records database, set up for appending: its commit policy, a name in
    C{pg_stat_activity}, bounded connection and statement times, quick retransmissions."""
    connection = driver().connect(
        conninfo, autocommit=True, connect_timeout=CONNECT_TIMEOUT, application_name="primecount",
        options=f"-c synchronous_commit={SYNCHRONOUS_COMMIT[fsync]} -c statement_timeout=10000",
        # A peer gone without a word (a cut link, a dead host) is found by the kernel, not only when a
        # commit is abandoned: unacknowledged data for 10 s, or an idle connection unanswered for 8 s.
        tcp_user_timeout=10000, keepalives=1, keepalives_idle=5, keepalives_interval=1, keepalives_count=3,
    )
    quickRetransmissions(connection.pgconn.socket)
    return connection


def quickRetransmissions(descriptor: int) -> bool:
    """Lower a TCP socket's least retransmission timeout to L{RTO_MIN_US}, where the kernel can (Linux 6.15's
    C{TCP_RTO_MIN_US}); whether it did. A batch is one packet each way: a lost one is found only by a timeout,
    200 ms at least by default, which every request of the batch waits out."""
    if TCP_RTO_MIN_US is None:
        return False
    try:
        with socketOn(descriptor) as handle:
            if handle.family not in (socket.AF_INET, socket.AF_INET6):
                return False  # a UNIX socket: nothing is ever retransmitted
            handle.setsockopt(socket.IPPROTO_TCP, TCP_RTO_MIN_US, RTO_MIN_US)
    except OSError:  # an older kernel
        return False
    return True


class DatabaseWriter:
    """What runs on the database thread: one connection, made when needed, and the transactions on it."""

    def __init__(self, conninfo: str, table: str, fsync: str,
                 connectTo: Callable[[str, str], Any] = connect, partitioned: bool = False,
                 clock: Optional[IReactorTime] = None) -> None:
        self._conninfo = conninfo
        self._table = table
        self._fsync = fsync
        self._partitioned = partitioned  # a table this writer creates is partitioned by day
        # Says the day whose partitions (and the next days') a partitioned table gets when this writer connects;
        # without it the writer makes none.
        self._clock = clock
        self._connectTo = connectTo
        self._connection: Any = None
        self._host = socket.gethostname()
        self.created: Optional[str] = None  # what this writer's connection created, until the store says so
        # Held to replace or close the connection, and by abandon() from the reactor thread: a descriptor is
        # never shut down after libpq has closed it (it could be another file's by then).
        self._lock = threading.Lock()

    def append(self, records: Sequence[Record]) -> None:
        """Write C{records} as one transaction, a single multi-row C{INSERT} (prepared once per connection, in
        autocommit mode: the statement is its own transaction, committed when it completes, with no extra
        round trip for a C{COMMIT}); raise unless the server said it completed.

        It runs on libpq directly (psycopg's documented C{pgconn}, which
        releases the GIL while it waits): one round trip, a third of the CPU
        per batch that a C{COPY} through the cursor took (docs/benchmarks.md)."""
        from psycopg import pq

        connection = self._usable()
        try:
            _checked(connection.pgconn.exec_prepared(APPEND_STATEMENT, insertParameters(
                records, self._host, os.getpid())), pq.ExecStatus.COMMAND_OK)
        except BaseException:
            self.close()  # whatever state it is in, a new connection is cleaner than a rollback on a broken one
            raise

    def tryAppend(self) -> None:
        """Append one probe row and roll it back, on a new connection (with the table made if missing): raise
        as L{append} would for a real batch (the database gone, the table refusing rows, no right to insert),
        store nothing (the row's id is used up, as a failed batch's are). New, because an old session can
        outlive what a new one meets: a server shutting down serves its sessions a while (a smart shutdown,
        until they end) but refuses new ones."""
        from psycopg import pq

        self.close()
        connection = self._usable()
        pgconn = connection.pgconn
        try:
            _checked(pgconn.exec_(b"BEGIN"), pq.ExecStatus.COMMAND_OK)
            try:
                _checked(pgconn.exec_prepared(APPEND_STATEMENT, insertParameters(
                    [PROBE_RECORD], self._host, os.getpid())), pq.ExecStatus.COMMAND_OK)
            finally:
                pgconn.exec_(b"ROLLBACK")
        except BaseException:
            self.close()
            raise

    def _usable(self) -> Any:
        """The connection, or a new one if there is none or it is gone (nothing of the next statement was sent
        on a dead one: it goes on the new one)."""
        connection = self._connection
        if connection is None or not _idleAndAlive(connection):
            self.close()
            connection = self._connect()
        return connection

    def _connect(self) -> Any:
        from psycopg import pq

        connection = self._connectTo(self._conninfo, self._fsync)
        with self._lock:
            self._connection = connection  # abandon() may now shut it down, during the schema work too
        try:
            created = createSchema(connection, self._table, self._partitioned,
                                   today(self._clock.seconds()) if self._clock is not None else None)
            if created:
                self.created = created
            _checked(connection.pgconn.prepare(APPEND_STATEMENT, insertStatement(self._table).as_bytes(connection)),
                     pq.ExecStatus.COMMAND_OK)
        except BaseException:
            self.close()
            raise
        return connection

    def connectNow(self) -> None:
        """Make the connection (and the table) now, if there is none, rather than with the first batch."""
        if self._connection is None:
            self._connect()

    def maintainPartitions(self, retention: int, now: date) -> Any:
        """L{primecount.records.schema.maintain} on a connection of its own, closed after."""
        from primecount.records.schema import maintain

        connection = self._connectTo(self._conninfo, self._fsync)
        try:
            return maintain(connection, self._table, retention, now)
        finally:
            connection.close()

    def abandon(self) -> bool:
        """From any thread: shut the connection's socket down, so that a statement waiting on it (a commit cut
        off from the database) fails at once, its outcome unknown, instead of when TCP gives up; the next
        statement gets a new connection. Whether there was a connection to shut down."""
        with self._lock:
            connection = self._connection
            if connection is None:
                return False
            try:
                with socketOn(connection.pgconn.socket) as handle:
                    handle.shutdown(socket.SHUT_RDWR)
            except Exception:  # already closed by libpq, or never connected
                return False
            return True

    def close(self) -> None:
        """Drop the connection (the next append makes a new one)."""
        with self._lock:
            connection, self._connection = self._connection, None
        if connection is not None:
            try:
                connection.close()
            except Exception:
                pass


def _idleAndAlive(connection: Any) -> bool:
    """Whether an idle connection can still carry a batch. The server sends nothing to an idle session unless
    it ends it (a shutdown's or an administrator's FATAL, then the end of the stream), so anything readable
    means it is gone (readable, or hung up); either way nothing of the next batch has been sent on it."""
    import select

    from psycopg import pq

    pgconn = connection.pgconn
    if pgconn.status != pq.ConnStatus.OK:
        return False
    # poll(), not select(): under load this process holds thousands of client sockets, and the database's may be
    # numbered past select()'s 1024 (it then raised ValueError for every batch).
    poller = select.poll()
    poller.register(pgconn.socket, select.POLLIN)
    return not poller.poll(0)


@implementer(IRecordsStore)
class TableStore(Service):
    """Appends records to a PostgreSQL table, as L{primecount.records.file.FileStore} appends them to a file."""

    log = Logger()

    def __init__(self, conninfo: str, reactor: Any, fsync: str = "everysec", metrics: NoMetrics = NoMetrics(), *,
                 table: str = DEFAULT_TABLE, timeout: float = DEFAULT_TIMEOUT, connections: int = DEFAULT_CONNECTIONS,
                 retention: int = 0, writers: Optional[Sequence[DatabaseWriter]] = None,
                 runInThread: Optional[RunInThread] = None) -> None:
        self.conninfo = self.location = conninfo
        self.table = table
        self._reactor: IReactorTime = reactor
        self._metrics = metrics
        self._timeout = timeout
        self._retention = retention  # days of partitions kept (0: the table is neither partitioned nor trimmed)
        self._writers = list(writers or [DatabaseWriter(conninfo, table, fsync, partitioned=retention > 0,
                                                        clock=reactor) for _ in range(connections)])
        self._maintenanceCall: Optional[IDelayedCall] = None
        self._maintaining = False
        self._toldNotPartitioned = False
        # The writers free to take a call, the first one on top: a second connection is made only once commits
        # have overlapped, and the most recently used (warm) one is taken first.
        self._idle = self._writers[::-1]
        self._pool: Optional[ThreadPool] = None
        self._runInThread = runInThread
        self._waiting: list[tuple[Sequence[Record], Deferred[None]]] = []
        # Every batch not yet answered, oldest first, with when it is too late: one timer for them all, armed
        # for the oldest (a timer per batch would fill the reactor's heap with cancelled calls).
        self._deadlines: deque[tuple[float, Deferred[None], int]] = deque()
        self._deadlineCall: Optional[IDelayedCall] = None
        self._inFlight: dict[DatabaseWriter, float] = {}  # the commits in flight: their writer, when they began
        self._overlapCall: Optional[IDelayedCall] = None  # when the youngest of them is OVERLAP_AFTER old
        self._probing = False
        self._analysing = False  # whether the responder has requests in analysis (L{gathering})
        self._waitingSince = 0.0  # when the oldest waiting batch was written
        self._retryAt = 0.0
        self._failedAt = float("-inf")  # when a commit or probe last failed
        self._backoff = Backoff(BACKOFF_FIRST, BACKOFF_MOST)
        self._incident = Incident(self.log, reactor)  # counted by its kind as it begins (L{_notStored})
        self._selfProbe = SelfProbe(self, reactor, PROBE_LOOK_INTERVAL)
        self._proven = False  # whether a probe or a transaction has succeeded since the start
        self.commits = 0
        self.rowsWritten = 0

    def startService(self) -> None:
        """Start the database thread and connect on it at once: a database that cannot be reached is said now,
        in one warning line (the service still starts, and connects again with the first batch)."""
        super().startService()
        if self._runInThread is None:
            threads = len(self._writers) + (1 if self._retention else 0)  # a writer each, and the maintenance
            pool = self._pool = batchScheduledPool(ThreadPool(1, threads, "primecount-records-db"))
            pool.start()
            self._runInThread = deferringTo(self._reactor, pool)
        self.log.info("appending records to PostgreSQL table {table} ({conninfo}), on up to {connections} "
                      "connections", table=self.table, conninfo=_withoutPassword(self.conninfo),
                      connections=len(self._writers))
        probed = self.probe()
        probed.addErrback(lambda failure: failure.trap(StorageUnavailable))  # told as the incident it starts
        if self._retention:
            probed.addBoth(lambda _: self._maintainPartitions())

    def _maintainPartitions(self) -> None:
        """Make the partitions ahead and drop those past retention (L{primecount.records.schema}), on a
        database thread; again in an hour, or in five minutes if it could not all be done."""
        from primecount.records.schema import MAINTAIN_EVERY, MAINTAIN_RETRY

        self._maintenanceCall = None
        if not self.running:
            return
        self._maintaining = True
        done = self._runInThread(partial(self._writers[0].maintainPartitions, self._retention,  # type: ignore[misc]
                                         today(self._reactor.seconds())))
        done.addCallbacks(self._maintained, self._notMaintained)

        def again(complete: bool) -> None:
            self._maintaining = False
            if self.running:
                self._maintenanceCall = self._reactor.callLater(MAINTAIN_EVERY if complete else MAINTAIN_RETRY,
                                                                self._maintainPartitions)

        done.addCallback(again)

    def _maintained(self, done: Any) -> bool:
        if not done.partitioned:
            if not self._toldNotPartitioned:
                self._toldNotPartitioned = True
                self.log.error("--records-retention {retention}: table {table} is not partitioned, so no records "
                               "are dropped (docs/records.md says how to move to a partitioned table)",
                               retention=self._retention, table=self.table)
            return True
        if done.made or done.dropped:
            self.log.info("records table {table}: partitions made for {made}, dropped for {dropped} (older than "
                          "{retention} days)", table=self.table, retention=self._retention,
                          made=", ".join(map(str, done.made)) or "no day",
                          dropped=", ".join(map(str, done.dropped)) or "no day")
        for problem in done.problems:
            self.log.warn("records table partitions: could not {problem}; trying again in 5 minutes",
                          problem=problem)
        return not done.problems

    def _notMaintained(self, failure: Failure) -> bool:
        self.log.warn("records table partitions not maintained ({error}); trying again in 5 minutes",
                      error=_describe(failure))
        return False

    def stopService(self) -> Deferred[None] | None:
        """Let the transaction in flight finish, then close the connection and stop the thread."""
        super().stopService()
        self._selfProbe.stop()
        done: Deferred[None] = Deferred()

        def whenIdle() -> None:
            self._next()  # a transaction held for records on their way goes once its wait is up
            if len(self._idle) < len(self._writers) or self._waiting or self._maintaining:
                self._reactor.callLater(0.05, whenIdle)
                return
            for call in (self._overlapCall, self._maintenanceCall):
                if call is not None and call.active():
                    call.cancel()
            if self._pool is not None:
                closed = self._runInThread(self._closeAll)  # type: ignore[misc]
                closed.addBoth(lambda _: self._pool.stop())  # type: ignore[union-attr]
                closed.addBoth(lambda _: done.callback(None))
            else:
                done.callback(None)

        whenIdle()
        return done

    def _closeAll(self) -> None:
        for writer in self._writers:
            writer.close()

    def _release(self, writer: DatabaseWriter) -> None:
        """C{writer}'s call has returned: it is free for the next one."""
        self._idle.append(writer)
        self._next()

    def reopen(self) -> None:
        """SIGHUP: nothing to reopen (the file's rotation has no counterpart here)."""

    def write(self, records: Sequence[Record]) -> Deferred[None]:
        """Store C{records} in the next transaction; fire once it has committed, fail with
        L{StorageUnavailable} if it fails, if the database cannot be reached, or past the timeout."""
        now = self._reactor.seconds()
        if self._runInThread is None or self._incident.going:
            # Known to be unavailable: refused now rather than after --records-timeout; the store's own probes
            # (on the backoff's schedule) find when it is back.
            self._refused(len(records))
            return fail(StorageUnavailable("records database unavailable"))
        stored: Deferred[None] = Deferred()
        if not self._waiting:
            self._waitingSince = now
        self._waiting.append((records, stored))
        self._deadlines.append((now + self._timeout, stored, len(records)))
        self._watchDeadlines(now)
        self._next()
        return stored

    def gathering(self, analysing: bool) -> None:
        """The responder has requests in analysis (C{True}) or none any more (C{False}): while it has, the next
        transaction waits for their records, up to L{GATHER_MOST} seconds after the oldest waiting batch
        (checked whenever the responder says so, after each of its pool calls returns)."""
        self._analysing = analysing
        self._next()

    def _next(self) -> None:
        """Send the waiting batches as one transaction if a connection is free for it: at once when no commit is
        in flight; else once the youngest in flight is L{OVERLAP_AFTER} old (a timer says when)."""
        if not self._waiting or not self._idle:
            return
        now = self._reactor.seconds()
        if self._analysing and now - self._waitingSince < GATHER_MOST:
            return  # the records being analysed join this transaction; told again when they are written
        if self._inFlight:
            wait = max(self._inFlight.values()) + OVERLAP_AFTER - now
            if wait > 0:
                if self._overlapCall is None or not self._overlapCall.active():
                    self._overlapCall = self._reactor.callLater(wait, self._next)
                return
        batch = [(records, stored) for records, stored in self._waiting if not stored.called]  # not timed out
        self._waiting = []
        if not batch:
            return
        rows = [record for records, _ in batch for record in records]
        writer = self._idle.pop()
        self._inFlight[writer] = now
        committed = self._untilTimeout(writer, writer.append, rows, onAbandoned=self._commitAbandoned)
        committed.addBoth(self._committed, writer, batch, len(rows), now)

    def _untilTimeout(self, writer: DatabaseWriter, function: Callable[..., None], *args: Any,
                      onAbandoned: Callable[[], None] = lambda: None) -> Deferred[None]:
        """Run C{function(*args)} (a call on C{writer}) on a database thread; if it has not returned within the
        timeout (cut off from the database), shut C{writer}'s connection down, so that the thread is free at
        once, and call C{onAbandoned}."""
        def abandon() -> None:
            # Batches past their deadline are answered as too slow first, whichever of the two timers, due at
            # the same moment, the reactor runs first: the abandoned commit's failure then finds them answered.
            deadline = self._deadlineCall
            if (deadline is not None and deadline.active() and self._deadlines
                    and self._deadlines[0][0] <= self._reactor.seconds()):
                deadline.cancel()
                self._tooSlow()
            if writer.abandon():
                onAbandoned()

        overdue = self._reactor.callLater(self._timeout, abandon)

        def returned(result: object) -> object:
            if overdue.active():
                overdue.cancel()
            if writer.created:
                self.log.info("records table {table} created: {what}", table=self.table, what=writer.created)
                writer.created = None
            return result

        return self._runInThread(function, *args).addBoth(returned)  # type: ignore[misc]

    def _commitAbandoned(self) -> None:
        self.log.warn("records database: a commit took over {timeout:g} s; its connection is abandoned "
                      "(its rows may or may not be there) and the next try uses a new one", timeout=self._timeout)

    def _committed(self, result: object, writer: DatabaseWriter, batch: list[tuple[Sequence[Record], Deferred[None]]],
                   size: int, started: float) -> None:
        del self._inFlight[writer]
        self._idle.append(writer)
        if isinstance(result, Failure):
            self._failed(result, size)
            for _, stored in batch:
                if not stored.called:
                    stored.errback(StorageUnavailable("records database unavailable"))
            self._waiting, waiting = [], self._waiting  # later batches would meet the same database: refuse them
            for records, stored in waiting:
                if not stored.called:
                    self._refused(len(records))
                    stored.errback(StorageUnavailable("records database unavailable"))
        else:
            self.commits += 1
            self.rowsWritten += size
            self._metrics.recordsWritten(size)
            self._metrics.commitObserved(self._reactor.seconds() - started)
            if started > self._failedAt:  # sent before a failure on another connection, it proves nothing since
                self._proven = True
                self._recovered()
            for _, stored in batch:
                if not stored.called:
                    stored.callback(None)
        self._answered()
        self._next()

    def healthy(self) -> bool:
        """Whether a probe or a transaction has succeeded since the start (a probe runs at start) and no
        incident is going on since."""
        return self._proven and not self._incident.going

    def probe(self) -> Deferred[None]:
        """Whether the table takes a row now (L{DatabaseWriter.tryAppend}: appended, then rolled back), asked
        on the backoff's schedule (before its next try is due, the answer is no without asking); ends the
        incident if it does. While a transaction is in flight its outcome will tell: the answer is no."""
        if (self._runInThread is None or self._inFlight or self._probing or not self._idle
                or self._reactor.seconds() < self._retryAt):
            return fail(StorageUnavailable("records database unavailable"))
        writer = self._idle.pop()
        self._probing = True
        abandoned: list[bool] = []

        def answered(result: object) -> None:
            self._probing = False
            self._idle.append(writer)
            if isinstance(result, Failure):
                self._failed(result, 0, abandoned=bool(abandoned))
                raise StorageUnavailable(f"records database unavailable ({_describe(result)})")
            self._retryAt = 0.0
            self._proven = True
            self._recovered()

        return self._untilTimeout(writer, writer.tryAppend, onAbandoned=lambda: abandoned.append(True)).addBoth(answered)

    def _failed(self, failure: Failure, size: int, abandoned: bool = False) -> None:
        """A commit or a probe failed (C{abandoned}: it had no answer in time, and its connection was shut down
        here, not by the database): an incident, tried again on the backoff."""
        self._failedAt = self._reactor.seconds()
        if abandoned:
            self._notStored(size, "records database slow: no answer to a probe within {timeout:g} s", "slow_commit",
                            timeout=self._timeout)
        else:
            self._notStored(size, "records database unavailable ({error})" if self._proven else
                            "records database not reachable since the start ({error})", error=_describe(failure))
        self._retryAt = self._failedAt + self._backoff.next()

    def _notStored(self, size: int, why: str, kind: str = "database", **fields: object) -> None:
        """C{size} records failed: counted as refused and, when this starts an incident, logged once with C{why}
        and counted as an incident of C{kind}."""
        self._metrics.recordWriteFailed(size)
        self._selfProbe.watch()
        if not self._incident.going:
            self._metrics.storeIncident(kind)
        self._incident.failed(size, why + "; answering ERROR storage unavailable until it is back", **fields)

    def _refused(self, size: int) -> None:
        self._metrics.recordWriteFailed(size)
        self._incident.refusedMeanwhile(size)

    def _recovered(self) -> None:
        self._backoff.reset()
        self._incident.recovered("records database back after {seconds:.1f} s; {refused} refused meanwhile")

    def _tooSlow(self) -> None:
        """The oldest batches' commits have not returned in time: their outcome is unknown, so they are not
        answered as recorded (their rows may still appear). Then wait for the next oldest."""
        self._deadlineCall = None
        now, deadlines = self._reactor.seconds(), self._deadlines
        while deadlines and (deadlines[0][1].called or deadlines[0][0] <= now):
            _, stored, size = deadlines.popleft()
            if not stored.called:
                self._notStored(size, "records database slow: no commit within {timeout:g} s", "slow_commit",
                                timeout=self._timeout)
                stored.errback(StorageUnavailable("records database too slow"))
        self._watchDeadlines(now)

    def _watchDeadlines(self, now: float) -> None:
        """Arm the one deadline timer for the oldest batch not yet answered, unless it is armed already."""
        if self._deadlineCall is None and self._deadlines:
            self._deadlineCall = self._reactor.callLater(self._deadlines[0][0] - now, self._tooSlow)

    def _answered(self) -> None:
        """Forget the deadlines of the oldest batches answered now (a younger batch answered before an older one,
        its commit overlapping, is forgotten once the older one is answered)."""
        deadlines = self._deadlines
        while deadlines and deadlines[0][1].called:
            deadlines.popleft()
        if not deadlines and self._deadlineCall is not None:
            self._deadlineCall.cancel()
            self._deadlineCall = None


def _describe(failure: Failure) -> str:
    text = str(failure.value).strip().splitlines()
    return f"{failure.type.__name__}: {text[0] if text else ''}".rstrip(": ")


def _withoutPassword(conninfo: str) -> str:
    """C{conninfo} fit for a log: a password in the URI is replaced by C{***}."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(conninfo)
    if parts.password is None:
        return conninfo
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))

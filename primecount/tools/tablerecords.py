"""The records tool's reading of a PostgreSQL records table: C{stats}, C{tail} and C{follow} on a URI, with the
same output as for files (stats computed in SQL)."""

from __future__ import annotations

import time
from collections import deque
from contextlib import contextmanager
from typing import Any, Callable, Iterator, NamedTuple, Optional, TextIO

from primecount.records.schema import tableIdentifier
from primecount.records.table import NUL_STAND_IN, driver
from primecount.records.formats import Record, formatTSV, terminalSafe


def _connect(uri: str) -> Any:
    return driver().connect(uri, autocommit=True, connect_timeout=10, application_name="primecount-records")


def _window(since: Optional[int], until: Optional[int]) -> tuple[Any, list[int]]:
    """The WHERE clause for [since, until) and its parameters."""
    from psycopg import sql

    conditions, parameters = [sql.SQL("true")], []
    if since is not None:
        conditions.append(sql.SQL("time >= to_timestamp(%s)"))
        parameters.append(since)
    if until is not None:
        conditions.append(sql.SQL("time < to_timestamp(%s)"))
        parameters.append(until)
    return sql.SQL(" AND ").join(conditions), parameters


def stats(uri: str, table: str, top: int, since: Optional[int] = None, until: Optional[int] = None) -> tuple:
    """Totals, sí, the first and last time, clients and the C{top} busiest, and rows per minute of the table's
    rows in [since, until), as L{primecount.tools.records.writeStats} prints them."""
    from psycopg import sql

    where, parameters = _window(since, until)
    name = tableIdentifier(table)
    with _connect(uri) as connection:
        total, prime, first, last, clients = connection.execute(sql.SQL(
            "SELECT count(*), count(*) FILTER (WHERE prime), extract(epoch FROM min(time))::bigint, "
            "extract(epoch FROM max(time))::bigint, count(DISTINCT coalesce(host(client), '-')) "
            "FROM {} WHERE {}").format(name, where), parameters).fetchone()
        busiest = connection.execute(sql.SQL(
            "SELECT coalesce(host(client), '-'), count(*) FROM {} WHERE {} GROUP BY 1 ORDER BY 2 DESC, 1 "
            "LIMIT %s").format(name, where), [*parameters, top]).fetchall()
        minutes = connection.execute(sql.SQL(
            "SELECT extract(epoch FROM date_trunc('minute', time))::bigint, count(*) FROM {} WHERE {} "
            "GROUP BY 1 ORDER BY 1").format(name, where), parameters).fetchall()
    return total, prime, first, last, clients, busiest, minutes


COLUMNS = "id, extract(epoch FROM time)::bigint, coalesce(host(client), '-'), message, count, prime"
READ_MOST = 10_000  # rows one poll of follow reads past its cursor
# After this many seconds a transaction still running is no longer waited for (primecount's own inserts end within
# their 10 s statement timeout): rows it commits later, below ids follow has moved past, are not printed.
SETTLE_MOST = 60.0
XID_SPACE = 2**32  # a row's xmin is a transaction id modulo this


def _lastRows(connection: Any, table: str, limit: int) -> list[Any]:
    from psycopg import sql

    query = sql.SQL("SELECT * FROM (SELECT {} FROM {} ORDER BY id DESC LIMIT %s) AS latest ORDER BY id").format(
        sql.SQL(COLUMNS), tableIdentifier(table))
    return connection.execute(query, [limit]).fetchall()


class Snapshot(NamedTuple):
    """What a poll's snapshot says of the writers: the transactions still running, and the first id not yet
    given to any transaction when it was taken (C{pg_snapshot_xip} and C{pg_snapshot_xmax})."""

    running: frozenset[int]
    xmax: int


class FollowHorizon:
    """Where C{follow} must look so that every row committed after it started is printed exactly once, in
    whatever order the writers commit: a row's id is given when it is inserted, not when it is committed, so a
    writer still running can commit rows below ids already printed. Pure bookkeeping, poll by poll: a row not
    visible at the last poll and at or below the cursor ("late") can only have been inserted by a transaction
    running then or one begun since (L{isLate}); once the transactions running at a poll and at the next one
    have all ended, every row at or below that poll's cursor is visible, and L{low} moves up to it. A writer
    that takes its first id before a poll but its transaction id only after the next one, or runs longer than
    C{settleMost} seconds, can be missed."""

    def __init__(self, start: int, snapshot: Snapshot, now: float, settleMost: float = SETTLE_MOST) -> None:
        self.low = start  # every row at or below it is printed, or was there when follow started
        self.cursor = start  # the highest id read
        self.last = snapshot  # the last poll's snapshot
        self._settleMost = settleMost
        # Per poll: the transactions running at it and at the next poll, the cursor after it, and when.
        self._checkpoints: deque[list[Any]] = deque([[snapshot.running, start, now]])

    def lateRange(self) -> Optional[tuple[int, int]]:
        """The ids, C{(above, upTo)}, where late rows may be; C{None} when there are none to look at."""
        return (self.low, self.cursor) if self.cursor > self.low else None

    def isLate(self, xmin: int) -> bool:
        """Whether a row inserted by transaction C{xmin} (modulo L{XID_SPACE}), visible now and in
        L{lateRange}, is new since the last poll: its writer was running then, or began since."""
        since = (xmin - self.last.xmax) % XID_SPACE
        return since < XID_SPACE // 2 or xmin in {xid % XID_SPACE for xid in self.last.running}

    def polled(self, snapshot: Snapshot, highest: Optional[int], now: float) -> None:
        """A poll in C{snapshot} read rows past the cursor up to id C{highest} (C{None}: none)."""
        if highest is not None:
            self.cursor = max(self.cursor, highest)
        self.last = snapshot
        checkpoints = self._checkpoints
        checkpoints[-1][0] = checkpoints[-1][0] | snapshot.running
        checkpoints.append([snapshot.running, self.cursor, now])
        while len(checkpoints) > 1 and (not checkpoints[0][0] & snapshot.running
                                        or now - checkpoints[0][2] > self._settleMost):
            self.low = max(self.low, checkpoints.popleft()[1])


def _snapshot(connection: Any) -> Snapshot:
    xmax, running = connection.execute(
        "SELECT pg_snapshot_xmax(s)::text::bigint, array(SELECT pg_snapshot_xip(s)::text::bigint)"
        " FROM pg_current_snapshot() AS s").fetchone()
    return Snapshot(frozenset(running), xmax)


@contextmanager
def _inOneSnapshot(connection: Any) -> Iterator[Snapshot]:
    """A read-only transaction whose every query sees the same snapshot; what it says of the writers."""
    with connection.transaction():
        connection.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
        yield _snapshot(connection)


def _poll(connection: Any, table: str, horizon: FollowHorizon, now: float) -> tuple[list[Any], list[Any]]:
    """One poll in one snapshot, recorded in C{horizon} as made at C{now}: the late rows
    (L{FollowHorizon.isLate}) and the rows past the cursor, each list in id order."""
    from psycopg import sql

    name = tableIdentifier(table)
    with _inOneSnapshot(connection) as snapshot:
        late: list[Any] = []
        lateRange = horizon.lateRange()
        if lateRange is not None:  # L{FollowHorizon.isLate}, in SQL
            late = connection.execute(sql.SQL(
                "SELECT {} FROM {} WHERE id > %s AND id <= %s AND (mod(mod(xmin::text::bigint - %s, {space}) + {space},"
                " {space}) < {half} OR xmin::text::bigint = ANY(%s)) ORDER BY id").format(
                sql.SQL(COLUMNS), name, space=sql.Literal(XID_SPACE), half=sql.Literal(XID_SPACE // 2)),
                [*lateRange, horizon.last.xmax % XID_SPACE, [xid % XID_SPACE for xid in horizon.last.running]],
            ).fetchall()
        rows = connection.execute(sql.SQL("SELECT {} FROM {} WHERE id > %s ORDER BY id LIMIT %s").format(
            sql.SQL(COLUMNS), name), [horizon.cursor, READ_MOST]).fetchall()
    horizon.polled(snapshot, rows[-1][0] if rows else None, now)
    return late, rows


def _line(values: tuple[Any, ...]) -> str:
    _, seconds, client, message, count, prime = values
    return terminalSafe(formatTSV(Record(seconds, client, message.replace(NUL_STAND_IN, "\0"), count, prime)))


def tail(uri: str, table: str, out: TextIO, count: int) -> None:
    """Print the last C{count} rows as records lines (tsv)."""
    with _connect(uri) as connection:
        for values in _lastRows(connection, table, count) if count else []:
            out.write(_line(values))


def follow(uri: str, table: str, out: TextIO, interval: float = 0.5, fromEnd: bool = True,
           clock: Callable[[], float] = time.monotonic) -> None:
    """Print rows as they are committed, as records lines, until interrupted: each row once, whatever order its
    writers commit in (L{FollowHorizon}). From the end, rows past the highest id committed at the start."""
    from psycopg import sql

    with _connect(uri) as connection:
        with _inOneSnapshot(connection) as snapshot:
            start = connection.execute(sql.SQL("SELECT coalesce(max(id), 0) FROM {}").format(
                tableIdentifier(table))).fetchone()[0] if fromEnd else 0
        horizon = FollowHorizon(start, snapshot, clock())
        while True:
            late, rows = _poll(connection, table, horizon, clock())
            for values in late + rows:
                out.write(_line(values))
            out.flush()
            if len(rows) < READ_MOST:
                time.sleep(interval)

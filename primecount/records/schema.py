"""The records table's schema: its name, its creation, and its partitions by day (C{--records-retention}): the
days a partitioned table has made ahead, the days past retention dropped, one maintainer at a time across a
fleet; see docs/records.md. Only statements and their arithmetic: the connections are the table store's."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone
from typing import Any, Iterable, Optional

# The records' columns (docs/records.md); the primary key is added by each kind of table.
COLUMNS_SQL = ("id bigserial, time timestamptz NOT NULL, client inet, message text NOT NULL, count integer NOT NULL, "
               "prime boolean NOT NULL, host text NOT NULL, pid integer NOT NULL")
MAINTAIN_EVERY = 3600.0  # seconds between two maintenances of a process
MAINTAIN_RETRY = 300.0  # after one that could not do everything (the database away, a lock not given)
DAYS_AHEAD = 3  # today's partition and the next three exist, so a missed maintenance (an hour) costs nothing
# How long a partition's creation or drop may wait for its lock on the table: a reader holding the table (a long
# report) makes it give up and try at the next maintenance, instead of queueing every insert behind it.
LOCK_TIMEOUT_MS = 500
SCHEMA_LOCK = "SELECT pg_advisory_xact_lock(hashtext('primecount records schema'))"
# Bounds of the part of a partition's name after the table's: _p20261206 or _pdefault (PostgreSQL names are
# at most 63 bytes).
_DAY_SUFFIX = re.compile(r"_p(\d{8})$")
LONGEST_SUFFIX = len("_pdefault")
NAME_MOST = 63


def tableIdentifier(name: str) -> Any:
    """The C{psycopg.sql.Identifier} of a table name, C{schema.table} allowed."""
    from psycopg import sql

    return sql.Identifier(*name.split("."))


def tableProblem(name: str) -> Optional[str]:
    """Why C{name} cannot be a records table name, or C{None}."""
    parts = name.split(".")
    if not 1 <= len(parts) <= 2 or not all(part and len(part) <= 63 for part in parts):
        return "must be a table name or schema.table, each part 1 to 63 characters"
    if any("\0" in part for part in parts):
        return "must not contain NUL"
    return None


def schemaStatements(table: str) -> list[Any]:
    """The idempotent statements that create the records table and its indexes (see docs/records.md); a time
    index that went away with a table renamed away is made again by L{createSchema}."""
    from psycopg import sql

    name = tableIdentifier(table)
    last = table.split(".")[-1]
    return [
        sql.SQL(f"CREATE TABLE IF NOT EXISTS {{}} ({COLUMNS_SQL}, PRIMARY KEY (id))").format(name),
        # BRIN, not a B-tree: rows arrive in time order, and a summary per block range costs each row a
        # fraction of a B-tree entry (docs/records.md).
        sql.SQL("CREATE INDEX IF NOT EXISTS {} ON {} USING brin (time)").format(sql.Identifier(f"{last}_time"),
                                                                               name),
    ]


def today(seconds: float) -> date:
    """The UTC day of C{seconds} since the epoch: partitions hold UTC days."""
    return datetime.fromtimestamp(seconds, timezone.utc).date()


def partitionName(table: str, day: date | None) -> str:
    """The name of C{table}'s partition for C{day} (C{None}: its default partition), in C{table}'s schema."""
    return f"{table}_p{day:%Y%m%d}" if day is not None else f"{table}_pdefault"


def partitionNameProblem(table: str) -> str | None:
    """Why C{table} cannot have partitions named after it (a name too long for PostgreSQL), or C{None}."""
    last = table.split(".")[-1]
    if len(last.encode("utf-8")) + LONGEST_SUFFIX > NAME_MOST:
        return (f"is too long to partition: its partitions' names ({last}_pdefault) would pass PostgreSQL's "
                f"{NAME_MOST} bytes")
    return None


def dayOf(table: str, partition: str) -> date | None:
    """The day a partition named by L{partitionName} holds, or C{None} for any other name."""
    last = table.split(".")[-1]
    match = _DAY_SUFFIX.search(partition)
    if match is None or partition[:match.start()] != last:
        return None
    try:
        return datetime.strptime(match.group(1), "%Y%m%d").date()
    except ValueError:
        return None


def daysToMake(now: date) -> list[date]:
    """The days whose partitions must exist on C{now}: today and L{DAYS_AHEAD} more."""
    return [now + timedelta(days=ahead) for ahead in range(DAYS_AHEAD + 1)]


def daysToDrop(existing: Iterable[date], now: date, retention: int) -> list[date]:
    """The days among C{existing} past a retention of C{retention} whole days before C{now} (none for 0: keep
    everything): a row is kept at least C{retention} days, at most one more."""
    if retention <= 0:
        return []
    oldest = now - timedelta(days=retention)
    return sorted(day for day in existing if day < oldest)


def partitionedTableStatements(table: str) -> list[Any]:
    """The statements that create C{table} partitioned by day on C{time}, with its default partition (a row
    whose day has no partition, from a host whose clock is far off, lands there rather than being refused).
    The columns are those of the plain table; the primary key holds C{time}, as a partitioned table's must."""
    from psycopg import sql

    name = tableIdentifier(table)
    return [
        sql.SQL(f"CREATE TABLE IF NOT EXISTS {{}} ({COLUMNS_SQL}, PRIMARY KEY (id, time)) PARTITION BY RANGE (time)"
                ).format(name),
        sql.SQL("CREATE TABLE IF NOT EXISTS {} PARTITION OF {} DEFAULT").format(
            tableIdentifier(partitionName(table, None)), name),
    ]


def isPartitioned(cursor: Any, table: str) -> bool:
    """Whether C{table} is a partitioned table."""
    cursor.execute("SELECT relkind FROM pg_class WHERE oid = to_regclass(%s)",
                   (tableIdentifier(table).as_string(cursor.connection),))
    row = cursor.fetchone()
    return row is not None and row[0] == "p"


def existingDays(cursor: Any, table: str) -> list[date]:
    """The days of C{table}'s partitions that primecount made (named by L{partitionName})."""
    cursor.execute("SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
                   "WHERE i.inhparent = to_regclass(%s)", (tableIdentifier(table).as_string(cursor.connection),))
    return sorted(day for (name,) in cursor.fetchall() if (day := dayOf(table, name)) is not None)


def dayStatements(table: str, day: date) -> list[Any]:
    """The statements that make C{table}'s partition for C{day} (UTC midnight to midnight): a table of its own,
    then attached, which takes only a lock that inserts and readers do not wait for (C{CREATE TABLE ...
    PARTITION OF} would hold the whole table exclusively)."""
    from psycopg import sql

    partition = tableIdentifier(partitionName(table, day))
    return [
        sql.SQL("CREATE TABLE {} (LIKE {})").format(partition, tableIdentifier(table)),
        sql.SQL("ALTER TABLE {} ATTACH PARTITION {} FOR VALUES FROM ({}) TO ({})").format(
            tableIdentifier(table), partition, sql.Literal(f"{day:%Y-%m-%d} 00:00:00+00"),
            sql.Literal(f"{day + timedelta(days=1):%Y-%m-%d} 00:00:00+00")),
    ]


def makeDay(cursor: Any, table: str, day: date) -> None:
    """Create C{table}'s partition for C{day} (L{dayStatements})."""
    for statement in dayStatements(table, day):
        cursor.execute(statement)


def createSchema(connection: Any, table: str, partitioned: bool = False, now: Optional[date] = None) -> Optional[str]:
    """Create the records table and its time index if they are missing, in one transaction, one creator at a
    time (two at once would collide in the catalog); a new table is partitioned by day if C{partitioned}
    (L{maintain}), and a partitioned table, new or not, gets the partitions of C{now} (today, when given) and
    the days ahead that it lacks.

    The index is looked for on the table itself: its usual name may still be
    taken by the index of a table renamed away (indexes keep their names), and
    then C{CREATE INDEX IF NOT EXISTS} would skip it. A second one gets a name
    PostgreSQL chooses.

    Returns what it created, for the log: C{"a table"}, C{"a table partitioned by day"}, or C{None}.
    """
    from psycopg import sql

    with connection.transaction(), connection.cursor() as cursor:
        cursor.execute(SCHEMA_LOCK)
        name = tableIdentifier(table)
        cursor.execute("SELECT to_regclass(%s)", (name.as_string(connection),))
        created = None if cursor.fetchone()[0] is not None else (  # a table there already stays as it is
            "a table partitioned by day" if partitioned else "a table")
        if partitioned and created:
            for statement in partitionedTableStatements(table):
                cursor.execute(statement)
        for statement in schemaStatements(table):
            cursor.execute(statement)
        cursor.execute(
            "SELECT count(*) FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = "
            "i.indkey[0] WHERE i.indrelid = %s::regclass AND a.attname = 'time'", (name.as_string(connection),))
        if cursor.fetchone()[0] == 0:
            cursor.execute(sql.SQL("CREATE INDEX ON {} USING brin (time)").format(name))
        if now is not None and isPartitioned(cursor, table):
            existing = existingDays(cursor, table)
            for day in daysToMake(now):
                if day not in existing:
                    makeDay(cursor, table, day)
    return created


@dataclass
class Maintenance:
    """What one maintenance did: the days made and dropped, and why any could not be."""

    partitioned: bool = True
    made: list[date] = field(default_factory=list)
    dropped: list[date] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def maintain(connection: Any, table: str, retention: int, now: date) -> Maintenance:
    """Make C{table}'s missing partitions for today and the days ahead, and drop those past C{retention} days;
    each in a transaction of its own under the schema lock and a lock timeout, so that one that cannot be done
    now (a reader holding the table, a default partition already holding rows of that day) is reported and
    the rest still done. A drop holds the table exclusively for a moment: inserts wait for it, at most
    L{LOCK_TIMEOUT_MS} if it has to wait itself. A table that is not partitioned is left alone."""
    from psycopg import sql

    done = Maintenance()
    with connection.cursor() as cursor:
        if not isPartitioned(cursor, table):
            return Maintenance(partitioned=False)
        existing = existingDays(cursor, table)
    steps = [("make", day) for day in daysToMake(now) if day not in existing]
    steps += [("drop", day) for day in daysToDrop(existing, now, retention)]
    for action, day in steps:
        try:
            with connection.transaction(), connection.cursor() as cursor:
                cursor.execute(f"SET LOCAL lock_timeout = {LOCK_TIMEOUT_MS}")
                cursor.execute(SCHEMA_LOCK)
                if (day in existingDays(cursor, table)) == (action == "make"):
                    continue  # another process made it, or dropped it, meanwhile
                if action == "make":
                    makeDay(cursor, table, day)
                else:
                    cursor.execute(sql.SQL("DROP TABLE {}").format(tableIdentifier(partitionName(table, day))))
        except Exception as error:
            problem = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            done.problems.append(f"{action} {partitionName(table, day)}: {problem}")
        else:
            (done.made if action == "make" else done.dropped).append(day)
    return done

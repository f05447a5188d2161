"""Daily partitions and retention of the records table (L{primecount.records.schema}, C{--records-retention}):
the day arithmetic alone, the statements on the tests' real PostgreSQL cluster (concurrent maintainers and a
reader holding the table included), the store's schedule on a clock, and a real twistd."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from datetime import date, datetime, timedelta, timezone
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.logger import Logger, formatEvent
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from primecount.options import Options
from primecount.records import schema
from primecount.records.formats import Record
from primecount.records.schema import (
    DAYS_AHEAD, MAINTAIN_EVERY, MAINTAIN_RETRY, Maintenance, dayOf, daysToDrop, daysToMake, maintain, partitionName,
)
from primecount.records.schema import createSchema
from primecount.records.table import DatabaseWriter, TableStore, driver
from primecount.tools.serverprocess import ServerProcess
from tests.helpers import ask, expectedReply
from tests.postgres import freshTable, sharedCluster

DAY = date(2026, 12, 6)


def clockOn(day: date) -> Clock:
    """A clock at noon UTC of C{day}."""
    clock = Clock()
    clock.advance(datetime(day.year, day.month, day.day, 12, tzinfo=timezone.utc).timestamp())
    return clock


class DayArithmeticTests(SynchronousTestCase):
    """Which days a table must have, which it may drop, and the names that say so."""

    def test_namesRoundTrip(self) -> None:
        """A day's partition is named table_pYYYYMMDD in the table's schema; its day is read back from the
        name, and from no other name (the default partition, another table's, a non-date)."""
        self.assertEqual(partitionName("pc.records", DAY), "pc.records_p20261206")
        self.assertEqual(partitionName("records", None), "records_pdefault")
        self.assertEqual(dayOf("pc.records", "records_p20261206"), DAY)
        for other in ["records_pdefault", "other_p20261206", "records_p20261306", "myrecords_p20261206"]:
            self.assertIsNone(dayOf("records", other), other)

    def test_daysMadeAhead(self) -> None:
        """Today's partition and the next DAYS_AHEAD days' are needed, across a month's end."""
        self.assertEqual(daysToMake(date(2026, 12, 30)),
                         [date(2026, 12, 30) + timedelta(days=n) for n in range(DAYS_AHEAD + 1)])
        self.assertEqual(daysToMake(date(2026, 12, 30))[-1], date(2027, 1, 2))

    def test_retentionKeepsWholeDays(self) -> None:
        """With a retention of 7 days on 6 December, 29 November is kept and 28 November dropped; 0 keeps
        everything."""
        existing = [DAY - timedelta(days=n) for n in range(12)]
        self.assertEqual(daysToDrop(existing, DAY, 7), sorted(DAY - timedelta(days=n) for n in range(8, 12)))
        self.assertEqual(daysToDrop(existing, DAY, 0), [])

    def test_optionChecked(self) -> None:
        """--records-retention takes whole days, only with a table, and a table name whose partitions' names
        fit PostgreSQL's 63 bytes."""
        options = Options()
        options.parseOptions(["--records", "postgresql:///x", "--records-retention", "30"])
        self.assertEqual(options["records-retention"], 30)
        for arguments, said in [
            (["--records-retention", "3"], "--records-retention: only applies with a postgresql://"),
            (["--records", "postgresql:///x", "--records-retention", "1.5"], "--records-retention: must be"),
            (["--records", "postgresql:///x", "--records-retention", "3", "--records-table", "t" * 55],
             "--records-retention: table"),
        ]:
            error = self.assertRaises(usage.UsageError, Options().parseOptions, arguments)
            self.assertIn(said, str(error))


class PartitionedTableTests(SynchronousTestCase):
    """The statements on a real table of the tests' cluster."""

    def setUp(self) -> None:
        self.cluster = sharedCluster(self)
        self.table = freshTable(self, self.cluster, length=24)

    def connect(self) -> Any:
        """A connection to the cluster, closed when the test ends."""
        connection = driver().connect(self.cluster.uri, autocommit=True)
        self.addCleanup(connection.close)
        return connection

    def partitions(self) -> list[str]:
        """The names of the table's partitions, sorted."""
        return sorted(name for (name,) in self.cluster.query(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
            "WHERE i.inhparent = %s::regclass", f'"{self.table}"'))

    def rowsIn(self, partition: str) -> list[str]:
        """The messages stored in one partition."""
        return sorted(m for (m,) in self.cluster.query(f'SELECT message FROM ONLY "{partition}"'))

    def test_createdPartitionedWithDaysAhead(self) -> None:
        """A table created partitioned has its default partition and today's and the next days' partitions;
        rows go to their day's partition, and a row from a clock far off to the default one (not refused);
        the time index and the records tool's columns are those of a plain table."""
        createSchema(self.connect(), self.table, partitioned=True, now=DAY)
        self.assertEqual(self.partitions(), sorted([partitionName(self.table, None)] + [
            partitionName(self.table, day) for day in daysToMake(DAY)]))
        writer = DatabaseWriter(self.cluster.uri, self.table, "always", partitioned=True, clock=clockOn(DAY))
        self.addCleanup(writer.close)
        noon = 1_796_558_400  # 2026-12-06 12:00 UTC
        writer.append([Record(noon, "192.0.2.1", "today", 1, False),
                       Record(noon + 86_400, "192.0.2.1", "tomorrow", 1, False),
                       Record(0, "192.0.2.1", "1970", 1, False)])
        self.assertEqual(self.rowsIn(partitionName(self.table, DAY)), ["today"])
        self.assertEqual(self.rowsIn(partitionName(self.table, DAY + timedelta(days=1))), ["tomorrow"])
        self.assertEqual(self.rowsIn(partitionName(self.table, None)), ["1970"])
        indexed = self.cluster.query("SELECT amname FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
                                     "JOIN pg_am a ON a.oid = c.relam WHERE i.indrelid = %s::regclass",
                                     f'"{self.table}"')
        self.assertIn(("brin",), indexed)

    def test_writerMakesTheDaysOfItsClock(self) -> None:
        """A writer creating the table makes the partitions of the day its clock says and the days ahead (not the
        machine's today); a writer without a clock, on a partitioned table, makes none."""
        later = DAY + timedelta(days=30)
        writer = DatabaseWriter(self.cluster.uri, self.table, "always", partitioned=True, clock=clockOn(later))
        self.addCleanup(writer.close)
        writer.connectNow()
        self.assertEqual(self.partitions(), sorted([partitionName(self.table, None)] + [
            partitionName(self.table, day) for day in daysToMake(later)]))
        plain = DatabaseWriter(self.cluster.uri, self.table, "always")
        self.addCleanup(plain.close)
        self.cluster.query(f'DROP TABLE "{partitionName(self.table, later)}"')
        plain.connectNow()
        self.assertNotIn(partitionName(self.table, later), self.partitions())

    def test_maintenanceMakesAheadAndDropsPastRetention(self) -> None:
        """Ten days on, maintenance with a retention of 3 days makes the missing days ahead and drops the days
        before the retention, with their rows; the default partition and the days kept stay."""
        connection = self.connect()
        self.assertEqual(createSchema(connection, self.table, partitioned=True, now=DAY), "a table partitioned by day")
        writer = DatabaseWriter(self.cluster.uri, self.table, "always", partitioned=True, clock=clockOn(DAY))
        self.addCleanup(writer.close)
        writer.append([Record(1_796_558_400, "192.0.2.1", "old", 1, False), Record(0, "192.0.2.1", "odd", 1, False)])
        later = DAY + timedelta(days=10)
        done = maintain(connection, self.table, 3, later)
        self.assertEqual((done.made, done.problems), (daysToMake(later), []))
        self.assertEqual(done.dropped, daysToMake(DAY))
        self.assertEqual(self.partitions(), sorted([partitionName(self.table, None)] + [
            partitionName(self.table, day) for day in daysToMake(later)]))
        self.assertEqual(self.cluster.query(f'SELECT message FROM "{self.table}"'), [("odd",)])
        self.assertEqual(maintain(connection, self.table, 3, later), Maintenance())

    def test_plainTableLeftAlone(self) -> None:
        """A plain table (made before, without retention) is not partitioned by maintenance, and nothing is
        dropped from it."""
        connection = self.connect()
        self.assertEqual(createSchema(connection, self.table), "a table")
        # An existing plain table stays plain, and nothing is said to be created.
        self.assertIsNone(createSchema(connection, self.table, partitioned=True, now=DAY))
        self.assertEqual(maintain(connection, self.table, 1, DAY + timedelta(days=30)), Maintenance(partitioned=False))
        self.assertEqual(self.partitions(), [])

    def test_concurrentMaintainersAgree(self) -> None:
        """Four processes' maintenances at once (threads with connections of their own): each day is made once,
        none reports a problem, the table ends the same."""
        createSchema(self.connect(), self.table, partitioned=True, now=DAY)
        later = DAY + timedelta(days=5)
        results: list[Maintenance] = []
        barrier = threading.Barrier(4)

        def maintainer() -> None:
            connection = driver().connect(self.cluster.uri, autocommit=True)
            try:
                barrier.wait()
                results.append(maintain(connection, self.table, 2, later))
            finally:
                connection.close()

        threads = [threading.Thread(target=maintainer) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        self.assertEqual([done.problems for done in results], [[]] * 4)
        self.assertEqual(sorted(day for done in results for day in done.made),
                         [day for day in daysToMake(later) if day not in daysToMake(DAY)])
        self.assertEqual(sorted(day for done in results for day in done.dropped), daysToMake(DAY)[:3])

    def test_readerHoldingTheTableIsNotWaitedFor(self) -> None:
        """While a reader's transaction holds the table, each step gives up after its lock timeout and is
        reported (without the timeout the drop would wait for the reader, and every insert behind it); an
        insert still goes; once the reader is done the next maintenance does everything."""
        connection = self.connect()
        createSchema(connection, self.table, partitioned=True, now=DAY)
        reader = self.connect()
        reader.autocommit = False
        reader.execute(f'SELECT count(*) FROM "{self.table}"')  # holds ACCESS SHARE on every partition
        later = DAY + timedelta(days=6)
        done = maintain(connection, self.table, 1, later)
        self.assertEqual((done.made, done.dropped), ([], []))
        self.assertEqual(len(done.problems), 8, done.problems)  # four days to make, four to drop
        self.assertTrue(all("lock timeout" in problem for problem in done.problems), done.problems)
        writer = DatabaseWriter(self.cluster.uri, self.table, "always", partitioned=True, clock=clockOn(DAY))
        self.addCleanup(writer.close)
        writer.append([Record(1_796_558_400, "192.0.2.1", "meanwhile", 1, False)])
        reader.rollback()
        done = maintain(connection, self.table, 1, later)
        self.assertEqual((done.made, done.dropped, done.problems), (daysToMake(later), daysToMake(DAY), []))


class HeldMaintenance:
    """A stand-in for the database threads that answers each call at once, a maintenance with what the test
    set (a L{Maintenance} or an error), a connection with nothing."""

    def __init__(self) -> None:
        self.maintenances: list[date] = []
        self.answer: Any = Maintenance()

    def __call__(self, function: Any, *args: Any) -> Deferred[Any]:
        if getattr(function, "func", None) is not None:  # the maintenance, a partial
            self.maintenances.append(function.args[1])
            if isinstance(self.answer, Exception):
                return fail(self.answer)
            return succeed(self.answer)
        return succeed(None)


class ScheduleTests(SynchronousTestCase):
    """The store maintains its table at start, every hour after, sooner after a failure, and says what it did."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_796_558_400)  # 2026-12-06 12:00 UTC
        self.thread = HeldMaintenance()
        self.events: list[dict] = []
        self.store = TableStore("postgresql:///x", self.clock, table="t", retention=7, runInThread=self.thread)
        self.store.log = Logger(observer=self.events.append)

    def said(self) -> list[str]:
        """The store's log lines so far."""
        return [formatEvent(event) for event in self.events]

    def test_atStartThenHourly(self) -> None:
        """A maintenance for today at start, the next an hour later (tomorrow's day after midnight), none once
        stopped; what was made and dropped is logged."""
        self.thread.answer = Maintenance(made=[DAY], dropped=[DAY - timedelta(days=8)])
        self.store.startService()
        self.assertEqual(self.thread.maintenances, [DAY])
        self.assertIn("partitions made for 2026-12-06, dropped for 2026-11-28 (older than 7 days)", self.said()[-1])
        self.clock.advance(MAINTAIN_EVERY * 12)
        self.assertEqual(self.thread.maintenances[-1], DAY + timedelta(days=1))
        self.store.stopService()
        count = len(self.thread.maintenances)
        self.clock.advance(MAINTAIN_EVERY * 5)
        self.assertEqual(len(self.thread.maintenances), count)

    def test_failureRetriedSooner(self) -> None:
        """A maintenance that failed (the database away) or could not do everything is tried again after
        MAINTAIN_RETRY, with a warning each time."""
        self.thread.answer = OSError("connection refused")
        self.store.startService()
        self.clock.advance(MAINTAIN_RETRY)
        self.assertEqual(len(self.thread.maintenances), 2)
        self.thread.answer = Maintenance(problems=["drop t_p20261128: canceling statement due to lock timeout"])
        self.clock.advance(MAINTAIN_RETRY)
        self.assertEqual(len(self.thread.maintenances), 3)
        self.clock.advance(MAINTAIN_RETRY)
        self.assertEqual(len(self.thread.maintenances), 4)
        warnings = [event for event in self.events if event["log_level"].name == "warn"]
        self.assertEqual(len(warnings), 4)
        self.assertIn("could not drop t_p20261128", formatEvent(warnings[-1]))

    def test_plainTableSaidOnce(self) -> None:
        """A plain table with a retention is an error, said once, not each hour."""
        self.thread.answer = Maintenance(partitioned=False)
        self.store.startService()
        self.clock.advance(MAINTAIN_EVERY * 3)
        errors = [formatEvent(event) for event in self.events if event["log_level"].name == "error"]
        self.assertEqual(len(errors), 1)
        self.assertIn("--records-retention 7: table t is not partitioned", errors[0])

    def test_noRetentionNoMaintenance(self) -> None:
        """Without a retention nothing is maintained."""
        store = TableStore("postgresql:///x", self.clock, table="t", runInThread=self.thread)
        store.startService()
        self.clock.advance(MAINTAIN_EVERY * 3)
        self.assertEqual(self.thread.maintenances, [])


class RetentionOverTCPTests(SynchronousTestCase):
    """A real twistd with --records-retention: the table it creates is partitioned, an old day is dropped at
    start, requests are answered and recorded in today's partition."""

    def test_partitionedTableServedAndTrimmed(self) -> None:
        """The first twistd creates the table partitioned; a second, started after a row of ten days ago was
        put in a partition of that day, drops that partition at start and records its requests."""
        cluster = sharedCluster(self)
        table = freshTable(self, cluster, length=24)
        first = ServerProcess(cluster.uri, "--records-table", table, "--records-retention", "3")
        self.addCleanup(first.stop)
        first.waitFor(f"records table {table} created: a table partitioned by day".encode())
        self.assertEqual(ask(first.port, b"hola\n"), expectedReply("hola"))
        self.assertEqual(first.stop(), 0, first.log)
        today = schema.today(time.time())
        old = today - timedelta(days=10)
        connection = driver().connect(cluster.uri, autocommit=True)
        self.addCleanup(connection.close)
        with connection.cursor() as cursor:
            schema.makeDay(cursor, table, old)
        cluster.query(f'INSERT INTO "{table}" (time, client, message, count, prime, host, pid) '
                      f"VALUES ('{old} 12:00+00', '192.0.2.9', 'ten days ago', 1, false, 'test', 1)")
        second = ServerProcess(cluster.uri, "--records-table", table, "--records-retention", "3")
        self.addCleanup(second.stop)
        self.assertEqual(ask(second.port, b"adios\n"), expectedReply("adios"))
        second.waitFor(f"dropped for {old}".encode())
        self.assertEqual(second.stop(), 0, second.log)
        self.assertEqual(sorted(m for (m,) in cluster.query(f'SELECT message FROM "{table}"')), ["adios", "hola"])
        stats = subprocess.run([sys.executable, "-m", "primecount.tools.records", "stats", cluster.uri, "--table",
                                table], capture_output=True, text=True, check=True).stdout
        self.assertRegex(stats, r"records\s+2\n")
        self.assertEqual(sorted(cluster.query(f'SELECT message FROM ONLY "{partitionName(table, today)}"')),
                         [("adios",), ("hola",)])

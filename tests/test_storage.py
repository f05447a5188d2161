"""Tests for L{primecount.storage.RecordsService}: batched appends, acknowledgement, failure and shutdown."""

from __future__ import annotations

import os

from twisted.internet.task import Clock
from twisted.logger import LogLevel, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from primecount import storage
from primecount.records import Record, parseRecords
from primecount.storage import RecordsService, StorageUnavailable


def record(message: str) -> Record:
    """A record for C{message} with fixed other fields."""
    return Record(1_771_322_472, "127.0.0.1", message, 1, False)


class RecordsServiceTests(SynchronousTestCase):
    """The records service appends whole batches and acknowledges each record."""

    def setUp(self) -> None:
        self.path = self.mktemp()
        self.clock = Clock()
        self.service = RecordsService(self.path, self.clock)
        self.service.startService()
        self.addCleanup(lambda: self.service.running and self.service.stopService())
        self.writes: list[int] = []
        realWrite = os.write

        def countingWrite(fd: int, data: bytes) -> int:
            self.writes.append(fd)
            return realWrite(fd, data)

        self.patch(storage.os, "write", countingWrite)

    def lines(self) -> list[Record]:
        """The records now in the file."""
        with open(self.path, encoding="utf-8") as file:
            return list(parseRecords(file))

    def test_batchIsOneWrite(self) -> None:
        """Records appended in one reactor turn reach the file with a single write(2)."""
        acknowledged = [self.service.append(record(f"m{i}")) for i in range(100)]
        self.assertEqual(self.writes, [])
        self.clock.advance(0)
        self.assertEqual(len(self.writes), 1)
        self.assertEqual([r.message for r in self.lines()], [f"m{i}" for i in range(100)])
        for each in acknowledged:
            self.assertIsNone(self.successResultOf(each))

    def test_acknowledgedOnlyAfterWrite(self) -> None:
        """The acknowledgement fires only once the batch has been written."""
        acknowledged = self.service.append(record("x"))
        self.assertNoResult(acknowledged)
        self.assertEqual(self.lines(), [])
        self.clock.advance(0)
        self.successResultOf(acknowledged)
        self.assertEqual(len(self.lines()), 1)

    def test_flushWritesNow(self) -> None:
        """An explicit flush writes at once, in one write, and nothing is written again at the end of the turn."""
        acknowledged = [self.service.append(record("a")), self.service.append(record("b"))]
        self.service.flush()
        for each in acknowledged:
            self.successResultOf(each)
        self.assertEqual(len(self.writes), 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(0)
        self.assertEqual(len(self.writes), 1)

    def test_laterTurnsAppend(self) -> None:
        """Each turn's batch is appended after the previous one."""
        self.service.append(record("first"))
        self.clock.advance(0)
        self.service.append(record("second"))
        self.clock.advance(0)
        self.assertEqual([r.message for r in self.lines()], ["first", "second"])
        self.assertEqual(len(self.writes), 2)

    def test_stopWritesPending(self) -> None:
        """Stopping the service writes what is pending and closes the file; later appends fail."""
        acknowledged = self.service.append(record("pending"))
        self.service.stopService()
        self.successResultOf(acknowledged)
        self.assertEqual([r.message for r in self.lines()], ["pending"])
        self.failureResultOf(self.service.append(record("late")), StorageUnavailable)

    def test_appendsToExistingFile(self) -> None:
        """Starting on an existing file keeps its records."""
        self.service.append(record("one"))
        self.service.stopService()
        again = RecordsService(self.path, self.clock)
        again.startService()
        again.append(record("two"))
        again.stopService()
        self.assertEqual([r.message for r in self.lines()], ["one", "two"])


class WriteFailureTests(SynchronousTestCase):
    """A failing disk turns into L{StorageUnavailable} and one logged error per incident."""

    def setUp(self) -> None:
        self.events: list[dict] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def errors(self) -> list[dict]:
        """The error events logged by the records service."""
        return [e for e in self.events if e.get("log_level") == LogLevel.error]

    def test_deviceFull(self) -> None:
        """On C{/dev/full} every append fails with L{StorageUnavailable}, logged once."""
        if not os.path.exists("/dev/full"):
            raise self.skipTest("no /dev/full on this system")
        clock = Clock()
        service = RecordsService("/dev/full", clock)
        service.startService()
        self.addCleanup(service.stopService)
        first = [service.append(record("a")), service.append(record("b"))]
        clock.advance(0)
        second = service.append(record("c"))
        clock.advance(0)
        for acknowledged in first + [second]:
            self.failureResultOf(acknowledged, StorageUnavailable)
        self.assertEqual(len(self.errors()), 1)
        self.assertIn("/dev/full", self.errors()[0]["path"])

    def test_partialWriteIsCutBack(self) -> None:
        """A write that fails half-way leaves no torn record: the file is cut back to the last whole batch."""
        path = self.mktemp()
        clock = Clock()
        service = RecordsService(path, clock)
        service.startService()
        self.addCleanup(service.stopService)
        service.append(record("kept"))
        clock.advance(0)
        realWrite = os.write
        calls = []

        def halfThenFail(fd: int, data: bytes) -> int:
            calls.append(len(data))
            if len(calls) == 1:
                return realWrite(fd, data[: len(data) // 2])
            raise OSError(28, "No space left on device")

        self.patch(storage.os, "write", halfThenFail)
        failed = service.append(record("lost" * 10))
        clock.advance(0)
        self.failureResultOf(failed, StorageUnavailable)
        with open(path, encoding="utf-8") as file:
            self.assertEqual([r.message for r in parseRecords(file)], ["kept"])

    def test_recoveryIsLogged(self) -> None:
        """When writes succeed again the service says so and acknowledges records normally."""
        path = self.mktemp()
        clock = Clock()
        service = RecordsService(path, clock)
        service.startService()
        self.addCleanup(service.stopService)

        def failingWrite(fd: int, data: bytes) -> int:
            raise OSError(5, "Input/output error")

        brokenDisk = self.patch(storage.os, "write", failingWrite)
        failed = service.append(record("x"))
        clock.advance(0)
        brokenDisk.restore()
        self.failureResultOf(failed, StorageUnavailable)
        acknowledged = service.append(record("y"))
        clock.advance(0)
        self.successResultOf(acknowledged)
        self.assertTrue(any("writable again" in e.get("log_format", "") for e in self.events))

    def test_unwritablePathFailsAtStart(self) -> None:
        """A path in a missing directory fails when the service starts, which then is not running."""
        service = RecordsService(os.path.join(self.mktemp(), "missing", "records.txt"), Clock())
        self.assertRaises(OSError, service.startService)
        self.assertFalse(service.running)

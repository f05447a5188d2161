"""Tests for L{primecount.records.file.FileStore}: batches in one write, acknowledgement, failure and shutdown."""

from __future__ import annotations

import gc
import os

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import Logger, LogLevel, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from primecount.records import file as storage
from primecount.records.formats import Record, formatTSV, parseRecords
from primecount.records.file import FileStore
from primecount.records.store import StorageUnavailable
from tests.helpers import RecordingMetrics
from tests.test_recordsstore import FullDisk


def record(message: str) -> Record:
    """A record for C{message} with fixed other fields."""
    return Record(1_771_322_472, "127.0.0.1", message, 1, False)


class FileStoreTests(SynchronousTestCase):
    """The records service appends whole batches and acknowledges each."""

    def setUp(self) -> None:
        self.path = self.mktemp()
        self.clock = Clock()
        self.service = FileStore(self.path, self.clock, fsync="never")
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
        """A batch of a hundred records reaches the file with a single write(2), at once, and is acknowledged."""
        acknowledged = self.service.write([record(f"m{i}") for i in range(100)])
        self.assertEqual(len(self.writes), 1)
        self.assertEqual([r.message for r in self.lines()], [f"m{i}" for i in range(100)])
        self.assertIsNone(self.successResultOf(acknowledged))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_laterBatchesAppend(self) -> None:
        """Each batch is appended after the previous one."""
        self.service.write([record("first")])
        self.service.write([record("second")])
        self.assertEqual([r.message for r in self.lines()], ["first", "second"])
        self.assertEqual(len(self.writes), 2)

    def test_writeAfterStopFails(self) -> None:
        """Once the service has stopped and closed its file, writes fail with L{StorageUnavailable}."""
        self.service.write([record("kept")])
        self.service.stopService()
        self.assertEqual([r.message for r in self.lines()], ["kept"])
        self.failureResultOf(self.service.write([record("late")]), StorageUnavailable)

    def test_appendsToExistingFile(self) -> None:
        """Starting on an existing file keeps its records."""
        self.service.write([record("one")])
        self.service.stopService()
        again = FileStore(self.path, self.clock, fsync="never")
        again.startService()
        again.write([record("two")])
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

    def startService(self, path: str) -> tuple[FileStore, Clock]:
        """A started records service on C{path}, stopped at the end of the test."""
        clock = Clock()
        service = FileStore(path, clock)
        service.startService()
        self.addCleanup(service.stopService)
        return service, clock

    def test_deviceFull(self) -> None:
        """On C{/dev/full} every write fails with L{StorageUnavailable}, logged once."""
        if not os.path.exists("/dev/full"):
            raise self.skipTest("no /dev/full on this system")
        service, clock = self.startService("/dev/full")
        first = [service.write([record("a"), record("b")])]
        second = service.write([record("c")])
        clock.advance(0)
        for acknowledged in first + [second]:
            self.failureResultOf(acknowledged, StorageUnavailable)
        self.assertEqual(len(self.errors()), 1)
        self.assertIn("/dev/full", self.errors()[0]["path"])

    def test_partialWriteIsCutBack(self) -> None:
        """A write that fails half-way leaves no torn record: the file is cut back to the last whole batch."""
        path = self.mktemp()
        service, clock = self.startService(path)
        service.write([record("kept")])
        clock.advance(0)
        realWrite = os.write
        calls = []

        def halfThenFail(fd: int, data: bytes) -> int:
            calls.append(len(data))
            if len(calls) == 1:
                return realWrite(fd, data[: len(data) // 2])
            raise OSError(28, "No space left on device")

        self.patch(storage.os, "write", halfThenFail)
        failed = service.write([record("lost" * 10)])
        clock.advance(0)
        self.failureResultOf(failed, StorageUnavailable)
        with open(path, encoding="utf-8") as file:
            self.assertEqual([r.message for r in parseRecords(file)], ["kept"])

    def test_recoveryIsLogged(self) -> None:
        """When writes succeed again the service says so and acknowledges records normally."""
        service, clock = self.startService(self.mktemp())

        def failingWrite(fd: int, data: bytes) -> int:
            raise OSError(5, "Input/output error")

        brokenDisk = self.patch(storage.os, "write", failingWrite)
        failed = service.write([record("x")])
        clock.advance(0)
        brokenDisk.restore()
        self.failureResultOf(failed, StorageUnavailable)
        acknowledged = service.write([record("y")])
        clock.advance(0)
        self.successResultOf(acknowledged)
        self.assertTrue(any("works again" in e.get("log_format", "") for e in self.events))

    def test_readOnlyFileSystemNamed(self) -> None:
        """The start check of a new file on a read-only file system says so, not 'Permission denied'."""
        folder = self.mktemp()
        os.makedirs(folder)
        real = os.statvfs

        def readOnly(path: str) -> os.statvfs_result:
            values = list(real(path))
            values[8] |= storage.ST_RDONLY  # f_flag
            return os.statvfs_result(values)

        self.patch(storage.os, "statvfs", readOnly)
        self.assertEqual(storage.recordsPathProblem(os.path.join(folder, "records.txt")),
                         f"Read-only file system: cannot create a file in {os.path.abspath(folder)}")

    def test_unwritablePathFailsAtStart(self) -> None:
        """A path in a missing directory stops the process with one line when the service starts."""
        service = FileStore(os.path.join(self.mktemp(), "missing", "records.txt"), Clock())
        stopped = self.assertRaises(SystemExit, service.startService)
        self.assertIn("cannot open records file", str(stopped))
        self.assertIn("No such file or directory", str(stopped))
        self.assertFalse(service.running)


def brokenFsync(fd: int) -> None:
    """An fsync on a failing disk."""
    raise OSError(5, "Input/output error")


class ManualThreads:
    """A stand-in thread pool whose calls run only when the test says so."""

    def __init__(self) -> None:
        self.calls: list[tuple[object, tuple, Deferred]] = []

    def __call__(self, function, *args):  # type: ignore[no-untyped-def]
        """Queue C{function(*args)}; return the Deferred of its eventual result."""
        result: Deferred = Deferred()
        self.calls.append((function, args, result))
        return result

    def runAll(self) -> None:
        """Run every queued call now."""
        calls, self.calls = self.calls, []
        for function, args, result in calls:
            try:
                result.callback(function(*args))
            except Exception:
                result.errback()


class ProvenAtStartTests(SynchronousTestCase):
    """A file store is ready only once it has stored or probed successfully: it probes at start."""

    def test_readyAfterTheStartProbe(self) -> None:
        """A usable file: healthy as soon as it has started (its probe at start passed)."""
        service = FileStore(self.mktemp(), Clock())
        self.assertFalse(service.healthy())
        service.startService()
        self.addCleanup(service.stopService)
        self.assertTrue(service.healthy())

    def test_noRoomAtStart(self) -> None:
        """A file system with no room at start: the store starts, is not healthy, says so once, and is healthy
        by itself once there is room (its probes)."""
        events: list[dict] = []
        self.patch(FileStore, "log", Logger(observer=events.append))
        clock, operations = Clock(), FullDisk()
        operations.full = True
        service = FileStore(self.mktemp(), clock, operations=operations)
        service.startService()
        self.addCleanup(service.stopService)
        self.assertFalse(service.healthy())
        clock.advance(5)
        self.assertFalse(service.healthy())
        errors = [e["log_format"].format(**e) for e in events if e["log_level"] == LogLevel.error]
        self.assertEqual(len(errors), 1)
        self.assertIn("No space left on device", errors[0])
        operations.full = False
        clock.advance(1)
        self.assertTrue(service.healthy())


class FsyncPolicyTests(SynchronousTestCase):
    """C{always} syncs before acknowledging, C{everysec} from a one-second timer, C{never} only at stop."""

    def start(self, policy: str) -> tuple[FileStore, Clock, ManualThreads]:
        """A started service with the given policy on a fresh file."""
        clock, threads = Clock(), ManualThreads()
        service = FileStore(self.mktemp(), clock, fsync=policy, runInThread=threads)
        service.startService()
        self.addCleanup(lambda: service.running and (service.stopService(), threads.runAll()))
        return service, clock, threads

    def test_always(self) -> None:
        """With C{always} a record is acknowledged only after the fsync of its batch finished."""
        service, clock, threads = self.start("always")
        acknowledged = service.write([record("a")])
        clock.advance(0)
        self.assertEqual([(f, a[0]) for f, a, _ in threads.calls], [(os.fsync, service._file.fd)])
        self.assertNoResult(acknowledged)
        threads.runAll()
        self.successResultOf(acknowledged)

    def test_alwaysFailure(self) -> None:
        """With C{always} a failed fsync refuses the batch's records."""
        service, clock, threads = self.start("always")

        self.patch(storage.os, "fsync", brokenFsync)
        acknowledged = service.write([record("a")])
        clock.advance(0)
        threads.runAll()
        self.failureResultOf(acknowledged, StorageUnavailable)

    def test_everysec(self) -> None:
        """With C{everysec} writes are acknowledged at once and one fsync follows within a second."""
        service, clock, threads = self.start("everysec")
        first = [service.write([record("a")]), service.write([record("b")])]
        for acknowledged in first:
            self.successResultOf(acknowledged)
        self.assertEqual(threads.calls, [])
        clock.advance(1)
        self.assertEqual(len(threads.calls), 1)
        threads.runAll()
        clock.advance(1)
        self.assertEqual(threads.calls, [], "nothing new was written, so no fsync")

    def test_everysecSlowDiskHoldsOneThread(self) -> None:
        """With C{everysec}, an fsync that takes 10 s holds one thread, not one more each second (the pool is
        the analysis's too); one fsync after it (the slow disk's probe, asked for while it ran) syncs everything
        written meanwhile, once."""
        service, clock, threads = self.start("everysec")
        for second in range(10):
            self.successResultOf(service.write([record(f"m{second}")]))
            clock.advance(1)
        self.assertEqual(len(threads.calls), 1)
        threads.runAll()
        self.assertEqual(len(threads.calls), 1, "the records written during the slow fsync are synced next")
        threads.runAll()
        clock.advance(1)
        clock.advance(1)
        self.assertEqual(threads.calls, [])

    def test_alwaysSlowDiskOneFsyncAtATime(self) -> None:
        """With C{always}, batches written while an fsync runs wait for one fsync after it, which covers them
        all (a group commit): one thread at a time, and each acknowledged only once synced."""
        service, clock, threads = self.start("always")
        first = service.write([record("a")])
        clock.advance(0)
        later = [service.write([record("b")]), service.write([record("c")])]
        clock.advance(0)
        clock.advance(0)
        self.assertEqual(len(threads.calls), 1)
        threads.runAll()
        self.successResultOf(first)
        for acknowledged in later:
            self.assertNoResult(acknowledged)
        self.assertEqual(len(threads.calls), 1, "one fsync for the two batches written meanwhile")
        threads.runAll()
        for acknowledged in later:
            self.successResultOf(acknowledged)
        self.assertEqual(threads.calls, [])

    def test_everysecFailureLoggedOnceNotUnhandled(self) -> None:
        """With C{everysec}, fsyncs that fail are one logged incident that marks the store unhealthy, not an
        unhandled error per tick."""
        service, clock, threads = self.start("everysec")

        self.patch(storage.os, "fsync", brokenFsync)
        for message in ("a", "b"):
            self.successResultOf(service.write([record(message)]))
            clock.advance(1)
            threads.runAll()
        gc.collect()
        self.assertFalse(service.healthy())
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_slowFsyncIsAnIncident(self) -> None:
        """An fsync still running after L{storage.SLOW_FSYNC} seconds makes the store unhealthy (C{/readyz} says
        503), logged once and counted, while replies (with C{always}) wait for it; the first quick fsync after it
        ends the incident, said once."""
        clock, threads, metrics = Clock(), ManualThreads(), RecordingMetrics()
        events: list[dict] = []
        self.patch(FileStore, "log", Logger(observer=events.append))
        service = FileStore(self.mktemp(), clock, fsync="always", runInThread=threads, metrics=metrics)
        service.startService()
        self.addCleanup(lambda: service.running and (service.stopService(), threads.runAll()))
        first = service.write([record("a")])
        clock.advance(storage.SLOW_FSYNC - 0.01)
        self.assertTrue(service.healthy())
        clock.advance(0.01)
        self.assertFalse(service.healthy())
        second = service.write([record("b")])
        clock.advance(2)
        threads.runAll()  # the slow fsync ends, 3 s in: still slow
        self.successResultOf(first)
        self.assertFalse(service.healthy())
        threads.runAll()  # the next one, for the second batch (and the probe), is quick
        self.successResultOf(second)
        self.assertTrue(service.healthy())
        said = [e["log_format"] for e in events if "fsync" in e["log_format"]][1:]  # after "appending records"
        self.assertEqual(len(said), 2, said)
        self.assertIn("an fsync has taken over {seconds:g} s", said[0])
        self.assertIn("fsyncs are quick again", said[1])
        self.assertEqual([e for e in metrics.events if e[0] == "storeIncident"], [("storeIncident", "slow_fsync")])

    def test_never(self) -> None:
        """With C{never} no fsync runs while serving, one runs at stop."""
        service, clock, threads = self.start("never")
        service.write([record("a")])
        clock.advance(5)
        self.assertEqual(threads.calls, [])
        stopped = service.stopService()
        self.assertEqual(len(threads.calls), 1)
        threads.runAll()
        self.successResultOf(stopped)

    def test_closeWaitsForFsync(self) -> None:
        """Stopping while an fsync runs closes the file only after it finished."""
        service, clock, threads = self.start("always")
        service.write([record("a")])
        clock.advance(0)
        stopped = service.stopService()
        self.assertNoResult(stopped)
        threads.runAll()
        threads.runAll()
        self.successResultOf(stopped)

    def test_unknownPolicy(self) -> None:
        """An unknown policy is refused when the service is made."""
        self.assertRaises(ValueError, FileStore, "x", Clock(), fsync="sometimes")


class ReopenTests(SynchronousTestCase):
    """C{reopen} continues in a new file at the same path, losing and repeating nothing."""

    def test_afterRename(self) -> None:
        """Records before the rename stay in the renamed file; later ones go to a new file at the path."""
        path, clock = self.mktemp(), Clock()
        service = FileStore(path, clock, fsync="never")
        service.startService()
        self.addCleanup(service.stopService)
        service.write([record("before")])
        written = service.write([record("pending")])
        os.rename(path, path + ".1")
        service.reopen()
        self.successResultOf(written)
        service.write([record("after")])
        clock.advance(0)
        with open(path + ".1", encoding="utf-8") as old, open(path, encoding="utf-8") as new:
            self.assertEqual([r.message for r in parseRecords(old)], ["before", "pending"])
            self.assertEqual([r.message for r in parseRecords(new)], ["after"])

    def test_failedReopenKeepsFile(self) -> None:
        """If the path cannot be opened any more the old file is kept and records still succeed."""
        directory = self.mktemp()
        os.mkdir(directory)
        path, clock = os.path.join(directory, "records.txt"), Clock()
        service = FileStore(path, clock, fsync="never")
        service.startService()
        self.addCleanup(service.stopService)
        os.rename(directory, directory + ".moved")
        service.reopen()
        acknowledged = service.write([record("still")])
        clock.advance(0)
        self.successResultOf(acknowledged)
        with open(os.path.join(directory + ".moved", "records.txt"), encoding="utf-8") as file:
            self.assertEqual([r.message for r in parseRecords(file)], ["still"])


class TornTailTests(SynchronousTestCase):
    """A records file left with an unfinished last line starts clean: the fragment is moved aside."""

    def test_tornTailMovedAside(self) -> None:
        """The unfinished line goes to <path>.torn-<time>, whole records stay, new ones start on a fresh line."""
        path, clock = self.mktemp(), Clock()
        clock.advance(1_795_000_000)
        whole = "".join(formatTSV(record(m)) for m in ("one", "two"))
        with open(path, "w", encoding="utf-8") as file:
            file.write(whole + "2026-11-26 10:00:00\t127.0.0.1\tthr")
        service = FileStore(path, clock, fsync="never")
        service.startService()
        self.addCleanup(service.stopService)
        service.write([record("three")])
        clock.advance(0)
        with open(path, encoding="utf-8") as file:
            self.assertEqual([r.message for r in parseRecords(file)], ["one", "two", "three"])
        with open(f"{path}.torn-1795000000", encoding="utf-8") as file:
            self.assertEqual(file.read(), "2026-11-26 10:00:00\t127.0.0.1\tthr")

    def test_onlyFragment(self) -> None:
        """A file holding nothing but a fragment becomes empty."""
        path = self.mktemp()
        with open(path, "wb") as file:
            file.write(b"\xc3")
        service = FileStore(path, Clock(), fsync="never")
        service.startService()
        self.addCleanup(service.stopService)
        self.assertEqual(os.path.getsize(path), 0)

    def test_cleanFileUntouched(self) -> None:
        """A file ending in a newline is left as it is and nothing is moved aside."""
        path = self.mktemp()
        with open(path, "w", encoding="utf-8") as file:
            file.write(formatTSV(record("one")))
        service = FileStore(path, Clock(), fsync="never")
        service.startService()
        self.addCleanup(service.stopService)
        self.assertEqual(os.path.getsize(path), len(formatTSV(record("one")).encode()))
        self.assertFalse(any(name.startswith(os.path.basename(path) + ".torn")
                             for name in os.listdir(os.path.dirname(os.path.abspath(path)))))

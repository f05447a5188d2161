"""The records store contract (L{primecount.records.store.IRecordsStore}), one suite run against both stores: the
file store on a real file, the table store on a table of the tests' real PostgreSQL cluster, each with a real
fault (a full disk, a table that refuses every row) and its repair."""

from __future__ import annotations

import errno
import os
import time
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.task import Clock, deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from primecount.records.formats import Record, parseRecords
from primecount.records.file import FileOperations, FileStore
from primecount.records.store import PROBE_INTERVAL, IRecordsStore, SelfProbe, StorageUnavailable
from tests.postgres import freshTable, sharedCluster


def record(message: str) -> Record:
    """A record for C{message} with fixed other fields."""
    return Record(1_771_322_472, "127.0.0.1", message, 1, False)


class RecordsStoreContract:
    """What every records store promises, whatever keeps the records. A subclass says how to make its store,
    read back what it stored, and break and repair it for real."""

    store: Any

    def makeStore(self) -> Any:
        """A new store, not started."""
        raise NotImplementedError

    def storedMessages(self) -> list[str]:
        """The messages of the records stored now, in the order they were stored."""
        raise NotImplementedError

    def breakStore(self) -> None:
        """Make the next writes fail, as the store's real trouble would."""
        raise NotImplementedError

    def repairStore(self) -> None:
        """End the trouble L{breakStore} made."""
        raise NotImplementedError

    def setUp(self) -> Any:
        self.store = self.makeStore()
        self.store.startService()
        self.addCleanup(lambda: self.store.running and self.store.stopService())  # type: ignore[attr-defined]

    async def storedOnceRepaired(self, message: str, within: float = 15.0) -> None:
        """Write C{message} until it is stored (the store may wait before trying again after trouble)."""
        deadline = time.monotonic() + within
        while True:
            try:
                await self.store.write([record(message)])
                return
            except StorageUnavailable:
                if time.monotonic() > deadline:
                    raise
                await deferLater(reactor, 0.05, lambda: None)

    def test_providesTheInterface(self) -> None:
        """The store provides every attribute and method of L{IRecordsStore}, and names where records go."""
        self.assertTrue(verifyObject(IRecordsStore, self.store))
        self.assertTrue(self.store.location)

    async def test_healthyOnceProbedAtStart(self) -> None:
        """A store is healthy (ready) only once it has stored or probed successfully: it probes at start, and is
        healthy soon after without a batch, having stored nothing."""
        deadline = time.monotonic() + 10.0
        while not self.store.healthy():
            self.assertLess(time.monotonic(), deadline, "not healthy 10 s after the start")
            await deferLater(reactor, 0.01, lambda: None)
        self.assertEqual(self.storedMessages(), [])

    async def test_batchStoredBeforeItFires(self) -> None:
        """A batch's result fires once its records are stored, all of them, in order; the store is healthy."""
        await self.store.write([record("one"), record("two"), record("three")])
        self.assertEqual(self.storedMessages(), ["one", "two", "three"])
        self.assertTrue(self.store.healthy())

    async def test_batchesWrittenAtOnceStoredOnceEach(self) -> None:
        """Batches written one after another without waiting are each stored exactly once, the records of each
        in their order (a store with several commits in flight may store whole batches in another order)."""
        batches = [[f"batch {n} first", f"batch {n} second"] for n in range(40)]
        await defer.gatherResults([self.store.write([record(m) for m in batch]) for batch in batches],
                                  consumeErrors=True)
        stored = self.storedMessages()
        self.assertEqual(sorted(stored), sorted(m for batch in batches for m in batch))
        for first, second in batches:
            self.assertLess(stored.index(first), stored.index(second))

    async def test_batchWrittenAfterAnotherStoredAfterIt(self) -> None:
        """A batch written once an earlier one's result has fired is stored after it."""
        messages = [f"in turn {n}" for n in range(10)]
        for message in messages:
            await self.store.write([record(message)])
        self.assertEqual(self.storedMessages(), messages)

    async def test_gatheringLosesNothing(self) -> None:
        """Batches written while requests are being analysed are stored once analysis is over."""
        self.store.gathering(True)
        written = [self.store.write([record(f"gathered {n}")]) for n in range(3)]
        self.store.gathering(False)
        await defer.gatherResults(written, consumeErrors=True)
        self.assertEqual(self.storedMessages(), ["gathered 0", "gathered 1", "gathered 2"])

    async def test_troubleRefusesThenRecovers(self) -> None:
        """In trouble, a batch fails with L{StorageUnavailable} and the store says it is not healthy; once the
        trouble is over it stores again and says it is healthy, by itself."""
        await self.store.write([record("before")])
        self.breakStore()
        with self.assertRaises(StorageUnavailable):
            await self.store.write([record("refused")])
        self.assertFalse(self.store.healthy())
        self.repairStore()
        await self.storedOnceRepaired("after")
        self.assertTrue(self.store.healthy())
        stored = self.storedMessages()
        self.assertEqual((stored[0], stored[-1]), ("before", "after"))

    async def test_healthyAgainWithoutTraffic(self) -> None:
        """A store refused a batch and then gets none (its balancer took its host out): once repaired it says
        it is healthy again by itself, its own probes storing nothing."""
        await self.store.write([record("before")])
        self.breakStore()
        with self.assertRaises(StorageUnavailable):
            await self.store.write([record("refused")])
        await deferLater(reactor, PROBE_INTERVAL * 2.5, lambda: None)
        self.assertFalse(self.store.healthy(), "a probe found the broken store healthy")
        self.repairStore()
        deadline = time.monotonic() + 10.0
        while not self.store.healthy():
            self.assertLess(time.monotonic(), deadline, "still unhealthy 10 s after the repair")
            await deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(self.storedMessages(), ["before"])

    async def test_reopenKeepsStoring(self) -> None:
        """After C{reopen} (SIGHUP) records go on to the same location."""
        await self.store.write([record("before reopen")])
        self.store.reopen()
        await self.store.write([record("after reopen")])
        self.assertEqual(self.storedMessages(), ["before reopen", "after reopen"])

    async def test_stopStoresWhatWasWritten(self) -> None:
        """Batches written just before the store stops are stored, each once, before the stop is over."""
        written = [self.store.write([record(f"last {n}")]) for n in range(5)]
        await self.store.stopService()
        await defer.gatherResults(written, consumeErrors=True)
        self.assertEqual(sorted(self.storedMessages()), [f"last {n}" for n in range(5)])


class FullDisk(FileOperations):
    """The file store's system calls, with a disk that can be made full: every write then fails with ENOSPC."""

    full = False

    def write(self, fd: int, data: bytes) -> int:
        """C{os.write}, or C{ENOSPC} while full."""
        if self.full:
            raise OSError(errno.ENOSPC, "No space left on device")
        return super().write(fd, data)

    def fstatvfs(self, fd: int) -> os.statvfs_result:
        """C{os.fstatvfs}, with no block free while full."""
        real = super().fstatvfs(fd)
        return os.statvfs_result((*real[:3], 0, 0, *real[5:])) if self.full else real


class FileStoreContractTests(RecordsStoreContract, TestCase):
    """The file store keeps the contract, on a real file."""

    def makeStore(self) -> Any:
        self.path = self.mktemp()
        self.operations = FullDisk()
        return FileStore(self.path, reactor, "always", runInThread=deferToThread, operations=self.operations)

    def storedMessages(self) -> list[str]:
        with open(self.path, encoding="utf-8") as file:
            return [stored.message for stored in parseRecords(file)]

    def breakStore(self) -> None:
        self.operations.full = True

    def repairStore(self) -> None:
        self.operations.full = False

    async def test_batchesWrittenAtOnceKeepTheirOrder(self) -> None:
        """The file's own promise, beyond the contract's: batches written without waiting are stored in the
        order they were written (one append at a time)."""
        messages = [f"batch {n}" for n in range(40)]
        await defer.gatherResults([self.store.write([record(m)]) for m in messages], consumeErrors=True)
        self.assertEqual(self.storedMessages(), messages)


class ImmutableFile(FileOperations):
    """The file store's system calls, with a records file that can be made immutable (C{chattr +i}): opening it
    for writing and writing to it, even nothing, then fail with C{EPERM}, while its file system has room."""

    immutable = False

    def write(self, fd: int, data: bytes) -> int:
        """C{os.write}, or C{EPERM} while immutable."""
        if self.immutable:
            raise OSError(errno.EPERM, "Operation not permitted")
        return super().write(fd, data)

    def openAndClose(self, path: str) -> None:
        """Open and close, or C{EPERM} while immutable."""
        if self.immutable:
            raise OSError(errno.EPERM, "Operation not permitted")
        super().openAndClose(path)


class ImmutableFileContractTests(FileStoreContractTests):
    """The file store keeps the contract on a file made immutable: its probes try what a write does, so room
    on the disk does not pass for a working file."""

    def makeStore(self) -> Any:
        self.path = self.mktemp()
        self.operations = ImmutableFile()
        return FileStore(self.path, reactor, "always", runInThread=deferToThread, operations=self.operations)

    def breakStore(self) -> None:
        self.operations.immutable = True

    def repairStore(self) -> None:
        self.operations.immutable = False


class TableStoreContractTests(RecordsStoreContract, TestCase):
    """The table store keeps the contract, on a table of the tests' PostgreSQL cluster."""

    def makeStore(self) -> Any:
        from primecount.records.table import TableStore

        self.cluster = sharedCluster(self)
        self.table = freshTable(self, self.cluster)
        return TableStore(self.cluster.uri, reactor, "always", table=self.table, timeout=5.0)

    def storedMessages(self) -> list[str]:
        return [message for (message,) in self.cluster.query(f'SELECT message FROM "{self.table}" ORDER BY id')]

    def breakStore(self) -> None:
        self.cluster.query(f'ALTER TABLE "{self.table}" ADD CONSTRAINT refuse_every_row CHECK (false) NOT VALID')

    def repairStore(self) -> None:
        self.cluster.query(f'ALTER TABLE "{self.table}" DROP CONSTRAINT refuse_every_row')


class ProbedStore:
    """A store whose probes wait for the test to answer them."""

    def __init__(self) -> None:
        self.isHealthy = True
        self.probes: list[defer.Deferred[None]] = []

    def healthy(self) -> bool:
        """What the test set."""
        return self.isHealthy

    def probe(self) -> defer.Deferred[None]:
        """A probe the test answers."""
        self.probes.append(defer.Deferred())
        return self.probes[-1]


class SelfProbeTests(SynchronousTestCase):
    """L{SelfProbe} probes a failed store every interval, one probe at a time, until it is healthy; nothing
    runs while it is healthy."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.store = ProbedStore()
        self.selfProbe = SelfProbe(self.store, self.clock, interval=1.0)  # type: ignore[arg-type]

    def test_nothingScheduledUntilAFailure(self) -> None:
        """A store that never failed costs no timer."""
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_probesUntilHealthyThenStops(self) -> None:
        """After a failure a probe comes each interval; none starts while one is out; a refused probe is
        followed by another; once healthy the timer is gone."""
        self.store.isHealthy = False
        self.selfProbe.watch()
        self.clock.advance(1.0)
        self.assertEqual(len(self.store.probes), 1)
        self.clock.advance(3.0)
        self.assertEqual(len(self.store.probes), 1, "a second probe while the first is out")
        self.store.probes[0].errback(StorageUnavailable("still broken"))
        self.clock.advance(1.0)
        self.assertEqual(len(self.store.probes), 2)
        self.store.isHealthy = True
        self.store.probes[1].callback(None)
        self.clock.advance(1.0)
        self.assertEqual((len(self.store.probes), self.clock.getDelayedCalls()), (2, []))

    def test_stopEndsProbing(self) -> None:
        """Once stopped, neither the running timer nor a later failure probes again."""
        self.store.isHealthy = False
        self.selfProbe.watch()
        self.selfProbe.stop()
        self.selfProbe.watch()
        self.clock.advance(5.0)
        self.assertEqual(self.store.probes, [])

"""Several writers on one records file: the interleavings that used to cut or glue records, driven through
injected file operations, and a model-based test of random interleavings and deaths with hypothesis."""

from __future__ import annotations

import fcntl
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from typing import Callable, Optional

from hypothesis import given, settings, strategies as st
from twisted.internet.task import Clock
from twisted.logger import LogLevel, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from primecount.records.formats import JSONL, TSV, Record, RecordFormat, parseRecords
from primecount.records.file import LOCK_WAIT_SECONDS, FileOperations, FileStore
from primecount.records.store import StorageUnavailable
from primecount.tools.records import scan
from primecount.tools.serverprocess import ServerProcess
from tests.helpers import ClientThreads, slow

NOW = 1_795_000_000


def record(message: str) -> Record:
    """A record for C{message} with fixed other fields."""
    return Record(NOW, "127.0.0.1", message, 1, False)


class WriterDied(BaseException):
    """The writing process was killed here (not an error it could handle)."""


class HookedOperations(FileOperations):
    """File operations that call C{before(name)} ahead of each one, and can die half-way through a write."""

    def __init__(self) -> None:
        self.before: Callable[[str], None] = lambda name: None
        self.dieInWriteAfter: Optional[int] = None  # bytes a write gets out before the process dies

    def fstat(self, fd: int) -> os.stat_result:
        """Hook, then fstat."""
        self.before("fstat")
        return super().fstat(fd)

    def pread(self, fd: int, size: int, offset: int) -> bytes:
        """Hook, then pread."""
        self.before("pread")
        return super().pread(fd, size, offset)

    def write(self, fd: int, data: bytes) -> int:
        """Hook, then write (or write a part and die)."""
        self.before("write")
        if self.dieInWriteAfter is not None:
            os.write(fd, data[:self.dieInWriteAfter])
            raise WriterDied()
        return super().write(fd, data)

    def ftruncate(self, fd: int, size: int) -> None:
        """Hook, then ftruncate."""
        self.before("ftruncate")
        super().ftruncate(fd, size)


class SharedFileTestCase(SynchronousTestCase):
    """Writers on one file in a temporary folder, each a L{FileStore} with its own descriptor."""

    recordFormat: RecordFormat = TSV

    def setUp(self) -> None:
        self.folder = os.path.abspath(self.mktemp())
        os.mkdir(self.folder)
        self.path = os.path.join(self.folder, "records.txt")
        self.clock = Clock()
        self.clock.advance(NOW)
        self.warnings: list[dict] = []
        self.errors: list[dict] = []

        def observe(event: dict) -> None:
            if event.get("log_level") == LogLevel.warn:
                self.warnings.append(event)
            elif event.get("log_level") == LogLevel.error:
                self.errors.append(event)

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)

    def writer(self, operations: Optional[FileOperations] = None) -> FileStore:
        """A started writer on the shared file."""
        service = FileStore(self.path, self.clock, "never", recordFormat=self.recordFormat, operations=operations)
        service.startService()
        self.addCleanup(lambda: service.running and service.stopService())
        return service

    def peerLock(self) -> int:
        """Another process's descriptor on the file, holding its lock."""
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
        self.addCleanup(lambda: _closeQuietly(fd))
        fcntl.flock(fd, fcntl.LOCK_EX)
        return fd

    def messages(self) -> list[str]:
        """The messages of the shared file's records, in file order; the file must hold whole records only."""
        result = scan(self.path)
        self.assertEqual((result.malformed, result.torn), ([], None), "every line is a whole record")
        with open(self.path, encoding="utf-8", newline="\n") as file:
            return [r.message for r in parseRecords(file)]

    def tornFiles(self) -> dict[str, bytes]:
        """Each file moved aside, by name, with its bytes."""
        found = {}
        for name in sorted(os.listdir(self.folder)):
            if ".torn-" in name:
                with open(os.path.join(self.folder, name), "rb") as file:
                    found[name] = file.read()
        return found


def _closeQuietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


class InterleavingTests(SharedFileTestCase):
    """The interleavings that broke with several writers: none cuts, glues or loses a record now."""

    def test_peerAppendsBetweenSizeReadAndTruncate(self) -> None:
        """While one writer moves a dead writer's torn tail aside, another's append waits for it, then lands
        whole: it is not cut away with the tail."""
        peer = self.writer()  # opened first; holds no lock between appends
        self.successResultOf(peer.write([record("whole")]))
        with open(self.path, "ab") as file:  # a writer that died half-way through its line
            file.write(b"2026-11-26 10:00:00\t127.0.0.1\tdea")
        operations = HookedOperations()
        attempts: list[object] = []

        def peerTries(name: str) -> None:
            if name == "ftruncate" and not attempts:
                attempts.append(peer.write([record("peer")]))
                self.assertNoResult(attempts[0])  # the lock is held: it waits, touching nothing

        operations.before = peerTries
        cutter = FileStore(self.path, self.clock, fsync="never", operations=operations)
        cutter.startService()
        self.addCleanup(cutter.stopService)
        self.clock.advance(0.01)
        self.successResultOf(attempts[0])
        self.assertEqual(self.messages(), ["whole", "peer"])
        self.assertEqual(list(self.tornFiles().values()), [b"2026-11-26 10:00:00\t127.0.0.1\tdea"])

    def test_peerWriteInProgressAtOpen(self) -> None:
        """A writer that opens the file while a peer is half-way through its write leaves the peer's line alone
        and appends after it once the peer is done."""
        peerFd = self.peerLock()
        half = TSV.format(record("peer line")).encode()
        os.write(peerFd, half[:10])
        late = self.writer()
        acknowledged = late.write([record("late")])
        self.assertNoResult(acknowledged)
        os.write(peerFd, half[10:])
        fcntl.flock(peerFd, fcntl.LOCK_UN)
        self.clock.advance(0.01)
        self.successResultOf(acknowledged)
        self.assertEqual(self.messages(), ["peer line", "late"])
        self.assertEqual(self.tornFiles(), {})

    def test_partialWriteThenAnotherWritersAppend(self) -> None:
        """A writer killed in the middle of its write leaves a partial record; the next writer's append moves
        exactly that fragment aside and starts on a clean line, so its record is not glued to it."""
        dying = HookedOperations()
        victim = self.writer(dying)
        victim.write([record("before")])
        dying.dieInWriteAfter = 7
        self.assertRaises(WriterDied, victim.write, [record("never answered")])
        os.close(victim._file.fd)  # type: ignore[union-attr]  # the process is gone: so is its descriptor
        victim._file = None  # type: ignore[assignment]
        survivor = self.writer()
        self.successResultOf(survivor.write([record("after")]))
        self.successResultOf(survivor.write([record("and after")]))
        self.assertEqual(self.messages(), ["before", "after", "and after"])
        self.assertEqual(list(self.tornFiles().values()), [self.recordFormat.format(record("never answered")).encode()[:7]])
        self.assertEqual(len(self.warnings), 1, "logged once")

    def test_failedWriteCutBackOnlyItsOwnBytes(self) -> None:
        """A write that fails half-way is cut back to where this writer began, not by its own length from an
        end that others may have moved."""
        operations = HookedOperations()
        writer = self.writer(operations)
        other = self.writer()
        self.successResultOf(other.write([record("other first")]))
        calls: list[int] = []
        realWrite = FileOperations.write

        def halfThenFail(self_: FileOperations, fd: int, data: bytes) -> int:
            calls.append(len(data))
            if len(calls) == 1:
                return realWrite(self_, fd, data[: len(data) // 2])
            raise OSError(28, "No space left on device")

        self.patch(HookedOperations, "write", halfThenFail)
        self.failureResultOf(writer.write([record("refused" * 20)]), StorageUnavailable)
        self.successResultOf(other.write([record("other second")]))
        self.assertEqual(self.messages(), ["other first", "other second"])


class LockWaitTests(SharedFileTestCase):
    """A lock held too long is answered ERROR storage unavailable, logged once; the reactor never waits on it."""

    def test_stuckPeer(self) -> None:
        """Batches wait on a timer, in order; past the bound they fail (one log line); once the peer lets go,
        appends work again and that is logged."""
        self.writer()  # creates the file
        peerFd = self.peerLock()
        writer = self.writer()
        first, second = writer.write([record("one")]), writer.write([record("two")])
        self.assertNoResult(first)
        self.clock.advance(LOCK_WAIT_SECONDS / 2)
        self.assertNoResult(second)
        for _ in range(100):
            self.clock.advance(0.05)
        self.failureResultOf(first, StorageUnavailable)
        self.failureResultOf(second, StorageUnavailable)
        third = writer.write([record("three")])
        for _ in range(100):
            self.clock.advance(0.05)
        self.failureResultOf(third, StorageUnavailable)
        self.assertEqual(len(self.errors), 1, "logged once per incident")
        fcntl.flock(peerFd, fcntl.LOCK_UN)
        self.successResultOf(writer.write([record("four")]))
        self.assertEqual(self.messages(), ["four"])

    def test_waitingBatchesKeepTheirOrder(self) -> None:
        """Batches that waited for the lock are appended in the order they came, after the peer's line."""
        peerFd = self.peerLock()
        writer = self.writer()
        waiting = [writer.write([record(f"waited {i}")]) for i in range(3)]
        os.write(peerFd, TSV.format(record("peer")).encode())
        fcntl.flock(peerFd, fcntl.LOCK_UN)
        self.clock.advance(0.01)
        for acknowledged in waiting:
            self.successResultOf(acknowledged)
        self.assertEqual(self.messages(), ["peer", "waited 0", "waited 1", "waited 2"])


class ModelTests(SharedFileTestCase):
    """Random interleavings of several writers' appends, with other writers running between any two of a
    writer's file operations, and writers dying in the middle of a write."""

    @settings(max_examples=60, deadline=None)
    @given(st.lists(st.tuples(st.integers(0, 2), st.integers(1, 3), st.integers(0, 5), st.integers(-1, 40),
                              st.booleans()), min_size=1, max_size=25))
    def test_everyAcknowledgedRecordOnceAndWhole(self, steps: list[tuple[int, int, int, int, bool]]) -> None:
        """Whatever the interleaving, every acknowledged record is in the file exactly once and whole; only
        fragments of unacknowledged writes are ever moved aside."""
        self.setUp()
        for name in os.listdir(self.folder):
            os.remove(os.path.join(self.folder, name))
        operations = [HookedOperations() for _ in range(3)]
        writers = [self.writer(ops) for ops in operations]
        acknowledged: list[str] = []
        unanswered: list[bytes] = []
        counter = iter(range(10_000))

        def append(index: int, size: int) -> None:
            messages = [f"w{index}-{next(counter)}" + "x" * (size * 7) for _ in range(size)]
            result = writers[index].write([record(m) for m in messages])
            result.addCallback(lambda _: acknowledged.extend(messages))
            result.addErrback(lambda failure: failure.trap(StorageUnavailable))

        for index, size, interruptAt, dieAfter, peerRuns in steps:
            ops, seen = operations[index], [0]
            other = (index + 1) % 3

            def before(name: str) -> None:
                seen[0] += 1
                if peerRuns and seen[0] == interruptAt + 1:
                    ops.before = lambda name: None
                    append(other, 1)  # another writer runs between two of this one's operations

            ops.before = before
            if dieAfter >= 0:
                ops.dieInWriteAfter = dieAfter
                messages = [f"w{index}-{next(counter)}-dies" for _ in range(size)]
                try:
                    writers[index].write([record(m) for m in messages])
                except WriterDied:
                    unanswered.append(b"".join(self.recordFormat.format(record(m)).encode() for m in messages))
                    os.close(writers[index]._file.fd)  # type: ignore[union-attr]
                    writers[index]._file = None  # type: ignore[assignment]
                    operations[index] = HookedOperations()
                    writers[index] = self.writer(operations[index])  # restarted
                else:
                    ops.dieInWriteAfter = None
            else:
                append(index, size)
            ops.before = lambda name: None
            self.clock.advance(0.06)
        for _ in range(40):
            self.clock.advance(0.06)
        final = self.writer()
        self.successResultOf(final.write([record("last")]))  # moves aside a fragment left at the very end
        stored = self.messages()
        self.assertEqual(sorted(m for m in stored if m in set(acknowledged)), sorted(acknowledged))
        self.assertEqual(len(stored), len(set(stored)), "nothing twice")
        for fragment in self.tornFiles().values():
            self.assertNotIn(b"\n", fragment)
            self.assertTrue(any(fragment in whole for whole in unanswered), fragment)


class RemovedFileTests(SharedFileTestCase):
    """A records file removed (or replaced) under its writers at any moment: nothing acknowledged after that is
    left only in the removed file; a rename (logrotate's way) is followed only on SIGHUP, as before."""

    def test_removedBetweenBatches(self) -> None:
        """The batch after an C{rm} goes to a new file at the path, and the removal is logged once."""
        writer = self.writer()
        self.successResultOf(writer.write([record("before")]))
        os.remove(self.path)
        self.successResultOf(writer.write([record("after")]))
        self.successResultOf(writer.write([record("later")]))
        self.assertEqual(self.messages(), ["after", "later"])
        self.assertEqual(len([w for w in self.warnings if "was removed or replaced" in w["log_format"]]), 1)

    def test_removedBetweenStatusAndWrite(self) -> None:
        """Removed after the writer looked at the file and before it wrote: the batch is in the new file."""
        ops = HookedOperations()
        writer = self.writer(ops)

        def before(name: str) -> None:
            if name == "write":
                ops.before = lambda name: None
                os.remove(self.path)

        ops.before = before
        self.successResultOf(writer.write([record("raced")]))
        self.assertEqual(self.messages(), ["raced"])

    def test_removedJustAfterTheWrite(self) -> None:
        """Removed once the batch is written, before its replies: it is written again in the new file, once."""
        ops = HookedOperations()
        writer = self.writer(ops)

        def writeThenRemove(fd: int, data: bytes) -> int:
            written = os.write(fd, data)
            del ops.write  # once
            os.remove(self.path)
            return written

        ops.write = writeThenRemove  # type: ignore[method-assign]
        self.successResultOf(writer.write([record("one"), record("two")]))
        self.assertEqual(self.messages(), ["one", "two"])
        self.assertEqual(writer._file.end, os.path.getsize(self.path))  # type: ignore[union-attr]

    def test_replacedByAnotherFile(self) -> None:
        """Another file moved over the path: later records are appended to it, after its own lines."""
        writer = self.writer()
        self.successResultOf(writer.write([record("old")]))
        other = os.path.join(self.folder, "other.txt")
        with open(other, "w", encoding="utf-8") as file:
            file.write(TSV.format(record("theirs")))
        os.rename(other, self.path)
        self.successResultOf(writer.write([record("new")]))
        self.assertEqual(self.messages(), ["theirs", "new"])

    def test_twoWritersBothFollow(self) -> None:
        """Two writers on the removed file each move to the one new file at the path, nothing cut or glued."""
        first, second = self.writer(), self.writer()
        os.remove(self.path)
        self.successResultOf(first.write([record("a")]))
        self.successResultOf(second.write([record("b")]))
        self.successResultOf(first.write([record("c")]))
        self.assertEqual(self.messages(), ["a", "b", "c"])

    def test_renameIsFollowedOnlyOnHangUp(self) -> None:
        """A renamed file still has a name: records go on into it until C{reopen}, as logrotate expects."""
        writer = self.writer()
        os.rename(self.path, self.path + ".1")
        self.successResultOf(writer.write([record("rotated")]))
        self.assertFalse(os.path.exists(self.path))
        writer.reopen()
        self.successResultOf(writer.write([record("fresh")]))
        self.assertEqual(self.messages(), ["fresh"])
        with open(self.path + ".1", encoding="utf-8") as file:
            self.assertEqual([r.message for r in parseRecords(file)], ["rotated"])

    def test_unreachablePathIsUnavailable(self) -> None:
        """Removed along with its folder: the batch is refused (ERROR storage unavailable), not lost."""
        writer = self.writer()
        os.remove(self.path)
        os.rmdir(self.folder)
        self.failureResultOf(writer.write([record("nowhere")]), StorageUnavailable)

    @settings(max_examples=60, deadline=None)
    @given(st.lists(st.tuples(st.integers(0, 1), st.integers(1, 3), st.integers(-1, 6), st.booleans()),
                    min_size=1, max_size=20))
    def test_removalsAnywhere(self, steps: list[tuple[int, int, int, bool]]) -> None:
        """Two writers append while the file is removed, or replaced by another, between any two of their file
        operations: every record acknowledged since the last removal is in the file at the path exactly once."""
        self.setUp()
        operations = [HookedOperations() for _ in range(2)]
        writers = [self.writer(ops) for ops in operations]
        removals, acknowledged = [0], []
        counter = iter(range(10_000))
        replacement = os.path.join(self.folder, "replacement.txt")

        def remove(replace: bool) -> None:
            removals[0] += 1
            if replace:
                with open(replacement, "w", encoding="utf-8") as file:
                    file.write(TSV.format(record(f"replacement-{removals[0]}")))
                os.rename(replacement, self.path)
            elif os.path.exists(self.path):
                os.remove(self.path)

        for index, size, removeAt, replace in steps:
            ops, seen = operations[index], [0]

            def before(name: str) -> None:
                seen[0] += 1
                if seen[0] == removeAt + 1:
                    remove(replace)

            ops.before = before
            messages = [f"w{index}-{next(counter)}" for _ in range(size)]
            result = writers[index].write([record(m) for m in messages])
            ops.before = lambda name: None
            self.assertIsNone(self.successResultOf(result))
            acknowledged += [(m, removals[0]) for m in messages]
        stored = self.messages() if os.path.exists(self.path) else []
        since = [m for m, removal in acknowledged if removal == removals[0]]
        self.assertEqual(sorted(m for m in stored if not m.startswith("replacement-")), sorted(since))
        self.assertEqual(len(stored), len(set(stored)), "nothing twice")


class JSONLInterleavingTests(InterleavingTests):
    """The same interleavings with JSON lines."""

    recordFormat = JSONL


class KeptLargeClients(ClientThreads):
    """Client threads on kept connections, each sending ~60 KB messages one after another and checking every
    reply."""

    def message(self, number: int, sent: int) -> str:
        """C{k<number> <sent>} and 40–60 KB more."""
        return f"k{number} {sent} " + "ab" * random.randint(20_000, 30_000)


class KilledWritersOverTCPTests(SharedFileTestCase):
    """Real twistd processes appending large records to one file while some of them are killed with SIGKILL."""

    def assertEveryAnswerRecordedOnce(self, answered: list[str]) -> None:
        """Every verified reply has exactly one record; the file checks clean; only partial lines were moved
        aside."""
        self.assertGreater(len(answered), 50)
        check = subprocess.run([sys.executable, "-m", "primecount.records", "check", self.path],
                               capture_output=True, text=True)
        self.assertEqual(check.returncode, 0, check.stdout + check.stderr)
        stored = Counter(self.messages())
        self.assertEqual([(m, stored[m]) for m in answered if stored[m] != 1], [],
                         "each answered request recorded exactly once (message, records)")
        for name, fragment in self.tornFiles().items():
            self.assertNotIn(b"\n", fragment, f"{name} holds only the partial line of a write cut short")

    @slow
    def test_fourWorkersKilledAtRandom(self) -> None:
        """C{--workers 4 --keep-alive}, 24 clients sending ~60 KB lines, eight workers killed at random moments:
        no answered request loses its record or shares its line."""
        server = ServerProcess(self.path, "--workers", "4", "--keep-alive", "--max-line", "70000",
                               "--max-per-ip", "0")
        self.addCleanup(lambda: server.process.poll() is None and server.stop())
        server.waitForWorkers(4)
        clients = KeptLargeClients([server.port], 24)
        try:
            killed: set[int] = set()
            for _ in range(8):
                time.sleep(random.uniform(0.05, 0.4))
                latest = dict(re.findall(rb"started worker (\d+) \(pid (\d+)\)", server.output))
                alive = [int(pid) for pid in latest.values() if int(pid) not in killed]
                if alive:
                    victim = random.choice(alive)
                    os.kill(victim, signal.SIGKILL)
                    killed.add(victim)
            server.waitFor(rb"started worker \d+ \(pid \d+\)", seconds=60, count=4 + len(killed))
            server.waitForWorkers(4 + len(killed), seconds=60)
            time.sleep(0.5)
        finally:
            answered = clients.stop().answered
        self.assertEqual(server.stop(), 0, server.log)
        self.assertEveryAnswerRecordedOnce(answered)

    @slow
    def test_twoInstancesOneKilledAndRestarted(self) -> None:
        """Two independent single-process servers append to one file; one is killed with SIGKILL and started
        again three times under load: every answered request keeps its one whole record."""
        options = ("--keep-alive", "--max-line", "70000", "--max-per-ip", "0")
        steady = ServerProcess(self.path, *options)
        self.addCleanup(lambda: steady.process.poll() is None and steady.stop())
        victim = ServerProcess(self.path, *options)
        ports = [steady.port, victim.port]
        clients = KeptLargeClients(ports, 8)
        try:
            for _ in range(3):
                time.sleep(random.uniform(0.2, 0.6))
                ports[1] = 0  # no client reconnects to the dead server's port (L{ClientThreads})
                victim.process.kill()
                victim.process.wait(30)
                victim = ServerProcess(self.path, *options)
                ports[1] = victim.port
            time.sleep(0.5)
        finally:
            answered = clients.stop().answered
            stopped = victim.stop()
        self.assertEqual((stopped, steady.stop()), (0, 0), steady.log + victim.log)
        self.assertEveryAnswerRecordedOnce(answered)

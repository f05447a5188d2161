"""The file store, the default: each batch appended with one write under the file's lock, before its replies,
fsynced as C{--fsync} says; several processes may share the file (docs/records.md says how)."""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from functools import partial
from typing import Callable, Optional, Sequence

from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from primecount.logs import plural
from primecount.metrics import NoMetrics
from primecount.startup import StartFailed
from primecount.records.formats import TSV, Record, RecordFormat
from primecount.records.store import (
    FSYNC_POLICIES, Backoff, Incident, IRecordsStore, RunInThread, SelfProbe, StorageUnavailable, runInline,
)

# statvfs's read-only flag (PyPy's os module lacks the name; its value is Linux's and POSIX's).
ST_RDONLY = getattr(os, "ST_RDONLY", 1)
# Read as well as write: a torn last line left by a crash is looked for at start.
_OPEN_FLAGS = os.O_RDWR | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0)
# How long a batch may wait for another process to release the records file's lock before its clients are
# answered ERROR storage unavailable; a live writer holds it for one write(2), microseconds to milliseconds.
LOCK_WAIT_SECONDS = 1.0
# The first retry comes on the reactor's next turn (a peer holds the lock for one write(2), microseconds);
# the second LOCK_RETRY_SECOND later, each after that twice as long as the one before, up to LOCK_RETRY_MAX.
LOCK_RETRY_SECOND, LOCK_RETRY_MAX = 0.0005, 0.05
# How many times one append follows the records file to a new one when it keeps being removed under it.
REMOVED_RETRIES = 3
_OPERATIONS = ("write", "fsync", "lock")
# A probe of an unhealthy file store finds room for a batch when the file system has this much free.
PROBE_ROOM = 64 * 1024
# An fsync that runs this long is a slow disk: with --fsync always every reply waits for it, so it is an incident
# (logged once, counted, not ready) until an fsync takes less. A healthy disk takes milliseconds.
SLOW_FSYNC = 1.0


def openRecordsFile(path: str) -> int:
    """Open (creating if needed, with the mode the umask leaves of 0666) the records file at C{path} for
    appending; return its descriptor."""
    return os.open(path, _OPEN_FLAGS, 0o666)


def recordsPathProblem(path: str) -> Optional[str]:
    """Why the records file at C{path} could not be appended to (as C{strerror} words it: a read-only file
    system, an immutable file and a permission each in their own words), or C{None}; creates nothing. An
    existing file is opened as the writer opens it, and closed, writing nothing."""
    if os.path.isdir(path):
        return os.strerror(errno.EISDIR)
    if os.path.exists(path):
        try:
            os.close(os.open(path, _OPEN_FLAGS & ~os.O_CREAT))
        except OSError as error:
            return error.strerror
        return None
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        return f"{os.strerror(errno.ENOENT)}: {directory}"
    if os.statvfs(directory).f_flag & ST_RDONLY:
        return f"{os.strerror(errno.EROFS)}: cannot create a file in {directory}"
    if not os.access(directory, os.W_OK | os.X_OK):
        return f"{os.strerror(errno.EACCES)}: cannot create a file in {directory}"
    return None


def _createAside(path: str, mode: int) -> tuple[str, int]:
    """Create a new file at C{path} (or C{path.2}, C{path.3}, … if taken: each torn tail gets its own), with
    C{mode} or narrower; its path and descriptor."""
    candidate, number = path, 1
    while True:
        try:
            return candidate, os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0),
                                      mode & 0o666)
        except FileExistsError:
            number += 1
            candidate = f"{path}.{number}"


class LockBusy(Exception):
    """Another process holds the records file's lock: try again soon."""


class HeldByPeer(StorageUnavailable):
    """A probe found the records file's lock held by another process."""


class FileRemoved(Exception):
    """The open records file has no name left (removed, or replaced at its path by another file); C{written}
    says whether the batch being appended went into it before that was seen."""

    def __init__(self, written: bool) -> None:
        super().__init__(written)
        self.written = written


class FileOperations:
    """The system calls the records writer makes on its file, one method each, so that tests can run other
    writers between any two of them."""

    def fstat(self, fd: int) -> os.stat_result:
        """C{os.fstat}."""
        return os.fstat(fd)

    def pread(self, fd: int, size: int, offset: int) -> bytes:
        """C{os.pread}."""
        return os.pread(fd, size, offset)

    def write(self, fd: int, data: bytes) -> int:
        """C{os.write}."""
        return os.write(fd, data)

    def ftruncate(self, fd: int, size: int) -> None:
        """C{os.ftruncate}."""
        os.ftruncate(fd, size)

    def fstatvfs(self, fd: int) -> os.statvfs_result:
        """C{os.fstatvfs}."""
        return os.fstatvfs(fd)

    def openAndClose(self, path: str) -> None:
        """Open the records file at C{path} as the writer does (L{openRecordsFile}), then close it."""
        os.close(openRecordsFile(path))

    def tryLock(self, fd: int) -> None:
        """Take the exclusive lock on C{fd}'s file without waiting; L{LockBusy} if another holder has it."""
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise LockBusy() from None

    def unlock(self, fd: int) -> None:
        """Release the lock."""
        fcntl.flock(fd, fcntl.LOCK_UN)


class _OpenFile:
    """A records file descriptor that is closed only once no fsync is running on it, with the callers waiting
    for the next fsync (one runs at a time: L{FileStore._sync})."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.regular = stat.S_ISREG(os.fstat(fd).st_mode)  # a device or pipe is shared with nobody: no lock
        self.end = -1  # where this writer's own last append ended: a file still that long ends in its newline
        self.syncing = 0
        self.nextSync: list[Deferred[None]] = []  # asked for while an fsync runs: served by one after it
        self.closing = False
        self.closed: Deferred[None] = Deferred()

    def close(self) -> Deferred[None]:
        """Close now, or as soon as the running fsyncs finish; the result fires once closed."""
        self.closing = True
        self._closeIfIdle()
        return self.closed

    def syncFinished(self) -> None:
        """One fsync on this descriptor is over."""
        self.syncing -= 1
        self._closeIfIdle()

    def _closeIfIdle(self) -> None:
        if self.closing and not self.syncing and not self.closed.called:
            os.close(self.fd)
            self.closed.callback(None)


@implementer(IRecordsStore)
class FileStore(Service):
    """Appends records to a file, log-observer style: one write(2) per batch, whose L{Deferred} fires once it is
    written (and synced, with C{fsync="always"}) or fails with L{StorageUnavailable}."""

    log = Logger()

    def __init__(
        self,
        path: str,
        clock: IReactorTime,
        fsync: str = "everysec",
        metrics: NoMetrics = NoMetrics(),
        *,
        recordFormat: RecordFormat = TSV,
        runInThread: RunInThread = runInline,
        operations: Optional[FileOperations] = None,
    ) -> None:
        if fsync not in FSYNC_POLICIES:
            raise ValueError(f"fsync policy must be one of {', '.join(FSYNC_POLICIES)}, not {fsync!r}")
        self.path = self.location = path
        self._clock = clock
        self._format = recordFormat.format
        self._fsyncPolicy = fsync
        self._runInThread = runInThread
        self._metrics = metrics
        self._file: Optional[_OpenFile] = None
        self._unsynced = False
        self._syncTimer: Optional[LoopingCall] = None
        self._incidents = {operation: Incident(self.log, clock, partial(metrics.storeIncident, operation))
                           for operation in _OPERATIONS}
        self._slowSync = Incident(self.log, clock, partial(metrics.storeIncident, "slow_fsync"))
        self._ops = operations or FileOperations()
        self._waiting: list[tuple[bytes, int, Deferred[None]]] = []  # batches waiting for the lock, in order
        self._waitingSince = 0.0
        self._retryCall: Optional[IDelayedCall] = None
        self._lockBackoff = Backoff(LOCK_RETRY_SECOND, LOCK_RETRY_MAX)
        self._selfProbe = SelfProbe(self, clock)
        self._proven = False  # whether a batch or a probe has succeeded since the start

    def healthy(self) -> bool:
        """Whether the file is open, has taken a batch or a probe since it was opened (at start, a probe runs at
        once), and no write, fsync, lock or slow-fsync incident is going on."""
        return (self._proven and self._file is not None
                and not any(incident.going for incident in self._incidents.values()) and not self._slowSync.going)

    def startService(self) -> None:
        """Open the records file and start the fsync timer.

        The file is opened here, after twistd has applied C{--umask} and
        switched to C{--uid}/C{--gid}, so a new file gets the service user's
        owner and the umask's mode, like every later one after a rename and
        SIGHUP. A file that cannot be opened stops the process with a one-line
        message (C{Options} already checked the path before anything listened).
        """
        try:
            self._open()
        except OSError as error:
            raise StartFailed(f"primecount: cannot open records file {self.path}: {error.strerror}") from None
        super().startService()
        self.probe().addErrback(self._unusableAtStart)
        if self._fsyncPolicy == "everysec":
            self._syncTimer = LoopingCall(self._syncIfNeeded)
            self._syncTimer.clock = self._clock
            self._syncTimer.start(1.0, now=False)
        self.log.info("appending records to {path} (fsync {policy})", path=self.path, policy=self._fsyncPolicy)

    def _unusableAtStart(self, failure: Failure) -> None:
        """The probe at start failed: not ready, and probed again until it works; said as the incident it is
        (no room, say), unless another process held the lock for that moment (a held lock is an incident only
        once batches have waited for it past L{LOCK_WAIT_SECONDS})."""
        failure.trap(StorageUnavailable)
        if failure.check(HeldByPeer):
            self._selfProbe.watch()
        else:
            self._failed("write", failure.getErrorMessage(), 0)

    def stopService(self) -> Deferred[None]:
        """Write what is pending, fsync, and close the file once running fsyncs are done."""
        super().stopService()
        if self._syncTimer is not None and self._syncTimer.running:
            self._syncTimer.stop()
        self._selfProbe.stop()
        if self._waiting:
            self._retryWaiting(lastTry=True)
        current, self._file = self._file, None
        if current is None:
            return succeed(None)
        return self._sync(current).addBoth(lambda _: current.close())

    def _open(self) -> None:
        """Open the file; an unusable path raises here. A torn tail is looked for now if no other writer
        holds the lock (otherwise the first append looks, under the lock)."""
        self._file = _OpenFile(openRecordsFile(self.path))
        opened = self._file
        try:
            self._locked(opened, lambda status: self._cutTornTail(opened.fd, status))
        except LockBusy:
            pass

    def reopen(self) -> None:
        """Continue in a newly opened file at the same path (after logrotate renamed the old one).

        If the path cannot be opened the current file is kept and the error logged.
        """
        try:
            fresh = _OpenFile(openRecordsFile(self.path))
        except OSError as error:
            self.log.error("cannot reopen records file {path}: {error}; still writing to the old file",
                           path=self.path, error=error)
            return
        old, self._file = self._file, fresh
        self._unsynced = False
        if old is not None:
            (self._sync(old) if self._fsyncPolicy != "never" else succeed(None)).addBoth(lambda _: old.close())
        self.log.info("reopened records file {path}", path=self.path)

    def write(self, records: Sequence[Record]) -> Deferred[None]:
        """Append C{records} with one write now, or as soon as no other process holds the file's lock; the
        result fires once they are stored (and, with C{fsync="always"}, synced), or fails with
        L{StorageUnavailable}."""
        if self._file is None:
            return fail(StorageUnavailable(f"records file {self.path} is not open"))
        batch = "".join([self._format(record) for record in records]).encode("utf-8")
        if self._waiting:  # earlier batches wait for the lock: this one goes after them
            return self._wait(batch, len(records))
        started = self._clock.seconds()
        try:
            self._append(batch)
        except LockBusy:
            return self._wait(batch, len(records))
        except OSError as error:
            return self._writeFailed(error, len(records))
        self._metrics.commitObserved(self._clock.seconds() - started)
        return self._stored(len(records))

    def probe(self) -> Deferred[None]:
        """Whether a batch appended now would be stored, found without writing a byte of records, by what a
        write does: the path opens for appending as a reopen would; under the lock, the file still has its
        name, an append of nothing to it succeeds (what the kernel checks of a write on it: an immutable file,
        a read-only file system) and its file system has L{PROBE_ROOM} free; and, after an fsync failure or a
        slow one, an fsync succeeds (quickly). Ends the incidents that this shows are over.

        A write that fails only once it writes bytes (an I/O error, a
        quota) looks fine here: the next batch then meets it again, refused as
        before, and the incident starts again.
        """
        target = self._file
        if target is None:
            return fail(StorageUnavailable(f"records file {self.path} is not open"))
        try:
            self._ops.openAndClose(self.path)
        except OSError as error:
            return fail(StorageUnavailable(f"cannot open {self.path}: {error.strerror}"))

        def appendsUnderLock(status: os.stat_result) -> None:
            if status.st_nlink == 0:
                raise FileRemoved(written=False)
            self._ops.write(target.fd, b"")
            room = self._ops.fstatvfs(target.fd)
            if target.regular and room.f_bavail * room.f_frsize < PROBE_ROOM:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        try:
            self._locked(target, appendsUnderLock)
        except LockBusy:
            return fail(HeldByPeer(f"cannot lock {self.path}: held by another process"))
        except FileRemoved:
            try:
                self._replaceRemoved(target, written=False, count=0)
            except OSError as error:
                return fail(StorageUnavailable(f"cannot open {self.path}: {error.strerror}"))
        except OSError as error:
            return fail(StorageUnavailable(f"cannot write {self.path}: {error.strerror}"))
        self._recovered("write")
        self._recovered("lock")
        self._proven = True
        if not (self._incidents["fsync"].going or self._slowSync.going) or self._file is None:
            return succeed(None)
        return self._sync(self._file).addErrback(
            lambda failure: fail(StorageUnavailable(f"cannot fsync {self.path}: {failure.getErrorMessage()}")))

    def gathering(self, analysing: bool) -> None:
        """Nothing to do: each batch is one C{write(2)} at once, with nothing to gain from waiting for the next
        (see L{IRecordsStore.gathering})."""

    def _append(self, data: bytes) -> None:
        """Append C{data} to the file at the path with the multi-writer protocol, in a new file there if the
        open one was removed."""
        for _ in range(REMOVED_RETRIES):
            target = self._file
            if target is None:
                raise OSError(errno.EBADF, "records file is closed")
            try:
                self._appendTo(target, data)
                return
            except FileRemoved as removed:
                self._replaceRemoved(target, removed.written, data.count(b"\n"))
        raise OSError(errno.ENOENT, f"records file removed {REMOVED_RETRIES} times during one append")

    def _appendTo(self, target: _OpenFile, data: bytes) -> None:
        """Append C{data} to C{target}; L{FileRemoved} if it has no name left, seen before the write or after it.

        Checked under the lock with the C{fstat} the append takes anyway, and
        once more after the write: a file removed at any moment before this
        returns (so before the batch's replies) is never the only home of its
        records.
        """
        ops = self._ops

        def appendUnderLock(status: os.stat_result) -> None:
            if status.st_nlink == 0:
                raise FileRemoved(written=False)
            # Still where our own last append ended: nobody wrote since, and the file ends in our newline.
            end = status.st_size if status.st_size == target.end else self._cutTornTail(target.fd, status)
            self._writeAll(target.fd, data, end)
            target.end = end + len(data)
            if target.regular and ops.fstat(target.fd).st_nlink == 0:
                raise FileRemoved(written=True)

        self._locked(target, appendUnderLock)

    def _replaceRemoved(self, removed: _OpenFile, written: bool, count: int) -> None:
        """The open file lost its name: continue in a new file at the path (logged once per removal)."""
        self._file = _OpenFile(openRecordsFile(self.path))
        self._unsynced = False
        removed.close()  # nobody can read it any more: no fsync
        self.log.warn(
            "records file {path} was removed or replaced while open; appending to a new file at {path} from now on"
            "{rewritten}", path=self.path,
            rewritten=f" ({plural(count, 'record')} just written to the removed file, written again there)"
            if written else "",
        )

    def _locked(self, target: _OpenFile, action: Callable[[os.stat_result], object]) -> None:
        """Run C{action} with the file's status while holding its lock; L{LockBusy} if another process holds
        it. A file that is not a regular one (a device, a pipe) has nobody to share it with: no lock."""
        if not target.regular:
            action(self._ops.fstat(target.fd))
            return
        self._ops.tryLock(target.fd)
        try:
            action(self._ops.fstat(target.fd))  # its size now, with no other writer able to change it
        finally:
            self._ops.unlock(target.fd)

    def _cutTornTail(self, fd: int, status: os.stat_result) -> int:
        """Move an unfinished last line out of the way; return where the file ends now.

        Every writer writes whole lines under the lock, so an unfinished last
        line seen under the lock was left by a writer that died in the middle
        of its write (or by a machine crash). Records are written before their
        replies, so that write was never answered: nothing acknowledged is
        lost. The bytes are kept in C{<path>.torn-<time>} (with the records
        file's mode or narrower) for inspection, and new records start on a
        clean line (as Redis does with a truncated AOF).
        """
        if not stat.S_ISREG(status.st_mode) or status.st_size == 0:
            return status.st_size
        if self._ops.pread(fd, 1, status.st_size - 1) == b"\n":
            return status.st_size
        end, tail = status.st_size, b""
        while end > 0 and b"\n" not in tail:
            step = min(65536, end)
            end -= step
            tail = self._ops.pread(fd, step, end) + tail
        keep = end + tail.rfind(b"\n") + 1 if b"\n" in tail else 0
        torn = tail[tail.rfind(b"\n") + 1:] if b"\n" in tail else tail
        aside, asideFd = _createAside(f"{self.path}.torn-{int(self._clock.seconds())}", stat.S_IMODE(status.st_mode))
        try:
            os.fchmod(asideFd, stat.S_IMODE(os.fstat(asideFd).st_mode) & stat.S_IMODE(status.st_mode))
            written = 0
            while written < len(torn):
                written += os.write(asideFd, torn[written:])
        finally:
            os.close(asideFd)
        self._ops.ftruncate(fd, keep)
        self.log.warn(
            "records file {path} ended in an unfinished line ({size} bytes at offset {offset}), left by a writer "
            "that died (or a crash) during a write; moved it to {aside}",
            path=self.path, size=len(torn), offset=keep, aside=aside,
        )
        return keep

    def _writeAll(self, fd: int, data: bytes, start: int) -> None:
        """Write all of C{data} at the end of the file, which is at C{start}; on failure, cut the file back to
        C{start} (only this writer has written since: it holds the lock)."""
        written = 0
        try:
            while written < len(data):
                written += self._ops.write(fd, data[written:])
        except OSError:
            if written:
                # A torn batch would leave a half record; cut the file back to where it began.
                self._ops.ftruncate(fd, start)
            raise

    def _stored(self, count: int) -> Deferred[None]:
        """C{count} records were written: count them, and fsync first with C{fsync="always"}."""
        self._recovered("write")
        self._proven = True
        self._metrics.recordsWritten(count)
        self._unsynced = True
        if self._fsyncPolicy != "always" or self._file is None:
            return succeed(None)
        return self._sync(self._file).addErrback(
            lambda failure: fail(StorageUnavailable(f"cannot fsync {self.path}: {failure.getErrorMessage()}"))
        )

    def _writeFailed(self, error: OSError, count: int) -> Deferred[None]:
        self._failed("write", error, count)
        self._metrics.recordWriteFailed(count)
        return fail(StorageUnavailable(f"cannot write {self.path}: {error.strerror}"))

    # Waiting for another process's lock, on a timer: the reactor thread never blocks on it.

    def _wait(self, batch: bytes, count: int) -> Deferred[None]:
        stored: Deferred[None] = Deferred()
        if not self._waiting:
            self._waitingSince = self._clock.seconds()
            self._lockBackoff.reset()
        self._waiting.append((batch, count, stored))
        if self._retryCall is None:  # the first retry on the next turn: a peer holds the lock for one write(2)
            self._retryCall = self._clock.callLater(0, self._retryWaiting)
        return stored

    def _retryWaiting(self, lastTry: bool = False) -> None:
        """Append every waiting batch in one write if the lock is free now; past the wait bound (or on the
        last try, when stopping) refuse them."""
        if self._retryCall is not None and self._retryCall.active():
            self._retryCall.cancel()
        self._retryCall = None
        waiting, count = self._waiting, sum(n for _, n, _ in self._waiting)
        try:
            self._append(b"".join(batch for batch, _, _ in waiting))
        except LockBusy:
            waited = self._clock.seconds() - self._waitingSince
            if not lastTry and waited < LOCK_WAIT_SECONDS:
                self._retryCall = self._clock.callLater(self._lockBackoff.next(), self._retryWaiting)
                return
            self._waiting = []
            self._failed("lock", f"another process has held its lock for {waited:.1f} s", count)
            self._metrics.recordWriteFailed(count)
            refused = StorageUnavailable(f"cannot lock {self.path}: held by another process")
            for _, _, stored in waiting:
                stored.errback(refused)
            return
        except OSError as error:
            self._waiting = []
            for _, n, stored in waiting:
                self._writeFailed(error, n).chainDeferred(stored)
            return
        self._waiting = []
        self._recovered("lock")

        def handOut(result: object) -> None:
            for _, _, stored in waiting:
                if isinstance(result, Failure):
                    stored.errback(result)
                else:
                    stored.callback(None)

        self._stored(count).addBoth(handOut)

    def _syncIfNeeded(self) -> None:
        if self._unsynced and self._file is not None:
            self._sync(self._file).addErrback(lambda _: None)  # a failure is logged and counted by _startSync

    def _sync(self, target: _OpenFile) -> Deferred[None]:
        """fsync C{target} on the thread pool; fails (after logging once per incident) if fsync fails.

        One fsync runs at a time per file: a sync asked for while one runs
        waits for a single fsync started after it, shared by everyone who
        asked meanwhile (a group commit; it covers every byte written before
        it starts). So a disk that takes seconds per fsync holds one thread of
        the pool, which analysis shares, not one more per batch or per second.
        """
        synced: Deferred[None] = Deferred()
        target.nextSync.append(synced)
        if not target.syncing:
            self._startSync(target)
        return synced

    def _startSync(self, target: _OpenFile) -> None:
        """Run one fsync of C{target} for everyone waiting for it; when it ends, start the next if asked for."""
        waiting, target.nextSync = target.nextSync, []
        if target is self._file:
            self._unsynced = False  # everything written so far is in this fsync
        target.syncing += 1
        started = self._clock.seconds()
        slow = self._clock.callLater(SLOW_FSYNC, self._syncSlow)

        def done(result: object) -> None:
            if slow.active():
                slow.cancel()
            if isinstance(result, Failure):
                error = result.value
                if isinstance(error, OSError) and error.errno == errno.EINVAL:
                    result = None  # a device such as /dev/null cannot be synced, and needs no sync
                else:
                    self._failed("fsync", error, 0)
            else:
                took = self._clock.seconds() - started
                self._metrics.fsyncObserved(took)
                self._recovered("fsync")
                if took >= SLOW_FSYNC:
                    self._syncSlow()  # slow, though the reactor was too busy to notice while it ran
                else:
                    self._slowSync.recovered("records file {path}: fsyncs are quick again after {seconds:.1f} s",
                                             path=self.path)
            if target.nextSync:
                self._startSync(target)  # before this one counts as over, so that the file stays open for it
            target.syncFinished()
            for synced in waiting:
                if isinstance(result, Failure):
                    synced.errback(result)
                else:
                    synced.callback(None)

        self._runInThread(os.fsync, target.fd).addBoth(done)

    def _syncSlow(self) -> None:
        """An fsync has run for L{SLOW_FSYNC}: an incident (logged once, counted, not ready) until one is quick."""
        self._selfProbe.watch()
        self._slowSync.failed(0, "records file {path}: an fsync has taken over {seconds:g} s, longer than replies "
                              "should wait for one; not ready until an fsync takes less", path=self.path,
                              seconds=SLOW_FSYNC)

    def _failed(self, operation: str, error: object, records: int) -> None:
        """A failure of C{operation}, logged once per incident, not once per batch; probed until it is over."""
        self._selfProbe.watch()
        self._incidents[operation].failed(
            records, "cannot {operation} records file {path}: {error} ({refused} refused); "
            "answering ERROR storage unavailable until it works again",
            operation=operation, path=self.path, error=error, refused=plural(records, "record"))

    def _recovered(self, operation: str) -> None:
        self._incidents[operation].recovered("records file {path}: {operation} works again after {failures} "
                                             "failures", path=self.path, operation=operation)


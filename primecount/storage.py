"""The records service: receives record events, appends each batch with one write, owns the file and its durability.

Durability follows Redis's C{appendfsync}: C{always} fsyncs each batch before
its replies are released, C{everysec} fsyncs at most once a second from a
timer, C{never} leaves it to the operating system. In every policy a record is
written (C{write(2)}) before its reply. fsync runs on the thread pool, so a slow
disk delays the replies that wait for it, not the reactor.
"""

from __future__ import annotations

import errno
import os
import stat
from typing import Any, Callable, Optional, Sequence

from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from primecount.metrics import NoMetrics
from primecount.records import TSV, Record, RecordFormat

# Read as well as write: a torn last line left by a crash is looked for at start.
_OPEN_FLAGS = os.O_RDWR | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0)
FSYNC_POLICIES = ("always", "everysec", "never")
# Runs a blocking call off the reactor thread: deferToThreadPool bound to a reactor and pool.
RunInThread = Callable[..., Deferred]


def _inline(function: Callable[..., Any], *args: Any) -> Deferred:
    """Run C{function} at once in this thread (for callers without a thread pool)."""
    try:
        return succeed(function(*args))
    except BaseException:
        return fail()


class StorageUnavailable(Exception):
    """Records could not be written, so the requests they belong to must not get a normal answer."""


def openRecordsFile(path: str) -> int:
    """Open (creating if needed, with the mode the umask leaves of 0666) the records file at C{path} for
    appending; return its descriptor."""
    return os.open(path, _OPEN_FLAGS, 0o666)


def recordsPathProblem(path: str) -> Optional[str]:
    """Why the records file at C{path} could not be appended to (as C{strerror} words it), or C{None}; creates
    nothing."""
    if os.path.isdir(path):
        return os.strerror(errno.EISDIR)
    if os.path.exists(path):
        return None if os.access(path, os.W_OK) else os.strerror(errno.EACCES)
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        return f"{os.strerror(errno.ENOENT)}: {directory}"
    if not os.access(directory, os.W_OK | os.X_OK):
        return f"{os.strerror(errno.EACCES)}: cannot create a file in {directory}"
    return None


class _OpenFile:
    """A records file descriptor that is closed only once no fsync is running on it."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.syncing = 0
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


class RecordsService(Service):
    """Appends records to a file, log-observer style: one write(2) per batch, each batch acknowledged.

    L{write} returns a L{Deferred} that fires once the batch is written (and,
    with C{fsync="always"}, synced), or fails with L{StorageUnavailable};
    callers reply to their client only after that, so every answered request
    has a record.
    """

    log = Logger()

    def __init__(
        self,
        path: str,
        clock: IReactorTime,
        recordFormat: RecordFormat = TSV,
        fsync: str = "everysec",
        runInThread: RunInThread = _inline,
        metrics: NoMetrics = NoMetrics(),
    ) -> None:
        if fsync not in FSYNC_POLICIES:
            raise ValueError(f"fsync policy must be one of {', '.join(FSYNC_POLICIES)}, not {fsync!r}")
        self.path = path
        self._clock = clock
        self._format = recordFormat.format
        self._fsyncPolicy = fsync
        self._runInThread = runInThread
        self._metrics = metrics
        self._file: Optional[_OpenFile] = None
        self._unsynced = False
        self._syncTimer: Optional[LoopingCall] = None
        self._failures = {"write": 0, "fsync": 0}

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
            raise SystemExit(f"primecount: cannot open records file {self.path}: {error.strerror}") from None
        super().startService()
        if self._fsyncPolicy == "everysec":
            self._syncTimer = LoopingCall(self._syncIfNeeded)
            self._syncTimer.clock = self._clock
            self._syncTimer.start(1.0, now=False)
        self.log.info("appending records to {path} (fsync {policy})", path=self.path, policy=self._fsyncPolicy)

    def stopService(self) -> Deferred[None]:
        """Write what is pending, fsync, and close the file once running fsyncs are done."""
        super().stopService()
        if self._syncTimer is not None and self._syncTimer.running:
            self._syncTimer.stop()
        current, self._file = self._file, None
        if current is None:
            return succeed(None)
        return self._sync(current).addBoth(lambda _: current.close())

    def _open(self) -> None:
        """Open the file; an unusable path raises here."""
        self._file = _OpenFile(openRecordsFile(self.path))
        self._cutTornTail(self._file.fd)

    def _cutTornTail(self, fd: int) -> None:
        """Move an unfinished last line (left by a crash in the middle of a write) out of the way.

        Records are written before their replies, so a write that never finished
        was never answered: nothing acknowledged is lost. The bytes are kept in
        C{<path>.torn-<time>} for inspection, and new records start on a clean line
        (as Redis does with a truncated AOF).
        """
        status = os.fstat(fd)
        if not stat.S_ISREG(status.st_mode) or status.st_size == 0:
            return
        if os.pread(fd, 1, status.st_size - 1) == b"\n":
            return
        end, tail = status.st_size, b""
        while end > 0 and b"\n" not in tail:
            step = min(65536, end)
            end -= step
            tail = os.pread(fd, step, end) + tail
        keep = end + tail.rfind(b"\n") + 1 if b"\n" in tail else 0
        torn = tail[tail.rfind(b"\n") + 1:] if b"\n" in tail else tail
        aside = f"{self.path}.torn-{int(self._clock.seconds())}"
        with open(aside, "ab") as file:
            file.write(torn)
        os.ftruncate(fd, keep)
        self.log.warn(
            "records file {path} ended in an unfinished line ({size} bytes at offset {offset}), left by a crash "
            "during a write; moved it to {aside}",
            path=self.path, size=len(torn), offset=keep, aside=aside,
        )

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
        """Append C{records} with one write now; the result fires once they are stored (and, with
        C{fsync="always"}, synced), or fails with L{StorageUnavailable}."""
        if self._file is None:
            return fail(StorageUnavailable(f"records file {self.path} is not open"))
        batch = "".join([self._format(record) for record in records]).encode("utf-8")
        try:
            self._writeAll(batch)
        except OSError as error:
            self._failed("write", error, len(records))
            self._metrics.recordWriteFailed(len(records))
            return fail(StorageUnavailable(f"cannot write {self.path}: {error.strerror}"))
        self._recovered("write")
        self._metrics.recordsWritten(len(records))
        self._unsynced = True
        if self._fsyncPolicy != "always":
            return succeed(None)
        return self._sync(self._file).addErrback(
            lambda failure: fail(StorageUnavailable(f"cannot fsync {self.path}: {failure.getErrorMessage()}"))
        )

    def _writeAll(self, data: bytes) -> None:
        """Write all of C{data}, or, on failure, remove any part of it that reached the file."""
        if self._file is None:
            raise OSError(errno.EBADF, "records file is closed")
        fd, written = self._file.fd, 0
        try:
            while written < len(data):
                written += os.write(fd, data[written:])
        except OSError:
            if written:
                # A torn batch would leave a half record; cut the file back to where it began.
                os.ftruncate(fd, os.fstat(fd).st_size - written)
            raise

    def _syncIfNeeded(self) -> None:
        if self._unsynced and self._file is not None:
            self._sync(self._file)

    def _sync(self, target: _OpenFile) -> Deferred[None]:
        """fsync C{target} on the thread pool; fails (after logging once per incident) if fsync fails."""
        if target is self._file:
            self._unsynced = False
        target.syncing += 1
        started = self._clock.seconds()

        def done(result: object) -> object:
            target.syncFinished()
            if isinstance(result, Failure):
                error = result.value
                if isinstance(error, OSError) and error.errno == errno.EINVAL:
                    return None  # a device such as /dev/null cannot be synced, and needs no sync
                self._failed("fsync", error, 0)
                return result
            self._metrics.fsyncObserved(self._clock.seconds() - started)
            self._recovered("fsync")
            return None

        return self._runInThread(os.fsync, target.fd).addBoth(done)

    def _failed(self, operation: str, error: BaseException, records: int) -> None:
        """Log a failure once per incident, not once per batch."""
        self._failures[operation] += 1
        if self._failures[operation] == 1:
            self.log.error(
                "cannot {operation} records file {path}: {error} ({records} records refused); "
                "answering ERROR storage unavailable until it works again",
                operation=operation, path=self.path, error=error, records=records,
            )

    def _recovered(self, operation: str) -> None:
        if self._failures[operation]:
            self.log.info(
                "records file {path}: {operation} works again after {failures} failures",
                path=self.path, operation=operation, failures=self._failures[operation],
            )
            self._failures[operation] = 0


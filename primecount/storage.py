"""The records service: receives record events, appends each reactor turn's records with one write, owns the file."""

from __future__ import annotations

import errno
import os
from typing import Optional

from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from primecount.records import Record, formatRecord

_OPEN_FLAGS = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0)


class StorageUnavailable(Exception):
    """Records could not be written, so the requests they belong to must not get a normal answer."""


def openRecordsFile(path: str) -> int:
    """Open (creating if needed) the records file at C{path} for appending; return its descriptor."""
    return os.open(path, _OPEN_FLAGS, 0o644)


class RecordsService(Service):
    """Appends records to a file, log-observer style: one write(2) per reactor turn, acknowledged per record.

    L{append} returns a L{Deferred} that fires once the record's batch has been
    handed to the kernel, or fails with L{StorageUnavailable}; callers reply to
    their client only after that, so every answered request has a record.
    """

    log = Logger()

    def __init__(self, path: str, clock: IReactorTime) -> None:
        self.path = path
        self._clock = clock
        self._fd: Optional[int] = None
        self._pending: list[tuple[Record, Deferred[None]]] = []
        self._flushCall: Optional[IDelayedCall] = None
        self._failedBatches = 0

    def startService(self) -> None:
        """Open the records file; an unusable path raises here, before any listener starts."""
        self._fd = openRecordsFile(self.path)
        super().startService()
        self.log.info("appending records to {path}", path=self.path)

    def stopService(self) -> None:
        """Write what is pending, fsync and close the file."""
        super().stopService()
        self.flush()
        if self._fd is not None:
            fd, self._fd = self._fd, None
            try:
                os.fsync(fd)
            except OSError as error:
                if error.errno != errno.EINVAL:  # character devices cannot be fsynced
                    self.log.error("fsync of {path} failed: {error}", path=self.path, error=error)
            finally:
                os.close(fd)

    def append(self, record: Record) -> Deferred[None]:
        """Queue C{record} for this turn's write; the result fires when it is written."""
        if self._fd is None:
            return fail(StorageUnavailable(f"records file {self.path} is not open"))
        acknowledged: Deferred[None] = Deferred()
        self._pending.append((record, acknowledged))
        if self._flushCall is None:
            self._flushCall = self._clock.callLater(0, self._flushTurn)
        return acknowledged

    def _flushTurn(self) -> None:
        self._flushCall = None
        self.flush()

    def flush(self) -> None:
        """Write everything appended so far now, with one write, instead of at the end of the turn.

        A caller that knows a batch of appends is complete (the responder, after
        a thread-pool batch) calls this to save the records and release the
        replies one reactor turn sooner.
        """
        if self._flushCall is not None:
            self._flushCall.cancel()
            self._flushCall = None
        pending, self._pending = self._pending, []
        if not pending:
            return
        batch = "".join([formatRecord(record) for record, _ in pending]).encode("utf-8")
        try:
            self._writeAll(batch)
        except OSError as error:
            self._reportFailure(error, len(pending))
            for _, acknowledged in pending:
                acknowledged.errback(StorageUnavailable(f"cannot write {self.path}: {error.strerror}"))
            return
        if self._failedBatches:
            self.log.info(
                "records file {path} is writable again after {batches} failed batches",
                path=self.path,
                batches=self._failedBatches,
            )
            self._failedBatches = 0
        for _, acknowledged in pending:
            acknowledged.callback(None)

    def _writeAll(self, data: bytes) -> None:
        """Write all of C{data}, or, on failure, remove any part of it that reached the file."""
        if self._fd is None:
            raise OSError(errno.EBADF, "records file is closed")
        written = 0
        try:
            while written < len(data):
                written += os.write(self._fd, data[written:])
        except OSError:
            if written:
                # A torn batch would leave a half record; cut the file back to where it began.
                os.ftruncate(self._fd, os.fstat(self._fd).st_size - written)
            raise

    def _reportFailure(self, error: OSError, records: int) -> None:
        """Log a write failure once per incident, not once per batch."""
        self._failedBatches += 1
        if self._failedBatches == 1:
            self.log.error(
                "cannot append {records} records to {path}: {error}; "
                "answering ERROR storage unavailable until writes succeed",
                records=records,
                path=self.path,
                error=error,
            )

"""Log observers for twistd: a log file rotated at a size and with a number kept
(C{twistd --logger=primecount.logs.rotatingLogObserver ...}), and a worker's log for its supervisor to relay,
written so that a supervisor that stops reading never stops the worker."""

from __future__ import annotations

import atexit
import os
import threading
from collections import deque
from typing import Mapping, Optional

from twisted.logger import FileLogObserver, ILogObserver, eventAsText, textFileLogObserver
from twisted.python.logfile import LogFile

# Bytes of a worker's log that may wait for its supervisor to read them, beyond what the pipe holds; past it,
# lines are dropped and counted. A quarter of a MiB is thousands of lines: seconds of --log-requests under load.
LOG_BACKLOG_BYTES = 256 * 1024
# How long a worker that exits waits for its supervisor to take the log lines still waiting.
EXIT_DRAIN_SECONDS = 5.0


def plural(count: int, noun: str) -> str:
    """C{count} and C{noun}, with an s unless C{count} is 1: C{1 record}, C{2 records}."""
    return f"{count} {noun if count == 1 else noun + 's'}"


def rotatingLogObserver(environ: Mapping[str, str] = os.environ) -> ILogObserver:
    """A text log observer writing to a L{LogFile} bounded in size and number of files."""
    path = os.path.abspath(environ.get("PRIMECOUNT_LOGFILE", "twistd.log"))
    maxBytes = int(environ.get("PRIMECOUNT_LOG_MAX_BYTES", 10_000_000))
    keep = int(environ.get("PRIMECOUNT_LOG_KEEP", 10))
    if maxBytes < 1 or keep < 1:
        raise ValueError("PRIMECOUNT_LOG_MAX_BYTES and PRIMECOUNT_LOG_KEEP must be at least 1")
    return textFileLogObserver(LogFile.fromFullPath(path, rotateLength=maxBytes, maxRotatedFiles=keep))


class PipeLog:
    """A worker's log output to its supervisor's pipe (a file-like object for L{FileLogObserver}): lines are
    queued and a thread of its own writes them, so that no thread of the worker, its reactor's least of all,
    ever waits for the supervisor. Past C{limit} bytes waiting, lines are dropped and counted; once the
    queue has drained, one line says how many were dropped."""

    def __init__(self, fd: int = 1, limit: int = LOG_BACKLOG_BYTES) -> None:
        self._fd = fd
        self._limit = limit
        self._lines: deque[bytes] = deque()
        self._waiting = 0  # bytes queued, and being written
        self._dropped = 0  # lines dropped since the last line that said so
        self.droppedInAll = 0
        self._changed = threading.Condition()
        self._writer: Optional[threading.Thread] = None

    def write(self, text: str) -> None:
        """Queue C{text} (whole lines) for the pipe, or drop it if too much is waiting already."""
        data = text.encode("utf-8", "replace")
        with self._changed:
            if self._waiting + len(data) > self._limit:
                lines = data.count(b"\n") or 1
                self._dropped += lines
                self.droppedInAll += lines
                self._changed.notify_all()
                return
            self._lines.append(data)
            self._waiting += len(data)
            if self._writer is None:
                self._writer = threading.Thread(target=self._write, name="primecount-log", daemon=True)
                self._writer.start()
            self._changed.notify_all()

    def flush(self) -> None:
        """Nothing: lines go out as fast as the pipe takes them."""

    def _write(self) -> None:
        while True:
            with self._changed:
                while not self._lines and not self._dropped:
                    self._changed.wait()
                if self._lines:
                    data = b"".join(self._lines)
                    self._lines.clear()
                else:
                    data = (f"warn {self._dropped} log lines dropped: the supervisor did not read this worker's "
                            f"log in time\n").encode("utf-8")
                    self._dropped = 0
                    self._waiting += len(data)
            written = 0
            try:
                while written < len(data):
                    written += os.write(self._fd, data[written:])
            except OSError:
                pass  # the supervisor is gone: nobody is left to read it
            with self._changed:
                self._waiting -= len(data)
                self._changed.notify_all()

    def drain(self, seconds: float) -> bool:
        """Wait up to C{seconds} for every queued line, and the count of those dropped, to be written; whether
        they were."""
        with self._changed:
            return self._changed.wait_for(lambda: not (self._waiting or self._lines or self._dropped), seconds)


def workerLogObserver() -> ILogObserver:
    """A worker's log for its supervisor to relay: C{<level> <message>} lines on stdout, no timestamp
    (the supervisor's own log adds it), through a L{PipeLog} that is drained for a few seconds at exit.
    C{twistd --logger=primecount.logs.workerLogObserver}."""

    def format(event: dict) -> str:
        text = eventAsText(event, includeTimestamp=False, includeSystem=False)
        return "".join(f"{event['log_level'].name} {line}\n" for line in text.splitlines())

    pipe = PipeLog()
    atexit.register(pipe.drain, EXIT_DRAIN_SECONDS)
    return FileLogObserver(pipe, format)

"""Log observers for twistd: a log file rotated at a size and with a number kept
(C{twistd --logger=primecount.logs.rotatingLogObserver ...}), and a worker's log for its supervisor to relay."""

from __future__ import annotations

import os
from typing import Mapping

import sys

from twisted.logger import FileLogObserver, ILogObserver, eventAsText, textFileLogObserver
from twisted.python.logfile import LogFile


def rotatingLogObserver(environ: Mapping[str, str] = os.environ) -> ILogObserver:
    """A text log observer writing to a L{LogFile} bounded in size and number of files."""
    path = os.path.abspath(environ.get("PRIMECOUNT_LOGFILE", "twistd.log"))
    maxBytes = int(environ.get("PRIMECOUNT_LOG_MAX_BYTES", 10_000_000))
    keep = int(environ.get("PRIMECOUNT_LOG_KEEP", 10))
    if maxBytes < 1 or keep < 1:
        raise ValueError("PRIMECOUNT_LOG_MAX_BYTES and PRIMECOUNT_LOG_KEEP must be at least 1")
    return textFileLogObserver(LogFile.fromFullPath(path, rotateLength=maxBytes, maxRotatedFiles=keep))


def workerLogObserver() -> ILogObserver:
    """A worker's log for its supervisor to relay: C{<level> <message>} lines on stdout, no timestamp
    (the supervisor's own log adds it). C{twistd --logger=primecount.logs.workerLogObserver}."""

    def format(event: dict) -> str:
        text = eventAsText(event, includeTimestamp=False, includeSystem=False)
        return "".join(f"{event['log_level'].name} {line}\n" for line in text.splitlines())

    return FileLogObserver(sys.stdout, format)

"""A start that cannot go on: one line, exit status 1, under C{twistd -n} and as a daemon alike (the daemon's
parent, which twistd keeps on the terminal until the start is over, then shows the line and exits at once)."""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator, Optional


class StartFailed(SystemExit, Exception):
    """Raised from a service's start with the one line that says why (e.g. C{primecount: cannot open records
    file …: Permission denied}).

    A L{SystemExit}, so that C{twistd -n} prints that line and exits with
    status 1, without a traceback; and an L{Exception}, so that twistd's
    daemon start catches it: it removes the pidfile and tells its waiting
    parent through its status pipe, which then exits with status 1. (A bare
    C{SystemExit} passed twistd by, and the parent waited for ever.)
    """


# The terminal twistd was started from, kept before a daemon's twistd points its standard error at /dev/null.
_terminal: Optional[int] = None


def keepTerminal() -> None:
    """Keep a descriptor of standard error as it is now (called while the plugin's service is made, before
    twistd turns into a daemon), for L{sayOnTerminal}; not inherited by children."""
    global _terminal
    if _terminal is None:
        try:
            _terminal = os.dup(2)
        except OSError:
            _terminal = None


def forgetTerminal() -> None:
    """The start is over: let go of the kept terminal (a daemon must not hold it)."""
    global _terminal
    if _terminal is not None:
        os.close(_terminal)
        _terminal = None


def sayOnTerminal(line: str) -> None:
    """Write C{line} to the kept terminal if standard error is no longer it (a daemon's is /dev/null): twistd's
    own report of a failed daemon start is a truncated repr, after which this line is the one that says why.
    Under C{twistd -n} standard error is still the terminal, and the exit prints the line there."""
    if _terminal is None:
        return
    try:
        kept, now = os.fstat(_terminal), os.fstat(2)
        if (kept.st_dev, kept.st_ino, kept.st_rdev) != (now.st_dev, now.st_ino, now.st_rdev):
            os.write(_terminal, line.encode("utf-8", "replace") + b"\n")
    except OSError:
        pass


@contextmanager
def saidOnTerminal() -> Iterator[None]:
    """A L{StartFailed} raised within is also said on the kept terminal (L{sayOnTerminal}), then raised on."""
    try:
        yield
    except StartFailed as failed:
        sayOnTerminal(str(failed))
        raise

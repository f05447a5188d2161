"""Socket objects on descriptors made elsewhere (the workers' shared listening socket, libpq's connection) that
leave the descriptor's blocking mode as it was.

The blocking mode belongs to the open file, which every duplicate and every process holding it shares. PyPy
sets a new socket object's descriptor to the mode of the default timeout (blocking, for the usual C{None}), even
one made from an existing descriptor with C{socket.socket(fileno=...)} or C{socket.fromfd}; CPython leaves it
alone. A worker that made such an object of the shared listening socket made every other worker's C{accept()}
blocking: a reactor that had accepted the last queued connection then waited in C{accept()} for the next one,
holding the replies of those it had taken.
"""

from __future__ import annotations

import fcntl
import os
import socket
import threading
from contextlib import contextmanager
from typing import Iterator

_defaultTimeoutLock = threading.Lock()


def isNonBlocking(descriptor: int) -> bool:
    """Whether C{descriptor}'s open file is in non-blocking mode."""
    return bool(fcntl.fcntl(descriptor, fcntl.F_GETFL) & os.O_NONBLOCK)


@contextmanager
def socketsMadeIn(nonBlocking: bool) -> Iterator[None]:
    """While inside, socket objects made in this process set their descriptor non-blocking if C{nonBlocking},
    else leave it (CPython) or set it blocking (PyPy): the default timeout is 0 or C{None} meanwhile. Only for
    moments without other threads making sockets (a start, or under this lock)."""
    with _defaultTimeoutLock:
        previous = socket.getdefaulttimeout()
        socket.setdefaulttimeout(0.0 if nonBlocking else None)
        try:
            yield
        finally:
            socket.setdefaulttimeout(previous)


@contextmanager
def socketOn(descriptor: int) -> Iterator[socket.socket]:
    """A socket object on a duplicate of C{descriptor}, for options and shutdowns, closed on leaving; the
    descriptor's blocking mode is the same throughout."""
    with socketsMadeIn(isNonBlocking(descriptor)):
        handle = socket.socket(fileno=os.dup(descriptor))
    with handle:
        yield handle

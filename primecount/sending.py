"""The send deadline, without a reactor: which connections' queued output has made no progress for too long.

A client that never reads its replies leaves them queued in the server, and a
connection closed with output queued waits for it to drain: without a bound it
holds its slot for ever. As nginx's C{send_timeout} does, a connection whose
queued output makes no progress (no byte of it taken by the kernel) for
C{seconds} is given up. Each connection with output queued is watched; a sweep
every so often compares how much of what it wrote has left since the last
progress.
"""

from __future__ import annotations

from typing import Callable, Generic, Hashable, TypeVar

Connection = TypeVar("Connection", bound=Hashable)


class _Watched:
    """What is known of one connection's output: bytes written in all, bytes gone at the last progress, when."""

    __slots__ = ("written", "sentAtProgress", "progressAt")

    def __init__(self, now: float) -> None:
        self.written = 0
        self.sentAtProgress = 0
        self.progressAt = now


class SendProgress(Generic[Connection]):
    """Watches connections with queued output; L{sweep} names those stuck past the deadline."""

    def __init__(self, seconds: float, queued: Callable[[Connection], int]) -> None:
        self.seconds = seconds
        self._queued = queued  # bytes written to the connection that have not left the process yet
        self._watched: dict[Connection, _Watched] = {}

    def wrote(self, connection: Connection, size: int, now: float) -> None:
        """C{connection} was handed C{size} more bytes to send."""
        watched = self._watched.get(connection)
        if watched is None:
            watched = self._watched[connection] = _Watched(now)
            watched.written = size
            watched.sentAtProgress = size - self._queued(connection)  # what has left by now is the baseline
            return
        watched.written += size

    def forget(self, connection: Connection) -> None:
        """C{connection} is gone."""
        self._watched.pop(connection, None)

    def __len__(self) -> int:
        return len(self._watched)

    def sweep(self, now: float) -> list[Connection]:
        """Drop the connections whose output has all left; return those that made no progress for the
        deadline (they are dropped too: the caller aborts them)."""
        stuck = []
        for connection, watched in list(self._watched.items()):
            queued = self._queued(connection)
            if queued == 0:
                del self._watched[connection]
                continue
            sent = watched.written - queued
            if sent > watched.sentAtProgress:
                watched.sentAtProgress, watched.progressAt = sent, now
            elif now - watched.progressAt >= self.seconds:
                del self._watched[connection]
                stuck.append(connection)
        return stuck

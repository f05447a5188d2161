"""Connection limits: how many connections in all and per client address, the process's descriptor limit, and
how often something a client can trigger is logged.

Twisted's own C{LimitConnectionsByPeer} indexes its table with the peer's
address object rather than its host (twisted issue 12183), so it never limits
anything on current releases; this is the small, correct replacement.
"""

from __future__ import annotations

import ipaddress
import resource
from collections import Counter
from typing import NamedTuple, Optional

# Descriptors kept free for everything that is not a client: listeners, the records file,
# logs, the thread pool's wake-up pipe, metrics, imports.
FD_HEADROOM = 128


def canonicalHost(host: str) -> str:
    """The one name of a client address, as records, logs, limits and metrics all write it: IPv4-mapped IPv6
    (C{::ffff:a.b.c.d}) is the IPv4 address, other IPv6 is in RFC 5952 form with no scope id; anything that
    is not an IP address (a UNIX socket's path) is left as it is."""
    if ":" not in host:
        return host  # Twisted reports IPv4 peers as canonical dotted quads already
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)


class Throttle:
    """Says when an event that clients can cause at will may be logged: at most once per C{interval} seconds,
    with how many happened since the last line."""

    def __init__(self, interval: float = 1.0) -> None:
        self._interval = interval
        self._last = float("-inf")
        self._count = 0

    def event(self, now: float) -> Optional[int]:
        """One more event at C{now}: the count to log now, or C{None} to stay quiet."""
        self._count += 1
        if now - self._last < self._interval:
            return None
        count, self._count, self._last = self._count, 0, now
        return count


class ConnectionLimits:
    """Counts open connections in all and per client address, refusing those over either limit."""

    def __init__(self, maxTotal: int, maxPerPeer: int) -> None:
        """C{maxPerPeer} of 0 means no per-address limit."""
        self.maxTotal = maxTotal
        self.maxPerPeer = maxPerPeer
        self.total = 0
        self._perPeer: Counter[str] = Counter()

    def acquire(self, key: str) -> bool:
        """Count a new connection from C{key} if both limits allow it; say whether they did."""
        return self.tryAcquire(key) is None

    def tryAcquire(self, key: str) -> Optional[str]:
        """Count a new connection from C{key}, or name the limit it is over: C{total} or C{per_address}."""
        if self.total >= self.maxTotal:
            return "total"
        if self.maxPerPeer and self._perPeer[key] >= self.maxPerPeer:
            return "per_address"
        self.total += 1
        self._perPeer[key] += 1
        return None

    def release(self, key: str) -> None:
        """A connection counted under C{key} has closed."""
        self.total -= 1
        self._perPeer[key] -= 1
        if not self._perPeer[key]:
            del self._perPeer[key]

    def openFrom(self, key: str) -> int:
        """How many connections from C{key} are counted now."""
        return self._perPeer[key]


class FileLimit(NamedTuple):
    """The descriptor limit before and after raising it."""

    softBefore: int
    soft: int
    hard: int

    @property
    def defaultMaxConnections(self) -> int:
        """As many clients as the soft limit allows, less headroom for everything else."""
        return max(1, self.soft - FD_HEADROOM)


def raiseFileLimit() -> FileLimit:
    """Raise the soft C{RLIMIT_NOFILE} to the hard limit (each client holds a descriptor)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if hard == resource.RLIM_INFINITY:
        target = 1 << 20  # Linux refuses an infinite soft limit for descriptors
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            return FileLimit(soft, target, hard)
        except (ValueError, OSError):
            pass
    return FileLimit(soft, soft, hard)

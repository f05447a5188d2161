"""Connection limits (in all, per client address, and the process's descriptors) and how often something a
client can trigger is logged."""

from __future__ import annotations

import ipaddress
import resource
from collections import Counter
from typing import Any, NamedTuple, Optional

# Descriptors kept free for everything that is not a client: listeners, the records file,
# logs, the thread pool's wake-up pipe, metrics, imports.
FD_HEADROOM = 128
# Refused connections linger (to deliver their ERROR busy) only this many at once: past it, a flood is closed
# outright. The default --max-connections leaves them this many descriptors (or an eighth, if fewer).
BUSY_LINGER_MAX = 1024
# The fewest connections a process must be able to hold: a descriptor limit that leaves fewer stops the start
# (as one client's load test, --max-per-ip's default, would already be refused). A limit of 256 leaves 112.
MIN_CONNECTIONS = 64


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


# A peer without an IP address (a UNIX socket's) in records and limits: an empty client field (NULL in a table).
NO_ADDRESS = ""


def peerHost(address: Any) -> str:
    """The client address (an C{IAddress}) as written in records, logs and limits: the IP of a TCP peer, in its
    one canonical form (L{canonicalHost}); L{NO_ADDRESS} for a peer that has none (a UNIX socket's)."""
    host = getattr(address, "host", None)
    return canonicalHost(host) if host else NO_ADDRESS


def shownPeer(peer: str) -> str:
    """C{peer} (a L{peerHost}) as a log line names it."""
    return peer or "a UNIX-socket peer"


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


class SummaryLine(NamedTuple):
    """What one summary line says of one kind of event: how many there were over how many seconds, from how
    many sources (at most L{SUMMARY_SOURCES} are told apart), and the last source."""

    kind: str
    count: int
    seconds: float
    sources: int
    lastSource: str


# Distinct sources counted per kind and interval; a flood from more is reported as at least this many.
SUMMARY_SOURCES = 1000


class Summary:
    """Events that clients cause at will, by kind (an ERROR reply's text), summarised so that each kind takes
    at most one line per C{interval}: the first of a quiet spell is told at once, the rest of its interval
    as one line with their count once the interval is over (L{flush}), whether or not more come."""

    def __init__(self, interval: float = 1.0) -> None:
        self._interval = interval
        self._toldAt: dict[str, float] = {}
        # Kind -> [count, distinct sources, last source], for events not yet told.
        self._pending: dict[str, list] = {}

    def event(self, kind: str, source: str, now: float) -> Optional[SummaryLine]:
        """One event of C{kind} from C{source}: the line to log now, or C{None} (it waits for L{flush})."""
        pending = self._pending.get(kind)
        if pending is None:
            if now - self._toldAt.get(kind, float("-inf")) >= self._interval:
                self._toldAt[kind] = now
                return SummaryLine(kind, 1, 0.0, 1, source)
            pending = self._pending[kind] = [0, set(), source]
        pending[0] += 1
        if len(pending[1]) < SUMMARY_SOURCES:
            pending[1].add(source)
        pending[2] = source
        return None

    def due(self) -> Optional[float]:
        """When the next waiting line is due (C{None} if nothing waits)."""
        if not self._pending:
            return None
        return min(self._toldAt[kind] for kind in self._pending) + self._interval

    def flush(self, now: float, everything: bool = False) -> list[SummaryLine]:
        """The waiting lines whose interval is over (C{everything}: all of them, as when stopping)."""
        lines = []
        for kind, (count, sources, last) in list(self._pending.items()):
            toldAt = self._toldAt[kind]
            if everything or now - toldAt >= self._interval:
                del self._pending[kind]
                self._toldAt[kind] = now
                lines.append(SummaryLine(kind, count, now - toldAt, len(sources), last))
        return lines


class ConnectionLimits:
    """Counts open connections in all and per client address, refusing those over either limit."""

    def __init__(self, maxTotal: int, maxPerPeer: int, descriptors: Optional[int] = None) -> None:
        """C{maxPerPeer} of 0 means no per-address limit. C{descriptors}: how many client descriptors the process
        may hold in all, counting refused connections that linger (L{lingering}); none past it."""
        self.maxTotal = maxTotal
        self.maxPerPeer = maxPerPeer
        self.descriptors = descriptors if descriptors is not None else maxTotal + BUSY_LINGER_MAX
        self.total = 0
        self.lingering = 0  # refused connections lingering to deliver their ERROR busy
        self._perPeer: Counter[str] = Counter()

    def acquire(self, key: str) -> bool:
        """Count a new connection from C{key} if both limits allow it; say whether they did."""
        return self.tryAcquire(key) is None

    def tryAcquire(self, key: Optional[str]) -> Optional[str]:
        """Count a new connection from C{key}, or name the limit it is over: C{total}, C{descriptors} or
        C{per_address}. A C{key} of C{None} (a proxy's connection before its PROXY header names the client)
        counts in the total only."""
        if self.total >= self.maxTotal:
            return "total"
        if self.total + self.lingering >= self.descriptors:
            return "descriptors"
        if key is not None:
            if self.maxPerPeer and self._perPeer[key] >= self.maxPerPeer:
                return "per_address"
            self._perPeer[key] += 1
        self.total += 1
        return None

    def release(self, key: Optional[str]) -> None:
        """A connection counted under C{key} has closed (or, for C{None}, read its PROXY header)."""
        self.total -= 1
        if key is not None:
            self._perPeer[key] -= 1
            if not self._perPeer[key]:
                del self._perPeer[key]

    def tryLinger(self) -> bool:
        """Whether a refused connection may linger: it then holds its descriptor until L{lingerEnded}. Not past
        L{BUSY_LINGER_MAX} at once, nor past the descriptors."""
        if self.lingering >= BUSY_LINGER_MAX or self.total + self.lingering >= self.descriptors:
            return False
        self.lingering += 1
        return True

    def lingerEnded(self) -> None:
        """A lingering refused connection has closed."""
        self.lingering -= 1

    def openFrom(self, key: str) -> int:
        """How many connections from C{key} are counted now."""
        return self._perPeer[key]


class FileLimit(NamedTuple):
    """The descriptor limit before and after raising it."""

    softBefore: int
    soft: int
    hard: int

    @property
    def clientDescriptors(self) -> int:
        """The descriptors clients may hold in all: the soft limit, less headroom for everything else."""
        return max(1, self.soft - FD_HEADROOM)

    @property
    def defaultMaxConnections(self) -> int:
        """As many clients as the client descriptors allow, less those refused connections may linger on."""
        return max(1, self.clientDescriptors - min(BUSY_LINGER_MAX, self.clientDescriptors // 8))


def descriptorLimits(maxConnections: Optional[int], maxPerPeer: int) -> ConnectionLimits:
    """The connection limits of this process: the descriptor limit raised to its hard limit first, then
    C{maxConnections} (or the default it leaves), C{maxPerPeer} and the client descriptors; said in the log."""
    from twisted.logger import Logger

    log, fileLimit = Logger(), enoughDescriptors()
    maxTotal = maxConnections or fileLimit.defaultMaxConnections
    log.info("descriptor limit (RLIMIT_NOFILE): {soft}, hard {hard}; {clients} for clients; "
             "at most {maxConnections} connections, {perIP} per address",
             soft=f"soft {fileLimit.softBefore} raised to {fileLimit.soft}" if fileLimit.soft != fileLimit.softBefore
             else f"soft {fileLimit.soft}", hard=fileLimit.hard, clients=fileLimit.clientDescriptors,
             maxConnections=maxTotal, perIP=maxPerPeer or "no limit")
    if maxTotal > fileLimit.defaultMaxConnections:
        log.warn("--max-connections {maxConnections} exceeds what the descriptor limit {soft} leaves for clients "
                 "and refusals ({default}): past {clients} descriptors in all, clients get ERROR busy",
                 maxConnections=maxTotal, soft=fileLimit.soft, default=fileLimit.defaultMaxConnections,
                 clients=fileLimit.clientDescriptors)
    return ConnectionLimits(maxTotal, maxPerPeer, fileLimit.clientDescriptors)


def enoughDescriptors() -> FileLimit:
    """L{raiseFileLimit}, then stop the start (L{StartFailed}, naming the limit) if it leaves fewer than
    L{MIN_CONNECTIONS} connections."""
    from primecount.startup import StartFailed

    fileLimit = raiseFileLimit()
    if fileLimit.defaultMaxConnections < MIN_CONNECTIONS:
        least = next(n for n in range(FD_HEADROOM, 1 << 20) if FileLimit(n, n, n).defaultMaxConnections >= MIN_CONNECTIONS)
        raise StartFailed(
            f"primecount: the descriptor limit (RLIMIT_NOFILE) is {fileLimit.soft} (hard {fileLimit.hard}), which "
            f"leaves room for {fileLimit.defaultMaxConnections} connections ({FD_HEADROOM} descriptors are kept "
            f"for everything else); at least {MIN_CONNECTIONS} are needed: raise the limit to {least} or more "
            f"(ulimit -n, systemd's LimitNOFILE=, prlimit --nofile)")
    return fileLimit


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

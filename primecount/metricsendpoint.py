"""The C{--metrics} endpoint: one bounded C{GET} or C{HEAD} of C{/metrics}, C{/healthz} or C{/readyz} per
connection, so that neither a flood nor a client that never reads can grow the server or lock scrapers and
balancers out (docs/operations.md)."""

from __future__ import annotations

from typing import Any, Optional

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder
from twisted.internet.interfaces import IAddress, IDelayedCall, IReactorTime
from twisted.internet.protocol import Factory, Protocol

from primecount.health import ALIVE, IS_READY, NOT_READY, ProcessHealth, Verdict, WorkersHealth
from primecount.internals import readWaiting

MAX_HEAD = 8192
MAX_CONNECTIONS = 16
# While every connection without its head is younger than HEAD_GRACE, newcomers are let in up to this many.
MOST_CONNECTIONS = 64
# A connection is not dropped for a newcomer before this: a client's head follows its connect within a round trip.
HEAD_GRACE = 0.25
# From connect to the last byte of the reply; a scrape takes milliseconds.
DEADLINE = 10.0
# From connect to the end of the request head, which a scraper sends at once.
HEAD_DEADLINE = 2.0
# The exposition is rendered at most this often (about half a millisecond of the reactor each time).
RENDER_INTERVAL = 1.0
# Bytes after the request head that are read (and thrown away) before closing regardless.
DISCARD_MAX = 65536
_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            431: "Request Header Fields Too Large", 503: "Service Unavailable"}


class RequestHead:
    """What is needed of a request head: its method, its path (query dropped), its C{Accept}, whether it
    announced a body, or why it is not a request."""

    def __init__(self, raw: bytes) -> None:
        self.problem: Optional[int] = None
        self.method = self.path = self.accept = ""
        self.hasBody = False
        lines = raw.decode("latin-1").replace("\r\n", "\n").split("\n")
        words = lines[0].split(" ")
        if len(words) != 3 or not words[2].startswith("HTTP/1."):
            self.problem = 400
            return
        self.method, target = words[0], words[1]
        self.path = target.split("?", 1)[0]
        for line in lines[1:]:
            name, colon, value = line.partition(":")
            if not colon:
                continue
            name = name.strip().lower()
            if name == "accept":
                self.accept = value.strip()
            elif name in ("content-length", "transfer-encoding") and value.strip() not in ("", "0"):
                self.hasBody = True


def response(status: int, contentType: str = "text/plain; charset=utf-8", body: bytes = b"",
             headOnly: bool = False, extra: str = "") -> bytes:
    """A whole HTTP/1.1 response that closes the connection."""
    head = (f"HTTP/1.1 {status} {_REASONS[status]}\r\nContent-Type: {contentType}\r\n"
            f"Content-Length: {len(body)}\r\n{extra}Connection: close\r\n\r\n")
    return head.encode("latin-1") + (b"" if headOnly else body)


class MetricsProtocol(Protocol):
    """One scrape: reads the request head, answers, closes; reads and drops anything after the head."""

    def __init__(self, factory: "MetricsSite") -> None:
        self._factory = factory
        self._head = b""
        self._answered = False
        self._discarded = 0
        self._deadline: Optional[IDelayedCall] = None
        self._headDeadline: Optional[IDelayedCall] = None
        self._dropped = False

    def connectionMade(self) -> None:
        """Answer a head that is already waiting; otherwise take a place (at the cap, the oldest one still
        without its head, or a 503 if every place is answering). The head must be whole by L{HEAD_DEADLINE},
        the whole exchange over by L{DEADLINE}."""
        clock = self._factory.clock
        self._deadline = clock.callLater(DEADLINE, self.transport.abortConnection)
        waiting = readWaiting(self.transport)
        if waiting:
            self.dataReceived(waiting)
            if self._answered:
                return
        if not self._factory.makeRoom(self):
            self._answer(response(503, body=b"too many metrics connections\n"))
            return
        self._headDeadline = clock.callLater(HEAD_DEADLINE, self.evict)

    def evict(self) -> None:
        """Drop this connection, still without a whole head (too slow, or its place is wanted)."""
        self._factory.headDone(self)
        self._cancel()
        self._dropped = True
        self._factory.dropping += 1
        self.transport.abortConnection()

    def dataReceived(self, data: bytes) -> None:
        """Gather the head (bounded), then answer; what follows is read and dropped, up to a bound."""
        if self._answered:
            self._discarded += len(data)
            if self._discarded > DISCARD_MAX:
                self.transport.abortConnection()
            return
        self._head += data
        end = self._head.find(b"\r\n\r\n")
        if end < 0:
            end = self._head.find(b"\n\n")
        if end < 0:
            if len(self._head) > MAX_HEAD:
                self._answer(response(431, body=b"request head too large\n"))
            return
        if end > MAX_HEAD:
            self._answer(response(431, body=b"request head too large\n"))
            return
        self._answer(self._factory.respond(RequestHead(self._head[:end])))

    def _answer(self, data: bytes) -> None:
        self._answered = True
        self._head = b""
        self._factory.headDone(self)
        if self._headDeadline is not None and self._headDeadline.active():
            self._headDeadline.cancel()
        self.transport.write(data)
        self.transport.loseConnection()

    def _cancel(self) -> None:
        for call in (self._deadline, self._headDeadline):
            if call is not None and call.active():
                call.cancel()

    def connectionLost(self, reason: Any = None) -> None:
        """Forget the deadlines and free the place."""
        self._cancel()
        self._factory.headDone(self)
        self._factory.open -= 1
        if self._dropped:
            self._factory.dropping -= 1


class _AlwaysReady:
    """The health of a process that has nothing to tell (tests of the metrics alone)."""

    def live(self) -> Verdict:
        """Live."""
        return ALIVE

    def ready(self) -> Verdict:
        """Ready."""
        return IS_READY


class MetricsSite(Factory):
    """Serves a Prometheus registry at C{/metrics} and the process's (or the supervisor's) health at C{/healthz}
    and C{/readyz} (the class name keeps Twisted's "…Site starting on N" line)."""

    noisy = False

    def __init__(self, registry: CollectorRegistry, clock: IReactorTime,
                 health: ProcessHealth | WorkersHealth | _AlwaysReady = _AlwaysReady()) -> None:
        self.registry = registry
        self.health = health
        self.clock = clock
        self.open = 0
        self.dropping = 0  # dropped connections whose end the transport has yet to report
        self._waitingHead: dict[MetricsProtocol, float] = {}  # without a whole head: when they came, oldest first
        self._rendered: dict[str, tuple[float, bytes]] = {}  # by content type: when, and what

    def buildProtocol(self, addr: IAddress) -> MetricsProtocol:
        """A protocol for one scrape; counted against the cap until its connection is gone."""
        self.open += 1
        return MetricsProtocol(self)

    def makeRoom(self, protocol: MetricsProtocol) -> bool:
        """Give C{protocol}, still waiting for its head, a place: past the cap, the oldest connection still
        waiting for its head is dropped for it if it is past its grace; otherwise the newcomer is let in beyond
        the cap, up to L{MOST_CONNECTIONS}; C{False} past that."""
        now = self.clock.seconds()
        if self.open - self.dropping > MAX_CONNECTIONS:
            oldest = next(iter(self._waitingHead.items()), None)
            if oldest is not None and now - oldest[1] >= HEAD_GRACE:
                oldest[0].evict()
            elif self.open - self.dropping > MOST_CONNECTIONS:
                return False
        self._waitingHead[protocol] = now
        return True

    def headDone(self, protocol: MetricsProtocol) -> None:
        """C{protocol} no longer waits for its head (answered, dropped or gone)."""
        self._waitingHead.pop(protocol, None)

    def respond(self, head: RequestHead) -> bytes:
        """The response to C{head}: the metrics in the Prometheus text format (or OpenMetrics when asked)."""
        if head.problem is not None:
            return response(head.problem, body=b"not an HTTP/1.x request\n")
        if head.method not in ("GET", "HEAD"):
            return response(405, body=b"only GET and HEAD\n", extra="Allow: GET, HEAD\r\n")
        if head.hasBody:
            return response(400, body=b"a request body is not read here\n")
        if head.path in ("/healthz", "/readyz"):
            verdict = self.health.live() if head.path == "/healthz" else self.health.ready()
            body = verdict.reason if verdict.ok else (NOT_READY if head.path == "/readyz" else "not live: ") + \
                verdict.reason
            return response(200 if verdict.ok else 503, body=body.encode("utf-8") + b"\n",
                            headOnly=head.method == "HEAD")
        if head.path != "/metrics":
            return response(404, body=b"metrics are at /metrics, health at /healthz and /readyz\n")
        encode, contentType = choose_encoder(head.accept)
        return response(200, contentType, self._render(encode, contentType), headOnly=head.method == "HEAD")

    def _render(self, encode: Any, contentType: str) -> bytes:
        """The exposition in C{contentType}, rendered again only once L{RENDER_INTERVAL} has passed."""
        now = self.clock.seconds()
        rendered = self._rendered.get(contentType)
        if rendered is None or now - rendered[0] >= RENDER_INTERVAL:
            rendered = self._rendered[contentType] = (now, encode(self.registry))
        return rendered[1]

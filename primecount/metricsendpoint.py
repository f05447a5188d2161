"""The C{--metrics} endpoint: one bounded HTTP/1.x request per connection, C{GET} or C{HEAD} of C{/metrics}.

Twisted's web server reads request bodies (spooling large ones to a temporary
file before any resource can refuse them) and holds pipelined requests in
memory without a bound, and its connections count against no limit: a client
that sends without reading grows the server without end. A scraper needs far
less: this answers one request per connection and closes, never reads a body,
reads at most L{MAX_HEAD} bytes of request head, serves at most
L{MAX_CONNECTIONS} connections at once, and gives each L{DEADLINE} seconds in all.
"""

from __future__ import annotations

from typing import Any, Optional

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder
from twisted.internet.interfaces import IAddress, IDelayedCall, IReactorTime
from twisted.internet.protocol import Factory, Protocol

MAX_HEAD = 8192
MAX_CONNECTIONS = 16
# From connect to the last byte of the reply; a scrape takes milliseconds.
DEADLINE = 10.0
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

    def connectionMade(self) -> None:
        """Over the connection cap: a 503 at once. Otherwise the whole exchange must end by the deadline."""
        self._deadline = self._factory.clock.callLater(DEADLINE, self.transport.abortConnection)
        if self._factory.open > MAX_CONNECTIONS:
            self._answer(response(503, body=b"too many metrics connections\n"))

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
        self.transport.write(data)
        self.transport.loseConnection()

    def connectionLost(self, reason: Any = None) -> None:
        """Forget the deadline and free the slot."""
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._factory.open -= 1


class MetricsSite(Factory):
    """Serves a Prometheus registry at C{/metrics} (the class name keeps Twisted's "…Site starting on N" line)."""

    noisy = False

    def __init__(self, registry: CollectorRegistry, clock: IReactorTime) -> None:
        self.registry = registry
        self.clock = clock
        self.open = 0

    def buildProtocol(self, addr: IAddress) -> MetricsProtocol:
        """A protocol for one scrape; counted against the cap until its connection is gone."""
        self.open += 1
        return MetricsProtocol(self)

    def respond(self, head: RequestHead) -> bytes:
        """The response to C{head}: the metrics in the Prometheus text format (or OpenMetrics when asked)."""
        if head.problem is not None:
            return response(head.problem, body=b"not an HTTP/1.x request\n")
        if head.method not in ("GET", "HEAD"):
            return response(405, body=b"only GET and HEAD\n", extra="Allow: GET, HEAD\r\n")
        if head.hasBody:
            return response(400, body=b"a request body is not read here\n")
        if head.path != "/metrics":
            return response(404, body=b"metrics are at /metrics\n")
        encode, contentType = choose_encoder(head.accept)
        return response(200, contentType, encode(self.registry), headOnly=head.method == "HEAD")

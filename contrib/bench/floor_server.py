"""The framework's floor for one-shot requests: a minimal Twisted line server with primecount's pool hand-off.

What the fixed design needs and nothing more: a newline ends the request; every
request that ended in a reactor turn is analysed in one C{deferToThread} call,
their records appended with one C{write(2)}, and only then are the replies
written and the connections closed. No limits, deadlines, metrics or logs.
Run: C{python contrib/bench/floor_server.py PORT RECORDS} (for C{request_path.py}).
"""

import os
import sys
import time

from twisted.internet import reactor
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.threads import deferToThread

pending: list = []


def analyse(lines: list) -> list:
    """Count the last character of each message, and whether the count is prime; None for no message."""
    results = []
    for line in lines:
        message = line.decode("utf-8", "replace").strip()
        count = message.count(message[-1]) if message else 0
        results.append((message, count, count > 1 and all(count % d for d in range(2, int(count ** 0.5) + 1))))
    return results


def dispatch() -> None:
    """Answer the turn's requests: one pool call, one records write, then every reply."""
    batch, pending[:] = list(pending), []

    def answer(results: list) -> None:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        os.write(records, "".join(f"{stamp}\t{p.transport.getPeer().host}\t{m}\t{c}\t{'sí' if v else 'no'}\n"
                                  for p, (m, c, v) in zip((p for p, _ in batch), results)).encode())
        for (protocol, _), (_, count, prime) in zip(batch, results):
            protocol.transport.write(f"{count} {'sí' if prime else 'no'}\n".encode())
            protocol.transport.loseConnection()

    deferToThread(analyse, [line for _, line in batch]).addCallback(answer)


class Answer(Protocol):
    """Gathers one line, then queues it for the turn's batch."""

    buffer: "bytes | None" = b""

    def dataReceived(self, data: bytes) -> None:
        if self.buffer is None:
            return  # one request per connection: what follows it is ignored
        self.buffer += data
        if b"\n" in self.buffer:
            line, self.buffer = self.buffer.split(b"\n", 1)[0], None
            if not pending:
                reactor.callLater(0, dispatch)
            pending.append((self, line))


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("port", type=int, help="loopback port to listen on")
    parser.add_argument("records", help="records file to append to")
    arguments = parser.parse_args()
    records = os.open(arguments.records, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    reactor.listenTCP(arguments.port, Factory.forProtocol(Answer), backlog=1024, interface="127.0.0.1")
    reactor.run()

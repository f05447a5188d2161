"""Property tests: arbitrary bytes, split anyhow, with pauses and EOFs, always get exactly the reference reply.

The reference here is written from the protocol's description, independently
of the package: it decides how the message ends (newline, EOF, quiet gap,
deadline, length) and what the reply must be.
"""

from __future__ import annotations

import math
import socket
import time
from typing import Union

from hypothesis import HealthCheck, given, settings, strategies as st
from twisted.trial.unittest import SynchronousTestCase

from primecount.connection import RequestLimits
from primecount.tools.serverprocess import ServerProcess
from tests.helpers import ProtocolHarness, slow

Event = Union[bytes, float, None]  # bytes: data; float: a pause in seconds; None: the client half-closes
LIMITS = RequestLimits(timeout=2.03, quiet=0.2, maxLine=32, linger=1.0)
ERRORS = {b"ERROR empty message\n", b"ERROR invalid UTF-8\n", b"ERROR timeout\n", b"ERROR line too long (max 32 bytes)\n"}

chunks = st.one_of(
    st.binary(max_size=40),
    st.sampled_from([b"\n", b"\r\n", b" ", b"\t", b"abc2a", "ñ".encode(), "ñ".encode()[:1], "日".encode(),
                     b"\xff", b"a" * 33, b"a" * 32 + b"\r", b"\r", b"\x00", "\u2028".encode()]),
)
events = st.lists(
    st.one_of(chunks, st.sampled_from([0.0, 0.05, 0.1, 0.15, 0.25, 0.5, 1.1]), st.just(None)), max_size=12
)


def referenceAnswer(raw: bytes) -> bytes:
    """The reply to a finished message, from the protocol's description."""
    try:
        text = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        return b"ERROR invalid UTF-8\n"
    if not text:
        return b"ERROR empty message\n"
    count = text.count(text[-1])
    prime = count > 1 and all(count % d for d in range(2, math.isqrt(count) + 1))
    return f"{count} {'sí' if prime else 'no'}\n".encode()


def reference(history: list[Event], limits: RequestLimits = LIMITS) -> tuple[bytes, int]:
    """The expected reply, and how many events the client got to send before the message ended."""
    now, buffered, lastData = 0.0, b"", 0.0
    tooLong = f"ERROR line too long (max {limits.maxLine} bytes)\n".encode()

    def silenceEnds(until: float) -> bytes | None:
        quietAt = lastData + limits.quiet if buffered and limits.quiet else math.inf
        if min(quietAt, limits.timeout) <= until:
            return referenceAnswer(buffered) if quietAt < limits.timeout else b"ERROR timeout\n"
        return None

    for sent, event in enumerate(history, 1):
        if event is None:
            return referenceAnswer(buffered), sent
        if isinstance(event, float):
            ended = silenceEnds(now + event)
            if ended is not None:
                return ended, sent
            now += event
            continue
        newline = event.find(b"\n")
        line = buffered + (event if newline < 0 else event[:newline])
        if newline >= 0:
            content = line[:-1] if line.endswith(b"\r") else line  # the CR of CRLF does not count
            return (tooLong if len(content) > limits.maxLine else referenceAnswer(content)), sent
        # A line one byte over the limit may still be a whole one whose CRLF is split after the CR.
        if len(line) > limits.maxLine and not (len(line) == limits.maxLine + 1 and line.endswith(b"\r")):
            return tooLong, sent
        if event:
            buffered, lastData = line, now
    return silenceEnds(math.inf), len(history)


class ProtocolFuzzTests(SynchronousTestCase):
    """The protocol over a StringTransport and a Clock agrees with the reference on every history."""

    @settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(events)
    def test_agreesWithReference(self, history: list[Event]) -> None:
        """One reply, exactly the reference's, then the connection closes; never an exception or a hang."""
        harness = ProtocolHarness(LIMITS)
        for event in history:
            if event is None:
                harness.endOfInput()
            elif isinstance(event, float):
                harness.clock.advance(event)
            else:
                harness.send(event)
        # Clock schedules calls made during an advance from its end, so let the deadline pass first.
        harness.clock.advance(LIMITS.timeout)
        harness.clock.advance(LIMITS.linger + 1)
        expected, _ = reference(history)
        self.assertEqual(harness.reply(), expected)
        self.assertTrue(harness.transport.disconnecting, "closed in the end")
        self.assertTrue(expected in ERRORS or expected[:1].isdigit())
        if not expected.startswith(b"ERROR"):
            self.assertEqual(len(harness.records.records), 1)
        else:
            self.assertEqual(harness.records.records, [])


class SocketFuzzTests(SynchronousTestCase):
    """The same property against a real twistd over loopback, for a bounded number of histories."""

    @slow
    def test_agreesWithReferenceOverTCP(self) -> None:
        """Histories sent over real sockets, with real pauses, get the reference reply."""
        limits = LIMITS._replace(timeout=1.5)
        server = ServerProcess(self.mktemp(), "--timeout", str(limits.timeout), "--quiet", str(limits.quiet),
                               "--max-line", str(limits.maxLine), "--max-per-ip", "0")
        self.addCleanup(server.stop)
        # Real pauses are well inside the quiet gap or well past it, and end well before the deadline,
        # so that scheduling jitter cannot change the outcome.
        realEvents = st.lists(
            st.one_of(chunks, st.sampled_from([0.0, 0.02, 0.4]), st.just(None)), max_size=8
        ).filter(lambda history: sum(e for e in history if isinstance(e, float)) <= 1.0)

        @settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
        @given(realEvents)
        def agrees(history: list[Event]) -> None:
            expected, sent = reference(history, limits)
            with socket.create_connection(("127.0.0.1", server.port), timeout=10) as client:
                client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                for event in history[:sent]:  # stop where the message ends, as a real client would
                    if event is None:
                        client.shutdown(socket.SHUT_WR)
                    elif isinstance(event, float):
                        time.sleep(event)
                    elif event:
                        client.sendall(event)
                received = b""
                while chunk := client.recv(4096):
                    received += chunk
            self.assertEqual(received, expected, history)

        agrees()

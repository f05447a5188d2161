"""Tests for L{primecount.logs}: a worker's log to its supervisor's pipe never blocks, drops what cannot wait, and
says how much it dropped."""

from __future__ import annotations

import os
import re
import threading
import time

from twisted.trial.unittest import SynchronousTestCase

from primecount.logs import PipeLog


def readAll(fd: int) -> bytes:
    """Everything the pipe at C{fd} holds now."""
    os.set_blocking(fd, False)
    data = b""
    try:
        while chunk := os.read(fd, 65536):
            data += chunk
    except BlockingIOError:
        pass
    return data


class PipeLogTests(SynchronousTestCase):
    """L{PipeLog} over a real pipe whose reader (the supervisor) stops reading."""

    def setUp(self) -> None:
        self.reader, self.writer = os.pipe()
        self.addCleanup(os.close, self.reader)
        self.addCleanup(os.close, self.writer)

    def test_linesInOrder(self) -> None:
        """Lines written reach the pipe whole and in order."""
        log = PipeLog(self.writer)
        for number in range(100):
            log.write(f"info line {number}\n")
        self.assertTrue(log.drain(10))
        self.assertEqual(readAll(self.reader).decode().splitlines(), [f"info line {n}" for n in range(100)])

    def test_neverBlocksWhenNotRead(self) -> None:
        """With nobody reading, writing twenty times what the pipe and the backlog hold returns at once; the
        lines past the backlog are dropped and counted, and once the pipe is read again one line says how many
        were dropped, after every line kept."""
        log = PipeLog(self.writer, limit=64 * 1024)
        line = "info " + "x" * 94 + "\n"  # 100 bytes
        started = time.monotonic()
        writer = threading.Thread(target=lambda: [log.write(line) for _ in range(26_000)])
        writer.start()
        writer.join(30)
        self.assertFalse(writer.is_alive(), "a write waited for the pipe")
        self.assertLess(time.monotonic() - started, 30)
        dropped = log.droppedInAll
        self.assertGreater(dropped, 20_000)
        received = b""
        while not log.drain(0.01):
            received += readAll(self.reader)
        received += readAll(self.reader)
        lines = received.decode().splitlines()
        notices = [line for line in lines if not line.startswith("info ")]
        said = [int(re.fullmatch(r"warn (\d+) log lines dropped: the supervisor did not read this worker's log in "
                                 r"time", notice).group(1)) for notice in notices]  # type: ignore[union-attr]
        self.assertEqual(sum(said), dropped, "every dropped line said")
        self.assertEqual(lines[-1], notices[-1], "said after the lines kept")
        self.assertEqual(len(lines) - len(notices) + dropped, 26_000, "every line either written or counted")
        self.assertEqual(set(lines) - set(notices), {line.rstrip("\n")})

    def test_goneReaderDropsQuietly(self) -> None:
        """A supervisor gone (the pipe's reader closed) costs nothing: writes go on and are dropped."""
        reader, writer = os.pipe()
        os.close(reader)
        self.addCleanup(os.close, writer)
        log = PipeLog(writer)
        for _ in range(10):
            log.write("info after the supervisor\n")
        self.assertTrue(log.drain(10))

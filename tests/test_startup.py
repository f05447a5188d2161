"""Tests for L{primecount.startup}: a failed start is one line and exit status 1 under C{twistd -n}, and reported
by twistd's daemon start, whose terminal also gets the line."""

from __future__ import annotations

import os

from twisted.trial.unittest import SynchronousTestCase

from primecount import startup
from primecount.startup import StartFailed, forgetTerminal, keepTerminal, saidOnTerminal, sayOnTerminal


class StartFailedTests(SynchronousTestCase):
    """L{StartFailed} is caught where twistd catches exceptions, and ends the process as SystemExit does."""

    def test_bothKinds(self) -> None:
        """An Exception (twistd's daemon start reports it and removes the pidfile) and a SystemExit whose code
        is the line (Python prints it and exits 1)."""
        failed = StartFailed("primecount: the one line")
        self.assertIsInstance(failed, Exception)
        self.assertIsInstance(failed, SystemExit)
        self.assertEqual((failed.code, str(failed)), ("primecount: the one line", "primecount: the one line"))
        try:
            raise failed
        except Exception as caught:
            self.assertIs(caught, failed)


class TerminalTests(SynchronousTestCase):
    """The line goes to the kept terminal only once standard error is no longer it (a daemon's)."""

    def setUp(self) -> None:
        self.reader, self.writer = os.pipe()
        self.addCleanup(os.close, self.reader)
        self.savedError = os.dup(2)
        self.addCleanup(os.close, self.savedError)
        os.dup2(self.writer, 2)  # the "terminal" standard error is, before the daemon is made
        os.close(self.writer)
        self.addCleanup(os.dup2, self.savedError, 2)
        self.patch(startup, "_terminal", None)
        self.addCleanup(forgetTerminal)  # before the patch is undone: the kept descriptor is closed
        keepTerminal()

    def said(self) -> bytes:
        """What reached the terminal so far."""
        os.set_blocking(self.reader, False)
        try:
            return os.read(self.reader, 4096)
        except BlockingIOError:
            return b""

    def test_notTwiceUnderNoDaemon(self) -> None:
        """Standard error still the terminal (twistd -n): nothing is written here (the exit prints it)."""
        sayOnTerminal("primecount: the one line")
        self.assertEqual(self.said(), b"")

    def test_writtenOnceADaemon(self) -> None:
        """Standard error pointed at /dev/null (a daemon): a failure within L{saidOnTerminal} is written to the
        kept terminal, and raised on."""
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 2)
        os.close(null)
        with self.assertRaises(StartFailed):
            with saidOnTerminal():
                raise StartFailed("primecount: --port: Couldn't listen")
        self.assertEqual(self.said(), b"primecount: --port: Couldn't listen\n")
        forgetTerminal()
        sayOnTerminal("after the start")
        self.assertEqual(self.said(), b"", "once the start is over the terminal is let go")

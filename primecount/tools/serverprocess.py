"""Run C{twistd -n primecount} as a child process on an OS-chosen port: for load tests, benchmarks and tests."""

from __future__ import annotations

import re
import selectors
import signal
import subprocess
import sys
import time
from typing import Mapping, Optional, Sequence

TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


def twistdCommand(python: str = sys.executable) -> list[str]:
    """The command that runs twistd with the interpreter C{python} (a venv's own, for its packages)."""
    return [python, *TWISTD[1:]]
_LISTENING = re.compile(rb"primecount listening on \S+ port (\d+)")
_LISTENING_ANYWHERE = re.compile(rb"primecount listening on \S+(?: port (\d+))?")  # or on a UNIX socket's path


def listeningPort(log: str) -> Optional[int]:
    """The port of the first "primecount listening on HOST port N" event in a twistd log, if any."""
    match = _LISTENING.search(log.encode("utf-8"))
    return int(match.group(1)) if match else None


def _nthMatch(pattern: "re.Pattern[bytes]", text: bytes, count: int) -> "Optional[re.Match[bytes]]":
    """The C{count}th match of C{pattern} in C{text}, if there are that many."""
    for seen, match in enumerate(pattern.finditer(text), 1):
        if seen == count:
            return match
    return None


def _times(count: int) -> str:
    """How an error message says C{count} matches ("" for one)."""
    return f"{count} times " if count != 1 else ""


class ServerProcess:
    """A C{twistd -n primecount} child; the listening port is read from its log once it is up."""

    def __init__(
        self,
        records: str,
        *options: str,
        port: str = "tcp:0:interface=127.0.0.1",
        prefix: Sequence[str] = (),
        startupSeconds: float = 30.0,
        twistdOptions: Sequence[str] = (),
        environment: Optional[Mapping[str, str]] = None,
        python: str = sys.executable,
        launcher: Sequence[str] = (),
    ) -> None:
        """Start it with the interpreter C{python}, or with C{launcher} when given (a command that runs twistd
        after something of its own), with C{environment} instead of this process's own when given, and wait
        until it listens."""
        self.records = records
        self.process = subprocess.Popen(
            [*prefix, *(launcher or twistdCommand(python)), "-n", "--pidfile=", *twistdOptions, "primecount", "--port", port, "--records", records,
             *options],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=environment,
        )
        self.output = b""
        self._stopping = False
        try:
            listening = self.waitFor(_LISTENING_ANYWHERE, startupSeconds)
            self.port = int(listening.group(1)) if listening.group(1) else 0  # 0: a UNIX socket
        except BaseException:  # no caller holds it yet to stop it: a server that never listened is not left behind
            self.process.kill()
            self.process.communicate()
            raise

    def waitFor(
        self, pattern: "re.Pattern[bytes] | bytes", seconds: float = 20.0, count: int = 1
    ) -> "re.Match[bytes]":
        """Read the child's log until C{pattern} has matched C{count} times, and return the last of those
        matches; raise if it exits or C{seconds} pass first. (Counting matches costs one pass over the log; a
        pattern repeated C{count} times, as C{(?:.*?X){n}}, backtracks exponentially while it fails.)"""
        compiled = re.compile(pattern) if isinstance(pattern, bytes) else pattern
        deadline = time.monotonic() + seconds
        assert self.process.stdout is not None
        with selectors.DefaultSelector() as selector:
            selector.register(self.process.stdout, selectors.EVENT_READ)
            while True:
                match = _nthMatch(compiled, self.output, count)
                if match:
                    return match
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not selector.select(remaining):
                    raise RuntimeError(f"twistd did not log {compiled.pattern!r} {_times(count)}in time:\n{self.log}")
                chunk = self.process.stdout.read1(65536)  # type: ignore[attr-defined]
                if not chunk:
                    raise RuntimeError(f"twistd exited before logging {compiled.pattern!r} {_times(count)}:\n{self.log}")
                self.output += chunk

    def waitForWorkers(self, count: int, seconds: float = 20.0) -> None:
        """With C{--workers}, wait until C{count} workers have said they listen (the supervisor listens first)."""
        self.waitFor(rb"worker \d+: primecount listening on", seconds, count=count)

    @property
    def metricsPort(self) -> int:
        """The port of C{--metrics} (the one the OS chose for port 0), read from the log."""
        return int(self.waitFor(rb"MetricsSite starting on (\d+)").group(1))

    @property
    def log(self) -> str:
        """What the child has logged so far, as text."""
        return self.output.decode("utf-8", errors="replace")

    def signal(self, sig: int) -> None:
        """Send C{sig} now; after a SIGTERM or SIGINT, L{stop} only waits (a second one could land while the
        process is already exiting, past its handlers, and kill it)."""
        self.process.send_signal(sig)
        if sig in (signal.SIGTERM, signal.SIGINT):
            self._stopping = True

    def stop(self, sig: Optional[int] = None, seconds: float = 30.0) -> int:
        """Send C{sig} (SIGTERM by default) unless a stop signal went already, collect the rest of the log,
        return the exit status."""
        if self.process.poll() is None and not (sig is None and self._stopping):
            self.process.send_signal(sig if sig is not None else signal.SIGTERM)
        try:
            rest, _ = self.process.communicate(timeout=seconds)
        except subprocess.TimeoutExpired:
            self.process.kill()
            rest, _ = self.process.communicate()
        self.output += rest
        return self.process.returncode

"""A throwaway PostgreSQL cluster for the tests: Debian's initdb and pg_ctl, run as an unprivileged user, on a
Unix socket in a temporary folder only (no TCP listener), stopped and removed at the end."""

from __future__ import annotations

import glob
import os
import shutil
import signal
import subprocess
import tempfile
import time
from typing import Any, Optional, Sequence

from twisted.trial.unittest import SkipTest, SynchronousTestCase

NOBODY = 65534


def postgresBinaries() -> Optional[str]:
    """The folder holding initdb and pg_ctl: Debian's newest /usr/lib/postgresql/N/bin, or the PATH's."""
    for folder in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda path: int(path.split("/")[-2]),
                         reverse=True):
        if os.path.exists(os.path.join(folder, "initdb")):
            return folder
    initdb = shutil.which("initdb")
    return os.path.dirname(initdb) if initdb else None


def requirePostgres(test: SynchronousTestCase) -> str:
    """The binaries folder; skip without PostgreSQL and the driver, or fail in CI
    (C{PRIMECOUNT_REQUIRE_SYSTEM_TOOLS=1})."""
    folder = postgresBinaries()
    try:
        import psycopg  # noqa: F401
    except ImportError:
        folder = None
    if folder is None:
        if os.environ.get("PRIMECOUNT_REQUIRE_SYSTEM_TOOLS") == "1":
            test.fail("PostgreSQL (initdb, pg_ctl) and psycopg are required here (PRIMECOUNT_REQUIRE_SYSTEM_TOOLS=1)")
        raise SkipTest("PostgreSQL or psycopg is not installed")
    return folder


class Cluster:
    """One PostgreSQL server of the test's own: L{start}, L{stop} (and start again), L{destroy}."""

    def __init__(self, binaries: str, prefix: Sequence[str] = (), listen: str = "") -> None:
        """A new cluster in a temporary folder; its commands run after C{prefix} (e.g. C{taskset -c 0}, or
        C{ip netns exec} a host); with C{listen}, it also takes TCP connections on that address
        (C{tcpUri})."""
        self.binaries = binaries
        self.prefix = list(prefix)
        self.listen = listen
        self.folder = tempfile.mkdtemp(prefix="primecount-pg-")
        os.chmod(self.folder, 0o755)
        self.data = os.path.join(self.folder, "data")
        self.port = 5432 + (os.getpid() % 20000)  # names the socket file only: there is no TCP listener
        self.uri = f"postgresql:///postgres?host={self.folder}&port={self.port}&user=primecount"
        self.tcpUri = f"postgresql://primecount@{listen}:{self.port}/postgres" if listen else ""
        self._run("initdb", "--pgdata", self.data, "--username", "primecount", "--auth", "trust",
                  "--no-sync", "--encoding", "UTF8", "--locale", "C")
        if listen:  # the test hosts' own range, 198.18.0.0/15, and nothing else
            with open(os.path.join(self.data, "pg_hba.conf"), "a") as rules:
                rules.write("host all all 198.18.0.0/15 trust\n")

    def _asOwner(self) -> list[str]:
        """The command prefix that runs as the cluster's owner: nobody when the tests run as root."""
        if os.geteuid() != 0:
            return []
        os.chown(self.folder, NOBODY, NOBODY)
        return ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]

    def _run(self, tool: str, *arguments: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*self.prefix, *self._asOwner(), os.path.join(self.binaries, tool), *arguments],
                              capture_output=True, text=True, check=check, timeout=120, cwd=self.folder)

    def start(self, durable: bool = False) -> None:
        """Start (or start again) and wait until it accepts connections; unless C{durable}, without fsync (the
        tests' data is thrown away)."""
        options = (f"-c listen_addresses='{self.listen}' -c unix_socket_directories='{self.folder}' -p {self.port} "
                   "-c max_connections=50" + ("" if durable else " -c fsync=off -c full_page_writes=off"))
        self._run("pg_ctl", "--pgdata", self.data, "--log", os.path.join(self.folder, "server.log"), "--wait",
                  "--timeout", "60", "-o", options, "start")

    def stop(self, mode: str = "fast") -> None:
        """Stop it (C{fast}: disconnect every client first)."""
        self._run("pg_ctl", "--pgdata", self.data, "--wait", "--mode", mode, "stop", check=False)

    def destroy(self) -> None:
        """Stop it and remove its files."""
        self.stop("immediate")
        shutil.rmtree(self.folder, ignore_errors=True)

    def serverPid(self) -> int:
        """The process id of the running cluster's postmaster (every PostgreSQL process is its child)."""
        with open(os.path.join(self.data, "postmaster.pid")) as file:
            return int(file.readline())

    def killIdleSession(self) -> None:
        """SIGKILL an idle session of its own (as an idle C{psql} left open): the postmaster then ends every
        backend and starts them again, recovering from the WAL, as after any crash of one of its processes."""
        from primecount.records.table import driver

        idle = driver().connect(self.uri, autocommit=True)
        (pid,), = idle.execute("SELECT pg_backend_pid()").fetchall()
        os.kill(pid, signal.SIGKILL)
        idle.close()

    def killPostmasterAndStart(self) -> None:
        """SIGKILL the postmaster, wait until its backends have noticed and exited, and start it again."""
        postmaster = self.serverPid()
        children = subprocess.run(["ps", "-o", "pid=", "--ppid", str(postmaster)], capture_output=True,
                                  text=True).stdout.split()
        os.kill(postmaster, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while any(os.path.exists(f"/proc/{pid}") for pid in [postmaster, *children]):
            if time.monotonic() > deadline:
                raise AssertionError("the killed postmaster's backends did not exit within 30 s")
            time.sleep(0.02)
        self.start()

    def restartImmediately(self) -> None:
        """C{pg_ctl restart -m immediate}: stopped without a checkpoint, recovered from the WAL at start."""
        self.stop("immediate")
        self.start()

    def query(self, statement: str, *parameters: Any) -> list[tuple[Any, ...]]:
        """Run one statement and return its rows (none for a statement without)."""
        from primecount.records.table import driver

        with driver().connect(self.uri, autocommit=True) as connection:
            cursor = connection.execute(statement, parameters or None)
            return cursor.fetchall() if cursor.description else []


_shared: Optional[Cluster] = None


def sharedCluster(test: SynchronousTestCase) -> Cluster:
    """One running cluster for the whole test run (started on first use, removed when the process exits)."""
    global _shared
    binaries = requirePostgres(test)
    if _shared is None:
        import atexit

        _shared = Cluster(binaries)
        _shared.start()
        atexit.register(_shared.destroy)
    return _shared


def freshTable(test: SynchronousTestCase, cluster: Cluster, length: int = 40) -> str:
    """A table name no other test uses (the test's own, with at most C{length} characters of the test's name),
    dropped (with its partitions, if any) when the test ends."""
    name = "records_" + test.id().split(".")[-1].lower()[:length] + f"_{os.getpid()}"
    cluster.query(f'DROP TABLE IF EXISTS "{name}"')
    test.addCleanup(cluster.query, f'DROP TABLE IF EXISTS "{name}"')
    return name

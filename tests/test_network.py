"""The fleet on a real network (L{tests.netns}): hosts in network namespaces on a private bridge, faults made
with nftables, PostgreSQL on a host of its own; what a partition from the database costs a host under load."""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twisted.logger import Logger
from twisted.trial.unittest import SynchronousTestCase

from primecount.tools.serverprocess import ServerProcess
from tests.helpers import accepts, slow, waitUntil
from tests.netns import FleetNetwork
from tests.postgres import Cluster, freshTable, requirePostgres
from tests.test_fleet import CountingClients, httpGet


RELAY = Path(__file__).resolve().parents[1] / "contrib" / "fleet" / "delayrelay.py"


class Fleet:
    """A database host, a primecount host and a client host on one private network; the primecount host's
    records go to a table on the database host, directly or through a relay that delays every byte."""

    def __init__(self, test: SynchronousTestCase, delay: float | None = None, *options: str,
                 databaseRtoMinUs: int | None = None) -> None:
        self.network = FleetNetwork(test, ["db", "app", "client"])
        self.db, self.app, self.client = self.network["db"], self.network["app"], self.network["client"]
        if databaseRtoMinUs is not None:  # before PostgreSQL listens: its connections take the host's value then
            subprocess.run([*self.db.prefix, "sysctl", "-qw", f"net.ipv4.tcp_rto_min_us={databaseRtoMinUs}"],
                           check=True)
        self.cluster = Cluster(requirePostgres(test), prefix=self.db.prefix, listen=self.db.address)
        test.addCleanup(self.cluster.destroy)
        self.cluster.start()
        self.table = freshTable(test, self.cluster)
        uri = self.cluster.tcpUri
        if delay is not None:
            port = self.cluster.port + 1
            self.relay = subprocess.Popen([*self.db.prefix, sys.executable, str(RELAY), f"{self.db.address}:{port}",
                                           f"{self.db.address}:{self.cluster.port}", str(delay)],
                                          stdout=subprocess.PIPE, text=True)
            test.addCleanup(lambda: (self.relay.kill(), self.relay.wait()))
            assert self.relay.stdout is not None and self.relay.stdout.readline().strip() == "listening"
            uri = f"postgresql://primecount@{self.db.address}:{port}/postgres"
        self.server = ServerProcess(uri, "--records-table", self.table, "--max-per-ip", "0", *options, "--metrics",
                                    f"tcp:5059:interface={self.app.address}",
                                    port=f"tcp:5050:interface={self.app.address}", prefix=self.app.prefix)
        test.addCleanup(self.server.stop)

    def clients(self, name: str, count: int = 6) -> CountingClients:
        """C{count} clients on the client host, loading the primecount host."""
        return CountingClients(5050, count, name, host=self.app.address, namespace=self.client.namespace)

    def rows(self) -> dict[Any, int]:
        """How many rows each message has."""
        return dict(self.cluster.query(f'SELECT message, count(*) FROM "{self.table}" GROUP BY message'))

    def databaseRetransmissionTimeouts(self) -> list[float]:
        """The retransmission timeout (ms, as C{ss} shows it) of each of the primecount host's connections to
        the database."""
        import re

        shown = subprocess.run([*self.app.prefix, "ss", "-tinH", "dst", f"{self.db.address}:{self.cluster.port}"],
                               capture_output=True, text=True, check=True).stdout
        return [float(rto) for rto in re.findall(r"\brto:([\d.]+)", shown)]


def kernelTakesRtoMin() -> bool:
    """Whether this kernel lets a socket lower its least retransmission timeout (Linux 6.15's TCP_RTO_MIN_US)."""
    import socket

    with socket.socket() as probe:
        try:
            probe.setsockopt(socket.IPPROTO_TCP, 45, 10_000)
        except OSError:
            return False
    return True


class FarAndLossyDatabaseTests(SynchronousTestCase):
    """The promise holds across a slow or lossy database link: every verified reply has exactly one row."""

    def assertOneRowEach(self, fleet: Fleet, clients: CountingClients) -> None:
        """No refused, reset or wrong reply; each verified reply has exactly one row, and none has two."""
        self.assertEqual(fleet.server.stop(), 0, fleet.server.log)
        self.assertEqual((dict(clients.failures), clients.other), ({}, []))
        self.assertGreater(len(clients.answered), 100)
        rows = fleet.rows()
        self.assertEqual([m for m in clients.answered if rows.get(m) != 1], [])
        self.assertEqual([m for m, n in rows.items() if n > 1], [])

    def assertOneRowEachAt(self, delay: float) -> None:
        """The records table C{delay} seconds away each way (a delaying relay on the database host): 3 s of load
        from 6 clients, every verified reply has its one row."""
        fleet = Fleet(self, delay=delay)
        clients = fleet.clients(f"far {delay}")
        time.sleep(3)
        self.assertOneRowEach(fleet, clients.stop())

    @slow
    def test_databaseOneMillisecondAway(self) -> None:
        """1 ms each way: every verified reply has its one row."""
        self.assertOneRowEachAt(0.001)

    @slow
    def test_databaseFiveMillisecondsAway(self) -> None:
        """5 ms each way: every verified reply has its one row."""
        self.assertOneRowEachAt(0.005)

    @slow
    def test_databaseTwentyMillisecondsAway(self) -> None:
        """20 ms each way: every verified reply has its one row."""
        self.assertOneRowEachAt(0.020)

    @slow
    def test_onePerCentLossToTheDatabase(self) -> None:
        """1 % of the packets between the primecount host and the database dropped each way (nftables): 3 s of
        load from 6 clients, every verified reply has its one row; the host has at most --records-connections
        (4) connections to the database, each retransmitting after well under the default 200 ms."""
        fleet = Fleet(self)
        fleet.app.loseTo(fleet.db, 1)
        clients = fleet.clients("lossy")
        time.sleep(3)
        timeouts = fleet.databaseRetransmissionTimeouts()
        self.assertOneRowEach(fleet, clients.stop())
        self.assertTrue(1 <= len(timeouts) <= 4, timeouts)
        if kernelTakesRtoMin():
            self.assertLess(max(timeouts), 100, timeouts)
        Logger().info("lossy figures: {count} database connections, retransmission timeouts {timeouts} ms",
                      count=len(timeouts), timeouts=timeouts)


@dataclass
class Cut:
    """What a host cut from its database under load did: its clients' outcomes, its /readyz during the cut,
    its exit status and log, and how soon it answered again after the link healed."""

    clients: CountingClients
    readiness: tuple[int, str]
    cutAt: float
    healedAt: float
    recovered: float
    exitStatus: int
    log: str
    rows: dict[Any, int]

    def refusalsDuringTheCut(self) -> list[float]:
        """How long each ERROR storage unavailable of the cut took, from connect to reply."""
        return [took for at, took in zip(self.clients.unavailableAt, self.clients.unavailableTook)
                if self.cutAt < at < self.healedAt]


def cutFromTheDatabase(test: SynchronousTestCase, seconds: float) -> Cut:
    """6 clients on their own host load a primecount host whose records table is on a third host; the link
    between the primecount host and the database is cut (every packet dropped) for C{seconds}, then healed; the
    load goes on until 200 more are answered."""
    fleet = Fleet(test)
    app, db, server = fleet.app, fleet.db, fleet.server
    clients = fleet.clients("cut")
    try:
        waitUntil(lambda: len(clients.answered) >= 200, what="load before the cut")
        app.cutFrom(db)
        cutAt = time.monotonic()
        waitUntil(lambda: len(clients.unavailableAt) >= 50, what="refusals during the cut")
        readiness = app.call(httpGet, 5059, "/readyz", app.address)
        time.sleep(max(0.0, cutAt + seconds - time.monotonic()))
        app.heal()
        healedAt = time.monotonic()
        try:
            waitUntil(lambda: clients.answeredAt and clients.answeredAt[-1] > healedAt, seconds=15,
                      what="an answer after the link healed")
        except AssertionError:
            clients.stop()
            server.stop()
            test.fail(f"no answer 15 s after the link healed; the host's log ends:\n{server.log[-6000:]}")
        recovered = min(at for at in clients.answeredAt if at > healedAt) - healedAt
        answered = len(clients.answered)
        waitUntil(lambda: len(clients.answered) >= answered + 200, what="load after the link healed")
    finally:
        clients.stop()
    exitStatus = server.stop()
    return Cut(clients, readiness, cutAt, healedAt, recovered, exitStatus, server.log, fleet.rows())


class DatabasePartitionTests(SynchronousTestCase):
    """A host cut off from its database under load: it refuses at once while cut, turns unready, and serves
    again within seconds of the link healing; no verified reply lacks its row."""

    @slow
    def test_cutFromTheDatabaseUnderLoad(self) -> None:
        """A host loaded by 6 clients on their own host is cut from its database for 10 s. While cut, the
        clients get ERROR storage unavailable, the median after at most 0.5 s, and /readyz says 503; no
        connection is refused or reset. Healed, the host answers again within 5 s. Every verified reply has
        exactly one row."""
        cut = cutFromTheDatabase(self, 10.0)
        self.assertEqual(cut.exitStatus, 0, cut.log)
        self.assertEqual(cut.readiness, (503, "not ready: records store unavailable\n"))
        self.assertEqual((dict(cut.clients.failures), cut.clients.other), ({}, []))
        self.assertEqual([m for m in cut.clients.answered if cut.rows.get(m) != 1], [])
        during = cut.refusalsDuringTheCut()
        Logger().info("partition figures: {refused} refused during a 10 s cut, median {median:.3f} s, max "
                      "{most:.2f} s; answering again {recovered:.2f} s after the link healed; {answered} answered",
                      refused=len(during), median=statistics.median(during), most=max(during),
                      recovered=cut.recovered, answered=len(cut.clients.answered))
        self.assertLessEqual(statistics.median(during), 0.5)
        self.assertLessEqual(cut.recovered, 5.0)


class DatabaseKilledTests(SynchronousTestCase):
    """The database's postmaster killed (kill -9) and restarted under load: ERROR storage unavailable meanwhile,
    service back by itself, and, with C{--fsync always}, no verified reply without its one row. (With the
    default C{everysec}, commits are asynchronous, and a crash of the database may lose the last moments of
    them: docs/records.md.)"""

    @slow
    def test_postmasterKilledAndRestarted(self) -> None:
        """kill -9 of the postmaster while 6 clients load a host with C{--fsync always}; PostgreSQL started
        again (it recovers from its WAL); the host answers again without a restart, and every verified reply
        has exactly one row."""
        import os
        import signal

        fleet = Fleet(self, None, "--fsync", "always")
        clients = fleet.clients("killed")
        try:
            waitUntil(lambda: len(clients.answered) >= 200, what="load before the kill")
            os.kill(fleet.cluster.serverPid(), signal.SIGKILL)
            waitUntil(lambda: len(clients.unavailableAt) >= 20, what="refusals while the database is down")
            fleet.cluster.stop("immediate")  # the orphaned backends, if any
            fleet.cluster.start()
            startedAt = time.monotonic()
            waitUntil(lambda: clients.answeredAt and clients.answeredAt[-1] > startedAt, seconds=15,
                      what="an answer once the database is back")
            answered = len(clients.answered)
            waitUntil(lambda: len(clients.answered) >= answered + 200, what="load once the database is back")
        finally:
            clients.stop()
        self.assertEqual(fleet.server.stop(), 0, fleet.server.log)
        self.assertEqual((dict(clients.failures), clients.other), ({}, []))
        rows = fleet.rows()
        self.assertEqual([m for m in clients.answered if rows.get(m) != 1], [])
        Logger().info("postmaster figures: answering again {seconds:.2f} s after the restart; {refused} refused",
                      seconds=min(at for at in clients.answeredAt if at > startedAt) - startedAt,
                      refused=len(clients.unavailableAt))


class BalancedFleet:
    """Three primecount hosts behind the real HAProxy (the shipped configuration, checking /readyz) on a host of
    its own, their records in one table on the database host, and a client host."""

    def __init__(self, test: SynchronousTestCase) -> None:
        from tests.test_haproxy import haproxyConfig

        network = FleetNetwork(test, ["db", "lb", "app1", "app2", "app3", "client"])
        self.db, self.lb, self.client = network["db"], network["lb"], network["client"]
        self.apps = [network[f"app{n}"] for n in (1, 2, 3)]
        self.cluster = Cluster(requirePostgres(test), prefix=self.db.prefix, listen=self.db.address)
        test.addCleanup(self.cluster.destroy)
        self.cluster.start()
        self.table = freshTable(test, self.cluster)
        self.servers = []
        for app in self.apps:
            server = ServerProcess(self.cluster.tcpUri, "--records-table", self.table, "--max-per-ip", "0",
                                   "--proxy-from", f"{self.lb.address}/32", "--metrics",
                                   f"tcp:5059:interface={app.address}", "--drain-delay", "3",
                                   port=f"haproxy:tcp:5051:interface={app.address}", prefix=app.prefix)
            test.addCleanup(server.stop)
            self.servers.append(server)
        config = Path(test.mktemp())
        config.write_text(haproxyConfig(f"{self.lb.address}:5050", [f"{app.address}:5051" for app in self.apps]))
        self.log = Path(test.mktemp())
        haproxy = subprocess.Popen([*self.lb.prefix, "haproxy", "-db", "-f", str(config)],
                                   stdout=self.log.open("wb"), stderr=subprocess.STDOUT)
        test.addCleanup(lambda: (haproxy.terminate(), haproxy.wait(30)))
        waitUntil(lambda: self.client.call(accepts, 5050, self.lb.address), what="HAProxy to listen")

    def clients(self, name: str) -> CountingClients:
        """6 clients on the client host, loading the fleet through HAProxy."""
        return CountingClients(5050, 6, name, host=self.lb.address, namespace=self.client.namespace)

    def waitForLine(self, line: str) -> float:
        """Wait until HAProxy's log says C{line}; when it was seen."""
        waitUntil(lambda: line in self.log.read_text(), seconds=30, what=line)
        return time.monotonic()

    def rows(self) -> dict[Any, int]:
        """How many rows each message has."""
        return dict(self.cluster.query(f'SELECT message, count(*) FROM "{self.table}" GROUP BY message'))

    def rowsBy(self, server: ServerProcess) -> int:
        """How many rows C{server}'s process wrote."""
        return self.cluster.query(f'SELECT count(*) FROM "{self.table}" WHERE pid = {server.process.pid}')[0][0]


class BalancedFleetTests(SynchronousTestCase):
    """The balanced fleet (L{BalancedFleet}) under load: a host cut from the database is taken out by its
    readiness and rejoins by itself; a host partitioned from the balancer, then another killed: the rest carry
    the load."""

    @slow
    def test_cutFromTheDatabaseTakenOutAndRejoins(self) -> None:
        """Under load from 6 clients through HAProxy, app1 is cut from the database: HAProxy marks it DOWN for
        its /readyz 503, and no ERROR storage unavailable comes more than 1 s after; the link healed, HAProxy
        marks it UP by itself and app1 records requests again. No connection is refused or reset, and every
        verified reply has exactly one row."""
        fleet = BalancedFleet(self)
        app1 = fleet.apps[0]
        clients = fleet.clients("db cut")
        try:
            waitUntil(lambda: len(clients.answered) >= 300, what="load through HAProxy")
            app1.cutFrom(fleet.db)
            cutAt = time.monotonic()
            downAt = fleet.waitForLine("primecount1 is DOWN")
            answered = len(clients.answered)
            waitUntil(lambda: len(clients.answered) >= answered + 300, what="load carried by app2 and app3")
            app1.heal()
            healedAt = time.monotonic()
            upAt = fleet.waitForLine("primecount1 is UP")
            before = fleet.rowsBy(fleet.servers[0])
            waitUntil(lambda: fleet.rowsBy(fleet.servers[0]) >= before + 50, what="app1 recording again")
        finally:
            clients.stop()
        for server in fleet.servers:
            self.assertEqual(server.stop(), 0, server.log)
        self.assertEqual((dict(clients.failures), clients.other), ({}, []))
        self.assertIn("Layer7 wrong status, code: 503", fleet.log.read_text())
        lateErrors = [(round(at - downAt, 3), round(took, 3)) for at, took in
                      zip(clients.unavailableAt, clients.unavailableTook) if at > downAt + 1.0]
        self.assertEqual(lateErrors, [], "ERROR storage unavailable after HAProxy took app1 out (seconds after, "
                         f"seconds taken); cut {cutAt - downAt:.3f} s before; app1's log:\n{fleet.servers[0].log}")
        rows = fleet.rows()
        self.assertEqual([m for m in clients.answered if rows.get(m) != 1], [])
        Logger().info("balanced cut figures: out {out:.2f} s after the cut, back in {back:.2f} s after the heal; "
                      "{errors} ERROR storage unavailable of {answered} answered",
                      out=downAt - cutAt, back=upAt - healedAt, errors=len(clients.unavailableAt),
                      answered=len(clients.answered))

    @slow
    def test_partitionedFromTheBalancerAndKilled(self) -> None:
        """Under load from 6 clients through HAProxy: app2 is cut off from the balancer (HAProxy marks it DOWN),
        then app3 is killed (kill -9); app1 alone answers what comes after, no connection is refused, only
        requests in flight at a fault go unanswered, and every verified reply has exactly one row."""
        import signal

        fleet = BalancedFleet(self)
        apps, servers = fleet.apps, fleet.servers
        clients = fleet.clients("balanced")
        try:
            waitUntil(lambda: len(clients.answered) >= 300, what="load through HAProxy")
            apps[1].cutFrom(fleet.lb)
            fleet.waitForLine("primecount2 is DOWN")
            failedAtCut = sum(clients.failures.values())
            servers[2].process.send_signal(signal.SIGKILL)
            fleet.waitForLine("primecount3 is DOWN")
            answered = len(clients.answered)
            waitUntil(lambda: len(clients.answered) >= answered + 300, what="load carried by app1")
            answered = len(clients.answered)
            waitUntil(lambda: len(clients.answered) >= answered + 300, what="more load carried by app1")
        finally:
            clients.stop()
        apps[1].heal()
        for server in servers[:2]:
            self.assertEqual(server.stop(), 0, server.log)
        rows = fleet.rows()
        self.assertEqual([m for m in clients.answered if rows.get(m) != 1], [])
        self.assertEqual(clients.other, [])
        self.assertNotIn("refused", clients.failures)
        # Each client has one request in flight at a time: at most 6 can be caught by each of the two faults (those
        # cut off wait out the client's 10 s timeout; those of the killed host are closed by HAProxy).
        self.assertLessEqual(sum(clients.failures.values()), 12, "more went unanswered than were in flight")
        Logger().info("balanced figures: {answered} answered; unanswered {failures} ({atCut} at the cut), all in "
                      "flight at a fault", answered=len(clients.answered), failures=dict(clients.failures),
                      atCut=failedAtCut)


class FleetScriptTests(SynchronousTestCase):
    """contrib/fleet/fleet.py, the fleet for people: up, a request through HAProxy, a cut from the database seen
    in status, healed, down with nothing left behind."""

    @slow
    def test_upCutHealDown(self) -> None:
        """The script builds a fleet of two primecount hosts and leaves it up; a client host's request through
        HAProxy is answered; cut from the database, app1 turns unready in status, and ready again once healed;
        down stops every process and removes every namespace and the database's files."""
        import json
        import os

        state = Path(self.mktemp())
        prefix = f"pcfs{os.getpid()}"
        script = [sys.executable, str(RELAY.parent / "fleet.py"), "--state", str(state)]

        def fleet(*arguments: str) -> str:
            return subprocess.run([*script, *arguments], capture_output=True, text=True, check=True,
                                  timeout=120).stdout

        FleetNetwork._requirePermitted(self)
        requirePostgres(self)
        fleet("up", "--apps", "2", "--prefix", prefix)
        saved = json.loads((state / "fleet.json").read_text())
        self.addCleanup(lambda: (state / "fleet.json").exists() and fleet("down"))
        lb = saved["hosts"]["lb"]
        ask = ("import socket; s = socket.create_connection(('%s', 5050)); s.sendall(b'hola\\n'); "
               "print(s.recv(100))" % lb)
        self.assertEqual(fleet("run", "client", "--", sys.executable, "-c", ask).strip(), "b'1 no\\n'")
        loaded = json.loads(fleet("run", "client", "--", "primeload", "--host", lb, "--port", "5050", "--conns", "4",
                                  "--requests", "200", "--verify", "--json"))  # as docs/scaling.md runs it
        self.assertEqual((loaded["mismatches"], loaded.get("errors_total", 0)), (0, 0), loaded)
        self.assertIn("/readyz 200", fleet("status", "--state", str(state)))  # --state after the command too
        fleet("cut", "app1", "db")
        fleet("run", "client", "--", sys.executable, "-c", ask)  # app1's next commit meets the cut
        fleet("run", "client", "--", sys.executable, "-c", ask)
        waitUntil(lambda: "app1   198.18.0.4     /readyz 503" in fleet("status"), seconds=20, what="app1 unready")
        fleet("heal", "app1")
        waitUntil(lambda: "app1   198.18.0.4     /readyz 200" in fleet("status"), seconds=20, what="app1 ready")
        fleet("down")
        namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        self.assertNotIn(prefix, namespaces)
        def running(pid: int) -> bool:  # a zombie has ended; its reaper (this machine's init) may be slow
            try:
                return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
            except FileNotFoundError:
                return False

        self.assertEqual([pid for pid in saved["pids"].values() if running(pid)], [])
        self.assertFalse(os.path.exists(saved["postgres"]["folder"]))

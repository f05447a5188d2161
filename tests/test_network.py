"""The fleet on a real network (L{tests.netns}): hosts in network namespaces on a private bridge, faults made
with nftables, PostgreSQL on a host of its own; what a partition from the database costs a host under load."""

from __future__ import annotations

import statistics
import time

from twisted.logger import Logger
from twisted.trial.unittest import SynchronousTestCase

from primecount.tools.serverprocess import ServerProcess
from tests.helpers import slow, waitUntil
from tests.netns import FleetNetwork
from tests.postgres import Cluster, freshTable, requirePostgres
from tests.test_fleet import CountingClients, httpGet


class DatabasePartitionTests(SynchronousTestCase):
    """A host cut off from its database under load: it refuses at once while cut, turns unready, and serves
    again within seconds of the link healing; no verified reply lacks its row."""

    @slow
    def test_cutFromTheDatabaseUnderLoad(self) -> None:
        """6 clients on their own host load a primecount host whose records table is on a third host; the
        link between the primecount host and the database is cut (every packet dropped) for 10 s. While cut,
        the clients get ERROR storage unavailable, the median after at most 0.5 s, and /readyz says 503; no
        connection is refused or reset. Healed, the host answers again within 5 s. Every verified reply has
        exactly one row."""
        network = FleetNetwork(self, ["db", "app", "client"])
        db, app, client = network["db"], network["app"], network["client"]
        cluster = Cluster(requirePostgres(self), prefix=db.prefix, listen=db.address)
        self.addCleanup(cluster.destroy)
        cluster.start()
        table = freshTable(self, cluster)
        server = ServerProcess(cluster.tcpUri, "--records-table", table, "--max-per-ip", "0", "--metrics",
                               f"tcp:5059:interface={app.address}", port=f"tcp:5050:interface={app.address}",
                               prefix=app.prefix)
        self.addCleanup(server.stop)
        clients = CountingClients(5050, 6, "cut", host=app.address, namespace=client.namespace)
        try:
            waitUntil(lambda: len(clients.answered) >= 200, what="load before the cut")
            app.cutFrom(db)
            cutAt = time.monotonic()
            waitUntil(lambda: len(clients.unavailableAt) >= 50, what="refusals during the cut")
            readiness = app.call(httpGet, 5059, "/readyz", app.address)
            time.sleep(max(0.0, cutAt + 10 - time.monotonic()))
            app.heal()
            healedAt = time.monotonic()
            waitUntil(lambda: clients.answeredAt and clients.answeredAt[-1] > healedAt, seconds=15,
                      what="an answer after the link healed")
            recovered = min(at for at in clients.answeredAt if at > healedAt) - healedAt
            answered = len(clients.answered)
            waitUntil(lambda: len(clients.answered) >= answered + 200, what="load after the link healed")
        finally:
            clients.stop()
        self.assertEqual(server.stop(), 0, server.log)
        self.assertEqual(readiness, (503, "not ready: records store unavailable\n"))
        self.assertEqual((dict(clients.failures), clients.other), ({}, []))
        during = [took for at, took in zip(clients.unavailableAt, clients.unavailableTook) if cutAt < at < healedAt]
        rows = {message: count for message, count in cluster.query(
            f'SELECT message, count(*) FROM "{table}" GROUP BY message')}
        self.assertEqual([m for m in clients.answered if rows.get(m) != 1], [])
        Logger().info("partition figures: {refused} refused during a 10 s cut, median {median:.3f} s, max "
                      "{most:.2f} s; answering again {recovered:.2f} s after the link healed; {answered} answered",
                      refused=len(during), median=statistics.median(during), most=max(during),
                      recovered=recovered, answered=len(clients.answered))
        self.assertLessEqual(statistics.median(during), 0.5)
        self.assertLessEqual(recovered, 5.0)

"""contrib/prometheus and contrib/grafana, checked with Debian's Prometheus: the rules pass C{promtool check
rules}, every alert has a C{promtool test rules} case where it fires and one where it stays quiet, and a real
Prometheus scraping a single process and a supervisor under load answers the request rate, the p99, every
recording rule and every query of the dashboard."""

from __future__ import annotations

import json
import re
import subprocess
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from primecount.tools.serverprocess import ServerProcess
from tests.helpers import requireTool, slow, waitUntil
from tests.test_fleet import CountingClients
from tests.test_haproxy import freePort

CONTRIB = Path(__file__).resolve().parents[1] / "contrib"
RULES = CONTRIB / "prometheus" / "primecount.rules.yml"
RULE_TESTS = CONTRIB / "prometheus" / "primecount.rules.test.yml"
DASHBOARD = CONTRIB / "grafana" / "primecount.json"


def alertNames() -> list[str]:
    """The alerts the rules define."""
    return re.findall(r"(?m)^      - alert: (\w+)$", RULES.read_text())


def recordedNames() -> list[str]:
    """The series the recording rules make."""
    return re.findall(r"(?m)^      - record: (\S+)$", RULES.read_text())


def dashboardQueries(rateInterval: str = "1m") -> list[tuple[str, str]]:
    """(panel title, query) of every target of the dashboard, its variables set to the primecount job, every
    instance and C{rateInterval}."""
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [(panel["title"], target["expr"].replace("$job", "primecount").replace("$instance", ".*")
             .replace("$__rate_interval", rateInterval)) for panel in panels for target in panel["targets"]]


class RuleTests(SynchronousTestCase):
    """The rules are valid, and every alert is tested both ways by promtool."""

    def test_checkRules(self) -> None:
        """C{promtool check rules} accepts the rules file."""
        promtool = requireTool(self, "promtool")
        result = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True, text=True)
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        self.assertIn(f"SUCCESS: {len(alertNames()) + len(recordedNames())} rules found", result.stdout)

    def test_ruleUnitTests(self) -> None:
        """C{promtool test rules} passes."""
        promtool = requireTool(self, "promtool")
        result = subprocess.run([promtool, "test", "rules", str(RULE_TESTS)], capture_output=True, text=True,
                                cwd=RULE_TESTS.parent)
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)

    def test_everyAlertFiresAndStaysQuiet(self) -> None:
        """Each alert has a test group of its own with a time where it fires and one where it does not."""
        groups = re.split(r"(?m)^- name: ", RULE_TESTS.read_text())[1:]
        tested = {group.split("\n", 1)[0]: group for group in groups}
        self.assertEqual(sorted(set(alertNames()) - set(tested)), [])
        for alert in alertNames():
            cases = re.split(r"(?m)^  - eval_time: ", tested[alert])[1:]
            self.assertTrue(any("exp_alerts: []" in case for case in cases), f"{alert} is never tested quiet")
            self.assertTrue(any("exp_labels:" in case for case in cases), f"{alert} is never tested firing")

    def test_dashboardIsProvisioningReady(self) -> None:
        """The dashboard has a fixed uid, no database id, a data source variable every panel uses, and a unique
        id and at least one query per panel; no example uses node_exporter's port."""
        dashboard = json.loads(DASHBOARD.read_text())
        self.assertEqual(dashboard["uid"], "primecount")
        self.assertNotIn("id", dashboard)
        self.assertIn("datasource", [variable["name"] for variable in dashboard["templating"]["list"]])
        ids = [panel["id"] for panel in dashboard["panels"]]
        self.assertEqual(len(ids), len(set(ids)))
        for panel in dashboard["panels"]:
            self.assertEqual(panel["datasource"]["uid"], "${datasource}", panel["title"])
            self.assertTrue(panel["targets"], panel["title"])
        for path in [*CONTRIB.rglob("*.yml"), *CONTRIB.rglob("*.cfg"), DASHBOARD, *CONTRIB.parent.glob("docs/*.md")]:
            self.assertNotRegex(path.read_text(), r"\b9100\b", path)


class Prometheus:
    """Debian's Prometheus on a loopback port, scraping C{targets} every second under job "primecount" with the
    shipped rules evaluated every second (instead of every 15 s); stopped after the test."""

    def __init__(self, test: SynchronousTestCase, targets: list[str]) -> None:
        binary = requireTool(test, "prometheus")
        folder = Path(test.mktemp()).resolve()
        folder.mkdir(parents=True)
        (folder / "rules.yml").write_text(RULES.read_text().replace("interval: 15s", "interval: 1s"))
        (folder / "prometheus.yml").write_text(
            "global: {scrape_interval: 1s, evaluation_interval: 1s}\nrule_files: [rules.yml]\n"
            f"scrape_configs:\n  - job_name: primecount\n    static_configs:\n      - targets: {json.dumps(targets)}\n")
        self.port = freePort()
        self.log = folder / "prometheus.log"
        self.process = subprocess.Popen(
            [binary, f"--config.file={folder / 'prometheus.yml'}", f"--storage.tsdb.path={folder / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            stdout=self.log.open("wb"), stderr=subprocess.STDOUT)
        test.addCleanup(self.stop)
        waitUntil(self._ready, seconds=30, what="Prometheus to be ready")

    def _ready(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"prometheus exited: {self.log.read_text()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    def api(self, path: str, **parameters: str) -> Any:
        """The C{data} of a successful answer of the HTTP API at C{path}."""
        query = urllib.parse.urlencode(parameters)
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/api/v1/{path}?{query}", timeout=10) as response:
            answer = json.load(response)
        assert answer["status"] == "success", answer
        return answer["data"]

    def query(self, expression: str) -> list[dict]:
        """The instant vector C{expression} evaluates to now."""
        return self.api("query", query=expression)["result"]

    def stop(self) -> None:
        """Stop it."""
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=30)


class RealPrometheusTests(SynchronousTestCase):
    """A real Prometheus scrapes a single process and a supervisor of two workers while clients load both."""

    @slow
    def test_scrapedUnderLoad(self) -> None:
        """The request rate and the p99 come back for both instances; every rule evaluates without error and
        every recording rule and dashboard query returns data; no alert fires on a healthy fleet."""
        single = ServerProcess(self.mktemp(), "--metrics", "tcp:0:interface=127.0.0.1")
        self.addCleanup(single.stop)
        supervisor = ServerProcess(self.mktemp(), "--workers", "2", "--metrics", "tcp:0:interface=127.0.0.1")
        self.addCleanup(supervisor.stop)
        supervisor.waitForWorkers(2)
        instances = [f"127.0.0.1:{server.metricsPort}" for server in (single, supervisor)]
        clients = [CountingClients(server.port, 3, name) for server, name in ((single, "single"), (supervisor, "sup"))]
        try:
            prometheus = Prometheus(self, instances)
            missing: list[str] = []

            def everythingAnswers() -> bool:
                rates = {r["metric"]["instance"]: float(r["value"][1])
                         for r in prometheus.query("instance:primecount_requests:rate1m")}
                missing[:] = [name for name in recordedNames() if not prometheus.query(name)]
                missing.extend(title for title, expression in dashboardQueries() if not prometheus.query(expression))
                return sorted(rates) == sorted(instances) and min(rates.values()) > 0 and not missing

            try:
                waitUntil(everythingAnswers, seconds=60, what="every rule and dashboard query to answer")
            except AssertionError:
                self.fail(f"no data yet for: {missing}")
            p99 = {r["metric"]["instance"]: float(r["value"][1])
                   for r in prometheus.query("instance:primecount_request_duration_seconds:p99_5m")}
            groups = prometheus.api("rules")["groups"]
            firing = prometheus.query("ALERTS")
        finally:
            for client in clients:
                client.stop()
        self.assertEqual(sorted(p99), sorted(instances))
        self.assertTrue(all(0 < value < 5 for value in p99.values()), p99)
        rules = [rule for group in groups for rule in group["rules"]]
        self.assertEqual(len(rules), len(alertNames()) + len(recordedNames()))
        self.assertEqual([(rule["name"], rule.get("lastError")) for rule in rules if rule["health"] != "ok"], [])
        self.assertEqual(firing, [])
        for client in clients:
            self.assertEqual((dict(client.failures), client.other), ({}, []))

"""End-to-end runs of the real JMeter plan against a real twistd, through the runner.

They skip with a reason where JMeter is not installed, unless
C{PRIMECOUNT_REQUIRE_JMETER=1} (set by CI) turns that into a failure.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from primecount.tools.loadtest.__main__ import main, runOnce
from primecount.tools.loadtest.jmeter import JMeterInstall, JMeterMissing, findJMeter
from primecount.records.formats import parseRecords
from tests.helpers import slow


def requireJMeter(test: SynchronousTestCase) -> JMeterInstall:
    """The installed JMeter; skip (or fail, under C{PRIMECOUNT_REQUIRE_JMETER=1}) when there is none."""
    try:
        return findJMeter()
    except JMeterMissing as error:
        if os.environ.get("PRIMECOUNT_REQUIRE_JMETER") == "1":
            test.fail(f"JMeter is required here (PRIMECOUNT_REQUIRE_JMETER=1): {error}")
        raise SkipTest(f"JMeter is not installed: {error}")


class JMeterPlanTests(SynchronousTestCase):
    """The plan runs headless in the installed JMeter and its results agree with the records."""

    @slow
    def test_planAgainstTwistd(self) -> None:
        """10 threads x 50 loops plus the no-newline group: no errors, one correct record per sample."""
        install = requireJMeter(self)
        out = Path(self.mktemp())
        properties = {"threads": 10, "loops": 50, "rampup": 1, "quiet_threads": 2, "quiet_loops": 5}
        out.mkdir(parents=True)
        with (out / "jmeter-console.txt").open("wb") as console:
            result = runOnce(install, out, properties, startServer=True, jmeterOutput=console.fileno())
        self.assertEqual(result.problems, [], (out / "jmeter-console.txt").read_text(errors="replace"))
        self.assertEqual((result.summary.samples, result.summary.errors), (510, 0))
        self.assertEqual(dict(result.summary.byLabel), {"line": 500, "no newline": 10})
        with (out / "records.txt").open(encoding="utf-8") as file:
            messages = {r.message for r in parseRecords(file)}
        self.assertEqual(len(messages), 510)
        self.assertIn("quiet10q10", messages)
        self.assertIn("abc500a500", messages)
        self.assertTrue(result.passed)
        report = (out / "report.html").read_text(encoding="utf-8")
        self.assertIn("<h2>Summary</h2>", report)
        try:
            import matplotlib  # noqa: F401
        except ImportError:  # without the report extra the page says how to get its charts
            self.assertIn("pip install 'primecount[report]'", report)
        else:
            self.assertIn("<h2>Latency histogram</h2>", report)

    @slow
    def test_keepAliveGroupAgainstKeepAliveServer(self) -> None:
        """C{run --start-server --keep-alive}: 5 users keep one connection each for 100 samples, the quiet
        group still passes, and the server saw 15 connections for 510 requests."""
        requireJMeter(self)
        out = Path(self.mktemp())
        printed = io.StringIO()
        status = main(["run", "--start-server", "--keep-alive", "--server-option=--log-requests", "--threads", "5",
                       "--loops", "100", "--quiet-threads", "2", "--quiet-loops", "5", "--rampup", "0", "--quiet",
                       "--out", str(out)], out=printed)
        self.assertEqual(status, 0, printed.getvalue())
        self.assertIn("samples      510  (kept line 500, no newline 10)", printed.getvalue())
        self.assertIn("records      match", printed.getvalue())
        log = (out / "twistd.log").read_text(encoding="utf-8")
        self.assertEqual(log.count("connection from 127.0.0.1"), 15, log[-2000:])
        with (out / "records.txt").open(encoding="utf-8") as file:
            self.assertIn("kept500k500", {r.message for r in parseRecords(file)})

    @slow
    def test_errorRepliesFailSamples(self) -> None:
        """ERROR replies fail their samples and the runner exits 1: 'abc100a100' and up exceed --max-line 8."""
        requireJMeter(self)
        out = Path(self.mktemp())
        printed = io.StringIO()
        status = main(["run", "--start-server", "--server-option=--max-line=8", "--threads", "2",
                       "--loops", "55", "--rampup", "0", "--quiet", "--out", str(out)], out=printed)
        self.assertNotIn("PROBLEM", printed.getvalue())
        self.assertEqual(status, 1, printed.getvalue())
        self.assertIn("errors       11  (10.00%)", printed.getvalue())
        self.assertIn("x Test failed: text expected to match", printed.getvalue())

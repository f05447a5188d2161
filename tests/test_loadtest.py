"""Unit tests for L{primecount.tools.loadtest}: JTL summary, records cross-check, JMeter discovery, report."""

from __future__ import annotations

import io
import os
import subprocess
import zipfile
from pathlib import Path
from unittest import mock

from twisted.trial.unittest import SynchronousTestCase

from primecount.tools.loadtest import jmeter
from primecount.tools.loadtest.crosscheck import crossCheck, keptMessage, lineMessage, quietMessage
from primecount.tools.loadtest.jtl import Sample, formatSummary, percentile, readSamples, summarise
from primecount.tools.loadtest.report import renderReport
from primecount.records.formats import Record

SAMPLE_JTL = Path(__file__).parent / "data" / "sample.jtl"
ASSERTION_FAILURE = "Test failed: text expected to match /[0-9]+ (sí|no)\\n?/"


class JTLTests(SynchronousTestCase):
    """The checked-in JTL (110 samples from a real run, 11 refused by the assertion) is summarised exactly."""

    def setUp(self) -> None:
        with SAMPLE_JTL.open(encoding="utf-8") as file:
            self.samples = readSamples(file)

    def test_summary(self) -> None:
        """Counts, error messages, duration, throughput and latency percentiles match the file."""
        summary = summarise(self.samples)
        self.assertEqual((summary.samples, summary.errors), (110, 11))
        self.assertEqual(summary.errorMessages, [(ASSERTION_FAILURE, 11)])
        self.assertEqual(summary.byLabel, [("line", 110)])
        self.assertAlmostEqual(summary.durationSeconds, 0.099)
        self.assertAlmostEqual(summary.throughput, 110 / 0.099)
        self.assertEqual(summary.latency, {"min": 0, "p50": 1, "p90": 2, "p99": 11, "max": 12})

    def test_formatted(self) -> None:
        """The printed summary names the samples, the errors with their message, and the latencies."""
        text = formatSummary(summarise(self.samples))
        self.assertIn("samples      110  (line 110)", text)
        self.assertIn(f"     11 x {ASSERTION_FAILURE}", text)
        self.assertIn("latency ms   min 0  p50 1  p90 2  p99 11  max 12", text)

    def test_connectionErrorMessage(self) -> None:
        """A failed sample without an assertion message is described by its response code and message."""
        jtl = ("timeStamp,elapsed,label,responseCode,responseMessage,success,failureMessage\n"
               "1000,5,line,500,java.net.ConnectException: Connection refused,false,\n")
        [sample] = readSamples(io.StringIO(jtl))
        self.assertEqual(sample.failure, "500 java.net.ConnectException: Connection refused")

    def test_empty(self) -> None:
        """A run with no samples has zero throughput and no latencies, and formats without error."""
        summary = summarise([])
        self.assertEqual((summary.samples, summary.throughput), (0, 0.0))
        self.assertIn("samples      0", formatSummary(summary))

    def test_percentile(self) -> None:
        """Nearest-rank percentiles: the median of 1..10 is 5, the 99th is 10."""
        values = list(range(1, 11))
        self.assertEqual((percentile(values, 0.5), percentile(values, 0.99), percentile(values, 0.0)), (5, 10, 1))


def sample(label: str, success: bool = True) -> Sample:
    """A sample with the given label and outcome."""
    return Sample(0, 1, label, success, "" if success else "boom")


def record(message: str, count: int = 2, prime: bool = True) -> Record:
    """A record of C{message}."""
    return Record(1_795_687_200, "127.0.0.1", message, count, prime)


class CrossCheckTests(SynchronousTestCase):
    """The records must hold one correct record per successful sample."""

    def test_match(self) -> None:
        """Three newline samples and one quiet-gap sample, all recorded correctly: no problem."""
        samples = [sample("line")] * 3 + [sample("no newline")]
        records = [record(lineMessage(n)) for n in (1, 2, 3)] + [record(quietMessage(1))]
        self.assertEqual(crossCheck(samples, records), [])

    def test_keptLines(self) -> None:
        """Keep-alive samples are matched with their own messages; one missing is reported by its text."""
        self.assertEqual(crossCheck([sample("kept line")] * 2, [record(keptMessage(n)) for n in (1, 2)]), [])
        problems = crossCheck([sample("kept line")] * 2, [record(keptMessage(2)), record(lineMessage(1))])
        self.assertIn("kept1k1", " ".join(problems))

    def test_missingRecord(self) -> None:
        """A successful sample without a record is reported."""
        problems = crossCheck([sample("line")] * 2, [record(lineMessage(1))])
        self.assertEqual(len(problems), 2)
        self.assertIn("1 records for 2 successful samples", problems[0])
        self.assertIn("abc2a2", problems[1])

    def test_duplicateAndUnknown(self) -> None:
        """A message recorded twice and one never sent are both reported."""
        problems = crossCheck([sample("line")] * 3, [record("abc1a1"), record("abc1a1"), record("zzz")])
        self.assertTrue(any("more than once" in p for p in problems), problems)
        self.assertTrue(any("did not send" in p and "'zzz'" in p for p in problems), problems)

    def test_wrongVerdict(self) -> None:
        """A record whose count or verdict is wrong for its message is reported."""
        problems = crossCheck([sample("line")], [record("abc1a1", count=3, prime=True)])
        self.assertEqual(len(problems), 1)
        self.assertIn("wrong count", problems[0])

    def test_failedSamplesNeedNoRecord(self) -> None:
        """Failed samples have no record; the others still must."""
        samples = [sample("line"), sample("line", success=False)]
        self.assertEqual(crossCheck(samples, [record(lineMessage(2))]), [])


def fakeInstall(root: Path, version: str, debianStyle: bool = False) -> Path:
    """Lay out a minimal JMeter folder whose ApacheJMeter.jar manifest says C{version}; return the jmeter script."""
    home = root / "jmeter-home"
    (home / "bin").mkdir(parents=True)
    with zipfile.ZipFile(home / "bin" / "ApacheJMeter.jar", "w") as jar:
        jar.writestr("META-INF/MANIFEST.MF", f"Manifest-Version: 1.0\nImplementation-Version: {version}\n")
    script = home / "bin" / "jmeter"
    script.write_text("#!/bin/sh\nexec java -jar ApacheJMeter.jar \"$@\"\n")
    script.chmod(0o755)
    if not debianStyle:
        return script
    wrapper = root / "bin" / "jmeter"
    wrapper.parent.mkdir()
    wrapper.write_text(f"#!/bin/sh\nrun_java -Djmeter.home={home} org.apache.jmeter.NewDriver \"$@\"\n")
    wrapper.chmod(0o755)
    return wrapper


class FindJMeterTests(SynchronousTestCase):
    """JMeter is found from JMETER_HOME or PATH, and 2.x alone goes through the launcher."""

    def test_jmeterHome(self) -> None:
        """C{JMETER_HOME} wins, and an upstream 5.6 runs its own script."""
        root = Path(self.mktemp())
        script = fakeInstall(root, "5.6.3")
        install = jmeter.findJMeter({"JMETER_HOME": str(script.parent.parent), "PATH": ""})
        self.assertEqual((install.version, install.major), ("5.6.3", 5))
        self.assertEqual(jmeter.launcherCommand(install, {}), [str(script)])

    def test_debianWrapperOnPath(self) -> None:
        """Debian's C{/usr/bin/jmeter} wrapper names its home in C{-Djmeter.home=}; 2.13 is detected."""
        root = Path(self.mktemp())
        wrapper = fakeInstall(root, "2.13.19691222", debianStyle=True)
        install = jmeter.findJMeter({"PATH": str(wrapper.parent)})
        self.assertEqual(install.home, root / "jmeter-home")
        self.assertEqual(install.major, 2)

    def test_missing(self) -> None:
        """No JMETER_HOME and no jmeter on PATH is L{jmeter.JMeterMissing} saying how to install it."""
        with self.assertRaises(jmeter.JMeterMissing) as caught:
            jmeter.findJMeter({"PATH": self.mktemp()})
        self.assertIn("apt-get install jmeter", str(caught.exception))

    def test_planArguments(self) -> None:
        """The plan runs headless with CSV results, field names, UTF-8 TCP text and the given properties."""
        arguments = jmeter.planArguments(Path("p.jmx"), Path("r.jtl"), Path("j.log"), {"threads": 3})
        self.assertEqual(arguments[:7], ["-n", "-t", "p.jmx", "-l", "r.jtl", "-j", "j.log"])
        for expected in ["-Jthreads=3", "-Jtcp.charset=UTF-8", "-Jjmeter.save.saveservice.output_format=csv",
                         "-Jjmeter.save.saveservice.print_field_names=true"]:
            self.assertIn(expected, arguments)


def fakeJavac(folder: Path, body: str) -> dict[str, str]:
    """An environment whose PATH has only a C{javac} shell script running C{body} (C{$out} is its -d folder,
    every call is logged to C{folder/calls}), and whose cache is under C{folder}."""
    bin = folder / "bin"
    bin.mkdir(parents=True)
    javac = bin / "javac"
    javac.write_text("#!/bin/sh\n"
                     f"echo called >> {folder / 'calls'}\n"
                     'while [ "$1" != "-d" ]; do shift; done; out="$2"\n'
                     f"{body}\n")
    javac.chmod(0o755)
    return {"PATH": str(bin), "XDG_CACHE_HOME": str(folder / "cache")}


class LauncherTests(SynchronousTestCase):
    """JMeter 2.x's launcher is compiled once per source, and runs starting at once never see half of it."""

    def setUp(self) -> None:
        """A fake JMeter 2.13 installation."""
        self.root = Path(self.mktemp())
        script = fakeInstall(self.root, "2.13.19691222")
        self.install = jmeter.findJMeter({"JMETER_HOME": str(script.parent.parent), "PATH": ""})

    def launchers(self, environ: dict[str, str]) -> list[str]:
        """The names in the launcher cache."""
        return sorted(p.name for p in (Path(environ["XDG_CACHE_HOME"]) / "primecount").iterdir())

    def test_compiledOnce(self) -> None:
        """The first run compiles the launcher onto the class path; the next reuses it without javac."""
        environ = fakeJavac(self.root / "ok", 'echo compiled > "$out/PermissiveJMeter.class"')
        first = jmeter.launcherCommand(self.install, environ)
        second = jmeter.launcherCommand(self.install, environ)
        self.assertEqual(first, second)
        self.assertEqual((self.root / "ok" / "calls").read_text().count("called"), 1)
        [name] = self.launchers(environ)
        classes = Path(environ["XDG_CACHE_HOME"]) / "primecount" / name
        self.assertIn(str(classes), first[first.index("-cp") + 1].split(":"))
        self.assertEqual((classes / "PermissiveJMeter.class").read_text(), "compiled\n")

    def test_failedCompileLeavesNothing(self) -> None:
        """A compile that dies after writing half a class leaves no launcher for a later run to load."""
        environ = fakeJavac(self.root / "dies", 'echo half > "$out/PermissiveJMeter.class"; exit 1')
        with self.assertRaises(subprocess.CalledProcessError):
            jmeter.launcherCommand(self.install, environ)
        self.assertEqual(self.launchers(environ), [])

    def test_anotherRunFinishesFirst(self) -> None:
        """When another run puts its complete launcher in place during this run's compile, both use that one."""
        environ = fakeJavac(self.root / "race", 'echo mine > "$out/PermissiveJMeter.class"\n'
                                                'theirs="${out%.building-*}"; mkdir "$theirs"\n'
                                                'echo theirs > "$theirs/PermissiveJMeter.class"')
        command = jmeter.launcherCommand(self.install, environ)
        [name] = self.launchers(environ)
        classes = Path(environ["XDG_CACHE_HOME"]) / "primecount" / name
        self.assertIn(str(classes), command[command.index("-cp") + 1])
        self.assertEqual((classes / "PermissiveJMeter.class").read_text(), "theirs\n")


class FailingJMeterTests(SynchronousTestCase):
    """When JMeter itself fails, C{run --quiet} prints the end of JMeter's console, which says why."""

    def test_consoleEndPrinted(self) -> None:
        """A JMeter that exits 1 after an error: exit status 1, the problem, and the error's words printed."""
        from primecount.tools.loadtest.__main__ import main

        root = Path(self.mktemp())
        script = fakeInstall(root, "5.6.3")
        script.write_text("#!/bin/sh\necho 'Creating summariser'\necho 'An error occurred: no such plan part'\n"
                          "exit 1\n")
        environ = mock.patch.dict(os.environ, JMETER_HOME=str(script.parent.parent))
        environ.start()
        self.addCleanup(environ.stop)
        printed = io.StringIO()
        status = main(["run", "--quiet", "--out", str(root / "out")], out=printed)
        self.assertEqual(status, 1, printed.getvalue())
        self.assertIn("PROBLEM: JMeter exited with status 1", printed.getvalue())
        self.assertIn("JMeter's console ended with", printed.getvalue())
        self.assertIn("  An error occurred: no such plan part\n", printed.getvalue())


class LeftoverTests(SynchronousTestCase):
    """A run into a folder an earlier run used leaves nothing of the earlier run beside its own report."""

    def test_earlierRunsFilesRemoved(self) -> None:
        """An earlier run's records, server log and results are gone after a run without a server; files the
        tool did not write stay."""
        from primecount.tools.loadtest.__main__ import RUN_FILES, main

        root = Path(self.mktemp())
        script = fakeInstall(root, "5.6.3")
        script.write_text("#!/bin/sh\nexit 0\n")
        environ = mock.patch.dict(os.environ, JMETER_HOME=str(script.parent.parent))
        environ.start()
        self.addCleanup(environ.stop)
        out = root / "out"
        out.mkdir()
        for name in [*RUN_FILES, "mine.txt"]:
            (out / name).write_text("from an earlier run\n")
        main(["run", "--quiet", "--out", str(out)], out=io.StringIO())
        self.assertEqual(sorted(path.name for path in out.iterdir()), ["jmeter-console.txt", "mine.txt", "report.html"])
        self.assertNotIn("from an earlier run", (out / "report.html").read_text())


class ReportTests(SynchronousTestCase):
    """The HTML report carries the figures, the errors and, with matplotlib, two charts."""

    def test_report(self) -> None:
        """The report names the errors and embeds two PNG charts (or says how to get them)."""
        with SAMPLE_JTL.open(encoding="utf-8") as file:
            samples = readSamples(file)
        page = renderReport("run", summarise(samples), samples, ["a note"])
        self.assertIn("<td>110</td>", page)
        self.assertIn("Test failed: text expected to match", page)
        self.assertIn("<li>a note</li>", page)
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            self.assertIn("pip install 'primecount[report]'", page)
        else:
            self.assertEqual(page.count('src="data:image/png;base64,'), 5)
            for title in ("Throughput over time", "Latency percentiles over time", "Latency over time",
                          "Latency histogram", "Errors by kind"):
                self.assertIn(f"<h2>{title}</h2>", page)

    def test_intervals(self) -> None:
        """Samples are cut into slices: per-second rates of passed and failed, and latency percentiles."""
        from primecount.tools.loadtest.report import Interval, intervals

        samples = [Sample(1000 + t, elapsed, "line", ok, "" if ok else "x")
                   for t, elapsed, ok in ((0, 1, True), (100, 3, True), (900, 5, False), (1500, 7, True))]
        self.assertEqual(intervals(samples, shortest=1000),
                         [Interval(0.0, 2.0, 1.0, 3, 5, 5), Interval(1.0, 1.0, 0.0, 7, 7, 7)])
        self.assertEqual(len(intervals(samples)), 16, "a short run is cut into tenths of a second")
        self.assertEqual(intervals([]), [])

    def test_errorsByKind(self) -> None:
        """Alike failures group whatever their numbers; assertion failures (ERROR replies) are one kind."""
        from primecount.tools.loadtest.report import errorsByKind

        failures = ["Connection refused (port 5050)", "Connection refused (port 6060)",
                    "Test failed: text expected to match /[0-9]+ (sí|no)\\n?/", "Read timed out after 10000 ms"]
        kinds = errorsByKind([Sample(0, 1, "line", False, f) for f in failures] + [Sample(0, 1, "line", True, "")])
        self.assertEqual(kinds[0], ("Connection refused (port N)", 2))
        self.assertEqual(len(kinds), 3)


class RunScriptTests(SynchronousTestCase):
    """C{jmeter/run} in a clone where primecount is not installed yet says what to do instead of a traceback."""

    def test_freshClone(self) -> None:
        """With a Python that cannot import Twisted, the script exits 2 and says to run C{make test}."""
        import shutil
        import subprocess

        clone = Path(self.mktemp())
        (clone / "jmeter").mkdir(parents=True)
        shutil.copy(Path(__file__).resolve().parents[1] / "jmeter" / "run", clone / "jmeter" / "run")
        bare = clone / ".venv" / "bin" / "python"
        bare.parent.mkdir(parents=True)
        bare.write_text('#!/bin/sh\nexec python3 -S -I "$@"\n')  # no site-packages: nothing installed
        bare.chmod(0o755)
        result = subprocess.run(["sh", str(clone / "jmeter" / "run"), "--threads", "1"], capture_output=True,
                                text=True, timeout=60)
        self.assertEqual(result.returncode, 2, result.stderr)
        self.assertIn("run 'make test'", result.stderr)
        self.assertNotIn("Traceback", result.stderr)

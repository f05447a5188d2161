"""Tests for L{primecount.tools.records}: check, repair, stats, tail and follow on real files."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from primecount.records.formats import CONTROLS, JSONL, TSV, Record
from primecount.tools.records import main
from tests.helpers import FollowingProcess, slow

T0 = 1_795_687_200


def lines(*messages: str, recordFormat=TSV, client: str = "127.0.0.1") -> str:  # type: ignore[no-untyped-def]
    """Record lines for C{messages}, one second apart."""
    return "".join(
        recordFormat.format(Record(T0 + i, client, m, m.count(m[-1]), m.count(m[-1]) in (2, 3, 5, 7)))
        for i, m in enumerate(messages)
    )


class ToolTestCase(SynchronousTestCase):
    """Runs the tool in-process on files written by the test."""

    def write(self, content: str | bytes) -> str:
        """A new file holding C{content}."""
        path = self.mktemp()
        Path(path).write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
        return path

    def tool(self, *argv: str) -> tuple[int, str]:
        """The exit status and output of the tool."""
        out = io.StringIO()
        return main(list(argv), out), out.getvalue()


class CheckTests(ToolTestCase):
    """C{check} tells a good file, a torn last line and damage inside apart."""

    def test_databaseIsBadUsage(self) -> None:
        """C{check} and C{repair} of a database URI say in one line that they work on files, exit 2 (bad
        usage), and touch no database; run as a user would, without a traceback."""
        for command in ("check", "repair"):
            result = subprocess.run([sys.executable, "-m", "primecount.records", command,
                                     "postgresql://nobody@127.0.0.1:1/nothing"], capture_output=True, text=True)
            self.assertEqual(result.returncode, 2, result.stderr)
            self.assertEqual(result.stderr, f"primecount-records: {command} works on records files, not on a "
                             "database (a table has no torn lines to find); stats, tail and follow read a table\n")

    def test_good(self) -> None:
        """A well-formed file exits 0, in either format."""
        for recordFormat in (TSV, JSONL):
            status, output = self.tool("check", self.write(lines("abc2a", "añoñ", recordFormat=recordFormat)))
            self.assertEqual(status, 0, output)
            self.assertIn("2 records, 0 malformed lines, no torn last line", output)

    def test_tornLastLine(self) -> None:
        """A last line cut short is reported with its byte offset and exit status 3."""
        good = lines("abc2a", "añoñ")
        status, output = self.tool("check", self.write(good + "2026-11-26 10:00:02\t127.0"))
        self.assertEqual(status, 3)
        self.assertIn(f"torn last line 3 at byte offset {len(good.encode())}", output)

    def test_tornMultiByte(self) -> None:
        """A cut inside a multi-byte character (invalid UTF-8) is still a torn last line."""
        good = lines("abc2a").encode()
        status, output = self.tool("check", self.write(good + "2026-11-26 10:00:02\t1\tñ".encode()[:-1]))
        self.assertEqual(status, 3, output)

    def test_malformedInside(self) -> None:
        """A bad line before the end exits 4 and names the line."""
        status, output = self.tool("check", self.write(lines("abc2a") + "garbage\n" + lines("zz")))
        self.assertEqual(status, 4)
        self.assertIn("line 2 (byte", output)

    def test_missingFile(self) -> None:
        """An unreadable file exits 1."""
        self.assertEqual(self.tool("check", self.mktemp())[0], 1)


class RepairTests(ToolTestCase):
    """C{repair} removes only a torn last line and keeps a backup."""

    def test_repairTorn(self) -> None:
        """The torn tail is cut off, the original kept in FILE.bak, and the file then checks clean."""
        good = lines("abc2a", "añoñ")
        path = self.write(good + "2026-11-26 10:00:02\tip\tpart")
        status, output = self.tool("repair", path)
        self.assertEqual(status, 0, output)
        self.assertEqual(Path(path).read_text(encoding="utf-8"), good)
        self.assertTrue(Path(path + ".bak").read_text(encoding="utf-8").endswith("part"))
        self.assertEqual(self.tool("check", path)[0], 0)

    def test_refusesInsideDamage(self) -> None:
        """A file damaged before its last line is left alone, exit 4."""
        content = lines("abc2a") + "garbage\n" + lines("zz") + "torn"
        path = self.write(content)
        self.assertEqual(self.tool("repair", path)[0], 4)
        self.assertEqual(Path(path).read_text(encoding="utf-8"), content)

    def test_completeBadLastLineIsNotTorn(self) -> None:
        """A whole, newline-terminated last line that is not a record is malformed, not torn: refused, exit 4."""
        content = lines("abc2a") + "2026-11-26 10:00:02\t127.0.0.1\tthree fields\n"
        path = self.write(content)
        status, output = self.tool("repair", path)
        self.assertEqual(status, 4, output)
        self.assertIn(f"{path}: 1 malformed line (line 2, the last line, which ends in a newline: a whole line, not "
                      "one a write cut short); not repairing", output)
        self.assertEqual(Path(path).read_text(encoding="utf-8"), content)
        self.assertEqual(self.tool("check", path)[0], 4)

    def test_nothingToDo(self) -> None:
        """A clean file is not touched and no backup is made."""
        path = self.write(lines("abc2a"))
        self.assertEqual(self.tool("repair", path)[0], 0)
        self.assertFalse(os.path.exists(path + ".bak"))


class StatsAndTailTests(ToolTestCase):
    """C{stats} sums up; C{tail} prints the last whole records."""

    def test_stats(self) -> None:
        """Totals, share of sí, clients and per-minute counts."""
        path = self.write(lines("aa", "ab", "aaa", client="10.0.0.1") + lines("x", client="::1"))
        status, output = self.tool("stats", path)
        self.assertEqual(status, 0)
        self.assertIn("records      4\n", output)
        self.assertIn("sí           2 (50.0%)\n", output)
        self.assertIn("           3  10.0.0.1\n", output)
        self.assertIn("           1  ::1\n", output)
        self.assertRegex(output, r"per minute\n  \d{4}-\d\d-\d\d \d\d:\d\d  4\n")

    def test_severalFiles(self) -> None:
        """stats sums several files (workers, hosts, rotated files); check reports each and exits with the worst."""
        one = self.write(lines("aa", "ab", client="10.0.0.1"))
        two = self.write(lines("x", client="10.0.0.2") + "2026-11-26 10:00:00\t127.0.0.1\tthr")
        status, output = self.tool("stats", one, two)
        self.assertEqual(status, 0)
        self.assertIn("records      3\n", output)
        self.assertIn("clients      2\n", output)
        self.assertIn("(skipped 1 lines that are not records)", output)
        status, output = self.tool("check", one, two)
        self.assertEqual(status, 3)
        self.assertIn(f"{one}: 2 records, 0 malformed lines, no torn last line", output)
        self.assertIn(f"{two}: torn last line 2", output)

    def test_sinceUntil(self) -> None:
        """--since keeps records at or after a time, --until those before it; both take local time or seconds."""
        import time

        path = self.write(lines("a", "b", "c", "d"))  # at T0, T0+1, T0+2, T0+3
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(T0 + 1))
        status, output = self.tool("stats", "--since", since, "--until", str(T0 + 3), path)
        self.assertEqual(status, 0)
        self.assertIn("records      2\n", output)
        with self.assertRaises(SystemExit):
            self.tool("stats", "--since", "yesterday", path)

    def test_closedPipeIsQuiet(self) -> None:
        """`stats FILE | head -1` ends quietly with status 0, not a broken-pipe error."""
        path = self.write(lines(*[f"m{i}" for i in range(3000)], client="10.0.0.1")
                          + lines(*[f"n{i}" for i in range(3000)], client="10.0.0.2"))
        result = subprocess.run(f"{sys.executable} -m primecount.records stats --top 5000 {path} | head -1",
                                shell=True, capture_output=True, text=True, executable="/bin/bash",
                                env={**os.environ, "PYTHONWARNINGS": "error"})
        self.assertEqual(result.stdout, "records      6000\n")
        self.assertEqual(result.stderr, "")
        piped = subprocess.run(
            ["bash", "-o", "pipefail", "-c", f"{sys.executable} -m primecount.records tail -n 5000 {path} | head -1"],
            capture_output=True, text=True)
        self.assertEqual((piped.returncode, piped.stderr), (0, ""))

    @slow
    def test_statsStreamsAMillionRecords(self) -> None:
        """stats over a million records peaks within a few tens of MB of stats over a thousand (loading them all
        would take hundreds): it streams, whatever the interpreter's own footprint."""
        block = lines(*[f"message number {i} with some text" for i in range(1000)], client="10.0.0.1")
        small, large = self.mktemp(), self.mktemp()
        Path(small).write_text(block, encoding="utf-8")
        with open(large, "w", encoding="utf-8") as file:
            for _ in range(1000):
                file.write(block)
        # VmHWM, this process image's peak: getrusage's ru_maxrss would carry the forking test runner's over exec.
        probe = ("import re, sys; from primecount.tools.records import main; status = main(sys.argv[1:]); "
                 "sys.stderr.write(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1)); "
                 "sys.exit(status)")
        peaks = []
        for path, count in ((small, 1000), (large, 1000000)):
            result = subprocess.run([sys.executable, "-c", probe, "stats", path], capture_output=True, text=True)
            self.assertEqual(result.returncode, 0, result.stderr)
            self.assertIn(f"records      {count}\n", result.stdout)
            peaks.append(int(result.stderr))
        self.assertLess(peaks[1] - peaks[0], 40_000, f"peak resident KiB {peaks}")

    def test_tail(self) -> None:
        """The last N whole records are printed; a torn tail is not."""
        path = self.write(lines(*[f"m{i}" for i in range(100)]) + "torn")
        status, output = self.tool("tail", "-n", "2", path)
        self.assertEqual(status, 0)
        self.assertEqual([line.split("\t")[2] for line in output.splitlines()], ["m98", "m99"])

    def test_neverPrintsRawControls(self) -> None:
        """Lines of an old file holding raw ESC, NUL, C1 and U+2028 are printed in the escaped notation, by
        tail and stats alike."""
        raw = "2026-11-26 10:00:00\t127.0.0.1\tbad\x1b]0;owned\x07\x00\x9b\u2028\t1\tno\n"
        path = self.write(lines("ok") + raw)
        status, output = self.tool("tail", "-n", "2", path)
        self.assertEqual(status, 0)
        self.assertIsNone(re.search(f"[{CONTROLS}]", output), output)
        self.assertIn("bad\\x1b]0;owned\\x07\\x00\\x9b\\u2028", output)

    def test_tailLongerThanFile(self) -> None:
        """Asking for more records than there are prints them all."""
        status, output = self.tool("tail", "-n", "50", self.write(lines("a", "b")))
        self.assertEqual(len(output.splitlines()), 2)


class FollowTests(FollowingProcess, SynchronousTestCase):
    """C{follow} prints appended records and carries on across a rotation."""

    def test_followAcrossRotation(self) -> None:
        """Records appended before and after a rename + new file are all printed, once; Ctrl-C exits 0."""
        path = Path(self.mktemp())
        path.write_text(lines("old"), encoding="utf-8")
        process = self.follow(path)
        try:
            self.assertEqual(self.nextMessage(process), "old")
            with path.open("a", encoding="utf-8") as file:
                file.write(lines("first"))
            self.assertEqual(self.nextMessage(process), "first")
            os.rename(path, str(path) + ".1")
            with open(str(path) + ".1", "a", encoding="utf-8") as file:
                file.write(lines("late in rotated file"))
            path.write_text(lines("second"), encoding="utf-8")
            self.assertEqual(self.nextMessage(process), "late in rotated file")
            self.assertEqual(self.nextMessage(process), "second")
        finally:
            self.interrupt(process)
        self.assertEqual(process.returncode, 0)
        self.assertTrue(self.printed.empty(), "nothing printed twice")

    def test_missingFileIsWaitedForAndSaidSo(self) -> None:
        """On a path that does not exist yet, C{follow} says so once on stderr, then prints the file's records
        once it appears."""
        path = Path(self.mktemp())
        process = self.follow(path)
        try:
            self.assertIn("does not exist (yet); waiting", process.stderr.readline())
            path.write_text(lines("appeared"), encoding="utf-8")
            self.assertEqual(self.nextMessage(process), "appeared")
        finally:
            self.interrupt(process)
        self.assertEqual(process.returncode, 0)
        self.assertEqual(process.stderr.read(), "", "said once")

    def test_fileThatAppearsIsReadFromItsStart(self) -> None:
        """Following from the end a path that does not exist yet: the records the file holds when it appears
        are printed, none skipped, then those appended."""
        path = Path(self.mktemp())
        process = self.startFollowing(str(path))
        try:
            self.assertIn("does not exist (yet); waiting", process.stderr.readline())
            path.write_text(lines("first") + lines("second"), encoding="utf-8")
            self.assertEqual([self.nextMessage(process), self.nextMessage(process)], ["first", "second"])
            with path.open("a", encoding="utf-8") as file:
                file.write(lines("third"))
            self.assertEqual(self.nextMessage(process), "third")
        finally:
            self.interrupt(process)
        self.assertTrue(self.printed.empty(), "nothing printed twice")

    def follow(self, path: Path) -> subprocess.Popen:
        """C{primecount-records follow --from-start path} running, its stdout lines gathered."""
        return self.startFollowing("--from-start", str(path))

"""Tests for L{primecount.records}: one line per record in either format, parsed back losslessly."""

import json
import os
import re
import time

from hypothesis import given, strategies as st
from twisted.trial.unittest import SynchronousTestCase

from primecount.records.formats import (
    CONTROLS,
    JSONL,
    TSV,
    MalformedRecord,
    Record,
    escapeField,
    formatISOTime,
    formatJSONL,
    formatTimestamp,
    formatTSV,
    parseRecord,
    parseRecords,
    parseTimestamp,
    unescapeField,
)
from tests.helpers import requireModule

SECONDS = int(time.mktime((2026, 2, 17, 10, 11, 12, 0, 0, -1)))
STAMP = "2026-02-17 10:11:12"
# Instants from 2001 to 2033, whole seconds, as the server writes them.
instants = st.integers(min_value=978_307_200, max_value=2_000_000_000)


class TSVTests(SynchronousTestCase):
    """The default format: the original columns, tab-separated, local time."""

    def test_format(self) -> None:
        """A record is timestamp, IP, message, count and verdict on one line."""
        self.assertEqual(
            formatTSV(Record(SECONDS, "127.0.0.1", "abc2a", 2, True)),
            f"{STAMP}\t127.0.0.1\tabc2a\t2\tsí\n",
        )

    def test_escaping(self) -> None:
        """Backslash, TAB, CR and LF in a message are escaped, so the record stays one line."""
        line = formatTSV(Record(SECONDS, "::1", "a\\b\tc\rd\ne", 1, False))
        self.assertEqual(line, f"{STAMP}\t::1\ta\\\\b\\tc\\rd\\ne\t1\tno\n")
        self.assertEqual((line.count("\n"), line.count("\t")), (1, 4))

    def test_timestamp(self) -> None:
        """Timestamps are local time to the second, and parse back to the same instant."""
        self.assertEqual(formatTimestamp(SECONDS), STAMP)
        self.assertEqual(parseTimestamp(STAMP), SECONDS)

    def test_parse(self) -> None:
        """A formatted line parses back to the same record."""
        record = Record(SECONDS, "10.0.0.1", "ñandú ú", 2, True)
        self.assertEqual(parseRecord(formatTSV(record)), record)

    def test_malformed(self) -> None:
        """Wrong field counts, timestamps, counts, verdicts and escapes are refused."""
        for line in [
            f"{STAMP}\tip\tmsg\t2\n",
            "yesterday\tip\tmsg\t2\tsí\n",
            "2026-13-45 10:11:12\tip\tmsg\t2\tsí\n",
            f"{STAMP}\tip\tmsg\ttwo\tsí\n",
            f"{STAMP}\tip\tmsg\t2\tyes\n",
            f"{STAMP}\tip\tbad\\qescape\t2\tsí\n",
            f"{STAMP}\tip\tdangling\\\t2\tsí\n",
            f"{STAMP}\tip\tmsg\t٣\tsí\n",
        ]:
            self.assertRaises(MalformedRecord, parseRecord, line)

    def test_parseRecordsNamesLine(self) -> None:
        """A bad line in a file is reported with its line number."""
        lines = [formatTSV(Record(SECONDS, "ip", "ok", 1, False)), "torn\tline"]
        with self.assertRaises(MalformedRecord) as caught:
            list(parseRecords(lines))
        self.assertIn("line 2", str(caught.exception))

    @given(st.text())
    def test_escapeRoundTrip(self, text: str) -> None:
        """Any text survives escaping and unescaping, and its escaped form has no control character at all."""
        escaped = escapeField(text)
        self.assertEqual(unescapeField(escaped), text)
        self.assertIsNone(re.search(f"[\t\r\n{CONTROLS}]", escaped), escaped)
        self.assertEqual(len(f"x{escaped}y".splitlines()), 1)

    def test_controlCharacters(self) -> None:
        """ESC, BEL, NUL, DEL, C1 codes (NEL among them) and U+2028/U+2029 are written in the records' own
        notation, so a record can be printed, grepped and split into lines safely."""
        line = formatTSV(Record(SECONDS, "::1", "\x1b[2J\x07\x00\x7f\x9b\x85\u2028\u2029", 1, False))
        self.assertEqual(line, f"{STAMP}\t::1\t\\x1b[2J\\x07\\x00\\x7f\\x9b\\x85\\u2028\\u2029\t1\tno\n")

    def test_escapesOnlyForControls(self) -> None:
        """A code escape of a character that is never escaped is refused: the notation stays canonical."""
        for escaped in ("\\x41", "\\u00e9", "\\xZZ", "\\x1"):
            self.assertRaises(MalformedRecord, unescapeField, escaped)


class JSONLTests(SynchronousTestCase):
    """The JSON lines format: the same fields plus an ISO 8601 time with offset."""

    @given(st.text())
    def test_controlsEscapedAndLossless(self, message: str) -> None:
        """Any message gives valid JSON with no raw control character, and parses back to itself."""
        record = Record(SECONDS, "::1", message, 1, False)
        line = formatJSONL(record)
        self.assertIsNone(re.search(f"[{CONTROLS}]", line[:-1]), line)
        self.assertEqual(json.loads(line)["message"], message)
        self.assertEqual(parseRecord(line), record)

    def test_format(self) -> None:
        """A record is one JSON object with the local timestamp, the ISO time and the fields."""
        line = formatJSONL(Record(SECONDS, "::1", "añoñ", 2, True))
        self.assertTrue(line.endswith("}\n"))
        self.assertEqual(line.count("\n"), 1)
        self.assertIn('"message": "añoñ"', line)  # UTF-8, not \\u escapes
        self.assertEqual(
            json.loads(line),
            {"timestamp": STAMP, "time": formatISOTime(SECONDS), "client": "::1",
             "message": "añoñ", "count": 2, "verdict": "sí"},
        )
        self.assertRegex(json.loads(line)["time"], r"^2026-02-17T10:11:12[+-]\d\d:\d\d$")

    def test_malformed(self) -> None:
        """Broken JSON, missing fields, wrong types and verdicts are refused."""
        good = json.loads(formatJSONL(Record(SECONDS, "ip", "m", 1, False)))
        for broken in ['{"time": ', json.dumps({**good, "count": "1"}), json.dumps({**good, "verdict": "yes"}),
                       json.dumps({k: v for k, v in good.items() if k != "client"}),
                       json.dumps({**good, "time": "noon"}), json.dumps({**good, "count": True})]:
            self.assertRaises(MalformedRecord, parseRecord, broken)


class RoundTripTests(SynchronousTestCase):
    """Every record survives both formats unchanged, always as exactly one line."""

    @given(instants, st.text(), st.text(min_size=1), st.integers(min_value=0, max_value=10**9), st.booleans())
    def test_roundTrip(self, seconds: int, client: str, message: str, count: int, prime: bool) -> None:
        """Any record formats to one line in each format and parses back equal."""
        record = Record(seconds, client, message, count, prime)
        for recordFormat in (TSV, JSONL):
            line = recordFormat.format(record)
            self.assertEqual(line.count("\n"), 1)
            self.assertTrue(line.endswith("\n"))
            # A repeated local hour at a DST change names two instants; the text must still agree.
            parsed = recordFormat.parse(line)
            self.assertEqual(parsed._replace(seconds=record.seconds), record)
            self.assertEqual(recordFormat.format(parsed), line)


class ModuleTests(SynchronousTestCase):
    """The format does not know its tool, and C{python -m primecount.records} still runs the tool."""

    def test_formatImportsNoTool(self) -> None:
        """Importing L{primecount.records} loads nothing of L{primecount.tools}."""
        import subprocess
        import sys

        probe = "import sys, primecount.records; print(sorted(m for m in sys.modules if m.startswith('primecount.tools')))"
        result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
        self.assertEqual(result.stdout, "[]\n")

    def test_runAsModule(self) -> None:
        """C{python -m primecount.records check FILE} is the records tool."""
        import subprocess
        import sys

        path = self.mktemp()
        with open(path, "w", encoding="utf-8") as file:
            file.write(formatTSV(Record(SECONDS, "127.0.0.1", "abc2a", 2, True)))
        result = subprocess.run([sys.executable, "-m", "primecount.records", "check", path], capture_output=True,
                                text=True)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn(": 1 record, 0 malformed lines", result.stdout)


# Messages that trip readers of tab- or comma-separated text: quotes anywhere (at a field's start a CSV reader
# starts a quoted field running across records), words that are NULL or NA somewhere, a lone backslash-N,
# commas, a leading hash, and the escaped characters themselves.
AWKWARD = ['"', '"quoted"', 'say "hi"', 'a"b', '""', "'single'", "NULL", "NA", "\\N", "nan", "a,b", "#comment",
           "tab\there", "new\nline", "\\", "ñandú 日本", "x" * 300, "=cmd()", '"\t"', 'ends with "']


class CommonReadersTests(SynchronousTestCase):
    """A records file reads the same in L{parseRecords}, a plain TAB split, Python's C{csv} module, pandas, and
    PostgreSQL's and DuckDB's CSV import: one row per record, five fields, the message field as written, whatever
    the messages (a message beginning with a quote turned CSV readers' fields into one across records)."""

    def setUp(self) -> None:
        self.path = self.mktemp()
        self.records = [Record(1_771_322_400 + n, "192.0.2.7" if n % 2 else "", message, n + 1, n % 2 == 0)
                        for n, message in enumerate(AWKWARD * 3)]
        with open(self.path, "w", encoding="utf-8", newline="\n") as file:
            file.writelines(formatTSV(record) for record in self.records)
        with open(self.path, encoding="utf-8", newline="\n") as file:
            self.fields = [line.rstrip("\n").split("\t") for line in file]

    def test_plainSplitAndParser(self) -> None:
        """Every line splits into five fields; parseRecords gives back every record, messages unescaped."""
        self.assertEqual({len(fields) for fields in self.fields}, {5})
        self.assertEqual(len(self.fields), len(self.records))
        with open(self.path, encoding="utf-8", newline="\n") as file:
            self.assertEqual(list(parseRecords(file)), self.records)
        self.assertEqual([unescapeField(fields[2]) for fields in self.fields], [r.message for r in self.records])

    def test_pythonCsv(self) -> None:
        """Python's csv module, with the excel-tab dialect (quoting on, as by default), reads the same fields."""
        import csv

        with open(self.path, encoding="utf-8", newline="") as file:
            self.assertEqual(list(csv.reader(file, dialect="excel-tab")), self.fields)

    def test_pandas(self) -> None:
        """pandas' read_csv with sep TAB (its default quoting) reads the same rows and fields, as text."""
        pandas = requireModule(self, "pandas")
        frame = pandas.read_csv(self.path, sep="\t", header=None, dtype=str, keep_default_na=False)
        self.assertEqual(frame.values.tolist(), self.fields)

    def test_duckdb(self) -> None:
        """DuckDB's read_csv with a TAB delimiter, no header and its usual quote character reads the same rows and
        fields, as text. (Left to guess the quote character too, its sniffer may take a message written
        'like this' for quoting: docs/records.md gives the dialect.)"""
        duckdb = requireModule(self, "duckdb")
        rows = duckdb.sql(f"SELECT * FROM read_csv('{self.path}', delim='\\t', quote='\"', header=false, "
                          "all_varchar=true, strict_mode=true)").fetchall()
        self.assertEqual([[field or "" for field in row] for row in rows], self.fields)

    def test_postgresqlCopyCsv(self) -> None:
        """PostgreSQL's COPY … (FORMAT csv, DELIMITER TAB) into a table of text columns reads the same rows and
        fields (an empty client field, a UNIX-socket peer's, as NULL)."""
        from tests.postgres import freshTable, sharedCluster

        cluster = sharedCluster(self)
        table = freshTable(self, cluster)
        cluster.query(f'CREATE TABLE "{table}" (n serial, time text, client text, message text, count text, '
                      "verdict text)")
        from primecount.records.table import driver

        with driver().connect(cluster.uri, autocommit=True) as connection, open(self.path, "rb") as file:
            with connection.cursor().copy(f'COPY "{table}" (time, client, message, count, verdict) FROM STDIN '
                                          "WITH (FORMAT csv, DELIMITER E'\\t')") as copy:
                copy.write(file.read())
        rows = cluster.query(f'SELECT time, client, message, count, verdict FROM "{table}" ORDER BY n')
        self.assertEqual([[field or "" for field in row] for row in rows], self.fields)


class ServedRecordsReadersTests(CommonReadersTests):
    """The same readers on the records file a real twistd wrote for those messages (each sent as a request)."""

    def setUp(self) -> None:
        from primecount.tools.serverprocess import ServerProcess
        from tests.helpers import ask, expectedReply

        self.path = os.path.abspath(self.mktemp())
        server = ServerProcess(self.path)
        self.addCleanup(server.stop)
        sent = [message for message in AWKWARD if "\n" not in message]
        for message in sent:
            self.assertEqual(ask(server.port, message.encode() + b"\n"), expectedReply(message))
        self.assertEqual(server.stop(), 0)
        with open(self.path, encoding="utf-8", newline="\n") as file:
            self.records = list(parseRecords(file))
        self.assertEqual([record.message for record in self.records], [message.strip() for message in sent])
        with open(self.path, encoding="utf-8", newline="\n") as file:
            self.fields = [line.rstrip("\n").split("\t") for line in file]

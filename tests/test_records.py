"""Tests for L{primecount.records}: one line per record, parsed back losslessly."""

from hypothesis import given, strategies as st
from twisted.trial.unittest import SynchronousTestCase

from primecount.records import (
    MalformedRecord,
    Record,
    escapeField,
    formatRecord,
    formatTimestamp,
    parseRecord,
    parseRecords,
    unescapeField,
)

STAMP = "2026-02-17 10:11:12"


class FormatTests(SynchronousTestCase):
    """Records are the seed's columns, tab-separated."""

    def test_format(self) -> None:
        """A record is timestamp, IP, message, count and verdict on one line."""
        self.assertEqual(
            formatRecord(Record(STAMP, "127.0.0.1", "abc2a", 2, True)),
            f"{STAMP}\t127.0.0.1\tabc2a\t2\tsí\n",
        )

    def test_escaping(self) -> None:
        """Backslash, TAB, CR and LF in a message are escaped, so the record stays one line."""
        line = formatRecord(Record(STAMP, "::1", "a\\b\tc\rd\ne", 1, False))
        self.assertEqual(line, f"{STAMP}\t::1\ta\\\\b\\tc\\rd\\ne\t1\tno\n")
        self.assertEqual(line.count("\n"), 1)
        self.assertEqual(line.count("\t"), 4)

    def test_timestamp(self) -> None:
        """Timestamps are local time to the second."""
        self.assertRegex(formatTimestamp(0), r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d$")


class ParseTests(SynchronousTestCase):
    """L{parseRecord} inverts L{formatRecord} and refuses anything else."""

    def test_parse(self) -> None:
        """A formatted line parses back to the same record."""
        record = Record(STAMP, "10.0.0.1", "ñandú ú", 2, True)
        self.assertEqual(parseRecord(formatRecord(record)), record)

    def test_malformed(self) -> None:
        """Wrong field counts, timestamps, counts, verdicts and escapes are refused."""
        for line in [
            f"{STAMP}\tip\tmsg\t2\n",
            f"yesterday\tip\tmsg\t2\tsí\n",
            f"{STAMP}\tip\tmsg\ttwo\tsí\n",
            f"{STAMP}\tip\tmsg\t2\tyes\n",
            f"{STAMP}\tip\tbad\\qescape\t2\tsí\n",
            f"{STAMP}\tip\tdangling\\\t2\tsí\n",
            f"{STAMP}\tip\tmsg\t٣\tsí\n",
        ]:
            self.assertRaises(MalformedRecord, parseRecord, line)

    def test_parseRecordsNamesLine(self) -> None:
        """A bad line in a file is reported with its line number."""
        lines = [formatRecord(Record(STAMP, "ip", "ok", 1, False)), "torn\tline"]
        with self.assertRaises(MalformedRecord) as caught:
            list(parseRecords(lines))
        self.assertIn("line 2", str(caught.exception))

    @given(st.text())
    def test_escapeRoundTrip(self, text: str) -> None:
        """Any text survives escaping and unescaping, and its escaped form has no TAB, CR or LF."""
        escaped = escapeField(text)
        self.assertEqual(unescapeField(escaped), text)
        self.assertFalse(set(escaped) & {"\t", "\r", "\n"})

    @given(st.text(min_size=1), st.integers(min_value=0, max_value=10**9), st.booleans())
    def test_recordRoundTrip(self, message: str, count: int, prime: bool) -> None:
        """Any record formats to exactly one line and parses back unchanged."""
        record = Record(STAMP, "2001:db8::1", message, count, prime)
        line = formatRecord(record)
        self.assertEqual(line.count("\n"), 1)
        self.assertTrue(line.endswith("\n"))
        self.assertEqual(parseRecord(line), record)

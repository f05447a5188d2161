"""The records file format: one tab-separated line per answered request, formatted and parsed back losslessly.

A line is C{YYYY-MM-DD HH:MM:SS<TAB>client-ip<TAB>message<TAB>count<TAB>sí|no<LF>}
(local time). In the message, C{\\} is written C{\\\\}, TAB C{\\t}, CR C{\\r} and
LF C{\\n}, so a record is always exactly one line.
"""

from __future__ import annotations

import re
import time
from typing import Iterable, Iterator, NamedTuple

TIMESTAMP_FORMAT = "%Y-%m-%d %H:%M:%S"
_TIMESTAMP_PATTERN = re.compile(r"\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}")
_ESCAPES = {"\\": "\\\\", "\t": "\\t", "\r": "\\r", "\n": "\\n"}
_UNESCAPES = {escaped: plain for plain, escaped in _ESCAPES.items()}
_ESCAPE_PATTERN = re.compile(r"[\\\t\r\n]")
_UNESCAPE_PATTERN = re.compile(r"\\.?", re.DOTALL)
_VERDICTS = {"sí": True, "no": False}


class Record(NamedTuple):
    """One answered request as stored: local timestamp text, client address, message, count, primality."""

    timestamp: str
    client: str
    message: str
    count: int
    isPrime: bool


class MalformedRecord(ValueError):
    """A line of a records file that is not a well-formed record."""


def formatTimestamp(seconds: float) -> str:
    """Format POSIX C{seconds} as the records' local C{YYYY-MM-DD HH:MM:SS}."""
    return time.strftime(TIMESTAMP_FORMAT, time.localtime(seconds))


def escapeField(text: str) -> str:
    """Escape backslash, TAB, CR and LF so C{text} fits in one tab-separated field."""
    if _ESCAPE_PATTERN.search(text) is None:
        return text
    return _ESCAPE_PATTERN.sub(lambda match: _ESCAPES[match.group()], text)


def unescapeField(text: str) -> str:
    """Undo L{escapeField}; raise L{MalformedRecord} on an unknown or dangling escape."""
    if "\\" not in text:
        return text

    def unescape(match: re.Match[str]) -> str:
        try:
            return _UNESCAPES[match.group()]
        except KeyError:
            raise MalformedRecord(f"bad escape {match.group()!r}") from None

    return _UNESCAPE_PATTERN.sub(unescape, text)


def formatRecord(record: Record) -> str:
    """Format C{record} as one line of the records file, newline included."""
    verdict = "sí" if record.isPrime else "no"
    return (
        f"{record.timestamp}\t{escapeField(record.client)}\t"
        f"{escapeField(record.message)}\t{record.count}\t{verdict}\n"
    )


def parseRecord(line: str) -> Record:
    """Parse one line (with or without its newline) back into a L{Record}, or raise L{MalformedRecord}."""
    if line.endswith("\n"):
        line = line[:-1]
    fields = line.split("\t")
    if len(fields) != 5:
        raise MalformedRecord(f"expected 5 tab-separated fields, found {len(fields)}")
    timestamp, client, message, count, verdict = fields
    if not _TIMESTAMP_PATTERN.fullmatch(timestamp):
        raise MalformedRecord(f"bad timestamp {timestamp!r}")
    if not count.isascii() or not count.isdigit():
        raise MalformedRecord(f"bad count {count!r}")
    if verdict not in _VERDICTS:
        raise MalformedRecord(f"bad verdict {verdict!r}")
    return Record(
        timestamp, unescapeField(client), unescapeField(message), int(count), _VERDICTS[verdict]
    )


def parseRecords(lines: Iterable[str]) -> Iterator[Record]:
    """Parse every line of a records file, e.g. C{parseRecords(open(path, encoding="utf-8"))}."""
    for number, line in enumerate(lines, 1):
        try:
            yield parseRecord(line)
        except MalformedRecord as error:
            raise MalformedRecord(f"line {number}: {error}") from None

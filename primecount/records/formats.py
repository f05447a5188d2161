"""The records file formats, C{tsv} (the original columns) and C{jsonl}: one line per answered request, every
control character escaped, formatted and parsed back losslessly (docs/records.md)."""

from __future__ import annotations

import json
import re
import time
from datetime import datetime
from functools import lru_cache
from typing import Callable, Iterable, Iterator, NamedTuple

TIMESTAMP_FORMAT = "%Y-%m-%d %H:%M:%S"
_TIMESTAMP_PATTERN = re.compile(r"\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}")
_ESCAPES = {"\\": "\\\\", "\t": "\\t", "\r": "\\r", "\n": "\\n"}
_UNESCAPES = {escaped: plain for plain, escaped in _ESCAPES.items()}
# Control characters a terminal would act on, that make grep call a file binary, or that str.splitlines()
# splits at: C0 (but TAB, CR and LF, which have their own escapes), DEL, C1, U+2028 and U+2029.
CONTROLS = "\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u2028\u2029"
_CONTROL_PATTERN = re.compile(f"[{CONTROLS}]")
# Also the double quote, as \x22: a field beginning with one would turn a CSV reader (Python's csv, pandas,
# PostgreSQL's and DuckDB's CSV import) into one quoted field running across records.
_ESCAPE_PATTERN = re.compile(f"[\\\\\t\r\n\"{CONTROLS}]")
_UNESCAPE_PATTERN = re.compile(r"\\(?:x[0-9a-f]{2}|u[0-9a-f]{4}|.)?", re.DOTALL)
_JSON_RAW_PATTERN = re.compile("[\x7f-\x9f\u2028\u2029]")  # json.dumps already escapes C0
_VERDICTS = {"sí": True, "no": False}


class Record(NamedTuple):
    """One answered request as stored: when (POSIX seconds), client address, message, count, primality."""

    seconds: int
    client: str
    message: str
    count: int
    isPrime: bool

    @property
    def verdict(self) -> str:
        """C{sí} for a prime count, C{no} otherwise."""
        return "sí" if self.isPrime else "no"


class MalformedRecord(ValueError):
    """A line of a records file that is not a well-formed record."""


@lru_cache(maxsize=8)
def formatTimestamp(seconds: int) -> str:
    """Format POSIX C{seconds} as the records' local C{YYYY-MM-DD HH:MM:SS} (cached: records come in bursts)."""
    return time.strftime(TIMESTAMP_FORMAT, time.localtime(seconds))


@lru_cache(maxsize=8)
def formatISOTime(seconds: int) -> str:
    """Format POSIX C{seconds} as local ISO 8601 time with its UTC offset, e.g. C{2026-02-17T10:11:12+01:00}."""
    return datetime.fromtimestamp(seconds).astimezone().isoformat()


def parseTimestamp(text: str) -> int:
    """The POSIX seconds of a local C{YYYY-MM-DD HH:MM:SS}; raise L{MalformedRecord} if it is not one."""
    if not _TIMESTAMP_PATTERN.fullmatch(text):
        raise MalformedRecord(f"bad timestamp {text!r}")
    try:
        return int(time.mktime(time.strptime(text, TIMESTAMP_FORMAT)))
    except (ValueError, OverflowError):
        raise MalformedRecord(f"bad timestamp {text!r}") from None


def _codeEscape(character: str) -> str:
    """C{\\xHH} for a control character below U+0100, C{\\uHHHH} above."""
    code = ord(character)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def _escapeOne(match: re.Match[str]) -> str:
    character = match.group()
    return _ESCAPES.get(character) or _codeEscape(character)


def escapeField(text: str) -> str:
    """Escape backslash, TAB, CR, LF, the double quote and every other control character so C{text} fits in one
    tab-separated field that every TSV and CSV reader reads alike, and prints as text."""
    if (text.isprintable() and "\\" not in text and '"' not in text) or _ESCAPE_PATTERN.search(text) is None:
        return text  # printable text holds no control character: most messages are, and isprintable is cheaper
    return _ESCAPE_PATTERN.sub(_escapeOne, text)


def unescapeField(text: str) -> str:
    """Undo L{escapeField}; raise L{MalformedRecord} on an unknown or dangling escape."""
    if "\\" not in text:
        return text

    def unescape(match: re.Match[str]) -> str:
        escaped = match.group()
        if escaped in _UNESCAPES:
            return _UNESCAPES[escaped]
        if len(escaped) > 2:
            character = chr(int(escaped[2:], 16))
            if character == '"' or _CONTROL_PATTERN.fullmatch(character):
                return character
        raise MalformedRecord(f"bad escape {escaped!r}")

    return _UNESCAPE_PATTERN.sub(unescape, text)


def terminalSafe(text: str) -> str:
    """C{text} with every control character but TAB written as in records (C{\\x1b}, C{\\u2028}), for
    printing lines of any records file, even one written before control characters were escaped."""
    return _CONTROL_PATTERN.sub(lambda match: _codeEscape(match.group()), text)


def _parseVerdict(verdict: object) -> bool:
    if verdict not in _VERDICTS:
        raise MalformedRecord(f"bad verdict {verdict!r}")
    return _VERDICTS[verdict]  # type: ignore[index]


def formatTSV(record: Record) -> str:
    """Format C{record} as one tab-separated line, newline included."""
    return (
        f"{formatTimestamp(record.seconds)}\t{_clientField(record.client)}\t"
        f"{escapeField(record.message)}\t{record.count}\t{'sí' if record.isPrime else 'no'}\n"
    )


@lru_cache(maxsize=4096)
def _clientField(client: str) -> str:
    """L{escapeField} of a client address, made once per address (records come in bursts from few clients)."""
    return escapeField(client)


def parseTSV(line: str) -> Record:
    """Parse one tab-separated line (with or without its newline), or raise L{MalformedRecord}."""
    if line.endswith("\n"):
        line = line[:-1]
    fields = line.split("\t")
    if len(fields) != 5:
        raise MalformedRecord(f"expected 5 tab-separated fields, found {len(fields)}")
    timestamp, client, message, count, verdict = fields
    if not count.isascii() or not count.isdigit():
        raise MalformedRecord(f"bad count {count!r}")
    return Record(
        parseTimestamp(timestamp), unescapeField(client), unescapeField(message), int(count), _parseVerdict(verdict)
    )


def formatJSONL(record: Record) -> str:
    """Format C{record} as one JSON object on one line, newline included, every control character escaped."""
    line = json.dumps(
        {
            "timestamp": formatTimestamp(record.seconds),
            "time": formatISOTime(record.seconds),
            "client": record.client,
            "message": record.message,
            "count": record.count,
            "verdict": record.verdict,
        },
        ensure_ascii=False,
    )
    if _JSON_RAW_PATTERN.search(line) is not None:  # DEL, C1, U+2028/U+2029: valid JSON raw, unsafe to print
        line = _JSON_RAW_PATTERN.sub(lambda match: f"\\u{ord(match.group()):04x}", line)
    return line + "\n"


def parseJSONL(line: str) -> Record:
    """Parse one JSON line, or raise L{MalformedRecord}; C{time} (with its offset) gives the instant."""
    try:
        fields = json.loads(line)
        seconds = int(datetime.fromisoformat(fields["time"]).timestamp())
        client, message, count = fields["client"], fields["message"], fields["count"]
        verdict = fields["verdict"]
    except (ValueError, KeyError, TypeError) as error:
        raise MalformedRecord(f"not a JSON record: {error}") from None
    if not isinstance(client, str) or not isinstance(message, str):
        raise MalformedRecord("client and message must be strings")
    if type(count) is not int or count < 0:
        raise MalformedRecord(f"bad count {count!r}")
    return Record(seconds, client, message, count, _parseVerdict(verdict))


class RecordFormat(NamedTuple):
    """A records file format: its name, and how a record becomes a line and back."""

    name: str
    format: Callable[[Record], str]
    parse: Callable[[str], Record]


TSV = RecordFormat("tsv", formatTSV, parseTSV)
JSONL = RecordFormat("jsonl", formatJSONL, parseJSONL)
FORMATS = {f.name: f for f in (TSV, JSONL)}


def parseRecord(line: str) -> Record:
    """Parse a line of either format (a JSON line starts with C{{})."""
    return parseJSONL(line) if line.startswith("{") else parseTSV(line)


def parseRecords(lines: Iterable[str]) -> Iterator[Record]:
    """Parse every line of a records file, e.g. C{parseRecords(open(path, encoding="utf-8", newline="\\n"))}."""
    for number, line in enumerate(lines, 1):
        try:
            yield parseRecord(line)
        except MalformedRecord as error:
            raise MalformedRecord(f"line {number}: {error}") from None

"""The records tool: C{python -m primecount.records check|repair|stats|tail|follow FILE} (also C{primecount-records}).

Exit statuses scripts can rely on: 0 all well; 1 the file cannot be read or
written; 2 bad usage; 3 the last line is torn (a write cut short, e.g. by power
loss; C{repair} fixes it); 4 a line before the last is malformed (not repairable
by this tool).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from collections import Counter
from typing import Iterator, NamedTuple, Optional, Sequence, TextIO

from primecount.records import MalformedRecord, Record, formatTimestamp, parseRecord

EXIT_OK, EXIT_IO, EXIT_USAGE, EXIT_TORN, EXIT_MALFORMED = 0, 1, 2, 3, 4


class Problem(NamedTuple):
    """A line that is not a record: its number, byte offset, length and why."""

    line: int
    offset: int
    length: int
    reason: str


class Scan(NamedTuple):
    """The result of reading a whole records file."""

    records: list[Record]
    malformed: list[Problem]
    torn: Optional[Problem]
    size: int


def _lines(path: str) -> Iterator[tuple[int, bytes]]:
    """Each line of C{path} as bytes, with the byte offset where it starts."""
    offset = 0
    with open(path, "rb") as file:
        for line in file:
            yield offset, line
            offset += len(line)


def scan(path: str) -> Scan:
    """Parse every line; a bad last line (or one without its newline) is torn, any other bad line malformed."""
    records: list[Record] = []
    problems: list[Problem] = []
    size, lastOk = 0, True
    for number, (offset, raw) in enumerate(_lines(path), 1):
        size = offset + len(raw)
        try:
            if not raw.endswith(b"\n"):
                raise MalformedRecord("no newline at the end")
            records.append(parseRecord(raw.decode("utf-8")))
            lastOk = True
        except (MalformedRecord, UnicodeDecodeError) as error:
            problems.append(Problem(number, offset, len(raw), str(error)))
            lastOk = False
    torn = problems.pop() if problems and not lastOk else None
    return Scan(records, problems, torn, size)


def check(path: str, out: TextIO) -> int:
    """Report on C{path}; exit status per the module docstring."""
    result = scan(path)
    for problem in result.malformed:
        out.write(f"{path}: line {problem.line} (byte {problem.offset}): malformed: {problem.reason}\n")
    if result.torn:
        out.write(f"{path}: torn last line {result.torn.line} at byte offset {result.torn.offset} "
                  f"({result.torn.length} bytes): {result.torn.reason}\n")
    out.write(f"{path}: {len(result.records)} records, {len(result.malformed)} malformed lines, "
              f"{'a torn last line' if result.torn else 'no torn last line'}\n")
    if result.malformed:
        return EXIT_MALFORMED
    return EXIT_TORN if result.torn else EXIT_OK


def repair(path: str, out: TextIO) -> int:
    """Cut a torn last line off C{path}, after copying the file to a backup. Run it with the server stopped."""
    result = scan(path)
    if result.malformed:
        out.write(f"{path}: {len(result.malformed)} malformed lines before the end; not repairing "
                  f"(first at line {result.malformed[0].line}); see `check`\n")
        return EXIT_MALFORMED
    if result.torn is None:
        out.write(f"{path}: nothing to repair ({len(result.records)} records)\n")
        return EXIT_OK
    backup = f"{path}.bak"
    number = 1
    while os.path.exists(backup):
        number += 1
        backup = f"{path}.bak{number}"
    shutil.copy2(path, backup)
    with open(path, "r+b") as file:
        file.truncate(result.torn.offset)
        file.flush()
        os.fsync(file.fileno())
    out.write(f"{path}: removed the torn last line ({result.torn.length} bytes at offset {result.torn.offset}); "
              f"the original is in {backup}\n")
    return EXIT_OK


def stats(path: str, out: TextIO, top: int) -> int:
    """Totals, share of prime counts, requests per client IP and per minute."""
    result = scan(path)
    records = result.records
    prime = sum(r.isPrime for r in records)
    out.write(f"records      {len(records)}\n")
    if records:
        out.write(f"sí           {prime} ({prime / len(records):.1%})\n")
        out.write(f"no           {len(records) - prime} ({(len(records) - prime) / len(records):.1%})\n")
        out.write(f"first        {formatTimestamp(min(r.seconds for r in records))}\n")
        out.write(f"last         {formatTimestamp(max(r.seconds for r in records))}\n")
    clients = Counter(r.client for r in records)
    out.write(f"clients      {len(clients)}\n")
    for client, count in clients.most_common(top):
        out.write(f"  {count:>10}  {client}\n")
    out.write("per minute\n")
    for minute, count in sorted(Counter(formatTimestamp(r.seconds)[:16] for r in records).items()):
        out.write(f"  {minute}  {count}\n")
    if result.malformed or result.torn:
        out.write(f"(skipped {len(result.malformed) + (result.torn is not None)} lines that are not records)\n")
    return EXIT_OK


def tail(path: str, out: TextIO, count: int) -> int:
    """Print the last C{count} whole records as stored."""
    lines: list[bytes] = []
    with open(path, "rb") as file:
        end = file.seek(0, os.SEEK_END)
        position, buffer = end, b""
        while position > 0 and buffer.count(b"\n") <= count:
            step = min(65536, position)
            position -= step
            file.seek(position)
            buffer = file.read(step) + buffer
        lines = buffer.split(b"\n")
    complete = lines[:-1] if position == 0 else lines[1:-1]  # drop a partial first and the torn/empty last
    for raw in complete[-count:] if count else []:
        out.write(raw.decode("utf-8", errors="replace") + "\n")
    return EXIT_OK


def follow(path: str, out: TextIO, interval: float = 0.2, fromEnd: bool = True) -> int:
    """Print records as they are appended, following rotation (a new file at the path), until interrupted."""
    file, identity, pending = None, None, b""
    try:
        while True:
            try:
                status = os.stat(path)
            except FileNotFoundError:
                status = None
            if status is not None and (file is None or (status.st_dev, status.st_ino) != identity
                                       or status.st_size < file.tell()):
                if file is not None:
                    pending += file.read()  # the rest of the rotated file
                    file.close()
                file = open(path, "rb")
                identity = (status.st_dev, status.st_ino)
                if fromEnd:
                    file.seek(0, os.SEEK_END)
                fromEnd = False
            if file is not None:
                pending += file.read()
            *complete, pending = pending.split(b"\n")
            for raw in complete:
                out.write(raw.decode("utf-8", errors="replace") + "\n")
            out.flush()
            time.sleep(interval)
    except KeyboardInterrupt:
        return EXIT_OK
    finally:
        if file is not None:
            file.close()


def parser() -> argparse.ArgumentParser:
    """The command-line parser."""
    top = argparse.ArgumentParser(
        prog="primecount-records",
        description="Check, repair and read primecount records files (tsv or jsonl).",
        epilog="Exit status: 0 ok, 1 I/O error, 2 usage, 3 torn last line, 4 malformed line before the end.",
    )
    commands = top.add_subparsers(dest="command", required=True)
    commands.add_parser("check", help="verify every line; report a torn last line with its offset")
    commands.add_parser("repair", help="cut off a torn last line, keeping a backup (stop the server first)")
    statsParser = commands.add_parser("stats", help="totals, share of sí, per client IP, per minute")
    statsParser.add_argument("--top", type=int, default=20, help="client addresses to list (default 20)")
    tailParser = commands.add_parser("tail", help="print the last records")
    tailParser.add_argument("-n", "--lines", type=int, default=10, help="how many (default 10)")
    followParser = commands.add_parser("follow", help="print records as they are appended (Ctrl-C to stop)")
    followParser.add_argument("--from-start", action="store_true", help="print the existing records first")
    for command in commands.choices.values():
        command.add_argument("file", help="the records file")
    return top


def main(argv: Optional[Sequence[str]] = None, out: TextIO = sys.stdout) -> int:
    """Entry point; returns the exit status."""
    args = parser().parse_args(argv)
    try:
        if args.command == "check":
            return check(args.file, out)
        if args.command == "repair":
            return repair(args.file, out)
        if args.command == "stats":
            return stats(args.file, out, args.top)
        if args.command == "tail":
            return tail(args.file, out, args.lines)
        return follow(args.file, out, fromEnd=not args.from_start)
    except OSError as error:
        sys.stderr.write(f"primecount-records: {error}\n")
        return EXIT_IO


if __name__ == "__main__":
    sys.exit(main())

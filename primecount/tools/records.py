"""The records tool: C{python -m primecount.records check|repair|stats|tail|follow FILE...} (also
C{primecount-records}), for files and, in C{stats}, C{tail} and C{follow}, PostgreSQL tables; docs/records.md."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from collections import Counter
from typing import Iterator, NamedTuple, Optional, Sequence, TextIO

from primecount.logs import plural
from primecount.records.table import DEFAULT_TABLE, isDatabaseURI
from primecount.records.formats import MalformedRecord, Record, formatTimestamp, parseRecord, terminalSafe

EXIT_OK, EXIT_IO, EXIT_USAGE, EXIT_TORN, EXIT_MALFORMED = 0, 1, 2, 3, 4


class Problem(NamedTuple):
    """A line that is not a record: its number, byte offset, length and why."""

    line: int
    offset: int
    length: int
    reason: str


class Scan(NamedTuple):
    """What reading a whole records file found, without keeping its records: how many, and the bad lines."""

    records: int
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


def _parsed(path: str, problems: list[Problem]) -> Iterator[Record]:
    """Stream the records of C{path}; each line that is not one goes to C{problems} (the last one may be torn)."""
    for number, (offset, raw) in enumerate(_lines(path), 1):
        try:
            if not raw.endswith(b"\n"):
                raise MalformedRecord("no newline at the end")
            yield parseRecord(raw.decode("utf-8"))
        except (MalformedRecord, UnicodeDecodeError) as error:
            problems.append(Problem(number, offset, len(raw), str(error)))


def scan(path: str) -> Scan:
    """Parse every line, in constant memory; a last line without its newline is torn (a write cut short), any
    other bad line, the last one included, malformed."""
    problems: list[Problem] = []
    count = sum(1 for _ in _parsed(path, problems))
    size = os.path.getsize(path)
    torn = problems.pop() if problems and problems[-1].offset + problems[-1].length == size and not _endsInNewline(
        path) else None
    return Scan(count, problems, torn, size)


def _endsInNewline(path: str) -> bool:
    """Whether the last byte of C{path} is a newline: a write cut short never leaves one, a whole record always
    does."""
    with open(path, "rb") as file:
        if file.seek(0, os.SEEK_END) == 0:
            return True
        file.seek(-1, os.SEEK_END)
        return file.read(1) == b"\n"


def check(paths: Sequence[str], out: TextIO) -> int:
    """Report on each file; the worst exit status of them, per the module docstring."""
    worst = EXIT_OK
    for path in paths:
        result = scan(path)
        for problem in result.malformed:
            out.write(f"{path}: line {problem.line} (byte {problem.offset}): malformed: {problem.reason}\n")
        if result.torn:
            out.write(f"{path}: torn last line {result.torn.line} at byte offset {result.torn.offset} "
                      f"({result.torn.length} bytes): {result.torn.reason}\n")
        out.write(f"{path}: {plural(result.records, 'record')}, {plural(len(result.malformed), 'malformed line')}, "
                  f"{'a torn last line' if result.torn else 'no torn last line'}\n")
        status = EXIT_MALFORMED if result.malformed else EXIT_TORN if result.torn else EXIT_OK
        worst = max(worst, status)
    return worst


def repair(path: str, out: TextIO) -> int:
    """Cut a torn last line off C{path}, after copying the file to a backup. Run it with the server stopped."""
    result = scan(path)
    if result.malformed:
        first, last = result.malformed[0], result.malformed[-1]
        where = (f"line {first.line}" if len(result.malformed) == 1 else f"the first at line {first.line}")
        if last.offset + last.length == result.size:
            where += ", the last line, which ends in a newline: a whole line, not one a write cut short"
        out.write(f"{path}: {plural(len(result.malformed), 'malformed line')} ({where}); not repairing, as only a "
                  f"torn last line is cut off; see `check`\n")
        return EXIT_MALFORMED
    if result.torn is None:
        out.write(f"{path}: nothing to repair ({plural(result.records, 'record')})\n")
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


def stats(paths: Sequence[str], out: TextIO, top: int, since: Optional[int] = None,
          until: Optional[int] = None) -> int:
    """Totals, share of prime counts, requests per client IP and per minute, over every file, streaming: memory
    grows with the number of clients and minutes, not of records. C{since}/C{until} keep records in
    [since, until)."""
    total = prime = skipped = 0
    first: Optional[int] = None
    last: Optional[int] = None
    clients: Counter[str] = Counter()
    minutes: Counter[int] = Counter()
    for path in paths:
        problems: list[Problem] = []
        for record in _parsed(path, problems):
            if (since is not None and record.seconds < since) or (until is not None and record.seconds >= until):
                continue
            total += 1
            prime += record.isPrime
            first = record.seconds if first is None else min(first, record.seconds)
            last = record.seconds if last is None else max(last, record.seconds)
            if record.client:  # a UNIX-socket peer has no address, and is no client IP
                clients[record.client] += 1
            minutes[record.seconds // 60] += 1
        skipped += len(problems)
    writeStats(out, total, prime, first, last, len(clients), clients.most_common(top),
               [(minute * 60, count) for minute, count in sorted(minutes.items())])
    if skipped:
        out.write(f"(skipped {skipped} lines that are not records)\n")
    return EXIT_OK


def writeStats(out: TextIO, total: int, prime: int, first: Optional[int], last: Optional[int], clients: int,
               busiest: Sequence[tuple[str, int]], perMinute: Sequence[tuple[int, int]]) -> None:
    """Print the totals, the busiest clients and the requests per minute (C{perMinute} by the minute's first
    second) of a file's or a table's records."""
    out.write(f"records      {total}\n")
    if total:
        out.write(f"sí           {prime} ({prime / total:.1%})\n")
        out.write(f"no           {total - prime} ({(total - prime) / total:.1%})\n")
        out.write(f"first        {formatTimestamp(first)}\n")  # type: ignore[arg-type]
        out.write(f"last         {formatTimestamp(last)}\n")  # type: ignore[arg-type]
    out.write(f"clients      {clients}\n")
    for client, count in busiest:
        out.write(f"  {count:>10}  {terminalSafe(client)}\n")
    out.write("per minute\n")
    for minute, count in perMinute:
        out.write(f"  {formatTimestamp(minute)[:16]}  {count}\n")


def moment(value: str) -> int:
    """A point in time for C{--since}/C{--until}: local C{YYYY-MM-DD[ HH:MM[:SS]]} (as records show time) or
    POSIX seconds."""
    if value.isdigit():
        return int(value)
    for layout in ("%Y-%m-%d %H:%M:%S", "%Y-%m-%d %H:%M", "%Y-%m-%d", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%dT%H:%M"):
        try:
            return int(time.mktime(time.strptime(value, layout)))
        except ValueError:
            continue
    raise argparse.ArgumentTypeError(f"not a time: {value!r} (use 'YYYY-MM-DD HH:MM[:SS]' or POSIX seconds)")


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
        out.write(terminalSafe(raw.decode("utf-8", errors="replace")) + "\n")
    return EXIT_OK


def follow(path: str, out: TextIO, interval: float = 0.2, fromEnd: bool = True, err: TextIO = sys.stderr) -> int:
    """Print records as they are appended, following rotation (a new file at the path, read from its start), until
    interrupted; a path that does not exist yet is waited for, as C{tail -F} does, said so once on C{err}, and
    read from its start once it appears: no record is skipped."""
    file, identity, pending, missingSaid = None, None, b"", False
    try:
        while True:
            try:
                status = os.stat(path)
            except FileNotFoundError:
                status = None
                fromEnd = False  # a file that appears later is read from its start, as after a rotation
                if file is None and not missingSaid:
                    err.write(f"primecount-records: {path} does not exist (yet); waiting for it to appear\n")
                    err.flush()
                    missingSaid = True
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
                out.write(terminalSafe(raw.decode("utf-8", errors="replace")) + "\n")
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
    checkParser = commands.add_parser("check", help="verify every line of each file; report a torn last line")
    repairParser = commands.add_parser("repair", help="cut off a torn last line, keeping a backup (stop the "
                                                      "server first)")
    statsParser = commands.add_parser("stats", help="totals, share of sí, per client IP, per minute, over every "
                                                    "file given (workers, hosts, rotated files)")
    statsParser.add_argument("--top", type=int, default=20, help="client addresses to list (default 20)")
    statsParser.add_argument("--since", type=moment, help="only records at or after this local time")
    statsParser.add_argument("--until", type=moment, help="only records before this local time")
    tailParser = commands.add_parser("tail", help="print the last records")
    tailParser.add_argument("-n", "--lines", type=int, default=10, help="how many (default 10)")
    followParser = commands.add_parser("follow", help="print records as they are appended (Ctrl-C to stop)")
    followParser.add_argument("--from-start", action="store_true", help="print the existing records first")
    checkParser.add_argument("files", nargs="+", metavar="file", help="records files")
    statsParser.add_argument("files", nargs="+", metavar="file", help="records files, or one postgresql:// URI")
    repairParser.add_argument("file", help="the records file")
    for command in (tailParser, followParser):
        command.add_argument("file", help="the records file, or a postgresql:// URI")
    for command in (statsParser, tailParser, followParser):
        command.add_argument("--table", default=DEFAULT_TABLE,
                             help=f"with a postgresql:// URI: the records table (default {DEFAULT_TABLE})")
    return top


def main(argv: Optional[Sequence[str]] = None, out: TextIO = sys.stdout) -> int:
    """Entry point; returns the exit status."""
    args = parser().parse_args(argv)
    try:
        uri = next((name for name in getattr(args, "files", [getattr(args, "file", "")]) if isDatabaseURI(name)), None)
        if uri is not None and args.command in ("check", "repair"):
            sys.stderr.write(f"primecount-records: {args.command} works on records files, not on a database "
                             "(a table has no torn lines to find); stats, tail and follow read a table\n")
            return EXIT_USAGE
        if uri is not None:
            return _table(args, uri, out)
        if args.command == "check":
            return check(args.files, out)
        if args.command == "repair":
            return repair(args.file, out)
        if args.command == "stats":
            return stats(args.files, out, args.top, args.since, args.until)
        if args.command == "tail":
            return tail(args.file, out, args.lines)
        return follow(args.file, out, fromEnd=not args.from_start)
    except KeyboardInterrupt:
        return EXIT_OK
    except BrokenPipeError:
        # The reader went away (`... | head`): that is how pipelines end, not an error. Point stdout at
        # /dev/null so that the interpreter's own final flush does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except OSError as error:
        sys.stderr.write(f"primecount-records: {error}\n")
        return EXIT_IO


def _table(args: argparse.Namespace, uri: str, out: TextIO) -> int:
    """C{stats}, C{tail} or C{follow} of a PostgreSQL records table."""
    if args.command == "stats" and len(args.files) > 1:
        sys.stderr.write("primecount-records: stats reads one database URI, or files only\n")
        return EXIT_USAGE
    try:
        from primecount.tools import tablerecords
        if args.command == "stats":
            writeStats(out, *tablerecords.stats(uri, args.table, args.top, args.since, args.until))
        elif args.command == "tail":
            tablerecords.tail(uri, args.table, out, args.lines)
        else:
            tablerecords.follow(uri, args.table, out, fromEnd=not args.from_start)
    except ImportError:
        sys.stderr.write("primecount-records: reading a database needs the PostgreSQL driver: "
                         "pip install 'primecount[postgres]'\n")
        return EXIT_USAGE
    except Exception as error:
        if type(error).__module__.startswith("psycopg"):
            sys.stderr.write(f"primecount-records: {uri}: {str(error).strip()}\n")
            return EXIT_IO
        raise
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())

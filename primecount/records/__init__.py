"""Where records are kept: one interface, two stores.

L{primecount.records.store} says what every store promises (L{IRecordsStore}: a batch stored before its replies
go out, gathering, reopen, health), the error of a refused batch and what the stores share (the incident told
once, the retry backoff). L{primecount.records.file} appends to a file (the default), L{primecount.records.table}
to a PostgreSQL table; both are built as C{Store(location, clock, fsync, metrics, *, ...)}, and L{openStore}
builds the one C{--records} names. L{primecount.records.formats} is a record's line in a file;
L{primecount.records.schema} is the table's creation and its partitions by day. The parser of records files is
here too: C{from primecount.records import parseRecords}.
"""

from __future__ import annotations

from typing import Any

from primecount.records.formats import MalformedRecord, Record, parseRecord, parseRecords
from primecount.records.store import IRecordsStore, RunInThread

__all__ = ["IRecordsStore", "MalformedRecord", "Record", "openStore", "parseRecord", "parseRecords"]


def openStore(options: Any, reactor: Any, runInThread: RunInThread, metrics: Any) -> IRecordsStore:
    """The records store C{--records} names: a PostgreSQL table for a C{postgresql://} URI, otherwise a file."""
    from primecount.records.table import TableStore, isDatabaseURI

    if isDatabaseURI(options["records"]):
        return TableStore(options["records"], reactor, options["fsync"], metrics, table=options["records-table"],
                          timeout=options["records-timeout"], connections=options["records-connections"],
                          retention=options["records-retention"])
    from primecount.records.file import FileStore
    from primecount.records.formats import FORMATS

    return FileStore(options["records"], reactor, options["fsync"], metrics,
                     recordFormat=FORMATS[options["records-format"]], runInThread=runInThread)

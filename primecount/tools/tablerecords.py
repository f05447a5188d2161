"""The records tool's reading of a PostgreSQL records table: C{stats}, C{tail} and C{follow} on a URI, with the
same output as for files (stats computed in SQL)."""

from __future__ import annotations

import time
from typing import Any, Optional, TextIO

from primecount.database import NUL_STAND_IN, tableIdentifier
from primecount.records import Record, formatTSV, formatTimestamp, terminalSafe


def _connect(uri: str) -> Any:
    import psycopg

    return psycopg.connect(uri, autocommit=True, connect_timeout=10, application_name="primecount-records")


def _window(since: Optional[int], until: Optional[int]) -> tuple[Any, list[int]]:
    """The WHERE clause for [since, until) and its parameters."""
    from psycopg import sql

    conditions, parameters = [sql.SQL("true")], []
    if since is not None:
        conditions.append(sql.SQL("time >= to_timestamp(%s)"))
        parameters.append(since)
    if until is not None:
        conditions.append(sql.SQL("time < to_timestamp(%s)"))
        parameters.append(until)
    return sql.SQL(" AND ").join(conditions), parameters


def stats(uri: str, table: str, out: TextIO, top: int, since: Optional[int] = None,
          until: Optional[int] = None) -> None:
    """Totals, share of sí, requests per client and per minute of the table's rows in [since, until)."""
    from psycopg import sql

    where, parameters = _window(since, until)
    name = tableIdentifier(table)
    with _connect(uri) as connection:
        total, prime, first, last, clients = connection.execute(sql.SQL(
            "SELECT count(*), count(*) FILTER (WHERE prime), extract(epoch FROM min(time))::bigint, "
            "extract(epoch FROM max(time))::bigint, count(DISTINCT coalesce(host(client), '-')) "
            "FROM {} WHERE {}").format(name, where), parameters).fetchone()
        busiest = connection.execute(sql.SQL(
            "SELECT coalesce(host(client), '-'), count(*) FROM {} WHERE {} GROUP BY 1 ORDER BY 2 DESC, 1 "
            "LIMIT %s").format(name, where), [*parameters, top]).fetchall()
        minutes = connection.execute(sql.SQL(
            "SELECT extract(epoch FROM date_trunc('minute', time))::bigint, count(*) FROM {} WHERE {} "
            "GROUP BY 1 ORDER BY 1").format(name, where), parameters).fetchall()
    out.write(f"records      {total}\n")
    if total:
        out.write(f"sí           {prime} ({prime / total:.1%})\n")
        out.write(f"no           {total - prime} ({(total - prime) / total:.1%})\n")
        out.write(f"first        {formatTimestamp(first)}\n")
        out.write(f"last         {formatTimestamp(last)}\n")
    out.write(f"clients      {clients}\n")
    for client, count in busiest:
        out.write(f"  {count:>10}  {terminalSafe(client)}\n")
    out.write("per minute\n")
    for minute, count in minutes:
        out.write(f"  {formatTimestamp(minute)[:16]}  {count}\n")


def _rows(connection: Any, table: str, after: int, limit: Optional[int] = None, last: bool = False) -> list[Any]:
    from psycopg import sql

    columns = sql.SQL("id, extract(epoch FROM time)::bigint, coalesce(host(client), '-'), message, count, prime")
    if last:
        query = sql.SQL("SELECT * FROM (SELECT {} FROM {} ORDER BY id DESC LIMIT %s) AS latest ORDER BY id").format(
            columns, tableIdentifier(table))
        return connection.execute(query, [limit]).fetchall()
    query = sql.SQL("SELECT {} FROM {} WHERE id > %s ORDER BY id LIMIT 10000").format(columns, tableIdentifier(table))
    return connection.execute(query, [after]).fetchall()


def _line(values: tuple[Any, ...]) -> str:
    _, seconds, client, message, count, prime = values
    return terminalSafe(formatTSV(Record(seconds, client, message.replace(NUL_STAND_IN, "\0"), count, prime)))


def tail(uri: str, table: str, out: TextIO, count: int) -> None:
    """Print the last C{count} rows as records lines (tsv)."""
    with _connect(uri) as connection:
        for values in _rows(connection, table, 0, count, last=True) if count else []:
            out.write(_line(values))


def follow(uri: str, table: str, out: TextIO, interval: float = 0.5, fromEnd: bool = True) -> None:
    """Print rows as they are committed, as records lines, until interrupted."""
    from psycopg import sql

    with _connect(uri) as connection:
        after = 0
        if fromEnd:
            after = connection.execute(sql.SQL("SELECT coalesce(max(id), 0) FROM {}").format(
                tableIdentifier(table))).fetchone()[0]
        while True:
            rows = _rows(connection, table, after)
            for values in rows:
                out.write(_line(values))
            out.flush()
            if rows:
                after = rows[-1][0]
            else:
                time.sleep(interval)

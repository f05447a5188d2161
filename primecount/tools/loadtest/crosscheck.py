"""Pure cross-check of a JMeter run against the records file the server wrote during it."""

from __future__ import annotations

from collections import Counter
from typing import Iterable

from primecount.tools.loadtest.jtl import Sample
from primecount.records.formats import Record

# Sampler names and request texts in jmeter/primecount.jmx; the counters start at 1 in each JMeter run.
LINE_LABEL = "line"
QUIET_LABEL = "no newline"
KEPT_LABEL = "kept line"


def lineMessage(n: int) -> str:
    """The message the plan's newline sampler sends for counter value C{n}."""
    return f"abc{n}a{n}"


def quietMessage(n: int) -> str:
    """The message the plan's no-newline sampler sends for counter value C{n}."""
    return f"quiet{n}q{n}"


def keptMessage(n: int) -> str:
    """The message the plan's keep-alive sampler sends for counter value C{n}."""
    return f"kept{n}k{n}"


def expectedVerdict(message: str) -> tuple[int, bool]:
    """Count of the last character and its primality, computed independently of the server's code."""
    count = message.count(message[-1])
    return count, count > 1 and all(count % d for d in range(2, int(count**0.5) + 1))


def crossCheck(samples: Iterable[Sample], records: Iterable[Record]) -> list[str]:
    """Problems found (none means the records match): one record per successful sample, each message sent."""
    samples, records = list(samples), list(records)
    problems = []
    sent = Counter(s.label for s in samples)
    successes = sum(s.success for s in samples)
    failures = len(samples) - successes
    universe = {lineMessage(n) for n in range(1, sent[LINE_LABEL] + 1)}
    universe |= {quietMessage(n) for n in range(1, sent[QUIET_LABEL] + 1)}
    universe |= {keptMessage(n) for n in range(1, sent[KEPT_LABEL] + 1)}
    messages = Counter(r.message for r in records)
    if len(records) != successes:
        problems.append(f"{len(records)} records for {successes} successful samples")
    duplicated = sorted(m for m, c in messages.items() if c > 1)
    if duplicated:
        problems.append(f"{len(duplicated)} messages recorded more than once, e.g. {duplicated[0]!r}")
    unknown = sorted(set(messages) - universe)
    if unknown:
        problems.append(f"{len(unknown)} records of messages the plan did not send, e.g. {unknown[0]!r}")
    if not failures:
        missing = sorted(universe - set(messages))
        if missing:
            problems.append(f"{len(missing)} messages sent but not recorded, e.g. {missing[0]!r}")
    wrong = [r for r in records if (r.count, r.isPrime) != expectedVerdict(r.message)]
    if wrong:
        problems.append(f"{len(wrong)} records with a wrong count or verdict, e.g. {wrong[0]}")
    return problems

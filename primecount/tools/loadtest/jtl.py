"""Pure reading of JMeter CSV result files (JTL) into a summary: samples, errors, throughput, latency."""

from __future__ import annotations

import csv
import math
from collections import Counter
from typing import Iterable, NamedTuple, Sequence, TextIO


class Sample(NamedTuple):
    """One JMeter sample: start (ms since the epoch), elapsed ms, label, success, and why it failed."""

    start: int
    elapsed: int
    label: str
    success: bool
    failure: str


class Summary(NamedTuple):
    """Figures for a run: counts, error messages with their counts, samples per second, latency in ms."""

    samples: int
    errors: int
    errorMessages: list[tuple[str, int]]
    byLabel: list[tuple[str, int]]
    durationSeconds: float
    throughput: float
    latency: dict[str, float]


def readSamples(file: TextIO) -> list[Sample]:
    """Read a CSV JTL written with field names (C{jmeter.save.saveservice.print_field_names=true})."""
    samples = []
    for row in csv.DictReader(file):
        success = row["success"].strip().lower() == "true"
        failure = ""
        if not success:
            failure = (row.get("failureMessage") or "").strip() or (
                f"{row.get('responseCode', '')} {row.get('responseMessage', '')}".strip()
            )
        samples.append(Sample(int(row["timeStamp"]), int(row["elapsed"]), row["label"], success, failure))
    return samples


def percentile(sortedValues: Sequence[float], fraction: float) -> float:
    """The nearest-rank percentile of already sorted values (C{fraction} 0.5 for the median)."""
    if not sortedValues:
        return math.nan
    rank = max(1, math.ceil(fraction * len(sortedValues)))
    return sortedValues[rank - 1]


def summarise(samples: Iterable[Sample]) -> Summary:
    """Count samples and errors, and compute throughput and latency percentiles from elapsed times."""
    samples = list(samples)
    failures = Counter(s.failure for s in samples if not s.success)
    labels = Counter(s.label for s in samples)
    elapsed = sorted(s.elapsed for s in samples)
    if samples:
        first = min(s.start for s in samples)
        last = max(s.start + s.elapsed for s in samples)
        duration = max(last - first, 1) / 1000
    else:
        duration = 0.0
    latency = {
        "min": elapsed[0] if elapsed else math.nan,
        "p50": percentile(elapsed, 0.50),
        "p90": percentile(elapsed, 0.90),
        "p99": percentile(elapsed, 0.99),
        "max": elapsed[-1] if elapsed else math.nan,
    }
    return Summary(
        samples=len(samples),
        errors=sum(failures.values()),
        errorMessages=failures.most_common(),
        byLabel=sorted(labels.items()),
        durationSeconds=duration,
        throughput=len(samples) / duration if duration else 0.0,
        latency=latency,
    )


def formatSummary(summary: Summary) -> str:
    """The summary as the few lines the runner prints."""
    labels = ", ".join(f"{label} {count}" for label, count in summary.byLabel)
    lines = [
        f"samples      {summary.samples}" + (f"  ({labels})" if labels else ""),
        f"errors       {summary.errors}" + (f"  ({summary.errors / summary.samples:.2%})" if summary.samples else ""),
    ]
    lines += [f"  {count:>6} x {message}" for message, count in summary.errorMessages]
    lines.append(f"throughput   {summary.throughput:.1f} samples/s over {summary.durationSeconds:.2f} s")
    lines.append("latency ms   " + "  ".join(f"{name} {value:g}" for name, value in summary.latency.items()))
    return "\n".join(lines)

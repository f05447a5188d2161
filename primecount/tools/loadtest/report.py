"""A small self-contained HTML report of a JMeter run (summary, throughput and latency over time, histogram,
errors), with charts when matplotlib is installed (C{primecount[report]})."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
import re
from collections import Counter
from typing import Any, NamedTuple, Optional, Sequence

from primecount.tools.loadtest.jtl import Sample, Summary, percentile


class Interval(NamedTuple):
    """Figures for one slice of a run: its start (s since the first sample), samples/s passed and failed, and the
    p50, p90 and p99 latency (ms) of the samples that started in it."""

    start: float
    passedPerSecond: float
    failedPerSecond: float
    p50: float
    p90: float
    p99: float


def intervals(samples: Sequence[Sample], count: int = 60, shortest: int = 100) -> list[Interval]:
    """The run cut into about C{count} slices, each a whole number of tenths of a second and at least
    C{shortest} milliseconds."""
    if not samples:
        return []
    start = min(s.start for s in samples)
    span = max(s.start for s in samples) - start
    width = max(shortest, -(-span // count // 100) * 100)  # milliseconds
    slices: dict[int, list[Sample]] = {}
    for sample in samples:
        slices.setdefault((sample.start - start) // width, []).append(sample)
    result = []
    for index in range(span // width + 1):
        chosen = slices.get(index, [])
        latencies = sorted(s.elapsed for s in chosen)
        passed = sum(s.success for s in chosen)
        result.append(Interval(index * width / 1000, passed * 1000 / width, (len(chosen) - passed) * 1000 / width,
                               percentile(latencies, 0.5), percentile(latencies, 0.9), percentile(latencies, 0.99)))
    return result


def errorKind(failure: str) -> str:
    """A failure message with its variable parts (numbers, addresses) taken out, so that alike errors group."""
    if failure.startswith("Test failed"):
        return "wrong reply (not <digits> sí|no: an ERROR line)"
    text = re.sub(r"\d+(\.\d+)*", "N", failure.strip())
    return text[:80] or "(no message)"


def errorsByKind(samples: Sequence[Sample]) -> list[tuple[str, int]]:
    """Failed samples counted by kind of error, most frequent first."""
    return Counter(errorKind(s.failure) for s in samples if not s.success).most_common()


def _charts(samples: Sequence[Sample]) -> Optional[list[tuple[str, str]]]:
    """PNG charts as (title, base64) pairs, or None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as pyplot
    except ImportError:
        return None
    if not samples:
        return []
    start = min(s.start for s in samples)
    charts = []
    slices = intervals(samples)
    starts = [i.start for i in slices]

    def throughput(axes: Any) -> None:
        axes.step(starts, [i.passedPerSecond for i in slices], where="post", color="tab:blue", label="passed")
        if any(i.failedPerSecond for i in slices):
            axes.step(starts, [i.failedPerSecond for i in slices], where="post", color="tab:red", label="failed")

    def percentiles(axes: Any) -> None:
        for name, colour in (("p50", "tab:green"), ("p90", "tab:orange"), ("p99", "tab:red")):
            axes.plot(starts, [getattr(i, name) for i in slices], marker=".", color=colour, label=name)

    def dots(axes: Any) -> None:
        for success, colour, name in ((True, "tab:blue", "passed"), (False, "tab:red", "failed")):
            chosen = [s for s in samples if s.success is success]
            if chosen:
                axes.scatter([(s.start - start) / 1000 for s in chosen], [s.elapsed for s in chosen],
                             s=4, alpha=0.5, color=colour, label=name)

    for title, ylabel, draw in (("Throughput over time", "samples/s", throughput),
                                ("Latency percentiles over time", "latency (ms)", percentiles),
                                ("Latency over time", "latency (ms)", dots)):
        figure, axes = pyplot.subplots(figsize=(9, 3.5))
        draw(axes)
        axes.set_xlabel("seconds since the first sample")
        axes.set_ylabel(ylabel)
        axes.legend(loc="upper right")
        axes.grid(alpha=0.3)
        charts.append((title, _png(figure, pyplot)))
    figure, axes = pyplot.subplots(figsize=(9, 3.5))
    elapsed = [s.elapsed for s in samples]
    axes.hist(elapsed, bins=min(60, max(10, len(set(elapsed)))), color="tab:blue")
    axes.set_xlabel("latency (ms)")
    axes.set_ylabel("samples")
    axes.set_yscale("log")
    axes.grid(alpha=0.3)
    charts.append(("Latency histogram", _png(figure, pyplot)))
    kinds = errorsByKind(samples)
    if kinds:
        figure, axes = pyplot.subplots(figsize=(9, 1 + 0.4 * len(kinds[:12])))
        shown = list(reversed(kinds[:12]))
        axes.barh([kind[:60] for kind, _ in shown], [count for _, count in shown], color="tab:red")
        axes.set_xlabel("failed samples")
        axes.grid(alpha=0.3, axis="x")
        charts.append(("Errors by kind", _png(figure, pyplot)))
    return charts


def _png(figure, pyplot) -> str:  # type: ignore[no-untyped-def]
    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png", dpi=100)
    pyplot.close(figure)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def renderReport(title: str, summary: Summary, samples: Sequence[Sample], notes: Sequence[str] = ()) -> str:
    """The report as one HTML page, images inlined."""
    escape = html.escape
    rows = [
        ("samples", str(summary.samples)),
        ("errors", str(summary.errors)),
        ("throughput", f"{summary.throughput:.1f} samples/s over {summary.durationSeconds:.2f} s"),
        *[(f"latency {name}", f"{value:g} ms") for name, value in summary.latency.items()],
        *[(f"samples: {label}", str(count)) for label, count in summary.byLabel],
    ]
    parts = [
        "<!doctype html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{escape(title)}</title>",
        "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto}"
        "td,th{padding:.2em .8em;text-align:left}table{border-collapse:collapse}"
        "tr:nth-child(even){background:#f3f3f3}</style></head><body>",
        f"<h1>{escape(title)}</h1>", "<h2>Summary</h2><table>",
        *[f"<tr><th>{escape(k)}</th><td>{escape(v)}</td></tr>" for k, v in rows],
        "</table>",
    ]
    if summary.errorMessages:
        parts += ["<h2>Errors</h2><table><tr><th>count</th><th>message</th></tr>",
                  *[f"<tr><td>{c}</td><td>{escape(m)}</td></tr>" for m, c in summary.errorMessages], "</table>"]
    charts = _charts(samples)
    if charts is None:
        parts.append("<p>Charts need matplotlib: <code>pip install 'primecount[report]'</code>.</p>")
    for chartTitle, png in charts or []:
        parts += [f"<h2>{escape(chartTitle)}</h2>",
                  f'<img alt="{escape(chartTitle)}" src="data:image/png;base64,{png}">']
    if notes:
        parts += ["<h2>Notes</h2><ul>", *[f"<li>{escape(n)}</li>" for n in notes], "</ul>"]
    parts.append("</body></html>")
    return "\n".join(parts)


def writeReport(path: Path, title: str, summary: Summary, samples: Sequence[Sample], notes: Sequence[str] = ()) -> None:
    """Write the report to C{path}."""
    path.write_text(renderReport(title, summary, samples, notes), encoding="utf-8")

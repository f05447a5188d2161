"""What C{/healthz} and C{/readyz} answer (docs/operations.md, "Running a fleet"): a process is live while its
reactor turns, ready while it listens, is not draining and its records store is healthy; a supervisor of
C{--workers} is ready while at least one of its workers is. Pure logic: no reactor here."""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

# The log line a process writes when its readiness changes, followed by the verdict; a supervisor reads its
# workers' lines (their log is its pipe) to know which of them are ready.
READINESS_EVENT = "primecount readiness:"
READY = "ready"
NOT_READY = "not ready: "


class Verdict(NamedTuple):
    """An answer to a health check: whether it passes, and why, in one line."""

    ok: bool
    reason: str

    def line(self) -> str:
        """The readiness verdict as one line: C{ready}, or C{not ready: <reason>}."""
        return READY if self.ok else NOT_READY + self.reason


def parseVerdict(line: str) -> Optional[Verdict]:
    """The verdict a readiness line (after L{READINESS_EVENT}) carries, or C{None} if it carries none."""
    line = line.strip()
    if line == READY:
        return IS_READY
    if line.startswith(NOT_READY):
        return Verdict(False, line[len(NOT_READY):])
    return None


ALIVE = Verdict(True, "alive")
IS_READY = Verdict(True, READY)
DRAINING = Verdict(False, "draining")


class ProcessHealth:
    """The health of one serving process: C{listening} says whether its listener accepts, C{storeHealthy}
    whether its records store would store a batch now."""

    def __init__(self, listening: Callable[[], bool], storeHealthy: Callable[[], bool]) -> None:
        self._listening = listening
        self._storeHealthy = storeHealthy
        self.draining = False

    def live(self) -> Verdict:
        """Live: this is asked and answered on the reactor thread, so the reactor turns."""
        return ALIVE

    def storeHealthy(self) -> bool:
        """Whether the records store would store a batch now."""
        return self._storeHealthy()

    def ready(self) -> Verdict:
        """Ready unless draining, not listening, or the records store is unavailable (the first that holds)."""
        if self.draining:
            return DRAINING
        if not self._listening():
            return Verdict(False, "not listening")
        if not self._storeHealthy():
            return Verdict(False, "records store unavailable")
        return IS_READY


class WorkersHealth:
    """The health of a supervisor of workers, from what each running worker (by pid) last said of its
    readiness: ready while at least one worker is, live while at least one runs."""

    def __init__(self, places: int = 0) -> None:
        """C{places}: how many workers should run (C{--workers}); readiness counts out of it, so that a place
        whose worker keeps dying is not left out of the count. 0: out of those running."""
        self._places = places
        self._said: dict[int, Verdict] = {}  # by pid: every worker running
        self._suspect: dict[int, str] = {}  # by pid: workers of a place in a crash loop, and why
        self.draining = False

    def started(self, pid: int, suspect: Optional[str] = None) -> None:
        """Worker C{pid} runs; it is not ready until it says so, nor, when C{suspect} says why (its place is in
        a crash loop), until it is L{stable}."""
        self._said[pid] = Verdict(False, "starting")
        if suspect is not None:
            self._suspect[pid] = suspect

    def stable(self, pid: int) -> None:
        """Worker C{pid}, started in a crash loop, has run long enough: it counts as it says from now on."""
        self._suspect.pop(pid, None)

    def said(self, pid: int, verdict: Verdict) -> None:
        """Worker C{pid} said its readiness changed to C{verdict}."""
        if pid in self._said:
            self._said[pid] = verdict

    def _verdict(self, pid: int) -> Verdict:
        """What counts of worker C{pid}'s readiness: what it said, unless its place is in a crash loop."""
        said = self._said[pid]
        suspect = self._suspect.get(pid)
        return Verdict(False, suspect) if said.ok and suspect is not None else said

    def ended(self, pid: int) -> None:
        """Worker C{pid} is gone."""
        self._said.pop(pid, None)
        self._suspect.pop(pid, None)

    def counts(self) -> tuple[int, int]:
        """How many workers run, and how many of them are ready (said so, and are not in a crash loop)."""
        return len(self._said), sum(self._verdict(pid).ok for pid in self._said)

    def live(self) -> Verdict:
        """Live while a worker runs (the supervisor answers on its own reactor thread, so that one turns)."""
        if not self._said:
            return Verdict(False, "no worker running")
        return Verdict(True, f"alive: {len(self._said)} workers running")

    def ready(self) -> Verdict:
        """Ready while at least one worker is, unless the supervisor drains; the reason counts them."""
        if self.draining:
            return DRAINING
        running, ready = self.counts()
        if ready:
            return Verdict(True, f"{READY}: {ready} of {max(self._places, running)} workers ready")
        reasons = "; ".join(f"pid {pid} {self._verdict(pid).reason}" for pid in sorted(self._said))
        return Verdict(False, f"no worker ready ({reasons or 'none running'})")

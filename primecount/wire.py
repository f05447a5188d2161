"""Pure wire format: turns the bytes of one request into an answer or a rejection, and both into reply bytes."""

from __future__ import annotations

from typing import NamedTuple, Union

from primecount.analysis import analyse

EMPTY_MESSAGE = "empty message"
INVALID_UTF8 = "invalid UTF-8"
TIMEOUT = "timeout"
STORAGE_UNAVAILABLE = "storage unavailable"
INTERNAL_ERROR = "internal error"
BUSY = "busy"


def lineTooLong(maxLine: int) -> str:
    """The rejection reason for a message longer than C{maxLine} bytes."""
    return f"line too long (max {maxLine} bytes)"


class Answer(NamedTuple):
    """A request that was analysed: its message (decoded, stripped), the count and its primality."""

    message: str
    count: int
    isPrime: bool


class Rejection(NamedTuple):
    """A request that cannot be answered, with the reason sent back as C{ERROR <reason>}."""

    reason: str


Outcome = Union[Answer, Rejection]


def evaluate(raw: bytes) -> Outcome:
    """Decode C{raw} as UTF-8, strip surrounding whitespace and analyse it, or say why not."""
    try:
        message = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        return Rejection(INVALID_UTF8)
    if not message:
        return Rejection(EMPTY_MESSAGE)
    count, prime = analyse(message)
    return Answer(message, count, prime)


def evaluateAll(raws: list[bytes]) -> list[Outcome]:
    """Evaluate a batch of requests in order; this is the unit of work handed to the thread pool."""
    return [evaluate(raw) for raw in raws]


def replyLine(answer: Answer) -> bytes:
    """The reply to an answered request: C{"<count> sí\\n"} or C{"<count> no\\n"}, UTF-8 encoded."""
    return f"{answer.count} {'sí' if answer.isPrime else 'no'}\n".encode("utf-8")


def errorLine(reason: str) -> bytes:
    """The reply to a rejected request: C{"ERROR <reason>\\n"}, UTF-8 encoded."""
    return f"ERROR {reason}\n".encode("utf-8")


def outcomeLabel(reply: bytes) -> str:
    """A short name for how a request ended, for metrics: C{ok} or the ERROR reason (C{line_too_long}, ...)."""
    if not reply.startswith(b"ERROR "):
        return "ok"
    reason = reply[len(b"ERROR "):].decode("utf-8", errors="replace").strip().split(" (")[0]
    return reason.replace(" ", "_").replace("-", "").lower()

"""Pure wire format: turns the bytes of one request into an answer or a rejection, and both into reply bytes."""

from __future__ import annotations

from functools import lru_cache
from typing import NamedTuple, Union

from primecount.analysis import countLastCharacter, isPrime

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
    count = countLastCharacter(message)  # what analyse does, without its intermediate tuple
    return Answer(message, count, isPrime(count))


def evaluateAll(raws: list[bytes]) -> list[Outcome]:
    """Evaluate a batch of requests in order; this is the unit of work handed to the thread pool."""
    return [evaluate(raw) for raw in raws]


class Reply(NamedTuple):
    """What goes back for one request: the line itself, a short outcome name for metrics, and whether it is an
    C{ERROR} that also ends the connection (the framing errors: a line too long, a timeout, busy)."""

    data: bytes
    outcome: str
    isError: bool = False
    closes: bool = False

    @property
    def text(self) -> str:
        """The line without its newline, for logs."""
        return self.data.decode("utf-8").rstrip("\n")


def replyLine(answer: Answer) -> bytes:
    """The reply to an answered request: C{"<count> sí\\n"} or C{"<count> no\\n"}, UTF-8 encoded."""
    return f"{answer.count} {'sí' if answer.isPrime else 'no'}\n".encode("utf-8")


def errorLine(reason: str) -> bytes:
    """The reply to a rejected request: C{"ERROR <reason>\\n"}, UTF-8 encoded."""
    return f"ERROR {reason}\n".encode("utf-8")


def answerReply(answer: Answer) -> Reply:
    """The typed reply to an answered request (made once per count and verdict)."""
    return countReply(answer.count, answer.isPrime)


@lru_cache(maxsize=1024)
def countReply(count: int, isPrime: bool) -> Reply:
    """The typed reply C{<count> sí|no} (made once per count and verdict)."""
    return Reply(replyLine(Answer("", count, isPrime)), "ok")


@lru_cache(maxsize=64)
def errorReply(reason: str, closes: bool = False) -> Reply:
    """The typed reply C{ERROR <reason>}; C{closes} when the connection cannot carry another request after it
    (made once per reason)."""
    return Reply(errorLine(reason), outcomeLabel(reason), isError=True, closes=closes)


def outcomeLabel(reason: str) -> str:
    """A short metrics name for an ERROR reason: C{line_too_long}, C{invalid_utf8}, ..."""
    return reason.split(" (")[0].replace(" ", "_").replace("-", "").lower()

"""Pure analysis of a message: how often its last character occurs, and whether that count is prime."""

from __future__ import annotations

from math import isqrt
from typing import NamedTuple


class Analysis(NamedTuple):
    """The result of analysing one non-empty message."""

    count: int
    isPrime: bool


def isPrime(number: int) -> bool:
    """Return whether C{number} is prime, by trial division up to its square root."""
    if number < 2:
        return False
    if number < 4:
        return True
    if number % 2 == 0 or number % 3 == 0:
        return False
    divisor = 5
    limit = isqrt(number)
    while divisor <= limit:
        if number % divisor == 0 or number % (divisor + 2) == 0:
            return False
        divisor += 6
    return True


def countLastCharacter(message: str) -> int:
    """Count the occurrences of the last code point of C{message} in it (0 for an empty message)."""
    if not message:
        return 0
    return message.count(message[-1])


def analyse(message: str) -> Analysis:
    """Analyse C{message}: the count of its last character and whether that count is prime."""
    count = countLastCharacter(message)
    return Analysis(count, isPrime(count))

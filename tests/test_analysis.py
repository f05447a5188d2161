"""Tests for L{primecount.analysis}: counting the last character and primality."""

from twisted.trial.unittest import SynchronousTestCase

from primecount.analysis import Analysis, analyse, countLastCharacter, isPrime


class IsPrimeTests(SynchronousTestCase):
    """L{isPrime} agrees with a plain sieve and handles the edge cases."""

    def test_smallNumbers(self) -> None:
        """0 and 1 are not prime, 2 and 3 are, 4 is not."""
        self.assertEqual([isPrime(n) for n in range(5)], [False, False, True, True, False])

    def test_negative(self) -> None:
        """Negative numbers are not prime."""
        self.assertFalse(isPrime(-7))

    def test_agreesWithSieve(self) -> None:
        """Up to 10,000 the answers match a sieve of Eratosthenes."""
        limit = 10_000
        sieve = [True] * (limit + 1)
        sieve[0] = sieve[1] = False
        for n in range(2, int(limit**0.5) + 1):
            if sieve[n]:
                sieve[n * n :: n] = [False] * len(sieve[n * n :: n])
        self.assertEqual([isPrime(n) for n in range(limit + 1)], sieve)

    def test_squaresOfPrimes(self) -> None:
        """Squares of primes, which trial division must reach exactly, are not prime."""
        for p in (5, 7, 11, 13, 65521):
            self.assertFalse(isPrime(p * p), p)

    def test_largePrime(self) -> None:
        """A large prime and its neighbour are told apart."""
        self.assertTrue(isPrime(1_000_000_007))
        self.assertFalse(isPrime(1_000_000_007 * 3))


class AnalyseTests(SynchronousTestCase):
    """L{analyse} counts code points, not bytes, of the message's last character."""

    def test_seedExample(self) -> None:
        """C{abc2a} ends in C{a}, which occurs twice: 2 is prime."""
        self.assertEqual(analyse("abc2a"), Analysis(2, True))

    def test_countsZeroToThree(self) -> None:
        """Counts 0 to 3 come out with the right primality."""
        self.assertEqual(analyse(""), Analysis(0, False))
        self.assertEqual(analyse("x"), Analysis(1, False))
        self.assertEqual(analyse("xx"), Analysis(2, True))
        self.assertEqual(analyse("xyxx"), Analysis(3, True))

    def test_multiByte(self) -> None:
        """Multi-byte characters count once each: C{añoñ} and C{日本日} both give 2."""
        self.assertEqual(analyse("añoñ"), Analysis(2, True))
        self.assertEqual(analyse("日本日"), Analysis(2, True))

    def test_combiningMarks(self) -> None:
        """A combining mark is its own code point: in C{"éé"} written decomposed the last is U+0301."""
        decomposed = "e\u0301e\u0301"
        self.assertEqual(countLastCharacter(decomposed), 2)
        self.assertEqual(countLastCharacter("e\u0301x\u0301"), 2)
        self.assertEqual(countLastCharacter("\u00e9e\u0301"), 1)

    def test_largeCount(self) -> None:
        """A 65,536-character run counts every character, and 65,537 is a prime count."""
        self.assertEqual(analyse("z" * 65536), Analysis(65536, False))
        self.assertEqual(analyse("z" * 65537), Analysis(65537, True))

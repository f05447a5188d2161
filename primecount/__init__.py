"""primecount: a Twisted TCP service that counts a message's last character and says whether the count is prime."""

__version__ = "0.1.0"

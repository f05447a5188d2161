"""twistd dropin: makes C{twistd primecount} available."""

from twisted.application.service import ServiceMaker

primecount = ServiceMaker("primecount", "primecount.tap", "Count a message's last character; say if the count is prime.", "primecount")

"""The JMeter plan (primecount.jmx) and the launcher that lets Debian's JMeter 2.13 load it, as package data."""

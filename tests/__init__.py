"""Tests for primecount, one module per module of the package plus end-to-end runs."""

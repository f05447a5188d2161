"""The names of the slow end-to-end tests (those marked with L{tests.helpers.slow}), one per line, for
C{make test-slow}: C{trial $(python -m tests.slowtests)} runs them and nothing else."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import unittest
from pathlib import Path
from typing import Iterator


def slowTests() -> Iterator[str]:
    """Every test method marked slow, as C{tests.module.Class.method}, in module order."""
    for module in pkgutil.iter_modules([str(Path(__file__).parent)]):
        if not module.name.startswith("test_"):
            continue
        loaded = importlib.import_module(f"tests.{module.name}")
        for className, cls in inspect.getmembers(loaded, inspect.isclass):
            if not issubclass(cls, unittest.TestCase) or cls.__module__ != loaded.__name__:
                continue
            for name, method in inspect.getmembers(cls, inspect.isfunction):
                if name.startswith("test") and getattr(method, "slow", False):
                    yield f"{loaded.__name__}.{className}.{name}"


if __name__ == "__main__":
    print("\n".join(slowTests()))

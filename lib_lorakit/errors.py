"""Errors a user can act on.

Every message says what failed, what was seen, what was expected, and the fix.
The CLI maps :class:`LorakitError` to exit code 2 and anything else to 1.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class LorakitError(Exception):
    """Base class for input problems the user can fix."""

    def __init__(self, message: str, *, fix: str | None = None):
        self.message = message
        self.fix = fix
        super().__init__(self.__str__())

    def __str__(self) -> str:
        if self.fix:
            return f"{self.message}\nFix: {self.fix}"
        return self.message


class FormatError(LorakitError):
    """A model file is unreadable, truncated, malformed or of a refused kind."""


class ArchitectureError(LorakitError):
    """A file belongs to another model family, or the family is unsupported."""


class MatchError(LorakitError):
    """LoRA keys that match nothing, or that do not fit the checkpoint."""


class RecipeError(LorakitError):
    """A bad recipe: strengths, block weights, paths, names."""


class OutputError(LorakitError):
    """The output cannot be written as asked (exists, is an input, ...)."""


class ValueProblem(LorakitError):
    """NaN/inf weights, or values that would not survive the save dtype."""


class Cancelled(LorakitError):
    """The job was cancelled; no output was written."""


def nearest(name: str, choices: Iterable[str], n: int = 3) -> list[str]:
    """Return up to ``n`` of ``choices`` closest to ``name``."""
    return difflib.get_close_matches(name, list(choices), n=n, cutoff=0.5)


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """Return a " Did you mean ...?" sentence, or "" when nothing is close."""
    close = nearest(name, choices)
    if not close:
        return ""
    return " Did you mean " + " or ".join(repr(c) for c in close) + "?"

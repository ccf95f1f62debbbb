"""Errors that describe bad user input.

Every error a user can cause derives from :class:`CompressError`; the CLI turns it into a message
and exit code 2. Messages name the culprit (file, key, layer, value) and a hint names the fix.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

__all__ = [
    "CompressError",
    "DataError",
    "ExportError",
    "FormatError",
    "ModelLoadError",
    "PassError",
    "RecipeError",
    "nearest",
]


class CompressError(Exception):
    """A problem the user can fix; carries an optional hint."""

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        if self.hint:
            return f"{self.message}\n  hint: {self.hint}"
        return self.message


class RecipeError(CompressError):
    """The recipe file is not valid YAML or does not match the schema."""


class ModelLoadError(CompressError):
    """The model named by the recipe cannot be found or loaded."""


class DataError(CompressError):
    """A dataset cannot be found, fetched or tokenized."""


class FormatError(CompressError):
    """A numeric format is not applicable to a tensor (e.g. group size does not divide a dim)."""


class PassError(CompressError):
    """A pass cannot run on this model as configured."""


class ExportError(CompressError):
    """An export folder is missing, corrupted or of an unknown format version."""


def nearest(value: str, choices: Iterable[str]) -> str | None:
    """The closest valid name to ``value``, for "did you mean" hints."""
    matches = difflib.get_close_matches(value, list(choices), n=1, cutoff=0.5)
    return matches[0] if matches else None

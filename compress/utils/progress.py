"""A minimal progress interface so library code reports progress without printing.

Library functions take a :class:`Progress` and call :meth:`Progress.track`; the CLI passes a
rich-backed implementation, Python users get :class:`NullProgress` (or their own). An
implementation may also offer ``describe(text)``, renaming the innermost running bar (training
shows its loss and tokens/s there); callers look it up with ``getattr``, so it stays optional.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Protocol, TypeVar

__all__ = ["NullProgress", "Progress"]

T = TypeVar("T")


class Progress(Protocol):
    def track(self, items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
        """Yield ``items`` while showing a bar named ``description``."""
        ...

    def log(self, message: str) -> None:
        """A one-line status message (e.g. "fetching smollm2-135m")."""
        ...


class NullProgress:
    """Progress that shows nothing."""

    def track(self, items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
        yield from items

    def log(self, message: str) -> None:
        return None

    def describe(self, description: str) -> None:
        return None

"""Exceptions raised by :mod:`merge_fast.arch`.

All of them derive from :class:`ArchError`, itself a :class:`ValueError`, so callers that
only want "bad input" can catch ``ValueError``.  (The package lead may later re-parent
:class:`ArchError` under ``merge_fast.MergeError`` / ``ConfigError``; catching
:class:`ArchError` keeps working either way.)
"""

from __future__ import annotations

__all__ = [
    "ArchError",
    "UnknownFamilyError",
    "UnknownTensorError",
    "MissingTensorError",
    "FusedTensorError",
    "MappingFileError",
    "CanonicalKeyError",
]


class ArchError(ValueError):
    """Base class for every architecture / canonical-namespace error."""


class UnknownFamilyError(ArchError):
    """The model family could not be detected (and no mapping file covers it)."""


class UnknownTensorError(ArchError):
    """A tensor name (or canonical key) that the family's table does not know."""

    def __init__(self, message: str, names: "list[str] | tuple[str, ...]" = ()) -> None:
        super().__init__(message)
        #: The offending names, in input order.
        self.names: tuple[str, ...] = tuple(names)


class MissingTensorError(ArchError):
    """A tensor / canonical key that is required (or needed to re-fuse a tensor) is absent."""

    def __init__(self, message: str, names: "list[str] | tuple[str, ...]" = ()) -> None:
        super().__init__(message)
        self.names: tuple[str, ...] = tuple(names)


class FusedTensorError(ArchError):
    """A fused tensor cannot be split or re-fused (wrong shape, wrong family, ...)."""


class MappingFileError(ArchError):
    """A user mapping file (or built-in family spec) is malformed."""


class CanonicalKeyError(ArchError):
    """A string is not a valid canonical key."""

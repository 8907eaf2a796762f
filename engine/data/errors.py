"""Errors raised by the data layer.

Every one is a ``ValueError`` (bad input from a user or a file), so callers that
only know "the data was bad" can catch ``DatasetError``; the subclasses let the
dashboard show a precise message. Messages always name the offending file,
class or split.
"""

from __future__ import annotations


class DatasetError(ValueError):
    """Base class: the data on disk (or its description) cannot be used."""


class DatasetNotFoundError(DatasetError):
    """A dataset's files are missing; the message says where they were expected."""


class CorruptImageError(DatasetError):
    """A file is not a decodable image (or is empty, or too large to decode safely)."""


class EmptyClassError(DatasetError):
    """A class folder holds no images."""


class NotEnoughClassesError(DatasetError):
    """Fewer classes than the ways of a task."""


class NotEnoughImagesError(DatasetError):
    """A class has fewer images than shots + queries."""


class UnsafeArchiveError(DatasetError):
    """A zip archive is refused: path traversal, links, absurd sizes or member counts."""


class ChecksumMismatchError(DatasetError):
    """A downloaded file does not have the expected checksum."""


class SplitError(DatasetError):
    """An unknown split name or an inconsistent split definition."""

"""Slicing errors that are both a `SafetensorError` and the builtin error
torch and numpy raise for the same mistake, so that code written against
either (`except IndexError`, `except SafetensorError`) keeps working. The
compiled module raises them; their messages are the reference's."""

from ._tensafe_rust import SafetensorError


class SliceIndexError(SafetensorError, IndexError):
    """An index outside the tensor, more indices than dimensions, several
    ellipses, or an index of a kind slicing does not take."""


class SliceValueError(SafetensorError, ValueError):
    """A slice step that is not a positive integer."""

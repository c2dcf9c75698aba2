"""Slicing errors that are both a `SafetensorError` and the builtin error
torch and numpy raise for the same mistake, so that code written against
either (`except IndexError`, `except SafetensorError`) keeps working. The
compiled module raises them; their messages are the reference's. Also the
reference's wording of an argument of the wrong type."""

from typing import Any

from ._tensafe_rust import SafetensorError


class SliceIndexError(SafetensorError, IndexError):
    """An index outside the tensor, more indices than dimensions, several
    ellipses, or an index of a kind slicing does not take."""


class SliceValueError(SafetensorError, ValueError):
    """A slice step that is not a positive integer."""


def not_an_instance(argument: str, value: Any, expected: str) -> TypeError:
    """The TypeError the reference raises for an argument of the wrong type
    (pyo3's words; None is named as itself)."""
    what = "'None'" if value is None else f"'{type(value).__name__}' object"
    return TypeError(f"argument '{argument}': {what} is not an instance of '{expected}'")

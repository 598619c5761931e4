"""One exception type for every mistake a user can fix.

A :class:`BastionError` carries a message that says what was wrong and, where it helps,
``hint`` saying what to do. The CLI prints it on one line and exits non-zero; the
service turns it into a 4xx answer.
"""

from __future__ import annotations


class BastionError(Exception):
    """A user-facing error: bad input, a missing file, an unreachable model, ..."""

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        text = f"{self.message} ({self.hint})" if self.hint else self.message
        # one line, whatever a wrapped library put in the message
        return " ".join(text.split()) if "\n" in text else text


class DataError(BastionError):
    """Data that cannot be used: wrong shape, NaN, labels out of range, empty."""


class ModelError(BastionError):
    """A model that cannot be loaded or does not fit the data or the operation."""


class RemoteModelError(ModelError):
    """A remote model that did not answer, answered badly or ran out of query budget."""


class QueryBudgetExceeded(RemoteModelError):
    """The model's query budget is spent."""


class UnsafePathError(BastionError):
    """A symbolic link, or a path resolving outside the folder it should be in."""

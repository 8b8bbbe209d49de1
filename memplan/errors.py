"""One error family for everything a user can fix. The CLI prints it and exits non-zero."""

from __future__ import annotations


class MemplanError(Exception):
    """A problem with the user's input, stated so the user can act on it.

    `where` is a location such as ``configs/x.yaml:12`` and `field` the dotted spec key, when
    known; `str()` renders ``where: field: message``.
    """

    exit_code = 1

    def __init__(self, message: str, *, field: str | None = None, where: str | None = None):
        super().__init__(message)
        self.message = message
        self.field = field
        self.where = where

    def located(self, *, field: str | None = None, where: str | None = None) -> MemplanError:
        """A copy that also names `field` and `where` (the existing ones win)."""
        return type(self)(self.message, field=self.field or field, where=self.where or where)

    def __str__(self) -> str:
        prefix = "".join(f"{part}: " for part in (self.where, self.field) if part)
        return prefix + self.message


class DoesNotFit(MemplanError):
    """Nothing fits the budget, or a verify category missed its tolerance (exit 3)."""

    exit_code = 3

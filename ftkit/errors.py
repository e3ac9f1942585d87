"""The one exception a user reads.

Anything the user can fix (a config key, a file, a dataset, a model path) raises ``FtkitError`` with
one sentence that names the key, file, line or value and what would be right. The CLI prints it on
one line and exits non-zero; programming errors still raise normally with their traceback.
"""

from __future__ import annotations


class FtkitError(Exception):
    """A user mistake, explained in one sentence (or one sentence per problem when several are found)."""

    def __init__(self, message: str, *, problems: list[str] | None = None) -> None:
        super().__init__(message)
        self.problems = problems or []

    def __str__(self) -> str:
        head = super().__str__()
        if not self.problems:
            return head
        return head + "\n" + "\n".join(f"  - {p}" for p in self.problems)

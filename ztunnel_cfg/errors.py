"""The common root of every nodeproxy error family.

Each package defines one family under :class:`NodeproxyError` (``ConfigError`` here,
``IdentityError``/``ProxyError`` in nodeproxy, ``RedirectError`` in redirect).  The CLI maps
the root to a one-line message and a non-zero exit code, never a traceback.
"""

from __future__ import annotations

from dataclasses import dataclass


class NodeproxyError(Exception):
    """Root of all errors a user can act on.  ``hint`` says what to check."""

    exit_code: int = 1

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        if self.hint:
            return f"{self.message} ({self.hint})"
        return self.message


@dataclass(frozen=True, slots=True)
class ConfigIssue:
    """One problem in a config document, located by file, line, column and key path."""

    file: str
    line: int | None
    column: int | None
    path: str
    message: str

    def __str__(self) -> str:
        where = self.file
        if self.line is not None:
            where += f":{self.line}"
            if self.column is not None:
                where += f":{self.column}"
        key = f"{self.path}: " if self.path else ""
        return f"{where}: {key}{self.message}"


class ConfigError(NodeproxyError):
    """A config document (or a value in it) is invalid.  Carries every issue found."""

    def __init__(self, issues: list[ConfigIssue] | tuple[ConfigIssue, ...]) -> None:
        self.issues: tuple[ConfigIssue, ...] = tuple(issues)
        count = len(self.issues)
        head = f"{count} error{'s' if count != 1 else ''} in config"
        body = "\n".join(f"  {issue}" for issue in self.issues)
        super().__init__(f"{head}:\n{body}" if body else head)


class SpiffeIdError(NodeproxyError, ValueError):
    """A string is not a SPIFFE ID of the accepted shape."""

"""What the L7 decisions see of an HTTP request (the waypoint builds it from h11/h2 events)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["HeaderList", "Request", "header_value"]

# (lowercase name, value) pairs in arrival order; a name may repeat.
HeaderList = tuple[tuple[str, str], ...]


def header_value(headers: HeaderList, name: str) -> str | None:
    """All values of ``name`` joined with ',' (as Envoy matches them); None when absent."""
    values = [v for n, v in headers if n == name]
    if not values:
        return None
    return values[0] if len(values) == 1 else ",".join(values)


@dataclass(frozen=True, slots=True)
class Request:
    """An HTTP request as routing sees it.

    ``path`` is the raw request target in origin form, query included (``/a/b?x=1``);
    ``host`` is the authority without its port; header names are lower case.
    """

    method: str
    path: str
    host: str
    headers: HeaderList = ()

    @property
    def path_only(self) -> str:
        """The path without the query: what path matches compare."""
        return self.path.partition("?")[0]

    @property
    def query(self) -> str:
        return self.path.partition("?")[2]

    def header(self, name: str) -> str | None:
        return header_value(self.headers, name)

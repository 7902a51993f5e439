"""Table / JSON / YAML rendering shared by the listing commands (istioctl ztunnel-config style).

Tables are left-aligned columns separated by ``gap`` spaces, like Go's tabwriter as used by
``istioctl ztunnel-config``; the last column is not padded, so lines have no trailing blanks.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import yaml

FORMATS = ("table", "json", "yaml")


def render_table(headers: Sequence[str], rows: Iterable[Sequence[object]], gap: int = 1) -> str:
    """Headers and rows as aligned text (ends with a newline)."""
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = []
    for row in cells:
        padded = [cell.ljust(widths[i] + gap) for i, cell in enumerate(row[:-1])]
        lines.append(("".join(padded) + row[-1]).rstrip())
    return "\n".join(lines) + "\n"


def render_data(data: Any, fmt: str) -> str:
    """``data`` (plain dicts/lists/strings/numbers) as JSON or YAML text."""
    if fmt == "json":
        return json.dumps(data, indent=2, default=str) + "\n"
    if fmt == "yaml":
        return str(yaml.safe_dump(data, sort_keys=False, default_flow_style=False))
    raise ValueError(f"unknown output format {fmt!r}; use one of {', '.join(FORMATS)}")


def render(fmt: str, table: Callable[[], str], data: Callable[[], Any]) -> str:
    """Pick the table renderer or the data renderer for ``-o``."""
    return table() if fmt == "table" else render_data(data(), fmt)

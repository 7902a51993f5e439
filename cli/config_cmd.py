"""`nodeproxy config` commands."""

from __future__ import annotations

import click


@click.group(name="config")
def command() -> None:
    """config commands."""

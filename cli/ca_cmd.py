"""`nodeproxy ca` commands."""

from __future__ import annotations

import click


@click.group(name="ca")
def command() -> None:
    """ca commands."""

"""``nodeproxy`` entry point: global options, sub-command registry, error -> exit code mapping."""

from __future__ import annotations

import sys
from importlib.metadata import PackageNotFoundError, version

import click

from cli.logsetup import configure_logging
from ztunnel_cfg.errors import NodeproxyError

try:
    _VERSION = version("nodeproxy")
except PackageNotFoundError:  # running from a source tree without installation
    _VERSION = "0.0.0+source"


class _Group(click.Group):
    """Turns every NodeproxyError into one clear line on stderr and its exit code."""

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except NodeproxyError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(_VERSION, prog_name="nodeproxy")
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    default="info",
    show_default=True,
    envvar="NODEPROXY_LOG_LEVEL",
)
@click.option(
    "--log-format",
    type=click.Choice(["text", "json"]),
    default="text",
    show_default=True,
    envvar="NODEPROXY_LOG_FORMAT",
)
def cli(log_level: str, log_format: str) -> None:
    """nodeproxy: a sidecarless service-mesh node agent (HBONE mTLS, L4 policy)."""
    configure_logging(log_level, log_format)


def _register() -> None:
    # Each area owns one module with one click command or group.
    from cli import ca_cmd, config_cmd

    for module in (config_cmd, ca_cmd):
        cli.add_command(module.command)
    for name in ("redirect_cmd", "hbone_cmd", "run_cmd", "demo_cmd", "inspect_cmd",
                 "explain_cmd", "install_cmd", "waypoint_cmd", "nodes_cmd"):
        try:
            module = __import__(f"cli.{name}", fromlist=["command"])
        except ModuleNotFoundError as exc:
            if exc.name != f"cli.{name}":
                raise
            continue
        # A module exports one `command`, or a list `commands` of top-level commands.
        for cmd in getattr(module, "commands", None) or [module.command]:
            cli.add_command(cmd)


_register()


def main() -> None:
    cli(prog_name="nodeproxy")


if __name__ == "__main__":
    main()

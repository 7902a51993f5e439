"""``nodeproxy install --systemd``: lay the units, tmpfiles.d and /etc/nodeproxy/*.env down.

Units and tmpfiles are ours and are replaced on every install (that is how an upgrade ships
new hardening); the env files are the operator's config and are never overwritten without
``--force``.  Nothing is enabled or started: that stays an explicit ``systemctl`` step.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import click

DEFAULT_BIN = "/opt/nodeproxy/venv/bin/nodeproxy"
DEFAULT_AGENT_ARGS = (
    "--config /etc/nodeproxy/config.yaml --node NODE --ca-address https://CA-HOST:15012 "
    "--node-cert /etc/nodeproxy/node-cert.pem --node-key /etc/nodeproxy/node-key.pem "
    "--ca-bundle /etc/nodeproxy/bundle.pem --state-dir /var/lib/nodeproxy"
)
DEFAULT_CA_ARGS = (
    "--dir /var/lib/nodeproxy/ca --config /etc/nodeproxy/config.yaml --listen 0.0.0.0:15012"
)


@dataclass(frozen=True, slots=True)
class Item:
    source: str | None  # file name under the systemd/ data directory, or None for generated
    target: str  # path below --root
    mode: int
    config: bool  # operator-owned: kept unless --force


ITEMS = (
    Item("nodeproxy.service", "etc/systemd/system/nodeproxy.service", 0o644, False),
    Item("nodeproxy-ca.service", "etc/systemd/system/nodeproxy-ca.service", 0o644, False),
    Item("nodeproxy.tmpfiles", "etc/tmpfiles.d/nodeproxy.conf", 0o644, False),
    Item(None, "etc/nodeproxy/agent.env", 0o640, True),
    Item(None, "etc/nodeproxy/ca.env", 0o640, True),
)


def unit_source_dir() -> Path:
    """Where the unit files ship: the wheel's data files, else the source checkout."""
    candidates = (Path(sys.prefix) / "share/nodeproxy/systemd",
                  Path(__file__).resolve().parent.parent / "systemd")
    for candidate in candidates:
        if (candidate / "nodeproxy.service").is_file():
            return candidate
    raise click.ClickException(
        "cannot find the nodeproxy unit files (looked in "
        + ", ".join(str(c) for c in candidates) + "): reinstall the nodeproxy wheel"
    )


def _env_line(name: str, value: str, what: str) -> str:
    # systemd's EnvironmentFile= quoting: one double-quoted value, no embedded quotes/newlines.
    if any(ch in value for ch in '"\\\n'):
        raise click.BadParameter("must not contain quotes, backslashes or newlines",
                                 param_hint=what)
    return f'{name}="{value}"\n'


def render(item: Item, src: Path, binary: str, agent_args: str, ca_args: str) -> str:
    if item.target.endswith("agent.env"):
        note = ("# NODE and CA-HOST are placeholders: replace them before starting the agent.\n"
                if agent_args == DEFAULT_AGENT_ARGS else "")
        return ("# nodeproxy agent arguments (see `nodeproxy run --help`).\n" + note
                + _env_line("NODEPROXY_RUN_ARGS", agent_args, "--agent-args"))
    if item.target.endswith("ca.env"):
        return ("# nodeproxy CA arguments (see `nodeproxy ca serve --help`).\n"
                + _env_line("NODEPROXY_CA_ARGS", ca_args, "--ca-args"))
    assert item.source is not None
    text = (src / item.source).read_text()
    return text.replace(DEFAULT_BIN, binary)


def _write(path: Path, text: str, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.chmod(tmp, mode)
    os.replace(tmp, path)  # atomic: systemd never reads a half-written unit


def _activate(log: list[str]) -> None:
    """On a live systemd host: create the tmpfiles entries and make systemd see the units."""
    if not Path("/run/systemd/system").is_dir():
        log.append("systemd is not running here: skipped daemon-reload and tmpfiles")
        return
    for argv in (["systemd-tmpfiles", "--create", "/etc/tmpfiles.d/nodeproxy.conf"],
                 ["systemctl", "daemon-reload"]):
        if shutil.which(argv[0]) is None:
            log.append(f"{argv[0]} not found: skipped")
            continue
        done = subprocess.run(argv, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise click.ClickException(f"{' '.join(argv)} failed: {done.stderr.strip()}")
        log.append("ran " + " ".join(argv))


@click.command(name="install")
@click.option("--systemd", "systemd", is_flag=True, required=True,
              help="install the systemd units, tmpfiles.d entry and /etc/nodeproxy/*.env")
@click.option("--root", default="/", show_default=True, type=click.Path(file_okay=False),
              help="install below this directory (packaging, images, tests)")
@click.option("--agent-args", default=DEFAULT_AGENT_ARGS, show_default=True,
              help="NODEPROXY_RUN_ARGS for /etc/nodeproxy/agent.env")
@click.option("--ca-args", default=DEFAULT_CA_ARGS, show_default=True,
              help="NODEPROXY_CA_ARGS for /etc/nodeproxy/ca.env")
@click.option("--bin", "binary", default=DEFAULT_BIN, show_default=True,
              help="path of the nodeproxy executable written into ExecStart=")
@click.option("--force", is_flag=True, help="also replace existing /etc/nodeproxy/*.env")
@click.option("--no-activate", is_flag=True,
              help="with --root /: skip systemd-tmpfiles --create and systemctl daemon-reload")
def command(systemd: bool, root: str, agent_args: str, ca_args: str, binary: str,
            force: bool, no_activate: bool) -> None:
    """Install nodeproxy's systemd units and config templates (nothing is started)."""
    src = unit_source_dir()
    base = Path(root)
    log: list[str] = []
    for item in ITEMS:
        target = base / item.target
        if item.config and target.exists() and not force:
            log.append(f"kept     {target} (exists; --force replaces it)")
            continue
        text = render(item, src, binary, agent_args, ca_args)
        _write(target, text, item.mode)
        log.append(f"wrote    {target}")
    if base.resolve() == Path("/") and not no_activate:
        _activate(log)
    for line in log:
        click.echo(line)
    click.echo("next: edit /etc/nodeproxy/agent.env, then "
               "`systemctl enable --now nodeproxy` (and nodeproxy-ca on the CA host)")

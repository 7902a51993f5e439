"""``nodeproxy install --systemd``: lay the units, tmpfiles.d and /etc/nodeproxy/*.env down.

Units and tmpfiles are ours and are replaced on every install (that is how an upgrade ships
new hardening); the env files are the operator's config and are never overwritten without
``--force``.  Nothing is enabled or started: that stays an explicit ``systemctl`` step.

The waypoint unit is a template, ``nodeproxy-waypoint@.service``, always installed; each
``--waypoint NS/NAME`` also writes that waypoint's env file.  The instance name is NS/NAME
escaped as ``systemd-escape`` does (:func:`waypoint_instance`), so the unit's ``%I`` gives the
waypoint's name back and ``%i`` names its env file.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import click

from ztunnel_cfg.model import NAME_PATTERN

DEFAULT_BIN = "/opt/nodeproxy/venv/bin/nodeproxy"
DEFAULT_AGENT_ARGS = (
    "--config /etc/nodeproxy/config.yaml --node NODE --ca-address https://CA-HOST:15012 "
    "--node-cert /etc/nodeproxy/node-cert.pem --node-key /etc/nodeproxy/node-key.pem "
    "--ca-bundle /etc/nodeproxy/bundle.pem --state-dir /var/lib/nodeproxy"
)
DEFAULT_CA_ARGS = (
    "--dir /var/lib/nodeproxy/ca --config /etc/nodeproxy/config.yaml --listen 0.0.0.0:15012"
)


def default_waypoint_args(index: int) -> str:
    """NODEPROXY_WAYPOINT_ARGS for the index-th waypoint of one host (0 = the usual only one).

    The unit adds --name, the node credentials and --state-dir.  Readiness, metrics and admin
    are the agent's ports + 100 x (index + 1): the agent on the same host already holds
    15020/15021 on every address and 127.0.0.1:15000, and each waypoint needs its own.
    """
    step = 100 * (index + 1)
    return ("--config /etc/nodeproxy/config.yaml --ca-address https://CA-HOST:15012 "
            f"--listen-ip WAYPOINT-IP --readiness-addr 0.0.0.0:{15021 + step} "
            f"--metrics-addr 0.0.0.0:{15020 + step} --admin-addr 127.0.0.1:{15000 + step}")


DEFAULT_WAYPOINT_ARGS = default_waypoint_args(0)
WAYPOINT_TEMPLATE = "nodeproxy-waypoint@.service"
# A waypoint's NS/NAME, each half as the config's loader accepts it under `waypoints:`.
_WAYPOINT_NAME = re.compile(NAME_PATTERN.strip("^$") + "/" + NAME_PATTERN.strip("^$"))


@dataclass(frozen=True, slots=True)
class Item:
    source: str | None  # file name under the systemd/ data directory, or None for generated
    target: str  # path below --root
    mode: int
    config: bool  # operator-owned: kept unless --force
    waypoint: str | None = None  # NS/NAME whose env file this is ...
    waypoint_args: str | None = None  # ... and its NODEPROXY_WAYPOINT_ARGS


ITEMS = (
    Item("nodeproxy.service", "etc/systemd/system/nodeproxy.service", 0o644, False),
    Item("nodeproxy-ca.service", "etc/systemd/system/nodeproxy-ca.service", 0o644, False),
    Item(WAYPOINT_TEMPLATE, f"etc/systemd/system/{WAYPOINT_TEMPLATE}", 0o644, False),
    Item("nodeproxy.tmpfiles", "etc/tmpfiles.d/nodeproxy.conf", 0o644, False),
    Item(None, "etc/nodeproxy/agent.env", 0o640, True),
    Item(None, "etc/nodeproxy/ca.env", 0o640, True),
)


def waypoint_instance(waypoint: str) -> str:
    """The unit instance name for waypoint NS/NAME, escaped exactly as ``systemd-escape NS/NAME``
    would: "/" becomes "-", and a "-" of the names becomes ``\\x2d`` (so "%I" is unambiguous)."""
    if not _WAYPOINT_NAME.fullmatch(waypoint):
        raise click.BadParameter(
            f"{waypoint!r} is not NAMESPACE/NAME of a waypoint (lowercase letters, digits, "
            "'-' and '.', as under 'waypoints:' in the config)", param_hint="--waypoint")
    # Both halves start with a letter or digit, so no leading "." needs escaping either.
    return waypoint.replace("-", "\\x2d").replace("/", "-")


def waypoint_unit(waypoint: str) -> str:
    """``nodeproxy-waypoint@<instance>.service``: what ``systemctl enable`` takes."""
    return WAYPOINT_TEMPLATE.replace("@", f"@{waypoint_instance(waypoint)}")


def plan(waypoints: tuple[str, ...], waypoint_args: str | None = None) -> tuple[Item, ...]:
    """Every file one install lays down: the fixed items, then one env file per waypoint, with
    ``waypoint_args`` or else defaults whose ports differ from one waypoint to the next."""
    envs = tuple(
        Item(None, f"etc/nodeproxy/waypoint-{waypoint_instance(w)}.env", 0o640, True, w,
             waypoint_args if waypoint_args is not None else default_waypoint_args(index))
        for index, w in enumerate(dict.fromkeys(waypoints)))
    return ITEMS + envs


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
    if item.waypoint is not None:
        assert item.waypoint_args is not None
        note = ("# CA-HOST and WAYPOINT-IP are placeholders: replace them before starting it.\n"
                if "WAYPOINT-IP" in item.waypoint_args else "")
        return (f"# nodeproxy waypoint {item.waypoint} ({waypoint_unit(item.waypoint)}): "
                "arguments besides\n# --name and the node credentials, which the unit sets "
                "(see `nodeproxy waypoint run --help`).\n" + note
                + _env_line("NODEPROXY_WAYPOINT_ARGS", item.waypoint_args, "--waypoint-args"))
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
@click.option("--waypoint", "waypoints", multiple=True, metavar="NS/NAME",
              help="also write /etc/nodeproxy/waypoint-<instance>.env for this waypoint "
                   "(repeatable); the waypoint unit template is installed either way")
@click.option("--waypoint-args", default=None,
              help="NODEPROXY_WAYPOINT_ARGS for each --waypoint's env file  [default: "
                   f"{DEFAULT_WAYPOINT_ARGS}; each further --waypoint gets the readiness, "
                   "metrics and admin ports + 100]")
@click.option("--bin", "binary", default=DEFAULT_BIN, show_default=True,
              help="path of the nodeproxy executable written into ExecStart=")
@click.option("--force", is_flag=True, help="also replace existing /etc/nodeproxy/*.env")
@click.option("--no-activate", is_flag=True,
              help="with --root /: skip systemd-tmpfiles --create and systemctl daemon-reload")
def command(systemd: bool, root: str, agent_args: str, ca_args: str, waypoints: tuple[str, ...],
            waypoint_args: str | None, binary: str, force: bool, no_activate: bool) -> None:
    """Install nodeproxy's systemd units and config templates (nothing is started)."""
    items = plan(waypoints, waypoint_args)  # checks every --waypoint before writing anything
    src = unit_source_dir()
    base = Path(root)
    log: list[str] = []
    for item in items:
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
    for waypoint in dict.fromkeys(waypoints):
        click.echo(f"      waypoint {waypoint}: edit /etc/nodeproxy/waypoint-"
                   f"{waypoint_instance(waypoint)}.env, then "
                   f"`systemctl enable --now '{waypoint_unit(waypoint)}'`")

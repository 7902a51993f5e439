"""`nodeproxy install --systemd --root DIR`: what lands where, and config is never clobbered."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from cli.install_cmd import DEFAULT_BIN, DEFAULT_WAYPOINT_ARGS, waypoint_instance
from cli.main import cli

SYSTEMD = Path(__file__).resolve().parents[2] / "systemd"


def _install(root: Path, *extra: str) -> str:
    result = CliRunner().invoke(cli, ["install", "--systemd", "--root", str(root), *extra])
    assert result.exit_code == 0, result.output
    return result.output


def _env(path: Path) -> dict[str, str]:
    # Parse exactly as systemd will: `systemd-analyze` has no env-file checker, but the
    # format is KEY="VALUE" lines and comments.
    out = {}
    for line in path.read_text().splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            out[key] = value.strip('"')
    return out


def test_lays_down_units_tmpfiles_and_env(tmp_path: Path) -> None:
    out = _install(tmp_path, "--agent-args", "--config /etc/nodeproxy/config.yaml --node n1")
    unit = tmp_path / "etc/systemd/system/nodeproxy.service"
    assert unit.read_text() == (SYSTEMD / "nodeproxy.service").read_text()
    assert (tmp_path / "etc/systemd/system/nodeproxy-ca.service").is_file()
    assert (tmp_path / "etc/tmpfiles.d/nodeproxy.conf").read_text() == (
        SYSTEMD / "nodeproxy.tmpfiles").read_text()
    agent_env = tmp_path / "etc/nodeproxy/agent.env"
    assert _env(agent_env) == {
        "NODEPROXY_RUN_ARGS": "--config /etc/nodeproxy/config.yaml --node n1"}
    assert agent_env.stat().st_mode & 0o777 == 0o640
    assert _env(tmp_path / "etc/nodeproxy/ca.env")["NODEPROXY_CA_ARGS"].startswith(
        "--dir /var/lib/nodeproxy/ca ")
    assert "wrote" in out


def test_existing_config_kept_unless_force(tmp_path: Path) -> None:
    _install(tmp_path, "--agent-args", "--node first")
    unit = tmp_path / "etc/systemd/system/nodeproxy.service"
    unit.write_text("stale")
    out = _install(tmp_path, "--agent-args", "--node second")
    assert "kept" in out
    assert _env(tmp_path / "etc/nodeproxy/agent.env")["NODEPROXY_RUN_ARGS"] == "--node first"
    assert unit.read_text() != "stale"  # units are ours: always refreshed
    _install(tmp_path, "--agent-args", "--node second", "--force")
    assert _env(tmp_path / "etc/nodeproxy/agent.env")["NODEPROXY_RUN_ARGS"] == "--node second"


def test_bin_rewrites_execstart_and_verifies(tmp_path: Path) -> None:
    _install(tmp_path, "--bin", "/bin/true")
    unit_dir = tmp_path / "etc/systemd/system"
    text = (unit_dir / "nodeproxy.service").read_text()
    assert DEFAULT_BIN not in text
    assert "ExecStart=/bin/true run $NODEPROXY_RUN_ARGS" in text
    done = subprocess.run(["systemd-analyze", "verify", "./nodeproxy.service",
                           "./nodeproxy-ca.service"], cwd=unit_dir, capture_output=True,
                          text=True, check=False)
    assert done.returncode == 0
    assert done.stderr.strip() == ""


def test_rejects_args_that_would_break_the_env_file(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["install", "--systemd", "--root", str(tmp_path),
                                      "--agent-args", 'x"y'])
    assert result.exit_code != 0
    assert "quotes" in result.output
    assert not (tmp_path / "etc/nodeproxy/agent.env").exists()


# --- the waypoint template and its env files -------------------------------------------------

WAYPOINT_UNIT = "nodeproxy-waypoint@.service"


def _tree(root: Path) -> dict[str, tuple[int, str]]:
    return {str(p.relative_to(root)): (p.stat().st_mode & 0o777, p.read_text())
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_installs_the_waypoint_template_without_any_waypoint(tmp_path: Path) -> None:
    _install(tmp_path)
    unit = tmp_path / "etc/systemd/system" / WAYPOINT_UNIT
    assert unit.read_text() == (SYSTEMD / WAYPOINT_UNIT).read_text()
    assert unit.stat().st_mode & 0o777 == 0o644
    assert not list((tmp_path / "etc/nodeproxy").glob("waypoint-*.env"))


def test_waypoint_env_file_per_waypoint(tmp_path: Path) -> None:
    out = _install(tmp_path, "--waypoint", "default/waypoint", "--waypoint", "shop/cart-wp",
                   "--waypoint-args", "--config /etc/nodeproxy/config.yaml --listen-ip 10.0.0.9")
    env = tmp_path / "etc/nodeproxy/waypoint-default-waypoint.env"
    assert _env(env) == {
        "NODEPROXY_WAYPOINT_ARGS": "--config /etc/nodeproxy/config.yaml --listen-ip 10.0.0.9"}
    assert env.stat().st_mode & 0o777 == 0o640
    # The unit's EnvironmentFile= is /etc/nodeproxy/waypoint-%i.env, %i the escaped instance.
    assert (tmp_path / "etc/nodeproxy/waypoint-shop-cart\\x2dwp.env").is_file()
    assert "systemctl enable --now 'nodeproxy-waypoint@shop-cart\\x2dwp.service'" in out


def test_default_waypoint_args_say_what_to_replace(tmp_path: Path) -> None:
    _install(tmp_path, "--waypoint", "default/waypoint")
    text = (tmp_path / "etc/nodeproxy/waypoint-default-waypoint.env").read_text()
    assert "placeholders" in text
    assert _env(tmp_path / "etc/nodeproxy/waypoint-default-waypoint.env")[
        "NODEPROXY_WAYPOINT_ARGS"] == DEFAULT_WAYPOINT_ARGS


def _bound_ports(command_path: tuple[str, ...], args: list[str]) -> set[int]:
    """The node ports a command would bind, parsed by the real command from its arguments."""
    command: click.Command = cli
    for name in command_path:
        assert isinstance(command, click.Group)
        command = command.commands[name]
    with command.make_context(command_path[-1], args) as ctx:
        return {int(ctx.params[k].rsplit(":", 1)[1])
                for k in ("readiness_addr", "metrics_addr", "admin_addr")}


def test_several_waypoints_get_ports_of_their_own(tmp_path: Path) -> None:
    # One host: the agent plus three waypoints from the defaults, no port bound twice.
    _install(tmp_path, "--waypoint", "default/waypoint", "--waypoint", "shop/waypoint",
             "--waypoint", "shop/waypoint", "--waypoint", "team-a/wp")  # duplicate: once
    envs = sorted((tmp_path / "etc/nodeproxy").glob("waypoint-*.env"))
    assert len(envs) == 3
    taken = _bound_ports(("run",), ["--config", "c.yaml", "--node", "n1"])
    for env in envs:
        ports = _bound_ports(("waypoint", "run"), [
            "--name", "ns/wp", *_env(env)["NODEPROXY_WAYPOINT_ARGS"].split()])
        assert not ports & taken, env.name
        taken |= ports
    assert len(taken) == 4 * 3


def test_install_converges(tmp_path: Path) -> None:
    # Twice with the same arguments: the same files, bytes and modes.
    args = ("--waypoint", "default/waypoint", "--agent-args", "--node n1")
    _install(tmp_path, *args)
    first = _tree(tmp_path)
    _install(tmp_path, *args)
    assert _tree(tmp_path) == first
    assert f"etc/systemd/system/{WAYPOINT_UNIT}" in first


def test_waypoint_env_kept_unless_force_while_the_template_is_refreshed(tmp_path: Path) -> None:
    _install(tmp_path, "--waypoint", "default/waypoint", "--waypoint-args", "--listen-ip 10.0.0.1")
    unit = tmp_path / "etc/systemd/system" / WAYPOINT_UNIT
    unit.write_text("stale")
    env = tmp_path / "etc/nodeproxy/waypoint-default-waypoint.env"
    out = _install(tmp_path, "--waypoint", "default/waypoint",
                   "--waypoint-args", "--listen-ip 10.0.0.2")
    assert f"kept     {env}" in out
    assert _env(env)["NODEPROXY_WAYPOINT_ARGS"] == "--listen-ip 10.0.0.1"
    assert unit.read_text() == (SYSTEMD / WAYPOINT_UNIT).read_text()
    _install(tmp_path, "--waypoint", "default/waypoint", "--waypoint-args", "--listen-ip 10.0.0.2",
             "--force")
    assert _env(env)["NODEPROXY_WAYPOINT_ARGS"] == "--listen-ip 10.0.0.2"


@pytest.mark.parametrize("bad", [
    pytest.param("waypoint", id="no-namespace"),
    pytest.param("Default/waypoint", id="uppercase"),
    pytest.param("default/way/point", id="two-slashes"),
    pytest.param("default/-waypoint", id="leading-dash"),
    pytest.param("default/", id="empty-name"),
])
def test_rejects_a_waypoint_that_is_not_ns_name(tmp_path: Path, bad: str) -> None:
    result = CliRunner().invoke(cli, ["install", "--systemd", "--root", str(tmp_path),
                                      "--waypoint", bad])
    assert result.exit_code != 0
    assert "NAMESPACE/NAME" in result.output
    assert not tmp_path.exists() or not any(tmp_path.iterdir())  # nothing half-installed


@pytest.mark.parametrize("waypoint", [
    pytest.param("default/waypoint", id="plain"),
    pytest.param("shop/cart-waypoint", id="dash-in-name"),
    pytest.param("team-a/wp-1", id="dashes-both-sides"),
    pytest.param("prod.eu/wp.v2", id="dots"),
    pytest.param("0ns/9", id="leading-digits"),
])
def test_instance_name_is_what_systemd_escape_gives(waypoint: str) -> None:
    assert shutil.which("systemd-escape"), "systemd-escape is needed (Debian: systemd)"
    done = subprocess.run(["systemd-escape", waypoint], capture_output=True, text=True,
                          check=True)
    assert waypoint_instance(waypoint) == done.stdout.strip()
    back = subprocess.run(["systemd-escape", "--unescape", waypoint_instance(waypoint)],
                          capture_output=True, text=True, check=True)
    assert back.stdout.strip() == waypoint  # what %I gives the unit


def test_bin_rewrites_the_waypoint_template_and_an_instance_verifies(tmp_path: Path) -> None:
    _install(tmp_path, "--bin", "/bin/true")
    unit_dir = tmp_path / "etc/systemd/system"
    text = (unit_dir / WAYPOINT_UNIT).read_text()
    assert DEFAULT_BIN not in text
    assert "ExecStart=/bin/true waypoint run --name %I" in text
    instance = unit_dir / "nodeproxy-waypoint@default-waypoint.service"
    instance.write_text(text)
    done = subprocess.run(["systemd-analyze", "verify", f"./{WAYPOINT_UNIT}", f"./{instance.name}"],
                          cwd=unit_dir, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip() == ""

"""The systemd units: `systemd-analyze verify` clean, the contract other parts rely on, the
waypoint template's hardening (offline `systemd-analyze security`) and the `nodeproxy` options
its ExecStart= uses, and the tmpfiles.d entry applied for real below a temporary root."""

from __future__ import annotations

import configparser
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import click
import pytest

from cli.install_cmd import (
    DEFAULT_AGENT_ARGS,
    DEFAULT_CA_ARGS,
    DEFAULT_WAYPOINT_ARGS,
    waypoint_instance,
)

SYSTEMD = Path(__file__).resolve().parents[2] / "systemd"
WAYPOINT = "nodeproxy-waypoint@.service"
UNITS = ("nodeproxy.service", "nodeproxy-ca.service", WAYPOINT)
# What an operator enables: instances of the template (one with an escaped "-" in a name).
WAYPOINT_INSTANCES = ("nodeproxy-waypoint@default-waypoint.service",
                      "nodeproxy-waypoint@shop-cart\\x2dwaypoint.service")
BIN = "/opt/nodeproxy/venv/bin/nodeproxy"


def _parse(name: str) -> dict[str, list[str]]:
    """Unit file -> {"Section.Key": [values...]} (keys may repeat in unit files); a line
    ending in a backslash continues on the next, as systemd reads it."""
    out: dict[str, list[str]] = {}
    section = ""
    text = re.sub(r"\\\n[ \t]*", " ", (SYSTEMD / name).read_text())
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        out.setdefault(f"{section}.{key}", []).append(value)
    return out


def _verifiable_copies(directory: Path) -> list[str]:
    """Copies of every unit (and of waypoint instances) whose ExecStart runs /bin/true."""
    # verify checks that ExecStart's binary exists; /opt/nodeproxy/venv is not installed on a
    # development or CI machine.  Everything else (keys, values, sections) is as shipped.
    names = [*UNITS, *WAYPOINT_INSTANCES]
    for name in names:
        source = WAYPOINT if name.startswith("nodeproxy-waypoint@") else name
        text = (SYSTEMD / source).read_text()
        assert BIN in text
        (directory / name).write_text(text.replace(BIN, "/bin/true"))
    return names


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    assert shutil.which("systemd-analyze"), "systemd-analyze is needed (Debian: systemd)"
    names = _verifiable_copies(tmp_path)
    done = subprocess.run(
        ["systemd-analyze", "verify", *(f"./{n}" for n in names)],
        cwd=tmp_path, capture_output=True, text=True, check=False,
    )
    # An unknown or misspelt directive is only a warning ("Unknown key ..., ignoring") with
    # exit status 0, so any output at all fails the test.
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip() == "", done.stderr
    assert done.stdout.strip() == "", done.stdout


@pytest.mark.parametrize(("name", "good", "bad", "complaint"), [
    pytest.param("nodeproxy.service", "WatchdogSec=", "WatchdogSecs=", "Unknown key",
                 id="agent-typo"),
    pytest.param(WAYPOINT, "WatchdogSec=", "WatchdogSecs=", "Unknown key", id="waypoint-typo"),
    pytest.param(WAYPOINT, "--name %I", "--name %Z", "Failed to resolve unit specifiers",
                 id="waypoint-bad-specifier"),
])
def test_verify_catches_a_broken_unit(tmp_path: Path, name: str, good: str, bad: str,
                                      complaint: str) -> None:
    # Guards the check above: verify really reports typos in these files, templates included.
    text = (SYSTEMD / name).read_text().replace(BIN, "/bin/true")
    assert good in text
    (tmp_path / name).write_text(text.replace(good, bad))
    done = subprocess.run(["systemd-analyze", "verify", f"./{name}"], cwd=tmp_path,
                          capture_output=True, text=True, check=False)
    assert complaint in done.stderr


def test_agent_unit_contract() -> None:
    # The Vagrant suite and docs/deploy.md depend on these exact values.
    unit = _parse("nodeproxy.service")
    expect = {
        "Service.Type": ["notify"],
        "Service.NotifyAccess": ["main"],
        "Service.WatchdogSec": ["30"],
        "Service.EnvironmentFile": ["/etc/nodeproxy/agent.env"],
        "Service.ExecStart": [f"{BIN} run $NODEPROXY_RUN_ARGS"],
        "Service.ExecReload": ["/bin/kill -HUP $MAINPID"],
        "Service.Restart": ["on-failure"],
        "Service.NoNewPrivileges": ["yes"],
        "Service.ProtectSystem": ["strict"],
        "Service.ProtectHome": ["yes"],
        "Service.PrivateTmp": ["yes"],
        "Service.RestrictAddressFamilies": ["AF_UNIX AF_INET AF_INET6 AF_NETLINK"],
        "Install.WantedBy": ["multi-user.target"],
    }
    for key, value in expect.items():
        assert unit.get(key) == value, key
    caps = {"CAP_SYS_ADMIN", "CAP_NET_ADMIN", "CAP_NET_RAW", "CAP_BPF", "CAP_PERFMON"}
    assert set(unit["Service.CapabilityBoundingSet"][0].split()) == caps
    assert set(unit["Service.AmbientCapabilities"][0].split()) == caps
    writable = unit["Service.ReadWritePaths"][0].split()
    assert {"/run/nodeproxy", "/run/netns", "-/run/xtables.lock"} <= set(writable)


@pytest.mark.parametrize(
    "forbidden",
    # Each breaks the agent (reasons in the unit's comments).
    ["PrivateNetwork", "RestrictNamespaces", "SystemCallFilter", "ProtectKernelTunables",
     "ProtectKernelModules", "MemoryDenyWriteExecute", "PrivateMounts", "MountFlags"],
)
def test_agent_unit_avoids_breaking_hardening(forbidden: str) -> None:
    assert f"Service.{forbidden}" not in _parse("nodeproxy.service")


def test_ca_unit_contract() -> None:
    unit = _parse("nodeproxy-ca.service")
    assert unit["Service.EnvironmentFile"] == ["/etc/nodeproxy/ca.env"]
    assert unit["Service.ExecStart"] == [f"{BIN} ca serve $NODEPROXY_CA_ARGS"]
    assert unit["Service.CapabilityBoundingSet"] == [""]  # no capabilities at all
    assert unit["Service.NoNewPrivileges"] == ["yes"]


def test_tmpfiles_creates_the_directories(tmp_path: Path) -> None:
    assert shutil.which("systemd-tmpfiles")
    done = subprocess.run(
        ["systemd-tmpfiles", "--create", f"--root={tmp_path}", str(SYSTEMD / "nodeproxy.tmpfiles")],
        capture_output=True, text=True, check=False,
    )
    assert done.returncode == 0, done.stderr
    modes = {p: (tmp_path / p).stat().st_mode & 0o777
             for p in ("run/nodeproxy", "run/netns", "etc/nodeproxy", "var/lib/nodeproxy")}
    # /etc/nodeproxy is readable by all: the waypoint's dynamic user reads and inotify-watches
    # config.yaml there (watching a directory needs read permission on it).
    assert modes == {"run/nodeproxy": 0o755, "run/netns": 0o755, "etc/nodeproxy": 0o755,
                     "var/lib/nodeproxy": 0o700}


def test_unit_files_parse_as_ini() -> None:
    # Cheap guard against stray text outside sections (verify also catches it).
    for name in UNITS:
        parser = configparser.ConfigParser(strict=False, interpolation=None)
        parser.optionxform = str  # type: ignore[assignment,method-assign]
        parser.read(SYSTEMD / name)
        assert parser.has_section("Service")


# --- the waypoint template -------------------------------------------------------------------

def test_waypoint_unit_contract() -> None:
    # docs/deploy.md and `nodeproxy install --waypoint` depend on these exact values.
    unit = _parse(WAYPOINT)
    expect = {
        "Service.Type": ["notify"],
        "Service.NotifyAccess": ["main"],
        "Service.WatchdogSec": ["30"],
        "Service.EnvironmentFile": ["/etc/nodeproxy/waypoint-%i.env"],
        "Service.ExecReload": ["/bin/kill -HUP $MAINPID"],
        "Service.Restart": ["on-failure"],
        "Service.DynamicUser": ["yes"],
        "Service.CapabilityBoundingSet": [""],  # no capabilities at all
        "Service.AmbientCapabilities": [""],
        "Service.NoNewPrivileges": ["yes"],
        "Service.RestrictAddressFamilies": ["AF_UNIX AF_INET AF_INET6"],  # no netlink
        "Install.WantedBy": ["multi-user.target"],
    }
    for key, value in expect.items():
        assert unit.get(key) == value, key
    (exec_start,) = unit["Service.ExecStart"]
    assert exec_start.startswith(f"{BIN} waypoint run --name %I ")
    assert exec_start.endswith(" $NODEPROXY_WAYPOINT_ARGS")


def test_waypoint_credentials_come_through_load_credential() -> None:
    # Every credential the ExecStart= reads from %d is loaded, from the agent's paths.
    unit = _parse(WAYPOINT)
    loaded = dict(v.split(":", 1) for v in unit["Service.LoadCredential"])
    (exec_start,) = unit["Service.ExecStart"]
    read = dict(re.findall(r"(--[a-z-]+) %d/(\S+)", exec_start))
    assert read == {"--node-cert": "node-cert.pem", "--node-key": "node-key.pem",
                    "--ca-bundle": "bundle.pem"}
    assert set(read.values()) == set(loaded)
    agent_paths = dict(re.findall(r"(--[a-z-]+) (\S+)", DEFAULT_AGENT_ARGS))
    for flag, credential in read.items():
        assert loaded[credential] == agent_paths[flag], flag
    # The renewed node certificate goes to the unit's own state directory.
    assert "--state-dir ${STATE_DIRECTORY}" in exec_start
    assert unit["Service.StateDirectory"] == ["nodeproxy-waypoint-%i"]


AGENT_HARDENING_THAT_APPLIES = ("NoNewPrivileges", "ProtectSystem", "ProtectHome", "PrivateTmp",
                                "ProtectKernelLogs", "ProtectClock", "ProtectHostname",
                                "LockPersonality", "RestrictRealtime", "RestrictSUIDSGID")


@pytest.mark.parametrize("key", AGENT_HARDENING_THAT_APPLIES)
def test_waypoint_hardened_like_the_agent(key: str) -> None:
    agent = _parse("nodeproxy.service")
    assert agent[f"Service.{key}"] == _parse(WAYPOINT)[f"Service.{key}"]


@pytest.mark.parametrize(("key", "value"), [
    # Each breaks the agent (its unit says why) but costs the waypoint nothing.
    ("ProtectKernelTunables", "yes"), ("ProtectKernelModules", "yes"),
    ("ProtectControlGroups", "yes"), ("RestrictNamespaces", "yes"), ("PrivateDevices", "yes"),
    ("PrivateMounts", "yes"), ("SystemCallFilter", "@system-service"),
    ("SystemCallArchitectures", "native"), ("ProtectProc", "invisible"), ("UMask", "0077"),
    ("MemoryDenyWriteExecute", "yes"),
])
def test_waypoint_has_the_hardening_the_agent_cannot_have(key: str, value: str) -> None:
    assert _parse(WAYPOINT)[f"Service.{key}"] == [value]


def _exposure(directory: Path, name: str, threshold: float) -> tuple[int, float]:
    # --threshold takes the exposure in tenths (the 0-100 scale systemd prints as 0.0-10.0).
    done = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", f"--threshold={round(threshold * 10)}",
         "--no-pager", f"./{name}"],
        cwd=directory, capture_output=True, text=True, check=False)
    found = re.search(r"Overall exposure level for \S+: ([0-9.]+)", done.stdout)
    assert found, done.stdout + done.stderr
    return done.returncode, float(found.group(1))


def test_waypoint_exposure_is_low_and_below_the_agents(tmp_path: Path) -> None:
    # systemd's own scoring of the sandbox (0 = fully locked down, 10 = unprotected), read from
    # the unit files without a running systemd.  The CA unit scores 2.2, the agent 5.9.
    _verifiable_copies(tmp_path)
    code, waypoint = _exposure(tmp_path, WAYPOINT_INSTANCES[0], 2.0)
    assert code == 0, f"exposure {waypoint} is over 2.0"
    _, agent = _exposure(tmp_path, "nodeproxy.service", 10)
    assert waypoint < agent


def test_exposure_threshold_really_fails(tmp_path: Path) -> None:
    # Guards the check above: a unit over the threshold makes it exit non-zero.
    _verifiable_copies(tmp_path)
    code, agent = _exposure(tmp_path, "nodeproxy.service", 2.0)
    assert agent > 2.0
    assert code != 0


def _systemd_argv(exec_start: str, env_args: str, instance: str) -> list[str]:
    """The argv systemd would exec, from ExecStart= with the specifiers and variables this
    unit uses resolved as systemd does: %I, %d, ${STATE_DIRECTORY}, and $VAR split on spaces."""
    unescaped = instance.replace("-", "/").replace("\\x2d", "-")
    words = []
    for word in shlex.split(exec_start):
        if word.startswith("$") and not word.startswith("${"):
            words.extend(env_args.split())
            continue
        word = word.replace("%I", unescaped).replace("%d", f"/run/credentials/{instance}")
        words.append(word.replace("${STATE_DIRECTORY}", f"/var/lib/nodeproxy-waypoint-{instance}"))
    return words


def _command(path: tuple[str, ...]) -> click.Command:
    from cli.main import cli

    command: click.Command = cli
    for name in path:
        assert isinstance(command, click.Group)
        found = command.get_command(click.Context(command), name)
        assert found is not None, name
        command = found
    return command


@pytest.mark.parametrize(("unit", "subcommand", "env_args"), [
    pytest.param("nodeproxy.service", ("run",), DEFAULT_AGENT_ARGS, id="agent"),
    pytest.param("nodeproxy-ca.service", ("ca", "serve"), DEFAULT_CA_ARGS, id="ca"),
    pytest.param(WAYPOINT, ("waypoint", "run"), DEFAULT_WAYPOINT_ARGS, id="waypoint"),
])
def test_every_option_the_unit_passes_exists(unit: str, subcommand: tuple[str, ...],
                                             env_args: str) -> None:
    # ExecStart= plus the env file `nodeproxy install` writes by default.
    (exec_start,) = _parse(unit)["Service.ExecStart"]
    argv = _systemd_argv(exec_start, env_args, waypoint_instance("default/waypoint"))
    assert argv[0] == BIN
    assert tuple(argv[1:1 + len(subcommand)]) == subcommand
    command = _command(subcommand)
    known = {opt for param in command.params for opt in param.opts}
    used = [word for word in argv if word.startswith("--")]
    assert used
    assert set(used) <= known, set(used) - known


def test_waypoint_argv_parses_with_the_real_command() -> None:
    # Beyond names: values, types and required options, as `waypoint run` would parse them
    # (without running it).
    (exec_start,) = _parse(WAYPOINT)["Service.ExecStart"]
    instance = waypoint_instance("shop/cart-waypoint")
    argv = _systemd_argv(exec_start, DEFAULT_WAYPOINT_ARGS, instance)
    run = _command(("waypoint", "run"))
    with run.make_context("run", argv[3:]) as ctx:
        params: dict[str, Any] = dict(ctx.params)
    assert params["name"] == "shop/cart-waypoint"  # %I gives the waypoint's name back
    assert params["node_key"] == f"/run/credentials/{instance}/node-key.pem"
    assert params["state_dir"] == f"/var/lib/nodeproxy-waypoint-{instance}"
    # Next to an agent on the same host: none of the agent's node ports.
    agent = _command(("run",))
    with agent.make_context("run", ["--config", "c.yaml", "--node", "n1"]) as agent_ctx:
        agent_ports = {agent_ctx.params[k].rsplit(":", 1)[1]
                       for k in ("readiness_addr", "metrics_addr", "admin_addr")}
    waypoint_ports = {params[k].rsplit(":", 1)[1]
                      for k in ("readiness_addr", "metrics_addr", "admin_addr")}
    assert not agent_ports & waypoint_ports

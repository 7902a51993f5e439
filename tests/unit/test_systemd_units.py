"""The systemd units: `systemd-analyze verify` clean, the contract other parts rely on, and
the tmpfiles.d entry applied for real below a temporary root."""

from __future__ import annotations

import configparser
import shutil
import subprocess
from pathlib import Path

import pytest

SYSTEMD = Path(__file__).resolve().parents[2] / "systemd"
UNITS = ("nodeproxy.service", "nodeproxy-ca.service")
BIN = "/opt/nodeproxy/venv/bin/nodeproxy"


def _parse(name: str) -> dict[str, list[str]]:
    """Unit file -> {"Section.Key": [values...]} (keys may repeat in unit files)."""
    out: dict[str, list[str]] = {}
    section = ""
    for raw in (SYSTEMD / name).read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        out.setdefault(f"{section}.{key}", []).append(value)
    return out


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    # verify checks that ExecStart's binary exists; /opt/nodeproxy/venv is not installed on a
    # development or CI machine, so verify a copy whose ExecStart points at /bin/true.
    # Everything else (keys, values, section names) is verified as shipped.
    assert shutil.which("systemd-analyze"), "systemd-analyze is needed (Debian: systemd)"
    for name in UNITS:
        text = (SYSTEMD / name).read_text()
        assert BIN in text
        (tmp_path / name).write_text(text.replace(BIN, "/bin/true"))
    done = subprocess.run(
        ["systemd-analyze", "verify", *(f"./{n}" for n in UNITS)],
        cwd=tmp_path, capture_output=True, text=True, check=False,
    )
    # An unknown or misspelt directive is only a warning ("Unknown key ..., ignoring") with
    # exit status 0, so any output at all fails the test.
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip() == "", done.stderr
    assert done.stdout.strip() == "", done.stdout


def test_verify_catches_a_misspelt_directive(tmp_path: Path) -> None:
    # Guards the check above: verify really reports typos in these files.
    text = (SYSTEMD / "nodeproxy.service").read_text().replace(BIN, "/bin/true")
    (tmp_path / "nodeproxy.service").write_text(text.replace("WatchdogSec=", "WatchdogSecs="))
    done = subprocess.run(["systemd-analyze", "verify", "./nodeproxy.service"], cwd=tmp_path,
                          capture_output=True, text=True, check=False)
    assert "Unknown key" in done.stderr


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
    assert modes == {"run/nodeproxy": 0o755, "run/netns": 0o755, "etc/nodeproxy": 0o750,
                     "var/lib/nodeproxy": 0o700}


def test_unit_files_parse_as_ini() -> None:
    # Cheap guard against stray text outside sections (verify also catches it).
    for name in UNITS:
        parser = configparser.ConfigParser(strict=False, interpolation=None)
        parser.optionxform = str  # type: ignore[assignment,method-assign]
        parser.read(SYSTEMD / name)
        assert parser.has_section("Service")

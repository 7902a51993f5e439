"""`nodeproxy install --systemd --root DIR`: what lands where, and config is never clobbered."""

from __future__ import annotations

import subprocess
from pathlib import Path

from click.testing import CliRunner

from cli.install_cmd import DEFAULT_BIN
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

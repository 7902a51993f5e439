"""The `nodeproxy redirect` commands: wiring, exit codes and messages (no root needed)."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from cli.main import cli


def test_redirect_group_is_registered() -> None:
    result = CliRunner().invoke(cli, ["redirect", "--help"])
    assert result.exit_code == 0
    for sub in ("install", "verify", "remove", "show"):
        assert sub in result.output


def test_missing_namespace_exits_nonzero_with_message(tmp_path: Path) -> None:
    gone = str(tmp_path / "nope")
    result = CliRunner().invoke(cli, ["redirect", "verify", "--netns", gone])
    assert result.exit_code == 1
    assert f"network namespace {gone} does not exist" in result.output


def test_bad_backend_is_rejected_by_click(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        cli, ["redirect", "install", "--netns", str(tmp_path), "--backend", "bpfilter"]
    )
    assert result.exit_code == 2
    assert "bpfilter" in result.output


def test_bad_spec_option_is_a_redirect_error(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        cli, ["redirect", "install", "--netns", str(tmp_path), "--exclude-cidr", "10.0.0.999/8"]
    )
    assert result.exit_code == 1
    assert "invalid exclude_outbound_cidrs entry" in result.output


def test_ebpf_install_without_cgroup_is_a_redirect_error(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        cli, ["redirect", "install", "--netns", str(tmp_path), "--backend", "ebpf"]
    )
    assert result.exit_code == 1
    assert "no cgroup given" in result.output

"""`nodeproxy run` option checks that need no agent: the development-only in-process CA."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from click.testing import CliRunner

from cli.run_cmd import DEV_CA_WARNING, command
from nodeproxy.errors import IdentityError


def test_old_ca_dir_flag_is_refused_and_points_to_both_replacements(tmp_path: Path) -> None:
    result = CliRunner().invoke(command, ["--config", str(tmp_path / "c.yaml"), "--node", "n1",
                                          "--ca-dir", str(tmp_path / "ca")])
    assert result.exit_code == 2
    assert "--ca-dir is now --dev-ca-dir" in result.output
    assert "in production use --ca-address" in result.output


@pytest.mark.parametrize("extra", [[], ["--dev-ca-dir", "d", "--ca-address", "https://h:1"]])
def test_exactly_one_ca_source_names_the_new_flag(tmp_path: Path, extra: list[str]) -> None:
    result = CliRunner().invoke(command, ["--config", str(tmp_path / "c.yaml"), "--node", "n1",
                                          *extra])
    assert result.exit_code == 2
    assert "give exactly one of --ca-address (production) or --dev-ca-dir" in result.output


def test_dev_ca_dir_warns_before_loading_the_ca_key(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The warning comes first, so it is logged even when the directory is not a CA."""
    with caplog.at_level(logging.WARNING, logger="nodeproxy.run"):
        result = CliRunner().invoke(command, ["--config", str(tmp_path / "c.yaml"),
                                              "--node", "n1", "--dev-ca-dir", str(tmp_path)])
    assert isinstance(result.exception, IdentityError)
    assert [r.getMessage() for r in caplog.records if r.name == "nodeproxy.run"] == \
        [DEV_CA_WARNING]


def test_help_marks_dev_ca_dir_development_only_and_hides_the_old_name() -> None:
    result = CliRunner().invoke(command, ["--help"])
    assert result.exit_code == 0
    assert "--dev-ca-dir" in result.output
    assert "DEVELOPMENT ONLY" in result.output
    assert "--ca-dir " not in result.output

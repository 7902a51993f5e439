"""`nodeproxy config validate|show` through click's CliRunner, with golden output."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from cli.config_cmd import command as config_group
from cli.tables import render_data, render_table
from ztunnel_cfg import load_config_file, load_config_text

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = "examples/cluster.yaml"
BROKEN = "examples/broken.yaml"

GOLDEN_TABLE = """\
NAMESPACE POD NAME     ADDRESS   NODE  WAYPOINT PROTOCOL
default   client-0     10.10.1.2 node1 None     HBONE
default   echo-0       10.10.1.3 node1 None     HBONE
default   echo-1       10.10.2.2 node2 None     HBONE
legacy    legacy-app-0 10.10.2.5 node2 None     HBONE
legacy    legacy-db-0  10.10.1.5 node1 None     TCP
shop      cart-0       10.10.2.3 node2 None     HBONE
shop      frontend-0   10.10.1.4 node1 None     HBONE
shop      waypoint-0   10.10.2.4 node2 None     HBONE

NAMESPACE SERVICE NAME SERVICE VIP WAYPOINT ENDPOINTS
default   echo         10.96.0.10  None     2/2
shop      cart         10.96.0.20  waypoint 1/1
shop      waypoint     10.96.0.30  None     1/1

NAMESPACE    POLICY NAME              ACTION SCOPE
default      allow-echo               Allow  WorkloadSelector
default      deny-legacy              Deny   Namespace
istio-system deny-quarantine          Deny   Global
shop         allow-cart-from-waypoint Allow  WorkloadSelector
"""


@pytest.fixture
def runner() -> Iterator[CliRunner]:
    cwd = os.getcwd()
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    os.chdir(ROOT)  # file names in messages are relative, as a user would type them
    try:
        yield CliRunner()
    finally:
        os.chdir(cwd)
        root.handlers[:] = handlers
        root.setLevel(level)


def test_validate_valid_file(runner: CliRunner) -> None:
    result = runner.invoke(config_group, ["validate", CLUSTER])
    assert result.exit_code == 0, result.output
    assert result.stdout == (
        "examples/cluster.yaml: valid (8 workloads, 3 services, 4 policies, 1 waypoint, "
        "3 peerAuthentications, 2 nodes; trust domain cluster.local)\n"
    )


def test_validate_counts_the_l7_sections(runner: CliRunner) -> None:
    result = runner.invoke(config_group, ["validate", "examples/l7.yaml"])
    assert result.exit_code == 0, result.output
    assert result.stdout == (
        "examples/l7.yaml: valid (4 workloads, 2 services, 3 policies, 1 waypoint, 1 route, "
        "1 trafficPolicy, 2 nodes; trust domain cluster.local)\n"
    )


def test_validate_lists_every_error_with_position(runner: CliRunner) -> None:
    result = runner.invoke(config_group, ["validate", CLUSTER, BROKEN])
    assert result.exit_code == 1
    lines = result.stdout.splitlines()
    assert lines[0].startswith("examples/cluster.yaml: valid")
    errors = lines[1:]
    markers = [
        n
        for n, line in enumerate((ROOT / BROKEN).read_text().splitlines(), start=1)
        if "# expect: " in line and not line.startswith("#")
    ]
    assert len(errors) == len(markers)
    assert sorted(int(e.split(":")[1]) for e in errors) == sorted(markers)
    assert errors[0] == (
        "examples/broken.yaml:9:17: workloads[0].workloadIps[0]: '10.0.0.300' is not an IP address"
    )
    assert result.stderr == (
        f"{len(markers)} errors in 1 file (1 of 2 valid)\n"
    )


def test_validate_missing_file(runner: CliRunner) -> None:
    result = runner.invoke(config_group, ["validate", "nope.yaml"])
    assert result.exit_code == 1
    assert result.stdout.startswith("nope.yaml: cannot read config file: No such file")


def test_show_table_golden(runner: CliRunner) -> None:
    result = runner.invoke(config_group, ["show", CLUSTER])
    assert result.exit_code == 0, result.output
    assert result.stdout == GOLDEN_TABLE


@pytest.mark.parametrize("fmt", ["json", "yaml"])
def test_show_data_formats_round_trip(runner: CliRunner, fmt: str) -> None:
    result = runner.invoke(config_group, ["show", CLUSTER, "-o", fmt])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout) if fmt == "json" else yaml.safe_load(result.stdout)
    assert [w["name"] for w in doc["workloads"]][:2] == ["client-0", "echo-0"]
    assert doc["services"][0]["vips"] == ["/10.96.0.10"]
    assert doc["policies"][0]["action"] == "Deny"
    # What `show` prints is itself a valid config describing the same mesh.
    assert load_config_text(result.stdout) == load_config_file(ROOT / CLUSTER)


def test_show_broken_file_is_one_clear_error_via_main_cli(runner: CliRunner) -> None:
    from cli.main import cli

    result = runner.invoke(cli, ["config", "show", BROKEN])
    assert result.exit_code == 1
    assert result.stdout == ""
    markers = sum(
        1
        for line in (ROOT / BROKEN).read_text().splitlines()
        if "# expect: " in line and not line.startswith("#")
    )
    assert markers >= 30
    assert result.stderr.startswith(f"error: {markers} errors in config:\n")
    assert "Traceback" not in result.stderr


def test_show_rejects_unknown_format(runner: CliRunner) -> None:
    result = runner.invoke(config_group, ["show", CLUSTER, "-o", "xml"])
    assert result.exit_code == 2
    assert "'xml' is not one of 'table', 'json', 'yaml'" in result.stderr


def test_render_table_alignment() -> None:
    text = render_table(["A", "LONG HEADER", "C"], [("xx", 1, None), ("y", "", "last")])
    assert text == "A  LONG HEADER C\nxx 1\ny              last\n"
    assert render_table(["A", "B"], [], gap=3) == "A   B\n"


def test_render_data() -> None:
    assert render_data({"a": [1]}, "json") == '{\n  "a": [\n    1\n  ]\n}\n'
    assert render_data({"a": [1]}, "yaml") == "a:\n- 1\n"
    with pytest.raises(ValueError, match="unknown output format"):
        render_data({}, "xml")

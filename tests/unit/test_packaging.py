"""The venv sees Debian's bcc and nothing else of Debian's dist-packages; the CLI starts."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def test_bcc_comes_from_debian_and_nothing_else_does() -> None:
    spec = importlib.util.find_spec("bcc")
    assert spec is not None, "run 'make deps' (python3-bpfcc)"
    assert spec.origin is not None
    assert "debian-bcc" in spec.origin
    # debconf lives next to bcc in /usr/lib/python3/dist-packages: it must stay invisible.
    assert importlib.util.find_spec("debconf") is None


def test_console_entry_point_reports_version() -> None:
    out = subprocess.run([sys.executable, "-m", "cli.main", "--version"], capture_output=True,
                         text=True, check=True)
    assert out.stdout.startswith("nodeproxy, version ")


@pytest.mark.slow
def test_wheel_ships_the_lab_beside_the_daemon_not_inside_it(tmp_path: Path) -> None:
    """One distribution, two roles: ``meshlab`` (lab, demo, traffic apps) and ``linuxns`` are
    top-level packages of the wheel; the daemon's package holds no lab code."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    for name in ("cli", "linuxns", "meshlab", "nodeproxy", "redirect", "ztunnel_cfg", "bpf",
                 "systemd", "examples"):
        shutil.copytree(REPO / name, src / name,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w",
                    str(tmp_path / "dist"), str(src)], check=True, capture_output=True)
    [wheel] = (tmp_path / "dist").glob("nodeproxy-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if n.endswith(".py")}
    assert tops == {"cli", "linuxns", "meshlab", "nodeproxy", "redirect", "ztunnel_cfg"}
    for module in ("__main__", "apps", "build", "capture", "config", "mesh", "topology",
                   "demo/__init__", "demo/scenario", "demo/observe", "demo/report",
                   "demo/run"):
        assert f"meshlab/{module}.py" in names
    assert not [n for n in names if n.startswith("nodeproxy/lab")]

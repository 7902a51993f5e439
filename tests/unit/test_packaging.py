"""The venv sees Debian's bcc and nothing else of Debian's dist-packages; the CLI starts."""

from __future__ import annotations

import importlib.util
import subprocess
import sys


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

"""The lab traffic apps over loopback (no namespaces needed)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    record = tmp_path / "rec.bin"
    proc = subprocess.Popen(
        [sys.executable, "-m", "meshlab.apps", "server", "--host", "127.0.0.1",
         "--port", "0", "--tag", "t1", "--record", str(record)],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert proc.stdout is not None
        ready = json.loads(proc.stdout.readline())
        yield ready["listening"][1], record
    finally:
        proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def _client(*args: str) -> tuple[int, list[dict[str, Any]]]:
    out = subprocess.run(
        [sys.executable, "-m", "meshlab.apps", "client", *args],
        capture_output=True, text=True, timeout=30, check=False,
    )
    return out.returncode, [json.loads(line) for line in out.stdout.splitlines()]


def test_client_and_server_round_trip(server: tuple[int, Path]) -> None:
    port, record = server
    rc, results = _client("--connect", f"127.0.0.1:{port}", "--send", "MARK-1", "--count", "3")
    assert rc == 0
    assert len(results) == 3
    for r in results:
        assert r["ok"] is True
        assert r["tag"] == "t1"
        assert r["seen_from"].startswith("127.0.0.1:")
        assert r["echo"] == "MARK-1"
        assert r["bytes_sent"] == 6
        assert r["bytes_received"] == len(r["reply"])
    assert record.read_bytes() == b"MARK-1" * 3


def test_client_reports_failure_and_exit_status(server: tuple[int, Path]) -> None:
    port, _ = server
    # Nothing listens on port+1 (almost surely): refused, exit status 1.
    rc, results = _client("--connect", f"127.0.0.1:{port + 1}", "--timeout", "2")
    assert rc == 1
    assert results[0]["ok"] is False
    assert results[0]["error"].startswith("ConnectionRefusedError")
